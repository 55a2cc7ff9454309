"""Operator-side helpers for tests: fund a key over the bus, read a key's balance, run reconcile."""

from __future__ import annotations

import hashlib
import secrets

from shared import bus, messaging


def hash_of(key: str) -> str:
    """Billing's `key_hash` of an `sk-` key (hex SHA-256); of a token, the hex digest that makes its `sk-` key."""
    return hashlib.sha256(key.encode()).hexdigest()


async def funded_key(nats_url: str, msat: int) -> str:
    """A new `sk-` key holding `msat`, created through billing's operator subject."""
    key = "sk-" + secrets.token_hex(32)
    key_hash = hash_of(key)
    nc = await messaging.connect(nats_url, "test-operator")
    try:
        await messaging.request(
            nc, bus.BILLING_CREATE_KEY, bus.CreateKey(key_hash, msat, f"test-{key_hash}"), bus.KeyInfo
        )
    finally:
        await nc.drain()
    return key


async def reconcile(nats_url: str) -> bus.Reconciliation:
    nc = await messaging.connect(nats_url, "test-operator")
    try:
        return await messaging.request(
            nc, bus.BILLING_RECONCILE, bus.ReconcileQuery(), bus.Reconciliation, bus.MINT_TIMEOUT
        )
    finally:
        await nc.drain()
