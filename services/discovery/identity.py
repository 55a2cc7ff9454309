"""The node's Nostr key: set by the operator through the admin API, else NSEC, else generated once; the
admin-set and generated keys are kept sealed in Postgres so restarts and replicas share them."""

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


async def admin_keys(pool: asyncpg.Pool | None, box: SecretBox | None) -> Keys | None:
    """The key the operator set with PATCH /admin/api/nsec, or None (no database, no SECRETS_KEY, none set)."""
    if pool is None or box is None:
        return None
    stored = await pool.fetchval("SELECT secret_hex FROM discovery.node_key WHERE id AND set_by_admin")
    return Keys.parse(box.open(stored)) if stored is not None else None


async def store_admin_keys(pool: asyncpg.Pool, box: SecretBox, keys: Keys) -> None:
    """Keep `keys` sealed as the operator's choice (replacing a generated or earlier admin-set key)."""
    await pool.execute(
        """INSERT INTO discovery.node_key (id, secret_hex, set_by_admin) VALUES (true, $1, true)
           ON CONFLICT (id) DO UPDATE SET secret_hex = EXCLUDED.secret_hex, set_by_admin = true, created_at = now()""",
        box.seal(keys.secret_key().to_hex()),
    )


async def clear_stored_keys(pool: asyncpg.Pool) -> None:
    """Forget the stored key (admin-set or generated): the node goes back to NSEC, else the next
    `stored_keys` generates a fresh one."""
    await pool.execute("DELETE FROM discovery.node_key WHERE id")


class KeyStore:
    """Which key the node uses, in order: the operator's (admin API), NSEC (`configured`), a generated one.

    `pool`/`box` are None when there is no DATABASE_URL / SECRETS_KEY; then only NSEC can be used and
    `settable` is False."""

    def __init__(self, pool: asyncpg.Pool | None, box: SecretBox | None, configured: Keys | None):
        self.pool, self.box, self.configured = pool, box, configured

    @property
    def settable(self) -> bool:
        return self.pool is not None and self.box is not None

    async def current(self) -> Keys:
        chosen = await admin_keys(self.pool, self.box) or self.configured
        return chosen or await stored_keys(self.pool, self.box)

    async def replace(self, nsec: str) -> Keys:
        """Keep `nsec` (nsec1… or 64 hex) as the node's key, or with "" forget the stored key; return the
        key now in force. Raises ConfigError (never echoing the value) for a malformed key, before
        anything is stored."""
        keys = parse_nsec(nsec) if nsec.strip() else None
        if keys is None:
            await clear_stored_keys(self.pool)
            return await self.current()
        await store_admin_keys(self.pool, self.box, keys)
        return keys


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
