"""Postgres: a pool per service and a migrations runner (numbered SQL files, advisory lock, checksums)."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from ssl import SSLContext

import asyncpg

log = logging.getLogger(__name__)

_LOCK_ID = 0x526F757473  # "Routs": one lock for every service's migrations
_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """An applied migration was edited, or the database is ahead of this code."""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release session reset (a round trip on every query) for code keeping no session state."""


async def create_pool(
    url: str,
    min_size: int = 2,
    max_size: int = 10,
    reset_session: bool = True,
    ssl: SSLContext | None = None,
    timeout: float = 30,
) -> asyncpg.Pool:
    """A pool on `url` whose connects and statements each give up after `timeout` seconds (`DEPENDENCY_TIMEOUT`),
    so a stopped Postgres costs a caller a bounded wait and an `unavailable` answer (`is_unavailable`), never a
    hang; `ssl` (shared.tls.database_context) replaces the URL's own sslmode when given."""
    reset = None if reset_session else _keep_session
    extra = {"ssl": ssl} if ssl is not None else {}
    return await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, command_timeout=timeout, timeout=timeout, reset=reset, **extra
    )


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` says Postgres is down, restarting, unreachable or too slow, not that a query is wrong."""
    return isinstance(
        exc,
        OSError | TimeoutError | asyncpg.PostgresConnectionError | asyncpg.exceptions.OperatorInterventionError,
    )


def _files(folder: Path) -> list[tuple[int, str, str]]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNN_description.sql")
        sql = path.read_text()
        found.append((int(match.group(1)), path.name, sql))
    return found


async def migrate(conn: asyncpg.Connection, service: str, folder: Path) -> list[str]:
    """Apply `folder`'s unapplied migrations for `service` in order; return the names applied.

    Runs under a session advisory lock so replicas starting together apply each file once, and
    refuses to start when an applied file's checksum changed or the database knows a newer one.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS public.schema_migrations (
                   service text NOT NULL, version int NOT NULL, name text NOT NULL,
                   checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (service, version))"""
        )
        rows = await conn.fetch(
            "SELECT version, name, checksum FROM public.schema_migrations WHERE service = $1", service
        )
        applied = {r["version"]: r for r in rows}
        files = _files(folder)
        known = {version for version, _, _ in files}
        unknown = sorted(set(applied) - known)
        if unknown:
            raise MigrationError(f"{service}: database has migrations {unknown} this code does not know")
        done = []
        for version, name, sql in files:
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if version in applied:
                if applied[version]["checksum"] != checksum:
                    raise MigrationError(f"{service}: applied migration {name} was changed afterwards")
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO public.schema_migrations (service, version, name, checksum)"
                    " VALUES ($1, $2, $3, $4)",
                    service, version, name, checksum,
                )  # fmt: skip
            log.info("applied migration %s/%s", service, name)
            done.append(name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)


async def migrate_url(url: str, service: str, folder: Path, ssl: SSLContext | None = None) -> list[str]:
    conn = await asyncpg.connect(url, **({"ssl": ssl} if ssl is not None else {}))
    try:
        return await migrate(conn, service, folder)
    finally:
        await conn.close()
