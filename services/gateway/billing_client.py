"""The gateway's side of the bus: typed calls to billing, and usage events into the usage stream.

Calls on balance keys are held and charged against a quota grant this gateway holds for the key
(`services.gateway.quota`), priced here with `shared.pricing` at billing's rating of the model, and
their usage is stored in the usage stream before the answer leaves (`usage_stream`): no bus round
trip to billing per call. One-shot X-Cashu payments keep a reservation per call in billing, since
their change is cut right after the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.gateway.credentials import Credential, sha256_hex
from services.gateway.quota import Grant, Quota
from services.gateway.usage_stream import UsageStream
from shared import bus, pricing
from shared.messaging import BusError, request
from shared.metrics import GatewayMetrics
from shared.service import wait_event

log = logging.getLogger(__name__)

RATING_TTL = 30.0  # seconds a model's rating is used before billing is asked again (catalog events sooner)
HOLD_PREFIX = "quota:"  # reservation ids of calls held against a grant
STALE_HOLD_CHECK = 60.0  # seconds between looks for holds whose call never ended
MAX_LISTED_CALLS = 20_000  # X-Cashu calls a heartbeat names at most (beyond, it names none: billing then waits)


@dataclass(slots=True)
class _Hold:
    grant: Grant
    amount: int  # msat held: the call's maximum cost
    since: float  # monotonic seconds


class BillingClient:
    """Every money question the gateway asks, in one place."""

    def __init__(
        self, nc: NATS, js: JetStreamContext, metrics: GatewayMetrics, hold_ttl: float = 900.0,
        gone_after: float = 30.0,
    ):  # fmt: skip
        self.nc = nc
        self.js = js
        # Named in each X-Cashu reservation and announced every `gone_after / 6` s (`bus.GatewayAlive`) with
        # the X-Cashu calls in flight (request id -> monotonic start): billing releases the reservation of a
        # call no heartbeat names any more, and every one of this gateway's once the heartbeats stop.
        self.instance = uuid.uuid4().hex
        self._beat_every = gone_after / 6
        self._calls: dict[str, float] = {}
        # Tokens already credited to their derived key: a token used as a Bearer is presented on
        # every call, and billing would answer "already credited" anyway, so skip the round trip.
        self._deposited: OrderedDict[str, None] = OrderedDict()
        self._one_shot: OrderedDict[str, None] = OrderedDict()  # X-Cashu keys: a reservation per call
        self.quota = Quota(nc, metrics)
        self.usage_stream = UsageStream(js)
        self._holds: dict[str, _Hold] = {}
        self._ratings: dict[str, tuple[bus.Rating, float]] = {}
        self._hold_ttl = hold_ttl
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._subscriptions: list = []

    async def start(self) -> None:
        """Listen for grant recalls and catalog changes; renew and expire grants in the background."""

        async def catalog_changed(msg) -> None:
            self._ratings.clear()

        self._subscriptions = [
            await self.nc.subscribe(bus.QUOTA_RECALL, cb=self.quota.recall),
            await self.nc.subscribe(bus.EVENT_CATALOG_CHANGED, cb=catalog_changed),
        ]
        self._tasks = [
            asyncio.ensure_future(self.quota.run(self._stop)),
            asyncio.ensure_future(self._sweep_holds()),
            asyncio.ensure_future(self._heartbeat()),
        ]

    async def _heartbeat(self) -> None:
        """Tell billing this gateway is alive (fire and forget: while NATS is away, billing hears nobody and
        waits for the bus to come back before it counts anyone gone)."""
        while not self._stop.is_set():
            limit = time.monotonic() - self._hold_ttl  # a call that never ended (a bug) stops holding its reservation
            for request_id in [r for r, since in self._calls.items() if since < limit]:
                del self._calls[request_id]
            calls = tuple(self._calls) if len(self._calls) <= MAX_LISTED_CALLS else None
            alive = bus.GatewayAlive(self.instance, self._beat_every, calls)
            try:
                await self.nc.publish(bus.GATEWAY_ALIVE, bus.encode(alive))
            except Exception as exc:  # reconnecting with a full buffer, closed at shutdown
                log.debug("heartbeat not sent: %s", exc)
            await wait_event(self._stop, self._beat_every)

    async def close(self) -> None:
        """At shutdown, once no call is in flight: store pending usage, give every grant back."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        await self.usage_stream.close()
        await self.quota.close()

    async def _sweep_holds(self) -> None:
        """A call that never ended (a bug, a task killed) releases its hold after `hold_ttl`, uncharged."""
        while not self._stop.is_set():
            await wait_event(self._stop, STALE_HOLD_CHECK)
            limit = time.monotonic() - self._hold_ttl
            for reservation_id in [r for r, hold in self._holds.items() if hold.since < limit]:
                hold = self._holds.pop(reservation_id)
                self.quota.end(hold.grant, hold.amount, None)
                log.warning("a call held on a grant never ended; its hold is released")

    async def deposit(self, key_hash: str, token: str, create: bool, resume_only: bool = False) -> bus.KeyInfo:
        message = bus.Deposit(key_hash, token, create, resume_only)
        info = await request(self.nc, bus.BILLING_DEPOSIT, message, bus.KeyInfo, bus.MINT_TIMEOUT)
        self._remember(sha256_hex(token))
        return info

    async def ensure_account(self, cred: Credential) -> None:
        """For a token credential: make sure its value is credited to the derived key (idempotent)."""
        if cred.mode == "xcashu":
            self._one_shot[cred.key_hash] = None
            if len(self._one_shot) > 100_000:
                self._one_shot.popitem(last=False)
        if cred.token is None or sha256_hex(cred.token) in self._deposited:
            return
        await self.deposit(cred.key_hash, cred.token, create=True)

    def _remember(self, token_hash: str) -> None:
        self._deposited[token_hash] = None
        if len(self._deposited) > 100_000:
            self._deposited.popitem(last=False)

    async def key_info(self, key_hash: str) -> bus.KeyInfo:
        """The key's balance; this gateway's grant on it is given back first, so what it spent shows."""
        await self.quota.give_back(key_hash)
        return await request(self.nc, bus.BILLING_KEY_INFO, bus.KeyQuery(key_hash), bus.KeyInfo)

    async def reserve(self, message: bus.Reserve) -> bus.Reserved:
        """Hold a call's maximum cost: against this gateway's quota grant on the key (asking billing for
        units only when it is short), or, for a one-shot X-Cashu payment, as a reservation in billing.

        Raises BusError: `insufficient_balance` (402), `unknown_key` (401), `model_not_found` (404), …
        """
        if message.key_hash in self._one_shot:
            self._calls[message.request_id] = time.monotonic()  # before asking: a late reservation is still named
            named = msgspec.structs.replace(message, gateway=self.instance)
            try:
                return await request(self.nc, bus.BILLING_RESERVE, named, bus.Reserved)
            except BaseException:  # refused, timed out, or the client left: a reservation made after all is released
                self._calls.pop(message.request_id, None)
                raise
        rating = await self._rating(message.model)
        limit = rating.max_completion_tokens
        completion = message.max_tokens if message.max_tokens is not None and message.max_tokens >= 0 else limit
        prompt = max(message.prompt_tokens, 0)  # the most at any route, so failover to a dearer one is covered
        amount = max(pricing.max_cost(p, prompt, completion) for p in (rating.price, *(r.price for r in rating.routes)))
        grant = await self.quota.hold(message.key_hash, amount)
        reservation_id = HOLD_PREFIX + message.request_id
        self._holds[reservation_id] = _Hold(grant, amount, time.monotonic())
        return bus.Reserved(reservation_id, amount, grant.remaining_balance, rating.model, rating.price, rating.routes)

    async def _rating(self, model: str) -> bus.Rating:
        """Billing's rating of `model` (canonical id, price, completion cap), cached for RATING_TTL."""
        cached = self._ratings.get(model)
        if cached is not None and time.monotonic() - cached[1] < RATING_TTL:
            return cached[0]
        rating = await request(self.nc, bus.BILLING_RATE, bus.RateQuery(model), bus.Rating)
        if len(self._ratings) > 10_000:
            self._ratings.clear()
        self._ratings[model] = (rating, time.monotonic())
        return rating

    async def record_usage(self, usage: bus.Usage) -> None:
        """Put the usage event in the durable stream, acknowledged; the msg id makes repeats no-ops."""
        await self.js.publish(bus.USAGE_SUBJECT, bus.encode(usage), headers=self._msg_id(usage))

    async def settle(self, usage: bus.Usage) -> bus.Settled | None:
        """Charge a call: on its grant, here, then store its usage in the stream (see `_charge`); or,
        for a reservation, settle now in billing, so the response can show the cost.

        If billing does not confirm (down, slow, restarting), the event goes into the durable usage
        stream, acknowledged, and billing settles it from there: exactly once either way, since
        settlement is keyed by request id.
        """
        if usage.reservation_id.startswith(HOLD_PREFIX):
            return await self._charge(usage)
        try:
            return await request(self.nc, bus.BILLING_SETTLE, usage, bus.Settled)
        except BusError:
            await self.record_usage(usage)
            return None
        finally:  # settled, or stored in the stream (billing settles it before it may release it), or lost
            self._calls.pop(usage.request_id, None)

    async def _charge(self, usage: bus.Usage) -> bus.Settled | None:
        """Charge a call held on a grant at its price (`shared.pricing.cost`, as billing settles it),
        then store its usage durably; None when already charged or when the stream refused it (then
        billing never sees the charge, and the grant's units come back to the key)."""
        hold = self._holds.pop(usage.reservation_id, None)
        if hold is None:
            return None  # charged already (a client that left is settled once)
        price = usage.route_price or usage.price  # the answering route's price, as billing settles it
        if usage.source == "failed" or price is None:
            base = input_msat = output_msat = total = 0
        else:
            base, input_msat, output_msat, total = pricing.cost(
                price, usage.prompt_tokens, usage.completion_tokens, usage.cache_read_tokens,
                usage.cache_write_tokens,
            )  # fmt: skip
        charged = self.quota.end(hold.grant, hold.amount, total)
        if charged < total:  # the grant could not pay it all: the parts shrink as billing's do
            base = min(base, charged)
            input_msat = min(input_msat, charged - base)
            output_msat = charged - base - input_msat
        try:
            await self.usage_stream.put(msgspec.structs.replace(usage, grant_id=hold.grant.grant_id))
        except Exception:
            log.exception("usage of %s not stored; it is not charged", usage.request_id)
            return None
        return bus.Settled(
            request_id=usage.request_id, cost_msat=charged, input_msat=input_msat, output_msat=output_msat,
            base_msat=base, balance_msat=hold.grant.remaining_balance,
        )  # fmt: skip

    @staticmethod
    def _msg_id(usage: bus.Usage) -> dict[str, str]:
        return {"Nats-Msg-Id": f"usage-{usage.request_id}"}

    async def refund(
        self, key_hash: str, lightning_address: str | None = None, mint_url: str | None = None
    ) -> bus.Refunded:
        """Pay out the key's balance (from `mint_url` when the client named one); this gateway's grant on
        it is given back first (billing recalls every other gateway's)."""
        await self.quota.give_back(key_hash)
        return await request(
            self.nc,
            bus.BILLING_REFUND,
            bus.Refund(key_hash, lightning_address, mint_url),
            bus.Refunded,
            bus.MINT_TIMEOUT,
        )

    async def refund_status(self, key_hash: str) -> bus.Refunded:
        """The key's latest refund: pending, paid, or failed (its amount back on the balance)."""
        return await request(self.nc, bus.BILLING_REFUND_STATUS, bus.RefundQuery(key_hash), bus.Refunded)
