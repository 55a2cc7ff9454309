"""Calls charged to quota grants, into the durable usage stream with a group commit.

A call's usage must be in JetStream (acknowledged) before its answer leaves, so a gateway killed a
moment later loses no charge. One publish carries every call that ended while the previous publish
was in flight (`bus.UsageBatch`): alone, a call waits for one acknowledgement as before; under load,
hundreds share one, and billing settles each message in one transaction.
"""

from __future__ import annotations

import asyncio
import uuid

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from shared import bus

MAX_BATCH = 500  # events per message: ~150 kB of msgpack, well inside JetStream's 1 MB message limit
PUBLISH_ATTEMPTS = 3  # a timed-out publish is retried with the same Nats-Msg-Id, so it is stored once


class UsageStream:
    def __init__(self, js: JetStreamContext):
        self.js = js
        self.pending: list[tuple[bus.Usage, asyncio.Future]] = []
        self.flusher: asyncio.Task | None = None

    async def put(self, usage: bus.Usage) -> None:
        """Return once `usage` is stored in the stream; raise what the publish raised if it could not be."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((usage, future))
        if self.flusher is None:
            self.flusher = asyncio.ensure_future(self._flush())
        await future

    async def _flush(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                try:
                    await self._publish(bus.UsageBatch(tuple(usage for usage, _ in batch)))
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self.flusher = None

    async def _publish(self, batch: bus.UsageBatch) -> None:
        data, headers = bus.encode(batch), {"Nats-Msg-Id": f"usage-batch-{uuid.uuid4().hex}"}
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self.js.publish(bus.USAGE_SUBJECT, data, headers=headers)
                return
            except NatsTimeout:
                if attempt == PUBLISH_ATTEMPTS - 1:
                    raise

    async def close(self) -> None:
        if self.flusher is not None:
            await asyncio.wait([self.flusher], timeout=10)
