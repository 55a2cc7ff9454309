"""Billing's answers on the bus: each handler turns one message into ledger operations.

Billing never talks to a mint: deposits and refunds ask the wallet service over NATS, and the
ledger is written so that a wallet call that fails or times out leaves nothing half-done.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import time
import uuid
from typing import TypeVar

import bolt11
import msgspec
from nats.aio.client import Client as NATS

from services.billing.admin.usage import RequestLog
from services.billing.catalog import Catalog
from services.billing.grants import RECALL_WAIT, Grants
from services.billing.ledger import DepositIntent, Ledger, LedgerError, PendingRefund, _Repeat
from shared import bus, pricing
from shared.messaging import BusError, request
from shared.metrics import BillingMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
PERMANENT_PAYOUT_ERRORS = {"not_supported", "amount_too_small", "invalid_address"}
# A deposit intent is the deposit loop's once its own request can no longer be running: the wallet's answer
# is awaited for bus.MINT_TIMEOUT s, and this much more covers billing's writes around it (seconds).
INTENT_MARGIN = 5.0
INTENT_DUE = bus.MINT_TIMEOUT + INTENT_MARGIN


def wallet_took_nothing(error: bus.Error) -> bool:
    """The wallet refused a redeem for good, holding nothing of the token (bad or spent token, a mint not
    accepted, `unknown_token` for a resume it never started): the token is still the client's. Outages
    (5xx) and "try again" refusals (409 token pending, 429) may still end with the wallet holding it."""
    return 400 <= error.status < 500 and error.status not in (409, 429)


def payment_hash(invoice: str) -> str:
    """The invoice's payment hash, or "" when it cannot be decoded."""
    try:
        return bolt11.decode(invoice).payment_hash or ""
    except Exception:  # the bolt11 package raises assorted errors on odd input
        return ""


class Accounts:
    def __init__(
        self, ledger: Ledger, catalog: Catalog, nc: NATS, metrics: BillingMetrics, default_max_tokens: int,
        grants: Grants,
    ):  # fmt: skip
        self.ledger = ledger
        self.grants = grants
        self.catalog = catalog
        self.nc = nc
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.request_log: RequestLog | None = None  # set by the app: the admin request log, written at settlement

    async def handle(self, message: bus.Message):
        """Dispatch by message type; ledger refusals become typed bus errors."""
        try:
            match message:
                case bus.Reserve():
                    return await self.reserve(message)
                case bus.Usage():
                    return await self.settle(message)
                case bus.Deposit():
                    return await self.deposit(message)
                case bus.KeyQuery():
                    return await self.key_info(message.key_hash)
                case bus.CreateKey():
                    return await self.ledger.grant(message.key_hash, message.balance_msat, message.idempotency_key)
                case bus.Refund():
                    return await self.refund(message)
                case bus.RefundQuery():
                    return await self.refund_status(message)
                case bus.ModelsQuery():
                    return self.catalog.current
                case bus.UpstreamsQuery():
                    return self.catalog.upstreams
                case bus.ReconcileQuery():
                    return await self.reconcile()
                case bus.InvoiceCreate():
                    return await self.create_invoice(message)
                case bus.InvoiceQuery():
                    return await self.invoice_status(message)
                case bus.CreditControl():
                    return await self.grants.credit_control(message)
                case bus.CreditControls():
                    return await self.grants.credit_controls(message)
                case bus.RateQuery():
                    return self.rate(message)
        except LedgerError as exc:
            return exc.error
        return bus.Error("bad_message", f"billing does not answer {type(message).__name__}", 400)

    async def reserve(self, message: bus.Reserve) -> bus.Reserved:
        """Hold the most the call can cost at any of its routes, so failover to a dearer provider is covered."""
        model, price, limit, routes = self.catalog.resolve(message.model)
        completion = message.max_tokens if message.max_tokens is not None and message.max_tokens >= 0 else limit
        prompt = max(message.prompt_tokens, 0)
        amount = max(pricing.max_cost(p, prompt, completion) for p in (price, *(r.price for r in routes)))
        return await self.ledger.reserve(message, model, price, amount, routes)

    def rate(self, message: bus.RateQuery) -> bus.Rating:
        """How a model is priced, for a gateway rating calls against its quota grant."""
        model, price, limit, routes = self.catalog.resolve(message.model)
        return bus.Rating(model, price, limit, routes)

    async def key_info(self, key_hash: str) -> bus.KeyInfo:
        """A key's balance with its grants called back first (briefly), so units a gateway holds but
        has not spent show as balance, and what it spent shows as spent."""
        await self.grants.recall(key_hash, wait=RECALL_WAIT / 2)
        return await self.ledger.key_info(key_hash)

    async def settle_grant_usage(self, batch: bus.UsageBatch) -> None:
        """Settle a gateway's batch of calls charged to quota grants (one transaction)."""
        charged = await self.grants.settle(batch.events, [self._route_price(usage) for usage in batch.events])
        if self.request_log is not None:  # each call once, as `settle` logs it
            settled = [(usage, charged[usage.request_id]) for usage in batch.events if usage.request_id in charged]
            await self.request_log.record_many(settled)
        now = time.time()
        for usage in batch.events:
            if usage.request_id not in charged:
                continue
            self.metrics.settlements.labels(usage.source).inc()
            self.metrics.charged_msat.labels(usage.model).inc(charged[usage.request_id])
            if usage.ts:
                self.metrics.settle_lag_seconds.observe(max(now - usage.ts, 0))

    async def settle(self, usage: bus.Usage) -> bus.Settled:
        """Charge at the answering provider's price when it is one of the model's routes, else the reservation's."""
        settled = await self.ledger.settle(usage, self._route_price(usage))
        if self.request_log is not None:  # idempotent by request id, so a redelivered event logs once
            await self.request_log.record(usage, settled.cost_msat)
        if not settled.already:
            self.metrics.settlements.labels(usage.source).inc()
            self.metrics.charged_msat.labels(usage.model).inc(settled.cost_msat)
            if usage.ts:
                self.metrics.settle_lag_seconds.observe(max(time.time() - usage.ts, 0))
        return settled

    def _route_price(self, usage: bus.Usage) -> bus.Price | None:
        """The answering provider's price when it differs from the reservation's and is one of the
        model's routes (None: charge the reservation's price)."""
        if usage.route_price is None or usage.route_price == usage.price:
            return None
        if usage.route_price in self.catalog.route_prices(usage.model):
            return usage.route_price
        log.warning("usage %s names a price no route of %s has; charged at the reservation's",
                    usage.request_id, usage.model)  # fmt: skip
        return None

    async def deposit(self, message: bus.Deposit) -> bus.KeyInfo:
        """Redeem through the wallet and credit once per token; a repeat gets the same answer."""
        token_hash = hashlib.sha256(message.token.encode()).hexdigest()
        existing = await self.ledger.deposit_of(token_hash)
        if existing is not None:
            return await self.ledger.answer_repeat(existing, message.key_hash)
        if not message.create and not await self.ledger.key_exists(message.key_hash):
            raise LedgerError(bus.Error("unknown_key", "Invalid API key: no such key", 401))
        # Durable before the wallet is asked: should this write fail, the wallet is not asked and the token
        # stays the client's; once it is written, the deposit loop ends the deposit if this call cannot.
        await self.ledger.record_intent(token_hash, message.key_hash, message.token, message.create, INTENT_DUE)
        redeem = bus.Redeem(message.token, message.resume_only)
        try:
            redeemed = await self._wallet(bus.WALLET_REDEEM, redeem, bus.Redeemed)
        except LedgerError as exc:
            if wallet_took_nothing(exc.error):
                await self.ledger.close_intent(token_hash)
            raise
        return await self._credit(message.key_hash, token_hash, redeemed, message.create)

    async def _credit(self, key_hash: str, token_hash: str, redeemed: bus.Redeemed, create: bool) -> bus.KeyInfo:
        """Credit a redeemed token once (closing its intent); a token credited already gets its answer."""
        try:
            info = await self.ledger.credit_deposit(key_hash, token_hash, redeemed, create)
        except _Repeat as repeat:
            await self.ledger.close_intent(token_hash)  # a racing retry or the deposit loop credited it
            return await self.ledger.answer_repeat(repeat.deposit, key_hash)
        self.metrics.credited_msat.inc(redeemed.credited_msat)
        return info

    async def finish_deposits(self, limit: int = 50) -> int:
        """The deposit loop: every deposit intent left open (billing killed, Postgres or the bus failing
        between the wallet's redeem and the credit) and due (INTENT_DUE s after its request) is ended:
        the wallet is asked to resume the redeem (`resume_only`), and what it redeemed is credited to the
        intent's key once; a token the wallet never took is left to the client (intent closed, nothing
        credited). Intents the wallet cannot answer for yet (it, its mint or the bus down) are tried
        again on the next pass. Returns how many ended."""
        ended = 0
        for intent in await self.ledger.claim_intents(INTENT_DUE, limit):
            try:
                ended += await self._finish_deposit(intent)
            except Exception as exc:  # e.g. Postgres failing mid-credit: the intent stays for the next pass
                log.warning("deposit of token %s… still open: %s", intent.token_hash[:12], exc.__class__.__name__)
                with contextlib.suppress(Exception):
                    await self.ledger.retry_intent(intent, 0)
        return ended

    async def _finish_deposit(self, intent: DepositIntent) -> bool:
        try:
            redeemed = await self._wallet(bus.WALLET_REDEEM, bus.Redeem(intent.token, resume_only=True), bus.Redeemed)
        except LedgerError as exc:
            if not wallet_took_nothing(exc.error):
                log.info("deposit of token %s… still open (attempt %d): %s", intent.token_hash[:12], intent.attempts,
                         exc.error.code)  # fmt: skip
                await self.ledger.retry_intent(intent, 0)
                return False
            await self.ledger.close_intent(intent.token_hash, intent.due_at)
            log.info("deposit of token %s… ended uncredited (%s): the token is still the client's",
                     intent.token_hash[:12], exc.error.code)  # fmt: skip
            return True
        await self._credit(intent.key_hash, intent.token_hash, redeemed, intent.create)
        log.warning("deposit of token %s… finished by the deposit loop: %d msat credited", intent.token_hash[:12],
                    redeemed.credited_msat)  # fmt: skip
        return True

    async def refund(self, message: bus.Refund) -> bus.Refunded:
        method = "lightning" if message.lightning_address else "cashu"
        if await self.grants.open_grants(message.key_hash):
            # Grants out on the key: no new units while gateways give theirs back and their calls settle.
            await self.grants.block(message.key_hash, RECALL_WAIT * 2)
            still_settling = False
            try:
                await self.grants.recall(message.key_hash, settled=True)
                step = await self.ledger.begin_refund(message.key_hash, method, message.lightning_address)
            except LedgerError as exc:
                # Calls still settling (425): the block stays until it lapses (RECALL_WAIT * 2 s) and the client's
                # retry renews it, so sustained load on the key cannot spend it down under a waiting refund.
                still_settling = exc.error.status == 425
                raise
            finally:
                if not still_settling:
                    await self.grants.unblock(message.key_hash)
        else:
            step = await self.ledger.begin_refund(message.key_hash, method, message.lightning_address)
        if isinstance(step, bus.Refunded):
            return step  # a replay of the last refund
        if step.method == "lightning" and (step.method, step.recipient) != (method, message.lightning_address):
            # A Lightning refund left pending, and the client now wants a token or another address:
            # settle the old payout for good first (paid, or aborted and back on the balance).
            paid = await self._settle_payout(step, message.key_hash)
            if paid is not None:
                return paid
            step = await self.ledger.begin_refund(message.key_hash, method, message.lightning_address)
            if isinstance(step, bus.Refunded):
                return step
        return await self._pay(step, message.key_hash, message.mint_url)

    async def refund_status(self, message: bus.RefundQuery) -> bus.Refunded:
        """The key's latest refund (pending, paid or failed: a failed one's amount is back on the balance)."""
        return await self.ledger.latest_refund(message.key_hash)

    async def _settle_payout(self, refund: PendingRefund, key_hash: str) -> bus.Refunded | None:
        """End a pending Lightning refund for good: the wallet aborts the payout unless the mint paid it.

        Returns the paid refund, or None once aborted (the amount is back on the key). Raises
        `refund_in_flight` (503) while the payment is in flight or the wallet cannot tell yet.
        """
        abort = bus.PayoutAbort(f"refund-{refund.refund_id}")
        try:
            outcome = await request(self.nc, bus.WALLET_PAYOUT_ABORT, abort, bus.PayoutOutcome, bus.MINT_TIMEOUT)
        except BusError as exc:
            message = f"Lightning refund {refund.refund_id} not settled yet ({exc.error.code}); ask again shortly"
            raise LedgerError(bus.Error("refund_in_flight", message, 503, 5)) from None
        if outcome.state == "aborted":
            await self.ledger.cancel_refund(refund, key_hash)
            log.info("Lightning refund %s aborted; its amount is back on the balance", refund.refund_id)
            return None
        if outcome.state == "paid":
            self.metrics.refunded_msat.inc(refund.amount_msat)
            return await self.ledger.complete_refund(refund, key_hash, None, outcome.fee_msat)
        message = f"The Lightning refund {refund.refund_id} is in flight at the mint; ask again shortly"
        raise LedgerError(bus.Error("refund_in_flight", message, 503, 5))

    async def finish_pending_refunds(self, older_than: float) -> int:
        """The refund loop: every refund pending for over `older_than` s ends by itself. A token refund
        (or X-Cashu change) is issued again under its idempotency key; a Lightning refund is settled
        (paid, or aborted with its amount back on the balance). Returns how many ended."""
        ended = 0
        for refund, key_hash in await self.ledger.pending_refunds(older_than):
            try:
                if refund.method == "cashu":
                    await self._pay(refund, key_hash)
                else:
                    await self._settle_payout(refund, key_hash)
                ended += 1
            except LedgerError as exc:
                if exc.error.code == "insufficient_funds":  # ended: failed, its amount back on the key
                    ended += 1
                    continue
                log.info("refund %s still pending: %s", refund.refund_id, exc.error.code)
        return ended

    async def _pay(self, refund: PendingRefund, key_hash: str, mint_url: str | None = None) -> bus.Refunded:
        """Pay a pending refund out. A token comes from `mint_url` when the client named one, else from
        the mint of the key's latest deposit (X-Cashu change from the token's own mint), else from
        whichever mints hold enough (the wallet splits it across mints when none holds it all)."""
        try:
            if refund.method == "cashu":
                mint_url = mint_url or await self.ledger.deposit_mint(key_hash)
                issued = await request(
                    self.nc, bus.WALLET_ISSUE, bus.Issue(refund.amount_msat, f"refund-{refund.refund_id}", mint_url),
                    bus.Issued, bus.MINT_TIMEOUT,
                )  # fmt: skip
                token, fee = issued.token, issued.fee_msat
            else:
                pay = bus.Pay(refund.amount_msat, f"refund-{refund.refund_id}", refund.recipient or "")
                paid = await request(self.nc, bus.WALLET_PAY, pay, bus.Paid, bus.MINT_TIMEOUT)
                token, fee = None, paid.fee_msat
        except BusError as exc:
            if exc.error.code in PERMANENT_PAYOUT_ERRORS:
                await self.ledger.cancel_refund(refund, key_hash)
                raise LedgerError(exc.error) from None
            if refund.method == "lightning":
                return await self._payout_failed(refund, key_hash, exc.error)
            if exc.error.code == "insufficient_funds":
                # The wallet holds less ecash than this user is owed: the books are wrong (mint fees, a bug), not
                # the mint. Waiting would only pay it from other users' later deposits, so it ends here, failed
                # with its amount back on the key (`GET /v1/balance/refund` shows it); the client may retry.
                await self.ledger.cancel_refund(refund, key_hash)
                log.error("refund %s failed: %s; its amount is back on the key", refund.refund_id, exc.error.message)
                message = (
                    "The node's wallet holds too little ecash to pay this refund (the node's fault, not the"
                    " client's); the amount is back on the balance and the operator must top the wallet up"
                )
                raise LedgerError(bus.Error("insufficient_funds", message, 503, exc.error.retry_after or 30)) from None
            # Transient (mint down, timeout): the refund stays pending and a retry re-issues it.
            log.warning("refund %s pending: %s", refund.refund_id, exc.error.code)
            raise LedgerError(bus.Error("mint_unavailable", f"Refund pending: {exc.error.message}", 503, 5)) from None
        self.metrics.refunded_msat.inc(refund.amount_msat)
        return await self.ledger.complete_refund(refund, key_hash, token, fee)

    async def _payout_failed(self, refund: PendingRefund, key_hash: str, error: bus.Error) -> bus.Refunded:
        """A Lightning payout failed: unless the mint paid it after all (then that is the answer), abort it
        and put the amount back on the balance, so the client can retry to another address or take a
        token; raises `payout_failed` (502), or `mint_unavailable` (503) while it is still in doubt."""
        try:
            paid = await self._settle_payout(refund, key_hash)
        except LedgerError:  # in doubt: it stays pending and the refund loop settles it
            raise LedgerError(bus.Error("mint_unavailable", f"Refund pending: {error.message}", 503, 5)) from None
        if paid is not None:
            return paid
        message = (f"Lightning refund failed ({error.message}); the amount is back on the balance: retry with"
                   " another lightning_address, or with no body for a token")  # fmt: skip
        raise LedgerError(bus.Error("payout_failed", message, 502))

    async def create_invoice(self, message: bus.InvoiceCreate) -> bus.InvoiceInfo:
        """A Lightning invoice from the wallet's mint; `create` makes the key it will fund now, so the
        payer can learn it from the status answer."""
        if message.purpose not in ("create", "topup"):
            raise LedgerError(bus.Error("bad_request", "purpose must be 'create' or 'topup'", 400))
        if message.amount_msat < pricing.MSAT_PER_SAT:
            raise LedgerError(bus.Error("bad_request", "amount must be at least 1 sat", 400))
        key_hash, api_key = message.key_hash, None
        if message.purpose == "create":
            api_key = "sk-" + secrets.token_hex(32)
            key_hash = hashlib.sha256(api_key.encode()).hexdigest()
        elif not await self.ledger.key_exists(key_hash):
            raise LedgerError(bus.Error("unknown_key", "Invalid API key: no such key", 401))
        quote = await self._wallet(bus.WALLET_INVOICE, bus.MintQuote(message.amount_msat), bus.MintQuoteState)
        return await self.ledger.record_invoice(
            uuid.uuid4().hex, quote, payment_hash(quote.bolt11), message.purpose, key_hash, api_key
        )

    async def invoice_status(self, message: bus.InvoiceQuery) -> bus.InvoiceInfo:
        """Ask the wallet (which mints the ecash once paid), then credit the key once per invoice."""
        row = await self.ledger.invoice(message.invoice_id, message.bolt11)
        expired = False
        if row["state"] == "pending":
            expired = await self.credit_if_paid(row["invoice_id"], row["quote_id"]) == "expired"
        return await self.ledger.invoice_answer(row["invoice_id"], expired)

    async def credit_if_paid(self, invoice_id: str, quote_id: str) -> str:
        """Have the wallet mint a paid invoice's ecash, then credit its key once; returns the quote's
        state (pending | paid | expired). Hands out no key: only a status answer does that."""
        quote = await self._wallet(bus.WALLET_INVOICE_CHECK, bus.MintQuoteCheck(quote_id), bus.MintQuoteState)
        if quote.state == "paid":
            self.metrics.credited_msat.inc(await self.ledger.credit_invoice(invoice_id))
        return quote.state

    async def _wallet(self, subject: str, message: msgspec.Struct, expect: type[T]) -> T:
        """Ask the wallet; its typed refusal (bad token, mint down, …) becomes billing's answer unchanged."""
        try:
            return await request(self.nc, subject, message, expect, bus.MINT_TIMEOUT)
        except BusError as exc:
            raise LedgerError(exc.error) from None

    async def reconcile(self) -> bus.Reconciliation:
        """Prove the books: the keys table against the ledger, and the wallet's ecash against both."""
        books = await self.ledger.books()
        owed, withdrawn = books.pop("owed"), books.pop("withdrawn")
        refundable, pending = books.pop("refundable"), books.pop("pending_refunds")
        unspent_credit = books.pop("unspent_credit")
        revenue, fees = books.get("revenue", 0), books.get("fees:mint", 0)
        redeemed, granted = -books.get("ecash:in", 0), -books.get("operator:grants", 0)
        lightning_in = -books.get("lightning:in", 0)  # paid invoices: minted into the wallet like redeemed tokens
        # Out as tokens or over Lightning: the operator's withdrawals are payouts, the rest users' refunds.
        refunded = books.get("ecash:out", 0) + books.get("lightning:out", 0) - withdrawn
        paid_out = withdrawn
        difference = owed + revenue + fees - (redeemed + lightning_in + granted - refunded - paid_out)
        try:
            holdings = await request(self.nc, bus.WALLET_HOLDINGS, bus.HoldingsQuery(), bus.Holdings, bus.MINT_TIMEOUT)
            unspent = holdings.unspent_msat
        except BusError:
            unspent = -1
        # Ecash the wallet must hold: every user's refundable balance (their own ecash, not operator credit)
        # and every refund not paid out yet, plus the operator's revenue less what was earned from operator
        # credit spent on inference (never ecash; mint fees the node paid are already out of revenue).
        # Counted from balances, not from flows: operator credit paid out as ecash shows as not covered.
        required = refundable + pending + revenue - (granted - unspent_credit)
        covered = unspent >= required
        self.metrics.reconcile_difference_msat.set(difference)
        return bus.Reconciliation(
            owed_msat=owed, revenue_msat=revenue, fees_msat=fees, redeemed_msat=redeemed, refunded_msat=refunded,
            paid_out_msat=paid_out, difference_msat=difference, wallet_unspent_msat=unspent, covered=covered,
            granted_msat=granted, lightning_in_msat=lightning_in, refundable_msat=refundable,
            pending_refunds_msat=pending, required_msat=required,
        )  # fmt: skip
