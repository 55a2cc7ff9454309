"""The operator's money: balances per mint, users' balances, and withdrawals of revenue.

A withdrawal takes only the operator's share — the `revenue` account, and never more than the wallet
holds beyond what users are owed — and moves it like a refund: in one transaction a pending
`billing.withdrawals` row and the ledger row `withdraw:<id>` (revenue -> ecash:out or lightning:out),
then the wallet cuts the token or pays the invoice under the idempotency key `withdraw-<id>`, then the
row is marked paid and the mint's fee booked (revenue -> fees:mint). `reconcile` stays at 0 throughout.
A retry with the same idempotency key returns the same withdrawal (resuming it when still pending);
a pending one whose caller vanished is resumed by `resume_stale()`.
"""

from __future__ import annotations

import logging
import uuid

import asyncpg
from nats.aio.client import Client as NATS

from services.billing.ledger import ECASH_OUT, FEES, LIGHTNING_OUT, REVENUE, _entry
from shared import bus, pricing
from shared.messaging import BusError, request

log = logging.getLogger(__name__)

PERMANENT = {"not_supported", "amount_too_small", "invalid_address", "unknown_mint", "insufficient_funds"}
_WITHDRAW_LOCK = 0x57697468  # "With": one withdrawal decides at a time


def fee_reserve(amount_msat: int, method: str) -> int:
    """What a withdrawal keeps back for the fee the node pays on top of it (msat): mint input fees on a
    token (1 sat), Lightning routing and melt fees on a payout (2 sats or 1 %), so revenue never goes
    below zero once the fee is booked against it."""
    if method == "cashu":
        return pricing.MSAT_PER_SAT
    return max(2 * pricing.MSAT_PER_SAT, amount_msat // 100)


class Refusal(Exception):
    """A withdrawal refused for a reason the operator can act on (`status`, `detail`)."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after


class Money:
    def __init__(self, pool: asyncpg.Pool, nc: NATS, mints: tuple[str, ...]):
        self.pool = pool
        self.nc = nc
        self.mints = mints

    async def _holdings(self) -> bus.Holdings:
        return await request(self.nc, bus.WALLET_HOLDINGS, bus.HoldingsQuery(), bus.Holdings, bus.MINT_TIMEOUT)

    async def _shares(self, conn: asyncpg.Connection) -> tuple[int, int]:
        """(users are owed, operator's revenue account) in msat, from the keys table and the ledger."""
        owed = await conn.fetchval("SELECT coalesce(sum(balance_msat), 0) FROM billing.keys")
        revenue = await conn.fetchval(
            "SELECT coalesce(sum(CASE WHEN credit = $1 THEN amount_msat ELSE -amount_msat END), 0)"
            " FROM billing.ledger WHERE credit = $1 OR debit = $1",
            REVENUE,
        )
        return int(owed), int(revenue)

    async def withdrawable(self, conn: asyncpg.Connection, unspent: int) -> int:
        """The operator's share in msat: revenue, capped by the ecash the wallet holds beyond users' balances."""
        owed, revenue = await self._shares(conn)
        return max(min(revenue, unspent - owed), 0)

    async def balances(self) -> list[dict]:
        """Per mint (sat unit): what the wallet holds, what users are owed, what is the operator's (msat).

        Users' balances are not tied to a mint; they are counted against the mints in configured order,
        then the operator's share against what is left, so the rows add up to the totals."""
        async with self.pool.acquire() as conn:
            owed, revenue = await self._shares(conn)
        try:
            holdings = await self._holdings()
        except BusError as exc:
            return [{"mint_url": mint, "unit": "sat", "wallet_balance": 0, "user_balance": 0, "owner_balance": 0,
                     "error": exc.error.message} for mint in self.mints]  # fmt: skip
        mints = list(dict.fromkeys([*self.mints, *holdings.by_mint]))
        rows, users_left, owner_left = [], owed, max(min(revenue, holdings.unspent_msat - owed), 0)
        for mint in mints:
            held = holdings.by_mint.get(mint, 0)
            users = min(users_left, held)
            owner = min(owner_left, held - users)
            users_left -= users
            owner_left -= owner
            rows.append({"mint_url": mint, "unit": "sat", "wallet_balance": held, "user_balance": users,
                         "owner_balance": owner})  # fmt: skip
        return rows

    async def withdraw(self, amount_sats: int, idempotency_key: str, mint_url: str | None = None,
                       lightning_address: str | None = None, automatic: bool = False) -> dict:  # fmt: skip
        """Withdraw `amount_sats` of revenue as a token (or to `lightning_address`); idempotent by key.

        Raises Refusal: 400 above the operator's share, 503 when the wallet is unreachable (the
        withdrawal stays pending and a retry with the same key resumes it)."""
        amount = amount_sats * pricing.MSAT_PER_SAT
        try:
            unspent = (await self._holdings()).unspent_msat
        except BusError as exc:
            raise Refusal(503, f"Wallet unavailable: {exc.error.message}", 5) from None
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _WITHDRAW_LOCK)
            row = await conn.fetchrow("SELECT * FROM billing.withdrawals WHERE idempotency_key = $1", idempotency_key)
            if row is None:
                method = "lightning" if lightning_address else "cashu"
                available = await self.withdrawable(conn, unspent)
                reserve = fee_reserve(amount, method)
                if amount + reserve > available:
                    raise Refusal(
                        400,
                        f"Withdrawal of {amount_sats} sats exceeds the operator's share: "
                        f"{available / pricing.MSAT_PER_SAT:g} sats, of which {reserve // pricing.MSAT_PER_SAT} "
                        "are kept for the fee",
                    )
                row = await conn.fetchrow(
                    "INSERT INTO billing.withdrawals (withdrawal_id, idempotency_key, amount_msat, method, recipient,"
                    " mint_url, automatic) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
                    uuid.uuid4().hex, idempotency_key, amount, method, lightning_address, mint_url, automatic,
                )  # fmt: skip
                out = ECASH_OUT if method == "cashu" else LIGHTNING_OUT
                await _entry(conn, f"withdraw:{row['withdrawal_id']}", "withdraw", REVENUE, out, amount, None)
        if row["state"] != "pending":
            return _answer(row)
        return await self._pay(row)

    async def _pay(self, row: asyncpg.Record) -> dict:
        key = f"withdraw-{row['withdrawal_id']}"
        try:
            if row["method"] == "cashu":
                issue = bus.Issue(row["amount_msat"], key, row["mint_url"])
                issued = await request(self.nc, bus.WALLET_ISSUE, issue, bus.Issued, bus.MINT_TIMEOUT)
                token, fee, mint = issued.token, issued.fee_msat, issued.mint_url
            else:
                pay = bus.Pay(row["amount_msat"], key, row["recipient"])
                paid = await request(self.nc, bus.WALLET_PAY, pay, bus.Paid, bus.MINT_TIMEOUT)
                token, fee, mint = None, paid.fee_msat, row["mint_url"]
        except BusError as exc:
            if exc.error.code in PERMANENT:
                await self._cancel(row)
                raise Refusal(400, f"Withdrawal refused: {exc.error.message}") from None
            log.warning("withdrawal %s pending: %s", row["withdrawal_id"], exc.error.code)
            raise Refusal(503, f"Withdrawal pending, retry with the same idempotency key: {exc.error.message}",
                          5) from None  # fmt: skip
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.fetchrow(
                "UPDATE billing.withdrawals SET state = 'paid', token = $2, fee_msat = $3, mint_url = $4"
                " WHERE withdrawal_id = $1 AND state = 'pending' RETURNING *",
                row["withdrawal_id"], token, fee, mint,
            )  # fmt: skip
            if done is None:  # a concurrent retry completed it first
                done = await conn.fetchrow("SELECT * FROM billing.withdrawals WHERE withdrawal_id = $1",
                                           row["withdrawal_id"])  # fmt: skip
            else:
                await _entry(conn, f"withdraw-fee:{row['withdrawal_id']}", "fee", REVENUE, FEES, fee, None)
        return _answer(done)

    async def _cancel(self, row: asyncpg.Record) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            cancelled = await conn.fetchval(
                "UPDATE billing.withdrawals SET state = 'failed' WHERE withdrawal_id = $1 AND state = 'pending'"
                " RETURNING 1", row["withdrawal_id"],
            )  # fmt: skip
            if cancelled:
                out = ECASH_OUT if row["method"] == "cashu" else LIGHTNING_OUT
                await _entry(conn, f"withdraw-cancel:{row['withdrawal_id']}", "withdraw_cancel", out, REVENUE,
                             row["amount_msat"], None)  # fmt: skip

    async def resume_stale(self, older_than: float = 120.0) -> None:
        """Finish withdrawals left pending by a crash or a mint outage (each under its own key)."""
        rows = await self.pool.fetch(
            "SELECT * FROM billing.withdrawals WHERE state = 'pending'"
            " AND created_at < now() - make_interval(secs => $1)",
            older_than,
        )
        for row in rows:
            try:
                await self._pay(row)
            except Refusal as exc:
                log.warning("withdrawal %s still pending: %s", row["withdrawal_id"], exc.detail)

    async def auto_payout(self, address: str, threshold_sats: int) -> dict | None:
        """Pay the operator's whole-sat share to `address` once it reaches `threshold_sats` (0 = never)."""
        if not address or threshold_sats <= 0:
            return None
        if await self.pool.fetchval("SELECT 1 FROM billing.withdrawals WHERE state = 'pending' AND automatic"):
            return None  # the last one is still being resumed
        unspent = (await self._holdings()).unspent_msat
        async with self.pool.acquire() as conn:
            available = await self.withdrawable(conn, unspent)
        sats = (available - fee_reserve(available, "lightning")) // pricing.MSAT_PER_SAT
        if sats < max(threshold_sats, 1):
            return None
        return await self.withdraw(sats, f"auto-{uuid.uuid4().hex}", lightning_address=address, automatic=True)

    # ---- lists -------------------------------------------------------------------------------

    async def temporary_balances(self, search: str, limit: int, offset: int) -> dict:
        where, args = "", []
        if search:
            where, args = "WHERE key_hash LIKE $1", [search.lower().strip() + "%"]
        n = len(args)
        rows = await self.pool.fetch(
            f"SELECT * FROM billing.keys {where} ORDER BY created_at DESC LIMIT ${n + 1} OFFSET ${n + 2}",
            *args, limit, offset,
        )  # fmt: skip
        totals = await self.pool.fetchrow(
            f"SELECT count(*) AS total, coalesce(sum(balance_msat), 0) AS total_balance,"
            f" coalesce(sum(total_spent_msat), 0) AS total_spent, coalesce(sum(total_requests), 0) AS total_requests"
            f" FROM billing.keys {where}",
            *args,
        )  # fmt: skip
        return {
            "balances": [
                {"hashed_key": r["key_hash"], "balance": r["balance_msat"], "reserved": r["reserved_msat"],
                 "total_spent": r["total_spent_msat"], "total_requests": r["total_requests"], "refund_address": None,
                 "created_at": r["created_at"].isoformat()}
                for r in rows
            ],
            "total": totals["total"],
            "totals": {"total_balance": int(totals["total_balance"]), "total_spent": int(totals["total_spent"]),
                       "total_requests": int(totals["total_requests"])},
        }  # fmt: skip

    async def transactions(self, kind: str, status: str, limit: int, offset: int) -> dict:
        """Ledger rows (newest first), `type` = the row's kind; withdrawals and refunds carry their state."""
        rows = await self.pool.fetch(
            "SELECT * FROM (SELECT l.id, l.kind, l.debit, l.credit, l.amount_msat, l.created_at,"
            " coalesce(w.state, r.state, 'completed') AS status FROM billing.ledger l"
            " LEFT JOIN billing.withdrawals w"
            " ON l.kind = 'withdraw' AND l.idempotency_key = 'withdraw:' || w.withdrawal_id"
            " LEFT JOIN billing.refunds r ON l.kind = 'refund' AND l.idempotency_key = 'refund:' || r.refund_id"
            " WHERE l.kind NOT IN ('reserve', 'release', 'expire')) t"
            " WHERE ($1 = '' OR kind = $1) AND ($2 = '' OR status = $2) ORDER BY id DESC",
            kind, status,
        )  # fmt: skip
        items = [
            {"id": r["id"], "type": r["kind"], "amount": r["amount_msat"], "unit": "msat", "status": r["status"],
             "from_account": _public(r["debit"]), "to_account": _public(r["credit"]),
             "created_at": r["created_at"].isoformat()}
            for r in rows
        ]  # fmt: skip
        return {"transactions": items[offset : offset + limit], "total": len(items)}

    async def withdrawals(self) -> dict:
        rows = await self.pool.fetch("SELECT * FROM billing.withdrawals ORDER BY created_at DESC LIMIT 200")
        return {"withdrawals": [{**_answer(r), "token": None} for r in rows], "total": len(rows)}

    async def lightning_invoices(self, limit: int, offset: int) -> dict:
        rows = await self.pool.fetch(
            "SELECT invoice_id, bolt11, payment_hash, purpose, amount_msat, state, created_at, paid_at, expires_at"
            " FROM billing.invoices ORDER BY created_at DESC LIMIT $1 OFFSET $2",
            limit, offset,
        )  # fmt: skip
        total = await self.pool.fetchval("SELECT count(*) FROM billing.invoices")
        return {
            "invoices": [
                {"id": r["invoice_id"], "bolt11": r["bolt11"], "payment_hash": r["payment_hash"],
                 "purpose": r["purpose"], "amount": r["amount_msat"], "status": r["state"],
                 "created_at": r["created_at"].isoformat(),
                 "paid_at": r["paid_at"].isoformat() if r["paid_at"] else None,
                 "expires_at": r["expires_at"]}
                for r in rows
            ],
            "total": total,
        }  # fmt: skip


def _public(account: str) -> str:
    """A ledger account as shown to the operator: users' accounts by an 8-hex prefix of the key hash."""
    kind, _, rest = account.partition(":")
    return f"{kind}:{rest[:8]}" if kind in ("user", "held") else account


def _answer(row: asyncpg.Record) -> dict:
    return {
        "withdrawal_id": row["withdrawal_id"], "token": row["token"], "mint_url": row["mint_url"],
        "amount": row["amount_msat"] // pricing.MSAT_PER_SAT, "unit": "sat", "fee_msat": row["fee_msat"],
        "method": row["method"], "lightning_address": row["recipient"], "status": row["state"],
        "automatic": row["automatic"], "created_at": row["created_at"].isoformat(),
    }  # fmt: skip
