"""Quota grants, the gateway's side (RFC 4006 credit control): spend a grant of a key's balance locally.

Billing grants this gateway units (msat) of a key's balance for a Validity-Time (`bus.QuotaAnswer`);
each paid call holds its maximum cost against the grant, without a bus round trip, and is charged
its actual cost when it ends, with the same integer formula billing uses (`shared.pricing`). When a
call does not fit, the gateway asks for more (a Credit-Control-Request update) before refusing it
with 402, so a top-up is usable at once. Grants in use are renewed before their Validity-Time runs
out; idle ones, recalled ones (`bus.Recall`, billing's Re-Auth-Request) and all of them at shutdown
are terminated, giving back the units not spent. A grant this gateway loses track of (billing did
not answer, the process died) is given back by billing when its Validity-Time passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS

from shared import bus
from shared.messaging import BusError, request
from shared.metrics import GatewayMetrics, child
from shared.service import wait_event

log = logging.getLogger(__name__)

GRANT_CALLS = 64  # a request for units asks for this many calls' maximum cost (Requested-Service-Unit)
USABLE_SHARE = 0.8  # a grant takes new calls for this share of its Validity-Time, counted from the request
RENEW_SHARE = 0.4  # renewed (or, when idle, terminated) once less than this share of it is left
# Errors after which the gateway cannot know whether billing applied its request: it sends the same
# request again before any other on that grant.
UNKNOWN_OUTCOME = {"timeout", "unavailable", "internal", "bad_reply"}


def _request_type(ccr: bus.CreditControl) -> str:
    """CC-Request-Type: INITIAL, UPDATE or TERMINATION (RFC 4006 §8.3), as a metric label."""
    return "terminate" if ccr.final else "initial" if ccr.request_number == 1 else "update"


def _insufficient(required: int, available: int) -> BusError:
    message = f"Insufficient balance: {required} msat required, {available} msat available"
    return BusError(bus.Error("insufficient_balance", message, 402))


@dataclass(slots=True, eq=False)
class Grant:
    """One grant's local account, in msat. Pure arithmetic: `hold` a call's maximum cost, `charge` it.

    Invariant: used + held + returned <= granted, so this gateway never spends more than billing
    granted; `available` is what new calls may still hold.
    """

    grant_id: str
    key_hash: str
    granted: int = 0  # units granted in all (Granted-Service-Unit, summed over answers)
    used: int = 0  # charged to calls that ended (Used-Service-Unit)
    held: int = 0  # the maximum costs of calls in flight
    returned: int = 0  # given back to the key
    in_flight: int = 0
    balance: int = 0  # the key's spendable balance outside every grant, at the last answer
    request_number: int = 0  # CC-Request-Number of the last request sent
    deadline: float = 0.0  # monotonic seconds after which no new call may use the grant
    validity_time: int = 0  # seconds, from the last answer
    last_used: float = 0.0
    active: bool = True  # False once recalled or closed: only its calls in flight end on it
    closed: bool = False  # terminated (or expired) in billing: no request on it any more
    unanswered: bus.CreditControl | None = None  # a request whose answer never came, to send again
    asked: int = 0  # msat asked for by the last request for units
    final_unit: bool = False  # billing said it cannot grant more than it did (Final-Unit-Indication)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one Credit-Control-Request at a time

    @property
    def available(self) -> int:
        return self.granted - self.used - self.held - self.returned

    def hold(self, amount: int, now: float) -> bool:
        """Hold `amount` for a call starting now; False (nothing held) when the grant cannot take it."""
        if not self.active or now >= self.deadline or amount > self.available:
            return False
        self.held += amount
        self.in_flight += 1
        self.last_used = now
        return True

    def charge(self, held: int, cost: int) -> int:
        """End a call that held `held`: charge `cost`, at most what the grant still has; return the charge."""
        self.held -= held
        self.in_flight -= 1
        charged = max(min(cost, self.available), 0)
        self.used += charged
        return charged

    def release(self, held: int) -> None:
        """End a call that held `held` without charging it (its usage can no longer be known)."""
        self.held -= held
        self.in_flight -= 1

    @property
    def remaining_balance(self) -> int:
        """What the key can still spend, as this gateway knows it: free balance plus this grant's units."""
        return self.balance + max(self.available, 0)


class Quota:
    """This gateway's grants, one active grant per key, and the Credit-Control-Requests behind them."""

    def __init__(self, nc: NATS, metrics: GatewayMetrics, gateway_id: str | None = None):
        self.nc = nc
        self.metrics = metrics
        self.gateway_id = gateway_id or uuid.uuid4().hex
        self.active: dict[str, Grant] = {}  # key_hash -> the grant new calls use
        self.draining: set[Grant] = set()  # recalled or replaced grants with calls still in flight
        self.locks: dict[str, asyncio.Lock] = {}  # key_hash -> one request for new units at a time
        self.tasks: set[asyncio.Task] = set()

    # ---- calls --------------------------------------------------------------------------------

    async def hold(self, key_hash: str, amount: int) -> Grant:
        """Hold `amount` msat for one call on `key_hash`, asking billing for units when the grant is short.

        Raises BusError: `insufficient_balance` (402), `unknown_key` (401), `refund_pending` (425), or
        billing unreachable (503/504) when the grant cannot cover the call and billing cannot be asked.
        """
        grant = self.active.get(key_hash)
        if grant is not None and grant.hold(amount, time.monotonic()):
            if grant.available < grant.asked // 4 and not grant.lock.locked() and not grant.final_unit:
                self._spawn(self._refill(grant, amount))  # ask for more before calls have to wait for it
            return grant
        lock = self.locks.setdefault(key_hash, asyncio.Lock())
        async with lock:
            for _ in range(2):  # a second time when billing says the grant was closed meanwhile (expired)
                grant = self.active.get(key_hash)
                if grant is not None and grant.hold(amount, time.monotonic()):
                    return grant
                if grant is None or not grant.active or time.monotonic() >= grant.deadline:
                    if grant is not None:
                        self._retire(grant)
                    grant = Grant(uuid.uuid4().hex, key_hash)
                    self.active[key_hash] = grant
                try:
                    await self._request(grant, requested=amount * GRANT_CALLS, minimum=amount)
                except BusError as exc:
                    if exc.error.code == "insufficient_balance":
                        raise _insufficient(amount, grant.remaining_balance) from None
                    raise
                if grant.hold(amount, time.monotonic()):
                    return grant
                if not grant.closed:
                    break
            raise _insufficient(amount, grant.remaining_balance)

    async def _refill(self, grant: Grant, amount: int) -> None:
        with contextlib.suppress(BusError):
            await self._request(grant, requested=amount * GRANT_CALLS, minimum=amount)

    def end(self, grant: Grant, held: int, cost: int | None) -> int:
        """A call on `grant` ended: charge `cost` msat (None: release unpriced); return the charge."""
        charged = grant.charge(held, cost) if cost is not None else (grant.release(held) or 0)
        if not grant.active and grant.in_flight == 0:
            self._spawn(self._terminate(grant))
        return charged

    # ---- giving grants back -------------------------------------------------------------------

    async def give_back(self, key_hash: str) -> None:
        """Terminate this gateway's grant on `key_hash` (a recall, a balance query, a refund): the
        units no call holds go back now, the rest when the calls in flight end."""
        grant = self.active.pop(key_hash, None)
        if grant is not None:
            await self._retire_now(grant)

    def _retire(self, grant: Grant) -> None:
        if self.active.get(grant.key_hash) is grant:
            del self.active[grant.key_hash]
        self._spawn(self._retire_now(grant))

    async def _retire_now(self, grant: Grant) -> None:
        grant.active = False
        if grant.in_flight == 0:
            await self._terminate(grant)
            return
        self.draining.add(grant)
        if grant.available > 0:
            with contextlib.suppress(BusError):
                await self._request(grant, give_back=True)

    async def _terminate(self, grant: Grant) -> None:
        """CCR-Terminate: give back every unit not charged; billing settles the charged ones from the
        stream. Retried by `maintain` while billing does not answer (it expires the grant meanwhile)."""
        self.draining.discard(grant)
        if grant.closed or (grant.request_number == 0 and grant.unanswered is None):
            return
        try:
            await self._request(grant, give_back=True, final=True)
        except BusError as exc:
            if exc.error.code in UNKNOWN_OUTCOME:
                self.draining.add(grant)
            log.warning("grant not terminated yet (%s)", exc.error.code)

    async def recall(self, msg) -> None:
        """A `bus.Recall` from billing (its Re-Auth-Request): give this gateway's grant on the key back."""
        try:
            recall = bus.decode(msg.data)
        except Exception:
            return
        if isinstance(recall, bus.Recall):
            await self.give_back(recall.key_hash)

    # ---- talking to billing -------------------------------------------------------------------

    async def _request(
        self, grant: Grant, requested: int = 0, minimum: int = 0, give_back: bool = False, final: bool = False
    ) -> None:
        """One Credit-Control-Request on `grant`, applied to the local account when answered; with
        `give_back`, every unit no call holds is returned (counted once the lock is ours, so an
        answer still in flight is included).

        Accounting is pessimistic, so a request whose answer is lost can be retransmitted as it was
        (same CC-Request-Number; billing repeats its answer and moves nothing twice): returned units
        stop being spendable here when asked for, granted ones become spendable when answered.
        """
        async with grant.lock:
            if grant.unanswered is not None:
                await self._send(grant, grant.unanswered)
            if grant.closed:
                return  # billing closed it: nothing more to ask of it
            if requested and grant.available >= requested // 4:
                return  # a request in flight already refilled it
            await self._send(grant, self._next_request(grant, requested, minimum, give_back, final))

    def _next_request(
        self, grant: Grant, requested: int = 0, minimum: int = 0, give_back: bool = False, final: bool = False
    ) -> bus.CreditControl:
        """The grant's next Credit-Control-Request, counted as sent (`grant.unanswered` until answered);
        the caller holds `grant.lock`."""
        returned = max(grant.available, 0) if give_back else 0
        grant.asked = requested or grant.asked
        grant.request_number += 1
        grant.returned += returned
        grant.unanswered = bus.CreditControl(
            grant.key_hash, grant.grant_id, self.gateway_id, grant.request_number, requested, minimum, returned, final
        )
        return grant.unanswered

    async def _send(self, grant: Grant, ccr: bus.CreditControl) -> None:
        sent = time.monotonic()
        try:
            answer = await request(self.nc, bus.BILLING_CREDIT_CONTROL, ccr, bus.QuotaAnswer)
        except BusError as exc:
            self._refused(grant, ccr, exc.error)
            raise
        self._answered(grant, ccr, answer, sent)

    async def _renew(self, grants: list[Grant]) -> None:
        """CCR-Updates for `grants` (asking for no units, giving back the spare ones of grants no longer
        active) in messages of up to `bus.MAX_CREDIT_CONTROLS`, rather than a round trip per grant: with
        many keys, renewals would otherwise cost a gateway more than its calls. Each grant's lock is held
        from its request to its answer, as in `_request`; a grant whose lock is taken is left to the
        next tick. Billing not answering leaves each request unanswered, to be sent again (`_request`)."""
        for start in range(0, len(grants), bus.MAX_CREDIT_CONTROLS):
            locked = [g for g in grants[start : start + bus.MAX_CREDIT_CONTROLS] if not g.lock.locked()]
            for grant in locked:
                await grant.lock.acquire()  # free, so taken at once (or after a request that was waking)
            try:
                # One whose request went unanswered meanwhile is left to `_request`, which sends that first.
                batch = [grant for grant in locked if grant.unanswered is None and not grant.closed]
                if not batch:
                    continue
                ccrs = [self._next_request(grant, give_back=not grant.active) for grant in batch]
                sent = time.monotonic()
                try:
                    reply = await request(self.nc, bus.BILLING_CREDIT_CONTROL, bus.CreditControls(ccrs),
                                          bus.QuotaAnswers)  # fmt: skip
                    answers = reply.answers
                    if len(answers) != len(ccrs):
                        raise BusError(bus.Error("bad_reply", "billing answered a different number of requests", 502))
                except BusError as exc:
                    answers = [exc.error] * len(ccrs)
                for grant, ccr, answer in zip(batch, ccrs, answers, strict=True):
                    if isinstance(answer, bus.Error):
                        self._refused(grant, ccr, answer)
                    else:
                        self._answered(grant, ccr, answer, sent)
            finally:
                for grant in locked:
                    grant.lock.release()

    def _refused(self, grant: Grant, ccr: bus.CreditControl, error: bus.Error) -> None:
        answered = error.code not in UNKNOWN_OUTCOME
        if answered:
            grant.unanswered = None  # a refusal: answered, and nothing granted
        child(self.metrics.quota_requests, _request_type(ccr), "refused" if answered else "no_answer").inc()

    def _answered(self, grant: Grant, ccr: bus.CreditControl, answer: bus.QuotaAnswer, sent: float) -> None:
        child(self.metrics.quota_requests, _request_type(ccr), "ok").inc()
        grant.unanswered = None
        grant.granted += answer.granted_msat
        grant.balance = answer.balance_msat
        grant.validity_time = answer.validity_time
        grant.final_unit = answer.final_unit and ccr.requested_msat > 0
        if answer.closed or ccr.final:
            grant.active, grant.closed, grant.deadline = False, True, 0.0
        else:
            grant.deadline = sent + answer.validity_time * USABLE_SHARE

    async def maintain(self) -> None:
        """Once per tick: renew grants in use before they lapse, terminate idle ones, drop spare locks."""
        now = time.monotonic()
        renew: list[Grant] = []
        for grant in [*self.active.values(), *self.draining]:
            if grant.lock.locked():
                continue
            if not grant.active and grant.in_flight == 0:
                await self._terminate(grant)  # a termination billing has not answered yet
                continue
            if not grant.validity_time:
                continue
            left = grant.deadline - now
            if left > grant.validity_time * RENEW_SHARE:
                continue
            if grant.active and grant.in_flight == 0 and now - grant.last_used > grant.validity_time * RENEW_SHARE:
                self._retire(grant)  # idle: give it back rather than keep the balance tied up
            elif grant.unanswered is not None or grant.closed:
                with contextlib.suppress(BusError):  # sends the unanswered request again first
                    await self._request(grant, give_back=not grant.active)
            else:
                renew.append(grant)
        await self._renew(renew)
        for key_hash in [k for k, lock in self.locks.items() if not lock.locked() and k not in self.active]:
            del self.locks[key_hash]

    def update_gauges(self) -> None:
        """`routstr_quota_grants` and `routstr_quota_available_msat`, once per tick rather than per call."""
        active = [grant for grant in self.active.values() if grant.active]
        child(self.metrics.quota_grants, "active").set(len(active))
        child(self.metrics.quota_grants, "draining").set(len(self.draining))
        self.metrics.quota_available_msat.set(sum(max(grant.available, 0) for grant in active))

    async def run(self, stop: asyncio.Event, tick: float = 1.0) -> None:
        while not stop.is_set():
            try:
                await self.maintain()
            except Exception:
                log.exception("quota maintenance failed")
            self.update_gauges()
            await wait_event(stop, tick)

    async def close(self) -> None:
        """At shutdown: give every grant back (calls in flight have ended by now)."""
        for key_hash in list(self.active):
            await self.give_back(key_hash)
        for grant in list(self.draining):
            await self._terminate(grant)
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
