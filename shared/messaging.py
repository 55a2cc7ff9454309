"""NATS helpers: connect, serve a subject with typed handlers, and make typed requests."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from shared import bus, db, tls
from shared.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[bus.Message], Awaitable[msgspec.Struct]]
REQUEST_TIMEOUT_READY = 5.0
RECONNECT_GRACE = 2.0  # seconds a request waits for a lost NATS connection to come back before a 503
PING_INTERVAL = 2.0  # seconds between client pings; two unanswered ones mark the connection lost


class BusError(Exception):
    """A request came back as a typed `bus.Error`, or did not come back at all."""

    def __init__(self, error: bus.Error):
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


async def connect(
    url: str,
    name: str,
    first_attempt_seconds: float = 2.0,
    *,
    user: str | None = None,
    password: str | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> NATS:
    """Connect, then reconnect forever: a NATS restart must not kill a service.

    nats-py also retries the *first* connection forever in that mode, so the first attempt is bounded
    here and the caller decides how long to keep trying (`shared.service.retry_start`). With `user`,
    replies arrive under `bus.inbox_prefix(user)`, the only inbox that user may read.
    """
    credentials: dict = {}
    if user and password:
        credentials = {"user": user, "password": password, "inbox_prefix": bus.inbox_prefix(user)}
    if tls_context is not None:
        credentials["tls"] = tls_context

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    return await asyncio.wait_for(
        nats.connect(
            url,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=first_attempt_seconds,
            ping_interval=PING_INTERVAL,  # a stopped server is noticed in seconds, not nats-py's 2 minutes
            max_outstanding_pings=2,
            allow_reconnect=True,
            error_cb=on_error,
            **credentials,
        ),
        timeout=first_attempt_seconds,
    )


async def connect_service(settings: Settings, role: str) -> NATS:
    """A service's own connection: user NATS_USER (else `role`, its row in `bus.ROLES`) with
    NATS_PASSWORD, over TLS when NATS_CA_FILE is set or the URL says `tls://`."""
    user = settings.nats_user or role
    context = tls.nats_context(settings)
    return await connect(settings.nats_url, role, user=user, password=settings.nats_password, tls_context=context)


class Responder:
    """Answers request subjects with typed handlers, each message in its own task.

    nats-py runs one subscription's callbacks one after another, so without a task per message one
    slow call (a mint, a locked row) would hold up every other request on that subject. Any exception
    becomes a typed `internal` Error: a caller always gets an answer, never silence.
    """

    def __init__(self, nc: NATS, queue: str):
        self.nc = nc
        self.queue = queue
        self.in_flight: set[asyncio.Task] = set()
        self.subscriptions: list = []

    async def serve(self, subject: str, handler: Handler, deadline: float | None = None) -> None:
        """Answer `subject` with `handler`. With a `deadline` (seconds), a handler still running then (a
        database slow to connect, a pool with every connection busy) earns the caller an `unavailable`
        503 at once and finishes in the background; every handler is idempotent, so a retry is safe."""
        too_slow = bus.encode(bus.Error("unavailable", f"{subject}: a dependency is slow or down; retry soon", 503, 2))

        async def answer(msg: Msg) -> None:
            answered = False

            def answer_early() -> None:  # a timer, not a task per message: the hot path stays cheap
                nonlocal answered
                answered = True
                log.warning("%s: no answer within %gs; told the caller to retry", subject, deadline)
                self._spawn(msg.respond(too_slow))

            timer = asyncio.get_running_loop().call_later(deadline, answer_early) if deadline and msg.reply else None
            try:
                reply = await handler(bus.decode(msg.data))
            except msgspec.DecodeError as exc:
                reply = bus.Error("bad_message", f"undecodable message on {subject}: {exc}", 400)
            except BusError as exc:
                reply = exc.error
            except Exception as exc:
                if not db.is_unavailable(exc):
                    log.exception("handler for %s failed", subject)
                    reply = bus.Error("internal", f"{subject} failed", 500)
                else:  # Postgres down or too slow: the caller retries, it is not a fault of the request
                    log.warning("%s: database unavailable (%s)", subject, exc.__class__.__name__)
                    reply = bus.Error("unavailable", "The node's database is unavailable; retry shortly", 503, 2)
            if timer is not None:
                timer.cancel()
            if msg.reply and not answered:
                await msg.respond(bus.encode(reply))

        async def on_message(msg: Msg) -> None:
            task = asyncio.create_task(answer(msg))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

        self.subscriptions.append(await self.nc.subscribe(subject, queue=self.queue, cb=on_message))
        self._last = subject

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def ready(self) -> None:
        """Return once the server routes every subject here: `flush()` can overtake queued SUBs, but a
        request on the last subject is ordered after all of them (an empty body earns an Error reply)."""
        await self.nc.request(self._last, b"", timeout=REQUEST_TIMEOUT_READY)

    async def close(self, timeout: float) -> None:
        """Stop taking messages, then let the ones in flight finish."""
        for subscription in self.subscriptions:
            await subscription.unsubscribe()
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=timeout)


async def request(
    nc: NATS, subject: str, message: msgspec.Struct, expect: type[T], timeout: float = bus.REQUEST_TIMEOUT
) -> T:
    """Send a request and return the expected reply, or raise BusError with a typed reason.

    While the connection to NATS is down (reconnecting), wait at most RECONNECT_GRACE seconds for it to come
    back (a NATS restart), then fail with `unavailable` (503) rather than let the request wait out its whole
    timeout in nats-py's reconnect buffer.
    """
    if not nc.is_connected:
        for _ in range(int(min(timeout, RECONNECT_GRACE) / 0.05)):
            await asyncio.sleep(0.05)
            if nc.is_connected:
                break
        else:
            raise BusError(bus.Error("unavailable", f"the message bus is reconnecting; {subject} not asked", 503, 2))
    try:
        msg = await nc.request(subject, bus.encode(message), timeout=timeout)
    except NoRespondersError:
        raise BusError(bus.Error("unavailable", f"no service answers {subject}", 503, 1)) from None
    except NatsTimeout:
        # A service that does not answer is a dependency outage for the caller: 503 + Retry-After, not 504.
        raise BusError(bus.Error("timeout", f"{subject} did not answer in {timeout:g}s", 503, 2)) from None
    reply = bus.decode(msg.data)
    if isinstance(reply, bus.Error):
        raise BusError(reply)
    if not isinstance(reply, expect):
        raise BusError(bus.Error("bad_reply", f"{subject} answered {type(reply).__name__}", 502))
    return reply


async def ensure_usage_stream(nc: NATS, replicas: int) -> None:
    """Create (or update) the durable usage stream and billing's shared pull consumer."""
    js = nc.jetstream()
    config = StreamConfig(
        name=bus.USAGE_STREAM,
        subjects=[bus.USAGE_SUBJECT],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=600.0,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)
    await js.add_consumer(
        bus.USAGE_STREAM,
        ConsumerConfig(
            durable_name=bus.USAGE_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=-1,
            filter_subject=bus.USAGE_SUBJECT,
        ),
    )
