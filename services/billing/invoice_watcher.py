"""Lightning that credits itself: paid top-up and create invoices are credited without a status call.

Every INVOICE_WATCH_EVERY seconds one billing replica (a transaction-scoped advisory lock, so replicas
take turns and a dead one holds nothing) asks the wallet about each pending, unexpired invoice; the
wallet mints a paid one's ecash (resuming a quote left in `minting`) and billing credits it once (the
invoice's state flip is the guard, shared with the status endpoint). A `create` invoice's new key is
still handed out only by the first paid status answer.
"""

from __future__ import annotations

import hashlib
import logging

import asyncpg

from services.billing.accounts import Accounts
from services.billing.ledger import LedgerError

log = logging.getLogger(__name__)

INVOICE_WATCH_EVERY = 1.0  # seconds between looks at pending invoices
EXPIRY_GRACE = 60  # seconds after an invoice's expiry it is still looked at (a payment settling late)
BATCH = 100  # invoices looked at per turn, oldest first
_LOCK = int.from_bytes(hashlib.sha256(b"billing:invoice-watcher").digest()[:8], "big", signed=True)


async def credit_paid_invoices(pool: asyncpg.Pool, accounts: Accounts) -> int:
    """One turn of the watcher; returns how many invoices it found paid (0 when another replica's turn)."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
            return 0
        rows = await conn.fetch(
            "SELECT invoice_id, quote_id FROM billing.invoices WHERE state = 'pending'"
            " AND (expires_at = 0 OR expires_at > extract(epoch FROM now())::bigint - $1)"
            " AND created_at > now() - interval '2 days' ORDER BY created_at LIMIT $2",
            EXPIRY_GRACE, BATCH,
        )  # fmt: skip
        paid = 0
        for row in rows:
            try:
                if await accounts.credit_if_paid(row["invoice_id"], row["quote_id"]) == "paid":
                    paid += 1
            except LedgerError as exc:
                log.warning("invoice %s not checked: %s", row["invoice_id"], exc.error.code)
                if exc.error.status >= 503:  # the wallet or its mint is down: try again next turn
                    break
        return paid
