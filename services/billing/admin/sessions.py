"""Admin credentials: the password as an argon2id hash, session and CLI tokens by sha256, failed-login limits.

All of it lives in Postgres, so every gateway replica (asking billing) accepts every session, a
revoked token is refused everywhere at once, and a rotated password survives restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import datetime

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

SESSION_SECONDS = 3600  # routstr-core's `expires_in`
MIN_PASSWORD = 8  # characters
FAILURES_ALLOWED = 5  # failed logins per client address ...
FAILURE_WINDOW = 900  # ... per this many seconds, then 429


def token_hash(token: str) -> str:
    """sha256 hex of a bearer token: tokens are 256-bit random, so a fast hash is enough to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


# argon2id at OWASP's Password Storage Cheat Sheet setting (19 MiB, 2 passes, 1 lane): slow for an
# attacker, yet a login costs a shared small machine tens of milliseconds, not seconds.
HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


class Sessions:
    """Password and tokens. `hasher` is argon2-cffi's PasswordHasher (argon2id)."""

    def __init__(self, pool: asyncpg.Pool, hasher: PasswordHasher = HASHER):
        self.pool = pool
        self.hasher = hasher
        self.enabled = False

    async def _hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def _verify(self, stored: str, password: str) -> bool:
        try:
            return await asyncio.to_thread(self.hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return False

    async def seed(self, env_password: str) -> None:
        """Admin is on only when ADMIN_PASSWORD is set. The stored hash is replaced when that value
        changed since it was seeded; a password rotated through the API otherwise stays."""
        self.enabled = bool(env_password)
        if not env_password:
            return
        row = await self.pool.fetchrow("SELECT seed_hash FROM billing.admin_password WHERE id = 1")
        if row is not None and await self._verify(row["seed_hash"], env_password):
            return
        hashed = await self._hash(env_password)
        await self.pool.execute(
            "INSERT INTO billing.admin_password (id, hash, seed_hash) VALUES (1, $1, $1)"
            " ON CONFLICT (id) DO UPDATE SET hash = $1, seed_hash = $1, updated_at = now()",
            hashed,
        )

    async def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None when it is under the failed-login limit."""
        row = await self.pool.fetchrow(
            "SELECT count(*) AS n, min(at) AS first FROM billing.admin_login_failures"
            " WHERE client = $1 AND at > now() - make_interval(secs => $2)",
            client, float(FAILURE_WINDOW),
        )  # fmt: skip
        if row["n"] < FAILURES_ALLOWED:
            return None
        waited = (datetime.now(row["first"].tzinfo) - row["first"]).total_seconds()
        return max(int(FAILURE_WINDOW - waited) + 1, 1)

    async def login(self, password: str, client: str) -> str | None:
        """A new session token for the right password, None for a wrong one (which counts as a failure)."""
        stored = await self.pool.fetchval("SELECT hash FROM billing.admin_password WHERE id = 1")
        if stored is None or not await self._verify(stored, password):
            await self.pool.execute("INSERT INTO billing.admin_login_failures (client) VALUES ($1)", client)
            return None
        await self.pool.execute(
            "DELETE FROM billing.admin_login_failures WHERE client = $1 OR at < now() - make_interval(secs => $2)",
            client, float(FAILURE_WINDOW),
        )  # fmt: skip
        return await self._issue("session", "", SESSION_SECONDS)

    async def _issue(self, kind: str, name: str, seconds: int | None) -> str:
        token = ("rsa_" if kind == "cli" else "rss_") + secrets.token_urlsafe(32)
        await self.pool.execute(
            "INSERT INTO billing.admin_tokens (token_hash, kind, name, preview, expires_at)"
            " VALUES ($1, $2, $3, $4, CASE WHEN $5::float8 IS NULL THEN NULL"
            " ELSE now() + make_interval(secs => $5::float8) END)",
            token_hash(token), kind, name, token[:8] + "…", None if seconds is None else float(seconds),
        )  # fmt: skip
        return token

    async def authenticate(self, hashed: str) -> int | None:
        """The id of a live token with this hash (and note its use), or None: unknown, expired or revoked."""
        if not hashed:
            return None
        return await self.pool.fetchval(
            "UPDATE billing.admin_tokens SET last_used_at = now() WHERE token_hash = $1"
            " AND (expires_at IS NULL OR expires_at > now()) RETURNING id",
            hashed,
        )

    async def logout(self, hashed: str) -> None:
        await self.pool.execute("DELETE FROM billing.admin_tokens WHERE token_hash = $1", hashed)

    async def change_password(self, current: str, new: str, keep_token_id: int) -> bool:
        """Rotate the password (False when `current` is wrong); every other session is signed out."""
        stored = await self.pool.fetchval("SELECT hash FROM billing.admin_password WHERE id = 1")
        if stored is None or not await self._verify(stored, current):
            return False
        hashed = await self._hash(new)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE billing.admin_password SET hash = $1, updated_at = now() WHERE id = 1", hashed)
            await conn.execute("DELETE FROM billing.admin_tokens WHERE kind = 'session' AND id <> $1", keep_token_id)
        return True

    async def cli_tokens(self) -> list[dict]:
        rows = await self.pool.fetch(
            "SELECT id, name, preview, created_at, last_used_at, expires_at FROM billing.admin_tokens"
            " WHERE kind = 'cli' ORDER BY id"
        )
        return [
            {"id": r["id"], "name": r["name"], "token_preview": r["preview"], "created_at": _iso(r["created_at"]),
             "last_used_at": _iso(r["last_used_at"]), "expires_at": _iso(r["expires_at"])}
            for r in rows
        ]  # fmt: skip

    async def create_cli_token(self, name: str, days: int | None) -> dict:
        token = await self._issue("cli", name, None if days is None else days * 86400)
        row = await self.pool.fetchrow(
            "SELECT id, name, created_at, expires_at FROM billing.admin_tokens WHERE token_hash = $1", token_hash(token)
        )
        return {"id": row["id"], "name": row["name"], "token": token, "created_at": _iso(row["created_at"]),
                "expires_at": _iso(row["expires_at"])}  # fmt: skip

    async def delete_cli_token(self, token_id: int) -> bool:
        deleted = await self.pool.fetchval(
            "DELETE FROM billing.admin_tokens WHERE id = $1 AND kind = 'cli' RETURNING 1", token_id
        )
        return bool(deleted)

    async def sweep(self) -> None:
        """Forget expired tokens and old failures."""
        await self.pool.execute("DELETE FROM billing.admin_tokens WHERE expires_at < now() - interval '1 day'")
        await self.pool.execute(
            "DELETE FROM billing.admin_login_failures WHERE at < now() - make_interval(secs => $1)",
            float(FAILURE_WINDOW),
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
