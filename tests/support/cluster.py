"""Run the node's services as real subprocesses (`python -m services.<name>`), as production does.

In-process nodes (`make_node`) cannot show what only a process boundary shows: SIGTERM handling,
a replica dying while another carries on, several replicas sharing NATS and Postgres. Each process
gets every port variable set to a free port of its own, so any number of replicas of a service can run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from devstack.processes import free_port
from tests.support import natsauth

ROOT = Path(__file__).resolve().parents[2]
PORT_VARS = {"gateway": "PORT", "billing": "BILLING_PORT", "wallet": "WALLET_PORT", "discovery": "DISCOVERY_PORT"}
METRICS_PORT = "METRICS_PORT"  # the gateway's /metrics, apart from its public port


@dataclass
class Proc:
    """One service process: `url` is its HTTP base (the API for the gateway, ops endpoints for the others)."""

    name: str
    service: str
    url: str
    process: subprocess.Popen
    log_path: Path
    metrics_url: str = ""

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes sends on a rolling update."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float = 30) -> int:
        for _ in range(int(timeout * 20)):
            if self.process.poll() is not None:
                return self.process.returncode
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} did not exit within {timeout:g}s\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """Starts service processes with a shared base environment; `stop()` ends every one it started."""

    def __init__(self, env: dict[str, str], workdir: Path):
        self.env = env
        self.workdir = workdir
        self.procs: list[Proc] = []

    def spawn(self, service: str, name: str | None = None, **overrides: str) -> Proc:
        name = name or service
        ports = {var: str(free_port()) for var in (*PORT_VARS.values(), METRICS_PORT)}
        env = {**os.environ, **self.env, **ports, **overrides}
        env = natsauth.service_env(env, service)
        log_path = self.workdir / f"{name}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], cwd=ROOT, env=env,
            stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{env[PORT_VARS[service]]}"
        metrics = f"http://127.0.0.1:{env[METRICS_PORT]}" if service == "gateway" else url
        proc = Proc(name, service, url, process, log_path, metrics)
        self.procs.append(proc)
        return proc

    async def start(self, service: str, name: str | None = None, **overrides: str) -> Proc:
        proc = self.spawn(service, name, **overrides)
        await wait_ready(proc)
        return proc

    async def start_all(self, *specs: tuple[str, str]) -> list[Proc]:
        """(service, name) pairs started together, returned once every one is ready."""
        procs = [self.spawn(service, name) for service, name in specs]
        await asyncio.gather(*(wait_ready(proc) for proc in procs))
        return procs

    async def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                await proc.wait_exit(20)
            except AssertionError:
                proc.process.kill()
                proc.process.wait()


async def ready_status(url: str) -> int | None:
    """/readyz status on a fresh connection, None when nothing listens."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            async with session.get(f"{url}/readyz") as response:
                return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_ready(proc: Proc, timeout: float = 60) -> None:
    for _ in range(int(timeout * 10)):
        if proc.process.poll() is not None:
            raise AssertionError(f"{proc.name} exited with {proc.process.returncode}\n{proc.log()}")
        if await ready_status(proc.url) == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{proc.name} not ready after {timeout:g}s\n{proc.log()}")
