"""`make run`: the whole node on one machine.

Starts NATS (JetStream) and Postgres on free ports unless NATS_URL / DATABASE_URL point at existing
ones, a dev mint when no CASHU_MINTS and a demo upstream when neither UPSTREAM_BASE_URL nor
PROVIDERS_PATH names a provider (each announced by a loud banner), applies migrations, starts the
four services and waits for Ctrl-C, then stops everything it started.
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

import asyncpg

from devstack import processes
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


def main() -> int:
    import asyncio

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    RUN_DIR.mkdir(exist_ok=True)
    started: list[processes.Service] = []
    children: dict[str, subprocess.Popen] = {}
    env = dict(os.environ)
    try:
        if not settings.nats_url:
            nats = processes.start_nats(RUN_DIR / "nats")
            started.append(nats)
            env["NATS_URL"] = nats.url
            print(f"started NATS (JetStream) at {nats.url}")
        if not settings.database_url:
            postgres = processes.start_postgres(RUN_DIR / "postgres")
            started.append(postgres)
            env["DATABASE_URL"] = asyncio.run(_ensure_database(postgres.url, "routstr"))
            print(f"started Postgres at {env['DATABASE_URL']}")
        if not settings.cashu_mints:
            mint = processes.start_mint(RUN_DIR / "mint", port=processes.kept_port(RUN_DIR / "mint" / "port"))
            started.append(mint)
            env["CASHU_MINTS"] = mint.url
            banner(f"no CASHU_MINTS set: a local FakeWallet mint at {mint.url} (its ecash is worthless)")
        if not settings.upstream_base_url and not settings.providers_path:
            port = processes.free_port()
            log = (RUN_DIR / "upstream.log").open("wb")
            children["upstream"] = subprocess.Popen(
                [sys.executable, "-m", "devstack.upstream", "--port", str(port), "--api-key", "demo"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            env["UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
            env["UPSTREAM_API_KEY"] = "demo"
            env.setdefault("FIXED_PRICING", "true")
            banner(f"no UPSTREAM_BASE_URL set: a demo upstream that answers w0 w1 w2 … at {env['UPSTREAM_BASE_URL']}")
        for service in ("billing", "wallet", "discovery"):
            subprocess.run([sys.executable, "-m", f"services.{service}", "migrate"], env=env, check=True)
        for service in SERVICES:
            log = (RUN_DIR / f"{service}.log").open("ab")
            children[service] = subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        (RUN_DIR / "state.json").write_text(json.dumps({"mints": env["CASHU_MINTS"].split(",")}))
        # Operator commands (`python -m services.billing reconcile`, …) read this to find what was started.
        RUN_ENV.touch(mode=0o600)
        RUN_ENV.write_text("".join(f"{name}={env[name]}\n" for name in ("NATS_URL", "DATABASE_URL")))
        gateway = f"http://127.0.0.1:{settings.port}"
        for port in (settings.billing_port, settings.wallet_port, settings.discovery_port, settings.port):
            _wait_ready(f"http://127.0.0.1:{port}/readyz", children)  # "up" means every service answers
        print(f"\nRoutstr node is up. Gateway: {gateway}  (logs in {RUN_DIR}/; Ctrl-C stops everything)")
        upstream = env.get("UPSTREAM_BASE_URL") or f"the providers in {settings.providers_path}"
        print(f"  mints: {env['CASHU_MINTS']}\n  upstream: {upstream}")
        if not settings.cashu_mints:
            print("  a dev token: .venv/bin/python -m devstack.token 100\n", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        # Ctrl-C stops the node even when started as a background job of a script (which ignores SIGINT).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        while all(proc.poll() is None for proc in children.values()):
            time.sleep(0.5)
        dead = [name for name, proc in children.items() if proc.poll() is not None]
        print(f"{', '.join(dead)} stopped; shutting the node down (see {RUN_DIR}/*.log)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping…")
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"make run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(children.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for service in reversed(started):
            service.stop()
        RUN_ENV.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
