"""A stub OpenAI-compatible upstream that speaks the real wire format.

Used as the demo upstream of `make run`, by the tests and by the benchmark. Behaviour is steered by
directives in the last message's text, so a test drives it through the gateway unchanged:

  [[tokens:N]]   answer with N completion tokens (default 8, capped by max_tokens)
  [[fail:CODE]]  answer with an OpenAI error body and status CODE before anything streams
  [[midfail]]    stream half the tokens, then drop the connection
  [[slow:S]]     wait S seconds before answering (and between chunks when streaming)
  [[nousage]]    never report usage
  [[replay:NAME]] or [[replay:NAME:CUT]]  (anywhere in a POST body, on any path) answer with the corpus
                 transcript devstack/corpus/NAME.* byte for byte; its extension gives the content type.
                 CUT: whole (one write, the default), awkward (a separate write inside every CRLF, every
                 multi-byte UTF-8 character and every `data:`), bytes (one byte per write), drop (the
                 connection dies halfway through)

Upstream 429 and 503 answers carry `Retry-After` and `x-ratelimit-*` headers, as OpenAI's do.

`create_app(models=..., priced=..., flavor=...)` makes it one of several providers for the routing tests:
the models it serves, whether its `/models` carries OpenRouter-style `pricing` (OpenAI's does not), and
`flavor="anthropic"` to speak Anthropic's Messages API (`x-api-key`, `anthropic-version`) with its model
list. `app[BEHAVIOUR]` steers every call at once: `{"fail": 503}` (or 429) answers that status before
anything, `{"first_byte_delay": S}` holds the status line back S seconds; `app[HITS]` counts calls per path.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import re
import time
import uuid
from pathlib import Path

from aiohttp import web

# OpenRouter-style list entries (id, context, USD per token), as an aggregator upstream describes them.
MODELS = (
    ("openai/gpt-4o-mini", 128_000, "0.00000015", "0.0000006"),
    ("openai/gpt-4o", 128_000, "0.0000025", "0.00001"),
    ("anthropic/claude-sonnet-4.6", 200_000, "0.000003", "0.000015"),
    ("meta-llama/llama-3.1-8b-instruct", 131_072, "0.00000002", "0.00000005"),
    ("openai/text-embedding-3-small", 8_192, "0.00000002", "0"),
)
_DIRECTIVE = re.compile(r"\[\[(\w+)(?::([\d.]+))?\]\]")


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {}
    if status in (429, 503):
        headers = {"Retry-After": "7", "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0",
                   "x-ratelimit-reset-requests": "7s"}  # fmt: skip
    return web.json_response(body, status=status, headers=headers)


# ---- replaying recorded wire formats ----------------------------------------------------------

CORPUS = Path(__file__).with_name("corpus")
_REPLAY = re.compile(rb"\[\[replay:([\w.-]+)(?::(\w+))?\]\]")
_CONTENT_TYPES = {".sse": "text/event-stream", ".json": "application/json", ".txt": "text/plain; charset=utf-8",
                  ".mp3": "audio/mpeg"}  # fmt: skip


def awkward_cuts(data: bytes) -> list[int]:
    """Offsets that split `data` inside every CRLF, every multi-byte UTF-8 character and every `data:`."""
    cuts = set()
    for index, byte in enumerate(data):
        if byte == 0x0A and index and data[index - 1] == 0x0D:
            cuts.add(index)
        elif 0x80 <= byte < 0xC0:  # a UTF-8 continuation byte: cut before it
            cuts.add(index)
    for match in re.finditer(rb"data:", data):
        cuts.add(match.start() + 2)
    return sorted(cuts)


async def _replay(request: web.Request, name: str, cut: str) -> web.StreamResponse:
    files = [f for f in CORPUS.glob(f"{name}.*") if f.suffix in _CONTENT_TYPES]
    if len(files) != 1:
        return _error(404, f"no corpus transcript {name!r}")
    data = files[0].read_bytes()
    response = web.StreamResponse(headers={"Content-Type": _CONTENT_TYPES[files[0].suffix]})
    await response.prepare(request)
    if cut == "drop":  # the upstream dies halfway through
        await response.write(data[: len(data) // 2])
        await asyncio.sleep(0.01)
        request.transport.close()
        return response
    if cut == "whole":
        pieces = [data]
    else:
        bounds = [0, *(awkward_cuts(data) if cut == "awkward" else range(1, len(data))), len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    pause = 0.002 if cut == "awkward" else 0  # let each piece reach the reader as a read of its own
    for index, piece in enumerate(pieces):
        if index:
            await asyncio.sleep(pause)
        await response.write(piece)
    await response.write_eof()
    return response


@web.middleware
async def replay(request: web.Request, handler):
    if request.method == "POST":
        match = _REPLAY.search(await request.read())
        if match:
            return await _replay(request, match.group(1).decode(), (match.group(2) or b"whole").decode())
    return await handler(request)


def _directives(body: dict) -> dict[str, float]:
    text = ""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        content = messages[-1].get("content") if isinstance(messages[-1], dict) else ""
        text = content if isinstance(content, str) else json.dumps(content)
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    elif isinstance(body.get("input"), str):
        text = body["input"]
    return {name: float(value or 1) for name, value in _DIRECTIVE.findall(text)}


def _prompt_tokens(body: dict) -> int:
    source = body.get("messages") or body.get("prompt") or body.get("input") or ""
    return max(1, len(json.dumps(source).split()))


async def _read(request: web.Request) -> dict:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise web.HTTPBadRequest(
            text='{"error":{"message":"invalid JSON","type":"invalid_request_error"}}', content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error":{"message":"body must be an object"}}', content_type="application/json")
    return body


async def _behave(request: web.Request) -> web.Response | None:
    """Count the call and apply the app-wide behaviour: a delay before the first byte, or a failure status."""
    request.app[HITS][request.path] += 1
    behaviour = request.app[BEHAVIOUR]
    if behaviour.get("first_byte_delay"):
        await asyncio.sleep(behaviour["first_byte_delay"])
    if behaviour.get("fail"):
        return _error(int(behaviour["fail"]), "the stub upstream is failing on purpose", "server_error")
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _read(request)
    if (failure := await _behave(request)) is not None:
        return failure
    if request.headers.get("Authorization") != f"Bearer {request.app[API_KEY]}":
        return _error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key")
    if not body.get("model"):
        return _error(400, "you must provide a model parameter")
    d = _directives(body)
    if "slow" in d:
        await asyncio.sleep(d["slow"])
    if "fail" in d:
        return _error(int(d["fail"]), "the stub upstream failed on purpose", "server_error")
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    n = int(d.get("tokens", 8))
    if isinstance(cap, int) and cap > 0:
        n = min(n, cap)
    prompt = _prompt_tokens(body)
    usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
    ident, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body["model"]
    words = [f"w{i} " for i in range(n)]
    if not body.get("stream"):
        out = {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                         "logprobs": None, "finish_reason": "stop"}],
        }  # fmt: skip
        if "nousage" not in d:
            out["usage"] = usage
        return web.json_response(out)

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and "nousage" not in d

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            data["usage"] = None
        data.update(extra)
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    await response.write(chunk({"role": "assistant", "content": ""}))
    for i, word in enumerate(words):
        if "midfail" in d and i == n // 2:
            request.transport.close()  # the upstream dies mid-stream
            return response
        if "slow" in d:
            await asyncio.sleep(d["slow"] / max(n, 1))
        await response.write(chunk({"content": word}))
    await response.write(chunk({}, "stop"))
    if include_usage:
        tail = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        await response.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def completions(request: web.Request) -> web.Response:
    body = await _read(request)
    d = _directives(body)
    if "fail" in d:
        return _error(int(d["fail"]), "the stub upstream failed on purpose", "server_error")
    n = int(d.get("tokens", 8))
    prompt = _prompt_tokens(body)
    return web.json_response({
        "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"text": " ".join(f"w{i}" for i in range(n)), "index": 0, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n},
    })  # fmt: skip


async def embeddings(request: web.Request) -> web.Response:
    body = await _read(request)
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    prompt = _prompt_tokens(body)
    return web.json_response({
        "object": "list", "model": body.get("model"),
        "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(items))],
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    })  # fmt: skip


async def responses(request: web.Request) -> web.Response:
    body = await _read(request)
    n = int(_directives(body).get("tokens", 8))
    prompt = _prompt_tokens(body)
    return web.json_response({
        "id": f"resp_{uuid.uuid4().hex[:24]}", "object": "response", "created_at": int(time.time()),
        "status": "completed", "model": body.get("model"),
        "output": [{"type": "message", "id": f"msg_{uuid.uuid4().hex[:12]}", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": " ".join(f"w{i}" for i in range(n)),
                                 "annotations": []}]}],
        "usage": {"input_tokens": prompt, "output_tokens": n, "total_tokens": prompt + n},
    })  # fmt: skip


async def models_list(request: web.Request) -> web.Response:
    if request.app[FLAVOR] == "anthropic":
        if request.headers.get("x-api-key") != request.app[API_KEY] or "anthropic-version" not in request.headers:
            return _anthropic_error(401, "authentication_error", "invalid x-api-key")
        return web.json_response({
            "data": [{"type": "model", "id": model, "display_name": model, "created_at": "2025-09-29T00:00:00Z"}
                     for model, *_ in request.app[MODELS_SERVED]],
            "has_more": False, "first_id": None, "last_id": None,
        })  # fmt: skip
    if request.app[PRICED]:
        data = [
            {"id": model, "object": "model", "created": 1700000000, "owned_by": model.split("/")[0],
             "name": model.split("/")[-1], "context_length": context,
             "architecture": {"modality": "text->text", "input_modalities": ["text"], "output_modalities": ["text"]},
             "pricing": {"prompt": prompt, "completion": completion, "request": "0"},
             "top_provider": {"context_length": context, "max_completion_tokens": 16_384}}
            for model, context, prompt, completion in request.app[MODELS_SERVED]
        ]  # fmt: skip
    else:  # OpenAI's own list: no prices, no context length
        data = [{"id": model, "object": "model", "created": 1700000000, "owned_by": "system"}
                for model, *_ in request.app[MODELS_SERVED]]  # fmt: skip
    return web.json_response({"object": "list", "data": data})


def _anthropic_error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status)


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic's Messages API: `usage.input_tokens` excludes the cache reads and writes it reports apart."""
    body = await _read(request)
    if (failure := await _behave(request)) is not None:
        return failure
    if request.headers.get("x-api-key") != request.app[API_KEY] or "anthropic-version" not in request.headers:
        return _anthropic_error(401, "authentication_error", "invalid x-api-key")
    if not body.get("model") or not isinstance(body.get("max_tokens"), int):
        return _anthropic_error(400, "invalid_request_error", "model and max_tokens are required")
    d = _directives(body)
    n = min(int(d.get("tokens", 8)), body["max_tokens"])
    cache_read = int(d.get("cacheread", 0))
    usage = {"input_tokens": _prompt_tokens(body), "output_tokens": n, "cache_read_input_tokens": cache_read,
             "cache_creation_input_tokens": 0}  # fmt: skip
    ident, text = f"msg_{uuid.uuid4().hex[:24]}", "".join(f"w{i} " for i in range(n))
    message = {"id": ident, "type": "message", "role": "assistant", "model": body["model"],
               "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
               "usage": usage}  # fmt: skip
    if not body.get("stream"):
        return web.json_response(message)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def event(name: str, data: dict) -> None:
        await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    await event("message_start", {"type": "message_start", "message": start})
    await event("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}})  # fmt: skip
    for i in range(n):
        await event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": f"w{i} "}})  # fmt: skip
    await event("content_block_stop", {"type": "content_block_stop", "index": 0})
    await event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": n}})  # fmt: skip
    await event("message_stop", {"type": "message_stop"})
    await response.write_eof()
    return response


API_KEY = web.AppKey("api_key", str)
MODELS_SERVED = web.AppKey("models_served", tuple)
PRICED = web.AppKey("priced", bool)
FLAVOR = web.AppKey("flavor", str)
BEHAVIOUR = web.AppKey("behaviour", dict)
HITS = web.AppKey("hits", collections.Counter)


def create_app(
    api_key: str = "stub-upstream-key",
    models: tuple[tuple[str, int, str, str], ...] = MODELS,
    priced: bool = True,
    flavor: str = "openai",
) -> web.Application:
    """`models`: (id, context length, USD per prompt token, USD per completion token) it serves and lists."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[replay])
    app[API_KEY] = api_key
    app[MODELS_SERVED] = models
    app[PRICED] = priced
    app[FLAVOR] = flavor
    app[BEHAVIOUR] = {}
    app[HITS] = collections.Counter()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", models_list)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--api-key", default="stub-upstream-key")
    args = parser.parse_args()
    web.run_app(create_app(args.api_key), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
