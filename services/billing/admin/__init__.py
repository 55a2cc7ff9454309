"""Billing's side of the admin API: one bus subject (`billing.admin`), one operation per admin route.

The gateway forwards each `/admin/api/*` call as a `bus.AdminCall` naming the operation; this module
checks the bearer token against Postgres (every operation but `login` needs a live one), validates
the input and answers with the HTTP status and JSON body. Refusals are `{"detail": ...}` with a 4xx.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from services.billing.admin import settings as live
from services.billing.admin.models import Conflict, Invalid, Missing, Models, validate
from services.billing.admin.money import Money, Refusal
from services.billing.admin.sessions import MIN_PASSWORD, Sessions
from services.billing.admin.usage import MAX_HOURS, RequestLog
from services.billing.catalog import Catalog
from shared import bus
from shared.config import ConfigError, Settings
from shared.messaging import BusError, request
from shared.secretbox import SecretBox

log = logging.getLogger(__name__)


class Problem(Exception):
    """An admin refusal: HTTP `status` with `detail`."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after


def _int(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Problem(400, f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise Problem(400, f"{name} must be between {low} and {high}, got {value}")
    return value


def _body(call: bus.AdminCall) -> dict:
    if call.body is None:
        return {}
    if not isinstance(call.body, dict):
        raise Problem(400, "Body must be a JSON object")
    return call.body


class Admin:
    def __init__(self, pool: asyncpg.Pool, nc: NATS, settings: Settings, catalog: Catalog):
        self.pool = pool
        self.nc = nc
        self.settings = settings
        self.catalog = catalog
        self.sessions = Sessions(pool)
        self.money = Money(pool, nc, settings.cashu_mints, SecretBox.from_settings(settings))
        self.usage = RequestLog(pool)
        self.models = Models(catalog, nc)
        self.ops: dict[str, Callable[[bus.AdminCall, int], Awaitable[Any]]] = {
            name.removeprefix("op_"): getattr(self, name) for name in dir(self) if name.startswith("op_")
        }

    async def start(self) -> None:
        await self.sessions.seed(self.settings.admin_password)
        await self.apply_live()

    async def apply_live(self) -> None:
        """Apply the live settings stored by any replica (at start and on each catalog event)."""
        changes = await live.stored(self.pool)
        if changes:
            self.settings = self.settings.replace(**changes)
            self.catalog.settings = self.settings

    async def handle(self, message: bus.Message) -> bus.AdminAnswer:
        if not isinstance(message, bus.AdminCall):
            return bus.AdminAnswer(400, {"detail": "billing.admin answers AdminCall only"})
        if not self.sessions.enabled:
            return bus.AdminAnswer(404, {"detail": "Admin is disabled: set ADMIN_PASSWORD to enable it"})
        op = self.ops.get(message.op)
        if op is None:
            return bus.AdminAnswer(404, {"detail": f"Unknown admin operation {message.op}"})
        try:
            token_id = 0
            if message.op != "login":
                token_id = await self.sessions.authenticate(message.token_hash)
                if token_id is None:
                    return bus.AdminAnswer(403, {"detail": "Unauthorized"})
            body = await op(message, token_id)
            return bus.AdminAnswer(200, body)
        except (Problem, Refusal) as exc:
            return bus.AdminAnswer(exc.status, {"detail": exc.detail}, exc.retry_after)
        except (Invalid, ConfigError) as exc:
            return bus.AdminAnswer(400, {"detail": str(exc)})
        except Missing as exc:
            return bus.AdminAnswer(404, {"detail": str(exc)})
        except Conflict as exc:
            return bus.AdminAnswer(409, {"detail": str(exc)})

    # ---- sessions ----------------------------------------------------------------------------

    async def op_login(self, call: bus.AdminCall, _: int) -> dict:
        password = _body(call).get("password")
        if not isinstance(password, str) or not password:
            raise Problem(400, "password is required")
        wait = await self.sessions.retry_after(call.client)
        if wait is not None:
            raise Problem(429, f"Too many failed logins; retry in {wait} s", wait)
        token = await self.sessions.login(password, call.client)
        if token is None:
            raise Problem(401, "Invalid password")
        return {"ok": True, "token": token, "expires_in": 3600}

    async def op_logout(self, call: bus.AdminCall, _: int) -> dict:
        await self.sessions.logout(call.token_hash)
        return {"ok": True}

    async def op_password(self, call: bus.AdminCall, token_id: int) -> dict:
        body = _body(call)
        current, new = body.get("current_password"), body.get("new_password")
        if not isinstance(current, str) or not isinstance(new, str):
            raise Problem(400, "current_password and new_password are required")
        if len(new) < MIN_PASSWORD:
            raise Problem(400, f"New password must be at least {MIN_PASSWORD} characters")
        if not await self.sessions.change_password(current, new, token_id):
            raise Problem(401, "Invalid current password")
        return {"ok": True, "message": "Password changed; other sessions were signed out"}

    async def op_cli_tokens(self, call: bus.AdminCall, _: int) -> list:
        return await self.sessions.cli_tokens()

    async def op_cli_token_create(self, call: bus.AdminCall, _: int) -> dict:
        body = _body(call)
        name, days = body.get("name"), body.get("expires_in_days")
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise Problem(400, "name is required (1 to 100 characters)")
        if days is not None and (not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 3650):
            raise Problem(400, "expires_in_days must be a whole number from 1 to 3650")
        return await self.sessions.create_cli_token(name.strip(), days)

    async def op_cli_token_delete(self, call: bus.AdminCall, _: int) -> dict:
        raw = call.params.get("id", "")
        if not raw.isdigit() or not await self.sessions.delete_cli_token(int(raw)):
            raise Problem(404, f"No CLI token {raw}")
        return {"ok": True, "deleted_id": int(raw)}

    # ---- settings ----------------------------------------------------------------------------

    async def op_settings(self, call: bus.AdminCall, _: int) -> dict:
        return live.view(self.settings)

    async def op_settings_update(self, call: bus.AdminCall, _: int) -> dict:
        changes = live.parse(call.body)
        await live.store(self.pool, changes)
        await self.apply_live()
        await self.models.changed()  # other replicas load the settings; fees re-price the catalog
        return live.view(self.settings)

    async def op_nsec(self, call: bus.AdminCall, _: int) -> dict:
        """PATCH /admin/api/nsec `{nsec}`: discovery keeps and signs with the key ("" goes back to NSEC,
        else a fresh generated key); answers `{ok, npub}`. The key is never logged or echoed."""
        nsec = _body(call).get("nsec")
        if not isinstance(nsec, str):
            raise Problem(400, "nsec is required (nsec1…, 64 hex characters, or empty to clear)")
        try:
            identity = await request(self.nc, bus.DISCOVERY_IDENTITY_SET, bus.IdentitySet(nsec=nsec), bus.NodeIdentity)
        except BusError as exc:
            raise Problem(exc.error.status, exc.error.message, exc.error.retry_after) from None
        except NatsError:
            raise Problem(503, "Discovery is not reachable; retry shortly", 2) from None
        return {"ok": True, "npub": identity.npub}

    # ---- money -------------------------------------------------------------------------------

    async def op_balances(self, call: bus.AdminCall, _: int) -> list:
        return await self.money.balances()

    async def op_temporary_balances(self, call: bus.AdminCall, _: int) -> dict:
        q = call.query
        return await self.money.temporary_balances(
            q.get("search", ""), _int(q, "limit", 50, 1, 500), _int(q, "offset", 0, 0, 10**9)
        )

    async def op_withdraw(self, call: bus.AdminCall, _: int) -> dict:
        body = _body(call)
        amount, unit = body.get("amount"), body.get("unit", "sat")
        if unit != "sat":
            raise Problem(400, "unit must be 'sat'")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise Problem(400, "amount must be a whole number of sats greater than 0")
        mint = body.get("mint_url")
        if mint is not None and (not isinstance(mint, str) or mint.rstrip("/") not in self.settings.cashu_mints):
            raise Problem(400, "mint_url must be one of the node's mints (CASHU_MINTS)")
        address = body.get("lightning_address")
        if address is not None and (not isinstance(address, str) or "@" not in address.strip("@")):
            raise Problem(400, "lightning_address must look like name@domain")
        key = body.get("idempotency_key")
        if not isinstance(key, str) or not 8 <= len(key) <= 200:
            raise Problem(400, "An idempotency key (8 to 200 characters) is required, as Idempotency-Key")
        return await self.money.withdraw(amount, key, mint and mint.rstrip("/"), address)

    async def op_withdrawals(self, call: bus.AdminCall, _: int) -> dict:
        return await self.money.withdrawals()

    async def op_transactions(self, call: bus.AdminCall, _: int) -> dict:
        q = call.query
        return await self.money.transactions(
            q.get("type", ""), q.get("status", ""), _int(q, "limit", 100, 1, 1000), _int(q, "offset", 0, 0, 10**9)
        )

    async def op_lightning_invoices(self, call: bus.AdminCall, _: int) -> dict:
        q = call.query
        return await self.money.lightning_invoices(_int(q, "limit", 100, 1, 1000), _int(q, "offset", 0, 0, 10**9))

    # ---- usage -------------------------------------------------------------------------------

    def _hours(self, call: bus.AdminCall) -> int:
        return _int(call.query, "hours", 24, 1, MAX_HOURS)

    async def op_usage_summary(self, call: bus.AdminCall, _: int) -> dict:
        return await self.usage.summary(self._hours(call))

    async def op_usage_dashboard(self, call: bus.AdminCall, _: int) -> dict:
        return await self.usage.dashboard(self._hours(call))

    async def op_usage_revenue_by_model(self, call: bus.AdminCall, _: int) -> dict:
        return await self.usage.revenue_by_model(self._hours(call))

    async def op_usage_error_details(self, call: bus.AdminCall, _: int) -> dict:
        return await self.usage.error_details(self._hours(call), _int(call.query, "limit", 100, 1, 1000))

    async def op_logs(self, call: bus.AdminCall, _: int) -> dict:
        q = call.query
        filters = {
            "request_id": q.get("request_id"), "model": q.get("model"), "key": q.get("key"),
            "status": _int(q, "status", 0, 100, 599) if q.get("status") else None,
            "hours": _int(q, "hours", 0, 1, MAX_HOURS) if q.get("hours") else None,
        }  # fmt: skip
        return await self.usage.logs(filters, _int(q, "limit", 100, 1, 1000), _int(q, "offset", 0, 0, 10**9))

    # ---- providers and models ----------------------------------------------------------------

    async def op_providers(self, call: bus.AdminCall, _: int) -> list:
        return await self.models.providers()

    async def op_provider_create(self, call: bus.AdminCall, _: int) -> dict:
        return await self.models.create_provider(call.body)

    async def op_provider(self, call: bus.AdminCall, _: int) -> dict:
        return (await self.models.provider(call.params["provider"])).redacted()

    async def op_provider_update(self, call: bus.AdminCall, _: int) -> dict:
        return await self.models.update_provider(call.params["provider"], call.body)

    async def op_provider_delete(self, call: bus.AdminCall, _: int) -> dict:
        return {"ok": True, "deleted_id": await self.models.delete_provider(call.params["provider"])}

    async def op_provider_types(self, call: bus.AdminCall, _: int) -> list:
        return self.models.types()

    async def op_provider_models(self, call: bus.AdminCall, _: int) -> dict:
        return await self.models.provider_models(call.params["provider"])

    async def op_models(self, call: bus.AdminCall, _: int) -> list:
        return await self.models.list()

    async def op_model(self, call: bus.AdminCall, _: int) -> dict:
        return await self.models.get(call.params.get("model_id", ""), call.params.get("provider"))

    async def op_model_upsert(self, call: bus.AdminCall, _: int) -> dict:
        body = _body(call)
        if not isinstance(body.get("id"), str):
            raise Problem(400, "id is required")
        return await self.models.save(body["id"], validate(body), call.params.get("provider"), replace=True)

    async def op_model_update(self, call: bus.AdminCall, _: int) -> dict:
        model_id = call.params.get("model_id", "")
        changes = validate(_body(call))
        await self.models.get(model_id, call.params.get("provider"))  # 404 before anything is stored
        return await self.models.save(model_id, changes, call.params.get("provider"))

    async def op_model_delete(self, call: bus.AdminCall, _: int) -> dict:
        model_id = call.params.get("model_id", "")
        await self.models.delete(model_id, call.params.get("provider"))
        return {"ok": True, "deleted_id": model_id}
