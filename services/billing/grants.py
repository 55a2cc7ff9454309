"""Quota grants, billing's side (RFC 4006 credit control): grant gateways units of a key's balance,
settle the calls they charged to them in batches, call grants back, expire the ones not renewed.

A grant is held in Postgres like a reservation (`keys.reserved_msat`), so every grant and
reservation together never exceed the key's balance. A gateway spends its grant locally, pricing
calls with `shared.pricing` exactly as billing would, and puts each call's usage on the usage
stream (`bus.UsageBatch`) before the answer leaves; billing settles each batch in one transaction.
A grant not renewed within its Validity-Time (`QUOTA_VALIDITY_TIME`, default 30 s) gives its units
back by itself (`expire`), so a gateway that dies or a Credit-Control answer that is lost holds
money at most that long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import asyncpg
from nats.aio.client import Client as NATS

from services.billing.ledger import REVENUE, LedgerError, fail
from services.billing.ledger import held as held_account
from services.billing.ledger import user as user_account
from shared import bus, pricing
from shared.metrics import BillingMetrics, child

log = logging.getLogger(__name__)

RECALL_WAIT = 2.0  # seconds a refund or balance query waits for gateways to give grants back
RECALL_POLL = 0.02  # seconds between looks at the grants table while waiting


class _Batch:
    """One settlement batch worked out in memory from the locked rows, then written in four statements."""

    def __init__(self, grants: dict[str, tuple[str, int]], free: dict[str, int], settled: set[str]):
        self.grants = grants  # grant_id -> (key_hash, held msat)
        self.free = free  # key_hash -> msat neither held nor reserved
        self.settled = settled
        self.charged: dict[str, int] = {}
        self.from_held: dict[str, int] = {}  # grant_id -> msat taken from its hold
        self.keys: dict[str, list[int]] = {}  # key_hash -> [charged, from holds, requests]
        self.settlements: list[tuple] = []
        self.ledger: list[tuple] = []

    def add(self, usage: bus.Usage, price: bus.Price | None = None) -> None:
        """Settle one call at `price` (the answering route's), else at the price it was held at."""
        if usage.request_id in self.settled or usage.key_hash not in self.free:
            return
        self.settled.add(usage.request_id)
        price = price or usage.price
        if usage.source == "failed" or price is None:
            base = input_msat = total = 0
        else:
            base, input_msat, _, total = pricing.cost(
                price, usage.prompt_tokens, usage.completion_tokens, usage.cache_read_tokens,
                usage.cache_write_tokens,
            )  # fmt: skip
        owner, held = self.grants.get(usage.grant_id, (usage.key_hash, 0))
        held = held if owner == usage.key_hash else 0
        charge = min(total, held + self.free[usage.key_hash])
        from_held = min(charge, held)
        if from_held:
            self.grants[usage.grant_id] = (owner, held - from_held)
            self.from_held[usage.grant_id] = self.from_held.get(usage.grant_id, 0) + from_held
        self.free[usage.key_hash] -= charge - from_held
        totals = self.keys.setdefault(usage.key_hash, [0, 0, 0])
        totals[0] += charge
        totals[1] += from_held
        totals[2] += usage.source != "failed"
        base = min(base, charge)  # parts shrink when the charge was capped, as billing.settle does
        input_msat = min(input_msat, charge - base)
        self.settlements.append((usage.request_id, usage.key_hash, usage.source, charge, base, input_msat,
                                 charge - base - input_msat, self.free[usage.key_hash]))  # fmt: skip
        for prefix, debit, amount in (("settle", held_account(usage.key_hash), from_held),
                                      ("settle-over", user_account(usage.key_hash), charge - from_held)):  # fmt: skip
            if amount:
                self.ledger.append((f"{prefix}:{usage.request_id}", debit, amount, usage.key_hash))
        self.charged[usage.request_id] = charge

    async def write(self, conn: asyncpg.Connection) -> None:
        if not self.settlements:
            return
        if self.from_held:
            await conn.execute(
                "UPDATE billing.grants g SET held_msat = g.held_msat - d.amount,"
                " settled_msat = g.settled_msat + d.amount FROM unnest($1::text[], $2::bigint[]) AS d(grant_id, amount)"
                " WHERE g.grant_id = d.grant_id",
                list(self.from_held), list(self.from_held.values()),
            )  # fmt: skip
        await conn.execute(
            "UPDATE billing.keys k SET balance_msat = k.balance_msat - d.charged,"
            " reserved_msat = k.reserved_msat - d.from_held, total_requests = k.total_requests + d.requests,"
            " total_spent_msat = k.total_spent_msat + d.charged"
            " FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS d(key_hash, charged, from_held,"
            " requests) WHERE k.key_hash = d.key_hash",
            list(self.keys), *([totals[i] for totals in self.keys.values()] for i in range(3)),
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO billing.settlements (request_id, key_hash, source, cost_msat, base_msat, input_msat,"
            " output_msat, balance_msat) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],"
            " $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[])",
            *map(list, zip(*self.settlements, strict=True)),
        )  # fmt: skip
        if self.ledger:
            await conn.execute(
                "INSERT INTO billing.ledger (idempotency_key, kind, debit, credit, amount_msat, key_hash)"
                " SELECT d.k, 'settle', d.debit, $5, d.amount, d.key_hash"
                " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS d(k, debit, amount, key_hash)",
                *map(list, zip(*self.ledger, strict=True)), REVENUE,
            )  # fmt: skip


class Grants:
    def __init__(self, pool: asyncpg.Pool, nc: NATS, validity_time: int, metrics: BillingMetrics):
        self.pool = pool
        self.nc = nc
        self.validity_time = validity_time
        self.metrics = metrics

    async def credit_control(self, ccr: bus.CreditControl) -> bus.QuotaAnswer:
        """Answer one Credit-Control-Request (see `bus.CreditControl`); amounts in msat.

        Raises LedgerError: `unknown_key` (401), `insufficient_balance` (402) when not even
        `minimum_msat` is free, `refund_pending` (425) while a refund calls grants back.
        """
        if min(ccr.requested_msat, ccr.minimum_msat, ccr.returned_msat) < 0 or ccr.request_number < 1:
            raise LedgerError(fail("bad_request", "credit control amounts must be >= 0, request_number >= 1", 400))
        try:
            row = await self.pool.fetchrow(
                "SELECT * FROM billing.credit_control($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                ccr.grant_id, ccr.key_hash, ccr.gateway_id, ccr.request_number, ccr.requested_msat,
                ccr.minimum_msat, ccr.returned_msat, ccr.final, self.validity_time,
            )  # fmt: skip
        except asyncpg.NoDataFoundError:
            raise LedgerError(fail("bad_request", "that grant belongs to another key", 400)) from None
        outcome = row["outcome"]
        if outcome == "unknown_key":
            raise LedgerError(fail("unknown_key", "Invalid API key: no such key", 401))
        if outcome == "insufficient":
            message = f"Insufficient balance: {ccr.minimum_msat} msat required, {row['spendable']} msat available"
            raise LedgerError(fail("insufficient_balance", message, 402))
        if outcome == "recalling":
            raise LedgerError(fail("refund_pending", "A refund of this key is under way", 425, 1))
        granted = row["granted_msat"]
        return bus.QuotaAnswer(
            grant_id=ccr.grant_id, granted_msat=granted, balance_msat=row["spendable"],
            validity_time=self.validity_time, final_unit=granted < ccr.requested_msat, closed=outcome == "closed",
        )  # fmt: skip

    async def credit_controls(self, batch: bus.CreditControls) -> bus.QuotaAnswers:
        """Answer each request of `batch` in order, as if each had come alone: a `bus.QuotaAnswer`, or
        the `bus.Error` of its LedgerError. Raises LedgerError `bad_request` (400) for more than
        `bus.MAX_CREDIT_CONTROLS` requests. A database failure part way fails the whole batch; the
        gateway sends the same requests again, and those already answered are answered again unmoved."""
        if len(batch.requests) > bus.MAX_CREDIT_CONTROLS:
            raise LedgerError(fail("bad_request", f"at most {bus.MAX_CREDIT_CONTROLS} requests per batch", 400))
        answers: list[bus.QuotaAnswer | bus.Error] = []
        for ccr in batch.requests:
            try:
                answers.append(await self.credit_control(ccr))
            except LedgerError as exc:
                answers.append(exc.error)
        return bus.QuotaAnswers(answers)

    async def settle(self, events: Sequence[bus.Usage], prices: Sequence[bus.Price | None] = ()) -> dict[str, int]:
        """Settle calls charged to grants, each once by request id, in one transaction.

        Each call's cost is `shared.pricing.cost` at its entry in `prices` (the answering route's
        price, checked by the caller) or else the price it was held at (echoed in the event), taken
        from its grant's hold, then from the key's free balance, never below zero.
        The rows are locked (grants, then keys, each in sorted order, so concurrent batches cannot
        deadlock) before the settled request ids are read, so a batch another replica settles at the
        same time is seen whole. Returns {request_id: msat charged} for the calls this call settled.
        """
        grant_ids = sorted({usage.grant_id for usage in events})
        key_hashes = sorted({usage.key_hash for usage in events})
        async with self.pool.acquire() as conn, conn.transaction():
            grants = await conn.fetch(
                "SELECT grant_id, key_hash, held_msat FROM billing.grants WHERE grant_id = ANY($1)"
                " ORDER BY grant_id FOR UPDATE", grant_ids,
            )  # fmt: skip
            keys = await conn.fetch(
                "SELECT key_hash, balance_msat - reserved_msat AS free FROM billing.keys WHERE key_hash = ANY($1)"
                " ORDER BY key_hash FOR UPDATE", key_hashes,
            )  # fmt: skip
            done = await conn.fetch(
                "SELECT request_id FROM billing.settlements WHERE request_id = ANY($1)",
                [usage.request_id for usage in events],
            )
            batch = _Batch(
                {row["grant_id"]: (row["key_hash"], row["held_msat"]) for row in grants},
                {row["key_hash"]: row["free"] for row in keys},
                {row["request_id"] for row in done},
            )
            for usage, price in zip(events, prices or [None] * len(events), strict=True):
                batch.add(usage, price)
            await batch.write(conn)
        return batch.charged

    async def open_grants(self, key_hash: str) -> int:
        """Grants on the key still open and holding units (an empty one, refused during a refund, is not)."""
        return await self.pool.fetchval(
            "SELECT count(*) FROM billing.grants WHERE key_hash = $1 AND state = 'open' AND held_msat > 0", key_hash
        )

    async def _outstanding(self, key_hash: str) -> tuple[int, int]:
        row = await self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM billing.grants WHERE key_hash = $1 AND state = 'open' AND held_msat > 0)"
            " AS open,"
            " (SELECT reserved_msat FROM billing.keys WHERE key_hash = $1) AS reserved", key_hash,
        )  # fmt: skip
        return row["open"], row["reserved"] or 0

    async def recall(self, key_hash: str, wait: float = RECALL_WAIT, settled: bool = False) -> bool:
        """Ask every gateway to give back its grant on `key_hash` (a Re-Auth-Request), and wait up to
        `wait` seconds until no grant on the key is open and holding units (and, with `settled`, nothing on it is held
        any more: the calls the grants paid for are settled). True when that was reached."""
        if not await self.open_grants(key_hash):
            return True
        await self.nc.publish(bus.QUOTA_RECALL, bus.encode(bus.Recall(key_hash)))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            await asyncio.sleep(RECALL_POLL)
            open_grants, reserved = await self._outstanding(key_hash)
            if not open_grants and (not settled or not reserved):
                child(self.metrics.grant_recalls, "returned").inc()
                return True
        child(self.metrics.grant_recalls, "timeout").inc()
        return False

    async def block(self, key_hash: str, seconds: float) -> None:
        """No new units on the key for `seconds` (a refund is under way); it lifts by itself."""
        await self.pool.execute(
            "UPDATE billing.keys SET recall_until = now() + make_interval(secs => $2) WHERE key_hash = $1",
            key_hash, float(seconds),
        )  # fmt: skip

    async def unblock(self, key_hash: str) -> None:
        await self.pool.execute("UPDATE billing.keys SET recall_until = NULL WHERE key_hash = $1", key_hash)

    async def expire(self) -> int:
        """Give back the units of grants past their Validity-Time (the sweeper); returns how many."""
        rows = await self.pool.fetch("SELECT * FROM billing.expire_grants(500)")
        for row in rows:
            log.warning("grant expired; %d msat back to its key", row["released_msat"])
        self.metrics.grants_expired.inc(len(rows))
        return len(rows)

    async def gauges(self) -> None:
        """Set the grant gauges: grants open, and msat held by grants (each read from its partial index)."""
        row = await self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM billing.grants WHERE state = 'open') AS open,"
            " (SELECT coalesce(sum(held_msat), 0) FROM billing.grants WHERE held_msat > 0) AS held"
        )
        self.metrics.grants_open.set(row["open"])
        self.metrics.grants_held_msat.set(row["held"])
