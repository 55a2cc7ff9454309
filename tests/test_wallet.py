"""The wallet service through NATS, against real mints and Postgres; plus its pure coin logic."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from asyncio.subprocess import PIPE

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web

from devstack import processes
from devstack.client_wallet import ClientWallet
from services.wallet import ecash
from services.wallet.app import WALLET
from shared import bus, messaging
from shared.messaging import BusError


@pytest_asyncio.fixture
async def nc(nats_server):
    conn = await messaging.connect(nats_server.url, "test-wallet")
    yield conn
    await conn.drain()


async def start_wallet(make_node, nc, **env: str):
    """Start a node running only the wallet, and wait until it answers on the bus: a fresh client's
    very first request sometimes meets "no responders" although the subscriptions are flushed."""
    node = await make_node(services=("wallet",), **env)
    for _ in range(50):
        try:
            await holdings(nc)
            return node
        except BusError as exc:
            if exc.error.code != "unavailable":
                raise
            await asyncio.sleep(0.02)
    raise AssertionError("the wallet never answered")


async def redeem(nc, token: str) -> bus.Redeemed:
    return await messaging.request(nc, bus.WALLET_REDEEM, bus.Redeem(token), bus.Redeemed, bus.MINT_TIMEOUT)


async def issue(nc, amount_msat: int, key: str, mint_url: str | None = None) -> bus.Issued:
    message = bus.Issue(amount_msat, key, mint_url)
    return await messaging.request(nc, bus.WALLET_ISSUE, message, bus.Issued, bus.MINT_TIMEOUT)


async def holdings(nc) -> bus.Holdings:
    return await messaging.request(nc, bus.WALLET_HOLDINGS, bus.HoldingsQuery(), bus.Holdings)


async def error_of(call) -> bus.Error:
    with pytest.raises(BusError) as caught:
        await call
    return caught.value.error


def with_mint(token: str, mint_url: str) -> str:
    parsed = ecash.TokenV4.deserialize(token)
    parsed.m = mint_url
    return parsed.serialize()


def expected_fee(token: str, ppk: int) -> int:
    return (len(ecash.parse_token(token).proofs) * ppk + 999) // 1000


# ---- redeem ------------------------------------------------------------------------------------


async def test_redeem_v4_and_v3_credit_face_value(make_node, nc, client_wallet, mint):
    await start_wallet(make_node, nc)
    v4 = await client_wallet.token(21, v4=True)
    v3 = await client_wallet.token(13, v4=False)
    assert v4.startswith("cashuB") and v3.startswith("cashuA")

    first = await redeem(nc, v4)
    assert first == bus.Redeemed(ecash.token_hash(v4), mint.url, 21_000, 0, 21_000, already=False)
    second = await redeem(nc, v3)
    assert (second.amount_msat, second.credited_msat, second.already) == (13_000, 13_000, False)
    assert await client_wallet.is_spent(v4) and await client_wallet.is_spent(v3)
    assert await holdings(nc) == bus.Holdings(34_000, {mint.url: 34_000})


async def test_redeem_at_fee_mint_credits_amount_minus_fee(make_node, nc, fee_client_wallet, fee_mint):
    await start_wallet(make_node, nc, CASHU_MINTS=fee_mint.url + "/")
    token = await fee_client_wallet.token(15)  # 8+4+2+1: four inputs at 100 ppk -> 1 sat fee
    fee = expected_fee(token, 100)
    assert fee >= 1
    redeemed = await redeem(nc, token)
    assert (redeemed.amount_msat, redeemed.fee_msat, redeemed.credited_msat) == (15_000, fee * 1000, (15 - fee) * 1000)
    assert (await holdings(nc)).unspent_msat == redeemed.credited_msat


async def test_same_token_twice_and_concurrently_credits_once(make_node, nc, client_wallet):
    await start_wallet(make_node, nc)
    await start_wallet(make_node, nc)  # a second replica on the same database and NATS
    token = await client_wallet.token(8)
    first = await redeem(nc, token)
    again = await redeem(nc, token)
    assert again == bus.Redeemed(**{**_fields(first), "already": True})

    racing = await client_wallet.token(5)
    answers = await asyncio.gather(*(redeem(nc, racing) for _ in range(20)))
    assert sorted(a.already for a in answers) == [False] + [True] * 19
    assert {(a.token_hash, a.credited_msat) for a in answers} == {(ecash.token_hash(racing), 5000)}
    assert (await holdings(nc)).unspent_msat == 13_000


def _fields(struct) -> dict:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}


async def test_bad_tokens_are_invalid(make_node, nc, client_wallet, mint):
    await start_wallet(make_node, nc)
    good = await client_wallet.token(3)
    proof = ecash.parse_token(good).proofs[0]
    zero = "cashuA" + base64.urlsafe_b64encode(
        json.dumps(
            {"token": [{"mint": mint.url, "proofs": [{"id": proof.id, "amount": 0, "secret": "s", "C": proof.C}]}]}
        ).encode()
    ).decode().rstrip("=")
    usd = ecash.TokenV4.deserialize(good)
    usd.u = "usd"
    bad = {
        "garbage": "hello",
        "empty": "",
        "wrong prefix": "cashuC" + good[6:],
        "bad base64": "cashuB!!!!",
        "truncated": good[: len(good) // 2],
        "zero amount": zero,
        "usd unit": usd.serialize(),
        "huge": "cashuA" + "A" * (64 * 1024 + 10),
    }
    for kind, token in bad.items():
        error = await error_of(redeem(nc, token))
        assert (error.code, error.status) == ("invalid_token", 400), kind
    assert not await client_wallet.is_spent(good)
    assert (await holdings(nc)).unspent_msat == 0


async def test_foreign_mint_is_not_accepted(make_node, nc, fee_client_wallet, mint):
    await start_wallet(make_node, nc, CASHU_FOREIGN_MAX_SATS="0")
    token = await fee_client_wallet.token(2)
    error = await error_of(redeem(nc, token))
    assert (error.code, error.status) == ("mint_not_accepted", 400)
    assert mint.url in error.message
    assert not await fee_client_wallet.is_spent(token)


async def test_token_spent_by_someone_else(make_node, nc, client_wallet):
    await start_wallet(make_node, nc)
    token = await client_wallet.token(4)
    assert await ClientWallet(client_wallet.mint_url).receive(token) == 4
    error = await error_of(redeem(nc, token))
    assert (error.code, error.status) == ("cashu_token_already_spent", 400)
    assert (await holdings(nc)).unspent_msat == 0


async def test_dead_mint_is_unavailable_and_token_stays_unspent(make_node, nc, client_wallet, mint):
    dead = f"http://127.0.0.1:{processes.free_port()}"
    await start_wallet(make_node, nc, CASHU_MINTS=f"{mint.url},{dead}")
    token = await client_wallet.token(6)
    error = await error_of(redeem(nc, with_mint(token, dead)))
    assert (error.code, error.status) == ("mint_unavailable", 503)
    assert not await client_wallet.is_spent(token)
    redeemed = await redeem(nc, token)  # the same proofs at their real mint still work
    assert redeemed.credited_msat == 6000


async def test_redeem_recovers_a_swap_whose_result_was_lost(make_node, nc, client_wallet):
    """A crash after the mint swapped but before the proofs were stored: the retry restores them."""
    node = await start_wallet(make_node, nc)
    token = await client_wallet.token(9)
    first = await redeem(nc, token)
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        await conn.execute("UPDATE wallet.redemptions SET state = 'pending', done_at = NULL")
        await conn.execute("DELETE FROM wallet.proofs")
        assert (await holdings(nc)).unspent_msat == 0
        retried = await redeem(nc, token)
        assert retried == first
        assert (await holdings(nc)).unspent_msat == 9000
    finally:
        await conn.close()


# ---- issue -------------------------------------------------------------------------------------


async def test_issue_then_client_receives_and_retry_returns_same_token(make_node, nc, client_wallet, mint):
    await start_wallet(make_node, nc)
    await redeem(nc, await client_wallet.token(100))
    issued = await issue(nc, 21_999, "refund-1")  # rounds down to whole sats
    assert (issued.amount_msat, issued.mint_url, issued.fee_msat, issued.already) == (21_000, mint.url, 0, False)
    assert issued.token.startswith("cashuB")
    again = await issue(nc, 21_999, "refund-1")
    assert again.token == issued.token and again.already
    assert await ClientWallet(mint.url).receive(issued.token) == 21
    assert await holdings(nc) == bus.Holdings(79_000, {mint.url: 79_000})
    exact = await issue(nc, 4000, "change-1")  # 4 sat is one stored proof: no swap needed
    assert await ClientWallet(mint.url).receive(exact.token) == 4
    assert (await holdings(nc)).unspent_msat == 75_000


async def test_issue_refusals(make_node, nc, client_wallet):
    await start_wallet(make_node, nc)
    error = await error_of(issue(nc, 999, "tiny"))
    assert (error.code, error.status) == ("amount_too_small", 400)
    error = await error_of(issue(nc, 5000, "broke"))
    assert (error.code, error.status) == ("insufficient_funds", 503)
    await redeem(nc, await client_wallet.token(10))
    error = await error_of(issue(nc, 11_000, "too-much"))
    assert (error.code, error.status) == ("insufficient_funds", 503)
    assert (await holdings(nc)).unspent_msat == 10_000


async def test_issue_at_fee_mint_pays_fee_and_holdings_add_up(make_node, nc, fee_client_wallet, fee_mint):
    await start_wallet(make_node, nc, CASHU_MINTS=fee_mint.url)
    redeemed = await redeem(nc, await fee_client_wallet.token(64))
    assert redeemed.credited_msat == 63_000  # stored as 32+16+8+4+2+1
    exact = await issue(nc, 40_000, "fee-exact", mint_url=fee_mint.url)  # 32+8: no swap, no fee
    assert exact.fee_msat == 0
    swapped = await issue(nc, 10_000, "fee-swap", mint_url=fee_mint.url)  # 16+4+2+1 left: swap the 16
    assert swapped.fee_msat == 1000
    assert await ClientWallet(fee_mint.url).receive(swapped.token) == 10
    held = await holdings(nc)
    assert held.unspent_msat == redeemed.credited_msat - exact.amount_msat - swapped.amount_msat - swapped.fee_msat


async def test_issue_recovers_a_swap_whose_result_was_lost(make_node, nc, client_wallet, mint):
    """The swap happened at the mint but the node never stored it: a retry finds the inputs spent
    (NUT-07), restores the outputs (NUT-09) and returns the very same token."""
    node = await start_wallet(make_node, nc)
    await redeem(nc, await client_wallet.token(100))  # 64 + 32 + 4
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        before = {r["secret"] for r in await conn.fetch("SELECT secret FROM wallet.proofs")}
        issued = await issue(nc, 3000, "lost-reply")
        await conn.execute("UPDATE wallet.issues SET state = 'pending', token = NULL, done_at = NULL")
        await conn.execute("DELETE FROM wallet.proofs WHERE NOT secret = ANY($1::text[])", list(before))
        await conn.execute("UPDATE wallet.proofs SET state = 'pending' WHERE state = 'spent'")
        retried = await issue(nc, 3000, "lost-reply")
        assert retried.token == issued.token and not retried.already
        assert (await holdings(nc)).unspent_msat == 100_000 - 3000
        assert await conn.fetchval("SELECT count(*) FROM wallet.proofs WHERE state = 'pending'") == 0
    finally:
        await conn.close()
    assert await ClientWallet(mint.url).receive(issued.token) == 3


async def test_stale_pending_issues_are_settled(make_node, nc, client_wallet, mint):
    """A pending issue whose caller never came back: a swap the mint made is restored (the token
    waits for a retry); one it never made is undone and its proofs are spendable again."""
    node = await start_wallet(make_node, nc)
    wallet = node.runners[-1].app[WALLET]
    await redeem(nc, await client_wallet.token(100))  # 64 + 32 + 4
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        before = {r["secret"] for r in await conn.fetch("SELECT secret FROM wallet.proofs")}
        issued = await issue(nc, 3000, "made")
        await conn.execute("UPDATE wallet.issues SET state = 'pending', token = NULL, done_at = NULL")
        await conn.execute("DELETE FROM wallet.proofs WHERE NOT secret = ANY($1::text[])", list(before))
        await conn.execute("UPDATE wallet.proofs SET state = 'pending' WHERE state = 'spent'")
        # a second issue planned but never sent: its 32 sat input is stuck pending
        await conn.execute("UPDATE wallet.proofs SET state = 'pending', op = 'issue:never-sent' WHERE amount = 32")
        await conn.execute(
            """INSERT INTO wallet.issues (idempotency_key, mint_url, state, amount_sat, fee_sat, keyset_id, counter,
                                          send_amounts, keep_amounts)
               SELECT 'never-sent', mint_url, 'pending', 5, 0, keyset_id, 1000, '{1,4}', '{1,2,4,8,16,32}'
               FROM wallet.issues WHERE idempotency_key = 'made'"""
        )
        assert await wallet.resolve_stale_issues(older_than=0) == 2
        assert await conn.fetchval("SELECT count(*) FROM wallet.proofs WHERE state = 'pending'") == 0
        assert await conn.fetchval("SELECT count(*) FROM wallet.issues WHERE state = 'pending'") == 0
        assert (await holdings(nc)).unspent_msat == 97_000
        again = await issue(nc, 3000, "made")
        assert again.token == issued.token and again.already
    finally:
        await conn.close()


async def test_proofs_can_be_restored_from_the_seed_by_any_cashu_wallet(make_node, nc, client_wallet, mint, tmp_path):
    """NUT-13: with only the stored mnemonic, a stock cashu wallet recovers the node's ecash."""
    node = await start_wallet(make_node, nc)
    await redeem(nc, await client_wallet.token(100))
    await issue(nc, 3000, "some-change")
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        mnemonic = await conn.fetchval("SELECT mnemonic FROM wallet.seed")
    finally:
        await conn.close()
    from cashu.wallet.wallet import Wallet

    restored = await Wallet.with_db(url=mint.url, db=str(tmp_path), name="restore", skip_db_read=True)
    await restored.restore_wallet_from_mnemonic(mnemonic, to=2, batch=25)
    await restored.load_proofs(reload=True)
    spendable = [p for p in restored.proofs if not p.reserved]
    # the node's 97 sat, plus the unclaimed 3 sat token it cut (its proofs come from the same seed)
    assert sum(p.amount for p in spendable) == 100


async def test_issue_while_mint_is_down_keeps_the_proofs(make_node, nc, tmp_path):
    own_mint = processes.start_mint(tmp_path / "mint")
    try:
        await start_wallet(make_node, nc, CASHU_MINTS=own_mint.url)
        await redeem(nc, await ClientWallet(own_mint.url).token(100))  # 64 + 32 + 4
    finally:
        own_mint.stop()
    error = await error_of(issue(nc, 3000, "needs-swap"))
    assert (error.code, error.status) == ("mint_unavailable", 503)
    assert (await holdings(nc)).unspent_msat == 100_000
    exact = await issue(nc, 4000, "exact")  # no swap needed, so a down mint does not matter
    assert exact.amount_msat == 4000
    assert (await holdings(nc)).unspent_msat == 96_000


@pytest_asyncio.fixture
async def lnurl_service():
    """`await lnurl_service(mint_url)` -> (address, quote ids): an LNURL-pay service whose invoices are
    mint quotes at `mint_url`, so a payment made by that same mint shows up as a paid quote."""
    runners: list[web.AppRunner] = []

    async def start(invoice_mint: str) -> tuple[str, list[str]]:
        quotes: list[str] = []

        async def params(request: web.Request) -> web.Response:
            callback = f"http://{request.host}/callback"
            body = {"tag": "payRequest", "callback": callback, "minSendable": 1000, "maxSendable": 10**9}
            return web.json_response({**body, "metadata": "[]"})

        async def callback(request: web.Request) -> web.Response:
            body = {"amount": int(request.query["amount"]) // 1000, "unit": "sat"}
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{invoice_mint}/v1/mint/quote/bolt11", json=body) as resp:
                    quote = await resp.json()
            quotes.append(quote["quote"])
            return web.json_response({"pr": quote["request"], "routes": []})

        app = web.Application()
        app.router.add_get("/.well-known/lnurlp/alice", params)
        app.router.add_get("/callback", callback)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        port = processes.free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return f"alice@127.0.0.1:{port}", quotes

    yield start
    for runner in runners:
        await runner.cleanup()


async def pay(nc, amount_msat: int, key: str, address: str) -> bus.Paid:
    message = bus.Pay(amount_msat, key, address)
    return await messaging.request(nc, bus.WALLET_PAY, message, bus.Paid, bus.MINT_TIMEOUT)


async def test_pay_lightning_address(make_node, nc, client_wallet, mint, fee_mint, lnurl_service, http):
    address, quotes = await lnurl_service(fee_mint.url)  # another mint's invoice: a real outgoing payment
    node = await start_wallet(make_node, nc)
    await redeem(nc, await client_wallet.token(100))
    paid = await pay(nc, 30_500, "payout-1", address)
    assert (paid.amount_msat, paid.status) == (30_000, "paid")
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        melt_quote = await conn.fetchval("SELECT quote_id FROM wallet.payouts")
    finally:
        await conn.close()
    async with http.get(f"{mint.url}/v1/melt/quote/bolt11/{melt_quote}") as resp:
        assert (await resp.json())["state"] == "PAID"
    assert (await holdings(nc)).unspent_msat == 100_000 - paid.amount_msat - paid.fee_msat
    again = await pay(nc, 30_500, "payout-1", address)
    assert again == paid and len(quotes) == 1
    assert (await holdings(nc)).unspent_msat == 100_000 - paid.amount_msat - paid.fee_msat


async def test_pay_external_invoice_returns_unused_fee_reserve(
    make_node, nc, fee_client_wallet, fee_mint, mint, lnurl_service
):
    """Paying out of a fee mint to an invoice of another mint: the melt reserves a Lightning fee and
    NUT-08 change brings back what was not used; fee_msat is exactly what the node lost."""
    address, _ = await lnurl_service(mint.url)
    await start_wallet(make_node, nc, CASHU_MINTS=fee_mint.url)
    redeemed = await redeem(nc, await ClientWallet(fee_mint.url).token(100))
    paid = await pay(nc, 50_000, "external", address)
    assert (paid.amount_msat, paid.status) == (50_000, "paid") and paid.fee_msat > 0
    assert (await holdings(nc)).unspent_msat == redeemed.credited_msat - paid.amount_msat - paid.fee_msat


async def test_stale_unpaid_payout_is_undone(make_node, nc, client_wallet, mint, fee_mint, http):
    """A payout planned and its inputs set aside, but the melt never reached the mint: the sweeper
    sees the quote unpaid and the inputs unspent, and gives the proofs back."""
    node = await start_wallet(make_node, nc)
    wallet = node.runners[-1].app[WALLET]
    await redeem(nc, await client_wallet.token(100))  # 64 + 32 + 4
    async with http.post(f"{fee_mint.url}/v1/mint/quote/bolt11", json={"amount": 4, "unit": "sat"}) as resp:
        invoice = (await resp.json())["request"]
    async with http.post(f"{mint.url}/v1/melt/quote/bolt11", json={"unit": "sat", "request": invoice}) as resp:
        quote = (await resp.json())["quote"]
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        await conn.execute(
            """INSERT INTO wallet.payouts (idempotency_key, mint_url, recipient, state, amount_sat, quote_id,
                                           inputs_sat, cut_fee_sat, keyset_id, counter, n_change)
               SELECT 'stale', mint_url, 'alice@example.com', 'pending', 4, $1, 4, 0, keyset_id, 1000, 1
               FROM wallet.redemptions""",
            quote,
        )
        await conn.execute("UPDATE wallet.proofs SET state = 'pending', op = 'payout:stale' WHERE amount = 4")
        assert (await holdings(nc)).unspent_msat == 96_000
        assert await wallet.resolve_stale_payouts(older_than=0) == 1
        assert await conn.fetchval("SELECT count(*) FROM wallet.payouts") == 0
    finally:
        await conn.close()
    assert (await holdings(nc)).unspent_msat == 100_000


async def test_pay_refusals(make_node, nc, client_wallet, mint, lnurl_service):
    address, quotes = await lnurl_service(mint.url)
    await start_wallet(make_node, nc)
    error = await error_of(pay(nc, 5000, "broke", address))
    assert (error.code, error.status) == ("insufficient_funds", 503)
    await redeem(nc, await client_wallet.token(10))
    for bad in ("not an address", "alice@"):
        error = await error_of(pay(nc, 5000, "bad", bad))
        assert (error.code, error.status) == ("invalid_address", 400)
    dead = f"bob@127.0.0.1:{processes.free_port()}"
    error = await error_of(pay(nc, 5000, "dead", dead))
    assert (error.code, error.status) == ("lnurl_failed", 502)
    assert (await holdings(nc)).unspent_msat == 10_000 and not quotes


async def test_ready_and_metrics(make_node, http, nc, client_wallet, mint):
    node = await start_wallet(make_node, nc)
    await redeem(nc, await client_wallet.token(2))
    async with http.get(f"{node.urls['wallet']}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["checks"] == {"nats": True, "postgres": True}
    async with http.get(f"{node.urls['wallet']}/metrics") as resp:
        text = await resp.text()
    assert f'routstr_wallet_unspent_msat{{mint="{mint.url}"}} 2000.0' in text
    assert f'routstr_mint_up{{mint="{mint.url}"}} 1.0' in text
    assert 'operation="swap",outcome="ok"' in text


async def test_entry_point_migrates_and_importing_cashu_is_tame(database):
    """`python -m services.wallet migrate` works, and importing the service leaves tracebacks on and
    prints nothing (cashu would set sys.tracebacklimit = 0 and print a mnemonic hint)."""
    env = {**os.environ, "DATABASE_URL": database, "NATS_URL": ""}
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.wallet", "migrate", env=env, stdout=PIPE, stderr=PIPE
    )
    out, err = await migrate.communicate()
    assert migrate.returncode == 0, err.decode()
    assert out.decode().strip() == (
        "wallet: applied 3 migration(s): 001_init.sql, 002_mint_quotes.sql, 015_foreign_swaps.sql"
    )
    probe = "import sys, services.wallet.app; print(getattr(sys, 'tracebacklimit', 'unset'))"
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", probe, stdout=PIPE, stderr=PIPE)
    out, _ = await child.communicate()
    assert out.decode() == "unset\n"


# ---- pure logic --------------------------------------------------------------------------------


def _proofs(*amounts: int, keyset: str = "00aa") -> list:
    return [ecash.Proof(id=keyset, amount=a, secret=f"s{i}", C="02") for i, a in enumerate(amounts)]


def _keysets(ppk: int) -> dict:
    return {"00aa": ecash.Keyset("00aa", "sat", True, ppk)}


def test_choose_exact_and_inputs():
    proofs = _proofs(64, 32, 4, 1)
    assert sorted(p.amount for p in ecash.choose_exact(proofs, 36)) == [4, 32]
    assert ecash.choose_exact(proofs, 3) is None
    assert [p.amount for p in ecash.choose_inputs(proofs, 3, _keysets(0))] == [64]
    # 100 ppk: 64 alone covers 63 + 1 fee; 64 sat needs a second input and 1 sat fee
    assert [p.amount for p in ecash.choose_inputs(proofs, 63, _keysets(100))] == [64]
    assert [p.amount for p in ecash.choose_inputs(proofs, 64, _keysets(100))] == [64, 32]
    assert ecash.choose_inputs(proofs, 102, _keysets(0)) is None
    assert ecash.input_fee(_proofs(1, 1, 1), _keysets(100)) == 1
    assert ecash.input_fee(_proofs(*[1] * 11), _keysets(100)) == 2
    assert ecash.input_fee(_proofs(1), _keysets(0)) == 0


async def test_outputs_are_deterministic_per_seed_keyset_and_counter():
    mnemonic = ecash.new_mnemonic()
    one, two = ecash.Secrets(mnemonic), ecash.Secrets(mnemonic)
    keyset = "01" + "ab" * 32
    a = await one.outputs(keyset, 7, [1, 2])
    b = await two.outputs(keyset, 7, [1, 2])
    assert [o.message.B_ for o in a] == [o.message.B_ for o in b]
    c = await two.outputs(keyset, 8, [1])
    assert c[0].message.B_ == b[1].message.B_ and c[0].secret == b[1].secret
    other = await ecash.Secrets(ecash.new_mnemonic()).outputs(keyset, 7, [1])
    assert other[0].secret != a[0].secret
    assert mnemonic not in repr(one)
