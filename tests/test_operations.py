"""Operations, with the services as real processes: a real Prometheus scrapes them, replicas get SIGTERM
mid-call, and several replicas share one NATS and one Postgres. Money must add up in every case.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from devstack.processes import free_port
from shared import bus, messaging
from tests.conftest import node_env
from tests.support.cluster import Cluster, Proc, ready_status
from tests.support.keys import funded_key, reconcile
from tests.test_gateway import CHAT, auth, settled_balance, sse_events

ROOT = Path(__file__).resolve().parents[1]
PRICES = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "1",
          "FIXED_PER_1K_OUTPUT_TOKENS": "1"}  # fmt: skip
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def chat(content: str, **extra) -> dict:
    return {**HELLO, "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
async def cluster(nats_server, database, upstream, mint, tmp_path):
    """Services as subprocesses against this test's NATS and database; all stopped after the test."""
    running = Cluster(node_env(nats_server.url, database, upstream, mint.url, **PRICES), tmp_path)
    yield running
    await running.stop()


async def post(http: aiohttp.ClientSession, gateway: Proc, body: dict, headers: dict) -> tuple[int, dict, dict]:
    async with http.post(f"{gateway.url}{CHAT}", json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


async def assert_reconciled(nats_url: str) -> None:
    result = await reconcile(nats_url)
    assert result.difference_msat == 0, result
    assert result.covered, result


# ---- 1. a real Prometheus scrapes the node; the dashboard and the alerts evaluate -----------------------------


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "deploy/grafana/routstr-node.json").read_text())
    exprs: list[str] = []

    def walk(panels: list) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            exprs.extend(target["expr"] for target in panel.get("targets", []) if target.get("expr"))

    walk(dashboard["panels"])
    return exprs


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as Grafana would fill them: every namespace, a 1m rate window."""
    expr = re.sub(r"\$\{?namespace\}?", ".*", expr)
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "1m", expr)
    assert "$" not in expr, f"unhandled Grafana variable in {expr}"
    return expr


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


# Panels and alerts about traffic and money: after paid traffic each must return data, not just evaluate.
MONEY_AND_TRAFFIC = (
    "routstr_http_requests_total", "routstr_charged_msat_total", "routstr_credited_msat_total",
    "routstr_refunded_msat_total", "routstr_balances_owed_msat", "routstr_revenue_msat", "routstr_payments_total",
    "routstr_settlements_total", "routstr_usage_events_published_total",
)  # fmt: skip


def spawn_prometheus(targets: list[str], workdir: Path) -> tuple[subprocess.Popen, str]:
    """Prometheus on a free loopback port, scraping `targets` every second and loading the node's alerts."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    workdir.mkdir()
    shutil.copy(ROOT / "deploy/prometheus/alerts.yaml", workdir / "alerts.yaml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yaml"],
        "scrape_configs": [{"job_name": "routstr", "static_configs": [{"targets": targets}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(workdir / "prometheus.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


async def wait_prometheus(http: aiohttp.ClientSession, process: subprocess.Popen, url: str) -> None:
    for _ in range(300):
        assert process.poll() is None, f"prometheus exited with {process.returncode}"
        try:
            async with http.get(f"{url}/-/ready") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("prometheus not ready after 30s")


async def promtool_check_metrics(exposition: bytes) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        shutil.which("promtool") or "/usr/bin/promtool", "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(exposition), 30)
    return process.returncode, output.decode()


async def query(http: aiohttp.ClientSession, prometheus: str, expr: str) -> list:
    async with http.get(f"{prometheus}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert response.status == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


async def paid_traffic(http, gateway: Proc, nats_url: str, client_wallet) -> None:
    """sk- calls (one failing upstream), a stream, an X-Cashu call with change, a deposit and a refund."""
    key = await funded_key(nats_url, 1_000_000)
    for content in ("hi [[tokens:4]]", "hi [[tokens:8]]", "[[fail:500]]"):
        await post(http, gateway, chat(content), auth(key))
    body = chat("[[tokens:5]]", stream=True, stream_options={"include_usage": True})
    async with http.post(f"{gateway.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 200 and sse_events(await response.text())[-1] == "[DONE]"
    status, _, headers = await post(http, gateway, HELLO, {"X-Cashu": await client_wallet.token(20)})
    assert status == 200 and await client_wallet.receive(headers["X-Cashu"]) > 0
    token = await client_wallet.token(30)
    async with http.post(f"{gateway.url}/v1/balance/create", json={"initial_balance_token": token}) as response:
        created = await response.json()
    assert response.status == 200, created
    async with http.post(f"{gateway.url}/v1/balance/refund", headers=auth(created["api_key"])) as response:
        assert response.status == 200, await response.text()
        assert await client_wallet.receive((await response.json())["token"]) == 30


async def test_prometheus_scrapes_the_node_and_every_dashboard_and_alert_query_works(
    cluster, http, nats_server, client_wallet, tmp_path
):
    billing, wallet, discovery, gateway = await cluster.start_all(
        ("billing", "billing"), ("wallet", "wallet"), ("discovery", "discovery"), ("gateway", "gateway")
    )
    targets = [proc.url.removeprefix("http://") for proc in (billing, wallet, discovery, gateway)]
    prom_process, prometheus = spawn_prometheus(targets, tmp_path / "prometheus")
    try:
        await wait_prometheus(http, prom_process, prometheus)
        # Every service's exposition passes promtool's checks (format and naming lint).
        for proc in (billing, wallet, discovery, gateway):
            async with http.get(f"{proc.url}/metrics") as response:
                text = await response.read()
            returncode, output = await promtool_check_metrics(text)
            assert returncode == 0, (proc.name, output)

        await asyncio.sleep(1.5)  # a scrape before the traffic, so counters have a "before"
        await paid_traffic(http, gateway, nats_server.url, client_wallet)

        # Raw counters and gauges reflect the traffic once scraped (billing refreshes its gauges every 10 s).
        wanted = {
            'sum(routstr_http_requests_total{route="/v1/chat/completions"})': 5,
            "sum(routstr_charged_msat_total)": 1,
            "sum(routstr_credited_msat_total)": 30_000,
            "sum(routstr_refunded_msat_total)": 30_000,
            "sum(routstr_balances_owed_msat)": 1,
            'sum(up{job="routstr"})': 4,
        }
        seen: dict[str, float] = {}
        for _ in range(60):
            for expr in wanted:
                result = await query(http, prometheus, expr)
                seen[expr] = float(result[0]["value"][1]) if result else 0.0
            if all(seen[expr] >= minimum for expr, minimum in wanted.items()):
                break
            await asyncio.sleep(0.5)
        assert all(seen[expr] >= minimum for expr, minimum in wanted.items()), seen

        panels = [grafana_to_promql(expr) for expr in dashboard_exprs()]
        assert len(panels) > 20
        empty = []
        for expr in panels:
            result = await query(http, prometheus, expr)  # evaluates without error
            if any(name in expr for name in MONEY_AND_TRAFFIC) and not result:
                empty.append(expr)
        assert not empty, f"money/traffic panels with no data after paid traffic: {empty}"
        for expr in alert_exprs():
            await query(http, prometheus, expr)  # conditions: evaluating without error is the point

        # Prometheus itself loaded and evaluated every alert rule without error.
        async with http.get(f"{prometheus}/api/v1/rules") as response:
            groups = (await response.json())["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == len(alert_exprs())
        assert all(rule["health"] == "ok" for rule in rules), rules
    finally:
        prom_process.terminate()
        prom_process.wait(10)


# ---- 2. rolling restarts lose nothing and bill nothing twice ------------------------------------------------


async def test_sigterm_to_a_gateway_mid_stream_finishes_the_stream_and_bills_it_once(cluster, http, nats_server):
    _, _, old = await cluster.start_all(("billing", "billing"), ("wallet", "wallet"), ("gateway", "gateway-old"))
    new = await cluster.start("gateway", "gateway-new")  # the rolling update's surge replica
    key = await funded_key(nats_server.url, 100_000)
    body = chat("[[tokens:6]] [[slow:3]]", stream=True, stream_options={"include_usage": True}, max_tokens=50)
    loop = asyncio.get_running_loop()
    async with http.post(f"{old.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 200
        first = await response.content.readuntil(b"\n\n")
        old.terminate()
        signalled = loop.time()
        while await ready_status(old.url) == 200:
            assert loop.time() - signalled < 1, "the gateway still reports ready after SIGTERM"
            await asyncio.sleep(0.05)
        assert old.process.poll() is None, "the gateway exited with a stream in flight"
        rest = await response.read()
    events = sse_events((first + rest).decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    assert text == "".join(f"w{i} " for i in range(6))
    cost = chunks[-1]["usage"]["cost"]["total_msats"]
    assert await old.wait_exit(15) == 0
    assert "Traceback" not in old.log(), old.log()

    info = await settled_balance(http, new, key)
    assert info["total_requests"] == 1 and info["total_spent"] == cost
    assert info["balance"] + info["total_spent"] == 100_000
    await assert_reconciled(nats_server.url)


async def pending_usage(nats_url: str, expected: int, timeout: float = 5) -> int:
    """Usage events not yet acked by billing, once that reaches `expected` (or when `timeout` runs out)."""
    nc = await messaging.connect(nats_url, "test-ops")
    try:
        for _ in range(int(timeout * 10)):
            info = await nc.jetstream().consumer_info(bus.USAGE_STREAM, bus.USAGE_CONSUMER)
            pending = info.num_pending + info.num_ack_pending
            if pending == expected:
                break
            await asyncio.sleep(0.1)
        return pending
    finally:
        await nc.drain()


async def test_usage_piled_up_while_billing_was_down_is_settled_once_by_its_successors(cluster, http, nats_server):
    billing, _, gateway = await cluster.start_all(("billing", "billing-1"), ("wallet", "wallet"),
                                                  ("gateway", "gateway"))  # fmt: skip
    key = await funded_key(nats_server.url, 100_000)
    body = chat("hi [[tokens:5]] [[slow:4]]")
    status, probe, _ = await post(http, gateway, body, auth(key))
    assert status == 200
    cost = probe["usage"]["cost"]["total_msats"]
    # Its stream copy is consumed too (a no-op, already settled): billing's consumer is alive.
    assert await pending_usage(nats_server.url, 0) == 0, billing.log()

    # Five calls are reserved while billing is up; billing is stopped before the upstream answers them.
    calls = [asyncio.ensure_future(post(http, gateway, body, auth(key))) for _ in range(5)]
    await asyncio.sleep(1)
    async with http.get(f"{gateway.url}/v1/balance/info", headers=auth(key)) as response:
        assert (await response.json())["reserved"] > 0
    billing.terminate()
    assert await billing.wait_exit(10) == 0
    assert not any(call.done() for call in calls), "billing took longer to stop than the calls took"
    results = await asyncio.gather(*calls)
    assert [status for status, _, _ in results] == [200] * 5
    # Priced at the gateway against its quota grant, so the cost shows although billing is down;
    # settled later, from the stream (the five may share messages: group commit).
    assert all(body["usage"]["cost"]["total_msats"] == cost for _, body, _ in results)
    assert 1 <= await pending_usage(nats_server.url, 5, timeout=0.1) <= 5

    # Two new replicas share the backlog, and one of them is stopped again at once, with events possibly
    # still pending or half-settled: every event is settled all the same, and none twice.
    second, _ = await cluster.start_all(("billing", "billing-2"), ("billing", "billing-3"))
    second.terminate()
    assert await second.wait_exit(10) == 0
    info = await settled_balance(http, gateway, key)
    assert info["total_requests"] == 6 and info["total_spent"] == 6 * cost, info
    assert info["balance"] + info["total_spent"] == 100_000
    assert await pending_usage(nats_server.url, 0) == 0
    await assert_reconciled(nats_server.url)


# ---- 3. replicas of everything, one NATS, one Postgres --------------------------------------------------------


async def test_concurrent_spends_through_two_gateways_and_two_billings_never_overspend(cluster, http, nats_server):
    procs = await cluster.start_all(
        ("billing", "billing-a"), ("billing", "billing-b"), ("wallet", "wallet"),
        ("gateway", "gateway-a"), ("gateway", "gateway-b"),
    )  # fmt: skip
    gateways = procs[3:]
    # Each call reserves 1 sat + prompt + 10 completion tokens (~1.1 sat): the key affords about twenty.
    funded = 20 * 1100
    key = await funded_key(nats_server.url, funded)

    async def call(i: int) -> int:
        async with http.post(f"{gateways[i % 2].url}{CHAT}", json=HELLO, headers=auth(key)) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(call(i) for i in range(60)))
    for billing in procs[:2]:  # both replicas took part
        async with http.get(f"{billing.url}/metrics") as response:
            assert re.search(r"^routstr_settlements_total\{[^}]*\} [1-9]", await response.text(), re.M), billing.name
    ok = statuses.count(200)
    assert set(statuses) <= {200, 402}, statuses
    assert 10 <= ok <= 22, statuses
    for gateway in gateways:
        info = await settled_balance(http, gateway, key)
        assert info["balance"] >= 0 and info["total_requests"] == ok, info
        assert info["balance"] + info["total_spent"] == funded, info
    await assert_reconciled(nats_server.url)
