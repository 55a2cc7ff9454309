"""Fault injection with real processes under mixed paid load: kill -9 of each service, NATS and Postgres
paused (SIGSTOP/SIGCONT) and killed and restarted, the mint paused and killed. The load mixes `sk-` keys
and X-Cashu payments, streamed and not. After each fault, once it is cleared: `reconcile` is 0, no
reservation is left open, no refund is left pending, and every X-Cashu token sent is accounted for to
the msat: what was charged + the change returned or collected (+ sub-sat dust left on its key) = its
value, or the node never took it and it is still the client's (unspent at the mint).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from devstack import processes
from devstack.client_wallet import ClientWallet
from shared import bus, messaging
from tests.conftest import node_env
from tests.support import natsauth
from tests.support.cluster import Cluster, Proc, wait_ready
from tests.support.faults import signal_tree
from tests.support.keys import funded_key, hash_of, reconcile
from tests.test_gateway import CHAT, auth

PRICES = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "1",
          "FIXED_PER_1K_OUTPUT_TOKENS": "1"}  # fmt: skip
GONE_AFTER = 6  # seconds: GATEWAY_GONE_AFTER here (heartbeats every second); RESERVATION_TTL stays 900
# Pending refunds retried every second; X-Cashu reservations whose call is over (its gateway died, or it gave
# up waiting for the reservation) released within about GONE_AFTER, by the gateways' heartbeats alone.
FAST = {"PENDING_RETRY_SECONDS": "1", "DEPENDENCY_TIMEOUT": "2", "GATEWAY_GONE_AFTER": str(GONE_AFTER),
        "LOG_LEVEL": "INFO"}  # fmt: skip
TOKEN_SATS = 20
SETTLE_WITHIN = 40.0  # seconds after a fault clears for every operation to end by itself


def chat(stream: bool) -> dict:
    content = "[[tokens:8]] [[slow:1]]" if stream else "hello [[tokens:3]]"
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 20,
            "stream": stream}  # fmt: skip


@dataclass
class Node:
    """A node of real processes; `nats` and `postgres` are set when the test owns them (to stop them)."""

    cluster: Cluster
    nats_url: str
    database_url: str
    mint_url: str
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return self.procs["gateway"].url

    async def restart(self, service: str) -> None:
        """Start `service` again on its old port (as a supervisor would), once it is dead."""
        old = self.procs[service]
        port = old.url.rsplit(":", 1)[1]
        var = {"gateway": "PORT", "billing": "BILLING_PORT", "wallet": "WALLET_PORT"}[service]
        self.procs[service] = await self.cluster.start(service, f"{service}-{time.monotonic_ns()}", **{var: port})


async def start_node(
    tmp_path: Path, nats: processes.Service, database_url: str, mint_url: str, upstream: str, **overrides: str
) -> Node:
    """Billing, wallet and gateway as processes, each on the bus as its own role (`nats` is the harness's NATS)."""
    cluster = Cluster(node_env(nats, database_url, upstream, mint_url, **{**PRICES, **FAST, **overrides}), tmp_path)
    node = Node(cluster, nats.url, database_url, mint_url)
    procs = await cluster.start_all(("billing", "billing"), ("wallet", "wallet"), ("gateway", "gateway"))
    node.procs = dict(zip(("billing", "wallet", "gateway"), procs, strict=True))
    return node


@dataclass
class Load:
    """Mixed paid calls from four workers until stopped: sk- and X-Cashu, streamed and not."""

    node: Node
    key: str
    tokens: list[str]
    statuses: Counter = field(default_factory=Counter)
    sent: dict[str, list[str]] = field(default_factory=dict)  # X-Cashu token -> change tokens received

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=25)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await asyncio.gather(*(self._worker(http, stop, i) for i in range(4)))

    async def _worker(self, http: aiohttp.ClientSession, stop: asyncio.Event, worker: int) -> None:
        for n in itertools.count(worker):
            if stop.is_set():
                return
            stream = n % 2 == 1
            xcashu = n % 4 >= 2 and self.tokens
            headers = {"X-Cashu": self.tokens.pop()} if xcashu else auth(self.key)
            if xcashu:
                self.sent[headers["X-Cashu"]] = []
            try:
                async with http.post(f"{self.node.gateway}{CHAT}", json=chat(stream), headers=headers) as response:
                    await response.read()
                    status = response.status
                    if status == 503 and "Retry-After" not in response.headers:
                        status = "503 without Retry-After"
                    if xcashu and "X-Cashu" in response.headers:
                        self.sent[headers["X-Cashu"]].append(response.headers["X-Cashu"])
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = exc.__class__.__name__
            self.statuses[status] += 1
            await asyncio.sleep(0.05)


async def under_load(node: Node, payer: ClientWallet, fault) -> Load:
    """Run the load, inject `fault` (an async callable) once the load is going, then stop the load."""
    key = await funded_key(node.nats_url, 5_000_000)
    tokens = [await payer.token(TOKEN_SATS) for _ in range(10)]
    load = Load(node, key, tokens)
    stop = asyncio.Event()
    running = asyncio.ensure_future(load.run(stop))
    await asyncio.sleep(1.5)
    await fault()
    await asyncio.sleep(1.5)  # load on the healed node
    stop.set()
    await running
    assert load.statuses[200] > 0, load.statuses
    # Load held: a call succeeds, or is refused with 503 + Retry-After, or (its gateway killed) cut off.
    assert set(load.statuses) <= {200, 503, "ClientConnectorError", "ClientPayloadError", "ServerDisconnectedError"}, (
        load.statuses
    )
    print(f"\n{getattr(fault, '__name__', fault)}: calls {dict(load.statuses)}, X-Cashu tokens {len(load.sent)}")
    return load


async def key_info(nc, token: str) -> bus.KeyInfo | None:
    try:
        return await messaging.request(nc, bus.BILLING_KEY_INFO, bus.KeyQuery(key_hash_of(token)), bus.KeyInfo)
    except messaging.BusError as exc:
        assert exc.error.code == "unknown_key", exc.error
        return None


async def collect(http: aiohttp.ClientSession, node: Node, token: str) -> tuple[int, str | None]:
    """POST /v1/balance/refund with the payment token until it ends: (status, change token or None)."""
    deadline = time.monotonic() + SETTLE_WITHIN
    while True:
        async with http.post(f"{node.gateway}/v1/balance/refund", headers={"X-Cashu": token}) as response:
            body = await response.json()
            if response.status == 200:
                return 200, response.headers["X-Cashu"]
            if response.status in (400, 404):
                return response.status, None
        assert time.monotonic() < deadline, (response.status, body)
        await asyncio.sleep(0.5)


def token_sats(token: str) -> int:
    from cashu.wallet.helpers import deserialize_token_from_string

    return sum(p.amount for p in deserialize_token_from_string(token).proofs)


async def assert_nothing_stuck(node: Node, load: Load, payer: ClientWallet) -> None:
    """The invariants of design §2 rule 7, once the fault has cleared."""
    for proc in node.procs.values():
        await wait_ready(proc, 60)
    db = await asyncpg.connect(node.database_url)
    nc = await messaging.connect(node.nats_url, "fault-check")
    try:
        deadline = time.monotonic() + SETTLE_WITHIN
        while True:
            open_, pending = (
                await db.fetchval("SELECT count(*) FROM billing.reservations WHERE state = 'open'"),
                await db.fetchval("SELECT count(*) FROM billing.refunds WHERE state = 'pending'"),
            )
            if open_ == 0 and pending == 0:
                break
            assert time.monotonic() < deadline, f"{open_} reservations open, {pending} refunds pending"
            await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as http:
            for token, changes in load.sent.items():
                status, collected = await collect(http, node, token)
                if status == 404:  # never taken: still the client's
                    assert not changes and not await payer.is_spent(token), token[:20]
                    continue
                changes = list(dict.fromkeys([*changes, *([collected] if collected else [])]))
                info = await key_info(nc, token)
                assert info is not None and info.reserved_msat == 0, info
                returned = 0
                for change in changes:
                    returned += token_sats(change) * 1000
                    assert await payer.receive(change) == token_sats(change)  # real, unspent ecash
                assert info.total_spent_msat + returned + info.balance_msat == TOKEN_SATS * 1000, (info, returned)
                assert info.balance_msat < 1000, info  # only dust stays
        result = await reconcile(node.nats_url)
        assert result.difference_msat == 0 and result.covered, result
    finally:
        await nc.drain()
        await db.close()


# ---- fixtures: parts the test may kill ------------------------------------------------------------------------


@pytest.fixture
async def own_nats(tmp_path):
    """NATS with the bus's users, as conftest's `nats_server`; `url` carries the harness user's credentials."""
    harness = secrets.token_urlsafe(16)
    nats = processes.start_nats(tmp_path / "nats", processes.nats_passwords(), {natsauth.HARNESS_USER: harness})
    nats.url = natsauth.harness_url(nats.url, harness)
    yield nats
    signal_tree(nats.process.pid, signal.SIGCONT)
    nats.stop()


@pytest.fixture
async def own_mint(tmp_path):
    mint = processes.start_mint(tmp_path / "mint")
    yield mint
    signal_tree(mint.process.pid, signal.SIGCONT)
    mint.stop()


# ---- the faults ---------------------------------------------------------------------------------------------


def pausing(part: processes.Service, seconds: float = 4) -> Callable[[], Awaitable[None]]:
    """A fault: `part` frozen (SIGSTOP to its process tree) for `seconds`, then let go."""

    async def pause() -> None:
        signal_tree(part.process.pid, signal.SIGSTOP)
        await asyncio.sleep(seconds)
        signal_tree(part.process.pid, signal.SIGCONT)

    return pause


async def survives(node: Node, wallet: ClientWallet, *faults: Callable[[], Awaitable[None]]) -> None:
    """Each fault in turn under mixed paid load, then nothing stuck; the node is stopped in the end."""
    try:
        for fault in faults:
            load = await under_load(node, wallet, fault)
            await assert_nothing_stuck(node, load, wallet)
    finally:
        await node.cluster.stop()


async def test_kill_9_of_each_service_under_load(tmp_path, own_nats, database, upstream, mint, client_wallet):
    node = await start_node(tmp_path, own_nats, database, mint.url, upstream)

    def killing(service: str) -> Callable[[], Awaitable[None]]:
        async def kill() -> None:
            node.procs[service].process.kill()
            node.procs[service].process.wait()
            await asyncio.sleep(1)
            await node.restart(service)

        return kill

    await survives(node, client_wallet, *(killing(service) for service in ("billing", "wallet", "gateway")))


async def test_nats_paused_then_killed_and_restarted(tmp_path, own_nats, database, upstream, mint, client_wallet):
    node = await start_node(tmp_path, own_nats, database, mint.url, upstream)
    port = int(own_nats.url.rsplit(":", 1)[1])

    async def kill() -> None:
        own_nats.process.kill()
        own_nats.process.wait()
        await asyncio.sleep(2)
        harness = {natsauth.HARNESS_USER: urlsplit(own_nats.url).password}
        own_nats.process = processes.start_nats(tmp_path / "nats", own_nats.extra, harness, port=port).process

    await survives(node, client_wallet, pausing(own_nats), kill)


async def test_postgres_paused_then_killed_and_restarted(tmp_path, own_nats, own_postgres, upstream, mint,
                                                         client_wallet):  # fmt: skip
    database = own_postgres.url.rsplit("/", 1)[0] + "/node"
    node = await start_node(tmp_path, own_nats, database, mint.url, upstream)
    port = int(own_postgres.url.rsplit(":", 1)[1].split("/")[0])
    workdir = own_postgres.log_path.parent

    async def kill() -> None:
        signal_tree(own_postgres.process.pid, signal.SIGKILL)
        own_postgres.process.wait()
        await asyncio.sleep(1)
        own_postgres.process = processes.start_postgres(workdir, port=port).process

    await survives(node, client_wallet, pausing(own_postgres), kill)


async def test_mint_paused_then_killed_and_restarted(tmp_path, own_nats, database, upstream, own_mint):
    payer = ClientWallet(own_mint.url)
    node = await start_node(tmp_path, own_nats, database, own_mint.url, upstream)
    port = int(own_mint.url.rsplit(":", 1)[1])

    async def kill() -> None:
        own_mint.process.kill()
        own_mint.process.wait()
        await asyncio.sleep(1)
        own_mint.process = processes.start_mint(tmp_path / "mint", port=port).process

    await survives(node, payer, pausing(own_mint), kill)


# ---- Postgres stalled: deposits and refunds answer 503 at once, and settle once it is back ----------------------


async def timed_post(http: aiohttp.ClientSession, url: str, **kwargs) -> tuple[int, dict, dict, float]:
    """(status, headers, JSON body, seconds) of one POST."""
    started = time.monotonic()
    async with http.post(url, **kwargs) as response:
        body = await response.json(content_type=None)
        return response.status, dict(response.headers), body, time.monotonic() - started


def refused_in_time(answer: tuple[int, dict, dict, float], bound: float) -> None:
    """A dependency outage as the contract says: 503, Retry-After and a `detail`, within `bound` seconds."""
    status, headers, body, seconds = answer
    assert status == 503 and headers.get("Retry-After") and body.get("detail"), answer
    assert seconds < bound, f"answered after {seconds:.1f}s: {answer}"


async def until_ok(http: aiohttp.ClientSession, url: str, **kwargs) -> tuple[int, dict, dict, float]:
    """POST until 200 (the dependency is back): a refused attempt must still be a quick 503 + Retry-After."""
    deadline = time.monotonic() + SETTLE_WITHIN
    while True:
        answer = await timed_post(http, url, **kwargs)
        if answer[0] == 200:
            return answer
        refused_in_time(answer, float(FAST["DEPENDENCY_TIMEOUT"]) + 2)
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.5)


async def test_postgres_stalled_deposits_and_refunds_answer_503_at_once(
    tmp_path, own_nats, own_postgres, upstream, mint, client_wallet
):
    """Postgres frozen (SIGSTOP, so connections hang rather than fail): a top-up, a key made from a token
    and a refund each answer 503 + Retry-After within DEPENDENCY_TIMEOUT + 2 s, however often retried;
    once Postgres runs again the same requests succeed, each token is credited exactly once and the refund
    pays out once. A token the wallet redeemed while billing's own write hung (a lock held on
    billing.deposits) is credited by the client's retry of the same top-up."""
    database = own_postgres.url.rsplit("/", 1)[0] + "/node"
    node = await start_node(tmp_path, own_nats, database, mint.url, upstream)
    bound = float(FAST["DEPENDENCY_TIMEOUT"]) + 2
    gateway = node.gateway
    topup_key = await funded_key(node.nats_url, 1_000_000)
    async with aiohttp.ClientSession() as http:  # a refund pays out ecash paid in, not operator credit
        created = {"initial_balance_token": await client_wallet.token(7)}
        async with http.post(f"{gateway}/v1/balance/create", json=created) as response:
            assert response.status == 200, await response.text()
            refund_key = (await response.json())["api_key"]
    topup_token, create_token, locked_token = [await client_wallet.token(TOKEN_SATS) for _ in range(3)]
    topup = {"url": f"{gateway}/v1/balance/topup", "json": {"cashu_token": topup_token}, "headers": auth(topup_key)}
    create = {"url": f"{gateway}/v1/balance/create", "json": {"initial_balance_token": create_token}}
    refund = {"url": f"{gateway}/v1/balance/refund", "headers": auth(refund_key)}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            signal_tree(own_postgres.process.pid, signal.SIGSTOP)
            try:
                for _ in range(2):  # a client retrying during the stall gets the same quick answer
                    answers = await asyncio.gather(*(timed_post(http, **r) for r in (topup, create, refund)))
                    print("\nPostgres stalled:", [(a[0], round(a[3], 2), a[2].get("detail")) for a in answers])
                    for answer in answers:
                        refused_in_time(answer, bound)
            finally:
                signal_tree(own_postgres.process.pid, signal.SIGCONT)

            _, _, topped, _ = await until_ok(http, **topup)
            assert topped["msats"] == TOKEN_SATS * 1000 and topped["balance"] == 1_000_000 + TOKEN_SATS * 1000, topped
            _, _, again, _ = await until_ok(http, **topup)  # a repeat is answered, not credited again
            assert again["balance"] == topped["balance"], again
            _, _, created, _ = await until_ok(http, **create)
            assert created["balance"] == TOKEN_SATS * 1000, created
            _, _, paid, _ = await until_ok(http, **refund)
            assert paid["msats"] == "7000" and await client_wallet.receive(paid["token"]) == 7, paid
            assert (await until_ok(http, **refund))[2]["refund_id"] == paid["refund_id"]  # a replay

            # Billing's write hangs while the wallet's do not: the token is redeemed, its credit is not written.
            locked = {**topup, "json": {"cashu_token": locked_token}}
            holder = await asyncpg.connect(database)
            try:
                async with holder.transaction():
                    await holder.execute("LOCK TABLE billing.deposits IN EXCLUSIVE MODE")  # reads pass, writes wait
                    refused_in_time(await timed_post(http, **locked), bound)
                    assert await client_wallet.is_spent(locked_token)  # the node holds its proofs now
            finally:
                await holder.close()
            _, _, credited, _ = await until_ok(http, **locked)
            assert credited["msats"] == TOKEN_SATS * 1000, credited
            assert credited["balance"] == topped["balance"] + TOKEN_SATS * 1000, credited
        db = await asyncpg.connect(database)
        try:
            assert await db.fetchval("SELECT count(*) FROM billing.refunds WHERE state = 'pending'") == 0
            assert await db.fetchval("SELECT count(*) FROM billing.deposits") == 4  # and the refund key's
        finally:
            await db.close()
        result = await reconcile(node.nats_url)
        assert result.difference_msat == 0 and result.covered, result
    finally:
        await node.cluster.stop()


# ---- a deposit cut between the wallet's redeem and billing's credit ends by itself, with no retry -------------------

DEPOSIT_BOUND = 60.0  # seconds from a top-up's request to its end by itself (README: INTENT_DUE + a loop pass)


async def test_deposit_cut_after_the_redeem_is_credited_without_a_retry(
    tmp_path, own_nats, own_postgres, upstream, mint, client_wallet
):
    """Two top-ups of an `sk-` key that no client retries. (1) The wallet is down when billing asks: the client
    gets 503 + Retry-After, the deposit loop finds the wallet never took the token, closes the intent and
    credits nothing; the token stays unspent and the client's later retry is credited once. (2) The wallet
    redeems the token while billing's credit hangs (billing.deposits locked), then billing is killed -9,
    the lock released and billing started again: within DEPOSIT_BOUND s of the request the key shows the
    token's value, credited once; no intent, reservation or refund is left and reconcile is 0."""
    database = own_postgres.url.rsplit("/", 1)[0] + "/node"
    # DEPENDENCY_TIMEOUT 10: billing's credit waits out the lock below, so the kill lands while it hangs.
    node = await start_node(tmp_path, own_nats, database, mint.url, upstream, DEPENDENCY_TIMEOUT="10")
    key = await funded_key(node.nats_url, 1_000_000)
    unstarted_token, cut_token = [await client_wallet.token(TOKEN_SATS) for _ in range(2)]

    def topup(token: str) -> dict:
        return {"url": f"{node.gateway}/v1/balance/topup", "json": {"cashu_token": token}, "headers": auth(key)}

    db = await asyncpg.connect(database)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            node.procs["wallet"].process.kill()
            node.procs["wallet"].process.wait()
            started = time.monotonic()
            refused_in_time(await timed_post(http, **topup(unstarted_token)), 5)
            await node.restart("wallet")

            holder = await asyncpg.connect(database)
            try:
                async with holder.transaction():
                    await holder.execute("LOCK TABLE billing.deposits IN EXCLUSIVE MODE")  # reads pass, writes wait
                    cut = asyncio.ensure_future(timed_post(http, **topup(cut_token)))
                    cut_at = time.monotonic()
                    while not await client_wallet.is_spent(cut_token):  # the wallet redeemed it; the credit hangs
                        assert time.monotonic() - cut_at < 20 and not cut.done(), cut
                        await asyncio.sleep(0.05)
                    node.procs["billing"].process.kill()
                    node.procs["billing"].process.wait()
            finally:
                await holder.close()
            healed = time.monotonic()
            await node.restart("billing")
            assert (await db.fetchval("SELECT count(*) FROM billing.deposit_intents")) == 2
            status, headers, body, _ = await cut
            assert status == 503 and headers.get("Retry-After"), (status, body)

            # No client retries: the deposit loop ends both by itself.
            while True:
                async with http.get(f"{node.gateway}/v1/balance/info", headers=auth(key)) as response:
                    balance = (await response.json())["balance"]
                intents = await db.fetchval("SELECT count(*) FROM billing.deposit_intents")
                if balance == 1_000_000 + TOKEN_SATS * 1000 and intents == 0:
                    break
                assert balance in (1_000_000, 1_000_000 + TOKEN_SATS * 1000), balance
                assert time.monotonic() - cut_at < DEPOSIT_BOUND, (balance, intents)
                await asyncio.sleep(0.5)
            print(f"\ncut deposit credited {time.monotonic() - cut_at:.1f}s after its request,"
                  f" {time.monotonic() - healed:.1f}s after billing was back;"
                  f" the unstarted one closed {time.monotonic() - started:.1f}s after its request")  # fmt: skip
            assert not await client_wallet.is_spent(unstarted_token)  # never taken: still the client's
            cut_hash = hash_of(cut_token)
            assert await db.fetchval("SELECT count(*) FROM billing.ledger WHERE idempotency_key = $1",
                                     f"deposit:{cut_hash}") == 1  # fmt: skip
            assert await db.fetchval("SELECT state FROM wallet.redemptions WHERE token_hash = $1", cut_hash) == "done"

            # The client's own retry of the token the wallet never took works, once.
            status, _, credited, _ = await until_ok(http, **topup(unstarted_token))
            assert credited["msats"] == TOKEN_SATS * 1000, credited
            assert credited["balance"] == 1_000_000 + 2 * TOKEN_SATS * 1000, credited
            status, _, again, _ = await until_ok(http, **topup(cut_token))  # a late retry: answered, not credited
            assert again["balance"] == credited["balance"], again
        assert await db.fetchval("SELECT count(*) FROM billing.deposit_intents") == 0
        assert await db.fetchval("SELECT count(*) FROM billing.deposits") == 2
        assert await db.fetchval("SELECT count(*) FROM billing.reservations WHERE state = 'open'") == 0
        assert await db.fetchval("SELECT count(*) FROM billing.refunds WHERE state = 'pending'") == 0
        result = await reconcile(node.nats_url)
        assert result.difference_msat == 0 and result.covered, result
    finally:
        await db.close()
        await node.cluster.stop()


# ---- a gateway killed mid-call: its X-Cashu reservations end within GATEWAY_GONE_AFTER ----------------------------


async def xcashu_call(http: aiohttp.ClientSession, url: str, token: str, content: str, stream: bool) -> tuple:
    """(status, change token or None) of one X-Cashu call; the status is the exception's name when cut off."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 20,
            "stream": stream}  # fmt: skip
    try:
        async with http.post(f"{url}{CHAT}", json=body, headers={"X-Cashu": token}) as response:
            await response.read()
            return response.status, response.headers.get("X-Cashu")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return exc.__class__.__name__, None


def key_hash_of(token: str) -> str:
    """The `key_hash` of the `sk-` key a token used as a Bearer makes (`sk-` + its hex SHA-256)."""
    return hash_of("sk-" + hash_of(token))


async def test_xcashu_reservations_without_a_caller_end_within_gone_after(
    tmp_path, own_nats, database, upstream, mint, client_wallet
):
    """X-Cashu reservations whose call is over end within about GATEWAY_GONE_AFTER (RESERVATION_TTL is 900 s),
    uncharged, and each token's value is then collectable as change with the same X-Cashu header:

    1. `billing.reserve` answers the gateway 503 (Postgres slow: the reservations table locked) but makes the
       reservation afterwards; the live gateway's heartbeats do not name the call, so billing releases it.
    2. kill -9 of a gateway with X-Cashu calls in flight (streamed and not): billing releases its reservations
       once its heartbeats stop. A second gateway, alive, has a stream running three times
       GATEWAY_GONE_AFTER: its reservation is not released under it, and the call is charged once."""
    # DEPENDENCY_TIMEOUT 8: the reserve statement waits out the lock below, the gateway's 5 s bus timeout does not.
    node = await start_node(tmp_path, own_nats, database, mint.url, upstream, DEPENDENCY_TIMEOUT="8")
    alive = await node.cluster.start("gateway", "gateway-alive")
    load = Load(node, "", [])
    late, *doomed = [await client_wallet.token(TOKEN_SATS) for _ in range(4)]
    survivor = await client_wallet.token(TOKEN_SATS)
    db = await asyncpg.connect(database)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            locker = await asyncpg.connect(database)  # pg_stat_activity is a snapshot inside a transaction
            try:
                async with locker.transaction():
                    await locker.execute("LOCK TABLE billing.reservations IN EXCLUSIVE MODE")  # reads pass, writes wait
                    call = asyncio.ensure_future(xcashu_call(http, node.gateway, late, "hello [[tokens:3]]", False))
                    for _ in range(200):  # the gateway gave up on the reservation and asks for the change
                        if await db.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND query = 'SELECT * FROM billing.keys WHERE key_hash = $1 FOR UPDATE'"
                        ):
                            break
                        await asyncio.sleep(0.1)
                    else:
                        raise AssertionError(f"the gateway did not give up on billing.reserve: {call}")
            finally:
                await locker.close()
            # Unlocked: the reservation is made now, so the change waits for it (425) and comes later.
            status, change = await call
            assert status == 503 and change is None, status
            made = time.monotonic()
            opened = "SELECT count(*) FROM billing.reservations WHERE state = 'open' AND key_hash = $1"
            assert await db.fetchval(opened, key_hash_of(late)) == 1  # made after the caller gave up
            while await db.fetchval(opened, key_hash_of(late)):
                assert time.monotonic() - made < GONE_AFTER + 8, "a reservation without a call is still open"
                await asyncio.sleep(0.2)
            print(f"\na reservation made after its caller gave up released {time.monotonic() - made:.1f}s later")
            load.sent[late] = []

            calls = [
                asyncio.ensure_future(xcashu_call(http, node.gateway, doomed[0], "[[tokens:10]] [[slow:30]]", True)),
                asyncio.ensure_future(xcashu_call(http, node.gateway, doomed[1], "[[tokens:10]] [[slow:30]]", True)),
                asyncio.ensure_future(xcashu_call(http, node.gateway, doomed[2], "hi [[slow:30]]", False)),
            ]
            long_stream = f"[[tokens:10]] [[slow:{3 * GONE_AFTER}]]"
            kept = asyncio.ensure_future(xcashu_call(http, alive.url, survivor, long_stream, True))
            for _ in range(300):  # every call holds its reservation
                if await db.fetchval("SELECT count(*) FROM billing.reservations WHERE state = 'open'") == 4:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the calls did not all reserve")
            node.procs["gateway"].process.kill()
            node.procs["gateway"].process.wait()
            killed = time.monotonic()
            doomed_hashes = [key_hash_of(token) for token in doomed]
            while await db.fetchval(
                "SELECT count(*) FROM billing.reservations WHERE state = 'open' AND key_hash = ANY($1::text[])",
                doomed_hashes,
            ):
                assert time.monotonic() - killed < GONE_AFTER + 8, "a dead gateway's reservations are still open"
                await asyncio.sleep(0.2)
            released_after = time.monotonic() - killed
            print(f"\nreservations of the killed gateway released {released_after:.1f}s after kill -9")
            assert released_after > GONE_AFTER - 1  # by its silence, not sooner
            assert not kept.done()  # the live gateway's stream runs on, its reservation still held
            kept_state = "SELECT state FROM billing.reservations WHERE key_hash = $1"
            assert await db.fetchval(kept_state, key_hash_of(survivor)) == "open"
            assert 200 not in [status for status, _ in await asyncio.gather(*calls)]  # cut off
            status, change = await kept
            assert status == 200, status
            load.sent.update({token: [] for token in doomed})
            load.sent[survivor] = [change] if change else []
        charged = await db.fetchval(
            "SELECT cost_msat FROM billing.settlements WHERE key_hash = $1", key_hash_of(survivor)
        )
        assert charged and charged > 0, charged  # the long stream was charged, once
        assert (
            await db.fetchval(
                "SELECT count(*) FROM billing.settlements WHERE key_hash = ANY($1::text[])", doomed_hashes
            )
            == 0
        )  # the cut-off calls are free
        await node.restart("gateway")
        await assert_nothing_stuck(node, load, client_wallet)  # each token: charged + change = its value
    finally:
        await db.close()
        await node.cluster.stop()
