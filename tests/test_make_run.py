"""`make run`'s orchestrator, end to end: a fresh folder, no configuration, a paid call, then Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from devstack.processes import free_port, kept_port

REPO = Path(__file__).resolve().parents[1]


def _post(url: str, body: dict, headers: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), json.loads(response.read())


def test_make_run_brings_up_a_working_node_and_stops_everything(tmp_path: Path, nats_server):
    port = free_port()
    unset = {"NATS_URL", "DATABASE_URL", "CASHU_MINTS", "UPSTREAM_BASE_URL"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(PORT=str(port), BILLING_PORT=str(free_port()), WALLET_PORT=str(free_port()),
               DISCOVERY_PORT=str(free_port()), RELAYS="", HOST="127.0.0.1", PYTHONPATH=str(REPO))  # fmt: skip
    # External NATS (the test's) and embedded Postgres: both modes in one run.
    env["NATS_URL"] = nats_server.url
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
        assert "DEVELOPMENT MODE" in output and "started NATS" not in output and "started Postgres" in output
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
    finally:
        os.killpg(node.pid, signal.SIGINT)  # as Ctrl-C at a terminal: to the whole foreground process group
        rest, _ = node.communicate(timeout=60)
        output += rest
    assert node.returncode == 0, output
    # The services stopped cleanly: NATS and Postgres outlived them instead of dying under their drain.
    for log in (tmp_path / ".run").glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), f"{log.name}:\n{log.read_text()[-3000:]}"
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


def test_the_dev_mint_keeps_its_port_across_runs(tmp_path: Path):
    """The dev mint's URL is in every proof and token, so `make run` reuses its port while it is free."""
    saved = tmp_path / "mint" / "port"
    first = kept_port(saved)
    assert saved.read_text() == str(first)
    assert kept_port(saved) == first
    with socket.socket() as busy:  # the saved port taken by something else: a new one, saved in its place
        busy.bind(("127.0.0.1", first))
        busy.listen()
        other = kept_port(saved)
    assert other != first
    assert saved.read_text() == str(other)
