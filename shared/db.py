"""Postgres: a pool per service and a migrations runner (numbered SQL files, advisory lock, checksums)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from pathlib import Path
from ssl import SSLContext

import asyncpg
from asyncpg import connect_utils

log = logging.getLogger(__name__)

_LOCK_ID = 0x526F757473  # "Routs": one lock for every service's migrations
_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """An applied migration was edited, or the database is ahead of this code."""


CANCEL_WAIT = 60.0  # seconds a best-effort cancel request for a timed-out statement may wait for the server
_cancels: set[asyncio.Task] = set()


class _DroppingConnection(asyncpg.Connection):
    """A connection that gives up on a statement that overran its timeout by dropping itself.

    asyncpg would send the server a cancel request and make the next statement on the connection (the
    ROLLBACK of the caller's transaction, the pool's reset on release) wait until the server confirms it.
    A server that is stalled (SIGSTOP, a frozen VM, a dead network path) confirms nothing, so the caller
    would hang for as long as the stall lasts. Here the caller gets its `TimeoutError` at once, the
    connection is closed (the server rolls its transaction back when it notices) and the pool opens a
    new one for the next caller; the cancel request is still sent, in the background, so a server that
    is merely slow stops the statement.
    """

    def _cancel_current_command(self, waiter: asyncio.Future) -> None:
        pid, secret = self._protocol.backend_pid, self._protocol.backend_secret
        task = asyncio.get_running_loop().create_task(self._ask_cancel(pid, secret))
        _cancels.add(task)
        task.add_done_callback(_cancels.discard)
        if not waiter.done():
            waiter.set_result(None)
        asyncio.get_running_loop().call_soon(self.terminate)  # after the caller's waiter gets its TimeoutError

    async def _ask_cancel(self, pid: int, secret: int) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CANCEL_WAIT):
                await connect_utils._cancel(
                    loop=asyncio.get_running_loop(), addr=self._addr, params=self._params, backend_pid=pid,
                    backend_secret=secret,
                )  # fmt: skip


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
    so a stopped or stalled Postgres costs a caller a bounded wait and an `unavailable` answer (`is_unavailable`),
    never a hang: a statement that overran drops its connection (`_DroppingConnection`) instead of waiting for
    the server to confirm its cancellation. `ssl` (shared.tls.database_context) replaces the URL's own sslmode
    when given."""
    reset = None if reset_session else _keep_session
    extra = {"ssl": ssl} if ssl is not None else {}
    return await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, command_timeout=timeout, timeout=timeout, reset=reset,
        connection_class=_DroppingConnection, **extra,
    )  # fmt: skip


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` says Postgres is down, restarting, unreachable or too slow, not that a query is wrong;
    also for the error a transaction's exit raises on a connection dropped after a timeout (its context is
    the timeout)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(
            exc, OSError | TimeoutError | asyncpg.PostgresConnectionError | asyncpg.exceptions.OperatorInterventionError
        ):
            return True
        if not isinstance(exc, asyncpg.InterfaceError):
            return False
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


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
