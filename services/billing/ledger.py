"""Balances and the ledger in Postgres: every money movement is one transaction that updates the key
and appends balanced ledger rows, each with a unique idempotency key, so a retry can never move money
twice and `reconcile` can prove the books from the rows alone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import msgspec

from shared import bus, pricing
from shared.secretbox import SecretBox

GRANTS, ECASH_IN, ECASH_OUT, LIGHTNING_OUT = "operator:grants", "ecash:in", "ecash:out", "lightning:out"
LIGHTNING_IN = "lightning:in"
REVENUE, FEES = "revenue", "fees:mint"


def user(key_hash: str) -> str:
    return f"user:{key_hash}"


def held(key_hash: str) -> str:
    return f"held:{key_hash}"


MAX_GRANT_MSAT = 21_000_000 * 100_000_000 * 1000  # every bitcoin there will ever be, in msat (fits a bigint)
# The part of billing.keys' balance_msat that is not operator credit (see `refundable_msat`), in SQL.
REFUNDABLE_SQL = "balance_msat - LEAST(balance_msat, GREATEST(0, granted_msat - total_spent_msat))"


def refundable_msat(balance_msat: int, granted_msat: int, total_spent_msat: int) -> int:
    """The part of a key's balance a refund may pay out as ecash, in msat.

    Operator-granted credit (`create-key`) is spent first and never refunded: of the spending mark
    `granted_msat` (see migration 022), `max(0, granted_msat - total_spent_msat)` is still unspent
    credit, and the rest of the balance is the user's own ecash. Never negative, never above the balance.
    """
    return balance_msat - min(balance_msat, max(0, granted_msat - total_spent_msat))


def fail(code: str, message: str, status: int, retry_after: int | None = None) -> bus.Error:
    return bus.Error(code, message, status, retry_after)


class LedgerError(Exception):
    def __init__(self, error: bus.Error):
        super().__init__(error.message)
        self.error = error


async def _entry(
    conn: asyncpg.Connection, key: str, kind: str, debit: str, credit: str, amount: int, key_hash: str | None
) -> None:
    if amount:
        await conn.execute(
            "INSERT INTO billing.ledger (idempotency_key, kind, debit, credit, amount_msat, key_hash)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            key, kind, debit, credit, amount, key_hash,
        )  # fmt: skip


def _info(row: asyncpg.Record, credited: int = 0) -> bus.KeyInfo:
    spendable = row["balance_msat"] - row["reserved_msat"]
    refundable = refundable_msat(row["balance_msat"], row["granted_msat"], row["total_spent_msat"])
    return bus.KeyInfo(
        key_hash=row["key_hash"],
        balance_msat=spendable,
        reserved_msat=row["reserved_msat"],
        total_requests=row["total_requests"],
        total_spent_msat=row["total_spent_msat"],
        credited_msat=credited,
        refundable_msat=min(spendable, refundable),  # what a refund would pay once held calls settled at most
    )


@dataclass(frozen=True)
class PendingRefund:
    refund_id: str
    amount_msat: int
    method: str
    recipient: str | None


@dataclass(frozen=True)
class DepositIntent:
    """A deposit begun and not yet ended (`billing.deposit_intents`); `due_at` is the claim it was taken
    under, so closing it cannot remove a newer intent a client's retry wrote meanwhile."""

    token_hash: str
    key_hash: str
    create: bool
    token: str
    due_at: datetime
    attempts: int


class Ledger:
    def __init__(self, pool: asyncpg.Pool, box: SecretBox):
        self.pool = pool
        self.box = box  # refund tokens and not-yet-handed-out invoice keys are stored sealed

    # ---- keys ------------------------------------------------------------------------------

    async def key_info(self, key_hash: str) -> bus.KeyInfo:
        row = await self.pool.fetchrow("SELECT * FROM billing.keys WHERE key_hash = $1", key_hash)
        if row is None:
            raise LedgerError(fail("unknown_key", "Invalid API key: no such key", 401))
        return _info(row)

    async def key_exists(self, key_hash: str) -> bool:
        return bool(await self.pool.fetchval("SELECT 1 FROM billing.keys WHERE key_hash = $1", key_hash))

    async def grant(self, key_hash: str, msat: int, idempotency_key: str) -> bus.KeyInfo:
        """An operator-funded key (`create-key`): the money comes from the operator, not from ecash, so it
        can be spent on inference but is not refundable (`refundable_msat`). Raises `invalid_amount` (400)
        for a negative or absurd `msat`, before anything changes."""
        if not 0 <= msat <= MAX_GRANT_MSAT:
            raise LedgerError(fail("invalid_amount", f"balance must be 0 to {MAX_GRANT_MSAT} msat, not {msat}", 400))
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                "SELECT 1 FROM billing.ledger WHERE idempotency_key = $1", f"grant:{idempotency_key}"
            )
            await conn.execute("INSERT INTO billing.keys (key_hash) VALUES ($1) ON CONFLICT DO NOTHING", key_hash)
            if not done:
                await conn.execute(
                    "UPDATE billing.keys SET balance_msat = balance_msat + $2, last_refund_id = NULL,"
                    " granted_msat = GREATEST(granted_msat, total_spent_msat) + $2 WHERE key_hash = $1", key_hash, msat,
                )  # fmt: skip
                await conn.execute(
                    "INSERT INTO billing.ledger (idempotency_key, kind, debit, credit, amount_msat, key_hash)"
                    " VALUES ($1, 'grant', $2, $3, $4, $5)",
                    f"grant:{idempotency_key}", GRANTS, user(key_hash), msat, key_hash,
                )  # fmt: skip
            return _info(await conn.fetchrow("SELECT * FROM billing.keys WHERE key_hash = $1", key_hash))

    # ---- deposits --------------------------------------------------------------------------

    async def deposit_of(self, token_hash: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM billing.deposits WHERE token_hash = $1", token_hash)

    async def deposit_mint(self, key_hash: str) -> str | None:
        """The mint of the key's latest token deposit (None when it was funded otherwise)."""
        return await self.pool.fetchval(
            "SELECT mint_url FROM billing.deposits WHERE key_hash = $1 ORDER BY created_at DESC LIMIT 1", key_hash
        )

    async def answer_repeat(self, deposit: asyncpg.Record, key_hash: str) -> bus.KeyInfo:
        """The same token presented again: the same answer for its own key, 'already spent' for another."""
        if deposit["key_hash"] != key_hash:
            raise LedgerError(fail("cashu_token_already_spent", "Cashu token already spent", 400))
        return bus.KeyInfo(**{**_struct_dict(await self.key_info(key_hash)), "credited_msat": deposit["credited_msat"]})

    async def record_intent(self, token_hash: str, key_hash: str, token: str, create: bool, due_in: float) -> None:
        """Write down, before the wallet is asked, that this token is being deposited to `key_hash`; the
        deposit loop finishes it `due_in` seconds from now unless the credit (or a refusal) ends it first.
        The token is stored sealed. A retry of the same token replaces the intent (and its due time)."""
        await self.pool.execute(
            "INSERT INTO billing.deposit_intents (token_hash, key_hash, create_key, token, due_at)"
            " VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) ON CONFLICT (token_hash) DO UPDATE"
            " SET key_hash = excluded.key_hash, create_key = excluded.create_key, token = excluded.token,"
            " due_at = excluded.due_at",
            token_hash, key_hash, create, self.box.seal(token), float(due_in),
        )  # fmt: skip

    async def close_intent(self, token_hash: str, claimed: datetime | None = None) -> None:
        """End a deposit intent with nothing (more) to credit; with `claimed`, only if no retry renewed it."""
        await self.pool.execute(
            "DELETE FROM billing.deposit_intents WHERE token_hash = $1 AND ($2::timestamptz IS NULL OR due_at = $2)",
            token_hash, claimed,
        )  # fmt: skip

    async def claim_intents(self, lease: float, limit: int = 50) -> list[DepositIntent]:
        """Take the intents that are due, oldest first, for `lease` seconds: another billing replica skips
        them until then (a replica killed mid-attempt leaves them to the next after the lease)."""
        rows = await self.pool.fetch(
            "UPDATE billing.deposit_intents i SET due_at = now() + make_interval(secs => $1), attempts = attempts + 1"
            " FROM (SELECT token_hash FROM billing.deposit_intents WHERE due_at <= now() ORDER BY due_at LIMIT $2"
            " FOR UPDATE SKIP LOCKED) due WHERE i.token_hash = due.token_hash RETURNING i.*",
            float(lease), limit,
        )  # fmt: skip
        return [_intent(r, self.box) for r in rows]

    async def retry_intent(self, intent: DepositIntent, retry_in: float) -> None:
        """Give a claimed intent back, due again in `retry_in` seconds (unless a retry renewed it)."""
        await self.pool.execute(
            "UPDATE billing.deposit_intents SET due_at = now() + make_interval(secs => $3)"
            " WHERE token_hash = $1 AND due_at = $2", intent.token_hash, intent.due_at, float(retry_in),
        )  # fmt: skip

    async def open_intents(self) -> int:
        return await self.pool.fetchval("SELECT count(*) FROM billing.deposit_intents")

    async def oldest_pending(self) -> dict[str, float]:
        """Seconds since the oldest deposit intent and the oldest pending refund began, 0 for none:
        {"deposit": s, "refund": s}. Both end by themselves within about a minute of a fault clearing,
        so an age far past that means one is stuck."""
        row = await self.pool.fetchrow(
            "SELECT (SELECT extract(epoch FROM now() - min(created_at)) FROM billing.deposit_intents) AS deposit,"
            " (SELECT extract(epoch FROM now() - min(created_at)) FROM billing.refunds WHERE state = 'pending')"
            " AS refund"
        )
        return {operation: float(row[operation] or 0) for operation in ("deposit", "refund")}

    async def credit_deposit(self, key_hash: str, token_hash: str, redeemed: bus.Redeemed, create: bool) -> bus.KeyInfo:
        """Credit a redeemed token once: the deposits row (keyed by token hash) is the idempotency guard.
        The token's deposit intent is closed in the same transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO billing.deposits (token_hash, key_hash, mint_url, amount_msat, fee_msat, credited_msat)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1",
                token_hash, key_hash, redeemed.mint_url, redeemed.amount_msat, redeemed.fee_msat,
                redeemed.credited_msat,
            )  # fmt: skip
            if not inserted:
                existing = await conn.fetchrow("SELECT * FROM billing.deposits WHERE token_hash = $1", token_hash)
                raise _Repeat(existing)
            if create:
                await conn.execute("INSERT INTO billing.keys (key_hash) VALUES ($1) ON CONFLICT DO NOTHING", key_hash)
            row = await conn.fetchrow(
                "UPDATE billing.keys SET balance_msat = balance_msat + $2, last_refund_id = NULL"
                " WHERE key_hash = $1 RETURNING *", key_hash, redeemed.credited_msat,
            )  # fmt: skip
            if row is None:
                raise LedgerError(fail("unknown_key", "Invalid API key: no such key", 401))
            await _entry(conn, f"deposit:{token_hash}", "deposit", ECASH_IN, user(key_hash),
                         redeemed.credited_msat, key_hash)  # fmt: skip
            await _entry(conn, f"deposit-fee:{token_hash}", "fee", ECASH_IN, FEES, redeemed.fee_msat, key_hash)
            await conn.execute("DELETE FROM billing.deposit_intents WHERE token_hash = $1", token_hash)
            return _info(row, redeemed.credited_msat)

    # ---- Lightning invoices ----------------------------------------------------------------

    async def record_invoice(self, invoice_id: str, quote: bus.MintQuoteState, payment_hash: str, purpose: str,
                             key_hash: str, api_key: str | None) -> bus.InvoiceInfo:  # fmt: skip
        row = await self.pool.fetchrow(
            "INSERT INTO billing.invoices (invoice_id, quote_id, bolt11, payment_hash, purpose, key_hash, api_key,"
            " amount_msat, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
            invoice_id, quote.quote_id, quote.bolt11, payment_hash, purpose, key_hash,
            self.box.seal(api_key) if api_key else None, quote.amount_msat,
            quote.expires_at,
        )  # fmt: skip
        return _invoice(row, "pending")

    async def invoice(self, invoice_id: str, bolt11: str) -> asyncpg.Record:
        row = await self.pool.fetchrow(
            "SELECT * FROM billing.invoices WHERE invoice_id = $1 OR bolt11 = $2", invoice_id, bolt11
        )
        if row is None:
            raise LedgerError(fail("unknown_invoice", "Invoice not found", 404))
        return row

    async def credit_invoice(self, invoice_id: str) -> int:
        """Credit a paid invoice once (the state flip is the guard); returns what this call credited."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE billing.invoices SET state = 'paid', paid_at = now()"
                " WHERE invoice_id = $1 AND state = 'pending' RETURNING *", invoice_id,
            )  # fmt: skip
            if row is None:
                return 0
            key_hash, amount = row["key_hash"], row["amount_msat"]
            await conn.execute("INSERT INTO billing.keys (key_hash) VALUES ($1) ON CONFLICT DO NOTHING", key_hash)
            await conn.execute(
                "UPDATE billing.keys SET balance_msat = balance_msat + $2, last_refund_id = NULL WHERE key_hash = $1",
                key_hash, amount,
            )  # fmt: skip
            await _entry(conn, f"lightning:{invoice_id}", "lightning_deposit", LIGHTNING_IN, user(key_hash), amount,
                         key_hash)  # fmt: skip
            return amount

    async def invoice_answer(self, invoice_id: str, expired: bool = False) -> bus.InvoiceInfo:
        """The invoice's status; a paid `create` invoice's key is handed out once and then forgotten."""
        row = await self.pool.fetchrow(
            "UPDATE billing.invoices i SET api_key = NULL FROM"
            " (SELECT invoice_id, api_key FROM billing.invoices WHERE invoice_id = $1 FOR UPDATE) old"
            " WHERE i.invoice_id = old.invoice_id AND i.state = 'paid' RETURNING i.*, old.api_key AS handed_out",
            invoice_id,
        )  # fmt: skip
        if row is not None:
            return _invoice(row, "paid", self.box.open(row["handed_out"]) if row["handed_out"] else None)
        row = await self.pool.fetchrow("SELECT * FROM billing.invoices WHERE invoice_id = $1", invoice_id)
        return _invoice(row, "expired" if expired else "pending")

    # ---- reservations and settlement -------------------------------------------------------

    async def reserve(self, message: bus.Reserve, model: str, price: bus.Price, amount: int,
                      routes: tuple[bus.Route, ...] = ()) -> bus.Reserved:  # fmt: skip
        """Hold `amount` with one conditional UPDATE (in `billing.reserve`): concurrent calls on one key can
        never overspend, and a retried request gets its existing hold back. `routes` are passed on to the
        gateway (where to forward, best first)."""
        args = (message.key_hash, message.request_id, uuid.uuid4().hex, model, amount, bus.encode(price),
                message.gateway)  # fmt: skip
        try:
            row = await self.pool.fetchrow("SELECT * FROM billing.reserve($1, $2, $3, $4, $5, $6, $7)", *args)
        except asyncpg.UniqueViolationError:  # the same request raced itself: the winner's hold is the answer
            row = await self.pool.fetchrow("SELECT * FROM billing.reserve($1, $2, $3, $4, $5, $6, $7)", *args)
        if row["outcome"] == "unknown_key":
            raise LedgerError(fail("unknown_key", "Invalid API key: no such key", 401))
        if row["outcome"] == "insufficient":
            message_text = f"Insufficient balance: {amount} msat required, {row['spendable']} msat available"
            raise LedgerError(fail("insufficient_balance", message_text, 402))
        return bus.Reserved(row["reservation_id"], row["amount_msat"], row["spendable"], row["model"],
                            _price(row["price"]), routes)  # fmt: skip

    async def settle(self, usage: bus.Usage, charge_price: bus.Price | None = None) -> bus.Settled:
        """Charge a call's usage exactly once (by request id) and release the rest of its reservation.

        The cost is computed here with `shared.pricing` at `charge_price` (the price of the provider that
        answered, checked by the caller) or else the reservation's price, and applied by `billing.settle`
        in one round trip, which checks the reservation's price, locks, caps and writes the ledger.
        """
        price = usage.price
        if price is None:  # an event without the price: read it from the reservation first
            stored = await self.pool.fetchval(
                "SELECT price FROM billing.reservations WHERE reservation_id = $1", usage.reservation_id
            )
            if stored is None:
                raise LedgerError(fail("unknown_reservation", "no such reservation", 404))
            price = _price(stored)
        if usage.source == "failed":
            base = input_msat = output_msat = total = 0
        else:
            base, input_msat, output_msat, total = pricing.cost(
                charge_price or price, usage.prompt_tokens, usage.completion_tokens, usage.cache_read_tokens,
                usage.cache_write_tokens,
            )  # fmt: skip
        try:
            done = await self.pool.fetchrow(
                "SELECT * FROM billing.settle($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                usage.request_id, usage.reservation_id, usage.key_hash, usage.source, base, input_msat, output_msat,
                total, bus.encode(price),
            )  # fmt: skip
        except asyncpg.NoDataFoundError:
            raise LedgerError(fail("unknown_reservation", "no such reservation at that price", 404)) from None
        return _settled(usage.request_id, done, already=done["already"])

    async def expire(self, ttl_seconds: int) -> int:
        """Release reservations whose usage never came (the sweeper); each release is a ledger entry."""
        async with self.pool.acquire() as conn:
            ids = await conn.fetch(
                "SELECT reservation_id FROM billing.reservations WHERE state = 'open'"
                " AND created_at < now() - make_interval(secs => $1) LIMIT 500", float(ttl_seconds),
            )  # fmt: skip
            return await _release(conn, ids)

    async def open_calls(self, limit: int = 10_000) -> list[asyncpg.Record]:
        """The open reservations that name their gateway (X-Cashu calls): reservation_id, request_id, gateway."""
        return await self.pool.fetch(
            "SELECT reservation_id, request_id, gateway FROM billing.reservations WHERE state = 'open'"
            " AND gateway <> '' LIMIT $1", limit,
        )  # fmt: skip

    async def release(self, reservation_ids: list[str]) -> int:
        """Release these reservations if still open, uncharged: their calls are over without a settlement
        (`services.billing.liveness`). Each release is a ledger entry (`expire:<id>`, so a sweeper racing
        this one releases once); returns how many this call released."""
        if not reservation_ids:
            return 0
        async with self.pool.acquire() as conn:
            return await _release(conn, [{"reservation_id": r} for r in reservation_ids])

    async def open_reservations(self) -> int:
        return await self.pool.fetchval("SELECT count(*) FROM billing.reservations WHERE state = 'open'")

    # ---- refunds ---------------------------------------------------------------------------

    async def begin_refund(self, key_hash: str, method: str, recipient: str | None) -> PendingRefund | bus.Refunded:
        """Debit the key and record a pending refund in one transaction, or say why not.

        A pending refund (the mint was down) is returned again so its retry re-issues with the same
        idempotency key; a key emptied by a refund (dust aside) that nothing was credited to since
        replays that refund, so a client retrying after a lost response gets its token. Only the
        refundable part (`refundable_msat`, whole sats) is paid out: operator-granted credit stays on
        the key, spendable. Raises `no_balance` / `balance_too_small` / `not_refundable` (400: nothing
        but operator credit and dust), `refund_pending` (425: a call is still running), `unknown_key` (401).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            key = await conn.fetchrow("SELECT * FROM billing.keys WHERE key_hash = $1 FOR UPDATE", key_hash)
            if key is None:
                raise LedgerError(fail("unknown_key", "Invalid API key: no such key", 401))
            pending = await conn.fetchrow(
                "SELECT * FROM billing.refunds WHERE key_hash = $1 AND state = 'pending'", key_hash
            )
            if pending is not None:
                return PendingRefund(pending["refund_id"], pending["amount_msat"], pending["method"],
                                     pending["recipient"])  # fmt: skip
            if key["reserved_msat"] > 0:
                raise LedgerError(fail("refund_pending", "A request on this key is still running", 425, 1))
            balance = key["balance_msat"]
            refundable = refundable_msat(balance, key["granted_msat"], key["total_spent_msat"])
            if refundable < pricing.MSAT_PER_SAT and key["last_refund_id"]:
                last = await conn.fetchrow("SELECT * FROM billing.refunds WHERE refund_id = $1", key["last_refund_id"])
                return _refunded(last, self.box)
            if balance == 0:
                raise LedgerError(fail("no_balance", "No balance to refund", 400))
            if balance < pricing.MSAT_PER_SAT:  # dust, whatever its origin: the string clients match on
                raise LedgerError(fail("balance_too_small", "Balance too small to refund", 400))
            if refundable < pricing.MSAT_PER_SAT:
                message = (f"No refundable balance: {balance - refundable} msat of this key's balance is credit the"
                           " operator granted, spendable on inference but not refundable")  # fmt: skip
                raise LedgerError(fail("not_refundable", message, 400))
            amount = refundable - refundable % pricing.MSAT_PER_SAT  # operator credit and dust stay on the key
            refund_id = uuid.uuid4().hex
            await conn.execute(
                "UPDATE billing.keys SET balance_msat = balance_msat - $2 WHERE key_hash = $1", key_hash, amount
            )
            await conn.execute(
                "INSERT INTO billing.refunds (refund_id, key_hash, amount_msat, method, recipient)"
                " VALUES ($1, $2, $3, $4, $5)", refund_id, key_hash, amount, method, recipient,
            )  # fmt: skip
            out = ECASH_OUT if method == "cashu" else LIGHTNING_OUT
            await _entry(conn, f"refund:{refund_id}", "refund", user(key_hash), out, amount, key_hash)
            return PendingRefund(refund_id, amount, method, recipient)

    async def complete_refund(self, refund: PendingRefund, key_hash: str, token: str | None, fee: int) -> bus.Refunded:
        """The payout happened: mark it paid; a mint fee the node paid to cut the token is its expense."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM billing.refunds WHERE refund_id = $1 FOR UPDATE", refund.refund_id)
            if row["state"] != "pending":
                return _refunded(row, self.box)  # a concurrent retry of the same refund completed it first
            row = await conn.fetchrow(
                "UPDATE billing.refunds SET state = 'paid', token = $2, fee_msat = $3"
                " WHERE refund_id = $1 RETURNING *", refund.refund_id, self.box.seal(token) if token else None, fee,
            )  # fmt: skip
            await conn.execute(
                f"UPDATE billing.keys SET last_refund_id = $2 WHERE key_hash = $1 AND {REFUNDABLE_SQL} < 1000",
                key_hash, refund.refund_id,
            )  # fmt: skip
            await _entry(conn, f"refund-fee:{refund.refund_id}", "fee", REVENUE, FEES, fee, key_hash)
            return _refunded(row, self.box)

    async def cancel_refund(self, refund: PendingRefund, key_hash: str) -> None:
        """The payout was refused for good (not a transient failure): give the money back to the key."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE billing.refunds SET state = 'failed' WHERE refund_id = $1 AND state = 'pending' RETURNING 1",
                refund.refund_id,
            )
            if row is None:
                return
            await conn.execute(
                "UPDATE billing.keys SET balance_msat = balance_msat + $2 WHERE key_hash = $1",
                key_hash,
                refund.amount_msat,
            )
            out = ECASH_OUT if refund.method == "cashu" else LIGHTNING_OUT
            await _entry(conn, f"refund-cancel:{refund.refund_id}", "refund_cancel", out, user(key_hash),
                         refund.amount_msat, key_hash)  # fmt: skip

    async def latest_refund(self, key_hash: str) -> bus.Refunded:
        """The key's most recent refund, whatever its state; `no_refund` (404) when it never had one."""
        row = await self.pool.fetchrow(
            "SELECT * FROM billing.refunds WHERE key_hash = $1 ORDER BY created_at DESC LIMIT 1", key_hash
        )
        if row is None:
            raise LedgerError(fail("no_refund", "No refund for this key", 404))
        return _refunded(row, self.box)

    async def pending_refunds(self, older_than: float, limit: int = 100) -> list[tuple[PendingRefund, str]]:
        """Refunds pending for over `older_than` seconds, oldest first, with their key hashes."""
        rows = await self.pool.fetch(
            "SELECT * FROM billing.refunds WHERE state = 'pending'"
            " AND created_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2",
            float(older_than), limit,
        )  # fmt: skip
        return [
            (PendingRefund(r["refund_id"], r["amount_msat"], r["method"], r["recipient"]), r["key_hash"]) for r in rows
        ]

    # ---- reconcile -------------------------------------------------------------------------

    async def books(self) -> dict[str, int]:
        """Account balances from the ledger alone (msat by account name), plus `owed` (what the keys table says
        users hold), `refundable` (the part of it that is users' own ecash, not operator credit: see
        `refundable_msat`), `unspent_credit` (operator credit not spent on inference yet, whether or not
        the balance still holds it), `pending_refunds` (debited from keys, not paid out yet) and `withdrawn` (the
        operator's revenue taken out, net of cancelled withdrawals; it left through ecash:out or
        lightning:out like a user's refund).

        Both are read from one snapshot (a read-only REPEATABLE READ transaction): every movement
        updates the keys and appends its ledger rows in one transaction, so a snapshot sees each
        movement whole or not at all. Read one after the other under READ COMMITTED, a settlement
        committing in between showed as an imbalance of exactly its charge (keys debited, revenue
        row not yet counted).
        """
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(
                "SELECT account, sum(amount) AS balance FROM ("
                " SELECT credit AS account, amount_msat AS amount FROM billing.ledger"
                " UNION ALL SELECT debit, -amount_msat FROM billing.ledger) moves"
                " WHERE account NOT LIKE 'user:%' AND account NOT LIKE 'held:%' GROUP BY account"
            )
            keys = await conn.fetchrow(
                f"SELECT coalesce(sum(balance_msat), 0) AS owed, coalesce(sum({REFUNDABLE_SQL}), 0) AS refundable,"
                " coalesce(sum(GREATEST(0, granted_msat - total_spent_msat)), 0) AS unspent_credit FROM billing.keys"
            )
            pending = await conn.fetchval(
                "SELECT coalesce(sum(amount_msat), 0) FROM billing.refunds WHERE state = 'pending'"
            )
            withdrawn = await conn.fetchval(
                "SELECT coalesce(sum(CASE kind WHEN 'withdraw' THEN amount_msat ELSE -amount_msat END), 0)"
                " FROM billing.ledger WHERE kind IN ('withdraw', 'withdraw_cancel')"
            )
        balances = {r["account"]: int(r["balance"]) for r in rows}
        return {"owed": int(keys["owed"]), "refundable": int(keys["refundable"]), "pending_refunds": int(pending),
                "unspent_credit": int(keys["unspent_credit"]),
                "withdrawn": int(withdrawn), **balances}  # fmt: skip


async def _release(conn: asyncpg.Connection, ids: list) -> int:
    """Release each still-open reservation of `ids` (records with `reservation_id`), each in its own
    transaction with its ledger entry; returns how many this call released."""
    released = 0
    for record in ids:
        async with conn.transaction():
            row = await conn.fetchrow(
                "UPDATE billing.reservations SET state = 'expired' WHERE reservation_id = $1"
                " AND state = 'open' RETURNING key_hash, amount_msat", record["reservation_id"],
            )  # fmt: skip
            if row is None:
                continue
            await conn.execute(
                "UPDATE billing.keys SET reserved_msat = reserved_msat - $2 WHERE key_hash = $1",
                row["key_hash"], row["amount_msat"],
            )  # fmt: skip
            await _entry(conn, f"expire:{record['reservation_id']}", "expire", held(row["key_hash"]),
                         user(row["key_hash"]), row["amount_msat"], row["key_hash"])  # fmt: skip
            released += 1
    return released


class _Repeat(Exception):
    """A concurrent deposit of the same token won the race; answer as for a repeat."""

    def __init__(self, deposit: asyncpg.Record):
        super().__init__("repeat")
        self.deposit = deposit


def _struct_dict(struct) -> dict:
    return {f: getattr(struct, f) for f in struct.__struct_fields__}


def _settled(request_id: str, row: asyncpg.Record, already: bool) -> bus.Settled:
    return bus.Settled(
        request_id=request_id, cost_msat=row["cost_msat"], input_msat=row["input_msat"],
        output_msat=row["output_msat"], base_msat=row["base_msat"], balance_msat=row["balance_msat"], already=already,
    )  # fmt: skip


def _intent(row: asyncpg.Record, box: SecretBox) -> DepositIntent:
    token = box.open(row["token"])
    return DepositIntent(row["token_hash"], row["key_hash"], row["create_key"], token, row["due_at"], row["attempts"])


def _refunded(row: asyncpg.Record, box: SecretBox) -> bus.Refunded:
    token = box.open(row["token"]) if row["token"] else None
    return bus.Refunded(refund_id=row["refund_id"], amount_msat=row["amount_msat"], token=token,
                        recipient=row["recipient"], status=row["state"])  # fmt: skip


def _invoice(row: asyncpg.Record, status: str, api_key: str | None = None) -> bus.InvoiceInfo:
    return bus.InvoiceInfo(
        invoice_id=row["invoice_id"], bolt11=row["bolt11"], amount_msat=row["amount_msat"],
        payment_hash=row["payment_hash"], status=status, created_at=int(row["created_at"].timestamp()),
        expires_at=row["expires_at"], paid_at=int(row["paid_at"].timestamp()) if row["paid_at"] else None,
        api_key=api_key,
    )  # fmt: skip


def _price(data: bytes) -> bus.Price:
    return msgspec.msgpack.decode(data, type=bus.Price)
