"""`make bench`: the gateway's added latency and its throughput, against a direct call to the same upstream.

One run starts NATS, Postgres, the stub upstream and the node's services as separate processes (as in
production) and funds `sk-` keys, one per concurrent client: real traffic spreads over many keys, and
one key's calls serialize on its row lock, the price of never overspending. It then measures in turn
the stub called directly and the same request through the gateway: an open-loop run at a fixed rate
(latency p50/p99) and a closed-loop run at fixed concurrency (throughput). It prints the figures and
the ratios, and writes them to `.run/bench.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import uvloop
from cryptography.fernet import Fernet

from devstack import processes
from shared import bus, messaging

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi [[tokens:16]]"}], "max_tokens": 32}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _open_loop(session, url: str, headers: list[dict], rate: int, seconds: float) -> dict:
    """Send at a fixed rate whatever the answers do (no coordinated omission); latency per request."""
    latencies: list[float] = []
    errors = 0
    data = json.dumps(BODY).encode()

    async def one(headers: dict) -> None:
        nonlocal errors
        start = time.perf_counter()
        try:
            async with session.post(url, data=data, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    return
        except aiohttp.ClientError:
            errors += 1
            return
        latencies.append(time.perf_counter() - start)

    tasks = []
    begin = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        delay = begin + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(headers[i % len(headers)])))
    await asyncio.gather(*tasks)
    ms = [x * 1000 for x in latencies]
    return {"sent": total, "errors": errors, "p50_ms": _percentile(ms, 0.5), "p99_ms": _percentile(ms, 0.99),
            "mean_ms": statistics.fmean(ms)}  # fmt: skip


async def _closed_loop(session, url: str, headers: list[dict], concurrency: int, seconds: float) -> dict:
    done = errors = 0
    data = json.dumps(BODY).encode()
    deadline = time.perf_counter() + seconds

    async def worker(headers: dict) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            async with session.post(url, data=data, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    done += 1
                else:
                    errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(headers[i % len(headers)]) for i in range(concurrency)))
    return {"requests": done, "errors": errors, "rps": done / (time.perf_counter() - start)}


async def _fund(nats_url: str, password: str, count: int) -> list[str]:
    keys = ["sk-" + secrets.token_hex(32) for _ in range(count)]
    nc = await messaging.connect(nats_url, "bench", user="operator", password=password)
    for key in keys:
        key_hash = hashlib.sha256(key.encode()).hexdigest()
        create = bus.CreateKey(key_hash, 10**15, "bench-" + key_hash)
        await messaging.request(nc, bus.BILLING_CREATE_KEY, create, bus.KeyInfo)
    await nc.drain()
    return keys


async def _measure(direct: str, gateway: str, keys: list[str], rate: int, seconds: float, concurrency: int) -> dict:
    upstream_headers = [{"Authorization": "Bearer bench", "Content-Type": "application/json"}]
    gateway_headers = [{"Authorization": f"Bearer {key}", "Content-Type": "application/json"} for key in keys]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for url, headers in ((direct, upstream_headers), (gateway, gateway_headers)):  # warm up both paths
            await _open_loop(session, url, headers, min(rate, 200), 1)
        results = {
            "direct_latency": await _open_loop(session, direct, upstream_headers, rate, seconds),
            "gateway_latency": await _open_loop(session, gateway, gateway_headers, rate, seconds),
            "direct_throughput": await _closed_loop(session, direct, upstream_headers, concurrency, seconds),
            "gateway_throughput": await _closed_loop(session, gateway, gateway_headers, concurrency, seconds),
        }
    d, g = results["direct_latency"], results["gateway_latency"]
    results["added_p50_ms"] = g["p50_ms"] - d["p50_ms"]
    results["added_p99_ms"] = g["p99_ms"] - d["p99_ms"]
    results["latency_ratio_p50"] = g["p50_ms"] / d["p50_ms"]
    results["throughput_ratio"] = results["gateway_throughput"]["rps"] / results["direct_throughput"]["rps"]
    return results


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def main() -> int:
    parser = argparse.ArgumentParser(description="Gateway overhead benchmark")
    parser.add_argument("--rate", type=int, default=500, help="requests per second in the latency runs")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    uvloop.install()  # the load generator should not be the bottleneck of either path
    work = Path(tempfile.mkdtemp(prefix="routstr-bench-"))
    nats = processes.start_nats(work / "nats", processes.nats_passwords())
    postgres = processes.start_postgres(work / "postgres")
    children: list[subprocess.Popen] = []
    try:
        upstream_port, gateway_port = processes.free_port(), processes.free_port()
        children.append(subprocess.Popen(
            [sys.executable, "-m", "devstack.upstream", "--port", str(upstream_port), "--api-key", "bench"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        env = {
            **os.environ, "NATS_URL": nats.url, "DATABASE_URL": postgres.url, "HOST": "127.0.0.1",
            "UPSTREAM_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1", "UPSTREAM_API_KEY": "bench",
            "PORT": str(gateway_port), "BILLING_PORT": str(processes.free_port()), "FIXED_PRICING": "true",
            "CASHU_MINTS": "http://127.0.0.1:1", "RELAYS": "", "LOG_LEVEL": "WARNING",
            "SECRETS_KEY": Fernet.generate_key().decode(), "METRICS_PORT": str(processes.free_port()),
        }  # fmt: skip
        for service in ("billing", "gateway"):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", f"services.{service}"],
                    env={**env, "NATS_PASSWORD": nats.extra[service]},
                    stdout=subprocess.DEVNULL,
                    stderr=(work / f"{service}.log").open("wb"),
                )
            )
            _wait_http(f"http://127.0.0.1:{env['BILLING_PORT' if service == 'billing' else 'PORT']}/readyz")
        keys = asyncio.run(_fund(nats.url, nats.extra["operator"], args.concurrency))
        results = asyncio.run(_measure(
            f"http://127.0.0.1:{upstream_port}/v1/chat/completions",
            f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
            keys, args.rate, args.seconds, args.concurrency,
        ))  # fmt: skip
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
        nats.stop()
        postgres.stop()
    results["settings"] = {"rate": args.rate, "seconds": args.seconds, "concurrency": args.concurrency,
                           "cpus": os.cpu_count()}  # fmt: skip
    Path(".run").mkdir(exist_ok=True)
    Path(".run/bench.json").write_text(json.dumps(results, indent=2))
    d, g = results["direct_latency"], results["gateway_latency"]
    print(
        f"latency at {args.rate} req/s  direct p50 {d['p50_ms']:.2f} ms p99 {d['p99_ms']:.2f} ms | "
        f"gateway p50 {g['p50_ms']:.2f} ms p99 {g['p99_ms']:.2f} ms (errors {g['errors']})"
    )
    print(
        f"added by the gateway: p50 {results['added_p50_ms']:.2f} ms, p99 {results['added_p99_ms']:.2f} ms "
        f"(p50 ratio {results['latency_ratio_p50']:.2f}x)"
    )
    print(
        f"throughput at concurrency {args.concurrency}: direct {results['direct_throughput']['rps']:.0f} req/s, "
        f"gateway {results['gateway_throughput']['rps']:.0f} req/s (ratio {results['throughput_ratio']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
