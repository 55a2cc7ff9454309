"""The wallet service's app: Postgres (migrated, seed loaded), a shared HTTP session for mints, NATS handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.wallet import storage
from services.wallet.ecash import Secrets
from services.wallet.foreign import ForeignSwaps
from services.wallet.locks import Locks, node_key
from services.wallet.mints import Mints
from services.wallet.node_wallet import NodeWallet
from shared import bus, db, messaging
from shared.config import Settings
from shared.messaging import BusError
from shared.metrics import WalletMetrics
from shared.service import CHECKS, NC, POOL, REGISTRY, SETTINGS, nats_check, ops_app, pool_check, retry_start

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
MINT_CALL_TIMEOUT = 20.0  # one mint call; below bus.MINT_TIMEOUT so a caller hears why, not a timeout
QUEUE = "wallet"
SWEEP_INTERVAL = 30.0  # seconds between looks for stale pending issues
STALE_AFTER = 120.0  # an operation pending this long lost its caller (bus.MINT_TIMEOUT is 30 s)

WALLET = web.AppKey("wallet", NodeWallet)


async def create_app(settings: Settings) -> web.Application:
    app = ops_app(settings, CollectorRegistry())
    app.cleanup_ctx.append(_resources)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = WalletMetrics(app[REGISTRY])
    async with contextlib.AsyncExitStack() as stack:
        pool = await retry_start("postgres", lambda: db.create_pool(settings.database_url, max_size=20))
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            await db.migrate(conn, "wallet", MIGRATIONS)
            secrets = Secrets(await storage.load_seed(conn))
        session = aiohttp.ClientSession()
        stack.push_async_callback(session.close)
        mints = Mints(session, metrics, MINT_CALL_TIMEOUT)
        wallet = NodeWallet(pool, mints, secrets, settings.cashu_mints, metrics, session)
        wallet.locks = Locks(node_key(secrets.derivation))
        wallet.foreign = ForeignSwaps(wallet, pool, settings.cashu_foreign_max_sats, settings.cashu_foreign_hourly_sats)
        await wallet.holdings()  # sets the unspent gauges from the start
        sweeper = asyncio.create_task(_sweep(wallet))
        stack.push_async_callback(_cancel, sweeper)

        nc = await retry_start("nats", lambda: messaging.connect(settings.nats_url, "wallet"))
        stack.push_async_callback(nc.drain)
        responder = messaging.Responder(nc, QUEUE)
        for subject, handler in _handlers(wallet).items():
            await responder.serve(subject, handler)
        await responder.ready()  # the server routes every subject here before anyone is told we are up
        app[POOL], app[NC], app[WALLET] = pool, nc, wallet
        app[CHECKS]["nats"] = nats_check(nc)
        app[CHECKS]["postgres"] = pool_check(pool)
        yield
        await responder.close(timeout=MINT_CALL_TIMEOUT + 5)


async def _sweep(wallet: NodeWallet) -> None:
    """Settle issues and payouts left pending by a mint outage or a vanished caller, so no proofs
    stay stuck."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        try:
            await wallet.resolve_stale_issues(older_than=STALE_AFTER)
            await wallet.resolve_stale_payouts(older_than=STALE_AFTER)
            if wallet.foreign is not None:
                await wallet.foreign.resolve_stale(older_than=STALE_AFTER)
        except Exception:
            log.exception("settling pending operations failed")


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _handlers(wallet: NodeWallet) -> dict[str, Callable[[bus.Message], Awaitable[msgspec.Struct]]]:
    def expect(kind: type, act: Callable) -> Callable[[bus.Message], Awaitable[msgspec.Struct]]:
        async def handle(message: bus.Message) -> msgspec.Struct:
            if not isinstance(message, kind):
                raise BusError(bus.Error("bad_message", f"expected {kind.__name__}, got {type(message).__name__}"))
            return await act(message)

        return handle

    return {
        bus.WALLET_REDEEM: expect(bus.Redeem, lambda m: wallet.redeem(m.token)),
        bus.WALLET_ISSUE: expect(bus.Issue, lambda m: wallet.issue(m.amount_msat, m.idempotency_key, m.mint_url)),
        bus.WALLET_HOLDINGS: expect(bus.HoldingsQuery, lambda m: wallet.holdings()),
        bus.WALLET_INVOICE: expect(bus.MintQuote, lambda m: wallet.invoice(m.amount_msat)),
        bus.WALLET_INVOICE_CHECK: expect(bus.MintQuoteCheck, lambda m: wallet.check_invoice(m.quote_id)),
        bus.WALLET_PUBKEY: expect(bus.PubkeyQuery, lambda m: _pubkey(wallet)),
        bus.WALLET_PAY: expect(bus.Pay, lambda m: wallet.pay(m.amount_msat, m.idempotency_key, m.lightning_address)),
    }


async def _pubkey(wallet: NodeWallet) -> bus.NodePubkey:
    return bus.NodePubkey(wallet.locks.pubkey if wallet.locks else "")
