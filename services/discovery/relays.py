"""Talking to Nostr relays: keep the current announcement on every relay, and collect other nodes' announcements.

Each relay is tracked on its own: a relay that is down (at start or later) is retried with backoff and
gets the current event once it is back, without delaying the others. nostr-sdk reconnects on its own;
we only decide what to (re)send and when.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from nostr_sdk import (
    Client,
    ClientBuilder,
    EventBuilder,
    Filter,
    Keys,
    Kind,
    RelayOptions,
    RelayStatus,
    RelayUrl,
    ReqTarget,
    SendEventTarget,
    Tag,
    Timestamp,
)

from services.discovery.announcement import KIND, Announcement, parse_provider
from services.discovery.identity import Clock
from shared import bus
from shared.metrics import DiscoveryMetrics
from shared.service import wait_event

log = logging.getLogger(__name__)

RECONNECT_EVERY = timedelta(seconds=2)  # nostr-sdk's own reconnect interval for a dropped relay
OK_TIMEOUT = timedelta(seconds=10)  # how long a relay may take to answer OK to an event
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0  # seconds between publish attempts to a failing relay
REFRESH_EVERY = 3600.0  # re-sign and republish even without changes, so relays and clients see us alive
TICK = 0.5  # how often relay states are looked at (a relay that comes back is served within a tick)
PEER_LIMIT = 500
STOP_TIMEOUT = 5.0  # seconds shutdown waits for the relay tasks


@dataclass
class _RelayState:
    name: str
    url: RelayUrl
    due: float = float("inf")  # monotonic time of the next attempt; inf while there is nothing to send
    backoff: float = BACKOFF_MIN
    connected: bool | None = None  # None until first looked at


class Relays:
    """The node's view of its relays: publishes `want` everywhere and keeps `peers` up to date."""

    def __init__(self, keys: Keys, urls: tuple[str, ...], clock: Clock, metrics: DiscoveryMetrics):
        self._keys = keys
        self._pubkey = keys.public_key().to_hex()
        self._clock = clock
        self._metrics = metrics
        self._client: Client = ClientBuilder().build()
        self._states = [_RelayState(url, RelayUrl.parse(url)) for url in urls]
        self._want: Announcement | None = None
        self._signed: Announcement | None = None
        self._event = None
        self._refresh_at = float("inf")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.peers: dict[tuple[str, str], bus.Provider] = {}

    async def start(self) -> None:
        opts = RelayOptions().retry_interval(RECONNECT_EVERY).adjust_retry_interval(False)
        for state in self._states:
            await self._client.add_relay(state.url, opts=opts)
        await self._client.connect()
        if self._states:
            await self._client.subscribe(ReqTarget.auto([Filter().kinds([Kind(KIND)]).limit(PEER_LIMIT)]))
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="discovery-publish"),
            asyncio.create_task(self._listen(), name="discovery-peers"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self._client.shutdown()  # also ends the notification stream the listener waits on
        if not self._tasks:
            return
        _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
        if stuck:
            log.warning("%d relay task(s) did not stop in %.0fs", len(stuck), STOP_TIMEOUT)

    def use_keys(self, keys: Keys) -> None:
        """Sign with `keys` from now on: the current announcement is re-signed and sent to every relay."""
        self._keys = keys
        self._pubkey = keys.public_key().to_hex()
        self.peers = {k: p for k, p in self.peers.items() if p.pubkey != self._pubkey}  # we are no peer of ours
        self._metrics.nodes_seen.set(len(self.peers))
        self._wake.set()

    def announce(self, announcement: Announcement | None) -> None:
        """Make `announcement` the one to keep on the relays (None: stop sending new ones)."""
        self._want = announcement
        self._wake.set()

    # ---- publishing ------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        while True:
            try:
                await self._publish_step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("announcement step failed; retrying")
            self._wake.clear()
            await wait_event(self._wake, self._sleep_for())

    def _sleep_for(self) -> float:
        now = time.monotonic()
        due = [s.due - now for s in self._states if s.connected]
        return max(0.0, min([TICK, self._refresh_at - now, *due]))

    async def _publish_step(self) -> None:
        now = time.monotonic()
        await self._watch_connections(now)
        if self._want is None:
            return
        stale = self._event is None or self._event.author().to_hex() != self._pubkey  # a new key
        if stale or self._want != self._signed or now >= self._refresh_at:
            await self._sign(self._want)
            self._refresh_at = now + REFRESH_EVERY
            for state in self._states:
                state.due, state.backoff = now, BACKOFF_MIN
        # Only connected relays: sending to one that is down would wait for nostr-sdk's connect timeout.
        due = [state for state in self._states if state.connected and state.due <= now]
        if due:
            await asyncio.gather(*(self._send(state) for state in due))

    async def _sign(self, announcement: Announcement) -> None:
        keys = self._keys  # a key swapped while the clock answers is picked up on the next step
        created_at = await self._clock.next(keys.public_key().to_hex())
        builder = EventBuilder(Kind(KIND), announcement.content).tags([Tag.parse(list(t)) for t in announcement.tags])
        self._event = builder.custom_created_at(Timestamp.from_secs(created_at)).finalize(keys)
        self._signed = announcement
        log.info("signed announcement %s (created_at %d)", self._event.id().to_hex(), created_at)

    async def _send(self, state: _RelayState) -> None:
        name = state.name
        try:
            output = await self._client.send_event(self._event, SendEventTarget.to([state.url]), ok_timeout=OK_TIMEOUT)
            ok, reason = bool(output.success), "; ".join(output.failed.values())
        except Exception as exc:
            ok, reason = False, f"{exc.__class__.__name__}: {exc}"
        if ok:
            state.due, state.backoff = float("inf"), BACKOFF_MIN
            self._metrics.publishes.labels(name, "ok").inc()
            self._metrics.relay_last_publish.labels(name).set(time.time())
            log.info("announcement published to %s", name)
            return
        self._metrics.publishes.labels(name, "error").inc()
        log.warning("announcement not accepted by %s (%s); retrying in %.0fs", name, reason, state.backoff)
        state.due = time.monotonic() + state.backoff
        state.backoff = min(state.backoff * 2, BACKOFF_MAX)

    async def _watch_connections(self, now: float) -> None:
        """Update the gauges; a relay that (re)connects gets the current event at once (it may have lost it)."""
        for state in self._states:
            relay = await self._client.relay(state.url)
            connected = relay is not None and relay.status() == RelayStatus.CONNECTED
            self._metrics.relay_connected.labels(state.name).set(1 if connected else 0)
            if connected != state.connected:
                if connected:
                    log.info("relay %s connected", state.name)
                    if self._event is not None:
                        state.due, state.backoff = now, BACKOFF_MIN
                else:
                    log.info("relay %s not connected; the announcement waits for it", state.name)
            state.connected = connected

    # ---- peers -----------------------------------------------------------------------------

    async def _listen(self) -> None:
        notifications = self._client.notifications()
        while True:
            notification = await notifications.next()
            if notification is None or notification.is_SHUTDOWN():
                return
            if notification.is_NEW_EVENT():
                try:
                    self._seen(notification.event)
                except Exception:
                    log.exception("could not read an announcement from %s", notification.relay_url)

    def _seen(self, event) -> None:
        if event.kind().as_u16() != KIND:
            return
        pubkey = event.author().to_hex()
        if pubkey == self._pubkey:
            return
        tags = [tag.to_vec() for tag in event.tags()]
        provider = parse_provider(pubkey, event.created_at().as_secs(), tags, event.content())
        if provider is None:
            return
        key = (provider.pubkey, provider.d)
        known = self.peers.get(key)
        if known is None or known.last_seen < provider.last_seen:
            self.peers[key] = provider
            self._metrics.nodes_seen.set(len(self.peers))
            log.debug("peer %s at %s", pubkey, ", ".join(provider.urls))
