"""Discovery's app factory: key, relays, NATS subjects and the catalog follower, set up and torn down in order."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from services.discovery.identity import Clock, KeyStore, parse_nsec
from services.discovery.node import Discovery
from services.discovery.relays import Relays
from shared import db, messaging, tls
from shared.config import ConfigError, Settings
from shared.metrics import DiscoveryMetrics
from shared.secretbox import SecretBox
from shared.service import CHECKS, NC, POOL, SETTINGS, nats_check, ops_app, retry_start

MIGRATIONS = Path(__file__).parent / "migrations"


async def create_app(settings: Settings) -> web.Application:
    # Configuration errors fail here, before anything connects, with a message naming the variable.
    keys = parse_nsec(settings.nsec) if settings.nsec else None
    if keys is None and not settings.database_url:
        raise ConfigError("NSEC: not set, and there is no DATABASE_URL to keep a generated key in")
    # Generated and admin-set keys are stored sealed; with NSEC and no SECRETS_KEY, only NSEC is used.
    box = SecretBox.from_settings(settings) if keys is None or settings.secrets_key else None
    registry = CollectorRegistry()
    metrics = DiscoveryMetrics(registry)
    app = ops_app(settings, registry)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        async with contextlib.AsyncExitStack() as stack:
            pool = None
            if settings.database_url:
                db_tls = tls.database_context(settings)
                url = settings.database_url
                pool = await retry_start("DATABASE_URL", lambda: db.create_pool(url, 1, 2, ssl=db_tls))
                stack.push_async_callback(pool.close)
                app[POOL] = pool
                async with pool.acquire() as conn:
                    await db.migrate(conn, "discovery", MIGRATIONS)
            store = KeyStore(pool, box, keys)
            node_keys = await store.current()
            nc = await retry_start("NATS_URL", lambda: messaging.connect_service(settings, "discovery"))
            stack.push_async_callback(nc.drain)
            app[NC] = nc
            app[CHECKS]["nats"] = nats_check(nc)  # relays being down is normal life, not unreadiness
            relays = Relays(node_keys, settings.relays, Clock(pool), metrics)
            await relays.start()
            stack.push_async_callback(relays.stop)
            discovery = Discovery(settings, node_keys, relays, store)
            await discovery.start(nc)
            stack.push_async_callback(discovery.stop)
            yield

    app.cleanup_ctx.append(resources)
    return app
