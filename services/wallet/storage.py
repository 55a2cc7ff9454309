"""The wallet schema's queries. Every function takes the connection (and so the transaction) to use."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import asyncpg

from services.wallet.ecash import Proof, new_mnemonic
from shared.secretbox import SecretBox, is_sealed


async def load_seed(conn: asyncpg.Connection, box: SecretBox) -> str:
    """The node's mnemonic, made once (stored sealed by `box`): replicas starting together agree on the
    first one written. A mnemonic stored in the clear by an older version is sealed now."""
    sealed = box.seal(new_mnemonic())
    await conn.execute("INSERT INTO wallet.seed (mnemonic) VALUES ($1) ON CONFLICT DO NOTHING", sealed)
    stored = await conn.fetchval("SELECT mnemonic FROM wallet.seed")
    if not is_sealed(stored):
        await conn.execute("UPDATE wallet.seed SET mnemonic = $1 WHERE mnemonic = $2", box.seal(stored), stored)
    return box.open(stored)


async def lock(conn: asyncpg.Connection, name: str) -> None:
    """Session advisory lock on `name`: one replica at a time works on a token or an issue key.
    The pool's reset on release unlocks it too, and a dead connection frees it."""
    key = int.from_bytes(hashlib.sha256(f"wallet:{name}".encode()).digest()[:8], "big", signed=True)
    await conn.execute("SELECT pg_advisory_lock($1)", key)


async def unlock(conn: asyncpg.Connection, name: str) -> None:
    key = int.from_bytes(hashlib.sha256(f"wallet:{name}".encode()).digest()[:8], "big", signed=True)
    await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def reserve_counters(conn: asyncpg.Connection, keyset_id: str, mint_url: str, n: int) -> int:
    """Claim `n` consecutive NUT-13 counters for `keyset_id`; returns the first."""
    return await conn.fetchval(
        """INSERT INTO wallet.counters (keyset_id, mint_url, next) VALUES ($1, $2, $3)
           ON CONFLICT (keyset_id) DO UPDATE SET next = wallet.counters.next + $3
           RETURNING next - $3""",
        keyset_id, mint_url, n,
    )  # fmt: skip


async def store_proofs(
    conn: asyncpg.Connection, mint_url: str, proofs: Sequence[Proof], op: str, state: str = "unspent"
) -> None:
    await conn.executemany(
        """INSERT INTO wallet.proofs (secret, y, mint_url, keyset_id, amount, c, state, op)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (secret) DO NOTHING""",
        [(p.secret, p.Y, mint_url, p.id, p.amount, p.C, state, op) for p in proofs],
    )


def _proof(row: asyncpg.Record) -> Proof:
    return Proof(id=row["keyset_id"], amount=row["amount"], secret=row["secret"], C=row["c"])


async def lock_unspent(conn: asyncpg.Connection, mint_url: str) -> list[Proof]:
    """Unspent proofs of a mint, row-locked for this transaction; rows another issue holds are skipped."""
    rows = await conn.fetch(
        """SELECT secret, keyset_id, amount, c FROM wallet.proofs
           WHERE mint_url = $1 AND state = 'unspent' FOR UPDATE SKIP LOCKED""",
        mint_url,
    )
    return [_proof(r) for r in rows]


async def pending_inputs(conn: asyncpg.Connection, op: str) -> list[Proof]:
    rows = await conn.fetch(
        "SELECT secret, keyset_id, amount, c FROM wallet.proofs WHERE op = $1 AND state = 'pending'", op
    )
    return [_proof(r) for r in rows]


async def set_state(conn: asyncpg.Connection, secrets: Sequence[str], state: str, op: str | None) -> None:
    await conn.execute(
        "UPDATE wallet.proofs SET state = $2, op = $3, updated_at = now() WHERE secret = ANY($1::text[])",
        list(secrets), state, op,
    )  # fmt: skip


async def balances(conn: asyncpg.Connection) -> dict[str, int]:
    """Unspent sats per mint, largest first."""
    rows = await conn.fetch(
        """SELECT mint_url, sum(amount)::bigint AS sats FROM wallet.proofs WHERE state = 'unspent'
           GROUP BY mint_url ORDER BY sats DESC, mint_url"""
    )
    return {r["mint_url"]: r["sats"] for r in rows}


async def get_redemption(conn: asyncpg.Connection, token_hash: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM wallet.redemptions WHERE token_hash = $1", token_hash)


async def plan_redemption(
    conn: asyncpg.Connection,
    token_hash: str,
    mint_url: str,
    amount: int,
    fee: int,
    keyset_id: str,
    counter: int,
    amounts: Sequence[int],
) -> asyncpg.Record:
    return await conn.fetchrow(
        """INSERT INTO wallet.redemptions
               (token_hash, mint_url, state, amount_sat, fee_sat, keyset_id, counter, amounts)
           VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7) RETURNING *""",
        token_hash, mint_url, amount, fee, keyset_id, counter, list(amounts),
    )  # fmt: skip


async def finish_redemption(conn: asyncpg.Connection, token_hash: str) -> None:
    await conn.execute(
        "UPDATE wallet.redemptions SET state = 'done', done_at = now() WHERE token_hash = $1", token_hash
    )


async def drop_redemption(conn: asyncpg.Connection, token_hash: str) -> None:
    await conn.execute("DELETE FROM wallet.redemptions WHERE token_hash = $1 AND state = 'pending'", token_hash)


async def get_issue(conn: asyncpg.Connection, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM wallet.issues WHERE idempotency_key = $1", key)


async def record_issue(
    conn: asyncpg.Connection,
    key: str,
    mint_url: str,
    amount: int,
    fee: int,
    *,
    token: str | None = None,
    keyset_id: str | None = None,
    counter: int | None = None,
    send_amounts: Sequence[int] = (),
    keep_amounts: Sequence[int] = (),
) -> asyncpg.Record:
    """A finished issue (with `token`) or a pending one (with its swap plan)."""
    return await conn.fetchrow(
        """INSERT INTO wallet.issues (idempotency_key, mint_url, state, amount_sat, fee_sat, keyset_id, counter,
                                      send_amounts, keep_amounts, token, done_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, CASE WHEN $10::text IS NULL THEN NULL ELSE now() END)
           RETURNING *""",
        key, mint_url, "pending" if token is None else "done", amount, fee, keyset_id, counter,
        list(send_amounts), list(keep_amounts), token,
    )  # fmt: skip


async def finish_issue(conn: asyncpg.Connection, key: str, token: str) -> None:
    await conn.execute(
        "UPDATE wallet.issues SET state = 'done', token = $2, done_at = now() WHERE idempotency_key = $1", key, token
    )


async def drop_issue(conn: asyncpg.Connection, key: str) -> None:
    """Undo a pending issue whose swap surely did not happen: its inputs become spendable again."""
    await conn.execute(
        "UPDATE wallet.proofs SET state = 'unspent', op = NULL, updated_at = now() WHERE op = $1 AND state = 'pending'",
        issue_op(key),
    )
    await conn.execute("DELETE FROM wallet.issues WHERE idempotency_key = $1 AND state = 'pending'", key)


async def get_payout(conn: asyncpg.Connection, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM wallet.payouts WHERE idempotency_key = $1", key)


async def record_payout(
    conn: asyncpg.Connection,
    key: str,
    mint_url: str,
    recipient: str,
    amount: int,
    quote_id: str,
    inputs: int,
    cut_fee: int,
    keyset_id: str,
    counter: int,
    n_change: int,
) -> asyncpg.Record:
    return await conn.fetchrow(
        """INSERT INTO wallet.payouts (idempotency_key, mint_url, recipient, state, amount_sat, quote_id, inputs_sat,
                                       cut_fee_sat, keyset_id, counter, n_change)
           VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10) RETURNING *""",
        key, mint_url, recipient, amount, quote_id, inputs, cut_fee, keyset_id, counter, n_change,
    )  # fmt: skip


async def finish_payout(conn: asyncpg.Connection, key: str, change: int) -> asyncpg.Record:
    return await conn.fetchrow(
        """UPDATE wallet.payouts SET state = 'paid', change_sat = $2, done_at = now()
           WHERE idempotency_key = $1 RETURNING *""",
        key, change,
    )  # fmt: skip


async def drop_payout(conn: asyncpg.Connection, key: str) -> None:
    """Undo a payout the mint surely did not pay: its melt inputs are ours to spend again."""
    await conn.execute(
        "UPDATE wallet.proofs SET state = 'unspent', op = NULL, updated_at = now() WHERE op = $1 AND state = 'pending'",
        payout_op(key),
    )
    await conn.execute("DELETE FROM wallet.payouts WHERE idempotency_key = $1 AND state = 'pending'", key)
    await conn.execute("DELETE FROM wallet.issues WHERE idempotency_key = $1", payout_inputs_key(key))


def payout_op(key: str) -> str:
    return f"payout:{key}"


def payout_inputs_key(key: str) -> str:
    """The internal issue that cuts a payout's melt inputs."""
    return f"wallet-payout:{key}"


def issue_op(key: str) -> str:
    return f"issue:{key}"


def redeem_op(token_hash: str) -> str:
    return f"redeem:{token_hash}"


async def set_payout_cut(conn: asyncpg.Connection, key: str, inputs: int, cut_fee: int) -> asyncpg.Record:
    return await conn.fetchrow(
        "UPDATE wallet.payouts SET inputs_sat = $2, cut_fee_sat = $3 WHERE idempotency_key = $1 RETURNING *",
        key, inputs, cut_fee,
    )  # fmt: skip


def mint_quote_op(quote_id: str) -> str:
    return f"mint:{quote_id}"


async def record_mint_quote(
    conn: asyncpg.Connection, quote_id: str, mint_url: str, amount: int, request: str, expiry: int
) -> asyncpg.Record:
    return await conn.fetchrow(
        """INSERT INTO wallet.mint_quotes (quote_id, mint_url, amount_sat, request, expiry)
           VALUES ($1, $2, $3, $4, $5) RETURNING *""",
        quote_id, mint_url, amount, request, expiry,
    )  # fmt: skip


async def get_mint_quote(conn: asyncpg.Connection, quote_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM wallet.mint_quotes WHERE quote_id = $1", quote_id)


async def plan_mint(
    conn: asyncpg.Connection, quote_id: str, keyset_id: str, counter: int, amounts: Sequence[int]
) -> asyncpg.Record:
    return await conn.fetchrow(
        """UPDATE wallet.mint_quotes SET state = 'minting', keyset_id = $2, counter = $3, amounts = $4
           WHERE quote_id = $1 RETURNING *""",
        quote_id, keyset_id, counter, list(amounts),
    )  # fmt: skip


async def finish_mint(conn: asyncpg.Connection, quote_id: str) -> asyncpg.Record:
    return await conn.fetchrow(
        "UPDATE wallet.mint_quotes SET state = 'issued', done_at = now() WHERE quote_id = $1 RETURNING *", quote_id
    )


async def payout_aborted(conn: asyncpg.Connection, key: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM wallet.payout_aborts WHERE idempotency_key = $1", key))


async def abort_payout(conn: asyncpg.Connection, key: str) -> None:
    """Mark the payout `key` as never to be paid (its plan, if any, must be dropped in the same transaction)."""
    await conn.execute("INSERT INTO wallet.payout_aborts (idempotency_key) VALUES ($1) ON CONFLICT DO NOTHING", key)
