"""The paid, streaming reverse proxy: authenticate, reserve, forward, measure, settle, give change.

A call never costs more than what reached the client: an upstream that fails before answering is
free (the reservation is released), one that dies mid-stream or never reports usage is charged by
an estimate of what was delivered (prompt estimate + streamed characters / 4), and a call whose
upstream reports usage is charged exactly that. Settlement goes through the usage stream, so it
happens exactly once even if this gateway dies right after.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec
from aiohttp import web

from services.gateway.billing_client import BillingClient, usage_from
from services.gateway.credentials import Credential, CredentialError, credential
from services.gateway.errors import from_bus, openai_error
from services.gateway.routing import Router, headers_for
from shared import bus
from shared.config import Settings
from shared.messaging import BusError
from shared.metrics import GatewayMetrics

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
MODEL = web.RequestKey("model", str)
# Hop-by-hop headers and the client's credentials never go upstream.
_DROP_REQUEST = {
    "host", "content-length", "authorization", "x-cashu", "cookie", "connection", "keep-alive",
    "transfer-encoding", "te", "upgrade", "proxy-authorization", "accept-encoding", "x-routstr-model",
    "x-api-key",
}  # fmt: skip
# Change that could not be cut with this response (billing, wallet or mint hiccup): it is completed by
# billing's refund loop or stays on the payment's balance; either way POST /v1/balance/refund with the
# same X-Cashu header collects it (425/503 + Retry-After until ready) and GET shows its state.
CHANGE_PENDING = {"X-Routstr-Change": "pending"}
_KEEP_RESPONSE = {"content-type", "openai-processing-ms", "openai-version", "x-request-id"}
# msgspec's JSON is several times faster than the standard library's, on every call's hot path.
_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


def estimate_tokens(text_chars: int) -> int:
    """The documented estimate when upstream reports no usage: one token per 4 characters, rounded up."""
    return math.ceil(text_chars / 4)


@dataclass
class Call:
    """One proxied call's state, from reservation to settlement."""

    request_id: str
    cred: Credential
    path: str
    body: dict
    reserved: bus.Reserved
    prompt_estimate: int
    started: float = field(default_factory=time.monotonic)
    streamed_chars: int = 0
    usage: tuple[int, int, int, int] | None = None
    route: bus.Route | None = None  # the route that answered, once one did
    provider_type: str = ""  # the answering provider's type: how its usage is read
    attempts: int = 1  # upstream attempts made, failovers included (the admin request log)

    def usage_event(self, source: str, status: int) -> bus.Usage:
        if source == "reported" and self.usage:
            prompt, completion, cache_read, cache_write = self.usage
        elif source == "failed":
            prompt = completion = cache_read = cache_write = 0
        else:
            prompt, completion = self.prompt_estimate, estimate_tokens(self.streamed_chars)
            cache_read = cache_write = 0
        return bus.Usage(
            request_id=self.request_id, key_hash=self.cred.key_hash, reservation_id=self.reserved.reservation_id,
            model=self.reserved.model, prompt_tokens=prompt, completion_tokens=completion,
            cache_read_tokens=cache_read, cache_write_tokens=cache_write, source=source, status=status,
            ts=time.time(), price=self.reserved.price, latency_ms=int((time.monotonic() - self.started) * 1000),
            route_price=self.route.price if self.route and self.route.price != self.reserved.price else None,
            provider=self.route.provider if self.route else "", attempts=self.attempts,
        )  # fmt: skip


def cost_fields(call: Call, settled: bus.Settled, usd_per_msat: float | None) -> tuple[dict, dict[str, str]]:
    """The cost object clients read (body) and the X-Routstr-Cost-* headers; USD only when a rate is known."""
    cache_read, cache_write = (call.usage[2], call.usage[3]) if call.usage else (0, 0)
    cost = {
        "base_msats": settled.base_msat,
        "input_msats": settled.input_msat,
        "output_msats": settled.output_msat,
        "total_msats": settled.cost_msat,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_write,
        "cache_read_msats": 0,
        "cache_creation_msats": 0,
    }
    headers = {
        "X-Routstr-Cost-Msats": str(settled.cost_msat),
        "X-Routstr-Input-Cost-Msats": str(settled.input_msat),
        "X-Routstr-Output-Cost-Msats": str(settled.output_msat),
    }
    if usd_per_msat is not None:
        cost["total_usd"] = round(settled.cost_msat * usd_per_msat, 8)
        headers["X-Routstr-Cost-Usd"] = f"{cost['total_usd']:.8f}"
    return cost, headers


def add_cost(body: dict, cost: dict, settled: bus.Settled) -> None:
    """Write the cost in every spelling clients read: usage.cost, usage.cost_sats/sats_cost, top-level cost."""
    sats = settled.cost_msat / 1000
    usage = body.get("usage")
    if isinstance(usage, dict):
        usage["cost"] = cost
        usage["cost_sats"] = sats
        usage["sats_cost"] = sats
        usage["remaining_balance_msats"] = settled.balance_msat
    body["cost"] = {**cost, "sats_cost": sats, "remaining_balance_msats": settled.balance_msat}
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    metadata["routstr"] = {"cost": cost, "sats_cost": sats, "remaining_balance_msats": settled.balance_msat}
    body["metadata"] = metadata


class Proxy:
    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        billing: BillingClient,
        metrics: GatewayMetrics,
        usd_per_msat: Callable[[], float | None],
        router: Router,
    ):
        self.settings = settings
        self.session = session
        self.billing = billing
        self.metrics = metrics
        self.usd_per_msat = usd_per_msat
        self.router = router
        self.background: set[asyncio.Task] = set()

    # ---- entry points --------------------------------------------------------------------------

    async def paid(self, request: web.Request) -> web.StreamResponse:
        """A model call (`POST /v1/...` with a JSON body naming a model): reserve, forward, settle."""
        path = request.path
        raw = await request.read()
        try:
            body = _json_decode(raw) if raw else None
        except msgspec.DecodeError:
            return openai_error(400, "Request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return openai_error(400, "Request body must be a JSON object", "invalid_body")
        model = request.headers.get("X-Routstr-Model") or body.get("model")
        if not isinstance(model, str) or not model.strip():
            return openai_error(400, "you must provide a model parameter", "missing_model")
        try:
            cred = credential(request)
        except CredentialError as exc:
            self.metrics.payments.labels("unknown", exc.code).inc()
            return openai_error(exc.status, exc.message, exc.code)
        try:
            await self.billing.ensure_account(cred)
        except BusError as exc:
            self.metrics.payments.labels(cred.mode, exc.error.code).inc()
            return from_bus(exc.error)

        prompt = body.get("messages", body.get("input", body.get("prompt", "")))
        prompt_estimate = max(1, len(_json_encode(prompt)) // 3)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
        if path.endswith("/embeddings"):
            max_tokens = 0  # an embedding generates nothing: hold only the prompt's price
        reserve = bus.Reserve(
            key_hash=cred.key_hash, request_id=request[REQUEST_ID], model=model.strip(),
            prompt_tokens=prompt_estimate, path=path,
            max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else None,
        )  # fmt: skip
        try:
            reserved = await self.billing.reserve(reserve)
        except BusError as exc:
            self.metrics.payments.labels(cred.mode, exc.error.code).inc()
            return from_bus(exc.error, headers=await self.change(cred))
        self.metrics.payments.labels(cred.mode, "ok").inc()
        request[MODEL] = reserved.model  # the forwarded id is set per route (`connect`)
        call = Call(request[REQUEST_ID], cred, path, body, reserved, prompt_estimate)
        return await self.forward(request, call)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Any other `/v1/*` read: forwarded for a known key, free (it runs no model)."""
        try:
            cred = credential(request, allow_xcashu=False)
            await self.billing.ensure_account(cred)
            await self.billing.key_info(cred.key_hash)
        except CredentialError as exc:
            return openai_error(exc.status, exc.message, exc.code)
        except BusError as exc:
            return from_bus(exc.error)
        try:
            table = await self.router.table()
        except BusError as exc:
            return from_bus(exc.error)
        if not table:
            return openai_error(503, "No upstream provider is configured", "upstream_unavailable",
                                headers={"Retry-After": "5"})  # fmt: skip
        first = min(table.values(), key=lambda u: (u.priority, u.slug))
        try:
            async with self.session.request(
                request.method, first.base_url + request.path.removeprefix("/v1"), params=request.query,
                headers={**self._forward_headers(request), **headers_for(first, request.path)},
            ) as upstream:  # fmt: skip
                data = await upstream.read()
                headers = {k: v for k, v in upstream.headers.items() if k.lower() in _KEEP_RESPONSE}
                return web.Response(status=upstream.status, body=data, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._upstream_failure(exc)

    # ---- forwarding --------------------------------------------------------------------------

    def _forward_headers(self, request: web.Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}

    def _upstream_failure(self, exc: BaseException) -> web.Response:
        if isinstance(exc, TimeoutError):
            self.metrics.upstream_errors.labels("timeout").inc()
            return openai_error(504, "The upstream provider timed out", "upstream_timeout")
        self.metrics.upstream_errors.labels("unreachable").inc()
        return openai_error(502, "The upstream provider is unreachable", "upstream_unavailable")

    async def forward(self, request: web.Request, call: Call) -> web.StreamResponse:
        streaming = bool(call.body.get("stream"))
        options = call.body.get("stream_options")
        client_wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        if streaming and call.path.endswith("completions"):
            # Ask for usage so the call is charged exactly; the usage event reaches the client only if it asked.
            call.body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        upstream = await self.connect(request, call)
        if isinstance(upstream, web.StreamResponse):
            return upstream  # no provider answered: refused, nothing charged
        started = call.started
        try:
            if upstream.status >= 400:
                return await self.relay_error(call, upstream)
            if streaming and upstream.content_type == "text/event-stream":
                return await self.stream(request, call, upstream, client_wants_usage)
            return await self.whole(call, upstream)
        finally:
            upstream.release()
            self.metrics.upstream_seconds.labels(call.reserved.model).observe(time.monotonic() - started)

    async def connect(self, request: web.Request, call: Call) -> aiohttp.ClientResponse | web.StreamResponse:
        """Try the call's routes in order until one answers; the answer's status line and headers are back.

        A connect error, no first byte within UPSTREAM_FIRST_BYTE_TIMEOUT, `429` or `5xx` moves on to the
        next route and cools the provider down; the last route's 429/5xx is relayed as it is. With no route
        left the call is settled as failed (nothing charged) and refused: `503` + `Retry-After` when every
        provider is cooling down, else `502`/`504` as the last failure was.
        """
        provider_type = "anthropic" if call.path == "/v1/messages" else None
        try:
            candidates, wait = await self.router.candidates(call.reserved.routes, provider_type)
        except BusError:  # billing never told this gateway its providers (it answered the reservation, though)
            candidates, wait = [], 5.0
        keep_model = "X-Routstr-Model" in request.headers
        payload_model = call.body.get("model")
        failure: BaseException | None = None
        for i, (upstream, route) in enumerate(candidates):
            last = i == len(candidates) - 1
            call.attempts = i + 1
            if not keep_model:
                call.body["model"] = route.upstream_id
            headers = {**self._forward_headers(request), "Content-Type": "application/json"}
            headers.update(headers_for(upstream, call.path))  # its own auth; clients' credentials never go on
            started = time.monotonic()
            try:
                response = await asyncio.wait_for(
                    self.session.post(upstream.base_url + call.path.removeprefix("/v1"), data=_json_encode(call.body),
                                      headers=headers),
                    self.settings.upstream_first_byte_timeout,
                )  # fmt: skip
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.router.failed(upstream, "first_byte_timeout" if isinstance(exc, TimeoutError) else "connect_error")
                failure = exc
                if not last:
                    self.metrics.provider_failovers.labels(upstream.slug).inc()
                continue
            if (response.status == 429 or response.status >= 500) and not last:
                response.release()
                self.router.failed(upstream, "http_429" if response.status == 429 else "http_5xx")
                self.metrics.provider_failovers.labels(upstream.slug).inc()
                continue
            if response.status == 429 or response.status >= 500:
                self.router.failed(upstream, "http_429" if response.status == 429 else "http_5xx")
            else:
                self.router.answered(upstream, time.monotonic() - started)
            call.route, call.started, call.provider_type = route, started, upstream.provider_type
            self.metrics.upstream_ttfb_seconds.labels(call.reserved.model).observe(time.monotonic() - started)
            return response
        call.body["model"] = payload_model
        await self.finish(call, "failed", 502)
        change = await self.change(call.cred)
        if failure is None:
            retry = str(max(1, math.ceil(wait))) if wait != math.inf else "5"
            self.metrics.upstream_errors.labels("no_provider").inc()
            return openai_error(503, "No upstream provider can serve this model right now; retry later",
                                "upstream_unavailable", headers={**change, "Retry-After": retry})  # fmt: skip
        refused = self._upstream_failure(failure)
        refused.headers.update(change)
        return refused

    async def relay_error(self, call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
        """An upstream error: relayed in the OpenAI shape, charged nothing, change returned."""
        self.metrics.upstream_errors.labels(f"http_{upstream.status}").inc()
        data = await upstream.read()
        await self.finish(call, "failed", upstream.status)
        try:
            body = _json_decode(data)
            message = body["error"]["message"] if isinstance(body.get("error"), dict) else str(body)
        except (msgspec.DecodeError, AttributeError, TypeError, KeyError):
            message = f"The upstream provider answered {upstream.status}"
        status = upstream.status if upstream.status < 500 else 502
        if upstream.status in (401, 403):
            status, message = 502, "The upstream provider rejected the node's credentials"
        return openai_error(status, message, "upstream_error", headers=await self.change(call.cred))

    async def whole(self, call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
        data = await upstream.read()
        try:
            body = _json_decode(data)
        except msgspec.DecodeError:
            await self.finish(call, "estimated", upstream.status)
            return web.Response(status=upstream.status, body=data, content_type=upstream.content_type)
        call.usage = metered_usage(body, call.provider_type)
        if call.usage is None:
            call.streamed_chars = len(data)
        settled = await self.finish(call, "reported" if call.usage else "estimated", upstream.status)
        headers = await self.change(call.cred)
        if settled is not None and isinstance(body, dict):
            cost, cost_headers = cost_fields(call, settled, self.usd_per_msat())
            add_cost(body, cost, settled)
            headers.update(cost_headers)
        return web.Response(
            body=_json_encode(body), status=upstream.status, headers=headers, content_type="application/json"
        )

    async def stream(
        self, request: web.Request, call: Call, upstream: aiohttp.ClientResponse, client_wants_usage: bool
    ) -> web.StreamResponse:
        """Pass SSE events through as they arrive; hold back only the usage event to add the cost to it."""
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        await response.prepare(request)
        self.metrics.streams_in_flight.inc()
        buffer = b""
        usage_event: dict | None = None
        done = False
        source = "estimated"
        try:
            try:
                async for chunk in upstream.content.iter_any():
                    buffer += chunk
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        data = _sse_data(event)
                        if data == b"[DONE]":
                            done = True
                            continue
                        parsed = _parse(data) if data else None
                        if parsed is not None and parsed.get("type") in ("message_start", "message_delta"):
                            call.usage = anthropic_stream_usage(parsed, call.usage)  # Anthropic's Messages API
                        elif parsed is not None and parsed.get("type") == "response.completed":
                            call.usage = usage_from(parsed.get("response") or {})  # the Responses API
                        elif parsed is not None and parsed.get("usage"):
                            call.usage = usage_from(parsed)
                            if not parsed.get("choices"):
                                usage_event = parsed
                                continue
                        if parsed is not None:
                            call.streamed_chars += _content_chars(parsed)
                        await response.write(event + b"\n\n")
                source = "reported" if call.usage else "estimated"
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The upstream died mid-stream: tell the client inside the stream, charge what it got.
                self.metrics.upstream_errors.labels("midstream").inc()
                log.warning("upstream stream failed: %s", exc.__class__.__name__)
                error = {"error": {"message": "The upstream provider failed mid-stream", "type": "server_error",
                                   "code": "upstream_error"}}  # fmt: skip
                await response.write(b"data: " + _json_encode(error) + b"\n\n")
                call.usage, done = None, True
            settled = await self.finish(call, source, upstream.status)
            if client_wants_usage and usage_event is not None:
                if settled is not None:
                    add_cost(usage_event, cost_fields(call, settled, self.usd_per_msat())[0], settled)
                await response.write(b"data: " + _json_encode(usage_event) + b"\n\n")
            if done:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            # The client went away: stop reading upstream (the finally releases it), settle what it got.
            self._spawn(self._close_out(call, settle=True))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return response
        finally:
            self.metrics.streams_in_flight.dec()
        if call.cred.mode == "xcashu":
            self._spawn(self._close_out(call, settle=False))
        return response

    # ---- settlement and change ----------------------------------------------------------------

    async def finish(self, call: Call, source: str, status: int) -> bus.Settled | None:
        """Settle the call's usage (exactly once, by request id) and return the settlement, if known."""
        usage = call.usage_event(source, status)
        try:
            settled = await self.billing.settle(usage)
        except Exception:
            # Even the stream publish failed (NATS down): the sweeper releases the reservation.
            log.exception("could not record usage for %s", call.request_id)
            return None
        self.metrics.usage_published.labels(source).inc()  # settled at once, or safe in the stream
        return settled

    async def _close_out(self, call: Call, settle: bool) -> None:
        """After a stream, off the request: settle what an abandoned stream delivered (a no-op if it was
        settled already), then cut an X-Cashu payment's change so `/v1/balance/refund` can hand it out."""
        if settle:
            await self.finish(call, "estimated", 499)
        await self.change(call.cred)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def change(self, cred: Credential) -> dict[str, str]:
        """For X-Cashu payments: the unspent remainder as a token in the `X-Cashu` response header."""
        if cred.mode != "xcashu":
            return {}
        try:
            refunded = await self.billing.refund(cred.key_hash)
        except BusError as exc:
            if exc.error.code in ("no_balance", "balance_too_small", "unknown_key"):
                return {}
            log.warning("change for an X-Cashu call not issued yet: %s", exc.error.code)
            return CHANGE_PENDING
        return {"X-Cashu": refunded.token} if refunded.token else {}

    async def drain(self) -> None:
        """On shutdown: let settlements and change that are under way finish."""
        if self.background:
            await asyncio.wait(self.background, timeout=10)


def metered_usage(body: dict, provider_type: str) -> tuple[int, int, int, int] | None:
    """(prompt, completion, cache_read, cache_write) tokens by the provider's semantics: Anthropic's
    `input_tokens` excludes cache reads, so they are added back (pricing.cost charges prompt - cache_read
    at the prompt price); every other type reports OpenAI's `usage`."""
    usage = usage_from(body)
    if provider_type == "anthropic" and usage is not None and isinstance(body.get("usage"), dict):
        prompt, completion, cache_read, cache_write = usage
        return prompt + cache_read, completion, cache_read, cache_write
    return usage


def anthropic_stream_usage(event: dict, usage: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
    """Anthropic's streamed usage: `message_start` carries the input counts, `message_delta` the output so far."""
    if event.get("type") == "message_start":
        message = event.get("message")
        return metered_usage(message, "anthropic") if isinstance(message, dict) else usage
    reported = event.get("usage")
    if not isinstance(reported, dict):
        return usage
    prompt, _, cache_read, cache_write = usage or (0, 0, 0, 0)
    try:
        return prompt, int(reported.get("output_tokens") or 0), cache_read, cache_write
    except (TypeError, ValueError):
        return usage


def _sse_data(event: bytes) -> bytes | None:
    """The payload of an SSE event's `data:` lines (joined), or None for comments/other fields."""
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _parse(data: bytes) -> dict | None:
    try:
        value = _json_decode(data)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def _content_chars(chunk: dict) -> int:
    total = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            value = delta.get(key)
            if isinstance(value, str):
                total += len(value)
        text = choice.get("text")
        if isinstance(text, str):
            total += len(text)
    return total
