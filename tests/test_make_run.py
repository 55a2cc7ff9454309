"""`make run`'s orchestrator, end to end: a fresh folder, no configuration, a paid call, then Ctrl-C stops it all."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from devstack.processes import free_port

REPO = Path(__file__).resolve().parents[1]


def _post(url: str, body: dict, headers: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), json.loads(response.read())


def test_make_run_brings_up_a_working_node_and_stops_everything(tmp_path: Path):
    port = free_port()
    unset = {"NATS_URL", "DATABASE_URL", "CASHU_MINTS", "UPSTREAM_BASE_URL"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(PORT=str(port), BILLING_PORT=str(free_port()), WALLET_PORT=str(free_port()),
               DISCOVERY_PORT=str(free_port()), METRICS_PORT=str(free_port()), RELAYS="",
               PYTHONPATH=str(REPO))  # fmt: skip
    # Its own NATS (a user per service) and Postgres (a password), loopback only.
    node = subprocess.Popen([sys.executable, "-m", "devstack"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    output = ""
    try:
        deadline = time.monotonic() + 120
        while "Routstr node is up" not in output:
            line = node.stdout.readline()
            assert line or node.poll() is None, output
            output += line
            assert time.monotonic() < deadline, output
        assert "DEVELOPMENT MODE" in output and "started NATS" in output and "started Postgres" in output
        # Its Postgres wants the password kept under .run/ (SCRAM); without it the door stays shut.
        postgres = re.search(r"started Postgres at (postgresql://\S+)", output).group(1)
        assert ":" not in postgres.split("//", 1)[1].split("@", 1)[0]  # the password is not printed
        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(asyncpg.connect(postgres, timeout=10))
        token = subprocess.run([sys.executable, "-m", "devstack.token", "50"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        assert token.startswith("cashuB")
        status, headers, body = _post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
            {"X-Cashu": token, "Content-Type": "application/json"},
        )
        assert status == 200 and body["choices"][0]["message"]["content"]
        assert headers["X-Cashu"].startswith("cashu")
        # Operator commands beside it find its NATS and Postgres through .run/env, without being told.
        bare = {k: v for k, v in env.items() if k != "NATS_URL"}
        assert (tmp_path / ".run" / "env").stat().st_mode & 0o077 == 0
        reconciled = subprocess.run([sys.executable, "-m", "services.billing", "reconcile"], cwd=tmp_path, env=bare,
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
        assert reconciled.returncode == 0, reconciled.stderr
        assert json.loads(reconciled.stdout)["difference_msat"] == 0
        issued = subprocess.run([sys.executable, "-m", "services.billing", "admin-token", "--name", "ops"],
                                cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert issued.returncode == 0 and issued.stdout.startswith("rsa_"), issued.stderr
        # Operator commands need the operator's NATS credentials, kept under .run/; without them, no key.
        nats_url = re.search(r"started NATS \(JetStream, a user per service\) at (nats://\S+);", output).group(1)
        passwords = json.loads((tmp_path / ".run" / "nats" / "credentials.json").read_text())
        create = [sys.executable, "-m", "services.billing", "create-key", "--msat", "1000"]
        operator = {**env, "NATS_URL": nats_url, "NATS_USER": "operator", "NATS_PASSWORD": passwords["operator"]}
        made = subprocess.run(create, cwd=tmp_path, env=operator, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and made.stdout.startswith("sk-"), made.stderr
        as_gateway = {**operator, "NATS_USER": "gateway", "NATS_PASSWORD": passwords["gateway"]}
        refused = subprocess.run(create, cwd=tmp_path, env=as_gateway, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "sk-" not in refused.stdout
    finally:
        node.send_signal(signal.SIGINT)
        rest, _ = node.communicate(timeout=60)
        output += rest
    assert node.returncode == 0, output
    assert not (tmp_path / ".run" / "env").exists()
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / ".run")], capture_output=True, text=True).stdout.split()
    running = subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(leftovers)], capture_output=True, text=True)
    assert not leftovers, f"processes left running: {running.stdout}"


def test_every_service_lists_its_commands():
    expected = {
        "billing": ("serve", "migrate", "create-key", "reconcile", "admin-token"),
        "gateway": ("serve", "openapi"),
        "wallet": ("serve", "migrate"),
        "discovery": ("serve", "migrate"),
    }
    shown = {service: subprocess.Popen([sys.executable, "-m", f"services.{service}", "--help"], cwd=REPO,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for service in expected}  # fmt: skip
    for service, commands in expected.items():
        out, err = shown[service].communicate(timeout=60)
        assert shown[service].returncode == 0, err
        for command in commands:
            assert command in out, (service, command)
