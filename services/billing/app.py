"""Billing's app factory: Postgres and migrations, bus handlers, the usage-stream consumer and the sweeper."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aiohttp
from aiohttp import web
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from services.billing.accounts import Accounts
from services.billing.admin import Admin
from services.billing.catalog import Catalog, load_models_file
from services.billing.grants import Grants
from services.billing.invoice_watcher import INVOICE_WATCH_EVERY, credit_paid_invoices
from services.billing.ledger import Ledger, LedgerError
from services.billing.liveness import Liveness
from services.billing.providers import ProviderStore, load_providers_file, shorthand_provider
from shared import bus, db, messaging, tls
from shared.config import Settings
from shared.metrics import BillingMetrics
from shared.secretbox import SecretBox
from shared.service import CHECKS, NC, POOL, SETTINGS, nats_check, ops_app, pool_check, retry_start, wait_event

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
METRICS = web.AppKey("billing_metrics", BillingMetrics)
ACCOUNTS = web.AppKey("accounts", Accounts)
ADMIN = web.AppKey("admin", Admin)
ADMIN_EVERY = 60.0  # seconds between admin housekeeping rounds (retention, stale withdrawals, auto payout)
PROVIDERS = web.AppKey("providers", ProviderStore)
SUBJECTS = (
    bus.BILLING_RESERVE, bus.BILLING_SETTLE, bus.BILLING_DEPOSIT, bus.BILLING_KEY_INFO, bus.BILLING_CREATE_KEY,
    bus.BILLING_REFUND, bus.BILLING_MODELS, bus.BILLING_RECONCILE, bus.BILLING_INVOICE_CREATE,
    bus.BILLING_INVOICE_STATUS, bus.BILLING_UPSTREAMS, bus.BILLING_CREDIT_CONTROL, bus.BILLING_RATE,
    bus.BILLING_REFUND_STATUS,
)  # fmt: skip
# Answered after a wallet call (a mint): bounded by the caller's bus.MINT_TIMEOUT instead. Their database
# work is bounded all the same: each statement by DEPENDENCY_TIMEOUT (shared.db drops a stalled connection).
WAITS_ON_WALLET = {
    bus.BILLING_DEPOSIT, bus.BILLING_REFUND, bus.BILLING_RECONCILE, bus.BILLING_INVOICE_CREATE,
    bus.BILLING_INVOICE_STATUS,
}  # fmt: skip
CATALOG_REFRESH = 600.0  # seconds between upstream model list / rate refreshes
SWEEP_EVERY = 5.0
# Usage is fetched in batches of up to USAGE_FETCH messages and, when a fetch was not full, the next one
# waits USAGE_LINGER seconds: under load each transaction then settles many calls instead of a few (the
# per-transaction cost dominates), for a settlement lag of at most this much more. Answers never wait
# for settlement (their charge is held on a grant or a reservation), so clients do not see the linger.
USAGE_FETCH = 256
USAGE_LINGER = 0.05
GAUGES_EVERY = 10.0


async def consume_usage(nc: NATS, accounts: Accounts, stop: asyncio.Event) -> None:
    """Settle usage events from the durable stream; ack only after the settlement committed."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(bus.USAGE_SUBJECT, durable=bus.USAGE_CONSUMER, stream=bus.USAGE_STREAM)
    try:
        while not stop.is_set():
            try:
                messages = await sub.fetch(USAGE_FETCH, timeout=1)
            except TimeoutError:  # nats-py raises its own TimeoutError or asyncio's, by code path
                continue
            except Exception as exc:  # e.g. NATS reconnecting: the consumer must outlive it
                log.warning("usage stream fetch failed (%s); retrying", exc.__class__.__name__)
                await wait_event(stop, 1)
                continue
            for msg in await _settle_batches(accounts, messages):
                try:
                    usage = bus.decode(msg.data)
                    if isinstance(usage, bus.Usage):
                        await accounts.settle(usage)
                    await msg.ack()
                except LedgerError as exc:
                    log.error("usage event dropped: %s", exc.error.code)
                    await msg.term()  # settling it again can never succeed
                except Exception:
                    log.exception("usage event not settled; it will be redelivered")
                    await msg.nak(delay=2)
            if len(messages) < USAGE_FETCH:
                await wait_event(stop, USAGE_LINGER)
    finally:
        # nats-py: drain() hangs after a timed-out fetch unless the pull subscription is gone first.
        await sub.unsubscribe()


async def _settle_batches(accounts: Accounts, messages: list) -> list:
    """Settle every `UsageBatch` among `messages` in one transaction, acked once it committed (one by
    one if that fails); return the other messages."""
    batches, others = [], []
    for msg in messages:
        try:
            decoded = bus.decode(msg.data)
        except Exception:
            decoded = None
        if isinstance(decoded, bus.UsageBatch):
            batches.append((msg, decoded))
        else:
            others.append(msg)
    if not batches:
        return others
    try:
        await accounts.settle_grant_usage(bus.UsageBatch(tuple(e for _, batch in batches for e in batch.events)))
    except Exception:
        log.exception("usage batches not settled together; trying one by one")
        for msg, batch in batches:
            try:
                await accounts.settle_grant_usage(batch)
                await msg.ack()
            except Exception:
                log.exception("usage batch not settled; it will be redelivered")
                await msg.nak(delay=2)
        return others
    for msg, _ in batches:
        await msg.ack()
    return others


async def every(seconds: float, work, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await work()
        except Exception:
            log.exception("periodic task %s failed", getattr(work, "__name__", work))
        await wait_event(stop, seconds)


async def _resources(app: web.Application):
    settings = app[SETTINGS]
    metrics = app[METRICS]
    db_tls = tls.database_context(settings)
    box = SecretBox.from_settings(settings)  # before connecting: a missing key fails start-up by name
    await retry_start("DATABASE_URL", lambda: db.migrate_url(settings.database_url, "billing", MIGRATIONS, db_tls))
    # Billing keeps no session state (no advisory locks, no SET), so pooled connections need no reset.
    pool = await db.create_pool(
        settings.database_url, max_size=20, reset_session=False, ssl=db_tls, timeout=settings.dependency_timeout
    )
    nc = await retry_start("NATS_URL", lambda: messaging.connect_service(settings, "billing"))
    await messaging.ensure_usage_stream(nc, settings.usage_stream_replicas)
    app[POOL], app[NC] = pool, nc
    providers = ProviderStore(pool, box)
    app[PROVIDERS] = providers
    await providers.apply("file", load_providers_file(settings.providers_path, os.environ))
    shorthand = shorthand_provider(settings)
    await providers.apply("env", [(shorthand, [])] if shorthand else [])
    app[CHECKS].update(nats=nats_check(nc), postgres=pool_check(pool))
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    ledger = Ledger(pool, box)
    catalog = Catalog(settings, pool, session, providers, os.environ)
    grants = Grants(pool, nc, settings.quota_validity_time, metrics)
    accounts = Accounts(ledger, catalog, nc, metrics, settings.default_max_tokens, grants)
    app[ACCOUNTS] = accounts
    await catalog.refresh()
    admin = Admin(pool, nc, settings, catalog)
    await admin.start()
    app[ADMIN] = admin
    accounts.request_log = admin.usage
    responder = messaging.Responder(nc, "billing")
    # Subjects answered from Postgres alone get a deadline inside the caller's bus timeout, so a stopped
    # database answers 503 + Retry-After in about DEPENDENCY_TIMEOUT seconds, not the caller's timeout.
    deadline = min(settings.dependency_timeout + 1, bus.REQUEST_TIMEOUT - 0.5)
    for subject in SUBJECTS:
        await responder.serve(subject, accounts.handle, None if subject in WAITS_ON_WALLET else deadline)
    await responder.serve(bus.BILLING_ADMIN, admin.handle)
    await responder.ready()

    async def housekeeping() -> None:
        await admin.sessions.sweep()
        await admin.usage.expire(admin.settings.request_log_retention_days)
        await admin.money.resume_stale()
        await admin.money.auto_payout(admin.settings.receive_ln_address, admin.settings.payout_threshold_sats)

    async def refresh_catalog() -> None:
        if await catalog.refresh():
            await nc.publish(bus.EVENT_CATALOG_CHANGED, catalog.current.revision.encode())

    async def providers_changed(msg) -> None:
        try:
            await admin.apply_live()  # the admin API's live settings (fees) are announced with this event too
            await refresh_catalog()
        except Exception:
            log.exception("catalog not rebuilt after a provider change")

    await nc.subscribe(bus.EVENT_PROVIDERS_CHANGED, cb=providers_changed)
    liveness = Liveness(settings.gateway_gone_after)

    async def gateway_alive(msg) -> None:
        try:
            alive = bus.decode(msg.data)
        except Exception:
            return
        if isinstance(alive, bus.GatewayAlive):
            liveness.heard_from(alive)

    await nc.subscribe(bus.GATEWAY_ALIVE, cb=gateway_alive)

    async def sweep() -> None:
        expired = await ledger.expire(settings.reservation_ttl)
        if expired:
            metrics.reservations_expired.inc(expired)
            log.warning("released %d reservations whose usage never came", expired)
        released = await liveness.release_lost(ledger, nc)  # X-Cashu calls whose gateway died or gave up
        if released:
            metrics.reservations_expired.inc(released)
        await grants.expire()

    async def finish_refunds() -> None:
        # A refund pending for one pass already is retried (token) or settled (Lightning); so every refund
        # and X-Cashu change ends within about 2 x PENDING_RETRY_SECONDS after the fault clears.
        await accounts.finish_pending_refunds(older_than=settings.pending_retry_seconds)

    async def finish_deposits() -> None:
        # A deposit whose credit was never written (billing killed, Postgres or the bus failing after the
        # wallet's redeem) ends INTENT_DUE s after it began, or one pass after the fault clears if later.
        await accounts.finish_deposits()

    async def gauges() -> None:
        metrics.reservations_open.set(await ledger.open_reservations())
        metrics.deposit_intents_open.set(await ledger.open_intents())
        for operation, age in (await ledger.oldest_pending()).items():
            metrics.pending_oldest_age_seconds.labels(operation).set(age)
        books = await ledger.books()
        metrics.owed_msat.set(books["owed"])
        metrics.revenue_msat.set(books.get("revenue", 0))
        await grants.gauges()
        info = await nc.jetstream().consumer_info(bus.USAGE_STREAM, bus.USAGE_CONSUMER)
        metrics.usage_pending.set(info.num_pending + info.num_ack_pending)
        await accounts.reconcile()

    async def watch_invoices() -> None:
        await credit_paid_invoices(pool, accounts)

    stop = asyncio.Event()
    ttl, gone = settings.reservation_ttl, settings.gateway_gone_after
    tasks = [
        asyncio.create_task(consume_usage(nc, accounts, stop)),
        asyncio.create_task(every(min(SWEEP_EVERY, ttl / 2, settings.quota_validity_time / 4, gone / 4), sweep, stop)),
        asyncio.create_task(every(GAUGES_EVERY, gauges, stop)),
        asyncio.create_task(every(CATALOG_REFRESH, refresh_catalog, stop)),
        asyncio.create_task(every(settings.pending_retry_seconds, finish_refunds, stop)),
        asyncio.create_task(every(settings.pending_retry_seconds, finish_deposits, stop)),
        asyncio.create_task(every(INVOICE_WATCH_EVERY, watch_invoices, stop)),
        asyncio.create_task(every(ADMIN_EVERY, housekeeping, stop)),
    ]
    yield
    await responder.close(timeout=10)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await nc.drain()
    await session.close()
    await pool.close()


async def create_app(settings: Settings) -> web.Application:
    load_models_file(settings.models_path)  # a malformed models file stops start-up here, by name
    load_providers_file(settings.providers_path, os.environ)  # so does a bad provider, naming it and the field
    registry = CollectorRegistry()
    app = ops_app(settings, registry)
    app[METRICS] = BillingMetrics(registry)
    app.cleanup_ctx.append(_resources)
    return app
