"""The money path through the public HTTP API with a real mint: deposit, spend, change, refund, reconcile."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest

from tests.support.keys import funded_key, reconcile
from tests.test_gateway import CHAT, auth, balance, settled_balance, sse_events

CORE = ("billing", "wallet", "gateway")
# 1 sat per call, 1 sat per 1k prompt tokens, 1 sat per 1k completion tokens: small, exact numbers.
PRICES = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "1",
          "FIXED_PER_1K_OUTPUT_TOKENS": "1"}  # fmt: skip
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


@pytest.fixture
async def node(make_node):
    return await make_node(CORE, **PRICES)


def derived_key(token: str) -> str:
    return "sk-" + hashlib.sha256(token.encode()).hexdigest()


async def assert_reconciled(node) -> None:
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0, result
    assert result.covered, result


async def test_create_is_idempotent_sequentially_and_concurrently(node, http, client_wallet):
    token = await client_wallet.token(50)
    url = f"{node.url}/v1/balance/create"
    async with http.get(url, params={"initial_balance_token": token}) as response:
        assert response.status == 200, await response.text()
        first = await response.json()
    assert first == {"api_key": derived_key(token), "balance": 50_000}
    # A retry after a lost response: the same key and balance, not "already spent".
    async with http.post(url, json={"initial_balance_token": token}) as response:
        assert await response.json() == first

    token2 = await client_wallet.token(30)

    async def create() -> tuple[int, dict]:
        async with http.get(url, params={"initial_balance_token": token2}) as response:
            return response.status, await response.json()

    results = await asyncio.gather(*(create() for _ in range(20)))
    assert all(status == 200 for status, _ in results), results
    assert {json.dumps(body, sort_keys=True) for _, body in results} == {
        json.dumps({"api_key": derived_key(token2), "balance": 30_000}, sort_keys=True)
    }
    assert (await balance(http, node, derived_key(token2)))["balance"] == 30_000
    await assert_reconciled(node)


async def test_mint_fees_are_deducted_from_the_credit(make_node, http, fee_mint, fee_client_wallet):
    node = await make_node(CORE, CASHU_MINTS=fee_mint.url, **PRICES)
    token = await fee_client_wallet.token(20)
    async with http.get(f"{node.url}/v1/balance/create", params={"initial_balance_token": token}) as response:
        body = await response.json()
    assert response.status == 200, body
    assert 0 < body["balance"] < 20_000 and body["balance"] % 1000 == 0  # fees are whole sats
    await assert_reconciled(node)


async def test_getbased_sequence(node, http, client_wallet):
    """create (GET, query) -> info -> streamed chat -> refund on the /v1/wallet path, as getbased sends it."""
    token = await client_wallet.token(40)
    async with http.get(f"{node.url}/v1/balance/create", params={"initial_balance_token": token}) as response:
        created = await response.json()
    key = created["api_key"]
    assert key == derived_key(token) and created["balance"] == 40_000
    async with http.get(f"{node.url}/v1/balance/info", headers=auth(key)) as response:
        info = await response.json()
    # `refundable` is an extra field: the part of `balance` a refund pays (msat).
    assert info == {"api_key": key, "balance": 40_000, "reserved": 0, "total_requests": 0, "total_spent": 0,
                    "refundable": 40_000}  # fmt: skip
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 200
        events = sse_events(await response.text())
    usage = json.loads(events[-2])["usage"]
    spent = usage["cost"]["total_msats"]
    after = await settled_balance(http, node, key)
    assert after["balance"] == 40_000 - spent and after["total_requests"] == 1
    async with http.post(f"{node.url}/v1/wallet/refund", headers=auth(key)) as response:
        assert response.status == 200, await response.text()
        refund = await response.json()
    sats = (40_000 - spent) // 1000
    assert refund["sats"] == str(sats) and refund["msats"] == str(sats * 1000)
    assert refund["token"].startswith("cashu") and refund["cashu_token"] == refund["token"]
    assert await client_wallet.receive(refund["token"]) == sats
    # Empty now: the exact detail clients match on, and a retried refund replays the same token.
    async with http.post(f"{node.url}/v1/wallet/refund", headers=auth(key)) as response:
        replay = await response.json()
    assert response.status == 200 and replay["token"] == refund["token"]
    await assert_reconciled(node)


async def test_refund_errors_clients_match_on(node, http, client_wallet):
    async with http.post(f"{node.url}/v1/balance/refund", headers=auth("sk-" + "1" * 64)) as response:
        assert response.status == 401
    async with http.get(f"{node.url}/v1/balance/info", headers=auth("sk-" + "1" * 64)) as response:
        assert response.status == 401  # and it created nothing:
    async with http.get(f"{node.url}/v1/balance/info", headers=auth("sk-" + "1" * 64)) as response:
        assert response.status == 401
    key = await funded_key(node.settings.nats_url, 0)
    async with http.post(f"{node.url}/v1/balance/refund", headers=auth(key), json={}) as response:
        assert response.status == 400
        assert (await response.json())["detail"] == "No balance to refund"
    dust = await funded_key(node.settings.nats_url, 999)
    async with http.post(f"{node.url}/v1/balance/refund", headers=auth(dust)) as response:
        assert response.status == 400
        assert (await response.json())["detail"] == "Balance too small to refund"


async def test_topup_json_and_query_forms(node, http, client_wallet):
    token = await client_wallet.token(10)
    async with http.get(f"{node.url}/v1/balance/create", params={"initial_balance_token": token}) as response:
        key = (await response.json())["api_key"]
    top1 = await client_wallet.token(5)
    async with http.post(f"{node.url}/v1/balance/topup", json={"cashu_token": top1}, headers=auth(key)) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["msats"] == 5000
    top2 = await client_wallet.token(7)
    headers = {**auth(key), "Content-Type": "application/json"}
    async with http.post(f"{node.url}/v1/wallet/topup", params={"cashu_token": top2}, headers=headers) as response:
        assert response.status == 200, await response.text()
    async with http.post(f"{node.url}/v1/wallet/topup", params={"cashu_token": top2}, headers=headers) as response:
        assert response.status == 200  # a retried top-up credits nothing twice
    assert (await balance(http, node, key))["balance"] == 22_000
    # A top-up never creates a key.
    top3 = await client_wallet.token(3)
    unknown = auth("sk-" + "2" * 64)
    async with http.post(f"{node.url}/v1/balance/topup", json={"cashu_token": top3}, headers=unknown) as response:
        assert response.status == 401
    assert not await client_wallet.is_spent(top3)
    await assert_reconciled(node)


async def test_topup_during_refund_loses_nothing(node, http, client_wallet):
    token = await client_wallet.token(30)
    async with http.get(f"{node.url}/v1/balance/create", params={"initial_balance_token": token}) as response:
        key = (await response.json())["api_key"]
    top = await client_wallet.token(12)
    refund_call = http.post(f"{node.url}/v1/balance/refund", headers=auth(key))
    topup_call = http.post(f"{node.url}/v1/balance/topup", json={"cashu_token": top}, headers=auth(key))
    refund_response, topup_response = await asyncio.gather(refund_call, topup_call)
    refund = await refund_response.json()
    assert topup_response.status == 200, await topup_response.text()
    refunded = int(refund["sats"]) if refund_response.status == 200 else 0
    left = (await balance(http, node, key))["balance"]
    assert refunded * 1000 + left == 42_000
    await assert_reconciled(node)


async def test_hundred_concurrent_calls_on_a_key_that_affords_ten(node, http):
    # Each call reserves 1 sat + prompt + 10 completion tokens; the key affords ten reservations exactly.
    probe = await funded_key(node.settings.nats_url, 10_000_000)
    async with http.post(f"{node.url}{CHAT}", json=HELLO, headers=auth(probe)) as response:
        assert response.status == 200
    await settled_balance(http, node, probe)
    key = await funded_key(node.settings.nats_url, 10 * 1100)

    async def call() -> int:
        async with http.post(f"{node.url}{CHAT}", json=HELLO, headers=auth(key)) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(call() for _ in range(100)))
    ok = statuses.count(200)
    assert set(statuses) <= {200, 402}, statuses
    assert 1 <= ok <= 10 + 2  # reservations are upper bounds; settled calls free what they did not use
    info = await settled_balance(http, node, key)
    assert info["balance"] >= 0 and info["total_requests"] == ok
    assert info["balance"] + info["total_spent"] == 11_000
    await assert_reconciled(node)


async def test_x_cashu_non_stream_returns_change_in_header(node, http, client_wallet):
    token = await client_wallet.token(20)
    headers = {"X-Cashu": token, "Authorization": "Bearer x-cashu"}  # a dummy Authorization loses to X-Cashu
    async with http.post(f"{node.url}{CHAT}", json=HELLO, headers=headers) as response:
        assert response.status == 200, await response.text()
        data = await response.json()
        change = response.headers["X-Cashu"]
    cost = data["usage"]["cost"]["total_msats"]
    received = await client_wallet.receive(change)
    assert received == (20_000 - cost) // 1000
    await assert_reconciled(node)


async def test_x_cashu_error_returns_the_change_too(node, http, client_wallet):
    token = await client_wallet.token(20)
    body = {**HELLO, "messages": [{"role": "user", "content": "[[fail:500]]"}]}
    async with http.post(f"{node.url}{CHAT}", json=body, headers={"X-Cashu": token}) as response:
        assert response.status == 502
        change = response.headers["X-Cashu"]
    assert await client_wallet.receive(change) == 20  # a failed call costs nothing


async def test_x_cashu_too_small_gets_402_and_its_money_back(node, http, client_wallet):
    """NUT-24: refused before it is redeemed, so the token itself stays the client's; the 402 says what would pay."""
    token = await client_wallet.token(2)
    body = {**HELLO, "max_tokens": 100_000}
    async with http.post(f"{node.url}{CHAT}", json=body, headers={"X-Cashu": token}) as response:
        assert response.status == 402
        assert (await response.json())["error"]["code"] == "insufficient_balance"
        assert response.headers["X-Cashu"].startswith("creqA")
    assert not await client_wallet.is_spent(token)
    assert await client_wallet.receive(token) == 2


async def test_x_cashu_stream_is_real_and_change_is_collectable(node, http, client_wallet):
    token = await client_wallet.token(20)
    body = {**HELLO, "stream": True, "messages": [{"role": "user", "content": "[[tokens:5]]"}]}
    async with http.post(f"{node.url}{CHAT}", json=body, headers={"X-Cashu": token}) as response:
        assert response.status == 200
        events = sse_events(await response.text())
    assert events[-1] == "[DONE]"
    for _ in range(50):
        async with http.post(f"{node.url}/v1/balance/refund", headers={"X-Cashu": token}) as response:
            body = await response.json()
            if response.status != 425:
                break
            assert "Retry-After" in response.headers
        await asyncio.sleep(0.1)
    assert response.status == 200, body
    change = response.headers["X-Cashu"]
    assert change == body["token"]
    sats = await client_wallet.receive(change)
    assert 15 <= sats < 20
    # Unknown token: 404, which tells a client the node never received it.
    other = await client_wallet.token(1)
    async with http.post(f"{node.url}/v1/balance/refund", headers={"X-Cashu": other}) as response:
        assert response.status == 404
    await assert_reconciled(node)


async def test_sdk_apikeys_sequence(node, http, client_wallet):
    """Bearer cashu -> wallet/info gives the sk- key -> 402 -> top-up by query param -> retry works."""
    token = await client_wallet.token(3)
    async with http.post(f"{node.url}{CHAT}", json=HELLO, headers=auth(token)) as response:
        assert response.status == 200, await response.text()
    async with http.get(f"{node.url}/v1/wallet/info", headers=auth(token)) as response:
        info = await response.json()
    key = info["api_key"]
    assert key == derived_key(token)
    assert (await settled_balance(http, node, key))["total_requests"] == 1
    big = {**HELLO, "max_tokens": 50_000}
    async with http.post(f"{node.url}{CHAT}", json=big, headers=auth(key)) as response:
        assert response.status == 402
    top = await client_wallet.token(60)
    headers = {**auth(key), "Content-Type": "application/json"}
    async with http.post(f"{node.url}/v1/wallet/topup?cashu_token={top}", headers=headers, data=b"") as response:
        assert response.status == 200, await response.text()
    async with http.post(f"{node.url}{CHAT}", json=big, headers=auth(key)) as response:
        assert response.status == 200, await response.text()
    await assert_reconciled(node)


def _v3(mint: str, proofs: list) -> str:
    raw = json.dumps({"token": [{"mint": mint, "proofs": proofs}], "unit": "sat"}).encode()
    return "cashuA" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_bad_tokens_get_clear_4xx_and_change_nothing(make_node, http, client_wallet, fee_client_wallet, mint):
    node = await make_node(CORE, CASHU_FOREIGN_MAX_SATS="0", **PRICES)  # unlisted mints refused, not swapped
    good = await client_wallet.token(5)
    spent = await client_wallet.token(5)
    await client_wallet.receive(spent)
    foreign = await fee_client_wallet.token(5)
    cases = {
        "garbage": "hello",
        "truncated": good[:-12],
        "wrong prefix": "cashuZ" + good[6:],
        "zero amount": _v3(mint.url, []),
        "spent": spent,
        "foreign mint": foreign,
        "huge": "cashuB" + "A" * 70_000,
    }
    url = f"{node.url}/v1/balance/create"
    for name, token in cases.items():
        async with http.post(url, json={"initial_balance_token": token}) as response:
            body = await response.json()
            assert 400 <= response.status < 500, (name, response.status, body)
            assert isinstance(body["detail"], str) and body["detail"], name
        async with http.post(f"{node.url}{CHAT}", json=HELLO, headers={"X-Cashu": token}) as response:
            assert 400 <= response.status < 500, (name, response.status)
            assert (await response.json())["error"]["message"], name
    async with http.post(url, json={"initial_balance_token": foreign}) as response:
        assert mint.url in (await response.json())["detail"]  # names the accepted mints
    assert not await fee_client_wallet.is_spent(foreign)
    assert not await client_wallet.is_spent(good)
    for header in ({"Authorization": "Basic abc"}, {"Authorization": "Bearer "}, {"X-Cashu": ""}):
        async with http.post(f"{node.url}{CHAT}", json=HELLO, headers=header) as response:
            assert response.status in (400, 401), header
    result = await reconcile(node.settings.nats_url)
    assert result.redeemed_msat == 0 and result.difference_msat == 0


async def test_dead_mint_is_503_and_the_token_stays_unspent(make_node, http, client_wallet, mint):
    from devstack.processes import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    node = await make_node(CORE, CASHU_MINTS=f"{mint.url},{dead}", **PRICES)
    token = _v3(dead, [{"id": "009a1f293253e41e", "amount": 2, "secret": "abc", "C": "02" + "ab" * 32}])
    async with http.post(f"{node.url}/v1/balance/create", json={"initial_balance_token": token}) as response:
        assert response.status == 503, await response.text()
    await assert_reconciled(node)
