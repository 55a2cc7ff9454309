"""Metering true to every upstream's wire: real transcripts replayed byte for byte, cut at awkward places.

For every transcript in devstack/corpus the client must receive the upstream's events unchanged (only
the node's cost fields are added, to the usage report), the key is charged the documented formula —
reported usage when it is believable, the estimate otherwise — and `reconcile` stays 0. Unit tests
pin the per-provider usage semantics and what counts as delivered output.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from devstack import processes
from devstack.upstream import create_app as create_upstream
from services.gateway import metering, sse
from services.gateway.metering import Meter, Tokens
from tests.conftest import node_env, serve_app, start_node
from tests.support import natsauth
from tests.support.keys import funded_key, reconcile
from tests.test_gateway import CHAT, auth, balance, settled_balance

CORPUS = Path(__file__).resolve().parent.parent / "devstack" / "corpus"
# 1 sat per call, 2 sats per 1k prompt tokens, 10 sats per 1k completion tokens: 2 and 10 msat per token.
PRICES = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "2",
          "FIXED_PER_1K_OUTPUT_TOKENS": "10"}  # fmt: skip
FUNDS = 1_000_000
CLAUDE = "claude-sonnet-4-5"


def formula(prompt: int, completion: int) -> int:
    """The charge in msat under PRICES (cache tokens without a cache price cost the prompt price)."""
    return 1000 + 2 * prompt + 10 * completion


@dataclass(frozen=True)
class Transcript:
    name: str
    path: str
    stream: bool
    reported: Tokens | None = None  # the usage to charge, when the transcript's usage is believable
    output_chars: int = 0  # else: characters of output delivered (counted by hand from the transcript)
    answered: bool = True  # False: no answer reached the client, so nothing is charged


TRANSCRIPTS = [
    # OpenAI chat, include_usage: prompt_tokens already includes the 1024 cached tokens.
    Transcript("openai_chat_stream", CHAT, True, Tokens(1200, 25, 1024)),
    # A streamed tool call and no usage: name "get_weather" (11) + 417 characters of arguments.
    Transcript("openai_chat_tool_calls", CHAT, True, output_chars=428),
    # \r\n line ends, an sse-starlette ping comment, no usage: "Grüße aus Köln — 日本語 テキスト 🚀!".
    Transcript("crlf_server", CHAT, True, output_chars=28),
    # Comment keep-alives, reasoning, usage.cost (ignored); prompt_tokens includes 100 cache writes.
    Transcript("openrouter_stream", CHAT, True, Tokens(194, 40, 0, 100)),
    # reasoning_content deltas, usage with prompt_tokens_details null.
    Transcript("vllm_stream", CHAT, True, Tokens(18, 42)),
    # No usage: "The sky is blue because of Rayleigh scattering."
    Transcript("ollama_stream", CHAT, True, output_chars=47),
    # The upstream closes inside its last event: "Last words still count".
    Transcript("unterminated_tail", CHAT, True, output_chars=22),
    # An OpenAI stream labelled text/plain.
    Transcript("plain_labelled_stream", CHAT, True, Tokens(1200, 25, 1024)),
    # Responses API: input_tokens includes cached_tokens; reasoning tokens are output tokens.
    Transcript("responses_stream_completed", "/v1/responses", True, Tokens(328, 52, 128)),
    # Responses API cut before response.completed: 68 characters of text + "lookup_order" + 51 of arguments.
    Transcript("responses_stream_cut", "/v1/responses", True, output_chars=131),
    # Anthropic: input_tokens (12) excludes cache reads (2000) and writes (500).
    Transcript("anthropic_messages_stream", "/v1/messages", True, Tokens(2512, 89, 2000, 500)),
    Transcript("anthropic_message", "/v1/messages", False, Tokens(21 + 188, 13, 0, 188)),
    Transcript("openai_chat_refusal", CHAT, False, Tokens(31, 12)),
    # Only keep-alives and [DONE]: no answer reached the client.
    Transcript("empty_stream", CHAT, True, answered=False),
    # A full answer with usage of zeros: not believable, charged by the estimate of 77 characters.
    Transcript("openai_chat_zero_usage", CHAT, False, output_chars=77),
]
CUTS = {"crlf_server": ("whole", "awkward", "bytes"), "unterminated_tail": ("whole", "awkward", "bytes")}


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory):
    harness = secrets.token_urlsafe(16)
    service = processes.start_nats(
        tmp_path_factory.mktemp("metering-nats"), processes.nats_passwords(), {natsauth.HARNESS_USER: harness}
    )
    service.url = natsauth.harness_url(service.url, harness)
    yield service
    service.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def node(module_nats, postgres, upstream, mint, tmp_path_factory):
    """One node for every transcript (each call uses a key of its own), to keep the corpus fast: the stub
    upstream as the OpenAI-compatible provider, and an Anthropic-flavoured stub as an Anthropic provider."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    database = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    anthropic_runner, anthropic_url = await serve_app(
        create_upstream("key-anthropic", ((CLAUDE, 200_000, "", ""),), flavor="anthropic")
    )
    providers = tmp_path_factory.mktemp("metering-providers") / "providers.yaml"
    providers.write_text(
        json.dumps(
            {
                "providers": [
                    {
                        "slug": "claude",
                        "provider_type": "anthropic",
                        "base_url": f"{anthropic_url}/v1",
                        "api_key": "key-anthropic",
                    }
                ]
            }
        )
    )
    env = node_env(module_nats, database, upstream, mint.url, PROVIDERS_PATH=str(providers), **PRICES)
    running = await start_node(env, ("billing", "wallet", "gateway"))
    yield running
    await running.stop()
    await anthropic_runner.cleanup()
    admin = await asyncpg.connect(postgres.url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def request_body(transcript: Transcript, cut: str) -> dict:
    directive = f"[[replay:{transcript.name}:{cut}]]"
    body: dict = {"model": "gpt-4o-mini", "max_tokens": 200,
                  "messages": [{"role": "user", "content": f"Tell me something. {directive}"}]}  # fmt: skip
    if transcript.path == "/v1/messages":
        body["model"] = CLAUDE
    if transcript.path == "/v1/responses":
        body = {"model": "gpt-4.1", "max_output_tokens": 200, "input": f"Tell me a story. {directive}"}
    if transcript.stream:
        body["stream"] = True
        if transcript.path == CHAT:
            body["stream_options"] = {"include_usage": True}
    return body


def frame(data: bytes) -> list[bytes]:
    framer = sse.EventFramer()
    events = framer.feed(data)
    tail = framer.close()
    return [*events, tail] if tail else events


def without_cost(answer: dict) -> dict:
    """`answer` less the fields the node writes: usage.cost/cost_sats/sats_cost/remaining_balance_msats (an
    upstream's own `usage.cost`, OpenRouter's, is replaced: clients read the node's), the top-level cost and
    metadata.routstr."""
    answer = copy.deepcopy(answer)
    if isinstance(answer.get("usage"), dict):
        for field in ("cost", "cost_sats", "sats_cost", "remaining_balance_msats"):
            answer["usage"].pop(field, None)
    answer.pop("cost", None)
    if isinstance(answer.get("metadata"), dict):
        answer["metadata"].pop("routstr", None)
        if not answer["metadata"]:
            del answer["metadata"]
    return answer


def costed_report(sent_raw: bytes, got_raw: bytes) -> dict:
    """The one event the node may change: same lines, its JSON plus the cost fields. Returns the cost object."""
    assert sse.replace_data(got_raw, b"") == sse.replace_data(sent_raw, b""), (sent_raw, got_raw)
    sent, got = json.loads(sse.parse(sent_raw).data), json.loads(sse.parse(got_raw).data)
    if "response" in sent:  # Responses API: the cost goes on the response object
        assert without_cost(got["response"]) == without_cost(sent["response"])
        assert {k: v for k, v in got.items() if k != "response"} == {k: v for k, v in sent.items() if k != "response"}
        return got["response"]["cost"]
    assert without_cost(got) == without_cost(sent)
    assert got["usage"]["cost"] == {k: v for k, v in got["cost"].items() if k in got["usage"]["cost"]}
    return got["cost"]


def expected_charge(transcript: Transcript, body: dict) -> int:
    if not transcript.answered:
        return 0
    if transcript.reported is not None:
        return formula(transcript.reported.prompt, transcript.reported.completion)
    return formula(metering.estimate_prompt_tokens(body), math.ceil(transcript.output_chars / 4))


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=[t.name for t in TRANSCRIPTS])
async def test_transcript_reaches_the_client_unchanged_and_is_charged_by_the_formula(node, http, transcript):
    sent_bytes = next(CORPUS.glob(f"{transcript.name}.*")).read_bytes()
    for cut in CUTS.get(transcript.name, ("whole", "awkward")):
        key = await funded_key(node.settings.nats_url, FUNDS)
        body = request_body(transcript, cut)
        async with http.post(f"{node.url}{transcript.path}", json=body, headers=auth(key)) as response:
            assert response.status == 200, await response.text()
            received = await response.read()
            content_type = response.headers["Content-Type"]
        charge = expected_charge(transcript, body)
        info = await settled_balance(http, node, key)
        assert FUNDS - info["balance"] == charge == info["total_spent"], (cut, info)

        if not transcript.stream:
            sent = json.loads(sent_bytes)
            got = json.loads(received)
            assert without_cost(got) == without_cost(sent), cut
            assert got["cost"]["total_msats"] == charge
            continue
        assert content_type.startswith("text/event-stream"), cut
        sent_events, got_events = frame(sent_bytes), frame(received)
        assert len(got_events) == len(sent_events), (cut, received)
        costs = []
        for sent_raw, got_raw in zip(sent_events, got_events, strict=True):
            if got_raw in (sent_raw, sent_raw + sse.terminator(sent_raw)):
                continue  # byte for byte (an unterminated last event gets only its blank line)
            costs.append(costed_report(sent_raw, got_raw))
        if transcript.reported is not None:
            assert [cost["total_msats"] for cost in costs] == [charge], cut
        else:
            assert costs == [], cut
    assert (await reconcile(node.settings.nats_url)).difference_msat == 0


async def test_non_json_answer_carries_change_and_cost_headers(node, http, client_wallet):
    token = await client_wallet.token(60)  # the reservation holds DEFAULT_MAX_TOKENS' worth: 42 sats
    body = {"model": "tts-1", "voice": "alloy", "input": "Read this aloud. [[replay:speech]]"}
    async with http.post(f"{node.url}/v1/audio/speech", json=body, headers={"X-Cashu": token}) as response:
        assert response.status == 200
        audio = await response.read()
        headers = response.headers
    assert headers["Content-Type"] == "audio/mpeg"
    assert audio == (CORPUS / "speech.mp3").read_bytes()
    charge = formula(metering.estimate_prompt_tokens(body), 0)  # no usage, no text delivered: the prompt
    assert headers["X-Routstr-Cost-Msats"] == str(charge)
    assert await client_wallet.receive(headers["X-Cashu"]) == (60_000 - charge) // 1000
    assert (await reconcile(node.settings.nats_url)).difference_msat == 0


@pytest.mark.parametrize(("name", "charge_of"), [
    ("transcription", lambda fields: formula(14, 45)),  # usage in tokens: believed
    ("transcription_whisper", lambda fields: formula(metering.estimate_prompt_tokens(fields), math.ceil(36 / 4))),
])  # fmt: skip
async def test_multipart_audio_transcription_is_forwarded_and_metered(node, http, name, charge_of):
    key = await funded_key(node.settings.nats_url, FUNDS)
    fields = {"model": "gpt-4o-transcribe", "prompt": f"Names: Lúmen, Köln. [[replay:{name}]]"}
    form = aiohttp.FormData()
    for field, value in fields.items():
        form.add_field(field, value)
    form.add_field("file", (CORPUS / "speech.mp3").read_bytes(), filename="speech.mp3", content_type="audio/mpeg")
    async with http.post(f"{node.url}/v1/audio/transcriptions", data=form, headers=auth(key)) as response:
        assert response.status == 200, await response.text()
        got = await response.json()
    sent = json.loads((CORPUS / f"{name}.json").read_bytes())
    assert without_cost(got) == sent
    charge = charge_of(fields)
    assert got["cost"]["total_msats"] == charge
    assert FUNDS - (await settled_balance(http, node, key))["balance"] == charge


async def test_client_leaving_before_the_first_byte_is_settled_at_once(node, http, client_wallet):
    """stream: true, the upstream answers after 3 s, the client leaves after 1 s: nothing is charged and the
    key's balance and the X-Cashu change are free at once, not after the 15-minute reservation sweep."""
    loop = asyncio.get_running_loop()
    slow = {"model": "m", "stream": True, "max_tokens": 100, "messages": [{"role": "user", "content": "[[slow:3]]"}]}

    async def leave_after_one_second(headers: dict) -> float:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1), http.post(f"{node.url}{CHAT}", json=slow, headers=headers) as response:
                await response.read()
        return loop.time()

    key = await funded_key(node.settings.nats_url, FUNDS)
    left = await leave_after_one_second(auth(key))
    while (info := await balance(http, node, key))["reserved"]:
        assert loop.time() - left < 1, "still reserved"
        await asyncio.sleep(0.05)
    assert info["balance"] == FUNDS and info["total_spent"] == 0

    token = await client_wallet.token(20)
    left = await leave_after_one_second({"X-Cashu": token})
    while True:
        async with http.post(f"{node.url}/v1/balance/refund", headers={"X-Cashu": token}) as response:
            answer = await response.json()
        if response.status != 425:
            break
        assert loop.time() - left < 1, "change not collectable yet"
        await asyncio.sleep(0.05)
    assert response.status == 200, answer
    assert await client_wallet.receive(answer["token"]) == 20, "nothing was delivered, so nothing was charged"
    assert (await reconcile(node.settings.nats_url)).difference_msat == 0


@pytest.mark.parametrize(("directive", "status"), [("[[fail:429]]", 429), ("[[fail:503]]", 503)])
async def test_upstream_rate_limit_answer_keeps_its_retry_headers(node, http, directive, status):
    key = await funded_key(node.settings.nats_url, FUNDS)
    body = {"model": "m", "messages": [{"role": "user", "content": directive}]}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == status
        assert response.headers["Retry-After"] == "7"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert response.headers["X-Routstr-Cost-Msats"] == "0"
        assert (await response.json())["error"]["code"] == "upstream_error"
    assert (await settled_balance(http, node, key))["balance"] == FUNDS


async def test_deeply_nested_json_is_a_clear_400_on_every_json_endpoint(node, http):
    key = await funded_key(node.settings.nats_url, FUNDS)
    nested = b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    headers = {**auth(key), "Content-Type": "application/json"}
    for path in (CHAT, "/v1/responses", "/v1/embeddings"):
        async with http.post(f"{node.url}{path}", data=nested, headers=headers) as response:
            assert response.status == 400, path
            assert "nested too deeply" in (await response.json())["error"]["message"]
    balance_paths = ("/v1/balance/create", "/v1/balance/topup", "/v1/balance/refund", "/v2/lightning/invoice",
                     "/v2/lightning/recover")  # fmt: skip
    for path in balance_paths:
        async with http.post(f"{node.url}{path}", data=nested, headers=headers) as response:
            assert response.status == 400, path
            assert (await response.json())["detail"] == "Request body is not valid JSON", path
    assert (await balance(http, node, key))["balance"] == FUNDS


async def test_a_stream_that_keeps_producing_outlives_upstream_timeout(make_node, http):
    node = await make_node(("billing", "wallet", "gateway"), UPSTREAM_TIMEOUT="2", **PRICES)
    key = await funded_key(node.settings.nats_url, FUNDS)
    # Answers after 1.5 s, then a chunk every 0.25 s: 3 s in all, never silent for UPSTREAM_TIMEOUT (2 s).
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "[[tokens:6]] [[slow:1.5]]"}]}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        text = await response.text()
    assert "upstream_error" not in text and text.endswith("data: [DONE]\n\n")
    assert "".join(f"w{i} " for i in range(6)) == "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in text.split("\n\n")
        if line.startswith("data: {")
    )


async def test_a_stream_silent_past_the_idle_timeout_is_ended_and_charged_for_what_arrived(make_node, http):
    node = await make_node(("billing", "wallet", "gateway"), UPSTREAM_IDLE_TIMEOUT="1", **PRICES)
    key = await funded_key(node.settings.nats_url, FUNDS)
    # The first chunk (role only, no text) after 2 s, then 2 s of silence: cut after 1 s of it.
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "[[tokens:1]] [[slow:2]]"}]}
    for include_usage in (False, True):
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
            events = [e for e in (await response.text()).split("\n\n") if e]
        assert '"role": "assistant"' in events[0]
        assert json.loads(events[-2][6:])["error"]["code"] == "upstream_error" and events[-1] == "data: [DONE]"
        usage = [c for c in (json.loads(e[6:]) for e in events if e.startswith("data: {")) if c.get("usage")]
        info = await settled_balance(http, node, key)
        charged = FUNDS - info["balance"]
        assert charged == formula(metering.estimate_prompt_tokens(body), 0) * (1 + include_usage)
        if include_usage:  # the client asked for usage: the estimate it was charged, before the error event
            assert len(usage) == 1 and json.loads(events[-3][6:]) == usage[0], "usage comes just before the error"
            report = usage[0]
            assert report["choices"] == [] and report["id"] == json.loads(events[0][6:])["id"]
            assert report["usage"]["prompt_tokens"] == metering.estimate_prompt_tokens(body)
            assert report["usage"]["cost"]["total_msats"] == charged // 2
        else:
            assert usage == []


@pytest.mark.parametrize(("name", "path"), [("anthropic_messages_stream", "/v1/messages"),
                                           ("responses_stream_completed", "/v1/responses")])  # fmt: skip
async def test_an_upstream_dying_mid_stream_is_told_in_the_apis_own_error_event(node, http, name, path):
    key = await funded_key(node.settings.nats_url, FUNDS)
    transcript = next(t for t in TRANSCRIPTS if t.name == name)
    body = request_body(transcript, "drop")
    async with http.post(f"{node.url}{path}", json=body, headers=auth(key)) as response:
        got = frame(await response.read())
    sent = frame(next(CORPUS.glob(f"{name}.*")).read_bytes())
    assert got[:-1] == sent[: len(got) - 1], "every whole event before the break, byte for byte"
    assert len(got) - 1 >= len(sent) // 3, "the events sent before the break reach the client"
    error = sse.parse(got[-1])
    assert error.event == "error" and json.loads(error.data)["type"] == "error"
    charged = FUNDS - (await settled_balance(http, node, key))["balance"]
    prompt = metering.estimate_prompt_tokens(body)
    # Charged by the estimate of what arrived, never by usage the upstream did not finish reporting.
    assert formula(prompt, 0) <= charged < formula(prompt, 60) < formula(*transcript.reported[:2])


# ---- units: the per-provider semantics and what counts as delivered -----------------------------


def test_usage_semantics_per_provider():
    openai = {"usage": {"prompt_tokens": 1200, "completion_tokens": 300,
                        "prompt_tokens_details": {"cached_tokens": 1024},
                        "completion_tokens_details": {"reasoning_tokens": 256}}}  # fmt: skip
    assert metering.usage_from(openai, "openai") == Tokens(1200, 300, 1024, 0)
    anthropic = {"usage": {"input_tokens": 12, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 500,
                           "output_tokens": 89}}  # fmt: skip
    assert metering.usage_from(anthropic, "anthropic") == Tokens(2512, 89, 2000, 500)
    assert metering.usage_from({"usage": {"input_tokens": 7, "output_tokens": 3}}, "anthropic") == Tokens(7, 3)
    openrouter = {"usage": {"prompt_tokens": 194, "completion_tokens": 2, "cost": 0.95,
                            "prompt_tokens_details": {"cached_tokens": 50, "cache_write_tokens": 100}}}  # fmt: skip
    assert metering.usage_from(openrouter, "openrouter") == Tokens(194, 2, 50, 100)
    responses = {"type": "response.completed", "response": {"usage": {
        "input_tokens": 328, "input_tokens_details": {"cached_tokens": 128}, "output_tokens": 52}}}  # fmt: skip
    assert metering.usage_from(responses, "openai") == Tokens(328, 52, 128)
    assert metering.usage_from({"usage": {"prompt_tokens": -1}}) is None
    assert metering.usage_from({"usage": {"prompt_tokens": "12"}}) is None
    assert metering.usage_from({"choices": []}) is None
    with pytest.raises(ValueError):
        Meter("carrier-pigeon")


def test_anthropic_stream_usage_merges_message_start_and_message_delta():
    meter = Meter("anthropic")
    usage = {"input_tokens": 12, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 0, "output_tokens": 1}
    start = {"type": "message_start", "message": {"usage": usage}}
    assert meter.event(start) is None
    assert meter.reported is None, "message_start's output count (1) is not the answer's"
    assert meter.event({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 89}}) == "usage"
    assert meter.reported == Tokens(2012, 89, 2000, 0)


def test_believable_usage_rule():
    assert metering.believable(Tokens(10, 5), prompt_estimate=8, output_chars=20)
    assert not metering.believable(Tokens(0, 0), prompt_estimate=8, output_chars=20), "zeros with an answer"
    assert not metering.believable(Tokens(10, 0), prompt_estimate=8, output_chars=20), "no completion, text came"
    assert metering.believable(Tokens(10, 0), prompt_estimate=8, output_chars=0), "embeddings: prompt only"
    assert not metering.believable(Tokens(0, 5), prompt_estimate=8, output_chars=20), "no prompt, one was sent"
    assert not metering.believable(Tokens(10, 5, 8, 4), prompt_estimate=8, output_chars=20), "cache above prompt"
    assert not metering.believable(None, prompt_estimate=8, output_chars=20)
    meter = Meter()
    meter.body({"choices": [{"message": {"content": "x" * 41}}], "usage": {"prompt_tokens": 0, "completion_tokens": 0}})
    assert meter.charge(prompt_estimate=9) == (Tokens(9, 11), "estimated")


def test_every_kind_of_output_is_counted():
    meter = Meter()
    meter.event({"choices": [{"delta": {"content": "abc", "refusal": "no", "reasoning_content": "hmm"}}]})
    meter.event({"choices": [{"delta": {"tool_calls": [{"function": {"name": "f", "arguments": '{"a":1}'}}]}}]})
    meter.event({"choices": [{"text": "legacy"}]})
    assert meter.output_chars == 3 + 2 + 3 + 1 + 7 + 6
    responses = Meter()
    responses.event({"type": "response.output_item.added", "item": {"type": "function_call", "name": "lookup"}})
    responses.event({"type": "response.function_call_arguments.delta", "delta": '{"id":'})
    responses.event({"type": "response.reasoning_summary_text.delta", "delta": "think"})
    responses.event({"type": "response.output_text.done", "text": "repeats the deltas: not counted"})
    assert responses.output_chars == 6 + 6 + 5
    whole = Meter()
    whole.body({"output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "abcd"}]},
        {"type": "function_call", "name": "fn", "arguments": "{}"},
        {"type": "message", "content": [{"type": "output_text", "text": "hello"},
                                        {"type": "refusal", "refusal": "no"}]},
    ]})  # fmt: skip
    assert whole.output_chars == 4 + 2 + 2 + 5 + 2
    claude = Meter("anthropic")
    claude.body({"type": "message", "content": [
        {"type": "thinking", "thinking": "xyz"}, {"type": "text", "text": "hi"},
        {"type": "tool_use", "name": "get", "input": {"q": 1}},
    ]})  # fmt: skip
    assert claude.output_chars == 3 + 2 + 3 + len('{"q":1}')


def test_prompt_estimate_counts_every_part_a_model_reads():
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    bare = metering.estimate_prompt_tokens({"model": "m", "messages": messages, "max_tokens": 9, "stream": True})
    assert bare == math.ceil(len('{"messages":[{"role":"user","content":"hi"}]}') / 3)
    with_tools = metering.estimate_prompt_tokens({"model": "m", "messages": messages, "tools": tools})
    with_system = metering.estimate_prompt_tokens({"model": "m", "messages": messages, "system": "Be brief. " * 30})
    assert with_tools > bare + 20 and with_system > bare + 90
    assert metering.estimate_prompt_tokens({"model": "m"}) == 0
