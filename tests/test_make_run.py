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
from tests.support.faults import process_tree

REPO = Path(__file__).resolve().parents[1]


def _post(url: str, body: dict, headers: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), json.loads(response.read())


def _read_until(node: subprocess.Popen, text: str, output: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while text not in output:
        line = node.stdout.readline()
        assert line or node.poll() is None, output
        output += line
        assert time.monotonic() < deadline, output
    return output


def _child(node: subprocess.Popen, service: str) -> int:
    """The pid of `make run`'s child running `service` (only processes this test started)."""
    for pid in process_tree(node.pid)[1:]:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"services.{service}".encode() in args:
            return pid
    raise AssertionError(f"no {service} child of make run")


def _mints(output: str) -> str:
    return output.split("  mints: ", 1)[1].split("\n", 1)[0]


def _chat(port: int, token: str) -> tuple[int, dict, dict]:
    return _post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
        {"X-Cashu": token, "Content-Type": "application/json"},
    )


def test_make_run_refuses_the_demo_upstream_for_real_ecash(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("UPSTREAM_BASE_URL", "PROVIDERS_PATH")}
    env.update(CASHU_MINTS="https://mint.example.com", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "devstack"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2 and "UPSTREAM_BASE_URL (or PROVIDERS_PATH) is required when CASHU_MINTS" in done.stderr
    assert not (tmp_path / ".run").exists()  # nothing was started


def test_make_run_brings_up_a_working_node_and_stops_everything(tmp_path: Path):
    port = free_port()
    unset = {"NATS_URL", "DATABASE_URL", "CASHU_MINTS", "UPSTREAM_BASE_URL"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(PORT=str(port), BILLING_PORT=str(free_port()), WALLET_PORT=str(free_port()),
               DISCOVERY_PORT=str(free_port()), METRICS_PORT=str(free_port()), RELAYS="",
               PYTHONPATH=str(REPO))  # fmt: skip
    # Its own NATS (a user per service) and Postgres (a password), loopback only.
    # Started as a script's background job is: SIGINT ignored (inherited), which must not keep Ctrl-C from working.
    node = subprocess.Popen([sys.executable, "-m", "devstack"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
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
        change = headers["X-Cashu"]
        assert change.startswith("cashu")

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

        # kill -9 of a service is not an outage: the supervisor restarts it, and paid calls work again.
        os.kill(_child(node, "gateway"), signal.SIGKILL)
        output = _read_until(node, "[supervisor] gateway restarted", output, timeout=30)
        assert "gateway exited with -9" in output
        for _ in range(100):
            try:
                status, headers, _ = _chat(port, change)
                break
            except OSError:  # not listening again yet
                time.sleep(0.2)
        assert status == 200
        change = headers["X-Cashu"]
    finally:
        os.killpg(node.pid, signal.SIGINT)  # as Ctrl-C at a terminal: to the whole foreground process group
        rest, _ = node.communicate(timeout=60)
        output += rest
    assert node.returncode == 0, output
    # The services stopped cleanly: NATS and Postgres outlived them instead of dying under their drain.
    for log in (tmp_path / ".run").glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), f"{log.name}:\n{log.read_text()[-3000:]}"
    assert not (tmp_path / ".run" / "env").exists()
    first_mints = _mints(output)

    # A second run in the same folder: the dev mint keeps its URL, so the change the node gave out is still
    # ecash at a mint that exists, and pays for a call.
    again = subprocess.Popen([sys.executable, "-m", "devstack"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    second = ""
    try:
        second = _read_until(again, "  upstream: ", second)
        assert _mints(second) == first_mints
        status, _, _ = _chat(port, change)
        assert status == 200
    finally:
        again.send_signal(signal.SIGINT)
        rest, _ = again.communicate(timeout=60)
        second += rest
    assert again.returncode == 0, second
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
