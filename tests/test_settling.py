"""Every money operation ends by itself, and the client can see how (design §2 rule 7): a Lightning refund
that fails goes back to the balance and can go elsewhere; X-Cashu change left pending by a fault is
completed by billing's refund loop; a token the node took while the mint's answer was lost is still
refundable; a mint's keyset rotation is followed at once; a stopped Postgres answers 503 in seconds.
Real NATS, Postgres and nutshell mints; faults are injected by a lossy proxy in front of a real mint
and by signals to a real Postgres.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time

import pytest
from aiohttp import web

from devstack import processes
from devstack.client_wallet import ClientWallet
from services.wallet.app import WALLET
from tests.conftest import serve_app
from tests.support.faults import LossyMintProxy, signal_tree
from tests.support.keys import funded_key, reconcile
from tests.test_gateway import CHAT, auth
from tests.test_wallet import lnurl_service  # noqa: F401  (a fixture)

CORE = ("billing", "wallet", "gateway")
PRICES = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "1",
          "FIXED_PER_1K_OUTPUT_TOKENS": "1"}  # fmt: skip
FAST = {"PENDING_RETRY_SECONDS": "1", "DEPENDENCY_TIMEOUT": "2"}
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


async def assert_reconciled(nats_url: str) -> None:
    result = await reconcile(nats_url)
    assert result.difference_msat == 0 and result.covered, result


async def create_key(http, node, token: str) -> str:
    async with http.post(f"{node.url}/v1/balance/create", json={"initial_balance_token": token}) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["api_key"]


async def refund(http, node, headers: dict, body: dict | None = None) -> tuple[int, dict, dict]:
    async with http.post(f"{node.url}/v1/balance/refund", json=body, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


async def refund_status(http, node, headers: dict) -> dict:
    async with http.get(f"{node.url}/v1/balance/refund", headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def balance(http, node, key: str) -> int:
    async with http.get(f"{node.url}/v1/balance/info", headers=auth(key)) as response:
        return (await response.json())["balance"]


@pytest.fixture
async def broken_lnurl():
    """A Lightning address whose LNURL service answers 503."""

    async def down(request: web.Request) -> web.Response:
        return web.json_response({"status": "ERROR", "reason": "maintenance"}, status=503)

    app = web.Application()
    app.router.add_get("/.well-known/lnurlp/bob", down)
    runner, url = await serve_app(app)
    yield f"bob@{url.removeprefix('http://')}"
    await runner.cleanup()


# ---- 1. a refund to a Lightning address that fails is not stuck ----------------------------------------------


async def test_failed_lightning_refund_goes_back_to_the_balance_and_can_go_elsewhere(
    make_node,
    http,
    client_wallet,
    fee_mint,
    lnurl_service,  # noqa: F811 (the fixture imported above)
    broken_lnurl,
):
    node = await make_node(CORE, **PRICES, **FAST)
    await create_key(http, node, await client_wallet.token(50))  # the wallet's float for Lightning fees
    key = await create_key(http, node, await client_wallet.token(30))

    status, body, _ = await refund(http, node, auth(key), {"lightning_address": broken_lnurl})
    assert (status, body["code"]) == (502, "payout_failed"), body
    assert "back on the balance" in body["detail"]
    assert await balance(http, node, key) == 30_000
    assert (await refund_status(http, node, auth(key)))["status"] == "failed"

    good, quotes = await lnurl_service(fee_mint.url)
    status, body, _ = await refund(http, node, auth(key), {"lightning_address": good})
    assert status == 200 and (body["status"], body["sats"], body["recipient"]) == ("paid", "30", good), body
    assert len(quotes) == 1 and await balance(http, node, key) == 0
    assert (await refund_status(http, node, auth(key)))["status"] == "paid"
    await assert_reconciled(node.settings.nats_url)


async def test_pending_lightning_refund_can_be_taken_as_a_token_instead(make_node, http, client_wallet):
    wallet = await make_node(("wallet",), **FAST)
    node = await make_node(("billing", "gateway"), **PRICES, **FAST)
    key = await create_key(http, node, await client_wallet.token(30))
    await wallet.stop()
    status, body, headers = await refund(http, node, auth(key), {"lightning_address": "carol@127.0.0.1:9"})
    assert status == 503 and "Retry-After" in headers, body
    assert (await refund_status(http, node, auth(key)))["status"] == "pending"

    await make_node(("wallet",), **FAST)
    await asyncio.sleep(0.3)
    status, body, _ = await refund(http, node, auth(key))  # no body: the money as a token, now
    assert status == 200, body
    assert await client_wallet.receive(body["token"]) == 30
    assert (await refund_status(http, node, auth(key)))["status"] == "paid"
    assert await balance(http, node, key) == 0
    await assert_reconciled(node.settings.nats_url)


# ---- 2 and 3. X-Cashu: change completed by itself; a token the node took is always refundable -----------------


@pytest.fixture
async def lossy_mint(mint):
    proxy = await LossyMintProxy(mint.url).start()
    yield proxy
    await proxy.stop()


async def test_x_cashu_change_left_pending_is_completed_by_itself(make_node, http, lossy_mint):
    payer = ClientWallet(lossy_mint.url)
    node = await make_node(CORE, CASHU_MINTS=lossy_mint.url, **PRICES, **FAST)
    token = await payer.token(20)
    lossy_mint.lose["/v1/swap"] = [False, True]  # the redeem goes through; the change's swap answer is lost
    async with http.post(f"{node.url}{CHAT}", json=HELLO, headers={"X-Cashu": token}) as response:
        assert response.status == 200, await response.text()
        cost = (await response.json())["usage"]["cost"]["total_msats"]
        assert "X-Cashu" not in response.headers
        assert response.headers["X-Routstr-Change"] == "pending"
    for _ in range(100):  # billing's refund loop finishes it, nobody asking
        state = await refund_status(http, node, {"X-Cashu": token})
        if state["status"] != "pending":
            break
        await asyncio.sleep(0.1)
    assert state["status"] == "paid", state
    status, body, headers = await refund(http, node, {"X-Cashu": token})
    assert status == 200 and headers["X-Cashu"] == body["token"] == state["token"]
    assert await payer.receive(body["token"]) * 1000 == 20_000 - cost - (20_000 - cost) % 1000
    await assert_reconciled(node.settings.nats_url)


async def test_x_cashu_token_taken_while_the_mints_answer_was_lost_is_refundable(make_node, http, lossy_mint):
    payer = ClientWallet(lossy_mint.url)
    node = await make_node(CORE, CASHU_MINTS=lossy_mint.url, **PRICES, **FAST)
    token = await payer.token(20)
    lossy_mint.lose["/v1/swap"] = [True]  # the mint spends the token's proofs; the node never hears back
    async with http.post(f"{node.url}{CHAT}", json=HELLO, headers={"X-Cashu": token}) as response:
        assert response.status == 503, await response.text()
        assert "Retry-After" in response.headers
    assert await payer.is_spent(token)  # the node holds its value now
    # The wallet's sweeper finishes the interrupted swap by itself (NUT-09 restore of its planned outputs).
    wallet = node.runners[1].app[WALLET]
    before = (await wallet.holdings()).unspent_msat
    assert await wallet.resolve_stale_redemptions(older_than=0) == 1
    assert (await wallet.holdings()).unspent_msat == before + 20_000
    status, body, headers = await refund(http, node, {"X-Cashu": token})
    assert status == 200, body
    assert headers["X-Cashu"] == body["token"] and await payer.receive(body["token"]) == 20
    again = await refund(http, node, {"X-Cashu": token})
    assert again[1]["token"] == body["token"]  # a retry replays the same refund
    never = await payer.token(3)
    status, body, _ = await refund(http, node, {"X-Cashu": never})
    assert (status, body["code"]) == (404, "unknown_token") and not await payer.is_spent(never)
    await assert_reconciled(node.settings.nats_url)


# ---- 4. a mint rotating its keyset ----------------------------------------------------------------------------


async def test_a_mint_rotating_its_keyset_is_followed_at_once(make_node, http, tmp_path):
    workdir, port = tmp_path / "rotating-mint", processes.free_port()
    mint = processes.start_mint(workdir, port=port)
    try:
        node = await make_node(CORE, CASHU_MINTS=mint.url, **PRICES)
        first = await create_key(http, node, await ClientWallet(mint.url).token(10))  # keysets now cached
        mint.stop()
        with sqlite3.connect(workdir / "db" / "mint.sqlite3") as db:
            db.execute("UPDATE keysets SET active = false")  # the operator retires the old keyset ...
        mint = processes.start_mint(workdir, port=port, MINT_DERIVATION_PATH="m/0'/0'/1'")  # ... for a new one
        payer = ClientWallet(mint.url)
        second = await create_key(http, node, await payer.token(10))  # not `invalid_token` from a stale cache
        assert await balance(http, node, second) == 10_000
        status, body, _ = await refund(http, node, auth(first))
        assert status == 200 and await payer.receive(body["token"]) == 10
        await assert_reconciled(node.settings.nats_url)
    finally:
        mint.stop()


# ---- 5. a stopped Postgres answers 503 + Retry-After within seconds --------------------------------------------


async def test_a_stopped_postgres_answers_503_with_retry_after_within_seconds(own_postgres, make_node, http):
    # own_postgres first: set up before the node, so it is stopped only after the node has shut down.
    database = own_postgres.url.rsplit("/", 1)[0] + "/node"
    node = await make_node(CORE, DATABASE_URL=database, **PRICES, **FAST)
    key = await funded_key(node.settings.nats_url, 100_000)
    signal_tree(own_postgres.process.pid, signal.SIGSTOP)
    try:
        for method, path, body in (("GET", "/v1/balance/info", None), ("POST", CHAT, HELLO)):
            started = time.monotonic()
            async with http.request(method, f"{node.url}{path}", json=body, headers=auth(key)) as response:
                answer = await response.json()
                assert response.status == 503, answer
                assert int(response.headers["Retry-After"]) > 0
            assert time.monotonic() - started < 4.5, path  # DEPENDENCY_TIMEOUT 2 s, not a hang
    finally:
        signal_tree(own_postgres.process.pid, signal.SIGCONT)
    for _ in range(50):
        async with http.post(f"{node.url}{CHAT}", json=HELLO, headers=auth(key)) as response:
            if response.status == 200:
                break
        await asyncio.sleep(0.2)
    assert response.status == 200
    await assert_reconciled(node.settings.nats_url)


async def test_x_cashu_with_the_mint_stopped_fails_in_seconds_and_is_refundable_after(make_node, http, tmp_path):
    mint = processes.start_mint(tmp_path / "stopped-mint")
    try:
        payer = ClientWallet(mint.url)
        node = await make_node(CORE, CASHU_MINTS=mint.url, **PRICES, **FAST)
        await create_key(http, node, await payer.token(5))  # the wallet knows the mint's keysets now
        token = await payer.token(20)
        signal_tree(mint.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            async with http.post(f"{node.url}{CHAT}", json=HELLO, headers={"X-Cashu": token}) as response:
                assert response.status == 503 and "Retry-After" in response.headers, await response.text()
            assert time.monotonic() - started < 5  # DEPENDENCY_TIMEOUT 2 s, not the old 20-30 s
        finally:
            signal_tree(mint.process.pid, signal.SIGCONT)
        # Whether or not the mint went on to execute the swap, the token's value comes back whole.
        status, body, _ = await refund(http, node, {"X-Cashu": token})
        if status == 404:  # the swap never happened: the token is still the client's
            assert not await payer.is_spent(token)
        else:
            assert status == 200 and await payer.receive(body["token"]) == 20, body
        await assert_reconciled(node.settings.nats_url)
    finally:
        mint.stop()
