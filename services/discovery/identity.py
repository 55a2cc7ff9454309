"""The node's Nostr key: from NSEC, or generated once and kept in Postgres so restarts and replicas share it."""

from __future__ import annotations

import time

import asyncpg
from nostr_sdk import Keys, NostrSdkError

from shared.config import ConfigError
from shared.secretbox import SecretBox, is_sealed


def parse_nsec(nsec: str) -> Keys:
    """Keys from an `nsec1…` or 64-hex secret; the error names NSEC and never echoes the value."""
    try:
        return Keys.parse(nsec.strip())
    except NostrSdkError:
        raise ConfigError("NSEC: not a valid Nostr secret key (expected nsec1… or 64 hex characters)") from None


def provider_id(configured: str, keys: Keys) -> str:
    """The announcement's `d` tag: PROVIDER_ID, else derived from the public key so it never changes."""
    return configured or f"routstr-{keys.public_key().to_hex()[:16]}"


async def stored_keys(pool: asyncpg.Pool, box: SecretBox) -> Keys:
    """The generated key, stored sealed by `box`; the first replica to get here creates it, every other
    one reads the same row. A key stored in the clear by an older version is sealed now."""
    candidate = box.seal(Keys.generate().secret_key().to_hex())
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO discovery.node_key (id, secret_hex) VALUES (true, $1) ON CONFLICT (id) DO NOTHING", candidate
        )
        stored = await conn.fetchval("SELECT secret_hex FROM discovery.node_key WHERE id")
        if not is_sealed(stored):
            await conn.execute(
                "UPDATE discovery.node_key SET secret_hex = $1 WHERE secret_hex = $2", box.seal(stored), stored
            )
    return Keys.parse(box.open(stored))


class Clock:
    """Hands out strictly increasing `created_at` per key, durable in Postgres when there is one."""

    def __init__(self, pool: asyncpg.Pool | None):
        self._pool = pool
        self._last: dict[str, int] = {}

    async def next(self, pubkey: str) -> int:
        now = int(time.time())
        if self._pool is None:
            stamp = max(now, self._last.get(pubkey, 0) + 1)
            self._last[pubkey] = stamp
            return stamp
        return await self._pool.fetchval(
            """INSERT INTO discovery.announcement (pubkey, created_at) VALUES ($1, $2)
               ON CONFLICT (pubkey) DO UPDATE
               SET created_at = GREATEST(EXCLUDED.created_at, discovery.announcement.created_at + 1)
               RETURNING created_at""",
            pubkey, now,
        )  # fmt: skip
