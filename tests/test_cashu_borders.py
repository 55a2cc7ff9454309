"""Cashu without borders: tokens of unlisted mints swapped in over Lightning, keys funded from several
mints, Lightning invoices credited by themselves. Real nutshell mints (FakeWallet) throughout: `mint` is
the node's listed mint, `fee_mint` (100 ppk input fee, its own keys) plays the untrusted one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re

import aiohttp
import asyncpg
import pytest_asyncio
from aiohttp import web

from devstack import processes
from services.gateway.payment_request import token_face_sats
from services.wallet import ecash
from services.wallet.app import WALLET
from shared import bus, messaging
from tests.conftest import serve_app
from tests.support.keys import funded_key, reconcile
from tests.test_discovery import Relay, tags_of
from tests.test_gateway import auth, balance
from tests.test_lightning import new_invoice, status
from tests.test_wallet import error_of, holdings, redeem, start_wallet, with_mint

CORE = ("billing", "wallet", "gateway")


@pytest_asyncio.fixture
async def nc(nats_server):
    conn = await messaging.connect(nats_server.url, "test-borders")
    yield conn
    await conn.drain()


class FaultyMint:
    """A loopback HTTP relay in front of a real mint that spoils chosen calls: `refuse` answers the
    mint's own "not enough inputs" error without forwarding; `lose` forwards and drops the reply."""

    def __init__(self, target: str):
        self.target = target
        self.faults: dict[str, list[str]] = {}
        self.calls: dict[str, int] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> FaultyMint:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._session = aiohttp.ClientSession()
        self._runner, self.url = await serve_app(app)
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        self.calls[request.path] = self.calls.get(request.path, 0) + 1
        fault = self.faults.get(request.path, []).pop(0) if self.faults.get(request.path) else None
        if fault == "refuse":
            body = {"detail": "not enough inputs provided for melt", "code": 11000}
            return web.json_response(body, status=400)
        async with self._session.request(
            request.method, self.target + request.path_qs, data=await request.read(),
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as upstream:  # fmt: skip
            data = await upstream.read()
        if fault == "lose":
            return web.Response(status=502, text="bad gateway")
        return web.Response(status=upstream.status, body=data, content_type="application/json")


@pytest_asyncio.fixture(loop_scope="session")
async def faulty_fee_mint(fee_mint):
    faulty = await FaultyMint(fee_mint.url).start()
    yield faulty
    await faulty.stop()


def _is_swap(redeemed: bus.Redeemed, face: int, listed: str) -> None:
    assert redeemed.mint_url == listed, redeemed
    assert redeemed.amount_msat == face * 1000
    assert 0 < redeemed.credited_msat < face * 1000, redeemed
    assert redeemed.credited_msat % 1000 == 0 and redeemed.fee_msat == face * 1000 - redeemed.credited_msat


# ---- foreign-mint tokens through the wallet --------------------------------------------------------


async def test_foreign_token_is_swapped_in_below_face_value_once(make_node, nc, fee_client_wallet, mint):
    await start_wallet(make_node, nc)
    token = await fee_client_wallet.token(100)
    redeemed = await redeem(nc, token)
    _is_swap(redeemed, 100, mint.url)
    assert redeemed.credited_msat >= 90_000  # 1 % / 2 sat reserve and a 1 sat input fee, nothing more
    assert await fee_client_wallet.is_spent(token)
    assert await holdings(nc) == bus.Holdings(redeemed.credited_msat, {mint.url: redeemed.credited_msat})
    again = await redeem(nc, token)
    assert (again.already, again.credited_msat, again.token_hash) == (True, redeemed.credited_msat,
                                                                      ecash.token_hash(token))  # fmt: skip
    assert (await holdings(nc)).unspent_msat == redeemed.credited_msat


async def test_refused_melt_is_retried_smaller_and_credits(make_node, nc, fee_client_wallet, faulty_fee_mint, mint):
    await start_wallet(make_node, nc)
    faulty_fee_mint.faults["/v1/melt/bolt11"] = ["refuse"]
    token = await fee_client_wallet.token(64)
    redeemed = await redeem(nc, with_mint(token, faulty_fee_mint.url))
    _is_swap(redeemed, 64, mint.url)
    assert faulty_fee_mint.calls["/v1/melt/bolt11"] == 2
    assert await fee_client_wallet.is_spent(token)
    assert (await holdings(nc)).unspent_msat == redeemed.credited_msat


async def test_melt_whose_reply_was_lost_is_resolved_and_credited_once(make_node, nc, fee_client_wallet,
                                                                      faulty_fee_mint, mint):  # fmt: skip
    await start_wallet(make_node, nc)
    faulty_fee_mint.faults["/v1/melt/bolt11"] = ["lose"]
    token = with_mint(await fee_client_wallet.token(40), faulty_fee_mint.url)
    redeemed = await redeem(nc, token)
    _is_swap(redeemed, 40, mint.url)
    assert faulty_fee_mint.calls["/v1/melt/bolt11"] == 1  # NUT-05 quote state said paid: no second melt
    assert (await holdings(nc)).unspent_msat == redeemed.credited_msat
    assert (await redeem(nc, token)).already


async def test_crash_after_a_paid_melt_is_finished_by_the_sweeper(make_node, nc, fee_client_wallet, mint):
    """The melt paid but the wallet died before minting: the sweeper mints the invoice's ecash, and the
    client's retry with the same token is answered (and so credited) from the finished swap."""
    node = await start_wallet(make_node, nc)
    token = await fee_client_wallet.token(50)
    first = await redeem(nc, token)
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        quote_id = await conn.fetchval("SELECT mint_quote_id FROM wallet.foreign_swaps")
        await conn.execute("UPDATE wallet.foreign_swaps SET state = 'melting', done_at = NULL")
        await conn.execute("DELETE FROM wallet.proofs WHERE op = $1", f"mint:{quote_id}")
        await conn.execute("UPDATE wallet.mint_quotes SET state = 'minting' WHERE quote_id = $1", quote_id)
        assert (await holdings(nc)).unspent_msat == 0
        assert await node.runners[-1].app[WALLET].foreign.resolve_stale(older_than=0) == 1
        assert await conn.fetchval("SELECT state FROM wallet.foreign_swaps") == "done"
    finally:
        await conn.close()
    assert (await holdings(nc)).unspent_msat == first.credited_msat
    again = await redeem(nc, token)
    assert (again.already, again.credited_msat) == (True, first.credited_msat)


async def test_foreign_mint_down_is_503_and_token_stays_unspent(make_node, nc, fee_client_wallet):
    await start_wallet(make_node, nc)
    token = await fee_client_wallet.token(30)
    dead = f"http://127.0.0.1:{processes.free_port()}"
    error = await error_of(redeem(nc, with_mint(token, dead)))
    assert (error.code, error.status) == ("mint_unavailable", 503) and error.retry_after
    assert not await fee_client_wallet.is_spent(token)
    assert (await holdings(nc)).unspent_msat == 0


async def test_operator_limits_refuse_with_the_reason(make_node, nc, http, fee_client_wallet):
    node = await start_wallet(make_node, nc, CASHU_FOREIGN_MAX_SATS="80", CASHU_FOREIGN_HOURLY_SATS="120")
    big = await fee_client_wallet.token(100)
    error = await error_of(redeem(nc, big))
    assert (error.code, error.status) == ("foreign_mint_limit", 400)
    assert "80 sat" in error.message and "100 sat" in error.message
    first = await redeem(nc, await fee_client_wallet.token(70))
    assert first.credited_msat > 0
    second = await fee_client_wallet.token(60)
    error = await error_of(redeem(nc, second))
    assert (error.code, error.status) == ("foreign_mint_rate_limited", 429) and error.retry_after
    assert "120 sat an hour" in error.message
    for token in (big, second):
        assert not await fee_client_wallet.is_spent(token)
    async with http.get(f"{node.urls['wallet']}/metrics") as response:
        text = await response.text()
    assert 'routstr_foreign_swaps_total{outcome="limit"} 2.0' in text
    assert 'routstr_foreign_swaps_total{outcome="credited"} 1.0' in text


async def test_swaps_off_refuses_unlisted_mints(make_node, nc, fee_client_wallet, mint):
    await start_wallet(make_node, nc, CASHU_FOREIGN_MAX_SATS="0")
    token = await fee_client_wallet.token(5)
    error = await error_of(redeem(nc, token))
    assert (error.code, error.status) == ("mint_not_accepted", 400)
    assert not await fee_client_wallet.is_spent(token)


# ---- through the public API -----------------------------------------------------------------------


async def test_create_topup_and_x_cashu_with_foreign_tokens_credit_less_than_face(
    make_node, http, fee_client_wallet, client_wallet
):
    node = await make_node(CORE)
    token = await fee_client_wallet.token(50)
    async with http.post(f"{node.url}/v1/balance/create", json={"initial_balance_token": token}) as response:
        created = await response.json()
    assert response.status == 200, created
    assert 0 < created["balance"] < 50_000, created
    key = created["api_key"]
    topup = await fee_client_wallet.token(100)
    async with http.post(f"{node.url}/v1/wallet/topup", params={"cashu_token": topup}, json={},
                         headers=auth(key)) as response:  # fmt: skip
        topped = await response.json()
    assert response.status == 200, topped
    assert 0 < topped["msats"] < 100_000 and topped["balance"] == created["balance"] + topped["msats"], topped
    assert (await balance(http, node, key))["balance"] == topped["balance"]
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered, result
    assert result.wallet_unspent_msat == topped["balance"], result
    # Paying a call with X-Cashu from the unlisted mint: swapped in, change from the node's own mint.
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with http.post(f"{node.url}/v1/chat/completions", json=body,
                         headers={"X-Cashu": await fee_client_wallet.token(60)}) as response:  # fmt: skip
        assert response.status == 200, await response.text()
        change = response.headers["X-Cashu"]
    assert list(_mints_of(change)) == [node.settings.cashu_mints[0]]
    assert 0 < await client_wallet.receive(change) < 60
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered, result


async def test_dead_foreign_mint_over_http_is_503_with_retry_after(make_node, http, fee_client_wallet):
    node = await make_node(CORE)
    token = await fee_client_wallet.token(20)
    dead = with_mint(token, f"http://127.0.0.1:{processes.free_port()}")
    async with http.post(f"{node.url}/v1/balance/create", json={"initial_balance_token": dead}) as response:
        body = await response.json()
    assert response.status == 503 and response.headers.get("Retry-After"), body
    assert "detail" in body
    assert not await fee_client_wallet.is_spent(token)


# ---- Lightning that credits itself ----------------------------------------------------------------


async def test_paid_invoices_are_credited_without_a_status_call(make_node, http):
    node = await make_node(CORE)
    await make_node(("billing",))  # a second billing replica watching the same invoices
    key = await funded_key(node.settings.nats_url, 2_000)
    topup = await new_invoice(http, node, 12, "topup", headers=auth(key))
    create = await new_invoice(http, node, 7, "create")
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        for _ in range(100):  # FakeWallet pays at once; the watcher looks every second
            states = dict(await conn.fetch("SELECT invoice_id, state FROM billing.invoices"))
            if (await balance(http, node, key))["balance"] == 14_000 and set(states.values()) == {"paid"}:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"not credited by itself: {states}")
        assert states == {topup["invoice_id"]: "paid", create["invoice_id"]: "paid"}
        credits = await conn.fetchval("SELECT count(*) FROM billing.ledger WHERE kind = 'lightning_deposit'")
        assert credits == 2  # once per invoice, whichever replica saw it first
    finally:
        await conn.close()
    paid = await status(http, node, create["invoice_id"])  # the new key is still shown once, funded
    assert paid["status"] == "paid" and paid["api_key"], paid
    assert (await balance(http, node, paid["api_key"]))["balance"] == 7_000
    assert (await status(http, node, create["invoice_id"]))["api_key"] is None
    assert (await balance(http, node, key))["balance"] == 14_000
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered and result.lightning_in_msat == 19_000, result


async def test_quote_stuck_in_minting_is_resolved_by_the_watcher(make_node, http):
    """The wallet planned the mint (state `minting`) and stopped: the watcher finishes it and credits."""
    node = await make_node(CORE)
    key = await funded_key(node.settings.nats_url, 1_000)
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        invoice = await new_invoice(http, node, 9, "topup", headers=auth(key))
        for _ in range(100):
            if (await balance(http, node, key))["balance"] == 10_000:
                break
            await asyncio.sleep(0.1)
        quote = await conn.fetchrow("SELECT * FROM wallet.mint_quotes")
        assert quote["state"] == "issued"
        # Replay the crash: minted but proofs lost and the invoice uncredited; the watcher restores both.
        await conn.execute("DELETE FROM wallet.proofs WHERE op = $1", f"mint:{quote['quote_id']}")
        await conn.execute("UPDATE wallet.mint_quotes SET state = 'minting'")
        await conn.execute(
            "UPDATE billing.invoices SET state = 'pending', paid_at = NULL WHERE invoice_id = $1", invoice["invoice_id"]
        )
        await conn.execute(
            "DELETE FROM billing.ledger WHERE idempotency_key = $1", f"lightning:{invoice['invoice_id']}"
        )
        await conn.execute("UPDATE billing.keys SET balance_msat = 1000")
        for _ in range(100):
            if (await balance(http, node, key))["balance"] == 10_000:
                break
            await asyncio.sleep(0.1)
        assert (await conn.fetchval("SELECT state FROM wallet.mint_quotes")) == "issued"
    finally:
        await conn.close()
    assert (await balance(http, node, key))["balance"] == 10_000
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered and result.wallet_unspent_msat == 9_000, result


# ---- several mints, one key -----------------------------------------------------------------------


def _mints_of(token: str) -> dict[str, int]:
    """Sats per mint in a token (V3 may hold several mints, V4 one)."""
    if token.startswith("cashuA"):
        return {entry.mint: sum(p.amount for p in entry.proofs) for entry in ecash.TokenV3.deserialize(token).token}
    parsed = ecash.TokenV4.deserialize(token)
    return {parsed.mint: sum(p.amount for p in parsed.proofs)}


def _part(token: str, mint_url: str) -> str:
    parsed = ecash.TokenV3.deserialize(token)
    return ecash.TokenV3(token=[e for e in parsed.token if e.mint == mint_url]).serialize()


async def _create(http, node, token: str) -> dict:
    async with http.post(f"{node.url}/v1/balance/create", json={"initial_balance_token": token}) as response:
        body = await response.json()
    assert response.status == 200, body
    return body


async def _topup(http, node, key: str, token: str) -> dict:
    async with http.post(f"{node.url}/v1/balance/topup", json={"cashu_token": token}, headers=auth(key)) as response:
        body = await response.json()
    assert response.status == 200, body
    return body


async def _refund(http, node, key: str, body: dict | None = None) -> tuple[int, dict]:
    async with http.post(f"{node.url}/v1/balance/refund", json=body or {}, headers=auth(key)) as response:
        return response.status, await response.json()


async def test_key_funded_from_two_mints_refunds_its_whole_balance(
    make_node, http, mint, fee_mint, client_wallet, fee_client_wallet
):
    node = await make_node(CORE, CASHU_MINTS=f"{mint.url},{fee_mint.url}")
    created = await _create(http, node, await client_wallet.token(30))
    key = created["api_key"]
    topped = await _topup(http, node, key, await fee_client_wallet.token(40))
    owed = topped["balance"]
    assert 30_000 < owed < 70_000  # the fee mint's input fee came off
    status_, refunded = await _refund(http, node, key)
    assert status_ == 200, refunded
    assert refunded["token"].startswith("cashuA") and refunded["msats"] == str(owed // 1000 * 1000)
    parts = _mints_of(refunded["token"])
    assert set(parts) == {mint.url, fee_mint.url} and sum(parts.values()) == owed // 1000, parts
    by_mint = {next(iter(_mints_of(t))): t for t in refunded["tokens"]}  # each mint's part on its own
    assert by_mint == {m: _part(refunded["token"], m) for m in (mint.url, fee_mint.url)}
    assert await client_wallet.receive(by_mint[mint.url]) == parts[mint.url]
    assert await fee_client_wallet.receive(by_mint[fee_mint.url]) == parts[fee_mint.url]
    again = await _refund(http, node, key)  # a retry after a lost answer replays the same token
    assert again == (200, refunded)
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered and result.owed_msat == 0, result


async def test_refund_comes_from_the_named_mint_or_the_deposit_mint(
    make_node, http, mint, fee_mint, client_wallet, fee_client_wallet
):
    node = await make_node(CORE, CASHU_MINTS=f"{mint.url},{fee_mint.url}")
    big = await _create(http, node, await client_wallet.token(200))  # the wallet holds most at `mint`
    small = await _create(http, node, await client_wallet.token(10))
    await _create(http, node, await fee_client_wallet.token(100))
    from_fee_mint = await _create(http, node, await fee_client_wallet.token(20))
    status_, refunded = await _refund(http, node, from_fee_mint["api_key"])
    assert status_ == 200, refunded
    assert list(_mints_of(refunded["token"])) == [fee_mint.url], "a key's token comes back from its own mint"
    status_, bad = await _refund(http, node, small["api_key"], {"mint_url": "not a url"})
    assert status_ == 400 and "detail" in bad
    status_, named = await _refund(http, node, small["api_key"], {"mint_url": fee_mint.url + "/"})
    assert status_ == 200, named
    assert _mints_of(named["token"]) == {fee_mint.url: 10}, "the mint the client names"
    status_, short = await _refund(http, node, big["api_key"], {"mint": fee_mint.url})
    assert status_ == 200, short
    assert _mints_of(short["token"]) == {mint.url: 200}, "a named mint that holds too little: one that holds enough"
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered, result


async def test_x_cashu_change_comes_from_the_tokens_own_mint(
    make_node, http, mint, fee_mint, client_wallet, fee_client_wallet
):
    node = await make_node(CORE, CASHU_MINTS=f"{mint.url},{fee_mint.url}", FIXED_PRICING="true",
                           FIXED_COST_PER_REQUEST="1")  # fmt: skip
    await _create(http, node, await client_wallet.token(300))  # most of the wallet's ecash is at `mint`
    token = await fee_client_wallet.token(30)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with http.post(f"{node.url}/v1/chat/completions", json=body, headers={"X-Cashu": token}) as response:
        assert response.status == 200, await response.text()
        change = response.headers["X-Cashu"]
    assert list(_mints_of(change)) == [fee_mint.url]
    assert await fee_client_wallet.receive(change) > 0


# ---- NUT-24: standard 402s ------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
FIXED = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "0",
         "FIXED_PER_1K_OUTPUT_TOKENS": "10"}  # fmt: skip


def _decode_request(header: str):
    from cashu.core.nuts import nut18

    return nut18.deserialize(header)


async def test_too_small_x_cashu_is_refused_unredeemed_with_a_payment_request_a_wallet_pays(
    make_node, http, mint, client_wallet
):
    node = await make_node(CORE, **FIXED)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    small = await client_wallet.token(5)
    async with http.post(f"{node.url}{CHAT}", json=body, headers={"X-Cashu": small}) as response:
        refused = await response.json()
        header = response.headers.get("X-Cashu", "")
    assert response.status == 402, refused
    assert refused["error"]["code"] == "insufficient_balance" and refused["error"]["type"] == "insufficient_quota"
    assert not await client_wallet.is_spent(small), "refused before it was redeemed"
    request = _decode_request(header)
    assert (request.a, request.u, request.m) == (11, "sat", [mint.url]), request  # 1 sat + 1000 x 10 sat / 1k
    paying = await client_wallet.token(request.a)  # what a NUT-24 wallet does with the request
    async with http.post(f"{node.url}{CHAT}", json=body, headers={"X-Cashu": paying}) as response:
        assert response.status == 200, await response.text()
    assert await client_wallet.receive(small) == 5
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered, result


async def test_paid_call_without_credentials_keeps_its_401_and_carries_the_request(make_node, http, mint):
    node = await make_node(CORE, **FIXED)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    async with http.post(f"{node.url}{CHAT}", json=body) as response:
        answer = await response.json()
        header = response.headers.get("X-Cashu", "")
    assert response.status == 401
    assert answer["error"]["code"] == "missing_api_key" and answer["error"]["type"] == "authentication_error"
    request = _decode_request(header)
    assert (request.a, request.u, request.m) == (2, "sat", [mint.url]), request
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth("sk-" + "1" * 64)) as response:
        assert response.status == 401 and "X-Cashu" not in response.headers  # a wrong key is not a price question


# ---- NUT-11 locks and NUT-12 DLEQ -----------------------------------------------------------------


async def _node_pubkey(http, node) -> str:
    async with http.get(f"{node.url}/v1/info") as response:
        info = await response.json()
    assert response.status == 200 and re.fullmatch(r"0[23][0-9a-f]{64}", info["p2pk_pubkey"]), info
    return info["p2pk_pubkey"]


async def test_tokens_locked_to_the_node_pay_and_others_are_refused_unspent(make_node, http, client_wallet):
    node = await make_node(CORE, **FIXED)
    pubkey = await _node_pubkey(http, node)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    async with http.post(f"{node.url}{CHAT}", json=body) as response:
        request = _decode_request(response.headers["X-Cashu"])
    assert request.nut10 is not None and (request.nut10.k, request.nut10.d) == ("P2PK", pubkey), request
    locked = await client_wallet.token(request.a + 3, lock_to=pubkey)
    async with http.post(f"{node.url}{CHAT}", json=body, headers={"X-Cashu": locked}) as response:
        assert response.status == 200, await response.text()
        change = response.headers["X-Cashu"]
    assert await client_wallet.receive(change) == 3
    thief = ecash.PrivateKey().public_key.format().hex()  # somebody else's key
    for v4 in (True, False):
        other = await client_wallet.token(5, lock_to=thief, v4=v4)
        async with http.post(f"{node.url}/v1/balance/create", json={"initial_balance_token": other}) as response:
            refused = await response.json()
        assert response.status == 400 and "locked" in refused["detail"], refused
        assert not await client_wallet.is_spent(other)
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered, result


async def test_dleq_proofs_are_checked_before_any_swap(make_node, nc, client_wallet, mint):
    await start_wallet(make_node, nc)
    good = await client_wallet.token(6, dleq=True)
    assert all(p.dleq for p in ecash.parse_token(good).proofs)  # the client kept them in the token
    assert (await redeem(nc, good)).credited_msat == 6000
    forged = ecash.TokenV4.deserialize(await client_wallet.token(7, dleq=True))
    for group in forged.t:
        for proof in group.p:
            proof.d.s = bytes.fromhex(ecash.PrivateKey().to_hex())  # not the mint's proof any more
    bad = forged.serialize(include_dleq=True)
    error = await error_of(redeem(nc, bad))
    assert (error.code, error.status) == ("invalid_token", 400) and "DLEQ" in error.message
    assert not await client_wallet.is_spent(bad)
    assert (await holdings(nc)).unspent_msat == 6000


@pytest_asyncio.fixture(loop_scope="session")
async def nostr_relay():
    relay = Relay(processes.free_port())
    await relay.start()
    yield relay
    relay.stop()


async def test_the_announcement_carries_the_nodes_p2pk_key(make_node, nostr_relay, http):
    relay = nostr_relay
    node = await make_node(
        services=("billing", "wallet", "discovery", "gateway"), RELAYS=relay.url, HTTP_URL="https://node.example"
    )
    pubkey = await _node_pubkey(http, node)
    [event] = await relay.wait_for(lambda evs: len(evs) == 1 and "p2pk" in tags_of(evs[0]))
    assert tags_of(event)["p2pk"] == [pubkey]
    assert json.loads(event.content())["p2pk_pubkey"] == pubkey


def test_token_face_value_is_read_without_a_mint():
    proof = {"id": "00ad268c4d1f5826", "amount": 8, "secret": "s", "C": "02" + "11" * 32}
    v3 = _v3({"token": [{"mint": "http://m", "proofs": [proof, {**proof, "amount": 2}]}], "unit": "sat"})
    assert token_face_sats(v3) == 10
    v4 = ecash.TokenV4.deserialize(ecash.encode_token("http://m", [ecash.Proof(**proof)])).serialize()
    assert token_face_sats(v4) == 8
    for bad in ("cashuA!!", "cashuB" + "A" * 10, _v3({"token": [], "unit": "sat"}), "cashuX" + v3[6:],
                _v3({"token": [{"mint": "m", "proofs": [{**proof, "amount": -1}]}]}),
                _v3({"token": [{"mint": "m", "proofs": [proof]}], "unit": "usd"})):  # fmt: skip
        assert token_face_sats(bad) is None, bad


def _v3(body: dict) -> str:
    return "cashuA" + base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


async def test_foreign_token_locked_to_the_node_is_swapped_in(make_node, nc, fee_client_wallet, mint):
    await start_wallet(make_node, nc)
    key = await messaging.request(nc, bus.WALLET_PUBKEY, bus.PubkeyQuery(), bus.NodePubkey)
    token = await fee_client_wallet.token(40, lock_to=key.pubkey, dleq=True)
    _is_swap(await redeem(nc, token), 40, mint.url)
    assert await fee_client_wallet.is_spent(token)
