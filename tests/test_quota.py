"""Quota grants (RFC 4006 credit control): gateways spend grants of a key's balance locally, billing
settles their usage in batches. What must hold: no overspend across gateways and billing replicas,
a killed gateway's answered calls charged once and its grant back within the validity time, a
refund during load returning everything not spent, a top-up usable at once, a lost grant answer
holding money no longer than the validity time.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
import uuid

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.billing import app as billing_app
from services.billing.grants import _Batch
from services.gateway.quota import Grant
from shared import bus, messaging
from shared.messaging import BusError
from tests.conftest import node_env
from tests.support.cluster import Cluster
from tests.support.keys import funded_key, hash_of, reconcile
from tests.test_gateway import CHAT, auth, sse_events
from tests.test_operations import promtool_check_metrics

# 1 sat per call, nothing per prompt token, 1 sat per 1000 completion tokens. The stub answers exactly
# the asked-for 10 tokens, so every call costs its maximum, 1010 msat: a key holding 100 x 1010 msat
# affords exactly 100 calls, however the reservations and grants fall.
# Load tests from one address: no inbound rate limit.
PRICES = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "0",
          "FIXED_PER_1K_OUTPUT_TOKENS": "1", "RATE_LIMIT_PER_MINUTE": "0"}  # fmt: skip
CALL = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi [[tokens:10]]"}], "max_tokens": 10}
COST = 1010


# ---- grant arithmetic (unit) --------------------------------------------------------------------------------


def test_a_grant_never_holds_more_than_it_was_granted():
    grant = Grant("g", "k", granted=3000, deadline=math.inf)
    assert grant.hold(1010, 0) and grant.hold(1010, 0)
    assert not grant.hold(1010, 0)  # 980 left
    assert grant.available == 980 and grant.in_flight == 2
    assert grant.charge(1010, 700) == 700  # a call cheaper than its hold frees the rest
    assert grant.available == 1290 and grant.used == 700
    assert grant.hold(1010, 0)
    assert grant.used + grant.held + grant.returned + grant.available == grant.granted


def test_a_grant_charges_at_most_what_it_has_and_stops_at_its_deadline():
    grant = Grant("g", "k", granted=2000, deadline=10.0, balance=5000)
    assert grant.hold(1500, 1.0)
    grant.returned = 500  # a recall gave back what no call held
    assert grant.available == 0
    assert grant.charge(1500, 4000) == 1500  # capped at the hold: never more than was granted
    assert grant.available == 0 and grant.remaining_balance == 5000
    grant.returned = 0
    assert not grant.hold(1, 10.0), "a grant past its validity takes no new call"
    grant.active = False
    assert not grant.hold(1, 1.0), "a recalled grant takes no new call"


def test_a_settlement_batch_takes_from_the_hold_then_the_free_balance_and_never_below_zero():
    price = bus.Price(request_msat=1000, completion_msat_per_m=1_000_000)  # 1000 + 1 per token

    def usage(request_id: str, grant_id: str, tokens: int = 10, key: str = "k") -> bus.Usage:
        return bus.Usage(request_id, key, "", "m", 0, tokens, price=price, grant_id=grant_id)

    batch = _Batch({"g": ("k", 2500), "other": ("x", 9999)}, {"k": 1500}, {"done"})
    for event in (usage("a", "g"), usage("b", "g"), usage("a", "g"), usage("done", "g"), usage("c", "gone"),
                  usage("d", "other"), usage("e", "g", key="unknown")):  # fmt: skip
        batch.add(event)
    # a, b: 1010 each from the hold (480 left); c: no grant, 1010 from the free balance (490 left);
    # d: another key's grant is not this key's hold: 490 left; repeats and unknown keys: nothing.
    assert batch.charged == {"a": 1010, "b": 1010, "c": 1010, "d": 490}
    assert batch.from_held == {"g": 2020} and batch.grants["g"] == ("k", 480)
    assert batch.free["k"] == 0 and batch.keys["k"] == [3520, 2020, 4]
    held = sum(amount for key, debit, amount, _ in batch.ledger if key.startswith("settle:"))
    assert held == 2020 and sum(amount for _, _, amount, _ in batch.ledger) == 3520
    capped = batch.settlements[-1]
    assert capped[3:7] == (490, 490, 0, 0), "a capped charge's parts shrink with it"
    failover = _Batch({}, {"k": 10_000}, set())
    failover.add(usage("r", "none"), bus.Price(request_msat=2000))  # the answering route's price
    assert failover.charged == {"r": 2000}


# ---- in-process node -------------------------------------------------------------------------------------------


async def key_state(nats_url: str, key_hash: str) -> bus.KeyInfo:
    nc = await messaging.connect(nats_url, "test-quota")
    try:
        return await messaging.request(nc, bus.BILLING_KEY_INFO, bus.KeyQuery(key_hash), bus.KeyInfo)
    finally:
        await nc.drain()


async def eventually(condition, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached in {timeout:g} s")


async def test_a_lost_grant_answer_holds_money_no_longer_than_the_validity_time(make_node):
    node = await make_node(("billing",), QUOTA_VALIDITY_TIME="2", **PRICES)
    key = await funded_key(node.settings.nats_url, 100_000)
    nc = await messaging.connect(node.settings.nats_url, "test-gateway")
    try:
        ccr = bus.CreditControl(hash_of(key), uuid.uuid4().hex, "vanished-gateway", 1, 60_000, 1010)
        answer = await messaging.request(nc, bus.BILLING_CREDIT_CONTROL, ccr, bus.QuotaAnswer)
        assert answer.granted_msat == 50_000 and answer.balance_msat == 50_000  # half of what is free
        assert answer.validity_time == 2
        repeat = await messaging.request(nc, bus.BILLING_CREDIT_CONTROL, ccr, bus.QuotaAnswer)
        assert repeat.granted_msat == 50_000 and repeat.balance_msat == 50_000, "a repeat moves nothing"
        # The gateway never hears the answer and never comes back: the units return by themselves.
        granted_at = time.monotonic()
        info = await key_state(node.settings.nats_url, hash_of(key))
        assert info.reserved_msat == 50_000 and info.balance_msat == 50_000
        while (info := await key_state(node.settings.nats_url, hash_of(key))).reserved_msat:
            assert time.monotonic() - granted_at < 2 + 2, "grant still held well past its validity time"
            await asyncio.sleep(0.1)
        assert info.balance_msat == 100_000 and info.total_spent_msat == 0
        late = bus.CreditControl(hash_of(key), ccr.grant_id, "vanished-gateway", 2, 10_000, 1010)
        assert (await messaging.request(nc, bus.BILLING_CREDIT_CONTROL, late, bus.QuotaAnswer)).closed
    finally:
        await nc.drain()
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0, result


async def test_renewals_in_one_message_are_each_answered_as_if_sent_alone(make_node):
    node = await make_node(("billing",), **PRICES)
    keys = [await funded_key(node.settings.nats_url, 100_000) for _ in range(2)]
    nc = await messaging.connect(node.settings.nats_url, "test-gateway")
    try:
        grants = []
        for key in keys:
            ccr = bus.CreditControl(hash_of(key), uuid.uuid4().hex, "gw", 1, 60_000, 1010)
            await messaging.request(nc, bus.BILLING_CREDIT_CONTROL, ccr, bus.QuotaAnswer)
            grants.append(ccr.grant_id)
        batch = bus.CreditControls([
            bus.CreditControl(hash_of(keys[0]), grants[0], "gw", 2),  # renew only
            bus.CreditControl(hash_of(keys[1]), grants[1], "gw", 2, returned_msat=20_000),  # renew, give some back
            bus.CreditControl("0" * 64, uuid.uuid4().hex, "gw", 1, 10_000, 1010),  # no such key
        ])  # fmt: skip
        reply = await messaging.request(nc, bus.BILLING_CREDIT_CONTROL, batch, bus.QuotaAnswers)
        renewed, returned, unknown = reply.answers
        assert isinstance(renewed, bus.QuotaAnswer) and renewed.granted_msat == 0 and not renewed.closed
        assert renewed.grant_id == grants[0] and renewed.balance_msat == 50_000
        assert isinstance(returned, bus.QuotaAnswer) and returned.balance_msat == 70_000
        assert isinstance(unknown, bus.Error) and unknown.code == "unknown_key" and unknown.status == 401
        again = await messaging.request(nc, bus.BILLING_CREDIT_CONTROL, batch, bus.QuotaAnswers)
        assert again == reply, "a batch sent again is answered again and moves nothing"
        assert (await key_state(node.settings.nats_url, hash_of(keys[1]))).reserved_msat == 30_000
        too_many = bus.CreditControls([batch.requests[0]] * (bus.MAX_CREDIT_CONTROLS + 1))
        with pytest.raises(BusError) as refused:
            await messaging.request(nc, bus.BILLING_CREDIT_CONTROL, too_many, bus.QuotaAnswers)
        assert refused.value.error.status == 400
    finally:
        await nc.drain()
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0, result


async def test_a_grant_in_use_is_renewed_not_replaced_while_its_validity_time_passes(make_node, http):
    # One call every 0.3 s asks for no more units (a grant holds 64 calls), so nothing but the renewals
    # in maintain's batches keeps the grant alive through 3 validity times of 3 s.
    node = await make_node(("billing", "gateway"), QUOTA_VALIDITY_TIME="3", **PRICES)
    key = await funded_key(node.settings.nats_url, 1_000 * COST)
    calls = 0
    started = time.monotonic()
    while time.monotonic() - started < 9:
        async with http.post(f"{node.url}{CHAT}", json=CALL, headers=auth(key)) as response:
            assert response.status == 200, await response.text()
        calls += 1
        await asyncio.sleep(0.3)
    samples, _ = await scrape(node.urls["gateway_metrics"])
    ok = {labels: value for (name, labels), value in samples.items()
          if name == "routstr_quota_requests_total" and ("outcome", "ok") in labels}  # fmt: skip
    assert ok.get((("outcome", "ok"), ("type", "initial"))) == 1, ok
    assert ok.get((("outcome", "ok"), ("type", "update")), 0) >= 3, ok
    info = await settled(node.settings.nats_url, key, 10)  # idle, the grant goes back
    assert info.total_spent_msat == calls * COST and info.balance_msat == (1_000 - calls) * COST, info


async def test_reconcile_sees_a_settlement_committing_while_it_reads_whole_or_not_at_all(make_node):
    # The interleaving behind a reconcile once off by exactly one call (-1010 msat) right after a
    # call: reconcile read the ledger, a usage batch committed (key debited, revenue row added), then
    # reconcile read the keys. Here the batch's transaction holds billing.keys locked until
    # reconcile has read the ledger and waits for the keys; then it commits.
    node = await make_node(("billing",), **PRICES)
    key = await funded_key(node.settings.nats_url, 10 * COST)
    price = bus.Price(request_msat=1000, completion_msat_per_m=1_000_000)
    batch = _Batch({}, {hash_of(key): 10 * COST}, set())
    batch.add(bus.Usage(uuid.uuid4().hex, hash_of(key), "", "gpt-4o-mini", 0, 10, price=price, grant_id="gone"))
    assert batch.charged and sum(batch.charged.values()) == COST
    writer = await asyncpg.connect(node.settings.database_url)
    watcher = await asyncpg.connect(node.settings.database_url)
    try:
        settlement = writer.transaction()
        await settlement.start()
        await writer.execute("LOCK TABLE billing.keys IN ACCESS EXCLUSIVE MODE")
        await batch.write(writer)
        reading = asyncio.ensure_future(reconcile(node.settings.nats_url))
        # Only reconcile's own read of the keys counts: billing's background loops also wait on the lock.
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%unspent_credit%'"
        )
        for _ in range(1000):
            if await watcher.fetchval(waiting) or reading.done():
                break
            await asyncio.sleep(0.01)
        assert not reading.done(), await reading
        assert await watcher.fetchval(waiting), "reconcile never waited for billing.keys"
        await settlement.commit()
        result = await reading
        assert result.difference_msat == 0, result
        after = await reconcile(node.settings.nats_url)
        assert after.difference_msat == 0 and after.revenue_msat == result.revenue_msat + COST, (result, after)
    finally:
        await writer.close()
        await watcher.close()


async def test_refund_during_load_returns_all_not_spent_and_a_top_up_is_usable_at_once(make_node, http, client_wallet):
    node = await make_node(("billing", "wallet", "gateway"), **PRICES)
    token = await client_wallet.token(300)
    async with http.post(f"{node.url}/v1/balance/create", json={"initial_balance_token": token}) as response:
        key = (await response.json())["api_key"]
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            async with http.post(f"{node.url}{CHAT}", json=CALL, headers=auth(key)) as response:
                await response.read()
                statuses.append(response.status)

    workers = [asyncio.ensure_future(load()) for _ in range(8)]
    await eventually(lambda: statuses.count(200) >= 40)
    for _ in range(20):  # 425 + Retry-After while calls that started before it are still running
        async with http.post(f"{node.url}/v1/balance/refund", headers=auth(key)) as response:
            refund = await response.json()
        if response.status != 425:
            break
        await asyncio.sleep(0.5)
    assert response.status == 200, refund
    await eventually(lambda: statuses[-1] == 402)  # the load runs on until the key is empty
    top = await client_wallet.token(5)
    async with http.post(f"{node.url}/v1/balance/topup", json={"cashu_token": top}, headers=auth(key)) as response:
        assert response.status == 200, await response.text()
    ok_before = statuses.count(200)
    for _ in range(100):  # usable at once: the next calls pass
        if statuses.count(200) > ok_before:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*workers)
    assert set(statuses) <= {200, 402, 425}, set(statuses)
    assert statuses.count(200) > ok_before, "a top-up was not usable at once"
    assert await client_wallet.receive(refund["token"]) == int(refund["sats"])
    info = await key_state(node.settings.nats_url, hash_of(key))
    while info.reserved_msat:
        await asyncio.sleep(0.05)
        info = await key_state(node.settings.nats_url, hash_of(key))
    assert info.total_spent_msat == info.total_requests * COST == statuses.count(200) * COST
    assert int(refund["msats"]) + info.total_spent_msat + info.balance_msat == 305_000
    # Everything not spent before the refund was refunded (dust below a sat aside); what is left is
    # the top-up less the calls made after it.
    assert info.balance_msat + (statuses.count(200) - ok_before) * COST <= 5_000 + 999
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered, result


# ---- real processes --------------------------------------------------------------------------------------------


@pytest.fixture
async def cluster(nats_server, database, upstream, mint, tmp_path):
    running = Cluster(node_env(nats_server, database, upstream, mint.url, **PRICES), tmp_path)
    yield running
    await running.stop()


async def settled(nats_url: str, key: str, timeout: float) -> bus.KeyInfo:
    """The key once nothing on it is held any more (grants back, calls settled), within `timeout` s."""
    deadline = time.monotonic() + timeout
    while (info := await key_state(nats_url, hash_of(key))).reserved_msat:
        assert time.monotonic() < deadline, f"still held after {timeout:g} s: {info}"
        await asyncio.sleep(0.1)
    return info


async def test_a_thousand_calls_through_two_gateways_and_two_billings_run_at_most_what_the_key_affords(
    cluster, nats_server
):
    procs = await cluster.start_all(
        ("billing", "billing-a"), ("billing", "billing-b"), ("wallet", "wallet"),
        ("gateway", "gateway-a"), ("gateway", "gateway-b"),
    )  # fmt: skip
    gateways = procs[3:]
    funded = 100 * COST
    key = await funded_key(nats_server.url, funded)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def call(i: int) -> int:
            async with http.post(f"{gateways[i % 2].url}{CHAT}", json=CALL, headers=auth(key)) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(call(i) for i in range(1000)))
    assert set(statuses) <= {200, 402}, set(statuses)
    ok = statuses.count(200)
    assert 50 <= ok <= 100, ok
    info = await settled(nats_server.url, key, 10)
    assert info.balance_msat >= 0 and info.total_requests == ok, info
    assert info.total_spent_msat == ok * COST and info.balance_msat + info.total_spent_msat == funded, info
    result = await reconcile(nats_server.url)
    assert result.difference_msat == 0 and result.covered, result


async def test_kill_9_of_a_gateway_under_load_charges_every_answered_call_once(cluster, nats_server):
    validity = 3
    cluster.env["QUOTA_VALIDITY_TIME"] = str(validity)
    _, _, doomed, survivor = await cluster.start_all(
        ("billing", "billing"), ("wallet", "wallet"), ("gateway", "gateway-doomed"), ("gateway", "gateway-survivor")
    )
    funded = 1_000 * COST
    key = await funded_key(nats_server.url, funded)
    answered = 0
    failed = 0
    stop = asyncio.Event()
    streamed = {**CALL, "stream": True, "stream_options": {"include_usage": True}}

    async def load(http: aiohttp.ClientSession, i: int) -> None:
        nonlocal answered, failed
        body = streamed if i % 2 else CALL
        while not stop.is_set():
            try:
                async with http.post(f"{doomed.url}{CHAT}", json=body, headers=auth(key)) as response:
                    text = await response.text()
                    whole = not body.get("stream") or sse_events(text)[-1] == "[DONE]"
                    complete = response.status == 200 and whole
            except (aiohttp.ClientError, IndexError):
                complete = False
            if complete:
                answered += 1
            else:
                failed += 1
                await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as http:
        workers = [asyncio.ensure_future(load(http, i)) for i in range(16)]
        await eventually(lambda: answered >= 150)
        doomed.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)
    # The dead gateway's grant comes back within its validity time, unrenewed (plus one sweep, a
    # quarter of it, and the balance queries' own waits for a recall nobody answers, 1 s each).
    info = await settled(nats_server.url, key, validity + 5)
    assert time.monotonic() - killed_at < validity + 5
    assert answered <= info.total_requests <= answered + 16, (answered, failed, info)
    assert info.total_spent_msat == info.total_requests * COST, info
    assert info.balance_msat + info.total_spent_msat == funded, info
    # The survivor serves the key at once.
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{survivor.url}{CHAT}", json=CALL, headers=auth(key)) as response:
            assert response.status == 200, await response.text()
    # Its usage settles from the stream after the answer: charged once, on top of the rest.
    deadline = time.monotonic() + 10
    while (after := await key_state(nats_server.url, hash_of(key))).total_requests == info.total_requests:
        assert time.monotonic() < deadline, f"the survivor's call was not settled: {after}"
        await asyncio.sleep(0.1)
    assert after.total_requests == info.total_requests + 1, after
    assert after.total_spent_msat == after.total_requests * COST, after
    result = await reconcile(nats_server.url)
    assert result.difference_msat == 0 and result.covered, result


# ---- metrics: what operators see of the grants ----------------------------------------------------------------


async def scrape(url: str) -> tuple[dict[tuple, float], bytes]:
    """`url`/metrics as {(sample name, sorted labels): value}, and the raw exposition."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        assert response.status == 200
        raw = await response.read()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(raw.decode())
        for sample in family.samples
    }
    return samples, raw


async def scraped_until(url: str, condition, timeout: float = 15) -> dict[tuple, float]:
    """Scrape `url` until `condition(samples)` holds; fails with the last scrape after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        samples, _ = await scrape(url)
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, {k: v for k, v in samples.items() if "grant" in k[0] or "quota" in k[0]}
        await asyncio.sleep(0.2)


async def test_billing_exports_grants_open_held_recalled_and_expired(make_node, monkeypatch):
    monkeypatch.setattr(billing_app, "GAUGES_EVERY", 0.2)  # the gauges' tick, 10 s in production
    node = await make_node(("billing",), QUOTA_VALIDITY_TIME="2", **PRICES)
    url = node.urls["billing"]
    key = await funded_key(node.settings.nats_url, 100_000)
    nc = await messaging.connect(node.settings.nats_url, "test-gateway")
    try:
        ccr = bus.CreditControl(hash_of(key), uuid.uuid4().hex, "vanished-gateway", 1, 60_000, 1010)
        answer = await messaging.request(nc, bus.BILLING_CREDIT_CONTROL, ccr, bus.QuotaAnswer)
    finally:
        await nc.drain()
    assert answer.granted_msat == 50_000
    held = await scraped_until(url, lambda s: s.get(("routstr_grants_held_msat", ())) == 50_000)
    assert held[("routstr_grants_open", ())] == 1
    assert held[("routstr_grants_expired_total", ())] == 0
    # A balance query calls the grant back; its gateway never answers, so the recall times out...
    await key_state(node.settings.nats_url, hash_of(key))
    samples, raw = await scrape(url)
    assert samples[("routstr_grant_recalls_total", (("outcome", "timeout"),))] == 1
    # ...and the grant expires by itself: counted once, nothing held or open any more.
    expired = await scraped_until(
        url, lambda s: s[("routstr_grants_expired_total", ())] == 1 and s[("routstr_grants_held_msat", ())] == 0
    )
    assert expired[("routstr_grants_open", ())] == 0
    returncode, output = await promtool_check_metrics(raw)
    assert returncode == 0, output
    # A deposit billing began while no wallet answers stays open (its recovery loop ends it later): counted.
    assert expired[("routstr_deposit_intents_open", ())] == 0
    nc = await messaging.connect(node.settings.nats_url, "test-gateway")
    try:
        deposit = bus.Deposit(hash_of(key), "cashuB" + "A" * 64, create=False)
        with pytest.raises(BusError):
            await messaging.request(nc, bus.BILLING_DEPOSIT, deposit, bus.KeyInfo, 10)
    finally:
        await nc.drain()
    pending = await scraped_until(url, lambda s: s[("routstr_deposit_intents_open", ())] == 1)
    assert pending[("routstr_pending_oldest_age_seconds", (("operation", "refund"),))] == 0
    await scraped_until(url, lambda s: s[("routstr_pending_oldest_age_seconds", (("operation", "deposit"),))] > 0)


async def test_a_gateway_exports_its_grants_and_requests_and_billing_counts_its_grant_expired_after_kill_9(
    cluster, nats_server
):
    validity = 4
    cluster.env["QUOTA_VALIDITY_TIME"] = str(validity)
    billing, gateway = await cluster.start_all(("billing", "billing"), ("gateway", "gateway"))
    key = await funded_key(nats_server.url, 1_000 * COST)
    answered = 0
    stop = asyncio.Event()

    async def load(http: aiohttp.ClientSession) -> None:  # keeps the grant in use, so it is not given back idle
        nonlocal answered
        while not stop.is_set():
            try:
                async with http.post(f"{gateway.url}{CHAT}", json=CALL, headers=auth(key)) as response:
                    await response.read()
                    answered += response.status == 200
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)

    active = ("routstr_quota_grants", (("state", "active"),))
    initial_ok = ("routstr_quota_requests_total", (("outcome", "ok"), ("type", "initial")))
    async with aiohttp.ClientSession() as http:
        worker = asyncio.ensure_future(load(http))
        try:
            await eventually(lambda: answered >= 5)
            samples = await scraped_until(gateway.metrics_url, lambda s: s.get(active) == 1)
            assert samples[initial_ok] >= 1, samples
            # One grant's 64 calls, plus the refill a grant asks for once less than a quarter of that is left
            # (quota.GRANT_CALLS; `Quota.hold`): by the time of this scrape the worker may have made ~50 calls.
            assert 0 < samples[("routstr_quota_available_msat", ())] < 64 * COST * 5 // 4, samples
            assert samples[("routstr_quota_grants", (("state", "draining"),))] == 0
            assert not any(name == "routstr_quota_requests_total" and ("outcome", "no_answer") in labels
                           for (name, labels) in samples), samples  # fmt: skip
            _, raw = await scrape(gateway.metrics_url)
            returncode, output = await promtool_check_metrics(raw)
            assert returncode == 0, output
            before, _ = await scrape(billing.metrics_url)
            assert before[("routstr_grants_expired_total", ())] == 0
            gateway.process.send_signal(signal.SIGKILL)  # under load: its grant is never terminated
            killed_at = time.monotonic()
        finally:
            stop.set()
            await worker
    # Unrenewed, the grant expires within its validity time plus one sweep (a quarter of it).
    await scraped_until(billing.metrics_url, lambda s: s[("routstr_grants_expired_total", ())] >= 1, validity + 5)
    assert time.monotonic() - killed_at < validity + 5
    info = await settled(nats_server.url, key, 10)
    assert info.total_spent_msat == info.total_requests * COST, info
    assert info.balance_msat + info.total_spent_msat == 1_000 * COST, info
    result = await reconcile(nats_server.url)
    assert result.difference_msat == 0, result  # (no wallet here: nothing to say whether ecash covers it)
