"""Real parts for every test: NATS (JetStream), Postgres, nutshell mints and the stub upstream.

Servers start once per session on free loopback ports (NATS once per node, so streams never leak
between tests); each node gets a fresh database. `make_node` runs the four services in-process
from their app factories, exactly as `python -m services.<name>` would.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import secrets
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.fernet import Fernet

from devstack import processes
from devstack.client_wallet import ClientWallet
from devstack.upstream import create_app as create_upstream
from shared.config import Settings, load_settings
from shared.service import METRICS_URL
from tests.support import natsauth

SERVICES = ("billing", "wallet", "discovery", "gateway")
STOP_WITHIN = 30.0  # seconds a service may take to stop at the end of a test
UPSTREAM_KEY = "stub-upstream-key"
SECRETS_KEY = Fernet.generate_key().decode()  # encrypts the test nodes' seeds, keys and tokens at rest


@pytest.fixture(scope="session")
def postgres() -> Iterator[processes.Service]:
    # Not under pytest's tmp root: pytest resets that to mode 0700, which locks out the postgres user.
    workdir = Path(tempfile.mkdtemp(prefix="routstr-test-pg-"))
    service = processes.start_postgres(workdir)
    yield service
    service.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def mint(tmp_path_factory) -> Iterator[processes.Service]:
    """A mint with no input fees."""
    service = processes.start_mint(tmp_path_factory.mktemp("mint"), input_fee_ppk=0)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def fee_mint(tmp_path_factory) -> Iterator[processes.Service]:
    """A mint charging nutshell's default 100 ppk input fee (NUT-02)."""
    service = processes.start_mint(tmp_path_factory.mktemp("fee-mint"), input_fee_ppk=100)
    yield service
    service.stop()


@pytest.fixture
async def own_postgres():
    """A Postgres of the test's own, with a database `node`, for tests that stop, pause or kill it."""
    workdir = Path(tempfile.mkdtemp(prefix="routstr-test-pg-"))
    service = processes.start_postgres(workdir)
    admin = await asyncpg.connect(service.url)
    await admin.execute('CREATE DATABASE "node"')
    await admin.close()
    yield service
    with contextlib.suppress(ProcessLookupError):  # a test may leave it paused; its session is its process group
        os.killpg(service.process.pid, signal.SIGCONT)
    service.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def nats_server(tmp_path) -> Iterator[processes.Service]:
    """NATS with the bus's users and permissions. `url` carries the unrestricted harness user's
    credentials (for test code); `extra` maps each role to its password (for the services)."""
    harness = secrets.token_urlsafe(16)
    service = processes.start_nats(tmp_path / "nats", processes.nats_passwords(), {natsauth.HARNESS_USER: harness})
    service.url = natsauth.harness_url(service.url, harness)
    yield service
    service.stop()


async def serve_app(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port or processes.free_port())
    await site.start()
    host, bound = runner.addresses[0][:2]
    return runner, f"http://{host}:{bound}"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def upstream() -> AsyncIterator[str]:
    """Base URL (ending in /v1) of the stub OpenAI upstream."""
    runner, url = await serve_app(create_upstream(UPSTREAM_KEY))
    yield f"{url}/v1"
    await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def database(postgres) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    yield postgres.url.rsplit("/", 1)[0] + f"/{name}"
    admin = await asyncpg.connect(postgres.url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@dataclass
class Node:
    """A running node: `url` is the gateway; `ports` maps each service to its base URL."""

    settings: Settings
    urls: dict[str, str] = field(default_factory=dict)
    runners: list[web.AppRunner] = field(default_factory=list)
    names: dict[web.AppRunner, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.urls["gateway"]

    async def stop(self) -> None:
        """Stops each service, the last started first. One whose cleanup hangs fails the test by name
        after STOP_WITHIN s (the others are still stopped) instead of running into pytest's timeout."""
        hung = []
        while self.runners:
            runner = self.runners.pop()
            try:
                async with asyncio.timeout(STOP_WITHIN):
                    await runner.cleanup()
            except TimeoutError:
                hung.append(self.names.get(runner, "?"))
        assert not hung, f"{hung} did not stop within {STOP_WITHIN}s"


def node_env(
    nats: processes.Service | str, database_url: str, upstream_url: str, mint_url: str, **overrides: str
) -> dict:
    """The environment of a node's services; given the NATS service, each connects as its own role."""
    env = {
        "NATS_URL": nats if isinstance(nats, str) else nats.url,
        "DATABASE_URL": database_url,
        "UPSTREAM_BASE_URL": upstream_url,
        "UPSTREAM_API_KEY": UPSTREAM_KEY,
        "CASHU_MINTS": mint_url,
        "RELAYS": "",
        "BTC_USD_RATE": "100000",
        "HOST": "127.0.0.1",
        "METRICS_PORT": "0",
        "LNURL_ALLOW_LOOPBACK": "true",
        "SECRETS_KEY": SECRETS_KEY,  # test LNURL services listen on loopback; tests/test_security.py turns it off
        "LOG_LEVEL": "WARNING",
        "NAME": "Test Node",
        "DESCRIPTION": "A node under test",
    }
    if not isinstance(nats, str):
        env.update(natsauth.password_vars(nats.extra))
    env.update(overrides)
    return env


async def start_node(env: dict, services: tuple[str, ...] = SERVICES) -> Node:
    settings = load_settings(env, dotenv=None)
    node = Node(settings)
    try:
        for name in services:
            module = importlib.import_module(f"services.{name}.app")
            app = await module.create_app(load_settings(natsauth.service_env(env, name), dotenv=None))
            runner, url = await serve_app(app)
            node.runners.append(runner)
            node.names[runner] = name
            node.urls[name] = url
            if METRICS_URL in app:
                node.urls[f"{name}_metrics"] = app[METRICS_URL]
    except BaseException:
        await node.stop()
        raise
    return node


@pytest_asyncio.fixture(loop_scope="session")
async def make_node(nats_server, database, upstream, mint) -> AsyncIterator:
    """`await make_node(services=..., **ENV_OVERRIDES)` starts a node; all are stopped after the test."""
    nodes: list[Node] = []

    async def factory(services: tuple[str, ...] = SERVICES, **overrides: str) -> Node:
        env = node_env(nats_server, database, upstream, mint.url, **overrides)
        node = await start_node(env, services)
        nodes.append(node)
        return node

    yield factory
    for node in reversed(nodes):
        await node.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="session")
def client_wallet(mint) -> ClientWallet:
    return ClientWallet(mint.url)


@pytest.fixture(scope="session")
def fee_client_wallet(fee_mint) -> ClientWallet:
    return ClientWallet(fee_mint.url)


def pytest_collection_modifyitems(items):
    """Every async test shares the session loop, as the session-scoped servers do."""
    marker = pytest.mark.asyncio(loop_scope="session")
    for item in items:
        if asyncio.iscoroutinefunction(getattr(item, "function", None)):
            item.add_marker(marker, append=False)
