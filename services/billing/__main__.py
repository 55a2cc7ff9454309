"""`python -m services.billing [serve|migrate|create-key --msat N|reconcile]`."""

import argparse
import asyncio
import hashlib
import json
import secrets
import sys

import msgspec

from services.billing.app import MIGRATIONS, create_app
from shared import bus, messaging
from shared.config import load_settings, require
from shared.service import main


async def _create_key(msat: int) -> str:
    settings = load_settings()
    require(settings, "NATS_URL")
    key = "sk-" + secrets.token_hex(32)
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    nc = await messaging.connect_service(settings, "operator")
    try:
        await messaging.request(nc, bus.BILLING_CREATE_KEY, bus.CreateKey(key_hash, msat, key_hash), bus.KeyInfo)
    finally:
        await nc.drain()
    return key


async def _reconcile() -> bus.Reconciliation:
    settings = load_settings()
    require(settings, "NATS_URL")
    nc = await messaging.connect_service(settings, "operator")
    try:
        return await messaging.request(nc, bus.BILLING_RECONCILE, bus.ReconcileQuery(), bus.Reconciliation, 30)
    finally:
        await nc.drain()


if len(sys.argv) > 1 and sys.argv[1] in ("create-key", "reconcile"):
    parser = argparse.ArgumentParser(prog="python -m services.billing")
    parser.add_argument("command", choices=["create-key", "reconcile"])
    parser.add_argument("--msat", type=int, default=0, help="starting balance of the new key, in msat")
    args = parser.parse_args()
    if args.command == "create-key":
        print(asyncio.run(_create_key(args.msat)))
    else:
        result = asyncio.run(_reconcile())
        print(json.dumps(msgspec.to_builtins(result), indent=2))
        sys.exit(0 if result.difference_msat == 0 and result.covered else 1)
else:
    main(
        "billing", create_app, port=lambda s: s.billing_port, migrations=MIGRATIONS, needs=("NATS_URL", "DATABASE_URL")
    )
