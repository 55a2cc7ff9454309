"""The admin API and dashboard on routstr-core's paths (`/admin/api/*`, `/admin/withdraw`, `/admin/`).

The gateway keeps no admin state: each API call goes to billing as a `bus.AdminCall` naming the
operation, with the sha256 of the bearer token, and billing (which keeps passwords and tokens in
Postgres) answers with the status and body. The dashboard is static files served from this package
with a Content-Security-Policy allowing nothing from elsewhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web

from services.gateway.balance import json_body
from services.gateway.errors import detail_error
from services.gateway.ratelimit import TRUSTED_PROXIES, client_address
from shared import bus
from shared.messaging import BusError
from shared.messaging import request as ask
from shared.service import NC, SETTINGS

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self';"
    " connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MODEL = "{model_id:.+}"  # model ids contain "/"
PROVIDER = "/admin/api/upstream-providers/{provider}"

# (method, path, operation in services/billing/admin)
ROUTES = (
    ("POST", "/admin/api/login", "login"),
    ("POST", "/admin/api/logout", "logout"),
    ("PATCH", "/admin/api/password", "password"),
    ("GET", "/admin/api/cli-tokens", "cli_tokens"),
    ("POST", "/admin/api/cli-tokens", "cli_token_create"),
    ("DELETE", "/admin/api/cli-tokens/{id}", "cli_token_delete"),
    ("GET", "/admin/api/settings", "settings"),
    ("PATCH", "/admin/api/settings", "settings_update"),
    ("PATCH", "/admin/api/nsec", "nsec"),
    ("GET", "/admin/api/balances", "balances"),
    ("GET", "/admin/api/temporary-balances", "temporary_balances"),
    ("POST", "/admin/withdraw", "withdraw"),
    ("POST", "/admin/api/withdraw", "withdraw"),
    ("GET", "/admin/api/withdrawals", "withdrawals"),
    ("GET", "/admin/api/transactions", "transactions"),
    ("GET", "/admin/api/lightning-invoices", "lightning_invoices"),
    ("GET", "/admin/api/usage/summary", "usage_summary"),
    ("GET", "/admin/api/usage/dashboard", "usage_dashboard"),
    ("GET", "/admin/api/usage/revenue-by-model", "usage_revenue_by_model"),
    ("GET", "/admin/api/usage/error-details", "usage_error_details"),
    ("GET", "/admin/api/logs", "logs"),
    ("GET", "/admin/api/provider-types", "provider_types"),
    ("GET", "/admin/api/upstream-providers", "providers"),
    ("POST", "/admin/api/upstream-providers", "provider_create"),
    ("GET", PROVIDER, "provider"),
    ("PATCH", PROVIDER, "provider_update"),
    ("DELETE", PROVIDER, "provider_delete"),
    ("GET", f"{PROVIDER}/models", "provider_models"),
    ("POST", f"{PROVIDER}/models", "model_upsert"),
    ("GET", f"{PROVIDER}/models/{MODEL}", "model"),
    ("PATCH", f"{PROVIDER}/models/{MODEL}", "model_update"),
    ("DELETE", f"{PROVIDER}/models/{MODEL}", "model_delete"),
    ("GET", "/admin/api/models", "models"),
    ("POST", "/admin/api/models", "model_upsert"),
    ("GET", f"/admin/api/models/{MODEL}", "model"),
    ("PATCH", f"/admin/api/models/{MODEL}", "model_update"),
    ("DELETE", f"/admin/api/models/{MODEL}", "model_delete"),
)


def _disabled() -> web.Response:
    return detail_error(404, "Admin is disabled: set ADMIN_PASSWORD to enable it")


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return hashlib.sha256(token.strip().encode()).hexdigest() if scheme.lower() == "bearer" and token.strip() else ""


def forward(op: str):
    """A handler sending the call to billing as operation `op` and answering with billing's answer."""

    async def handler(request: web.Request) -> web.Response:
        if not request.app[SETTINGS].admin_password:
            return _disabled()
        body = await json_body(request) if request.method in ("POST", "PATCH", "PUT") else None
        if op == "withdraw" and "Idempotency-Key" in request.headers:
            body = {**body, "idempotency_key": request.headers["Idempotency-Key"]}
        call = bus.AdminCall(
            op=op, token_hash=_bearer(request), body=body, query=dict(request.query),
            params=dict(request.match_info), client=client_address(request, request.app.get(TRUSTED_PROXIES, ())),
        )  # fmt: skip
        try:
            answer = await ask(request.app[NC], bus.BILLING_ADMIN, call, bus.AdminAnswer, bus.MINT_TIMEOUT)
        except BusError as exc:
            retry = {"Retry-After": str(exc.error.retry_after or 1)}
            return detail_error(503, f"Admin unavailable: {exc.error.message}", headers=retry)
        headers = {"Cache-Control": "no-store"}
        if answer.retry_after:
            headers["Retry-After"] = str(answer.retry_after)
        return web.json_response(answer.body, status=answer.status, headers=headers)

    return handler


async def _page(request: web.Request) -> web.StreamResponse:
    if not request.app[SETTINGS].admin_password:
        return _disabled()
    name = request.match_info.get("name", "index.html")
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file():
        return detail_error(404, f"Unknown path {request.path}")
    return web.FileResponse(path, headers=PAGE_HEADERS)


async def _to_page(request: web.Request) -> web.Response:
    raise web.HTTPFound("/admin/")


def add_routes(app: web.Application) -> None:
    for method, path, op in ROUTES:
        app.router.add_route(method, path, forward(op))
    app.router.add_get("/admin", _to_page)
    app.router.add_get("/admin/", _page)
    app.router.add_get("/admin/static/{name}", _page)
