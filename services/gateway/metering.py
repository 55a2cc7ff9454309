"""What a call delivered and what its upstream reported, read from each provider's own wire format.

Shapes understood, whatever the provider: OpenAI Chat Completions and Completions (streamed chunks
and whole answers; also OpenRouter, vLLM, Ollama and other OpenAI-compatible servers), the OpenAI
Responses API (streamed ``response.*`` events and whole answers) and the Anthropic Messages API
(streamed ``message_start`` … ``message_stop`` events and whole answers).

Delivered output is counted in characters of every kind of text that reaches the client: content,
refusals, reasoning, tool-call names and arguments, Responses output events, Anthropic text,
thinking and ``tool_use`` input. The prompt is counted in UTF-8 bytes of every part of the request
a model reads: messages or input items, system, instructions, tools and functions, formats.

Which usage is believed (the rule the README documents): upstream usage is charged when it is
*believable* — whole non-negative numbers, cache parts no larger than the prompt, a prompt above 0
when the request had one, and completion tokens above 0 when any output was delivered. Otherwise
(missing, contradicting what was delivered, or cut off) the call is charged by the estimate:
``ceil(prompt bytes / 3)`` prompt tokens and ``ceil(delivered characters / 4)`` completion tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import msgspec

PROVIDER_TYPES = ("openai", "anthropic", "openrouter", "vllm", "ollama", "generic")
# The request fields a model reads as its prompt (Chat, Completions, Responses, Anthropic Messages, audio).
PROMPT_PARTS = ("system", "instructions", "messages", "input", "prompt", "tools", "functions", "tool_choice",
                "response_format", "text")  # fmt: skip
_json_encode = msgspec.json.Encoder().encode


class Tokens(NamedTuple):
    """A call's usage in one meaning for every provider.

    ``prompt``: every input token, cached or not (OpenAI's ``prompt_tokens``); ``completion``: every
    output token, reasoning included; ``cache_read`` / ``cache_write``: the parts of ``prompt`` read
    from / written to the provider's prompt cache.
    """

    prompt: int
    completion: int
    cache_read: int = 0
    cache_write: int = 0


def estimate_prompt_tokens(body: dict) -> int:
    """The prompt estimate in tokens: UTF-8 bytes of the request's prompt parts (JSON) / 3, rounded up; 0 if none."""
    parts = {name: body[name] for name in PROMPT_PARTS if body.get(name) not in (None, "", [], {})}
    return math.ceil(len(_json_encode(parts)) / 3) if parts else 0


def estimate_completion_tokens(chars: int) -> int:
    """The completion estimate in tokens: delivered characters / 4, rounded up."""
    return math.ceil(chars / 4)


def _count(value: object) -> int:
    """A non-negative whole token count; raises ValueError otherwise (None and absent count as 0)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def normalize_usage(usage: dict, provider_type: str = "generic") -> Tokens | None:
    """One ``usage`` object as `Tokens`, by the semantics of the fields it carries; None if it is not usage.

    - Chat Completions (OpenAI, OpenRouter, vLLM, Ollama): ``prompt_tokens`` includes
      ``prompt_tokens_details.cached_tokens`` (and OpenRouter's ``cache_write_tokens``); reasoning
      tokens are inside ``completion_tokens``. OpenRouter's ``usage.cost`` is the provider's price,
      never ours: ignored.
    - Responses API: ``input_tokens`` includes ``input_tokens_details.cached_tokens``.
    - Anthropic Messages (``provider_type="anthropic"``, or the Anthropic cache fields present):
      ``input_tokens`` excludes ``cache_read_input_tokens`` and ``cache_creation_input_tokens``, so
      the prompt is their sum.
    """
    if not isinstance(usage, dict):
        return None
    try:
        if "prompt_tokens" in usage or "completion_tokens" in usage:
            details = usage.get("prompt_tokens_details")
            details = details if isinstance(details, dict) else {}
            return Tokens(
                _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")),
                _count(details.get("cached_tokens")), _count(details.get("cache_write_tokens")),
            )  # fmt: skip
        if "input_tokens" in usage or "output_tokens" in usage:
            anthropic = provider_type == "anthropic" or any(k in usage for k in _ANTHROPIC_CACHE)
            if anthropic:
                read = _count(usage.get("cache_read_input_tokens"))
                write = _count(usage.get("cache_creation_input_tokens"))
                return Tokens(_count(usage.get("input_tokens")) + read + write, _count(usage.get("output_tokens")),
                              read, write)  # fmt: skip
            details = usage.get("input_tokens_details")
            details = details if isinstance(details, dict) else {}
            return Tokens(_count(usage.get("input_tokens")), _count(usage.get("output_tokens")),
                          _count(details.get("cached_tokens")))  # fmt: skip
    except ValueError:
        return None
    return None


_ANTHROPIC_CACHE = ("cache_read_input_tokens", "cache_creation_input_tokens")


def usage_from(body: dict, provider_type: str = "generic") -> Tokens | None:
    """The usage a whole answer or one streamed event reports, normalized; None when it reports none.

    Looks in ``usage`` (Chat, Completions, Embeddings, Anthropic message and ``message_delta``),
    ``response.usage`` (Responses ``response.completed``/``incomplete``/``failed`` events) and
    ``message.usage`` (Anthropic ``message_start``).
    """
    if not isinstance(body, dict):
        return None
    usage = body.get("usage")
    if not isinstance(usage, dict):
        for container in ("response", "message"):
            inner = body.get(container)
            if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
                usage = inner["usage"]
                break
    return normalize_usage(usage, provider_type) if isinstance(usage, dict) else None


def believable(tokens: Tokens | None, prompt_estimate: int, output_chars: int) -> bool:
    """Whether reported usage agrees with what was sent and delivered (the rule in the module docstring)."""
    if tokens is None:
        return False
    if tokens.cache_read + tokens.cache_write > tokens.prompt:
        return False
    if prompt_estimate > 0 and tokens.prompt == 0:
        return False
    return not (output_chars > 0 and tokens.completion == 0)


# ---- delivered output ---------------------------------------------------------------------------


def _text(value: object) -> int:
    return len(value) if isinstance(value, str) else 0


def _message_chars(message: object) -> int:
    """A Chat ``message`` or streamed ``delta``: content, refusal, reasoning, tool calls, audio transcript.

    Servers that send reasoning under both ``reasoning_content`` and ``reasoning`` are counted once.
    Walks only the keys present (a streamed delta has one or two), since this runs for every chunk.
    """
    if not isinstance(message, dict):
        return 0
    total = reasoning = 0
    for key, value in message.items():
        if value is None:
            continue
        if key == "content":
            total += (
                len(value) if isinstance(value, str) else sum(map(_part_chars, value)) if isinstance(value, list) else 0
            )
        elif key == "refusal":
            total += _text(value)
        elif key in ("reasoning_content", "reasoning"):
            reasoning = max(reasoning, _text(value))
        elif key == "tool_calls" and isinstance(value, list):
            total += sum(_function_chars(call.get("function")) for call in value if isinstance(call, dict))
        elif key == "function_call":
            total += _function_chars(value)
        elif key == "audio" and isinstance(value, dict):
            total += _text(value.get("transcript"))
    return total + reasoning


def _function_chars(function: object) -> int:
    if not isinstance(function, dict):
        return 0
    return _text(function.get("name")) + _text(function.get("arguments"))


def _part_chars(part: object) -> int:
    """One content part or output item of any API, counted by the text it carries."""
    if isinstance(part, str):
        return len(part)
    if not isinstance(part, dict):
        return 0
    kind = part.get("type")
    if kind in ("function_call", "custom_tool_call", "tool_use", "server_tool_use", "mcp_call"):
        arguments = part.get("arguments", part.get("input"))
        if not isinstance(arguments, str) and arguments is not None:
            arguments = _json_encode(arguments).decode()
        return _text(part.get("name")) + _text(arguments)
    if kind == "reasoning":
        return sum(_part_chars(p) for p in [*(part.get("summary") or ()), *(part.get("content") or ())])
    if kind == "message":
        return sum(_part_chars(p) for p in part.get("content") or ())
    return _text(part.get("text")) + _text(part.get("refusal")) + _text(part.get("thinking"))


def body_output_chars(body: dict) -> int:
    """Characters of output in a whole (non-streamed) JSON answer of any understood API."""
    choices = body.get("choices")
    if isinstance(choices, list):
        return sum(_message_chars(c.get("message")) + _text(c.get("text")) for c in choices if isinstance(c, dict))
    output = body.get("output")
    if isinstance(output, list):  # Responses API
        return sum(_part_chars(item) for item in output)
    content = body.get("content")
    if isinstance(content, list) and body.get("type") == "message":  # Anthropic Messages
        return sum(_part_chars(block) for block in content)
    return _text(body.get("text"))  # an audio transcription or translation


def _anthropic_event_chars(kind: str, event: dict) -> int:
    if kind == "content_block_delta":
        delta = event.get("delta")
        if isinstance(delta, dict):
            return _text(delta.get("text")) + _text(delta.get("partial_json")) + _text(delta.get("thinking"))
    elif kind == "content_block_start":
        block = event.get("content_block")
        if isinstance(block, dict):
            # tool_use input arrives as input_json_delta; count only the name and any text given up front
            return _text(block.get("name")) + _text(block.get("text")) + _text(block.get("thinking"))
    return 0


def _responses_event_chars(kind: str, event: dict) -> int:
    if kind.endswith(".delta") and kind != "response.audio.delta":
        return _text(event.get("delta"))  # output_text, refusal, function_call_arguments, reasoning, ...
    if kind == "response.output_item.added":
        item = event.get("item")
        if isinstance(item, dict):
            return _text(item.get("name"))
    return 0


class Meter:
    """One call's delivered output and reported usage, fed each streamed event or the whole answer.

    ``provider_type`` is one of `PROVIDER_TYPES`; it decides how ambiguous usage fields are read.
    """

    __slots__ = ("_anthropic_usage", "output_chars", "provider_type", "reported")

    def __init__(self, provider_type: str = "generic"):
        if provider_type not in PROVIDER_TYPES:
            raise ValueError(f"unknown provider type {provider_type!r}")
        self.provider_type = provider_type
        self.output_chars = 0
        self.reported: Tokens | None = None
        self._anthropic_usage: dict | None = None

    def event(self, event: dict) -> str | None:
        """Count one streamed JSON event (its ``data``); returns its role when it is a usage report.

        Roles: ``"usage"`` for an event that only reports usage (an OpenAI chunk with ``choices: []``,
        a Responses terminal event, an Anthropic ``message_delta``), else None.
        """
        choices = event.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self.output_chars += _message_chars(choice.get("delta")) + _text(choice.get("text"))
            if isinstance(event.get("usage"), dict):
                self.reported = normalize_usage(event["usage"], self.provider_type)
                return "usage" if not choices else None
            return None
        kind = event.get("type")
        if not isinstance(kind, str):
            return None
        if kind.startswith("transcript.text."):  # a streamed transcription: deltas, then usage in ".done"
            if kind == "transcript.text.delta":
                self.output_chars += _text(event.get("delta"))
            elif isinstance(event.get("usage"), dict):
                self.reported = normalize_usage(event["usage"], self.provider_type)
            return None
        if kind.startswith("response."):
            self.output_chars += _responses_event_chars(kind, event)
            response = event.get("response")
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                self.reported = normalize_usage(response["usage"], self.provider_type)
                return "usage" if kind in ("response.completed", "response.incomplete", "response.failed") else None
            return None
        self.output_chars += _anthropic_event_chars(kind, event)
        if kind == "message_start" and isinstance(event.get("message"), dict):
            return self._anthropic(event["message"].get("usage"), role=None)
        if kind == "message_delta":
            return self._anthropic(event.get("usage"), role="usage")
        return None

    def _anthropic(self, usage: object, role: str | None) -> str | None:
        """Anthropic streams report usage twice: ``message_start`` (input and cache, output so far: ~1), then
        ``message_delta`` (cumulative output, sometimes input again): the latest value of each field wins,
        and usage counts as reported only once ``message_delta`` came (a stream ending before it has none)."""
        if not isinstance(usage, dict):
            return None
        merged = {**(self._anthropic_usage or {}), **{k: v for k, v in usage.items() if v is not None}}
        self._anthropic_usage = merged
        if role == "usage":
            self.reported = normalize_usage(merged, "anthropic")
        return role

    def body(self, body: dict) -> None:
        """Count a whole (non-streamed) JSON answer and read its usage."""
        self.output_chars += body_output_chars(body)
        self.reported = usage_from(body, self.provider_type)

    def charge(self, prompt_estimate: int) -> tuple[Tokens, str]:
        """The usage to charge and its source: (reported usage, "reported") when believable, else the estimate."""
        if believable(self.reported, prompt_estimate, self.output_chars):
            return self.reported, "reported"
        return Tokens(prompt_estimate, estimate_completion_tokens(self.output_chars)), "estimated"
