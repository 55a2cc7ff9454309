"""`python -m services.billing [serve|migrate|create-key|reconcile|admin-token]` (`--help` lists them)."""

import argparse
import asyncio
import hashlib
import json
import secrets
import sys

import msgspec

from services.billing.admin.sessions import Sessions
from services.billing.app import MIGRATIONS, create_app
from services.billing.ledger import MAX_GRANT_MSAT
from shared import bus, db, messaging
from shared.config import Settings
from shared.messaging import BusError
from shared.service import Command, main


def _msat(text: str) -> int:
    """argparse type of `--msat`: a whole number of msat, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of msat, not {text!r}") from None
    if not 0 <= value <= MAX_GRANT_MSAT:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_GRANT_MSAT} msat, not {value}")
    return value


async def _create_key(settings: Settings, msat: int) -> str:
    key = "sk-" + secrets.token_hex(32)
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    nc = await messaging.connect_service(settings, "operator")
    try:
        await messaging.request(nc, bus.BILLING_CREATE_KEY, bus.CreateKey(key_hash, msat, key_hash), bus.KeyInfo)
    finally:
        await nc.drain()
    return key


async def _reconcile(settings: Settings) -> bus.Reconciliation:
    nc = await messaging.connect_service(settings, "operator")
    try:
        return await messaging.request(nc, bus.BILLING_RECONCILE, bus.ReconcileQuery(), bus.Reconciliation, 30)
    finally:
        await nc.drain()


async def _admin_token(settings: Settings, name: str, days: int | None) -> dict:
    pool = await db.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        return await Sessions(pool).create_cli_token(name, days)
    finally:
        await pool.close()


def create_key(settings: Settings, args: argparse.Namespace) -> int:
    try:
        key = asyncio.run(_create_key(settings, args.msat))
    except BusError as exc:  # billing refused (e.g. invalid_amount) or is down: say so, no traceback
        print(f"create-key: {exc.error.code}: {exc.error.message}", file=sys.stderr)
        return 1
    print(key)
    return 0


def reconcile(settings: Settings, args: argparse.Namespace) -> int:
    result = asyncio.run(_reconcile(settings))
    print(json.dumps(msgspec.to_builtins(result), indent=2))
    return 0 if result.difference_msat == 0 and result.covered else 1


def admin_token(settings: Settings, args: argparse.Namespace) -> int:
    created = asyncio.run(_admin_token(settings, args.name, args.days))
    print(created["token"])
    return 0


COMMANDS = {
    "create-key": Command(
        "create an sk- key funded by the operator and print it", create_key, ("NATS_URL",),
        lambda p: p.add_argument("--msat", type=_msat, default=0,
                                 help="starting balance of the new key, in msat (operator credit: spendable, not"
                                      " refundable)"),
    ),
    "reconcile": Command("prove the books (exit 1 when they do not balance)", reconcile, ("NATS_URL",)),
    "admin-token": Command(
        "create an admin API (CLI) token and print it once", admin_token, ("DATABASE_URL",),
        lambda p: (p.add_argument("--name", default="cli", help="a name to recognise the token by"),
                   p.add_argument("--days", type=int, default=None, help="expiry in days (default: never)")),
    ),
}  # fmt: skip

main(
    "billing", create_app, port=lambda s: s.billing_port, migrations=MIGRATIONS, needs=("NATS_URL", "DATABASE_URL"),
    commands=COMMANDS,
)  # fmt: skip
