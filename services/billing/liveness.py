"""Which X-Cashu calls still have a caller, from the gateways' heartbeats, so a per-call reservation whose
call is over ends within about GATEWAY_GONE_AFTER seconds instead of RESERVATION_TTL.

Every gateway publishes `bus.GatewayAlive` on `bus.GATEWAY_ALIVE` every sixth of GATEWAY_GONE_AFTER, under
an instance id new at each start, naming the X-Cashu calls it has in flight (from before it asks for the
reservation until its settlement is answered or stored in the usage stream). Each reservation names its
gateway (`bus.Reserve.gateway`). A reservation's caller is gone when

- its gateway is gone: billing has listened for GATEWAY_GONE_AFTER seconds (and at least three of the
  gateway's heartbeat intervals) without hearing it (killed mid-call). Listening restarts whenever billing's
  own NATS connection drops, so heartbeats billing could not receive never make a gateway look gone; a slow
  gateway keeps sending them from its event loop, so its long streams are never released under it; or
- its gateway is alive but a heartbeat received more than one interval after the sweeper first saw the
  reservation does not name the call: the call ended without settling it (the reservation was made after
  the gateway had given up waiting for it, e.g. `billing.reserve` answered late while Postgres stalled).

Such a reservation is released uncharged (a call is settled before the end of its answer leaves the
gateway, so it never fully reached its client), but only once billing has settled every usage event the
stream held when the reservation was found (the consumer's ack floor has passed that sequence): a call the
gateway settled through the stream just before it died is charged, not released.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS

from services.billing.ledger import Ledger
from shared import bus

log = logging.getLogger(__name__)
BEATS_MISSED = 3  # heartbeats a gateway may miss, at its own interval, before it can count as gone


@dataclass(frozen=True, slots=True)
class _Heard:
    at: float  # monotonic s billing received the latest heartbeat
    every: float  # the gateway's heartbeat interval, s
    calls: frozenset[str] | None  # request ids in flight then; None: not listed (too many)


class Liveness:
    def __init__(self, gone_after: float, clock: Callable[[], float] = time.monotonic):
        self.gone_after = gone_after
        self.clock = clock
        self.heard: dict[str, _Heard] = {}  # gateway instance -> its latest heartbeat
        self.listening_since = clock()
        self.reconnects = -1  # billing's NATS reconnect count when last looked at
        self.seen: dict[str, float] = {}  # open reservation id -> monotonic s the sweeper first saw it
        self.marks: dict[str, int] = {}  # lost reservation id -> usage stream's last sequence when found lost

    def heard_from(self, alive: bus.GatewayAlive) -> None:
        calls = frozenset(alive.calls) if alive.calls is not None else None
        self.heard[alive.instance] = _Heard(self.clock(), max(float(alive.every_seconds), 0.0), calls)

    def listening(self, connected: bool, reconnects: int) -> None:
        """Billing's own connection: while it is down, or once it came back, silence proves nothing."""
        if not connected or reconnects != self.reconnects:
            self.listening_since = self.clock()
            self.reconnects = reconnects

    def gone(self, instance: str) -> bool:
        """Not heard for GATEWAY_GONE_AFTER (and three of its intervals) while billing was listening."""
        heard = self.heard.get(instance)
        last, every = (heard.at, heard.every) if heard else (self.listening_since, 0.0)
        return self.clock() - max(last, self.listening_since) > max(self.gone_after, BEATS_MISSED * every)

    def lost(self, reservation_id: str, request_id: str, instance: str) -> bool:
        """True when the call holding this open reservation has no caller any more (see the module)."""
        first = self.seen.setdefault(reservation_id, self.clock())
        if self.gone(instance):
            return True
        heard = self.heard.get(instance)
        if heard is None or heard.calls is None or heard.at <= first + heard.every:
            return False
        return request_id not in heard.calls

    def forget_old(self) -> None:
        """Drop gateways unheard for ten times their window (a restarted gateway comes back under a new id)."""
        now = self.clock()
        for instance, heard in list(self.heard.items()):
            if now - heard.at > 10 * max(self.gone_after, BEATS_MISSED * heard.every):
                del self.heard[instance]

    async def release_lost(self, ledger: Ledger, nc: NATS) -> int:
        """Release the open reservations whose calls have no caller any more; returns how many."""
        self.listening(nc.is_connected, nc.stats["reconnects"])
        self.forget_old()
        calls = await ledger.open_calls()
        open_ids = {row["reservation_id"] for row in calls}
        self.seen = {r: t for r, t in self.seen.items() if r in open_ids}
        lost = [r["reservation_id"] for r in calls if self.lost(r["reservation_id"], r["request_id"], r["gateway"])]
        self.marks = {r: mark for r, mark in self.marks.items() if r in lost}
        if not lost:
            return 0
        js = nc.jetstream()
        if any(r not in self.marks for r in lost):
            last = (await js.stream_info(bus.USAGE_STREAM)).state.last_seq
            for reservation_id in lost:
                self.marks.setdefault(reservation_id, last)
        consumer = await js.consumer_info(bus.USAGE_STREAM, bus.USAGE_CONSUMER)
        floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        released = await ledger.release([r for r in lost if self.marks[r] <= floor])
        if released:
            log.warning("released %d reservations of X-Cashu calls whose gateway is gone or ended them", released)
        return released
