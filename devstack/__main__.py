"""`make run`: the whole node on one machine.

Starts NATS (JetStream) and Postgres on free ports unless NATS_URL / DATABASE_URL point at existing
ones, a dev mint when no CASHU_MINTS and a demo upstream when neither UPSTREAM_BASE_URL nor
PROVIDERS_PATH names a provider (each announced by a loud banner), applies migrations, starts the
four services and supervises them (a service that dies is restarted with back-off, logged) until
Ctrl-C, then stops everything it started.

Development parts never stand beside real money: the dev mint keeps its port across runs (recorded in
.run/mint/port) so tokens the node issued stay redeemable; the demo upstream is only sold for the dev
mint's ecash (a real CASHU_MINTS without an upstream or providers refuses to start); and with a real
CASHU_MINTS the embedded Postgres is durable (no fsync=off).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from cryptography.fernet import Fernet

from devstack import processes
from devstack.supervisor import Supervisor
from shared import bus
from shared.config import RUN_ENV, ConfigError, load_settings

RUN_DIR = Path(".run")
SERVICES = ("billing", "wallet", "discovery", "gateway")


def banner(text: str) -> None:
    line = "!" * 78
    print(f"\n{line}\n!!  DEVELOPMENT MODE: {text}\n{line}\n", flush=True)


async def _ensure_database(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def _wait_ready(url: str, children: dict[str, subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in children.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} during start-up (see .run/{name}.log)")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:g}s")


def _kept_secret(path: Path, make) -> str:
    """The secret in `path`, made by `make()` and written 0600 the first time."""
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(make())
    return path.read_text().strip()


def _nats_credentials(folder: Path) -> dict[str, str]:
    """Each bus role's password, made once and kept in `folder/credentials.json` (0600), so a restarted
    `make run` keeps them; operator commands find the `operator` user's in `.run/env`."""
    path = folder / "credentials.json"
    if path.exists():
        kept = json.loads(path.read_text())
        if set(kept) >= set(bus.ROLES):
            return kept
    folder.mkdir(parents=True, exist_ok=True)
    passwords = processes.nats_passwords()
    path.touch(mode=0o600)
    path.write_text(json.dumps(passwords, indent=2))
    return passwords


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}"))


def _start_dev_mint(workdir: Path) -> processes.Service:
    """The dev mint on the port it had last time (.run/mint/port), so the URL in its tokens stays valid."""
    port_file = workdir / "port"
    port = int(port_file.read_text()) if port_file.is_file() else None
    for _ in range(50):  # an earlier run's mint may still be letting go of it
        if port is None or processes.port_free(port):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(
            f"the dev mint's port {port} (recorded in {port_file}) is taken by another program;"
            " tokens this node issued name that URL: free the port, or delete the file to move"
        )
    mint = processes.start_mint(workdir, port=port)
    port_file.write_text(mint.url.rsplit(":", 1)[1])
    return mint


def main() -> int:
    import asyncio

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if settings.cashu_mints and not settings.upstream_base_url and not settings.providers_path:
        print(
            "configuration error: UPSTREAM_BASE_URL (or PROVIDERS_PATH) is required when CASHU_MINTS is set: the"
            " demo upstream's canned answers are only sold for the dev mint's worthless ecash",
            file=sys.stderr,
        )
        return 2
    RUN_DIR.mkdir(exist_ok=True)
    started: list[processes.Service] = []
    supervisor = Supervisor(out=sys.stdout)
    env = dict(os.environ)
    env.setdefault("HOST", "127.0.0.1")  # a development node listens on loopback only
    if not settings.secrets_key:
        env["SECRETS_KEY"] = _kept_secret(RUN_DIR / "secrets.key", lambda: Fernet.generate_key().decode())
        print(f"secrets at rest are encrypted with the key in {RUN_DIR}/secrets.key (SECRETS_KEY)")
    passwords: dict[str, str] = {}
    try:
        if not settings.nats_url:
            passwords = _nats_credentials(RUN_DIR / "nats")
            nats = processes.start_nats(RUN_DIR / "nats", passwords)
            started.append(nats)
            env["NATS_URL"] = nats.url
            print(f"started NATS (JetStream, a user per service) at {nats.url}; credentials in {RUN_DIR}/nats/")
        if not settings.database_url:
            postgres = processes.start_postgres(
                RUN_DIR / "postgres", with_password=True, durable=bool(settings.cashu_mints)
            )
            started.append(postgres)
            env["DATABASE_URL"] = asyncio.run(_ensure_database(postgres.url, "routstr"))
            print(f"started Postgres at {_without_password(env['DATABASE_URL'])} (password in {RUN_DIR}/postgres/)")
        if not settings.cashu_mints:
            mint = _start_dev_mint(RUN_DIR / "mint")
            started.append(mint)
            env["CASHU_MINTS"] = mint.url
            banner(f"no CASHU_MINTS set: a local FakeWallet mint at {mint.url} (its ecash is worthless)")
        if not settings.upstream_base_url and not settings.providers_path:
            port = processes.free_port()
            upstream = [sys.executable, "-m", "devstack.upstream", "--port", str(port), "--api-key", "demo"]
            supervisor.start("upstream", upstream, dict(os.environ), RUN_DIR / "upstream.log")
            env["UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
            env["UPSTREAM_API_KEY"] = "demo"
            env.setdefault("FIXED_PRICING", "true")
            banner(f"no UPSTREAM_BASE_URL set: a demo upstream that answers w0 w1 w2 … at {env['UPSTREAM_BASE_URL']}")
        for service in ("billing", "wallet", "discovery"):
            subprocess.run([sys.executable, "-m", f"services.{service}", "migrate"], env=env, check=True)
        for service in SERVICES:
            own = {**env, "NATS_USER": service, "NATS_PASSWORD": passwords[service]} if passwords else env
            supervisor.start(service, [sys.executable, "-m", f"services.{service}"], own, RUN_DIR / f"{service}.log")
        (RUN_DIR / "state.json").write_text(json.dumps({"mints": env["CASHU_MINTS"].split(",")}))
        # Operator commands (`python -m services.billing reconcile`, …) read this to find what was started.
        RUN_ENV.touch(mode=0o600)
        # They run as the bus's `operator` user (the services' own NATS_USER/NATS_PASSWORD override it).
        operator = {"NATS_USER": "operator", "NATS_PASSWORD": passwords["operator"]} if passwords else {}
        shared = {name: env[name] for name in ("NATS_URL", "DATABASE_URL")} | operator
        RUN_ENV.write_text("".join(f"{name}={value}\n" for name, value in shared.items()))
        gateway = f"http://127.0.0.1:{settings.port}"
        for port in (settings.billing_port, settings.wallet_port, settings.discovery_port, settings.port):
            _wait_ready(f"http://127.0.0.1:{port}/readyz", supervisor.processes())  # "up": every service answers
        print(f"\nRoutstr node is up. Gateway: {gateway}  (logs in {RUN_DIR}/; Ctrl-C stops everything)")
        upstream = env.get("UPSTREAM_BASE_URL") or f"the providers in {settings.providers_path}"
        print(f"  mints: {env['CASHU_MINTS']}\n  upstream: {upstream}")
        if not settings.cashu_mints:
            print("  a dev token: .venv/bin/python -m devstack.token 100\n", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        # Ctrl-C stops the node even when started as a background job of a script (which ignores SIGINT).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        while True:  # like an orchestrator: a service that dies is started again, with back-off
            supervisor.tick()
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nstopping…")
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"make run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop()
        for service in reversed(started):
            service.stop()
        RUN_ENV.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
