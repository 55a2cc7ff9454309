"""The settings the admin API shows and the few it changes while the node runs.

GET shows every setting (lower-case names, as routstr-core's settings object), each secret as
"[REDACTED]". PATCH changes only the settings in `LIVE`: billing applies them at once (and every
billing replica on the next catalog event), and they are kept in `billing.admin_settings` so a restart
keeps them. Any other setting answers 400 naming it: it is read at start, from the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec

from shared.config import SETTINGS_DOC, ConfigError, Settings, _decimal, _int

REDACTED = "[REDACTED]"


def _fee(name: str, raw: str) -> Decimal:
    value = _decimal(name, raw)
    if value < 1:
        raise ConfigError(f"{name}: must be at least 1 (a multiplier), got {raw!r}")
    return value


def _count(name: str, raw: str) -> int:
    value = _int(name, raw)
    if value < 0:
        raise ConfigError(f"{name}: must be 0 or more, got {value}")
    return value


def _days(name: str, raw: str) -> int:
    value = _int(name, raw)
    if value <= 0:
        raise ConfigError(f"{name}: must be greater than 0, got {value}")
    return value


def _address(name: str, raw: str) -> str:
    raw = raw.strip()
    if raw and ("@" not in raw or raw.startswith("@") or raw.endswith("@")):
        raise ConfigError(f"{name}: expected a Lightning address like name@domain, got {raw!r}")
    return raw


LIVE: dict[str, Callable[[str, str], Any]] = {
    "upstream_provider_fee": _fee,
    "exchange_fee": _fee,
    "receive_ln_address": _address,
    "payout_threshold_sats": _count,
    "request_log_retention_days": _days,
}
SECRETS = {name.lower() for name, (_, _, secret) in SETTINGS_DOC.items() if secret}


def view(settings: Settings) -> dict:
    """The whole settings object with every secret redacted, plus which names change at run time."""
    data = msgspec.to_builtins(settings)
    shown = {k: (REDACTED if k in SECRETS and v else v) for k, v in data.items()}
    return {**shown, "runtime_settings": sorted(LIVE)}


def parse(changes: Any) -> dict[str, Any]:
    """Typed values for a PATCH body; raises ConfigError naming the first bad or non-live setting."""
    if not isinstance(changes, dict) or not changes:
        raise ConfigError("Body must be a non-empty JSON object of settings")
    parsed = {}
    for name, raw in changes.items():
        if name not in LIVE:
            known = name in Settings.__struct_fields__
            why = "is read at start: change it in the environment and restart" if known else "is not a setting"
            raise ConfigError(f"{name} {why}")
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise ConfigError(f"{name}: expected a string or number")
        parsed[name] = LIVE[name](name.upper(), str(raw))
    return parsed


async def stored(pool: asyncpg.Pool) -> dict[str, Any]:
    rows = await pool.fetch("SELECT name, value FROM billing.admin_settings")
    return {r["name"]: LIVE[r["name"]](r["name"].upper(), r["value"]) for r in rows if r["name"] in LIVE}


async def store(pool: asyncpg.Pool, changes: dict[str, Any]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for name, value in changes.items():
            await conn.execute(
                "INSERT INTO billing.admin_settings (name, value) VALUES ($1, $2)"
                " ON CONFLICT (name) DO UPDATE SET value = $2, updated_at = now()",
                name, str(value),
            )  # fmt: skip
