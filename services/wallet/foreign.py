"""Tokens from mints the node does not list: melted at their own mint into a listed mint's invoice.

The token pays (NUT-05 melt, its fee reserve and the foreign mint's NUT-02 input fee taken from the
token) a Lightning invoice of a listed mint (NUT-04 mint quote); the ecash that invoice buys is what
the node credits, always strictly between 0 and the token's face value.

Crash and retry safety, in the order things happen:
1. both quotes are asked for and the plan (quotes, invoice amount) committed under the token's lock,
   before the foreign mint sees the token;
2. the melt: a refusal (e.g. "not enough inputs") is checked with NUT-07 — inputs still unspent mean
   nothing happened, so the swap is planned again for a smaller invoice, at most MAX_ATTEMPTS times;
3. a paid melt is minted at the listed mint through the wallet's own idempotent mint-quote path,
   then the swap is marked done. A retry (or the sweeper) that finds a plan asks the foreign mint for
   the melt quote's state first: paid is finished, pending waits, unpaid with unspent inputs is
   dropped. So the token is never spent without the credit reaching the node.

Operator limits: the largest token swapped (CASHU_FOREIGN_MAX_SATS, 0 turns swaps off) and the sats
swapped per rolling hour (CASHU_FOREIGN_HOURLY_SATS); each refusal says which limit and by how much.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import asyncpg

from services.wallet import ecash, storage
from services.wallet.ecash import Proof
from services.wallet.mints import MintClient, MintError, MintUnavailable
from shared import bus
from shared.messaging import BusError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # melts tried, each for a smaller invoice, before the token is handed back
HOUR_LOCK = int.from_bytes(hashlib.sha256(b"wallet:foreign-hourly").digest()[:8], "big", signed=True)


def _fail(code: str, message: str, status: int, retry_after: int | None = None) -> BusError:
    return BusError(bus.Error(code, message, status, retry_after))


def _unavailable(exc: MintUnavailable) -> BusError:
    return _fail("mint_unavailable", f"mint unavailable: {exc}", 503, 5)


def reserve_estimate(sats: int) -> int:
    """A first guess at a mint's NUT-05 fee reserve for paying `sats`: nutshell's default is
    max(2 sat, 1 %); the melt quote's own `fee_reserve` then corrects it."""
    return max(2, -(-sats // 100))


class _Retry(Exception):
    """The melt surely did not spend the token: plan again with a smaller invoice."""


class ForeignSwaps:
    """Swaps a foreign-mint token into `wallet`'s first listed mint. `wallet` is the NodeWallet (its
    token locks, keyset cache and mint-quote minting are reused)."""

    def __init__(self, wallet, pool: asyncpg.Pool, max_sats: int, hourly_sats: int):
        self._wallet = wallet
        self._pool = pool
        self.max_sats = max_sats
        self.hourly_sats = hourly_sats

    async def redeem(self, raw: str, token: ecash.ParsedToken, target_url: str, resume_only: bool = False
                     ) -> bus.Redeemed:  # fmt: skip
        """Swap `token` into `target_url`'s ecash; the answer is a `bus.Redeemed` whose `mint_url` is
        the listed mint the value landed at, `amount_msat` the face value and `fee_msat` what the
        foreign mint and Lightning took. Raises BusError: `foreign_mint_limit` (400),
        `foreign_mint_rate_limited` (429), `mint_unavailable` (503), `cashu_token_already_spent`,
        `invalid_token` (400), `foreign_swap_failed` (502, token unspent); with `resume_only`, a token
        never taken here is refused as `unknown_token` (404) and left untouched."""
        token_hash = ecash.token_hash(raw)
        async with self._wallet._exclusive(storage.redeem_op(token_hash)) as conn:
            row = await _get(conn, token_hash)
            if row is not None and row["state"] == "done":
                return _redeemed(row, already=True)
            if row is None and resume_only:
                raise _fail("unknown_token", "Unknown payment token: it was never received by this node", 404)
            foreign = self._wallet._mints.get(token.mint_url)
            if row is not None:
                done = await self._resume(conn, row, foreign, token.proofs)
                if done is not None:
                    return done
            return await self._swap(conn, token_hash, token, foreign, self._wallet._mints.get(target_url))

    async def _swap(
        self, conn: asyncpg.Connection, token_hash: str, token: ecash.ParsedToken, foreign: MintClient,
        target: MintClient,
    ) -> bus.Redeemed:  # fmt: skip
        face = token.amount
        if face > self.max_sats:
            self._count("limit")
            raise _fail("foreign_mint_limit", f"tokens from mints this node does not list are swapped up to "
                        f"{self.max_sats} sat; this one holds {face} sat", 400)  # fmt: skip
        await self._within_hourly_limit(conn, token_hash, face)  # before any quote; again under the lock
        keysets = await self._wallet._keysets_for(foreign, token.proofs)
        await self._wallet.unlock(foreign, token.proofs)
        fee_in = ecash.input_fee(token.proofs, keysets)
        states = await self._states(foreign, token.proofs)
        if any(s == "SPENT" for s in states.values()):
            raise _fail("cashu_token_already_spent", "the token was already spent", 400)
        if any(s == "PENDING" for s in states.values()):
            raise _fail("cashu_token_pending", "the token is being spent in another transaction", 409, 2)
        invoice = face - fee_in - reserve_estimate(face)
        attempt = 0
        while attempt < MAX_ATTEMPTS:
            if invoice < 1:
                raise _fail("invalid_token", f"a {face} sat token from {foreign.url} does not cover the fees to "
                            "swap it into this node's mint", 400)  # fmt: skip
            mint_quote, melt_quote = await self._quotes(foreign, target, invoice)
            need = int(melt_quote["amount"]) + int(melt_quote["fee_reserve"]) + fee_in
            if need > face:  # the foreign mint wants a bigger reserve than guessed: ask for less
                invoice -= need - face
                attempt += 1
                continue
            attempt += 1
            row = await self._plan(conn, token_hash, foreign.url, target.url, face, fee_in, invoice,
                                   mint_quote, melt_quote["quote"], attempt)  # fmt: skip
            try:
                return await self._melt(conn, row, foreign, token.proofs)
            except _Retry:
                invoice -= max(1, reserve_estimate(invoice))
        self._count("failed")
        raise _fail("foreign_swap_failed", f"{foreign.url} would not pay this node's invoice after {MAX_ATTEMPTS} "
                    "attempts; the token is unspent and still yours", 502)  # fmt: skip

    async def _within_hourly_limit(self, conn: asyncpg.Connection, token_hash: str, face: int) -> None:
        """Raise `foreign_mint_rate_limited` (429) when swapping `face` more sats would pass the hour's limit."""
        swapped = await conn.fetchval(
            "SELECT coalesce(sum(amount_sat), 0) FROM wallet.foreign_swaps"
            " WHERE created_at > now() - interval '1 hour' AND token_hash <> $1", token_hash,
        )  # fmt: skip
        if swapped + face > self.hourly_sats:
            self._count("limit")
            raise _fail("foreign_mint_rate_limited", f"this node swaps at most {self.hourly_sats} sat an hour "
                        f"from mints it does not list ({swapped} sat so far); pay with a token from "
                        "one of its mints or try later", 429, 600)  # fmt: skip

    async def _quotes(self, foreign: MintClient, target: MintClient, invoice: int) -> tuple[dict, dict]:
        try:
            mint_quote = await target.mint_quote(invoice)
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", f"this node's mint will not make an invoice: {exc.detail}", 502) from None
        try:
            melt_quote = await foreign.melt_quote(mint_quote["request"])
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("foreign_swap_failed", f"{foreign.url} will not pay this node's invoice: {exc.detail}; "
                        "the token is unspent", 502) from None  # fmt: skip
        return mint_quote, melt_quote

    async def _plan(self, conn: asyncpg.Connection, token_hash: str, foreign_url: str, target_url: str, face: int,
                    fee_in: int, invoice: int, mint_quote: dict, melt_quote_id: str,
                    attempt: int) -> asyncpg.Record:  # fmt: skip
        """Commit the swap plan (and the listed mint's quote) before the foreign mint sees the token;
        the hourly limit is checked under one lock so replicas cannot overshoot it together."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", HOUR_LOCK)
            await self._within_hourly_limit(conn, token_hash, face)
            await storage.record_mint_quote(conn, mint_quote["quote"], target_url, invoice, mint_quote["request"],
                                            int(mint_quote.get("expiry") or 0))  # fmt: skip
            return await conn.fetchrow(
                """INSERT INTO wallet.foreign_swaps (token_hash, foreign_mint, mint_url, state, amount_sat,
                       input_fee_sat, invoice_sat, mint_quote_id, melt_quote_id, attempts)
                   VALUES ($1, $2, $3, 'melting', $4, $5, $6, $7, $8, $9)
                   ON CONFLICT (token_hash) DO UPDATE SET invoice_sat = $6, mint_quote_id = $7, melt_quote_id = $8,
                       attempts = $9
                   RETURNING *""",
                token_hash, foreign_url, target_url, face, fee_in, invoice, mint_quote["quote"], melt_quote_id,
                attempt,
            )  # fmt: skip

    async def _melt(
        self, conn: asyncpg.Connection, row: asyncpg.Record, foreign: MintClient, proofs: Sequence[Proof]
    ) -> bus.Redeemed:
        """Melt the token for the planned quote; paid is finished, a sure no-op raises _Retry."""
        try:
            result = await foreign.melt(row["melt_quote_id"], proofs, [])
        except MintUnavailable as exc:
            if not exc.sent:
                await _drop(conn, row["token_hash"])
                raise _unavailable(exc) from None
            done = await self._resume(conn, row, foreign, proofs)  # did it pay before the line broke?
            if done is not None:
                return done
            raise _Retry from None
        except MintError as exc:
            log.warning("melt at %s refused (%s): checking the token's state", foreign.url, exc.detail)
            done = await self._resume(conn, row, foreign, proofs)
            if done is not None:
                return done
            raise _Retry from None
        state = result.get("state") or ("PAID" if result.get("paid") else "UNPAID")
        if state == "PAID":
            return await self._finish(conn, row)
        done = await self._resume(conn, row, foreign, proofs)
        if done is not None:
            return done
        raise _Retry

    async def _resume(
        self, conn: asyncpg.Connection, row: asyncpg.Record, foreign: MintClient, proofs: Sequence[Proof] | None
    ) -> bus.Redeemed | None:
        """An earlier melt's outcome: paid → finished now; in flight → 503 (retry later); surely not
        paid and the inputs unspent → the plan is dropped and None returned (safe to melt again).
        Without `proofs` (the sweeper) an unpaid plan is left for the client's retry."""
        try:
            quote = await foreign.melt_state(row["melt_quote_id"])
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", f"{foreign.url} cannot tell the swap's state: {exc.detail}", 502) from None
        state = quote.get("state") or ("PAID" if quote.get("paid") else "UNPAID")
        if state == "PAID":
            return await self._finish(conn, row)
        if state == "PENDING":
            raise _fail("mint_unavailable", f"{foreign.url} is still paying for this token; retry shortly", 503, 5)
        if proofs is None:
            return None
        states = await self._states(foreign, proofs)
        if any(s == "PENDING" for s in states.values()):
            raise _fail("mint_unavailable", f"{foreign.url} is still spending this token; retry shortly", 503, 5)
        if any(s == "SPENT" for s in states.values()):
            raise _fail("cashu_token_already_spent", "the token was spent elsewhere", 400)
        await _drop(conn, row["token_hash"])
        return None

    async def _finish(self, conn: asyncpg.Connection, row: asyncpg.Record) -> bus.Redeemed:
        """Mint the paid invoice's ecash (idempotent by quote id), then mark the swap done."""
        minted = await self._wallet.check_invoice(row["mint_quote_id"])
        if minted.state != "paid":
            raise _fail("mint_unavailable", "the Lightning payment into this node's mint is not settled yet; "
                        "retry shortly", 503, 5)  # fmt: skip
        row = await conn.fetchrow(
            "UPDATE wallet.foreign_swaps SET state = 'done', done_at = now() WHERE token_hash = $1 RETURNING *",
            row["token_hash"],
        )
        self._count("credited")
        log.info("swapped a %d sat token from %s into %d sat at %s", row["amount_sat"], row["foreign_mint"],
                 row["invoice_sat"], row["mint_url"])  # fmt: skip
        return _redeemed(row, already=False)

    def _count(self, outcome: str) -> None:
        self._wallet._metrics.foreign_swaps.labels(outcome).inc()

    async def _states(self, client: MintClient, proofs: Sequence[Proof]) -> dict[str, str]:
        try:
            return await client.check_state([p.Y for p in proofs])
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", exc.detail, 502) from None

    async def resolve_stale(self, older_than: float) -> int:
        """Finish swaps whose melt was paid but whose caller vanished (the ecash is minted; the
        client's retry with the same token is then credited). Returns how many were finished."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT token_hash FROM wallet.foreign_swaps"
                " WHERE state = 'melting' AND created_at < now() - make_interval(secs => $1)", older_than,
            )  # fmt: skip
        finished = 0
        for (token_hash,) in rows:
            try:
                async with self._wallet._exclusive(storage.redeem_op(token_hash)) as conn:
                    row = await _get(conn, token_hash)
                    if row is None or row["state"] != "melting":
                        continue
                    if await self._resume(conn, row, self._wallet._mints.get(row["foreign_mint"]), None):
                        finished += 1
            except BusError as exc:
                log.warning("foreign swap not settled yet: %s", exc.error.message)
        return finished


async def _get(conn: asyncpg.Connection, token_hash: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM wallet.foreign_swaps WHERE token_hash = $1", token_hash)


async def _drop(conn: asyncpg.Connection, token_hash: str) -> None:
    await conn.execute("DELETE FROM wallet.foreign_swaps WHERE token_hash = $1 AND state = 'melting'", token_hash)


def _redeemed(row: asyncpg.Record, already: bool) -> bus.Redeemed:
    face, credited = row["amount_sat"] * 1000, row["invoice_sat"] * 1000
    return bus.Redeemed(row["token_hash"], row["mint_url"], face, face - credited, credited, already=already)
