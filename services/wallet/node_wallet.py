"""Redeem, issue and holdings: the node's ecash, with Postgres as the store of record.

Every swap follows one pattern so no crash or lost reply can lose money or double-credit:
1. under an advisory lock on the operation (token hash, or issue key), write a *plan* — the output
   keyset, the first NUT-13 counter and the amounts — and commit it before the mint sees anything;
2. swap at the mint with outputs derived from that plan (a retry derives the very same outputs);
3. store the new proofs and mark the operation done in one transaction.
A retry that finds a pending plan resumes it: if the mint already executed the swap ("proofs
spent", "outputs signed", or NUT-07 says the inputs are spent), `/v1/restore` hands back the
signatures on our outputs. A request that surely never reached the mint is undone at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import asyncpg

from services.wallet import ecash, lnurl, split, storage
from services.wallet.ecash import BlindedSignature, Keyset, Output, Proof
from services.wallet.foreign import ForeignSwaps
from services.wallet.locks import Locks
from services.wallet.mints import (
    KEYSET_INACTIVE,
    KEYSET_UNKNOWN,
    OUTPUTS_SIGNED,
    PROOFS_PENDING,
    PROOFS_SPENT,
    MintClient,
    MintError,
    Mints,
    MintUnavailable,
)
from shared import bus
from shared.messaging import BusError
from shared.metrics import WalletMetrics
from shared.secretbox import SecretBox

log = logging.getLogger(__name__)


def _fail(code: str, message: str, status: int, retry_after: int | None = None) -> BusError:
    return BusError(bus.Error(code, message, status, retry_after))


def _unavailable(exc: MintUnavailable) -> BusError:
    return _fail("mint_unavailable", f"mint unavailable: {exc}", 503, 5)


class _KeysetRotated(Exception):
    """The mint refused our outputs' keyset (rotated since we cached it); nothing was spent, keysets are fresh."""


def _keyset_refused(exc: MintError) -> bool:
    """NUT error 12001/12002 (keyset unknown/inactive), or nutshell's generic 11000 naming the keyset."""
    return exc.code in (KEYSET_UNKNOWN, KEYSET_INACTIVE) or (
        exc.code in (None, 11000) and "keyset" in exc.detail.lower()
    )


class _NotEnough(Exception):
    """This mint's free proofs cannot cover the amount plus fees."""


class _KeyLocks:
    """In-process queue per operation in front of the Postgres lock, so duplicates wait without
    each holding a pooled connection."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


class NodeWallet:
    def __init__(
        self,
        pool: asyncpg.Pool,
        mints: Mints,
        secrets: ecash.Secrets,
        accepted: Sequence[str],
        metrics: WalletMetrics,
        payees: lnurl.LnurlClient,
        box: SecretBox,
    ):
        self._box = box  # issued tokens are stored sealed
        self._pool = pool
        self._payees = payees
        self._mints = mints
        self._secrets = secrets
        self._accepted = tuple(m.rstrip("/") for m in accepted)
        self._metrics = metrics
        self._locks = _KeyLocks()
        self.foreign: ForeignSwaps | None = None  # set by the app when tokens of unlisted mints are swapped
        self.locks: Locks | None = None  # NUT-11/12: set by the app to check DLEQs and sign P2PK locks

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[asyncpg.Connection]:
        async with self._locks.hold(name), self._pool.acquire() as conn:
            await storage.lock(conn, name)
            try:
                yield conn
            finally:
                try:
                    await storage.unlock(conn, name)
                except Exception as exc:  # the pool's reset (or the connection's end) releases it anyway
                    log.warning("could not release wallet lock: %s", exc)

    # ---- redeem --------------------------------------------------------------------------------

    async def redeem(self, raw: str, resume_only: bool = False) -> bus.Redeemed:
        """Swap a token's proofs for the node's own, once per token. With `resume_only`, only a token this
        wallet already took (a plan committed before an interrupted swap, or a finished redemption) is
        carried through; any other is refused as `unknown_token` (404) and left untouched. A mint that
        rotated its keyset since we cached it gets one more try on its new keyset."""
        try:
            return await self._redeem(raw, resume_only)
        except _KeysetRotated:
            try:
                return await self._redeem(raw, resume_only)
            except _KeysetRotated as exc:
                raise _fail("mint_error", f"the mint refused our outputs: {exc}", 502) from None

    async def _redeem(self, raw: str, resume_only: bool) -> bus.Redeemed:
        try:
            token = ecash.parse_token(raw)
        except ecash.TokenError as exc:
            raise _fail("invalid_token", str(exc), 400) from None
        if token.mint_url not in self._accepted:
            if self.foreign is not None and self.foreign.max_sats > 0 and self._accepted:  # swapped in over Lightning
                return await self.foreign.redeem(raw, token, self._accepted[0], resume_only)
            accepted = ", ".join(self._accepted) or "none"
            raise _fail(
                "mint_not_accepted", f"tokens from {token.mint_url} are not accepted; accepted mints: {accepted}", 400
            )
        token_hash = ecash.token_hash(raw)
        async with self._exclusive(storage.redeem_op(token_hash)) as conn:
            row = await storage.get_redemption(conn, token_hash)
            if row is not None and row["state"] == "done":
                return _redeemed(row, already=True)
            if row is None and resume_only:
                raise _fail("unknown_token", "Unknown payment token: it was never received by this node", 404)
            client = self._mints.get(token.mint_url)
            keysets = await self._keysets_for(client, token.proofs)
            await self.unlock(client, token.proofs)
            fresh = row is None
            if fresh:
                row = await self._plan_redemption(conn, client, token, token_hash, keysets)
            outputs = await self._secrets.outputs(row["keyset_id"], row["counter"], row["amounts"])
            try:
                signatures = await client.swap(token.proofs, [o.message for o in outputs])
            except MintUnavailable as exc:
                if fresh and not exc.sent:
                    await storage.drop_redemption(conn, token_hash)
                raise _unavailable(exc) from None
            except MintError as exc:
                if _keyset_refused(exc):  # the inputs passed (not spent), our outputs' keyset did not
                    await storage.drop_redemption(conn, token_hash)
                    await self._refresh_keysets(client)
                    raise _KeysetRotated(exc.detail) from None
                signatures = None
                if not fresh and exc.code in (PROOFS_SPENT, OUTPUTS_SIGNED):
                    signatures = await self._restore(client, outputs)  # an earlier attempt went through
                if signatures is None:
                    if fresh or exc.code != PROOFS_PENDING:
                        await storage.drop_redemption(conn, token_hash)
                    raise _token_rejected(exc) from None
            proofs = ecash.unblind(outputs, signatures, await self._keys(client, row["keyset_id"]))
            async with conn.transaction():
                await storage.store_proofs(conn, token.mint_url, proofs, storage.redeem_op(token_hash))
                await storage.finish_redemption(conn, token_hash)
            await self._update_gauges(conn)
            log.info(
                "redeemed %d sat (fee %d) at %s, token %s…",
                row["amount_sat"],
                row["fee_sat"],
                client.url,
                token_hash[:12],
            )
            return _redeemed(row, already=False)

    async def _keysets_for(self, client: MintClient, proofs: Sequence[Proof]) -> dict[str, Keyset]:
        """The mint's sat keysets, with the proofs' (short) keyset ids resolved against them."""
        try:
            keysets = await client.keysets()
            if ecash.expand_keyset_ids(proofs, keysets):
                keysets = await client.keysets(refresh=True)
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", f"the mint's keysets could not be read: {exc.detail}", 502) from None
        if ecash.expand_keyset_ids(proofs, keysets):
            raise _fail("invalid_token", "the token's keyset is not a sat keyset of its mint", 400)
        return keysets

    async def unlock(self, client: MintClient, proofs: Sequence[Proof]) -> None:
        """NUT-12 DLEQ checks and NUT-11 signatures for the node's key, before any swap or melt; raises
        BusError `invalid_token` (400) for a bad DLEQ or a lock the node cannot open."""
        if self.locks is None or not any(p.dleq is not None or p.secret.startswith("[") for p in proofs):
            return
        keys = {kid: await self._keys(client, kid) for kid in {p.id for p in proofs}}
        try:
            self.locks.unlock(proofs, keys)
        except ecash.TokenError as exc:
            raise _fail("invalid_token", str(exc), 400) from None

    async def _plan_redemption(
        self,
        conn: asyncpg.Connection,
        client: MintClient,
        token: ecash.ParsedToken,
        token_hash: str,
        keysets: dict[str, Keyset],
    ) -> asyncpg.Record:
        fee = ecash.input_fee(token.proofs, keysets)
        if token.amount <= fee:
            raise _fail("invalid_token", f"token worth {token.amount} sat does not cover the mint's {fee} sat fee", 400)
        try:
            target = await client.active_keyset()
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", exc.detail, 502) from None
        amounts = ecash.split_amount(token.amount - fee)
        async with conn.transaction():
            counter = await storage.reserve_counters(conn, target.id, client.url, len(amounts))
            return await storage.plan_redemption(
                conn, token_hash, client.url, token.amount, fee, target.id, counter, amounts
            )

    async def _keys(self, client: MintClient, keyset_id: str) -> dict:
        try:
            return await client.keys(keyset_id)
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", f"the mint's keys could not be read: {exc.detail}", 502) from None

    async def _restore(self, client: MintClient, outputs: Sequence[Output]) -> list | None:
        """The mint's signatures on all of `outputs` if it made them before, else None."""
        try:
            found = await client.restore([o.message for o in outputs])
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            log.warning("restore failed at %s: %s", client.url, exc)
            return None
        if not all(o.message.B_ in found for o in outputs):
            return None
        return [found[o.message.B_] for o in outputs]

    # ---- issue ---------------------------------------------------------------------------------

    async def issue(self, amount_msat: int, key: str, mint_url: str | None, split_ok: bool = True) -> bus.Issued:
        """A token of floor(`amount_msat`/1000) sat, idempotent by `key`: from `mint_url` when it holds
        enough, else from any mint that does, else (`split_ok`) one part per mint in one V3 token
        (`split.py`). Raises BusError `insufficient_funds` (503) when the mints together hold too little.
        A mint that rotated its keyset since we cached it gets one more try."""
        try:
            return await self._issue(amount_msat, key, mint_url, split_ok)
        except _KeysetRotated:
            try:
                return await self._issue(amount_msat, key, mint_url, split_ok)
            except _KeysetRotated as exc:
                raise _fail("mint_error", f"the mint refused the swap: {exc}", 502) from None

    async def _refresh_keysets(self, client: MintClient) -> None:
        """Re-read a mint's keysets after it refused our outputs' keyset (rotated, NUT-02)."""
        log.warning("%s refused our outputs' keyset; refreshing its keysets", client.url)
        try:
            await client.keysets(refresh=True)
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", f"the mint's keysets could not be read: {exc.detail}", 502) from None

    async def _issue(self, amount_msat: int, key: str, mint_url: str | None, split_ok: bool = True) -> bus.Issued:
        sats = _whole_sats(amount_msat, key)
        async with self._exclusive(storage.issue_op(key)) as conn:
            row = await storage.get_issue(conn, key)
            if row is not None and row["state"] == "done":
                return _issued(row, True, self._box)
            if row is not None:
                return await self._resume_issue(conn, row)
            if await split.parts_of(conn, key):  # a split refund was under way: finish it
                return await split.issue_split(self, conn, key, sats)
            balances = await storage.balances(conn)
            candidates = [m for m, held in balances.items() if held >= sats]
            preferred = (mint_url or "").rstrip("/")
            if preferred in candidates:
                candidates.remove(preferred)
                candidates.insert(0, preferred)
            unavailable: MintUnavailable | None = None
            for mint in candidates:
                try:
                    return await self._issue_from(conn, key, sats, self._mints.get(mint))
                except MintUnavailable as exc:
                    unavailable = exc
                except _NotEnough:
                    continue
            if unavailable is not None:
                raise _unavailable(unavailable)
            if not split_ok:
                raise self.insufficient(sats, sum(balances.values()))
            return await split.issue_split(self, conn, key, sats)  # no one mint holds enough: one part each

    @staticmethod
    def insufficient(sats: int, held: int) -> BusError:
        """The `insufficient_funds` refusal (503, retry in 30 s) for cutting `sats` while holding `held` sat."""
        return _fail("insufficient_funds", f"the wallet cannot cut {sats} sat (it holds {held} sat)", 503, 30)

    async def _issue_from(self, conn: asyncpg.Connection, key: str, sats: int, client: MintClient) -> bus.Issued:
        """Cut the token from `client`'s proofs: exact proofs when they exist (no mint call, no fee),
        else a swap. Raises MintUnavailable only when nothing happened and another mint may serve."""
        keysets: dict[str, Keyset] | None = None
        target: Keyset | None = None
        with contextlib.suppress(MintUnavailable, MintError):
            keysets = await client.keysets()
            target = await client.active_keyset()
        op = storage.issue_op(key)
        async with conn.transaction():
            proofs = await storage.lock_unspent(conn, client.url)
            exact = ecash.choose_exact(proofs, sats)
            if exact is not None:
                await storage.set_state(conn, [p.secret for p in exact], "spent", op)
                row = await storage.record_issue(
                    conn, key, client.url, sats, 0, token=self._box.seal(ecash.encode_token(client.url, exact))
                )
                await self._update_gauges(conn)
                log.info("issued %d sat at %s from stored proofs", sats, client.url)
                return _issued(row, False, self._box)
            if keysets is None or target is None:
                raise MintUnavailable(client.url, "keysets not readable", sent=False)
            inputs = ecash.choose_inputs(proofs, sats, keysets)
            if inputs is None:
                raise _NotEnough
            fee = ecash.input_fee(inputs, keysets)
            send = ecash.split_amount(sats)
            keep = ecash.split_amount(sum(p.amount for p in inputs) - sats - fee)
            counter = await storage.reserve_counters(conn, target.id, client.url, len(send) + len(keep))
            await storage.set_state(conn, [p.secret for p in inputs], "pending", op)
            row = await storage.record_issue(
                conn,
                key,
                client.url,
                sats,
                fee,
                keyset_id=target.id,
                counter=counter,
                send_amounts=send,
                keep_amounts=keep,
            )
        return await self._swap_issue(conn, row, inputs, client)

    async def _swap_issue(
        self, conn: asyncpg.Connection, row: asyncpg.Record, inputs: Sequence[Proof], client: MintClient
    ) -> bus.Issued:
        outputs = await self._issue_outputs(row)
        try:
            signatures = await client.swap(inputs, [o.message for o in outputs])
        except MintUnavailable as exc:
            if not exc.sent:
                async with conn.transaction():
                    await storage.drop_issue(conn, row["idempotency_key"])
                raise
            raise _unavailable(exc) from None  # outcome unknown: inputs stay pending until a retry resolves them
        except MintError as exc:
            signatures = await self._restore(client, outputs) if exc.code in (PROOFS_SPENT, OUTPUTS_SIGNED) else None
            if signatures is None:
                await self._abandon_issue(conn, row, inputs, client)
                if _keyset_refused(exc):
                    await self._refresh_keysets(client)
                    raise _KeysetRotated(exc.detail) from None
                raise _fail("mint_error", f"the mint refused the swap: {exc.detail}", 502) from None
        return await self._finish_issue(conn, row, inputs, outputs, signatures, client)

    async def resolve_stale_issues(self, older_than: float) -> int:
        """Settle issues left pending (mint down mid-swap, caller gone) so their proofs are not stuck:
        a swap the mint executed is restored and its token kept for a retry; one it never executed
        is undone. Returns how many were settled."""

        async def resume(conn: asyncpg.Connection, row: asyncpg.Record) -> bool:
            await self._resume_issue(conn, row, swap=False)
            return True

        return await self._resolve_stale("issues", storage.issue_op, storage.get_issue, resume, older_than)

    async def _resume_issue(
        self, conn: asyncpg.Connection, row: asyncpg.Record, swap: bool = True
    ) -> bus.Issued | None:
        """A pending issue: NUT-07 tells whether its swap happened; restore it, or (when `swap`) swap
        again with the same outputs, or else undo it."""
        client = self._mints.get(row["mint_url"])
        inputs = await storage.pending_inputs(conn, storage.issue_op(row["idempotency_key"]))
        states = await self._states(client, inputs)
        if any(states.get(p.Y) == "PENDING" for p in inputs):
            raise _fail("mint_unavailable", "the mint is still processing this swap", 503, 2)
        if not any(states.get(p.Y) == "SPENT" for p in inputs):
            if not swap:
                async with conn.transaction():
                    await storage.drop_issue(conn, row["idempotency_key"])
                    await self._update_gauges(conn)
                return None
            try:
                return await self._swap_issue(conn, row, inputs, client)
            except MintUnavailable as exc:
                raise _unavailable(exc) from None
        outputs = await self._issue_outputs(row)
        signatures = await self._restore(client, outputs)
        if signatures is None:
            await self._abandon_issue(conn, row, inputs, client)
            raise _fail("mint_error", "the wallet's proofs were spent elsewhere", 502)
        return await self._finish_issue(conn, row, inputs, outputs, signatures, client)

    async def _issue_outputs(self, row: asyncpg.Record) -> list[Output]:
        return await self._secrets.outputs(
            row["keyset_id"], row["counter"], [*row["send_amounts"], *row["keep_amounts"]]
        )

    async def _finish_issue(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        inputs: Sequence[Proof],
        outputs: Sequence[Output],
        signatures: Sequence,
        client: MintClient,
    ) -> bus.Issued:
        proofs = ecash.unblind(outputs, signatures, await self._keys(client, row["keyset_id"]))
        n_send = len(row["send_amounts"])
        token = ecash.encode_token(client.url, proofs[:n_send])
        op = storage.issue_op(row["idempotency_key"])
        async with conn.transaction():
            await storage.set_state(conn, [p.secret for p in inputs], "spent", op)
            await storage.store_proofs(conn, client.url, proofs[n_send:], op)
            await storage.store_proofs(conn, client.url, proofs[:n_send], op, state="spent")
            await storage.finish_issue(conn, row["idempotency_key"], self._box.seal(token))
            await self._update_gauges(conn)
        log.info("issued %d sat (fee %d) at %s after a swap", row["amount_sat"], row["fee_sat"], client.url)
        return bus.Issued(token, row["amount_sat"] * 1000, client.url, row["fee_sat"] * 1000, already=False)

    async def _abandon_issue(
        self, conn: asyncpg.Connection, row: asyncpg.Record, inputs: Sequence[Proof], client: MintClient
    ) -> None:
        """The mint refused the swap and holds no signatures for it: inputs it says are spent are
        written off, the rest become spendable again."""
        with contextlib.suppress(MintUnavailable, MintError):
            states = await client.check_state([p.Y for p in inputs])
            gone = [p.secret for p in inputs if states.get(p.Y) == "SPENT"]
            if gone:
                log.error("%d proofs of %s were spent outside this wallet", len(gone), client.url)
            async with conn.transaction():
                await storage.set_state(conn, gone, "spent", None)
                await storage.drop_issue(conn, row["idempotency_key"])

    # ---- payouts -------------------------------------------------------------------------------

    async def pay(self, amount_msat: int, key: str, address: str) -> bus.Paid:
        """Pay `amount_msat` (whole sats) to a Lightning address: LNURL-pay invoice, then a melt of
        exactly cut proofs. Lightning and mint fees come on top and are reported in `fee_msat`."""
        sats = _whole_sats(amount_msat, key)
        async with self._exclusive(storage.payout_op(key)) as conn:
            row = await storage.get_payout(conn, key)
            if row is not None and row["state"] == "paid":
                return _paid(row)
            if row is None and await storage.payout_aborted(conn, key):
                raise _fail("payout_aborted", "this payout was aborted and will not be made", 409)
            fresh = row is None
            if fresh:
                row = await self._plan_payout(conn, key, sats, address)
            return await self._run_payout(conn, row, fresh)

    async def _plan_payout(self, conn: asyncpg.Connection, key: str, sats: int, address: str) -> asyncpg.Record:
        try:
            await self._payees.check_address(address)  # a refused host is the caller's 400, whatever we hold
        except lnurl.LnurlError as exc:
            raise _fail("invalid_address", str(exc), 400) from None
        balances = await storage.balances(conn)
        mint = next((m for m, held in balances.items() if held > sats), None)
        if mint is None:
            raise _fail("insufficient_funds", f"the wallet cannot pay out {sats} sat plus fees", 503, 30)
        client = self._mints.get(mint)
        try:
            keysets = await client.keysets()
            target = await client.active_keyset()
            invoice = await self._payees.fetch_invoice(address, sats * 1000)
            quote = await client.melt_quote(invoice)
        except lnurl.LnurlError as exc:
            if exc.bad_address:
                raise _fail("invalid_address", str(exc), 400) from None
            raise _fail("lnurl_failed", str(exc), 502) from None
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("payment_failed", f"the mint will not pay this invoice: {exc.detail}", 502) from None
        amount, reserve = int(quote["amount"]), int(quote["fee_reserve"])
        ppk = max((k.input_fee_ppk for k in keysets.values()), default=0)
        slack = (ppk * (len(ecash.split_amount(amount + reserve)) + 2) + 999) // 1000  # melt input fee, rounded up
        if balances[mint] < amount + reserve + slack:
            raise _fail("insufficient_funds", f"the wallet cannot pay out {sats} sat plus {reserve} sat fee", 503, 30)
        n_change = max(1, (reserve + slack).bit_length())  # blank outputs enough for any unused part
        async with conn.transaction():
            counter = await storage.reserve_counters(conn, target.id, mint, n_change)
            return await storage.record_payout(
                conn,
                key,
                mint,
                address,
                amount,
                quote["quote"],
                amount + reserve + slack,
                0,
                target.id,
                counter,
                n_change,
            )

    async def _run_payout(self, conn: asyncpg.Connection, row: asyncpg.Record, fresh: bool) -> bus.Paid:
        client = self._mints.get(row["mint_url"])
        key = row["idempotency_key"]
        if not fresh:
            outcome = await self._melt_outcome(conn, row, client)
            if outcome is not None:
                return outcome
        inputs = await storage.pending_inputs(conn, storage.payout_op(key))
        if not inputs:
            try:
                issued = await self.issue(
                    row["inputs_sat"] * 1000, storage.payout_inputs_key(key), row["mint_url"], split_ok=False
                )
            except BusError:
                await storage.drop_payout(conn, key)
                raise
            inputs = ecash.parse_token(issued.token).proofs
            if issued.mint_url != client.url:  # the quoted mint ran short meanwhile: undo the cut
                async with conn.transaction():
                    await storage.set_state(conn, [p.secret for p in inputs], "unspent", None)
                    await storage.drop_payout(conn, key)
                raise _fail("insufficient_funds", f"{client.url} no longer holds enough to pay", 503, 30)
            ecash.expand_keyset_ids(inputs, await client.keysets())
            async with conn.transaction():
                await storage.set_state(conn, [p.secret for p in inputs], "pending", storage.payout_op(key))
                row = await storage.set_payout_cut(conn, key, sum(p.amount for p in inputs), issued.fee_msat // 1000)
        blanks = await self._secrets.outputs(row["keyset_id"], row["counter"], [1] * row["n_change"])
        try:
            result = await client.melt(row["quote_id"], inputs, [o.message for o in blanks])
        except MintUnavailable as exc:
            if not exc.sent:
                async with conn.transaction():
                    await storage.drop_payout(conn, key)
            raise _unavailable(exc) from None
        except MintError as exc:
            outcome = await self._melt_outcome(conn, row, client)
            if outcome is not None:
                return outcome
            raise _fail("payment_failed", f"the mint could not pay: {exc.detail}", 502) from None
        state = result.get("state") or ("PAID" if result.get("paid") else "UNPAID")
        if state == "PAID":
            return await self._finish_payout(conn, row, client, result.get("change"))
        if state == "PENDING":
            return bus.Paid(row["amount_sat"] * 1000, 0, "pending")
        async with conn.transaction():
            await storage.drop_payout(conn, key)
        raise _fail("payment_failed", "the Lightning payment failed", 502)

    async def _melt_outcome(self, conn: asyncpg.Connection, row: asyncpg.Record, client: MintClient) -> bus.Paid | None:
        """What became of an earlier melt attempt: paid (finished now), still pending, or None when it
        surely did not pay (its inputs, if not spent or in flight, may be melted again)."""
        try:
            quote = await client.melt_state(row["quote_id"])
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", exc.detail, 502) from None
        state = quote.get("state") or ("PAID" if quote.get("paid") else "UNPAID")
        if state == "PAID":
            return await self._finish_payout(conn, row, client, quote.get("change"))
        if state == "PENDING":
            return bus.Paid(row["amount_sat"] * 1000, 0, "pending")
        return None

    async def abort_payout(self, key: str) -> bus.PayoutOutcome:
        """Settle the payout `key` for good, so its caller can give the money back or record it paid.

        Under the payout's lock (so no `pay` of it is in flight): never planned, or planned but the melt
        surely did not pay (the quote is not paid and every input is still unspent, NUT-05/NUT-07) ->
        "aborted", and `pay` refuses the key from now on; paid -> "paid"; in flight at the mint -> "pending".
        Raises `mint_unavailable` when the mint cannot tell.
        """
        async with self._exclusive(storage.payout_op(key)) as conn:
            row = await storage.get_payout(conn, key)
            if row is not None and row["state"] == "pending":
                client = self._mints.get(row["mint_url"])
                outcome = await self._melt_outcome(conn, row, client)
                if outcome is None:
                    inputs = await storage.pending_inputs(conn, storage.payout_op(key))
                    states = await self._states(client, inputs)
                    if any(states.get(p.Y) != "UNSPENT" for p in inputs):
                        return bus.PayoutOutcome("pending")
                    async with conn.transaction():
                        await storage.drop_payout(conn, key)
                        await storage.abort_payout(conn, key)
                        await self._update_gauges(conn)
                    return bus.PayoutOutcome("aborted")
                if outcome.status == "pending":
                    return bus.PayoutOutcome("pending")
                row = await storage.get_payout(conn, key)
            if row is not None:
                return bus.PayoutOutcome("paid", _paid(row).fee_msat)
            async with conn.transaction():
                await storage.drop_payout(conn, key)  # an input cut left without a plan goes back too
                await storage.abort_payout(conn, key)
            return bus.PayoutOutcome("aborted")

    async def resolve_stale_payouts(self, older_than: float) -> int:
        """Settle payouts whose melt outcome was left unknown: a paid one is finished (its change
        kept), an unpaid one whose inputs are untouched is undone; one still in flight waits."""

        async def settle(conn: asyncpg.Connection, row: asyncpg.Record) -> bool:
            client = self._mints.get(row["mint_url"])
            outcome = await self._melt_outcome(conn, row, client)
            if outcome is not None:
                return outcome.status != "pending"
            inputs = await storage.pending_inputs(conn, storage.payout_op(row["idempotency_key"]))
            states = await self._states(client, inputs)
            if any(states.get(p.Y) != "UNSPENT" for p in inputs):
                return False
            async with conn.transaction():
                await storage.drop_payout(conn, row["idempotency_key"])
                await self._update_gauges(conn)
            return True

        return await self._resolve_stale("payouts", storage.payout_op, storage.get_payout, settle, older_than)

    async def resolve_stale_redemptions(self, older_than: float) -> int:
        """Finish redemptions left mid-swap (the mint's answer lost, the caller gone): when the mint signed
        our planned outputs (NUT-09 restore), store the proofs and mark the redemption done, so the ecash is
        the wallet's and a client coming back with the token (`POST /v1/balance/refund` with X-Cashu) is
        credited and refunded at once. A plan the mint never executed stays: the token is still the client's."""

        async def finish(conn: asyncpg.Connection, row: asyncpg.Record) -> bool:
            client = self._mints.get(row["mint_url"])
            outputs = await self._secrets.outputs(row["keyset_id"], row["counter"], row["amounts"])
            signatures = await self._restore(client, outputs)
            if signatures is None:
                return False
            proofs = ecash.unblind(outputs, signatures, await self._keys(client, row["keyset_id"]))
            async with conn.transaction():
                await storage.store_proofs(conn, client.url, proofs, storage.redeem_op(row["token_hash"]))
                await storage.finish_redemption(conn, row["token_hash"])
                await self._update_gauges(conn)
            log.info("finished a redemption left mid-swap at %s", client.url)
            return True

        return await self._resolve_stale(
            "redemptions", storage.redeem_op, storage.get_redemption, finish, older_than, key_column="token_hash"
        )

    async def _resolve_stale(self, table: str, op: Callable[[str], str], get: Callable, resolve: Callable,
                             older_than: float, key_column: str = "idempotency_key") -> int:  # fmt: skip
        """Run `resolve` under its operation lock on each `table` row pending for over `older_than` s."""
        async with self._pool.acquire() as conn:
            keys = await conn.fetch(
                f"SELECT {key_column} FROM wallet.{table}"
                " WHERE state = 'pending' AND created_at < now() - make_interval(secs => $1)",
                older_than,
            )
        settled = 0
        for (key,) in keys:
            try:
                async with self._exclusive(op(key)) as conn:
                    row = await get(conn, key)
                    if row is not None and row["state"] == "pending" and await resolve(conn, row):
                        settled += 1
            except BusError as exc:
                log.warning("pending %s not settled yet: %s", table, exc.error.message)
        return settled

    async def _states(self, client: MintClient, proofs: Sequence[Proof]) -> dict[str, str]:
        if not proofs:
            return {}
        try:
            return await client.check_state([p.Y for p in proofs])
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", exc.detail, 502) from None

    async def _finish_payout(
        self, conn: asyncpg.Connection, row: asyncpg.Record, client: MintClient, change: list | None
    ) -> bus.Paid:
        blanks = await self._secrets.outputs(row["keyset_id"], row["counter"], [1] * row["n_change"])
        signatures = [BlindedSignature(**c) for c in change or []]
        if not signatures and row["inputs_sat"] > row["amount_sat"]:
            found = await client.restore([o.message for o in blanks]) if blanks else {}
            blanks = [o for o in blanks if o.message.B_ in found]
            signatures = [found[o.message.B_] for o in blanks]
        proofs = ecash.unblind_change(blanks, signatures, await self._keys(client, row["keyset_id"]))
        op = storage.payout_op(row["idempotency_key"])
        async with conn.transaction():
            inputs = await storage.pending_inputs(conn, op)
            await storage.set_state(conn, [p.secret for p in inputs], "spent", op)
            await storage.store_proofs(conn, client.url, proofs, op)
            row = await storage.finish_payout(conn, row["idempotency_key"], sum(p.amount for p in proofs))
            await self._update_gauges(conn)
        log.info("paid %d sat by Lightning from %s", row["amount_sat"], client.url)
        return _paid(row)

    # ---- Lightning invoices (NUT-04 mint quotes) ------------------------------------------------

    async def invoice(self, amount_msat: int) -> bus.MintQuoteState:
        """An invoice from the first accepted mint; paying it buys the wallet `amount_msat` of ecash."""
        sats = amount_msat // 1000
        if sats < 1:
            raise _fail("amount_too_small", f"{amount_msat} msat is less than 1 sat", 400)
        if not self._accepted:
            raise _fail("not_supported", "this node accepts no mint", 503)
        client = self._mints.get(self._accepted[0])
        try:
            quote = await client.mint_quote(sats)
        except MintUnavailable as exc:
            raise _unavailable(exc) from None
        except MintError as exc:
            raise _fail("mint_error", f"the mint will not make an invoice: {exc.detail}", 502) from None
        async with self._pool.acquire() as conn:
            row = await storage.record_mint_quote(
                conn, quote["quote"], client.url, sats, quote["request"], int(quote.get("expiry") or 0)
            )
        return _quote_state(row, "pending")

    async def check_invoice(self, quote_id: str) -> bus.MintQuoteState:
        """Mint the ecash of a paid invoice, once: the output plan is committed before the mint call,
        and a retry after a lost reply (the mint then refuses to mint twice) restores the signatures."""
        async with self._exclusive(storage.mint_quote_op(quote_id)) as conn:
            row = await storage.get_mint_quote(conn, quote_id)
            if row is None:
                raise _fail("unknown_invoice", "no such invoice", 404)
            if row["state"] == "issued":
                return _quote_state(row, "paid")
            client = self._mints.get(row["mint_url"])
            if row["state"] == "unpaid":
                try:
                    quote = await client.mint_state(quote_id)
                except MintUnavailable as exc:
                    raise _unavailable(exc) from None
                except MintError as exc:
                    raise _fail("mint_error", exc.detail, 502) from None
                state = quote.get("state") or ("PAID" if quote.get("paid") else "UNPAID")
                if state == "ISSUED":  # we never planned outputs for it, so someone else minted it
                    raise _fail("mint_error", "the invoice's ecash was minted elsewhere", 502)
                if state != "PAID":
                    expired = 0 < row["expiry"] < time.time()
                    return _quote_state(row, "expired" if expired else "pending")
                try:
                    target = await client.active_keyset()
                except MintUnavailable as exc:
                    raise _unavailable(exc) from None
                except MintError as exc:
                    raise _fail("mint_error", exc.detail, 502) from None
                amounts = ecash.split_amount(row["amount_sat"])
                async with conn.transaction():
                    counter = await storage.reserve_counters(conn, target.id, client.url, len(amounts))
                    row = await storage.plan_mint(conn, quote_id, target.id, counter, amounts)
            outputs = await self._secrets.outputs(row["keyset_id"], row["counter"], row["amounts"])
            try:
                signatures = await client.mint(quote_id, [o.message for o in outputs])
            except MintUnavailable as exc:
                raise _unavailable(exc) from None  # the plan stays: a retry mints or restores
            except MintError as exc:
                signatures = await self._restore(client, outputs)  # an earlier attempt may have minted
                if signatures is None:
                    raise _fail("mint_error", f"the mint refused to mint: {exc.detail}", 502) from None
            proofs = ecash.unblind(outputs, signatures, await self._keys(client, row["keyset_id"]))
            async with conn.transaction():
                await storage.store_proofs(conn, client.url, proofs, storage.mint_quote_op(quote_id))
                row = await storage.finish_mint(conn, quote_id)
            await self._update_gauges(conn)
            log.info("minted %d sat for a paid invoice at %s", row["amount_sat"], client.url)
            return _quote_state(row, "paid")

    # ---- holdings ------------------------------------------------------------------------------

    async def holdings(self) -> bus.Holdings:
        async with self._pool.acquire() as conn:
            balances = await self._update_gauges(conn)
        by_mint = {mint: sats * 1000 for mint, sats in balances.items()}
        return bus.Holdings(unspent_msat=sum(by_mint.values()), by_mint=by_mint)

    async def _update_gauges(self, conn: asyncpg.Connection) -> dict[str, int]:
        balances = await storage.balances(conn)
        for mint in {*self._accepted, *balances}:
            self._metrics.unspent_msat.labels(mint).set(balances.get(mint, 0) * 1000)
        return balances


def _token_rejected(exc: MintError) -> BusError:
    if exc.code == PROOFS_SPENT:
        return _fail("cashu_token_already_spent", "the token was already spent", 400)
    if exc.code == PROOFS_PENDING:
        return _fail("cashu_token_pending", "the token is being spent in another transaction", 409, 2)
    return _fail("invalid_token", f"the mint rejected the token: {exc.detail}", 400)


def _quote_state(row: asyncpg.Record, state: str) -> bus.MintQuoteState:
    return bus.MintQuoteState(
        row["quote_id"], row["request"], row["amount_sat"] * 1000, row["mint_url"], state, row["expiry"]
    )


def _paid(row: asyncpg.Record) -> bus.Paid:
    fee = row["inputs_sat"] - row["amount_sat"] - (row["change_sat"] or 0) + row["cut_fee_sat"]
    return bus.Paid(row["amount_sat"] * 1000, fee * 1000, "paid")


def _redeemed(row: asyncpg.Record, already: bool) -> bus.Redeemed:
    amount, fee = row["amount_sat"] * 1000, row["fee_sat"] * 1000
    return bus.Redeemed(row["token_hash"], row["mint_url"], amount, fee, amount - fee, already=already)


def _issued(row: asyncpg.Record, already: bool, box: SecretBox) -> bus.Issued:
    token = box.open(row["token"])
    return bus.Issued(token, row["amount_sat"] * 1000, row["mint_url"], row["fee_sat"] * 1000, already=already)


def _whole_sats(amount_msat: int, key: str) -> int:
    """Whole sats to pay out for an idempotent operation, or the typed refusal."""
    sats = amount_msat // 1000
    if sats < 1:
        raise _fail("amount_too_small", f"{amount_msat} msat is less than 1 sat", 400)
    if not key:
        raise _fail("bad_message", "an idempotency key is required", 400)
    return sats
