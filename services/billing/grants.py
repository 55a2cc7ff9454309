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

from services.billing.ledger import LedgerError, fail
from shared import bus, pricing

log = logging.getLogger(__name__)

RECALL_WAIT = 2.0  # seconds a refund or balance query waits for gateways to give grants back
RECALL_POLL = 0.02  # seconds between looks at the grants table while waiting


class Grants:
    def __init__(self, pool: asyncpg.Pool, nc: NATS, validity_time: int):
        self.pool = pool
        self.nc = nc
        self.validity_time = validity_time

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

    async def settle(self, events: Sequence[bus.Usage]) -> dict[str, int]:
        """Settle calls charged to grants, each once by request id, in one transaction.

        Each call's cost is `shared.pricing.cost` at the price the gateway charged it at (echoed in
        the event), taken from its grant's hold, then from the key's free balance, never below zero.
        Returns {request_id: msat charged} for the events this call settled (repeats are left out).
        """
        columns: list[list] = [[], [], [], [], [], [], [], []]
        for usage in events:
            if usage.source == "failed" or usage.price is None:
                base = input_msat = output_msat = total = 0
            else:
                base, input_msat, output_msat, total = pricing.cost(
                    usage.price, usage.prompt_tokens, usage.completion_tokens, usage.cache_read_tokens,
                    usage.cache_write_tokens,
                )  # fmt: skip
            for column, value in zip(
                columns,
                (usage.request_id, usage.key_hash, usage.grant_id, usage.source, base, input_msat, output_msat, total),
                strict=True,
            ):
                column.append(value)
        query = "SELECT * FROM billing.settle_grant_usage($1, $2, $3, $4, $5, $6, $7, $8)"
        rows = await self.pool.fetch(query, *columns)
        return {row["request_id"]: row["charged_msat"] for row in rows}

    async def open_grants(self, key_hash: str) -> int:
        return await self.pool.fetchval(
            "SELECT count(*) FROM billing.grants WHERE key_hash = $1 AND state = 'open'", key_hash
        )

    async def _outstanding(self, key_hash: str) -> tuple[int, int]:
        row = await self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM billing.grants WHERE key_hash = $1 AND state = 'open') AS open,"
            " (SELECT reserved_msat FROM billing.keys WHERE key_hash = $1) AS reserved", key_hash,
        )  # fmt: skip
        return row["open"], row["reserved"] or 0

    async def recall(self, key_hash: str, wait: float = RECALL_WAIT, settled: bool = False) -> bool:
        """Ask every gateway to give back its grant on `key_hash` (a Re-Auth-Request), and wait up to
        `wait` seconds until no grant on the key is open (and, with `settled`, nothing on it is held
        any more: the calls the grants paid for are settled). True when that was reached."""
        if not await self.open_grants(key_hash):
            return True
        await self.nc.publish(bus.QUOTA_RECALL, bus.encode(bus.Recall(key_hash)))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            await asyncio.sleep(RECALL_POLL)
            open_grants, reserved = await self._outstanding(key_hash)
            if not open_grants and (not settled or not reserved):
                return True
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
        return len(rows)
