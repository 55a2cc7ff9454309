"""The discovery logic: follow billing's catalog, keep the announcement current, answer who we are and who we see."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nostr_sdk import Keys

from services.discovery import announcement
from services.discovery.identity import KeyStore, provider_id
from services.discovery.relays import Relays
from shared import bus
from shared.config import ConfigError, Settings
from shared.messaging import BusError, Responder, request
from shared.service import wait_event

log = logging.getLogger(__name__)

CATALOG_REFRESH = 300.0  # seconds between catalog polls when no change event arrives
CATALOG_RETRY_MAX = 30.0  # longest wait between attempts while billing does not answer


class Discovery:
    def __init__(self, settings: Settings, keys: Keys, relays: Relays, store: KeyStore):
        self.settings = settings
        self.relays = relays
        self.store = store
        self.identity = self._identity_of(keys)
        self._nc: NATS | None = None
        self._key_lock = asyncio.Lock()
        self.version = announcement.node_version()
        self.catalog: bus.Catalog | None = None
        self.p2pk_pubkey = ""  # the wallet's NUT-11 key, announced once the wallet tells it
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self, nc: NATS) -> None:
        responder = Responder(nc, "discovery")
        await responder.serve(bus.DISCOVERY_INFO, self._info)
        await responder.serve(bus.DISCOVERY_PROVIDERS, self._providers)
        await responder.serve(bus.DISCOVERY_IDENTITY_SET, self._set_identity)
        await nc.subscribe(bus.EVENT_CATALOG_CHANGED, cb=self._on_catalog_changed)  # every replica hears it
        await nc.subscribe(bus.EVENT_IDENTITY_CHANGED, cb=self._on_identity_changed)
        self._nc = nc
        if not announcement.public_urls(self.settings):
            log.warning("not announcing on Nostr: neither HTTP_URL nor ONION_URL is set, so clients could not reach us")
        elif not self.settings.relays:
            log.warning("not announcing on Nostr: RELAYS is empty")
        if self.settings.http_url and not announcement.is_public_https(self.settings.http_url):
            log.warning("HTTP_URL %s is not a public https URL; browser clients such as getbased skip it",
                        self.settings.http_url)  # fmt: skip
        self._announce()
        self._task = asyncio.create_task(self._follow_catalog(nc), name="discovery-catalog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _announce(self) -> None:
        self.relays.announce(
            announcement.build(self.settings, self.identity.provider_id, self.version, self.catalog, self.p2pk_pubkey)
        )

    def _identity_of(self, keys: Keys) -> bus.NodeIdentity:
        return bus.NodeIdentity(
            npub=keys.public_key().to_bech32(), provider_id=provider_id(self.settings.provider_id, keys)
        )

    def _use(self, keys: Keys) -> None:
        """Swap the node's key live: answers, the signer and the announcement (its `d` tag may change)."""
        identity = self._identity_of(keys)
        if identity == self.identity:
            return
        self.identity = identity
        self.relays.use_keys(keys)
        self._announce()
        log.info("the node's Nostr identity is now %s", identity.npub)

    async def _set_identity(self, message: bus.Message) -> bus.NodeIdentity | bus.Error:
        """The admin API's PATCH /admin/api/nsec: keep the key (sealed), sign with it, tell the others."""
        if not isinstance(message, bus.IdentitySet):
            return bus.Error("bad_message", "discovery.identity.set answers IdentitySet only", 400)
        if not self.store.settable:
            return bus.Error(
                "not_settable", "The Nostr key can be set here only with DATABASE_URL and SECRETS_KEY", 409
            )
        async with self._key_lock:
            try:
                keys = await self.store.replace(message.nsec)
            except ConfigError:
                return bus.Error("invalid_nsec", "nsec: not a valid Nostr secret key (expected nsec1… or 64 hex)", 400)
            self._use(keys)
        if self._nc is not None:
            await self._nc.publish(bus.EVENT_IDENTITY_CHANGED, b"")
        return self.identity

    async def _on_identity_changed(self, msg) -> None:
        """Another replica changed the key: load the stored one."""
        async with self._key_lock:
            try:
                self._use(await self.store.current())
            except Exception:
                log.exception("could not load the node's new Nostr key")

    async def _on_catalog_changed(self, msg) -> None:
        self._changed.set()

    async def _follow_catalog(self, nc: NATS) -> None:
        """Ask billing for the catalog at start, on every change event, and now and then in case one was missed."""
        retry = 1.0
        while True:
            self._changed.clear()
            learned_key = await self._learn_p2pk_pubkey(nc)
            try:
                catalog = await request(nc, bus.BILLING_MODELS, bus.ModelsQuery(), bus.Catalog)
            except (BusError, NatsError) as exc:
                log.info("catalog not available yet (%s); retrying in %.0fs", exc, retry)
                wait, retry = retry, min(retry * 2, CATALOG_RETRY_MAX)
                if learned_key:
                    self._announce()
            else:
                retry, wait = 1.0, CATALOG_REFRESH if self.p2pk_pubkey else CATALOG_RETRY_MAX
                if self.catalog is None or catalog.revision != self.catalog.revision or learned_key:
                    self.catalog = catalog
                    self._announce()
            await wait_event(self._changed, wait)

    async def _learn_p2pk_pubkey(self, nc: NATS) -> bool:
        """Ask the wallet for its NUT-11 key until it answers; True the turn it first does."""
        if self.p2pk_pubkey:
            return False
        try:
            answer = await request(nc, bus.WALLET_PUBKEY, bus.PubkeyQuery(), bus.NodePubkey, timeout=1.0)
        except (BusError, NatsError) as exc:
            log.info("the wallet's P2PK key is not known yet (%s)", exc)
            return False
        self.p2pk_pubkey = answer.pubkey
        return bool(answer.pubkey)

    async def _info(self, message: bus.Message) -> bus.NodeIdentity:
        return self.identity

    async def _providers(self, message: bus.Message) -> bus.Providers:
        peers = sorted(self.relays.peers.values(), key=lambda p: p.last_seen, reverse=True)
        return bus.Providers(providers=tuple(peers))
