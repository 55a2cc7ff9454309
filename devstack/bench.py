"""`make bench`: what the node adds over a bare reverse proxy, in one run against the same stub upstream.

One run starts NATS, Postgres, the stub upstream, a bare aiohttp reverse proxy (no auth, no billing:
`devstack.bare_proxy`) and the node's billing and two gateways as separate processes (as in
production), funds one `sk-` key shared by every connection and 1,000 keys, and measures in turn:

- latency at a fixed rate, open loop (no coordinated omission): the stub directly, the bare proxy, the
  node with one key and with 1,000 keys; p50 / p99 and what the node adds over the bare proxy;
- throughput at fixed concurrency, closed loop, non-streamed and streamed: the same four targets;
- a key's first call, which waits for a quota grant (100 keys never used before);
- two gateways against one (1,000 keys, non-streamed), with how busy the machine's cores were, then
  again with each gateway limited to `--gateway-cpus` cores (a cgroup CPU quota, as a Kubernetes CPU
  limit; measured where the cgroup cpu controller is writable);
- billing's settlement rate: usage events drained from the stream per second by one replica;
- the gateway's resident memory before and after 10,000 streamed calls.

Each run is preceded by a warm-up that calls every key once, so it measures the steady state. Every
process shares this machine's cores with the load generator, so figures are noisy. It prints a
table with the ratios and writes everything to `.run/bench.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import uuid
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import uvloop
from cryptography.fernet import Fernet

from devstack import processes
from shared import bus, messaging

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi [[tokens:16]]"}], "max_tokens": 32}
STREAM = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
KEYS = 1000
COLD_KEYS, COLD_RATE = 100, 50  # keys never used before, called once each at this rate (req/s)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _open_loop(session, url: str, headers: list[dict], rate: int, seconds: float) -> dict:
    """Send at a fixed rate whatever the answers do; latency per request, in ms."""
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
            "mean_ms": statistics.fmean(ms) if ms else float("nan")}  # fmt: skip


async def _closed_loop(
    session, urls: list[str], headers: list[dict], concurrency: int, seconds: float, body: dict, limit: int = 0
) -> dict:
    """`concurrency` clients, each sending its next call when the last one answered; `limit` stops early."""
    done = errors = 0
    data = json.dumps(body).encode()
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done, errors
        url, calls = urls[i % len(urls)], i
        while time.perf_counter() < deadline and not (limit and done + errors >= limit):
            h, calls = headers[calls % len(headers)], calls + concurrency  # the workers take the keys in turn
            async with session.post(url, data=data, headers=h) as response:
                await response.read()
                if response.status == 200:
                    done += 1
                else:
                    errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"requests": done, "errors": errors, "rps": done / (time.perf_counter() - start)}


async def _fund(nats_url: str, count: int) -> list[str]:
    keys = ["sk-" + secrets.token_hex(32) for _ in range(count)]
    nc = await messaging.connect(nats_url, "bench")
    for key in keys:
        key_hash = hashlib.sha256(key.encode()).hexdigest()
        create = bus.CreateKey(key_hash, 10**15, "bench-" + key_hash)
        await messaging.request(nc, bus.BILLING_CREATE_KEY, create, bus.KeyInfo)
    await nc.drain()
    return keys


def _usage(key_hash: str, price: bus.Price) -> bus.Usage:
    return bus.Usage(
        request_id=uuid.uuid4().hex, key_hash=key_hash, reservation_id="", model="gpt-4o-mini", prompt_tokens=10,
        completion_tokens=16, ts=time.time(), price=price, grant_id="bench",
    )  # fmt: skip


async def _settle_rate(nats_url: str, keys: list[str], events: int, batch: int = 100) -> dict:
    """Publish `events` usage events (as gateways do, `batch` per message) and time billing draining them."""
    hashes = [hashlib.sha256(key.encode()).hexdigest() for key in keys]
    price = bus.Price(request_msat=1000, completion_msat_per_m=1_000_000)
    nc = await messaging.connect(nats_url, "bench")
    js = nc.jetstream()
    start = time.perf_counter()
    for first in range(0, events, batch):
        usage = tuple(_usage(hashes[(first + i) % len(hashes)], price) for i in range(min(batch, events - first)))
        await js.publish(bus.USAGE_SUBJECT, bus.encode(bus.UsageBatch(usage)))
    while True:
        info = await js.consumer_info(bus.USAGE_STREAM, bus.USAGE_CONSUMER)
        if info.num_pending + info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    await nc.drain()
    return {"events": events, "seconds": elapsed, "events_per_s": events / elapsed}


def _cpu_ticks() -> tuple[int, int]:
    """(busy, all) jiffies of every core since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) `pids` have used since they started."""
    ticks = sum(sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
                for pid in pids)  # fmt: skip
    return ticks / os.sysconf("SC_CLK_TCK")


async def _cpu_measured(pids: list[int], run: Awaitable[dict]) -> dict:
    """`run`'s result (a closed loop's) with `cpu_busy`, the share of all cores' time spent busy while it
    ran (a run near 100 % is bound by the cores, not by the node), and `gateway_cpu_us_per_call`, the CPU
    time `pids` used per request, in us."""
    start, start_used = _cpu_ticks(), _cpu_seconds(pids)
    result = await run
    end, used = _cpu_ticks(), _cpu_seconds(pids) - start_used
    result["cpu_busy"] = (end[0] - start[0]) / max(end[1] - start[1], 1)
    result["gateway_cpu_us_per_call"] = used * 1e6 / max(result["requests"], 1)
    return result


@contextlib.contextmanager
def _cpu_limited(pids: list[int], cores: float):
    """Each of `pids` in its own cgroup whose CPU time is capped at `cores` (a CFS quota, what a Kubernetes
    CPU limit sets), for the block: `with _cpu_limited(pids, 0.25) as limited:`. `limited` is False, and
    nothing is changed, where this machine has no writable cgroup cpu controller (v1 or v2; needs root)."""
    period = 10_000  # us: short, so a throttled gateway pauses for a few milliseconds, not most of 100 ms
    quota = max(int(cores * period), 1000)
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    groups: list[Path] = []
    try:
        for pid in pids:
            if (v1 / "cpu.cfs_quota_us").exists():
                groups.append(group := v1 / f"routstr-bench-{pid}")
                group.mkdir(exist_ok=True)
                (group / "cpu.cfs_period_us").write_text(str(period))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                if "cpu" not in (v2 / "cgroup.controllers").read_text().split():
                    raise OSError("no cpu controller in cgroup v2")
                (v2 / "cgroup.subtree_control").write_text("+cpu")
                groups.append(group := v2 / f"routstr-bench-{pid}")
                group.mkdir(exist_ok=True)
                (group / "cpu.max").write_text(f"{quota} {period}")
            (group / "cgroup.procs").write_text(str(pid))
        limited = True
    except OSError:
        limited = False
    try:
        yield limited
    finally:
        for group in groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    (group.parent / "cgroup.procs").write_text(pid)
                group.rmdir()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _measure(urls: dict, keys: list[str], args, gateway_pids: list[int], nats_url: str) -> dict:
    one_key = [{"Authorization": f"Bearer {keys[0]}", "Content-Type": "application/json"}]
    many = [{"Authorization": f"Bearer {key}", "Content-Type": "application/json"} for key in keys[1 : KEYS + 1]]
    cold = [{"Authorization": f"Bearer {key}", "Content-Type": "application/json"} for key in keys[KEYS + 1 :]]
    bare = [{"Authorization": "Bearer bench", "Content-Type": "application/json"}]
    targets = {
        "direct": ([urls["direct"]], bare), "bare proxy": ([urls["bare"]], bare),
        "node, one key": ([urls["gateway"]], one_key), "node, 1,000 keys": ([urls["gateway"]], many),
    }  # fmt: skip
    results: dict = {"latency": {}, "throughput": {}, "streamed": {}}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def warm(target: list[str], headers: list[dict]) -> None:
            """Calls right before a run (every key once, then a second more), so it measures the steady
            state (pools open, every key's grant held) rather than what the previous runs left: a key idle
            for longer than QUOTA_VALIDITY_TIME x 0.4 has given its grant back, and its next call waits for
            a new one (the `cold key` figure)."""
            await _closed_loop(session, target, headers, args.concurrency, 60, BODY, limit=len(headers))
            await _closed_loop(session, target, headers, args.concurrency, 1, BODY)

        for name, (target, headers) in targets.items():
            await warm(target, headers)
            results["latency"][name] = await _open_loop(session, target[0], headers, args.rate, args.seconds)
        for name, (target, headers) in targets.items():
            await warm(target, headers)
            results["throughput"][name] = await _cpu_measured(
                gateway_pids[:1], _closed_loop(session, target, headers, args.concurrency, args.seconds, BODY)
            )
            results["streamed"][name] = await _closed_loop(session, target, headers, args.concurrency,
                                                           args.seconds, STREAM)  # fmt: skip
        # A key's first call on a gateway waits for a grant (a Credit-Control-Request round trip to billing).
        results["cold_key"] = await _open_loop(session, urls["gateway"], cold, COLD_RATE, len(cold) / COLD_RATE)
        both = [urls["gateway"], urls["gateway2"]]
        await warm(both, many)
        results["two_gateways"] = await _cpu_measured(
            gateway_pids, _closed_loop(session, both, many, args.concurrency, args.seconds, BODY)
        )
        # The same comparison with each gateway held to `--gateway-cpus` cores, as a Kubernetes CPU limit
        # holds a pod: then the gateways, not the cores the load generator, stub, NATS, billing and Postgres
        # share, bound the throughput, and two serve twice one unless something in the node serialises them.
        with _cpu_limited(gateway_pids, args.gateway_cpus) as limited:
            if limited:
                results["limited"] = {"cores_per_gateway": args.gateway_cpus}
                runs = [(f"{gateways}, {keys_name}", target, headers)
                        for keys_name, headers in (("1,000 keys", many), ("one key", one_key))
                        for gateways, target in (("one", [urls["gateway"]]), ("two", both))]  # fmt: skip
                for name, target, headers in runs:
                    await warm(target, headers)
                    results["limited"][name] = await _cpu_measured(
                        gateway_pids, _closed_loop(session, target, headers, args.concurrency, args.seconds, BODY)
                    )
        results["settlement"] = await _settle_rate(nats_url, keys, args.settle_events)
        await _closed_loop(session, [urls["gateway"]], many, args.concurrency, 60, STREAM, limit=1000)
        before = _rss_kb(gateway_pids[0])
        streams = await _closed_loop(session, [urls["gateway"]], many, args.concurrency, 600, STREAM,
                                     limit=args.streams)  # fmt: skip
        after = _rss_kb(gateway_pids[0])
        results["memory"] = {"streams": streams["requests"], "rss_before_kb": before, "rss_after_kb": after,
                             "growth": after / before - 1}  # fmt: skip
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


def _report(results: dict, args) -> str:
    lat, thr, st = results["latency"], results["throughput"], results["streamed"]
    bare_lat, bare_thr, bare_st = lat["bare proxy"], thr["bare proxy"]["rps"], st["bare proxy"]["rps"]
    lines = [
        f"| | closed loop, {args.concurrency} connections | streamed | at {args.rate} req/s: p50 / p99 "
        "| added over the bare proxy: p50 / p99 |",
        "|---|---|---|---|---|",
    ]
    for name in lat:
        t, s, la = thr[name]["rps"], st[name]["rps"], lat[name]
        added = "" if name in ("direct", "bare proxy") else (
            f"{la['p50_ms'] - bare_lat['p50_ms']:+.2f} / {la['p99_ms'] - bare_lat['p99_ms']:+.2f} ms")  # fmt: skip
        ratio = "" if name in ("direct", "bare proxy") else f" ({t / bare_thr:.0%})"
        sratio = "" if name in ("direct", "bare proxy") else f" ({s / bare_st:.0%})"
        lines.append(f"| {name} | {t:,.0f} req/s{ratio} | {s:,.0f} req/s{sratio} | "
                     f"{la['p50_ms']:.2f} / {la['p99_ms']:.2f} ms | {added} |")  # fmt: skip
    two, one = results["two_gateways"]["rps"], thr["node, 1,000 keys"]["rps"]
    memory, settle, cold = results["memory"], results["settlement"], results["cold_key"]
    lines += [
        "",
        f"two gateways: {two:,.0f} req/s against one gateway's {one:,.0f} req/s ({two / one:.2f}x); "
        f"the machine's {results['settings']['cpus']} cores were {results['two_gateways']['cpu_busy']:.0%} busy "
        f"with two and {thr['node, 1,000 keys']['cpu_busy']:.0%} with one; gateway CPU per call "
        f"{results['two_gateways']['gateway_cpu_us_per_call']:.0f} us with two, "
        f"{thr['node, 1,000 keys']['gateway_cpu_us_per_call']:.0f} us with one",
        _limited(results.get("limited")),
        f"a key's first call (waits for its grant): {cold['p50_ms']:.2f} / {cold['p99_ms']:.2f} ms p50 / p99",
        f"billing settles {settle['events_per_s']:,.0f} usage events/s (one replica, {settle['events']:,} events)",
        f"gateway RSS over {memory['streams']:,} streams: {memory['rss_before_kb'] / 1024:.1f} MiB -> "
        f"{memory['rss_after_kb'] / 1024:.1f} MiB ({memory['growth']:+.1%})",
    ]
    return "\n".join(lines)


def _limited(limited: dict | None) -> str:
    if not limited:
        return "two gateways, each CPU-limited: not measured (no writable cgroup cpu controller; needs root)"
    lines = []
    for keys in ("1,000 keys", "one key"):
        one, two = limited[f"one, {keys}"], limited[f"two, {keys}"]
        lines.append(
            f"two gateways, each limited to {limited['cores_per_gateway']} CPU, {keys}: {two['rps']:,.0f} req/s "
            f"against one's {one['rps']:,.0f} req/s ({two['rps'] / one['rps']:.2f}x); the cores were "
            f"{two['cpu_busy']:.0%} busy with two and {one['cpu_busy']:.0%} with one; gateway CPU per call "
            f"{two['gateway_cpu_us_per_call']:.0f} us with two, {one['gateway_cpu_us_per_call']:.0f} us with one"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="What the node adds over a bare reverse proxy")
    parser.add_argument("--rate", type=int, default=500, help="requests per second in the latency runs")
    parser.add_argument("--seconds", type=float, default=5, help="length of each latency and throughput run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--settle-events", type=int, default=20_000, help="usage events in the settlement run")
    parser.add_argument(
        "--gateway-cpus",
        type=float,
        default=0.25,
        help="cores each gateway may use in the CPU-limited run of two gateways against one",
    )
    parser.add_argument("--streams", type=int, default=10_000, help="streamed calls in the memory run")
    args = parser.parse_args()
    uvloop.install()  # the load generator should not be the bottleneck of either path
    work = Path(tempfile.mkdtemp(prefix="routstr-bench-"))
    # The services connect as their own bus users; the load generator as an unrestricted `bench` user.
    bench_password = secrets.token_urlsafe(16)
    nats = processes.start_nats(work / "nats", processes.nats_passwords(), {"bench": bench_password})
    bench_url = nats.url.replace("nats://", f"nats://bench:{bench_password}@", 1)
    postgres = processes.start_postgres(work / "postgres")
    children: list[subprocess.Popen] = []
    try:
        upstream_port, bare_port = processes.free_port(), processes.free_port()
        gateway_ports = [processes.free_port(), processes.free_port()]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        children.append(subprocess.Popen(
            [sys.executable, "-m", "devstack.upstream", "--port", str(upstream_port), "--api-key", "bench"], **quiet
        ))  # fmt: skip
        upstream = f"http://127.0.0.1:{upstream_port}/v1"
        children.append(subprocess.Popen(
            [sys.executable, "-m", "devstack.bare_proxy", "--port", str(bare_port), "--upstream", upstream], **quiet
        ))  # fmt: skip
        env = {
            **os.environ, "NATS_URL": nats.url, "DATABASE_URL": postgres.url, "HOST": "127.0.0.1",
            "UPSTREAM_BASE_URL": upstream, "UPSTREAM_API_KEY": "bench", "FIXED_PRICING": "true",
            "BILLING_PORT": str(processes.free_port()), "CASHU_MINTS": "http://127.0.0.1:1", "RELAYS": "",
            "LOG_LEVEL": "WARNING", "RATE_LIMIT_PER_MINUTE": "0", "RATE_LIMIT_PER_KEY_PER_MINUTE": "0",
            "SECRETS_KEY": Fernet.generate_key().decode(),
        }  # fmt: skip
        services = [("billing", int(env["BILLING_PORT"]))] + [("gateway", port) for port in gateway_ports]
        for index, (service, port) in enumerate(services):
            children.append(subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"],
                env={**env, "PORT": str(port), "METRICS_PORT": str(processes.free_port()),
                     "NATS_USER": service, "NATS_PASSWORD": nats.extra[service]},
                stdout=subprocess.DEVNULL, stderr=(work / f"{service}-{index}.log").open("wb"),
            ))  # fmt: skip
            _wait_http(f"http://127.0.0.1:{port}/readyz")
        _wait_http(f"http://127.0.0.1:{bare_port}/v1/models")
        keys = asyncio.run(_fund(bench_url, 1 + KEYS + COLD_KEYS))
        urls = {
            "direct": f"{upstream}/chat/completions", "bare": f"http://127.0.0.1:{bare_port}/v1/chat/completions",
            "gateway": f"http://127.0.0.1:{gateway_ports[0]}/v1/chat/completions",
            "gateway2": f"http://127.0.0.1:{gateway_ports[1]}/v1/chat/completions",
        }  # fmt: skip
        results = asyncio.run(_measure(urls, keys, args, [children[-2].pid, children[-1].pid], bench_url))
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
    print(_report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
