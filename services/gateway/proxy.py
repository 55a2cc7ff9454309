"""The paid, streaming reverse proxy: authenticate, reserve, forward, measure, settle, give change.

A call never costs more than what reached the client: an upstream that fails before answering, or a
client that leaves before the first byte, is free (the reservation is released at once); one that
dies mid-stream or reports no believable usage is charged by an estimate of what was delivered
(`services.gateway.metering`), and a call whose upstream reports believable usage is charged exactly
that. Upstream events are framed by `services.gateway.sse` and reach the client byte for byte; only
the event that reports usage gets the node's cost fields. Settlement goes through the usage stream,
so it happens exactly once even if this gateway dies right after.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP

import aiohttp
import msgspec
from aiohttp import web

from services.gateway import sse
from services.gateway.billing_client import BillingClient
from services.gateway.credentials import Credential, CredentialError, credential
from services.gateway.errors import from_bus, openai_error
from services.gateway.metering import Meter, Tokens, estimate_prompt_tokens
from services.gateway.payment_request import Quoter, token_face_sats
from services.gateway.routing import Router, headers_for
from shared import bus
from shared.config import Settings
from shared.messaging import BusError
from shared.metrics import GatewayMetrics, child

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
# An upstream's "slow down" answer (429/503) keeps what tells an SDK when to retry.
_RETRY_HEADERS = ("retry-after", "retry-after-ms")
_RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
# msgspec's JSON is several times faster than the standard library's, on every call's hot path.
_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode
# How often a call waiting for its upstream's answer checks that its client is still there (seconds).
CLIENT_CHECK_INTERVAL = 0.1
# The starts of a body that is an event stream (after an optional BOM and blank lines), whatever its label.
_SSE_STARTS = (b"data:", b"event:", b"id:", b"retry:", b":")


@dataclass
class Call:
    """One proxied call's state, from reservation to settlement."""

    request_id: str
    cred: Credential
    path: str
    body: dict
    reserved: bus.Reserved
    prompt_estimate: int
    form: bytes | None = None  # a multipart/form-data body, forwarded as it came
    started: float = field(default_factory=time.monotonic)
    meter: Meter = field(default_factory=Meter)  # its provider type is the answering route's (`connect`)
    charged: Tokens | None = None  # what the settlement charged, once known
    route: bus.Route | None = None  # the route that answered, once one did
    attempts: int = 1  # upstream attempts made, failovers included (the admin request log)

    def usage_event(self, status: int, failed: bool = False) -> bus.Usage:
        """The usage to settle: nothing for a failed call, else the meter's charge (reported or estimated)."""
        if failed:
            tokens, source = Tokens(0, 0), "failed"
        else:
            tokens, source = self.meter.charge(self.prompt_estimate)
        self.charged = tokens
        return bus.Usage(
            request_id=self.request_id, key_hash=self.cred.key_hash, reservation_id=self.reserved.reservation_id,
            model=self.reserved.model, prompt_tokens=tokens.prompt, completion_tokens=tokens.completion,
            cache_read_tokens=tokens.cache_read, cache_write_tokens=tokens.cache_write, source=source, status=status,
            ts=time.time(), price=self.reserved.price, latency_ms=int((time.monotonic() - self.started) * 1000),
            route_price=self.route.price if self.route and self.route.price != self.reserved.price else None,
            provider=self.route.provider if self.route else "", attempts=self.attempts,
        )  # fmt: skip


def cost_fields(call: Call, settled: bus.Settled, usd_per_msat: float | None) -> tuple[dict, dict[str, str]]:
    """The cost object clients read (body) and the X-Routstr-Cost-* headers; USD only when a rate is known."""
    cache_read, cache_write = (call.charged.cache_read, call.charged.cache_write) if call.charged else (0, 0)
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
        self.quoter: Quoter | None = None  # NUT-24 pre-check and payment requests (set by the app)
        self._waiting: dict[asyncio.Task, web.Request] = {}  # calls waiting for their upstream's answer
        self._abandoned: set[asyncio.Task] = set()  # ... whose wait was cancelled as their client left
        self._watcher: asyncio.Task | None = None

    # ---- entry points --------------------------------------------------------------------------

    async def paid(self, request: web.Request) -> web.StreamResponse:
        """A model call (`POST /v1/...` with a JSON body naming a model): reserve, forward, settle."""
        path = request.path
        raw = await request.read()
        form = raw if request.content_type == "multipart/form-data" else None  # audio transcriptions
        try:
            body = _form_fields(raw, request.headers["Content-Type"]) if form else _json_decode(raw) if raw else None
        except msgspec.DecodeError:
            return openai_error(400, "Request body is not valid JSON", "invalid_json")
        except RecursionError:
            return openai_error(400, "Request body is nested too deeply", "invalid_json")
        if not isinstance(body, dict):
            kind = "a multipart form with a model field" if form else "a JSON object"
            return openai_error(400, f"Request body must be {kind}", "invalid_body")
        model = request.headers.get("X-Routstr-Model") or body.get("model")
        if model is not None and not isinstance(model, str):
            return openai_error(400, "model must be a string, the id of a model /v1/models lists", "invalid_model")
        if not model or not model.strip():
            return openai_error(400, "you must provide a model parameter", "missing_model")
        prompt_estimate = estimate_prompt_tokens(body)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
        if path.endswith("/embeddings"):
            max_tokens = 0  # an embedding generates nothing: hold only the prompt's price
        limit = max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else None
        try:
            cred = credential(request)
        except CredentialError as exc:
            child(self.metrics.payments, "unknown", exc.code).inc()
            pay = None
            if exc.code == "missing_api_key" and self.quoter is not None:  # NUT-24: say what would pay
                cost = await self.quoter.max_cost_msat(model.strip(), prompt_estimate, limit)
                pay = await self.quoter.header(cost) if cost is not None else None
            return openai_error(exc.status, exc.message, exc.code, headers=pay)
        if cred.mode == "xcashu" and self.quoter is not None:
            refusal = await self._too_small(cred, model.strip(), prompt_estimate, limit)
            if refusal is not None:
                return refusal
        try:
            await self.billing.ensure_account(cred)
        except BusError as exc:
            child(self.metrics.payments, cred.mode, exc.error.code).inc()
            return from_bus(exc.error)

        reserve = bus.Reserve(
            key_hash=cred.key_hash, request_id=request[REQUEST_ID], model=model.strip(),
            prompt_tokens=prompt_estimate, path=path, max_tokens=limit,
        )  # fmt: skip
        try:
            reserved = await self.billing.reserve(reserve)
        except BusError as exc:
            child(self.metrics.payments, cred.mode, exc.error.code).inc()
            headers = await self.change(cred)
            if exc.error.status == 402 and "X-Cashu" not in headers and self.quoter is not None:
                cost = await self.quoter.max_cost_msat(model.strip(), prompt_estimate, limit)
                headers = await self.quoter.header(cost) if cost is not None else headers
            return from_bus(exc.error, headers=headers)
        child(self.metrics.payments, cred.mode, "ok").inc()
        request[MODEL] = reserved.model  # the forwarded id is set per route (`connect`; a form goes as sent)
        call = Call(request[REQUEST_ID], cred, path, body, reserved, prompt_estimate, form)
        return await self.forward(request, call)

    async def _too_small(
        self, cred: Credential, model: str, prompt_tokens: int, limit: int | None
    ) -> web.Response | None:
        """NUT-24: a token whose face value cannot cover the call's maximum cost is refused before it
        is redeemed (it stays the client's), with a payment request for the amount that would."""
        cost = await self.quoter.max_cost_msat(model, prompt_tokens, limit)
        face = token_face_sats(cred.token or "")
        if cost is None or face is None or face * 1000 >= cost:
            return None
        child(self.metrics.payments, cred.mode, "insufficient_balance").inc()
        message = f"Insufficient balance: {cost} msat required, the X-Cashu token holds {face * 1000} msat"
        return openai_error(402, message, "insufficient_balance", headers=await self.quoter.header(cost))

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
            async with asyncio.timeout(self.settings.upstream_first_byte_timeout), self.session.request(
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
            child(self.metrics.upstream_errors, "timeout").inc()
            return openai_error(504, "The upstream provider timed out", "upstream_timeout")
        child(self.metrics.upstream_errors, "unreachable").inc()
        return openai_error(502, "The upstream provider is unreachable", "upstream_unavailable")

    async def _open(self, request: web.Request, url: str, data: bytes, headers: dict) -> aiohttp.ClientResponse | None:
        """POST upstream and wait for its answer's headers, within UPSTREAM_FIRST_BYTE_TIMEOUT.

        Returns None when the client left while waiting (`_watch_clients` cancels the wait, and the
        upstream call is abandoned). Raises aiohttp.ClientError or TimeoutError when the upstream
        cannot be reached or is too slow.
        """
        task = asyncio.current_task()
        self._waiting[task] = request
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch_clients())
        try:
            async with asyncio.timeout(self.settings.upstream_first_byte_timeout):
                response = await self.session.post(url, data=data, headers=headers)
        except asyncio.CancelledError:
            if task in self._abandoned:
                self._abandoned.discard(task)
                if task.uncancel() == 0:
                    return None
            raise
        finally:
            self._waiting.pop(task, None)
        if task in self._abandoned:  # the cancel met the answer and was absorbed: still a client that left
            self._abandoned.discard(task)
            task.uncancel()
            response.release()
            return None
        return response

    async def _watch_clients(self) -> None:
        """Every CLIENT_CHECK_INTERVAL: cancel the upstream wait of each call whose client has gone (one
        task for all calls, rather than a watcher per call on the hot path)."""
        while True:
            await asyncio.sleep(CLIENT_CHECK_INTERVAL)
            for task, request in list(self._waiting.items()):
                if request.transport is None or request.transport.is_closing():
                    del self._waiting[task]
                    self._abandoned.add(task)
                    task.cancel()

    async def _chunks(self, upstream: aiohttp.ClientResponse, first: bytes = b""):
        """The upstream body as it arrives; TimeoutError after UPSTREAM_IDLE_TIMEOUT seconds without a byte."""
        if first:
            yield first
        idle, content = self.settings.upstream_idle_timeout, upstream.content
        while True:
            async with asyncio.timeout(idle):
                chunk = await content.readany()
            if not chunk:
                return
            yield chunk

    async def _peek(self, upstream: aiohttp.ClientResponse) -> bytes:
        """The body's first bytes, enough to tell an event stream from anything else (all of it if short)."""
        head = b""
        while len(head.lstrip(b"\xef\xbb\xbf\r\n")) < 8:
            async with asyncio.timeout(self.settings.upstream_idle_timeout):
                chunk = await upstream.content.readany()
            if not chunk:
                break
            head += chunk
        return head

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
        if upstream is None:
            # The client left before the first byte: nothing was delivered, so nothing is charged, and
            # the reservation is released now so the key's balance (or X-Cashu change) is free at once.
            await self.finish(call, 499, failed=True)
            await self.change(call.cred)
            return openai_error(499, "The client closed the request", "client_closed")
        started = call.started
        try:
            if upstream.status >= 400:
                return await self.relay_error(call, upstream)
            if upstream.content_type == "text/event-stream":
                return await self.stream(request, call, upstream, client_wants_usage)
            try:
                head = await self._peek(upstream)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return await self._refuse(call, self._upstream_failure(exc))
            if head.lstrip(b"\xef\xbb\xbf\r\n").startswith(_SSE_STARTS):
                return await self.stream(request, call, upstream, client_wants_usage, head)
            return await self.whole(call, upstream, head)
        finally:
            upstream.release()
            model = self.metrics.model_label(call.reserved.model)
            child(self.metrics.upstream_seconds, model).observe(time.monotonic() - started)

    async def connect(self, request: web.Request, call: Call) -> aiohttp.ClientResponse | web.StreamResponse | None:
        """Try the call's routes in order until one answers; the answer's status line and headers are back.

        A connect error, no first byte within UPSTREAM_FIRST_BYTE_TIMEOUT, `429` or `5xx` moves on to the
        next route and cools the provider down; the last route's 429/5xx is relayed as it is. With no route
        left the call is settled as failed (nothing charged) and refused: `503` + `Retry-After` when every
        provider is cooling down, else `502`/`504` as the last failure was. None: the client left first.
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
            data = _json_encode(call.body)
            if call.form is not None:
                headers["Content-Type"], data = request.headers["Content-Type"], call.form
            started = time.monotonic()
            try:
                response = await self._open(request, upstream.base_url + call.path.removeprefix("/v1"), data, headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.router.failed(upstream, "first_byte_timeout" if isinstance(exc, TimeoutError) else "connect_error")
                failure = exc
                if not last:
                    child(self.metrics.provider_failovers, upstream.slug).inc()
                continue
            if response is None:
                return None
            if (response.status == 429 or response.status >= 500) and not last:
                response.release()
                self.router.failed(upstream, "http_429" if response.status == 429 else "http_5xx")
                child(self.metrics.provider_failovers, upstream.slug).inc()
                continue
            if response.status == 429 or response.status >= 500:
                self.router.failed(upstream, "http_429" if response.status == 429 else "http_5xx")
            else:
                self.router.answered(upstream, time.monotonic() - started)
            call.route, call.started = route, started
            call.meter.provider_type = upstream.provider_type
            model = self.metrics.model_label(call.reserved.model)
            child(self.metrics.upstream_ttfb_seconds, model).observe(time.monotonic() - started)
            return response
        call.body["model"] = payload_model
        if failure is None and not candidates and provider_type and wait == math.inf:
            # Not a passing outage: none of the model's providers speaks the Messages API (a configuration).
            message = (f"No provider of this node serves {call.reserved.model} over Anthropic's Messages API; "
                       "use /v1/chat/completions")  # fmt: skip
            return await self._refuse(call, openai_error(400, message, "unsupported_api"))
        if failure is None:
            retry = str(max(1, math.ceil(wait))) if wait != math.inf else "5"
            child(self.metrics.upstream_errors, "no_provider").inc()
            return await self._refuse(call, openai_error(
                503, "No upstream provider can serve this model right now; retry later", "upstream_unavailable",
                headers={"Retry-After": retry}))  # fmt: skip
        return await self._refuse(call, self._upstream_failure(failure))

    async def relay_error(self, call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
        """An upstream error: relayed in the OpenAI shape, charged nothing, change returned; a 429 or 503
        keeps the upstream's Retry-After and rate-limit headers so SDKs back off."""
        child(self.metrics.upstream_errors, f"http_{upstream.status}").inc()
        try:
            data = b"".join([chunk async for chunk in self._chunks(upstream)])
        except (aiohttp.ClientError, TimeoutError):
            data = b""  # the error's body never came whole: answer with its status alone
        try:
            body = _json_decode(data)
            message = body["error"]["message"] if isinstance(body.get("error"), dict) else str(body)
        except (msgspec.DecodeError, RecursionError, AttributeError, TypeError, KeyError):
            message = f"The upstream provider answered {upstream.status}"
        status = upstream.status if upstream.status < 500 or upstream.status == 503 else 502
        if upstream.status in (401, 403):
            status, message = 502, "The upstream provider rejected the node's credentials"
        headers = {}
        if upstream.status in (429, 503):
            headers = {
                name: value for name, value in upstream.headers.items()
                if name.lower() in _RETRY_HEADERS or name.lower().startswith(_RATE_LIMIT_PREFIXES)
            }  # fmt: skip
        return await self._refuse(call, openai_error(status, message, "upstream_error", headers=headers))

    async def _refuse(self, call: Call, response: web.Response) -> web.Response:
        """A call that delivered nothing: settled as failed (nothing charged), answered with its change and
        the (zero) cost headers."""
        settled = await self.finish(call, response.status, failed=True)
        response.headers.update(await self.change(call.cred))
        if settled is not None:
            response.headers.update(cost_fields(call, settled, self.usd_per_msat())[1])
        return response

    async def whole(self, call: Call, upstream: aiohttp.ClientResponse, head: bytes) -> web.Response:
        """A whole answer: read, settle, then sent with the change and cost headers (and, for JSON, the
        cost fields in the body); any content type (audio, images, text) is relayed as it came."""
        try:
            data = b"".join([chunk async for chunk in self._chunks(upstream, head)])
        except (aiohttp.ClientError, TimeoutError) as exc:
            return await self._refuse(call, self._upstream_failure(exc))
        body = _parse(data) if upstream.content_type in ("application/json", "") or data[:1] == b"{" else None
        if body is not None:
            call.meter.body(body)
        elif upstream.content_type.startswith("text/"):  # e.g. a transcription as text, srt or vtt
            call.meter.output_chars += len(data.decode("utf-8", "replace"))
        settled = await self.finish(call, upstream.status)
        headers = await self.change(call.cred)
        if settled is not None:
            cost, cost_headers = cost_fields(call, settled, self.usd_per_msat())
            headers.update(cost_headers)
            if body is not None:
                add_cost(body, cost, settled)
        if body is None:
            headers["Content-Type"] = upstream.headers.get("Content-Type", "application/octet-stream")
            return web.Response(body=data, status=upstream.status, headers=headers)
        return web.Response(
            body=_json_encode(body), status=upstream.status, headers=headers, content_type="application/json"
        )

    async def stream(
        self,
        request: web.Request,
        call: Call,
        upstream: aiohttp.ClientResponse,
        client_wants_usage: bool,
        head: bytes = b"",
    ) -> web.StreamResponse:
        """Relay SSE events verbatim as they arrive; hold back only the usage report (and what follows
        it) to write the cost into it once the call is settled."""
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        held: list[bytes] = []  # the usage report first, then every event after it
        usage_report: dict | None = None
        first_event: dict | None = None  # the stream's first JSON event (its id, model and created)
        failed = False
        answered = False  # whether any event with a JSON payload reached the client
        try:
            await response.prepare(request)
        except ConnectionError:  # the client left as the answer began: nothing was delivered, nothing is charged
            await self.finish(call, 499, failed=True)
            await self.change(call.cred)
            return response
        self.metrics.streams_in_flight.inc()
        framer = sse.EventFramer()

        def relay(events: list[bytes]) -> bytes:
            """Meter the events one read completed; what goes to the client now, in one write."""
            nonlocal usage_report, answered, first_event
            out = []
            for raw in events:
                parsed = _event_json(raw)
                role = call.meter.event(parsed) if parsed is not None else None
                if parsed is not None and not answered:
                    answered, first_event = True, parsed
                if held or role == "usage":
                    usage_report = usage_report if held else parsed
                    held.append(raw)
                else:
                    out.append(raw)
            return b"".join(out)

        try:
            try:
                async for chunk in self._chunks(upstream, head):
                    if out := relay(framer.feed(chunk)):
                        await response.write(out)
                tail = framer.close()
                if tail:  # an event the upstream never terminated: still the client's, and counted
                    if out := relay([tail + sse.terminator(tail)]):
                        await response.write(out)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The upstream died or went silent mid-stream: relay the whole events it sent before (an event it
                # broke off is dropped), tell the client inside the stream, charge what it got.
                if out := relay(framer.feed(_received_before_failure(upstream))):
                    await response.write(out)
                child(self.metrics.upstream_errors, "midstream").inc()
                log.warning("upstream stream failed: %s", exc.__class__.__name__)
                failed = True
                call.meter.reported = None
            # A stream that carried no answer at all (empty, or only keep-alives and `[DONE]`) costs nothing.
            settled = await self.finish(call, upstream.status, failed=not answered)
            if held and usage_report is not None:
                held[0] = self._costed_report(call, held[0], usage_report, settled, client_wants_usage)
            if failed:
                if usage_report is None and client_wants_usage and settled is not None and call.charged:
                    held.append(self._estimated_report(call, first_event, settled))
                held.append(_midstream_error(call))
            await response.write_eof(b"".join(held))
        except (ConnectionError, asyncio.CancelledError) as exc:
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

    def _costed_report(
        self, call: Call, raw: bytes, report: dict, settled: bus.Settled | None, client_wants_usage: bool
    ) -> bytes:
        """The held usage report with the node's cost fields; dropped (b"") when the node asked for it
        on the client's behalf (OpenAI's `include_usage`) and the client did not."""
        if "choices" in report and not client_wants_usage:
            return b""
        if settled is None:
            return raw
        target = report["response"] if isinstance(report.get("response"), dict) else report
        add_cost(target, cost_fields(call, settled, self.usd_per_msat())[0], settled)
        return sse.replace_data(raw, _json_encode(report))

    def _estimated_report(self, call: Call, first: dict | None, settled: bus.Settled) -> bytes:
        """For a Chat Completions stream that broke off before its usage chunk, when the client asked for
        usage (`stream_options.include_usage`): OpenAI's usage chunk with what the call was charged
        (estimated) and its cost, so the client sees the charge. Other APIs: nothing (b"")."""
        if not call.path.endswith("/chat/completions"):
            return b""
        first, tokens = first or {}, call.charged
        report = {
            "id": first.get("id", f"chatcmpl-{call.request_id}"), "object": "chat.completion.chunk",
            "created": first.get("created", int(time.time())), "model": first.get("model", call.reserved.model),
            "choices": [], "usage": {"prompt_tokens": tokens.prompt, "completion_tokens": tokens.completion,
                                     "total_tokens": tokens.prompt + tokens.completion},
        }  # fmt: skip
        add_cost(report, cost_fields(call, settled, self.usd_per_msat())[0], settled)
        return b"data: " + _json_encode(report) + b"\n\n"

    # ---- settlement and change ----------------------------------------------------------------

    async def finish(self, call: Call, status: int, failed: bool = False) -> bus.Settled | None:
        """Settle the call (exactly once, by request id): nothing if `failed`, else what the meter charges
        (reported usage when believable, else the estimate); returns the settlement, if known."""
        usage = call.usage_event(status, failed)
        try:
            settled = await self.billing.settle(usage)
        except Exception:
            # Even the stream publish failed (NATS down): the sweeper releases the reservation.
            log.exception("could not record usage for %s", call.request_id)
            return None
        child(self.metrics.usage_published, usage.source).inc()  # settled at once, or safe in the stream
        return settled

    async def _close_out(self, call: Call, settle: bool) -> None:
        """After a stream, off the request: settle what an abandoned stream delivered (a no-op if it was
        settled already), then cut an X-Cashu payment's change so `/v1/balance/refund` can hand it out."""
        if settle:
            await self.finish(call, 499)
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
        if self._watcher is not None:
            self._watcher.cancel()
        if self.background:
            await asyncio.wait(self.background, timeout=10)


_MIDSTREAM = "The upstream provider failed mid-stream"


def _midstream_error(call: Call) -> bytes:
    """The event that tells a client its stream broke off, in its API's own error-event shape."""
    if call.meter.provider_type == "anthropic":
        error = {"type": "error", "error": {"type": "api_error", "message": _MIDSTREAM}}
        return b"event: error\ndata: " + _json_encode(error) + b"\n\n"
    if call.path.endswith("/responses"):
        error = {"type": "error", "code": "upstream_error", "message": _MIDSTREAM, "param": None}
        return b"event: error\ndata: " + _json_encode(error) + b"\n\n"
    error = {"error": {"message": _MIDSTREAM, "type": "server_error", "code": "upstream_error"}}
    done = b"data: [DONE]\n\n" if call.path.endswith("completions") else b""
    return b"data: " + _json_encode(error) + b"\n\n" + done


def _received_before_failure(upstream: aiohttp.ClientResponse) -> bytes:
    """Body bytes that arrived ahead of a connection failure: aiohttp raises the failure before handing them
    over, and offers no public way to take them (`_read_nowait` of the pinned aiohttp)."""
    try:
        return upstream.content._read_nowait(-1)
    except Exception:
        return b""


def _form_fields(raw: bytes, content_type: str) -> dict | None:
    """The text fields of a multipart/form-data body (files left out), or None when it is not a valid form."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    if not message.is_multipart():
        return None
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name and part.get_filename() is None:
            fields[name] = part.get_content() if part.get_content_maintype() == "text" else None
    return fields


def _parse(data: bytes) -> dict | None:
    """A JSON object, or None for anything else (not JSON, not an object, nested too deeply)."""
    try:
        value = _json_decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _event_json(raw: bytes) -> dict | None:
    """The JSON object an SSE event's data carries, or None (comments, `[DONE]`, other text)."""
    data = sse.parse(raw).data
    return _parse(data) if data and data.lstrip()[:1] == b"{" else None
