"""Lightning top-up through the public HTTP API with a real mint (nutshell FakeWallet pays its own invoices)."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest

from shared import bus, messaging
from tests.support.keys import funded_key, reconcile
from tests.test_gateway import auth, balance

CORE = ("billing", "wallet", "gateway")
SK = re.compile(r"^sk-[0-9a-f]{64}$")


@pytest.fixture
async def node(make_node):
    return await make_node(CORE)


async def new_invoice(http, node, amount: int, purpose: str = "create", prefix: str = "/v2/lightning",
                      headers: dict | None = None) -> dict:  # fmt: skip
    async with http.post(f"{node.url}{prefix}/invoice", json={"amount_sats": amount, "purpose": purpose},
                         headers=headers or {}) as response:  # fmt: skip
        body = await response.json()
    assert response.status == 200, body
    assert body["amount_sats"] == amount and body["bolt11"].startswith("ln"), body
    assert re.fullmatch(r"[0-9a-f]{64}", body["payment_hash"]), body
    assert body["expires_at"] > 0 and body["invoice_id"]
    return body


async def status(http, node, invoice_id: str, prefix: str = "/v2/lightning") -> dict:
    async with http.get(f"{node.url}{prefix}/invoice/{invoice_id}/status") as response:
        body = await response.json()
    assert response.status == 200, body
    return body


async def until_paid(http, node, invoice_id: str, prefix: str = "/v2/lightning") -> dict:
    for _ in range(50):
        body = await status(http, node, invoice_id, prefix)
        if body["status"] == "paid":
            return body
        assert body["status"] == "pending" and body["api_key"] is None, body
        await asyncio.sleep(0.1)
    raise AssertionError("the FakeWallet invoice was never paid")


async def assert_reconciled(node) -> None:
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered, result


async def test_create_invoice_funds_a_new_key_once(node, http):
    invoice = await new_invoice(http, node, 21)
    paid = await until_paid(http, node, invoice["invoice_id"])
    assert SK.match(paid["api_key"]), paid
    assert paid["amount_sats"] == 21 and paid["paid_at"] >= paid["created_at"] > 0
    key = paid["api_key"]
    assert (await balance(http, node, key))["balance"] == 21_000
    for _ in range(4):  # the key is handed out once; asking again credits nothing more
        again = await status(http, node, invoice["invoice_id"])
        assert again["status"] == "paid" and again["api_key"] is None, again
    assert (await balance(http, node, key))["balance"] == 21_000
    result = await reconcile(node.settings.nats_url)
    assert result.lightning_in_msat == 21_000 and result.wallet_unspent_msat == 21_000, result
    await assert_reconciled(node)


async def test_concurrent_status_checks_credit_once(node, http):
    invoice = await new_invoice(http, node, 13, prefix="/lightning")
    await asyncio.sleep(0.3)  # FakeWallet marks it paid: the concurrent checks race to mint and credit
    answers: list[dict] = []
    for _ in range(50):
        batch = await asyncio.gather(*(status(http, node, invoice["invoice_id"], "/lightning") for _ in range(5)))
        answers += batch
        if any(a["status"] == "paid" for a in batch):
            break
        await asyncio.sleep(0.1)
    keys = [a["api_key"] for a in answers if a["api_key"]]
    assert len(keys) == 1, answers
    assert (await balance(http, node, keys[0]))["balance"] == 13_000
    await assert_reconciled(node)


async def test_topup_invoice_and_recover_by_bolt11(node, http):
    key = await funded_key(node.settings.nats_url, 5_000)
    invoice = await new_invoice(http, node, 10, "topup", "/v1/balance/lightning", headers=auth(key))
    paid = await until_paid(http, node, invoice["invoice_id"], "/v1/balance/lightning")
    assert paid["api_key"] is None, paid
    assert (await balance(http, node, key))["balance"] == 15_000
    async with http.post(f"{node.url}/v2/lightning/recover", json={"bolt11": invoice["bolt11"]}) as response:
        recovered = await response.json()
    assert response.status == 200, recovered
    assert recovered["invoice_id"] == invoice["invoice_id"] and recovered["status"] == "paid", recovered
    assert (await balance(http, node, key))["balance"] == 15_000
    await assert_reconciled(node)


async def test_errors(node, http):
    async with http.get(f"{node.url}/v2/lightning/invoice/nope/status") as response:
        assert response.status == 404 and "detail" in await response.json()
    async with http.post(f"{node.url}/v2/lightning/recover", json={"bolt11": "lnbc1nothing"}) as response:
        assert response.status == 404
    for amount in (0, 1_000_001, "5", None, 2.5, True):
        async with http.post(
            f"{node.url}/v2/lightning/invoice", json={"amount_sats": amount, "purpose": "create"}
        ) as r:
            assert r.status == 400, amount
            assert "detail" in await r.json()
    async with http.post(f"{node.url}/lightning/invoice", json={"amount_sats": 5, "purpose": "gift"}) as response:
        assert response.status == 400
    for headers in ({}, auth("sk-" + "0" * 64), auth("not-a-key")):
        async with http.post(f"{node.url}/v2/lightning/invoice", json={"amount_sats": 5, "purpose": "topup"},
                             headers=headers) as response:  # fmt: skip
            assert response.status == 401, (headers, await response.text())
            assert "detail" in await response.json()


async def test_wallet_restores_a_mint_whose_reply_was_lost(node):
    """The wallet minted but crashed before storing the proofs: a retry restores the same proofs."""
    nc = await messaging.connect(node.settings.nats_url, "test")
    try:
        quote = await messaging.request(nc, bus.WALLET_INVOICE, bus.MintQuote(8_000), bus.MintQuoteState, 30)
        assert quote.state == "pending" and quote.amount_msat == 8_000
        for _ in range(50):
            minted = await messaging.request(
                nc, bus.WALLET_INVOICE_CHECK, bus.MintQuoteCheck(quote.quote_id), bus.MintQuoteState, 30
            )
            if minted.state == "paid":
                break
            await asyncio.sleep(0.1)
        assert minted.state == "paid"
        conn = await asyncpg.connect(node.settings.database_url)
        try:
            op = f"mint:{quote.quote_id}"
            before = await conn.fetch("SELECT secret, c FROM wallet.proofs WHERE op = $1 ORDER BY secret", op)
            assert before
            await conn.execute("DELETE FROM wallet.proofs WHERE op = $1", op)
            await conn.execute("UPDATE wallet.mint_quotes SET state = 'minting' WHERE quote_id = $1", quote.quote_id)
            again = await messaging.request(
                nc, bus.WALLET_INVOICE_CHECK, bus.MintQuoteCheck(quote.quote_id), bus.MintQuoteState, 30
            )
            assert again.state == "paid"
            after = await conn.fetch("SELECT secret, c FROM wallet.proofs WHERE op = $1 ORDER BY secret", op)
            assert [tuple(r) for r in after] == [tuple(r) for r in before]
        finally:
            await conn.close()
        holdings = await messaging.request(nc, bus.WALLET_HOLDINGS, bus.HoldingsQuery(), bus.Holdings, 30)
        assert holdings.unspent_msat == 8_000
    finally:
        await nc.drain()
