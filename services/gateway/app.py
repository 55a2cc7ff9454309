"""The gateway's app factory: routes, middlewares (request id, CORS, errors, metrics) and resources."""

from __future__ import annotations

import logging
import secrets
import time

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.gateway import admin, balance, catalog, lightning, openapi
from services.gateway.billing_client import BillingClient
from services.gateway.errors import detail_error, openai_error
from services.gateway.payment_request import NODE_KEY, NodeKey, Quoter
from services.gateway.proxy import MODEL, REQUEST_ID, Proxy
from services.gateway.ratelimit import TRUSTED_PROXIES, RateLimiter, client_address, credential, networks
from services.gateway.routing import Router
from shared import bus, messaging
from shared.config import Settings
from shared.metrics import GatewayMetrics, child
from shared.service import CHECKS, NC, SETTINGS, answered_check, nats_check, ops_app, retry_start, serve_metrics

log = logging.getLogger(__name__)

PROXY = web.AppKey("proxy", Proxy)
LIMITER = web.AppKey("limiter", RateLimiter)
KEY_LIMITER = web.AppKey("key_limiter", RateLimiter)
UNLIMITED = ("/healthz", "/readyz")
METRICS = web.AppKey("gateway_metrics", GatewayMetrics)

PAID_PATHS = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/images/generations", "/v1/moderations",
)  # fmt: skip
ALLOW_HEADERS = "Authorization, X-Cashu, Content-Type, X-Routstr-Model, Accept, OpenAI-Beta"
EXPOSE_HEADERS = (
    "X-Cashu, X-Cashu-Refund, X-Routstr-Request-Id, X-Routstr-Cost-Msats, X-Routstr-Input-Cost-Msats, "
    "X-Routstr-Output-Cost-Msats, X-Routstr-Cost-Usd, Retry-After, X-Routstr-Change"
)


def _cors_headers(settings: Settings, request: web.Request) -> dict[str, str]:
    origin = request.headers.get("Origin")
    allowed = settings.cors_origins
    if "*" in allowed:
        value = "*"
    elif origin in allowed:
        value = origin
    else:
        return {}
    headers = {"Access-Control-Allow-Origin": value, "Access-Control-Expose-Headers": EXPOSE_HEADERS}
    if value != "*":
        headers["Vary"] = "Origin"
    return headers


def _is_balance(path: str) -> bool:
    return path.startswith(("/v1/balance", "/v1/wallet", "/lightning", "/v2/lightning", "/admin"))


@web.middleware
async def edge(request: web.Request, handler) -> web.StreamResponse:
    """Request id, CORS, metrics, and the guarantee that a client never sees a traceback."""
    request_id = secrets.token_hex(16)  # 128 random bits, as a uuid4 has (122), without building a UUID
    request[REQUEST_ID] = request_id
    started = time.monotonic()
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", ALLOW_HEADERS),
            "Access-Control-Max-Age": "600",
        })  # fmt: skip
    elif request.path not in UNLIMITED and (limited := _rate_limited(request)):
        wait, who = limited
        message = f"Rate limited: too many requests from this {who}; retry in {wait} s"
        error = detail_error if _is_balance(request.path) else openai_error
        response = error(429, message, "rate_limited", headers={"Retry-After": str(wait)})
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _http_error(request, exc)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            response = openai_error(500, f"Internal error (request {request_id})", "internal_error")
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    metrics = request.app[METRICS]
    child(metrics.requests, route, metrics.model_label(request.get(MODEL, "")), str(response.status)).inc()
    child(metrics.request_seconds, route).observe(time.monotonic() - started)
    return response


def _rate_limited(request: web.Request) -> tuple[int, str] | None:
    """(seconds to wait, "address" or "key") when the client's address or its credential is over its limit."""
    app = request.app
    if LIMITER in app and (wait := app[LIMITER].retry_after(client_address(request, app[TRUSTED_PROXIES]))):
        return wait, "address"
    if KEY_LIMITER in app and (key := credential(request)) and (wait := app[KEY_LIMITER].retry_after(key)):
        return wait, "key"
    return None


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    """Request id and CORS on every response, streamed ones included, just before headers leave."""
    if REQUEST_ID in request:
        response.headers["X-Routstr-Request-Id"] = request[REQUEST_ID]
    response.headers.update(_cors_headers(request.app[SETTINGS], request))


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (404, 405, 413, bad JSON raised by handlers) in the shape the path's clients parse."""
    if exc.content_type == "application/json" and exc.text:
        return web.Response(status=exc.status, text=exc.text, content_type="application/json")
    messages = {
        404: f"Unknown path {request.path}",
        405: f"Method {request.method} is not allowed on {request.path}",
        413: f"Request body is larger than {request.app[SETTINGS].max_body_bytes} bytes",
    }
    message = messages.get(exc.status, exc.reason)
    if _is_balance(request.path):
        return detail_error(exc.status, message)
    return openai_error(
        exc.status, message, {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status)
    )


async def _resources(app: web.Application) -> None:
    """NATS, the usage stream and one pooled HTTP client for every upstream call; drained on shutdown."""
    settings = app[SETTINGS]
    nc = await retry_start("NATS_URL", lambda: messaging.connect_service(settings, "gateway"))
    await messaging.ensure_usage_stream(nc, settings.usage_stream_replicas)
    app[NC] = nc
    app[CHECKS]["nats"] = nats_check(nc)
    app[CHECKS]["billing"] = answered_check(nc, bus.BILLING_KEY_INFO)  # no traffic before billing answers
    # No cap on a whole call: a stream that keeps producing is never cut. The proxy bounds the wait for
    # the answer (UPSTREAM_FIRST_BYTE_TIMEOUT) and each gap between reads (UPSTREAM_IDLE_TIMEOUT).
    timeout = aiohttp.ClientTimeout(total=None, connect=settings.upstream_connect_timeout)
    session = aiohttp.ClientSession(
        timeout=timeout,
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300),
        auto_decompress=True,
    )
    billing = BillingClient(
        nc, nc.jetstream(), app[METRICS], hold_ttl=float(settings.upstream_timeout + 60),
        gone_after=settings.gateway_gone_after,
    )  # fmt: skip
    await billing.start()
    router = Router(nc, app[METRICS], settings.upstream_cooldown)

    async def providers_changed(msg) -> None:
        router.stale()

    await nc.subscribe(bus.EVENT_CATALOG_CHANGED, cb=providers_changed)
    proxy = Proxy(settings, session, billing, app[METRICS], lambda: catalog.usd_per_msat(app), router)
    app[NODE_KEY] = NodeKey(lambda: app[NC])
    proxy.quoter = Quoter(settings, lambda: _catalog_only(app), app[NODE_KEY].get)
    app[PROXY] = proxy
    app[balance.BALANCE] = balance.BalanceAPI(billing)
    app[lightning.LIGHTNING] = lightning.LightningAPI(nc)
    yield
    await proxy.drain()
    await billing.close()
    await session.close()
    await nc.drain()


async def _paid(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].paid(request)


async def _other_v1(request: web.Request) -> web.StreamResponse:
    """Other `/v1/*` paths: model calls are paid like the named ones; reads pass through."""
    proxy = request.app[PROXY]
    if request.method == "POST":
        return await proxy.paid(request)
    if request.method == "GET" and (request.path in PAID_PATHS or _is_balance(request.path)):
        # The node's own path, not the upstream's: 405 for one of its POST routes, else 404 (as JSON, by `edge`).
        methods = {route.method for resource in request.app.router.resources()
                   if resource.canonical == request.path for route in resource}  # fmt: skip
        if methods or request.path in PAID_PATHS:
            raise web.HTTPMethodNotAllowed(request.method, sorted(methods - {"*"}) or ["POST"])
        raise web.HTTPNotFound()
    if request.method == "GET":
        return await proxy.passthrough(request)
    raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])


async def create_app(settings: Settings) -> web.Application:
    registry = CollectorRegistry()
    app = ops_app(settings, registry, metrics_route=False)  # /metrics on METRICS_PORT, not the public port
    app[METRICS] = GatewayMetrics(registry)
    app[METRICS].model_label = lambda model: catalog.metric_model(app, model)
    app.cleanup_ctx.append(lambda app: serve_metrics(app, settings.host, settings.metrics_port))
    app[TRUSTED_PROXIES] = networks(settings.trusted_proxies)
    if settings.rate_limit_per_minute:
        app[LIMITER] = RateLimiter(settings.rate_limit_per_minute)
    if settings.rate_limit_per_key_per_minute:
        app[KEY_LIMITER] = RateLimiter(settings.rate_limit_per_key_per_minute)
    app.middlewares.append(edge)
    app.on_response_prepare.append(_stamp)
    catalog.setup(app)
    balance.add_routes(app)
    lightning.add_routes(app)
    admin.add_routes(app)
    openapi.add_routes(app)
    for path in PAID_PATHS:
        app.router.add_post(path, _paid)
    app.router.add_route("*", "/v1/{tail:.*}", _other_v1)
    app.cleanup_ctx.append(_resources)
    return app


async def _catalog_only(app: web.Application):
    return (await catalog.current_catalog(app))[0]
