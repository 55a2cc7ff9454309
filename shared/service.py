"""What every service has in common: ops routes, typed app keys, start-up and signal-driven shutdown."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import uvloop
from aiohttp import web
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shared import db, tls
from shared.config import RUN_ENV, ConfigError, Settings, load_settings, require
from shared.logs import setup_logging

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", CollectorRegistry)
NC = web.AppKey("nc", NATS)
POOL = web.AppKey("pool", asyncpg.Pool)
CHECKS = web.AppKey("checks", dict)
DRAINING = web.AppKey("draining", list)
METRICS_URL = web.AppKey("metrics_url", str)

Check = Callable[[], Awaitable[bool] | bool]


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """A background loop's pause: wait up to `seconds` for `event`; True if it is set. Cancelling the
    waiting task always cancels it. `asyncio.wait_for(event.wait(), seconds)` does not promise that on
    Python 3.11: a cancel that lands as the event is set is swallowed (CPython gh-86296, fixed in 3.12 by
    building `wait_for` on `asyncio.timeout`), and a loop stopped by cancellation then runs on."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


def ops_app(settings: Settings, registry: CollectorRegistry, metrics_route: bool = True) -> web.Application:
    """An application with /healthz, /readyz and (unless `metrics_route` is False) /metrics; services add
    routes and checks to it."""
    # Cashu tokens travel in headers (X-Cashu, Bearer) and can outgrow aiohttp's 8 KiB header limit;
    # the gateway rejects oversized tokens itself, with an error clients can parse.
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        handler_args={"max_field_size": 131072, "max_line_size": 131072},
    )
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[CHECKS] = {}
    app[DRAINING] = []
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    if metrics_route:
        app.router.add_get("/metrics", _metrics)
    app.on_shutdown.append(_start_draining)
    return app


async def _start_draining(app: web.Application) -> None:
    app[DRAINING].append(True)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    app = request.app
    results: dict[str, bool] = {}
    for name, check in app[CHECKS].items():
        try:
            outcome = check()
            results[name] = bool(await outcome if asyncio.iscoroutine(outcome) else outcome)
        except Exception:
            results[name] = False
    ready = all(results.values()) and not app[DRAINING]
    body = {"status": "ready" if ready else "not ready", "checks": results, "draining": bool(app[DRAINING])}
    return web.json_response(body, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[REGISTRY]), headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """/metrics alone, for a port of its own (the gateway's public port must not expose it)."""
    app = web.Application()
    app[REGISTRY] = registry
    app.router.add_get("/metrics", _metrics)
    return app


async def serve_metrics(app: web.Application, host: str, port: int) -> AsyncIterator[None]:
    """cleanup_ctx: serve `app`'s registry on host:port (0 = any free port) for the app's lifetime;
    the bound base URL is stored under METRICS_URL."""
    runner = web.AppRunner(metrics_app(app[REGISTRY]), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    app[METRICS_URL] = f"http://{'127.0.0.1' if bound_host in ('0.0.0.0', '::') else bound_host}:{bound_port}"
    yield
    await runner.cleanup()


def nats_check(nc: NATS) -> Check:
    return lambda: nc.is_connected


def answered_check(nc: NATS, subject: str, timeout: float = 1.0) -> Check:
    """Ready once some service has answered on `subject` (an empty request earns a typed Error reply),
    so a caller takes no traffic before what it depends on is up; once seen, it stays ready (a later
    outage is answered per request with 503 + Retry-After, not by dropping out of the load balancer)."""
    answered = False

    async def check() -> bool:
        nonlocal answered
        if not answered and nc.is_connected:
            try:
                await nc.request(subject, b"", timeout=timeout)
                answered = True
            except Exception:  # no responders, timeout, reconnecting: not yet
                return False
        return answered and nc.is_connected

    return check


def pool_check(pool: asyncpg.Pool) -> Check:
    async def check() -> bool:
        async with pool.acquire(timeout=2) as conn:
            return await conn.fetchval("SELECT 1") == 1

    return check


async def retry_start(what: str, connect: Callable[[], Awaitable], attempts: int = 5):
    """Connect to a dependency at start, retrying briefly, then fail with a message naming it."""
    delay = 0.25
    for attempt in range(attempts):
        try:
            return await connect()
        except Exception as exc:
            if attempt == attempts - 1:
                raise ConfigError(f"{what}: not reachable ({exc.__class__.__name__}: {exc})") from None
            log.warning("%s not reachable yet (%s); retrying", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Command:
    """An operator command beside `serve` and `migrate`: `run(settings, args)` returns the exit code."""

    help: str
    run: Callable[[Settings, argparse.Namespace], int]
    needs: tuple[str, ...] = ()
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


def _quiet_on_closed_pipe(run: Callable[[], int]) -> int:
    """Run an operator command whose output may go to a pipe closed early (`... | head -1`): flush its
    output and return its exit code; on BrokenPipeError point stdout at /dev/null (so the interpreter's
    final flush cannot raise again) and return 1, quietly. The recipe of the Python docs' `signal`
    module, "Note on SIGPIPE"."""
    try:
        code = run()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _print_applied(service: str, applied: list[str]) -> int:
    print(f"{service}: applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


async def _frozen_after_startup(app: Awaitable[web.Application]) -> web.Application:
    """The app, set to move what startup left alive (modules, settings, pools: a few hundred thousand
    objects that live as long as the process) out of the garbage collector's reach once it has
    started, so no full collection walks them again: shorter pauses on the paid path (CPython's
    `gc.freeze`, meant for exactly this)."""

    async def freeze(app: web.Application) -> None:
        gc.collect()
        gc.freeze()

    built = await app
    built.on_startup.append(freeze)
    return built


def main(
    service: str,
    build: Callable[[Settings], Awaitable[web.Application]],
    port: Callable[[Settings], int],
    migrations: Path | None = None,
    needs: tuple[str, ...] = ("NATS_URL",),
    commands: dict[str, Command] | None = None,
) -> None:
    """The entry point of every service: `python -m services.<name> [serve|migrate|<command>]`; `--help`
    lists them all. Settings come from the environment, `.env`, then `.run/env` (what `make run` started)."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("serve", help=f"run the {service} service (the default)")
    sub.add_parser("migrate", help="apply this service's pending database migrations and exit")
    for name, command in (commands or {}).items():
        command.arguments(sub.add_parser(name, help=command.help, description=command.help))
    args = parser.parse_args()
    args.command = args.command or "serve"
    try:
        settings = load_settings(run_env=RUN_ENV)
        setup_logging(service, settings.log_level)
        if args.command in (commands or {}):
            command = commands[args.command]
            require(settings, *command.needs)
            sys.exit(_quiet_on_closed_pipe(lambda: command.run(settings, args)))
        if args.command == "migrate":
            require(settings, "DATABASE_URL")
            if migrations is None:
                print(f"{service}: no migrations")
                return
            db_tls = tls.database_context(settings)
            applied = asyncio.run(db.migrate_url(settings.database_url, service, migrations, db_tls))
            sys.exit(_quiet_on_closed_pipe(lambda: _print_applied(service, applied)))
        require(settings, *needs)
        uvloop.install()  # libuv's event loop: markedly less CPU per socket operation on the hot path
        web.run_app(
            _frozen_after_startup(build(settings)),
            host=settings.host,
            port=port(settings),
            shutdown_timeout=float(settings.upstream_timeout),
            access_log=None,
            print=None,
        )
    except (ConfigError, db.MigrationError) as exc:
        print(f"{service}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
