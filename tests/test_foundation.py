"""The foundation: configuration, migrations, the bus contract, and start-up failures that say what is wrong."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from devstack.processes import free_port
from shared import bus, db
from shared.config import SETTINGS_DOC, ConfigError, load_settings
from shared.service import wait_event
from tests.conftest import SECRETS_KEY


def test_defaults_load_and_every_variable_is_documented():
    settings = load_settings({}, dotenv=None)
    assert settings.port == 8000 and settings.cors_origins == ("*",) and settings.fixed_pricing is False
    for name in SETTINGS_DOC:
        assert hasattr(settings, name.lower()), name


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"FIXED_PRICING": "maybe"}, "FIXED_PRICING"),
        ({"FIXED_COST_PER_REQUEST": "-1"}, "FIXED_COST_PER_REQUEST"),
        ({"RELAYS": "https://relay.example"}, "RELAYS"),
        ({"CASHU_MINTS": "mint.example"}, "CASHU_MINTS"),
        ({"UPSTREAM_BASE_URL": "ftp://x"}, "UPSTREAM_BASE_URL"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"MODELS_PATH": "/no/such/models.json"}, "MODELS_PATH"),
        ({"BTC_USD_RATE": "0"}, "BTC_USD_RATE"),
    ],
)
def test_bad_values_name_the_variable(env, names):
    with pytest.raises(ConfigError, match=names):
        load_settings(env, dotenv=None)


def test_dotenv_is_read_and_environment_wins(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nNAME='From File'\nPORT=9000\nexport DESCRIPTION=desc\n")
    settings = load_settings({"PORT": "9001"}, dotenv=dotenv)
    assert (settings.name, settings.port, settings.description) == ("From File", 9001, "desc")


def test_mint_urls_are_normalised():
    settings = load_settings({"CASHU_MINTS": "https://a.example/, https://b.example/Bitcoin/"}, dotenv=None)
    assert settings.cashu_mints == ("https://a.example", "https://b.example/Bitcoin")


def test_every_bus_message_round_trips():
    messages = [
        bus.Error("unknown_key", "no such key", 401),
        bus.Reserve("h", "r", "m", 10, None),
        bus.Usage("r", "h", "res", "m", 1, 2),
        bus.Redeemed("t", "http://mint", 1000, 0, 1000),
        bus.Catalog((), "100000", True, "rev"),
    ]
    for message in messages:
        assert bus.decode(bus.encode(message)) == message


async def test_migrations_apply_once_under_concurrency_and_refuse_edits(database, tmp_path: Path):
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "001_init.sql").write_text("CREATE SCHEMA demo; CREATE TABLE demo.t (id int PRIMARY KEY);")
    (folder / "002_more.sql").write_text("ALTER TABLE demo.t ADD COLUMN name text;")
    results = await asyncio.gather(*(db.migrate_url(database, "demo", folder) for _ in range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, 2]
    conn = await asyncpg.connect(database)
    rows = await conn.fetch("SELECT version, checksum FROM public.schema_migrations WHERE service = 'demo'")
    await conn.close()
    assert [r["version"] for r in sorted(rows, key=lambda r: r["version"])] == [1, 2]
    assert all(len(r["checksum"]) == 64 for r in rows)

    (folder / "002_more.sql").write_text("ALTER TABLE demo.t ADD COLUMN other text;")
    with pytest.raises(db.MigrationError, match="was changed"):
        await db.migrate_url(database, "demo", folder)
    (folder / "002_more.sql").unlink()
    with pytest.raises(db.MigrationError, match="does not know"):
        await db.migrate_url(database, "demo", folder)


def _run_service(name: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"services.{name}"], env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_bad_configuration_exits_with_a_named_error():
    result = _run_service("gateway", {"PORT": "eighty", "NATS_URL": "nats://127.0.0.1:1"})
    assert result.returncode == 2
    assert "PORT: expected a whole number" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_required_variable_is_named():
    result = _run_service("gateway", {"NATS_URL": "nats://127.0.0.1:4"})
    assert result.returncode == 2 and "UPSTREAM_BASE_URL" in result.stderr


def test_unreachable_nats_at_start_fails_clearly():
    env = {"NATS_URL": f"nats://127.0.0.1:{free_port()}", "UPSTREAM_BASE_URL": "http://127.0.0.1:1/v1",
           "PORT": str(free_port())}  # fmt: skip
    result = _run_service("gateway", env)
    assert result.returncode == 2
    assert "NATS_URL: not reachable" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_postgres_at_start_fails_clearly(nats_server):
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x",
           "BILLING_PORT": str(free_port()), "SECRETS_KEY": SECRETS_KEY}  # fmt: skip
    result = _run_service("billing", env)
    assert result.returncode == 2
    assert "DATABASE_URL: not reachable" in result.stderr and "Traceback" not in result.stderr


def test_command_writing_to_a_closed_pipe_exits_quietly():
    # `python -m services.gateway openapi | head -1`: the document (>100 KiB) outgrows the pipe's buffer,
    # so the reader closing early makes the command's writes fail with EPIPE.
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "openapi"], env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout.read(1) == b"{"
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_secrets_are_scrubbed_from_log_lines():
    import logging

    from shared.logs import JsonFormatter

    secret_token = "cashuBo2FteCJodHRwOi8vMTI3LjAuMC4xOjMzMzM4YXVjc2F0"
    secret_key = "sk-" + "ab" * 32
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "got %s and %s and Bearer xyz", None, None)
    record.args = (secret_token, secret_key)
    line = JsonFormatter("gateway").format(record)
    assert secret_token[8:] not in line and secret_key[8:] not in line and "xyz" not in line
    assert '"service": "gateway"' in line and "[redacted]" in line


async def test_a_background_loops_pause_ends_on_cancel_even_as_its_event_is_set():
    # Every service loop pauses with wait_event and is stopped by cancelling it. Built on 3.11's
    # asyncio.wait_for, the cancel below was swallowed (CPython gh-86296): discovery's catalog loop, woken by
    # a catalog change as its service stopped, ran on and the stop hung.
    event = asyncio.Event()
    waiting = asyncio.ensure_future(wait_event(event, 60))
    await asyncio.sleep(0)  # it is waiting now
    event.set()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await wait_event(event, 0.01) is True
    assert await wait_event(asyncio.Event(), 0.01) is False
