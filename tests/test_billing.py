"""Billing through its bus subjects: reservations, exactly-once settlement, the sweeper, pricing, keys, refunds.

Most keys are funded with the operator subject (no ecash needed); the tests at the end run the real
wallet service and mint for deposits and refunds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import sys
import time
import uuid

import asyncpg
import pytest

from devstack.processes import free_port
from services.billing import catalog
from shared import bus
from shared.messaging import BusError, connect, request

# 1 sat per call, 0.5 sat per 1k prompt tokens, 1.5 sat per 1k completion tokens.
FIXED = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "2", "FIXED_PER_1K_INPUT_TOKENS": "0.5",
         "FIXED_PER_1K_OUTPUT_TOKENS": "1.5"}  # fmt: skip
PER_CALL = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "0",
            "FIXED_PER_1K_OUTPUT_TOKENS": "0"}  # fmt: skip


def new_hash() -> str:
    return hashlib.sha256(("sk-" + secrets.token_hex(32)).encode()).hexdigest()


@pytest.fixture
async def nc(nats_server):
    client = await connect(nats_server.url, "test-billing")
    yield client
    await client.drain()


@pytest.fixture
def billing(make_node):
    """`await billing(**ENV)` starts billing; its subjects must answer as soon as it is up (no waiting here)."""

    async def start(services=("billing",), **env):
        return await make_node(services, **env)

    return start


async def fund(nc, msat: int) -> str:
    key_hash = new_hash()
    await request(nc, bus.BILLING_CREATE_KEY, bus.CreateKey(key_hash, msat, f"t-{key_hash}"), bus.KeyInfo)
    return key_hash


async def info(nc, key_hash: str) -> bus.KeyInfo:
    return await request(nc, bus.BILLING_KEY_INFO, bus.KeyQuery(key_hash), bus.KeyInfo)


async def reserve(nc, key_hash: str, model="gpt-4o-mini", prompt=0, max_tokens: int | None = 0, rid=None):
    message = bus.Reserve(key_hash, rid or uuid.uuid4().hex, model, prompt, max_tokens)
    return await request(nc, bus.BILLING_RESERVE, message, bus.Reserved)


def usage(key_hash: str, reserved: bus.Reserved, prompt: int, completion: int, source="reported", rid=None):
    return bus.Usage(rid or uuid.uuid4().hex, key_hash, reserved.reservation_id, reserved.model, prompt, completion,
                     source=source, ts=time.time())  # fmt: skip


async def settle(nc, message: bus.Usage) -> bus.Settled:
    return await request(nc, bus.BILLING_SETTLE, message, bus.Settled)


async def fails(coro, code: str, status: int) -> bus.Error:
    with pytest.raises(BusError) as caught:
        await coro
    assert (caught.value.error.code, caught.value.error.status) == (code, status), caught.value.error
    return caught.value.error


async def reconcile(nc) -> bus.Reconciliation:
    return await request(nc, bus.BILLING_RECONCILE, bus.ReconcileQuery(), bus.Reconciliation, bus.MINT_TIMEOUT)


async def eventually(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


async def test_hundred_concurrent_reserves_on_a_key_that_affords_ten(billing, nc):
    await billing(**PER_CALL)
    key = await fund(nc, 10_000)
    results = await asyncio.gather(*(reserve(nc, key) for _ in range(100)), return_exceptions=True)
    granted = [r for r in results if isinstance(r, bus.Reserved)]
    refused = [r for r in results if isinstance(r, BusError)]
    assert len(granted) == 10 and len(refused) == 90
    assert {r.error.code for r in refused} == {"insufficient_balance"}
    assert {r.error.status for r in refused} == {402}
    assert all(r.reserved_msat == 1000 and r.balance_msat >= 0 for r in granted)
    assert sorted(r.balance_msat for r in granted) == list(range(0, 10_000, 1000))
    now = await info(nc, key)
    assert (now.balance_msat, now.reserved_msat) == (0, 10_000)


async def test_reserve_errors_and_idempotency(billing, nc):
    await billing(**PER_CALL)
    key = await fund(nc, 1500)
    first = await reserve(nc, key, rid="req-1")
    again = await reserve(nc, key, rid="req-1")
    assert again.reservation_id == first.reservation_id and again.reserved_msat == 1000
    assert (await info(nc, key)).reserved_msat == 1000  # held once
    error = await fails(reserve(nc, key), "insufficient_balance", 402)
    assert error.message == "Insufficient balance: 1000 msat required, 500 msat available"
    stranger = new_hash()
    await fails(reserve(nc, stranger), "unknown_key", 401)
    await fails(info(nc, stranger), "unknown_key", 401)
    await fails(request(nc, bus.BILLING_REFUND, bus.Refund(stranger), bus.Refunded), "unknown_key", 401)
    await fails(request(nc, bus.BILLING_DEPOSIT, bus.Deposit(stranger, "cashuBnotatoken", False), bus.KeyInfo),
                "unknown_key", 401)  # fmt: skip
    await fails(info(nc, stranger), "unknown_key", 401)  # nothing was created on the way


async def test_fixed_pricing_charges_exactly_at_reserve_and_settle(billing, nc):
    await billing(**FIXED)
    key = await fund(nc, 100_000)
    held = await reserve(nc, key, model="any/model-at-all", prompt=1001, max_tokens=1000)
    assert held.model == "any/model-at-all"
    assert held.reserved_msat == 2000 + 501 + 1500  # rounded up per part
    done = await settle(nc, usage(key, held, 1001, 333))
    assert (done.base_msat, done.input_msat, done.output_msat, done.cost_msat) == (2000, 501, 500, 3001)
    assert done.balance_msat == 100_000 - 3001
    now = await info(nc, key)
    assert (now.balance_msat, now.reserved_msat, now.total_requests, now.total_spent_msat) == (96_999, 0, 1, 3001)
    default = await reserve(nc, key, model="any/model-at-all", prompt=0, max_tokens=None)
    assert default.reserved_msat == 2000 + 6144  # no cap and an unknown model: DEFAULT_MAX_TOKENS (4096)
    known = await reserve(nc, key, model="gpt-4o-mini", prompt=0, max_tokens=None)
    assert known.model == "openai/gpt-4o-mini"  # aliases resolve even with fixed prices
    assert known.reserved_msat == 2000 + 16384 * 3 // 2  # the model's own max completion tokens


async def test_settle_exactly_once_by_request_stream_and_repeat(billing, nc):
    await billing(**FIXED)
    key = await fund(nc, 100_000)
    held = await reserve(nc, key, prompt=1000, max_tokens=1000)
    message = usage(key, held, 1000, 1000)
    first = await settle(nc, message)
    assert not first.already and first.cost_msat == 2000 + 500 + 1500
    js = nc.jetstream()
    await js.publish(bus.USAGE_SUBJECT, bus.encode(message))  # the stream copy of the same call
    repeat = await settle(nc, message)
    assert repeat.already and (repeat.cost_msat, repeat.balance_msat) == (first.cost_msat, first.balance_msat)

    # A call settled only through the stream.
    second = await reserve(nc, key, prompt=0, max_tokens=1000)
    await js.publish(bus.USAGE_SUBJECT, bus.encode(usage(key, second, 0, 10)))

    async def drained():
        now = await info(nc, key)
        return now if now.reserved_msat == 0 else None

    now = await eventually(drained)
    assert now is not None
    assert now.total_requests == 2 and now.total_spent_msat == 4000 + 2015
    assert now.balance_msat == 100_000 - 4000 - 2015
    assert (await reconcile(nc)).difference_msat == 0


async def test_failed_charges_nothing_estimated_charges_the_estimate_and_charges_are_capped(billing, nc):
    await billing(**FIXED)
    key = await fund(nc, 5000)
    held = await reserve(nc, key, prompt=100, max_tokens=100)
    failed = await settle(nc, usage(key, held, 100, 100, source="failed"))
    assert failed.cost_msat == 0 and failed.balance_msat == 5000
    assert (await info(nc, key)).total_requests == 0
    held = await reserve(nc, key, prompt=0, max_tokens=1000)
    estimated = await settle(nc, usage(key, held, 0, 100, source="estimated"))
    assert estimated.cost_msat == 2000 + 150
    # More than the reservation and more than the key holds: the charge stops at zero balance.
    held = await reserve(nc, key, prompt=0, max_tokens=0)
    capped = await settle(nc, usage(key, held, 10_000, 10_000))
    assert capped.cost_msat == 2850 and capped.balance_msat == 0
    assert capped.base_msat + capped.input_msat + capped.output_msat == capped.cost_msat
    now = await info(nc, key)
    assert (now.balance_msat, now.reserved_msat) == (0, 0)
    await fails(settle(nc, bus.Usage("x", key, "no-such-reservation", "m", 1, 1)), "unknown_reservation", 404)
    assert (await reconcile(nc)).difference_msat == 0


async def test_sweeper_releases_stale_reservations(billing, nc):
    await billing(RESERVATION_TTL="1", **PER_CALL)
    key = await fund(nc, 3000)
    held = await reserve(nc, key)
    assert (await info(nc, key)).reserved_msat == 1000

    async def released():
        return (await info(nc, key)).reserved_msat == 0

    assert await eventually(released, timeout=15)
    assert (await info(nc, key)).balance_msat == 3000
    # Usage that arrives after the sweep is still charged once, from the free balance.
    late = await settle(nc, usage(key, held, 0, 0))
    assert late.cost_msat == 1000 and late.balance_msat == 2000
    assert (await reconcile(nc)).difference_msat == 0


async def test_catalog_prices_aliases_and_model_errors(billing, nc, tmp_path):
    models = tmp_path / "models.json"
    models.write_text(json.dumps([
        {"id": "openai/gpt-4o-mini", "aliases": ["mini"], "pricing": {"prompt": "0.000001", "completion": 0.000002}},
        {"id": "openai/gpt-4o", "enabled": False},
        {"id": "local/only-in-file", "pricing": {"prompt": "0", "completion": "0.00001", "request": "0.001"},
         "max_completion_tokens": 100},
    ]))  # fmt: skip
    await billing(MODELS_PATH=str(models))
    catalog = await request(nc, bus.BILLING_MODELS, bus.ModelsQuery(), bus.Catalog)
    by_id = {m.id: m for m in catalog.models}
    assert catalog.btc_usd == "100000" and not catalog.fixed_pricing and catalog.revision
    mini = by_id["openai/gpt-4o-mini"]
    # USD 1e-6 per token * 1.05 provider fee * 1.005 exchange fee at 100k USD/BTC.
    assert (mini.price.prompt_msat_per_m, mini.price.completion_msat_per_m) == (1_055_250, 2_110_500)
    assert "mini" in mini.aliases and "gpt-4o-mini" in mini.aliases
    assert "openai/gpt-4o" not in by_id  # disabled by the operator
    assert by_id["anthropic/claude-sonnet-4.6"].price.prompt_msat_per_m == 3_165_750  # upstream's own pricing
    assert by_id["local/only-in-file"].price.request_msat == 1056  # 0.001 USD * 1.05525 -> 1055.25 -> 1056

    key = await fund(nc, 10_000_000)
    held = await reserve(nc, key, model="gpt-4o-mini", prompt=1000, max_tokens=1000)
    assert held.model == "openai/gpt-4o-mini" and held.price == mini.price
    assert held.reserved_msat == 1056 + 2111  # ceil(1055.25) + ceil(2110.5)
    capped = await reserve(nc, key, model="local/only-in-file", prompt=0, max_tokens=None)
    assert capped.reserved_msat == 1056 + 1056  # the model's own max completion tokens (100)
    await fails(reserve(nc, key, model="no/such-model"), "model_not_found", 404)
    await fails(reserve(nc, key, model="openai/gpt-4o"), "model_not_found", 404)


@pytest.mark.parametrize("fixed", [True, False])
async def test_no_live_rate_warns_only_when_models_cannot_be_priced(billing, nc, monkeypatch, caplog, fixed):
    # Offline: every rate source refuses (a closed loopback port), no rate is configured or cached.
    dead = f"http://127.0.0.1:{free_port()}/ticker"
    monkeypatch.setattr(catalog, "RATE_SOURCES", ((dead, lambda d: d["price"]),))
    caplog.set_level(logging.WARNING, logger=catalog.__name__)
    await billing(**{**(FIXED if fixed else {}), "BTC_USD_RATE": ""})
    models = (await request(nc, bus.BILLING_MODELS, bus.ModelsQuery(), bus.Catalog)).models
    warnings = [r.getMessage() for r in caplog.records if "no live BTC/USD rate" in r.getMessage()]
    if fixed:  # every model is priced in sats: the rate is not needed, nothing to warn about
        assert models and all(m.price.prompt_msat_per_m for m in models) and warnings == []
    else:  # the upstream's models are priced in USD: without a rate they cannot be sold
        assert not [m for m in models if m.price.prompt_msat_per_m]
        assert warnings and "cannot be priced" in warnings[0]


@pytest.mark.parametrize(
    "content,problem",
    [("{not json", "cannot read"), ('{"id": "x"}', "expected a JSON list"),
     ('[{"id": "m", "pricing": {"prompt": "cheap"}}]', "pricing.prompt")],
)  # fmt: skip
async def test_malformed_models_file_stops_start_naming_the_problem(make_node, tmp_path, content, problem):
    from shared.config import ConfigError

    models = tmp_path / "models.json"
    models.write_text(content)
    with pytest.raises(ConfigError, match="MODELS_PATH") as caught:
        await make_node(("billing",), MODELS_PATH=str(models))
    assert problem in str(caught.value)


async def test_refund_rules_that_need_no_mint(billing, nc):
    await billing(**PER_CALL)
    empty = await fund(nc, 0)
    error = await fails(request(nc, bus.BILLING_REFUND, bus.Refund(empty), bus.Refunded), "no_balance", 400)
    assert error.message == "No balance to refund"
    dust = await fund(nc, 999)
    error = await fails(request(nc, bus.BILLING_REFUND, bus.Refund(dust), bus.Refunded), "balance_too_small", 400)
    assert error.message == "Balance too small to refund"
    busy = await fund(nc, 5000)
    await reserve(nc, busy)
    error = await fails(request(nc, bus.BILLING_REFUND, bus.Refund(busy), bus.Refunded), "refund_pending", 425)
    assert error.retry_after == 1
    assert (await info(nc, busy)).balance_msat == 4000  # nothing was debited


async def test_create_key_is_idempotent_and_the_cli_prints_a_working_key(billing, nc, nats_server):
    node = await billing(**PER_CALL)
    key_hash = new_hash()
    for _ in range(2):
        created = await request(nc, bus.BILLING_CREATE_KEY, bus.CreateKey(key_hash, 7000, "op-1"), bus.KeyInfo)
        assert created.balance_msat == 7000
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": node.settings.database_url, "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.billing", "create-key", "--msat", "4321", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    key = out.decode().strip()
    assert key.startswith("sk-") and len(key) == 67
    assert (await info(nc, hashlib.sha256(key.encode()).hexdigest())).balance_msat == 4321
    # Keys are stored only as hashes.
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM billing.keys WHERE key_hash LIKE 'sk-%'")
    finally:
        await conn.close()
    assert stored == 0


# ---- with the wallet service and a real mint ----------------------------------------------------


async def deposit(nc, key_hash: str, token: str, create: bool = True) -> bus.KeyInfo:
    return await request(nc, bus.BILLING_DEPOSIT, bus.Deposit(key_hash, token, create), bus.KeyInfo, bus.MINT_TIMEOUT)


async def refund(nc, key_hash: str) -> bus.Refunded:
    return await request(nc, bus.BILLING_REFUND, bus.Refund(key_hash), bus.Refunded, bus.MINT_TIMEOUT)


async def assert_books_balance(nc) -> bus.Reconciliation:
    result = await reconcile(nc)
    assert result.difference_msat == 0, result
    assert result.covered, result
    return result


async def test_deposit_credits_once_per_token(billing, nc, client_wallet):
    await billing(("wallet", "billing"), **PER_CALL)
    token = await client_wallet.token(21)
    key = new_hash()
    first = await deposit(nc, key, token)
    assert (first.credited_msat, first.balance_msat) == (21_000, 21_000)
    again = await deposit(nc, key, token)  # a client retrying after a lost answer
    assert (again.credited_msat, again.balance_msat) == (21_000, 21_000)
    racing = await asyncio.gather(*(deposit(nc, key, token) for _ in range(5)))
    assert {r.balance_msat for r in racing} == {21_000}
    other = new_hash()
    error = await fails(deposit(nc, other, token), "cashu_token_already_spent", 400)
    assert error.message
    await fails(info(nc, other), "unknown_key", 401)
    # A top-up of an existing key with create=False; an unknown key redeems nothing.
    topup = await client_wallet.token(5)
    assert (await deposit(nc, key, topup, create=False)).balance_msat == 26_000
    unredeemed = await client_wallet.token(3)
    await fails(deposit(nc, new_hash(), unredeemed, create=False), "unknown_key", 401)
    assert not await client_wallet.is_spent(unredeemed)
    await fails(deposit(nc, key, "cashuBgarbage"), "invalid_token", 400)
    assert (await info(nc, key)).balance_msat == 26_000
    await assert_books_balance(nc)


async def test_refund_pays_once_and_replays_the_same_token(billing, nc, client_wallet):
    await billing(("wallet", "billing"), **PER_CALL)
    key = new_hash()
    await deposit(nc, key, await client_wallet.token(10))
    held = await reserve(nc, key)
    await fails(refund(nc, key), "refund_pending", 425)
    await settle(nc, usage(key, held, 0, 0))  # 1 sat spent
    paid = await refund(nc, key)
    assert paid.amount_msat == 9000 and paid.status == "paid" and paid.token.startswith("cashu")
    replay = await refund(nc, key)  # the answer was lost; asking again gets the same token
    assert (replay.refund_id, replay.token, replay.amount_msat) == (paid.refund_id, paid.token, 9000)
    assert await client_wallet.receive(paid.token) == 9
    now = await info(nc, key)
    assert (now.balance_msat, now.reserved_msat) == (0, 0)
    # Once something is credited again, the old refund is not replayed.
    await deposit(nc, key, await client_wallet.token(2))
    second = await refund(nc, key)
    assert second.refund_id != paid.refund_id and second.amount_msat == 2000
    assert await client_wallet.receive(second.token) == 2
    result = await assert_books_balance(nc)
    assert (result.redeemed_msat, result.refunded_msat, result.revenue_msat, result.owed_msat) == (
        12_000, 11_000, 1000, 0)  # fmt: skip


async def test_refund_while_the_wallet_is_down_stays_pending_and_pays_once(billing, make_node, nc, client_wallet):
    wallet = await make_node(("wallet",))
    await billing(**PER_CALL)
    key = new_hash()
    await deposit(nc, key, await client_wallet.token(7))
    await wallet.stop()
    with pytest.raises(BusError) as caught:
        await refund(nc, key)
    assert (caught.value.error.code, caught.value.error.status) == ("mint_unavailable", 503)
    assert (await info(nc, key)).balance_msat == 0  # debited once, held as a pending refund
    # Topping up while the refund is pending loses nothing.
    await make_node(("wallet",))
    await asyncio.sleep(0.2)
    top = await deposit(nc, key, await client_wallet.token(4), create=False)
    assert top.balance_msat == 4000
    paid = await refund(nc, key)  # the retry finishes the pending refund with the same idempotency key
    assert paid.amount_msat == 7000 and paid.status == "paid"
    assert await client_wallet.receive(paid.token) == 7
    later = await refund(nc, key)
    assert later.amount_msat == 4000 and later.refund_id != paid.refund_id
    assert await client_wallet.receive(later.token) == 4
    assert (await info(nc, key)).balance_msat == 0
    await assert_books_balance(nc)


async def test_reconcile_after_a_mixed_sequence_and_from_the_cli(billing, nc, client_wallet, nats_server):
    node = await billing(("wallet", "billing"), FIXED_PRICING="true", FIXED_COST_PER_REQUEST="1",
                         FIXED_PER_1K_INPUT_TOKENS="0.5", FIXED_PER_1K_OUTPUT_TOKENS="1")  # fmt: skip
    alice, bob = new_hash(), new_hash()
    await deposit(nc, alice, await client_wallet.token(50))
    await deposit(nc, bob, await client_wallet.token(30))
    await request(nc, bus.BILLING_CREATE_KEY, bus.CreateKey(bob, 5000, "gift-1"), bus.KeyInfo)
    for prompt, completion, source in ((1001, 77, "reported"), (10, 0, "failed"), (3, 999, "estimated")):
        held = await reserve(nc, alice, prompt=prompt, max_tokens=1000)
        await settle(nc, usage(alice, held, prompt, completion, source=source))
    await reserve(nc, bob, prompt=10, max_tokens=10)  # left open
    await refund(nc, alice)
    result = await assert_books_balance(nc)
    assert result.granted_msat == 5000
    assert result.owed_msat == (await info(nc, alice)).balance_msat + 35_000
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": node.settings.database_url, "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.billing", "reconcile", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["difference_msat"] == 0


async def test_concurrent_refunds_at_a_fee_mint_pay_once(billing, nc, fee_client_wallet, fee_mint):
    await billing(("wallet", "billing"), CASHU_MINTS=fee_mint.url, **PER_CALL)
    key = new_hash()
    credited = await deposit(nc, key, await fee_client_wallet.token(64))
    assert 0 < credited.credited_msat < 64_000  # the mint's input fee is not the user's credit
    answers = await asyncio.gather(*(refund(nc, key) for _ in range(4)))
    assert len({(a.refund_id, a.token, a.amount_msat) for a in answers}) == 1
    assert answers[0].amount_msat == credited.credited_msat // 1000 * 1000
    assert await fee_client_wallet.receive(answers[0].token) > 0
    result = await assert_books_balance(nc)
    assert result.fees_msat >= 64_000 - credited.credited_msat  # deposit fee, plus what cutting the token cost
