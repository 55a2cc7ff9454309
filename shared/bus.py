"""The bus contract: every NATS subject and every message the services exchange, in one module.

Messages are msgspec Structs encoded as msgpack. Every reply is either the expected Struct or an
`Error` (tagged union), so a caller always learns *why* something failed. Amounts are integer msat.
Keys travel only as `key_hash` = sha256 hex of the full `sk-…` string; no service but the gateway
ever sees a key or a token in the clear, and the gateway sends tokens only to billing and wallet.
(One exception: the new key of a paid Lightning `create` invoice, made by billing, goes to the gateway
once, in `InvoiceInfo.api_key`.)

Evolution: a message's tag names its kind; a new field always gets a default and decoders ignore
fields they do not know, so services of adjacent versions can run side by side during a rollout.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

# Request/reply subjects (queue group = service name, so replicas share the load).
BILLING_RESERVE = "billing.reserve"  # Reserve -> Reserved | Error
BILLING_SETTLE = "billing.settle"  # Usage -> Settled | Error   (same handler as the stream)
BILLING_DEPOSIT = "billing.deposit"  # Deposit -> KeyInfo | Error (redeems through wallet, credits once)
BILLING_KEY_INFO = "billing.key.info"  # KeyQuery -> KeyInfo | Error
BILLING_CREATE_KEY = "billing.key.create"  # CreateKey -> KeyInfo | Error (operator command)
BILLING_REFUND = "billing.refund"  # Refund -> Refunded | Error
BILLING_MODELS = "billing.models"  # ModelsQuery -> Catalog
BILLING_RECONCILE = "billing.reconcile"  # ReconcileQuery -> Reconciliation
BILLING_INVOICE_CREATE = "billing.invoice.create"  # InvoiceCreate -> InvoiceInfo | Error (Lightning top-up)
BILLING_INVOICE_STATUS = "billing.invoice.status"  # InvoiceQuery -> InvoiceInfo | Error (credits once when paid)
WALLET_REDEEM = "wallet.redeem"  # Redeem -> Redeemed | Error
WALLET_ISSUE = "wallet.issue"  # Issue -> Issued | Error
WALLET_PAY = "wallet.pay"  # Pay -> Paid | Error (Lightning payout)
WALLET_HOLDINGS = "wallet.holdings"  # HoldingsQuery -> Holdings
WALLET_INVOICE = "wallet.invoice"  # MintQuote -> MintQuoteState | Error (NUT-04 invoice)
WALLET_INVOICE_CHECK = "wallet.invoice.check"  # MintQuoteCheck -> MintQuoteState | Error (mints once paid)
WALLET_PUBKEY = "wallet.pubkey"  # PubkeyQuery -> NodePubkey (the NUT-11 key tokens may be locked to)
DISCOVERY_INFO = "discovery.info"  # InfoQuery -> NodeIdentity
DISCOVERY_PROVIDERS = "discovery.providers"  # ProvidersQuery -> Providers
DISCOVERY_IDENTITY_SET = "discovery.identity.set"  # IdentitySet -> NodeIdentity | Error (operator command)

# Quota grants (RFC 4006 credit control): billing grants a gateway units of a key's balance, which the
# gateway spends locally; the usage it reports settles in batches from the usage stream.
# CreditControl -> QuotaAnswer | Error (CCR / CCA); CreditControls -> QuotaAnswers | Error (a gateway's renewals)
BILLING_CREDIT_CONTROL = "billing.quota"
BILLING_RATE = "billing.rate"  # RateQuery -> Rating | Error (a model's price, for local rating)
QUOTA_RECALL = "quota.recall"  # Recall, core NATS fan-out to every gateway (RFC 4006 Re-Auth-Request)
# GatewayAlive, core NATS fan-out to every billing: a gateway's heartbeat. The X-Cashu reservations of a gateway
# not heard from for GATEWAY_GONE_AFTER seconds (it was killed mid-call) are released by billing's sweeper.
GATEWAY_ALIVE = "events.gateway.alive"

# Events (core NATS): the catalog changed, so discovery republishes and gateways drop caches.
EVENT_CATALOG_CHANGED = "events.catalog.changed"
# Discovery changed the node's Nostr key (admin PATCH /admin/api/nsec): gateways drop the cached npub,
# other discovery replicas load the stored key. Carries no body.
EVENT_IDENTITY_CHANGED = "events.identity.changed"

# Upstream providers (services/billing/providers.py owns the store). Whoever changes a provider publishes
# EVENT_PROVIDERS_CHANGED; billing then rebuilds the catalog (and announces EVENT_CATALOG_CHANGED).
BILLING_UPSTREAMS = "billing.upstreams"  # UpstreamsQuery -> Upstreams (the gateway's routing table)
EVENT_PROVIDERS_CHANGED = "events.providers.changed"

# JetStream: usage events must survive a billing restart, so they go through a stream.
USAGE_STREAM = "USAGE"
USAGE_SUBJECT = "usage.events"
USAGE_CONSUMER = "billing-settle"

REQUEST_TIMEOUT = 5.0  # seconds for ordinary request/reply
MINT_TIMEOUT = 30.0  # seconds for anything that waits on a mint


class Error(msgspec.Struct, tag="error", frozen=True):
    """A typed failure. `code` is stable and machine-read; `status` is the HTTP status to show."""

    code: str
    message: str
    status: int = 400
    retry_after: int | None = None


# ---- billing ---------------------------------------------------------------------------------


class Reserve(msgspec.Struct, tag="reserve", frozen=True):
    key_hash: str
    request_id: str
    model: str
    prompt_tokens: int  # the gateway's estimate of the prompt
    max_tokens: int | None  # the client's cap on completion tokens, if any
    path: str = "/v1/chat/completions"
    gateway: str = ""  # the reserving gateway's instance id (GatewayAlive), so billing can tell the call lost


class Price(msgspec.Struct, frozen=True):
    """A model's price in integer msat: per request, and per million tokens."""

    request_msat: int = 0
    prompt_msat_per_m: int = 0
    completion_msat_per_m: int = 0
    cache_read_msat_per_m: int = 0
    cache_write_msat_per_m: int = 0


class Reserved(msgspec.Struct, tag="reserved", frozen=True):
    reservation_id: str
    reserved_msat: int
    balance_msat: int  # spendable balance left after this reservation
    model: str  # the canonical upstream model id (aliases resolved)
    price: Price
    # Where to forward, best first (priority, then price); `price` is the first's, `reserved_msat` covers
    # the dearest. Usage is settled at the price of the route that answered. Empty: the UPSTREAM_* shorthand.
    routes: tuple[Route, ...] = ()


class Usage(msgspec.Struct, tag="usage", frozen=True):
    """What a proxied call consumed. Settled exactly once per request_id."""

    request_id: str
    key_hash: str
    reservation_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    # "reported": upstream usage; "estimated": no usage came back, counted by the gateway;
    # "failed": upstream failed before anything reached the client (charge nothing).
    source: str = "reported"
    status: int = 200
    ts: float = 0.0
    price: Price | None = None  # the reservation's price, echoed so billing settles in one round trip
    grant_id: str = ""  # the quota grant the gateway charged this call to ("" for a reservation)
    # The price of the provider that answered when it is not the reservation's (failover to another route);
    # billing charges it when it is one of the model's route prices.
    route_price: Price | None = None
    provider: str = ""  # the slug of the provider that answered ("" when none did)
    latency_ms: int = 0  # from the request's arrival to the end of the answer (request log)
    attempts: int = 1  # upstream attempts, failovers included (request log)


class Settled(msgspec.Struct, tag="settled", frozen=True):
    request_id: str
    cost_msat: int
    input_msat: int
    output_msat: int
    base_msat: int
    balance_msat: int
    already: bool = False


class Deposit(msgspec.Struct, tag="deposit", frozen=True):
    """Redeem `token` and credit it to `key_hash`. `create` allows making the key."""

    key_hash: str
    token: str
    create: bool
    resume_only: bool = False  # credit only a token the wallet already took (see Redeem.resume_only)


class KeyQuery(msgspec.Struct, tag="key_query", frozen=True):
    key_hash: str


class CreateKey(msgspec.Struct, tag="create_key", frozen=True):
    key_hash: str
    balance_msat: int
    idempotency_key: str


class KeyInfo(msgspec.Struct, tag="key_info", frozen=True):
    key_hash: str
    balance_msat: int  # spendable: total minus reserved
    reserved_msat: int
    total_requests: int
    total_spent_msat: int
    credited_msat: int = 0  # what this call credited (deposit), 0 otherwise
    refundable_msat: int | None = None  # the part of balance_msat a refund pays out (not operator credit)


class Refund(msgspec.Struct, tag="refund", frozen=True):
    key_hash: str
    lightning_address: str | None = None
    mint_url: str | None = None  # the mint the client wants its token from (else the key's last deposit's)


class Refunded(msgspec.Struct, tag="refunded", frozen=True):
    refund_id: str
    amount_msat: int
    token: str | None = None  # a Cashu token, or None for a Lightning payout
    recipient: str | None = None
    status: str = "paid"


class ModelsQuery(msgspec.Struct, tag="models_query", frozen=True):
    pass


class ModelEntry(msgspec.Struct, frozen=True):
    id: str
    name: str
    upstream_id: str
    context_length: int
    max_completion_tokens: int
    architecture: dict[str, Any]
    usd: dict[str, str]  # USD per token as decimal strings: prompt, completion, request, ...
    price: Price
    aliases: tuple[str, ...] = ()
    enabled: bool = True
    disabled_reason: str = ""  # why a listed model is not sold (e.g. "no price known")
    routes: tuple[Route, ...] = ()  # the providers serving it, best first


class Catalog(msgspec.Struct, tag="catalog", frozen=True):
    models: tuple[ModelEntry, ...]
    btc_usd: str  # the rate used, as a decimal string
    fixed_pricing: bool
    revision: str  # changes whenever any price or model changes


class ReconcileQuery(msgspec.Struct, tag="reconcile_query", frozen=True):
    pass


class Reconciliation(msgspec.Struct, tag="reconciliation", frozen=True):
    owed_msat: int  # balances users hold, reservations included
    revenue_msat: int
    fees_msat: int
    redeemed_msat: int
    refunded_msat: int  # refunds to users, as tokens or over Lightning
    paid_out_msat: int  # the operator's revenue withdrawn (POST /admin/withdraw, automatic payouts)
    difference_msat: int  # owed + revenue + fees - (redeemed + granted - refunded - paid_out); must be 0
    wallet_unspent_msat: int
    covered: bool  # wallet_unspent_msat >= required_msat: every user's refundable balance can be paid
    granted_msat: int = 0  # balances the operator created without ecash (`create-key`)
    lightning_in_msat: int = 0  # paid Lightning invoices (minted into the wallet)
    refundable_msat: int = 0  # the part of owed_msat that is users' own ecash (not operator credit)
    pending_refunds_msat: int = 0  # refunds debited from keys, not paid out yet
    # Ecash the wallet must hold: refundable + pending refunds + the operator's revenue less what was
    # earned from operator credit spent on inference.
    required_msat: int = 0


class InvoiceCreate(msgspec.Struct, tag="invoice_create", frozen=True):
    """A Lightning invoice to fund a key: `create` makes a new key when paid, `topup` credits `key_hash`."""

    amount_msat: int
    purpose: str
    key_hash: str = ""


class InvoiceQuery(msgspec.Struct, tag="invoice_query", frozen=True):
    """Check an invoice (by id, or by its bolt11 for recovery); a paid one is credited once."""

    invoice_id: str = ""
    bolt11: str = ""


class InvoiceInfo(msgspec.Struct, tag="invoice_info", frozen=True):
    invoice_id: str
    bolt11: str
    amount_msat: int
    payment_hash: str
    status: str  # pending | paid | expired
    created_at: int  # unix seconds
    expires_at: int
    paid_at: int | None = None
    api_key: str | None = None  # a `create` invoice's new key, handed out once (the first paid answer)


# ---- quota grants (RFC 4006 credit control) -------------------------------------------------


class CreditControl(msgspec.Struct, tag="credit_control", frozen=True):
    """A Credit-Control-Request for one grant: ask for units, give unused ones back, or end it.

    `request_number` (CC-Request-Number) starts at 1 and rises with each request on the grant; a
    repeat of a number already answered gets the same answer and moves nothing. `requested_msat`
    (Requested-Service-Unit) is what the gateway would like, `minimum_msat` the least it can use (one
    call's maximum cost); `returned_msat` are granted units it will not spend; `final` (a
    TERMINATION_REQUEST) closes the grant, whose units already used settle from the usage stream.
    """

    key_hash: str
    grant_id: str
    gateway_id: str
    request_number: int
    requested_msat: int = 0
    minimum_msat: int = 0
    returned_msat: int = 0
    final: bool = False


class QuotaAnswer(msgspec.Struct, tag="quota_answer", frozen=True):
    """A Credit-Control-Answer: `granted_msat` new units (Granted-Service-Unit) for `validity_time`
    seconds (Validity-Time); `final_unit` (Final-Unit-Indication) when the key cannot grant more than
    this; `balance_msat` is the key's spendable balance outside every grant after this answer."""

    grant_id: str
    granted_msat: int
    balance_msat: int
    validity_time: int
    final_unit: bool = False
    closed: bool = False  # the grant is terminated or expired: start a new one


class CreditControls(msgspec.Struct, tag="credit_controls", frozen=True):
    """Up to MAX_CREDIT_CONTROLS Credit-Control-Requests in one message: a gateway renews every grant
    due in a tick at once, rather than with a round trip each. Each is answered as if sent alone."""

    requests: list[CreditControl]


class QuotaAnswers(msgspec.Struct, tag="quota_answers", frozen=True):
    """The answers to a `CreditControls`, in its order: a `QuotaAnswer`, or the `Error` that request
    alone would have had."""

    answers: list[QuotaAnswer | Error]


MAX_CREDIT_CONTROLS = 256


class RateQuery(msgspec.Struct, tag="rate_query", frozen=True):
    model: str


class Rating(msgspec.Struct, tag="rating", frozen=True):
    """How billing prices `model`: its canonical upstream id, price and completion-token cap."""

    model: str
    price: Price
    max_completion_tokens: int
    routes: tuple[Route, ...] = ()  # as in `Reserved`: where to forward, and each route's price


class GatewayAlive(msgspec.Struct, tag="gateway_alive", frozen=True):
    """A gateway's heartbeat (GATEWAY_ALIVE): `instance` is new at each start; the next comes within
    `every_seconds` (billing waits at least 3 of those before it calls the gateway gone). `calls` are the
    request ids of its X-Cashu calls in flight (None: too many to list); an open reservation of a call not
    listed has lost its caller (`services.billing.liveness`)."""

    instance: str
    every_seconds: float
    calls: tuple[str, ...] | None = None


class Recall(msgspec.Struct, tag="recall", frozen=True):
    """Every gateway holding a grant on `key_hash` gives back its unused units and ends the grant."""

    key_hash: str


class UsageBatch(msgspec.Struct, tag="usage_batch", frozen=True):
    """Calls charged to quota grants, as one message on the usage stream: settled in one transaction."""

    events: tuple[Usage, ...]


# ---- upstream providers ------------------------------------------------------------------------


class Upstream(msgspec.Struct, frozen=True):
    """A provider the gateway may forward to. `api_key` is resolved (never logged, never in an answer)."""

    slug: str
    provider_type: str  # openai | anthropic | openrouter | ollama | vllm | generic
    base_url: str
    api_key: str = ""
    api_version: str | None = None
    priority: int = 0


class Route(msgspec.Struct, frozen=True):
    """One way to serve a model: the provider, the model id it is forwarded as, and its price there."""

    provider: str  # Upstream.slug
    upstream_id: str
    price: Price


class UpstreamsQuery(msgspec.Struct, tag="upstreams_query", frozen=True):
    pass


class Upstreams(msgspec.Struct, tag="upstreams", frozen=True):
    upstreams: tuple[Upstream, ...]
    revision: str = ""


# ---- wallet ----------------------------------------------------------------------------------


class Redeem(msgspec.Struct, tag="redeem", frozen=True):
    token: str
    resume_only: bool = False  # only finish a redemption already under way; never start one (`unknown_token`)


class Redeemed(msgspec.Struct, tag="redeemed", frozen=True):
    token_hash: str  # sha256 hex of the raw token string
    mint_url: str
    amount_msat: int  # face value
    fee_msat: int  # mint input fees paid to swap it
    credited_msat: int  # amount - fee
    already: bool = False  # this token was redeemed before; same answer as then


class Issue(msgspec.Struct, tag="issue", frozen=True):
    """Mint a token worth `amount_msat` (rounded down to whole sats). Idempotent by key."""

    amount_msat: int
    idempotency_key: str
    mint_url: str | None = None


class Issued(msgspec.Struct, tag="issued", frozen=True):
    token: str
    amount_msat: int
    mint_url: str
    fee_msat: int = 0  # mint input fees the node paid to cut this token (an operator expense)
    already: bool = False


class Pay(msgspec.Struct, tag="pay", frozen=True):
    amount_msat: int
    idempotency_key: str
    lightning_address: str


class Paid(msgspec.Struct, tag="paid", frozen=True):
    amount_msat: int
    fee_msat: int
    status: str


class MintQuote(msgspec.Struct, tag="mint_quote", frozen=True):
    amount_msat: int  # whole sats


class MintQuoteCheck(msgspec.Struct, tag="mint_quote_check", frozen=True):
    quote_id: str


class MintQuoteState(msgspec.Struct, tag="mint_quote_state", frozen=True):
    quote_id: str
    bolt11: str
    amount_msat: int
    mint_url: str
    state: str  # pending | paid (minted into the wallet) | expired
    expires_at: int  # unix seconds, 0 when the mint gave none


class PubkeyQuery(msgspec.Struct, tag="pubkey_query", frozen=True):
    pass


class NodePubkey(msgspec.Struct, tag="node_pubkey", frozen=True):
    pubkey: str  # compressed secp256k1 public key, hex: lock tokens to it (NUT-11 P2PK)


class HoldingsQuery(msgspec.Struct, tag="holdings_query", frozen=True):
    pass


class Holdings(msgspec.Struct, tag="holdings", frozen=True):
    unspent_msat: int
    by_mint: dict[str, int]


# ---- admin (the operator's plane) -------------------------------------------------------------

# The gateway forwards each admin API call to billing, which checks the session/CLI token in Postgres,
# so every replica accepts every session. `op` names the operation (services/billing/admin/);
# `token_hash` is the sha256 of the bearer token (the token itself never travels), `password` and
# `new_password` only on login and password change. The answer is the HTTP status and JSON body.
BILLING_ADMIN = "billing.admin"  # AdminCall -> AdminAnswer


class AdminCall(msgspec.Struct, tag="admin_call", frozen=True):
    op: str
    token_hash: str = ""
    body: Any = None
    query: dict[str, str] = {}
    params: dict[str, str] = {}  # path parameters, e.g. {"id": "3"}
    client: str = ""  # the client's address (failed-login rate limit)


class AdminAnswer(msgspec.Struct, tag="admin_answer", frozen=True):
    status: int
    body: Any
    retry_after: int | None = None


# ---- discovery -------------------------------------------------------------------------------


class InfoQuery(msgspec.Struct, tag="info_query", frozen=True):
    pass


class NodeIdentity(msgspec.Struct, tag="node_identity", frozen=True):
    npub: str
    provider_id: str


class IdentitySet(msgspec.Struct, tag="identity_set", frozen=True):
    """Replace the node's Nostr key: `nsec` is `nsec1…` or 64 hex; empty drops the key set this way
    (back to NSEC, else a freshly generated key). Never logged or echoed."""

    nsec: str = ""

    def __repr__(self) -> str:
        return "IdentitySet(nsec=[REDACTED])"


class ProvidersQuery(msgspec.Struct, tag="providers_query", frozen=True):
    pass


class Provider(msgspec.Struct, frozen=True):
    pubkey: str
    d: str
    name: str
    about: str
    urls: tuple[str, ...]
    mints: tuple[str, ...]
    version: str
    last_seen: int


class Providers(msgspec.Struct, tag="providers", frozen=True):
    providers: tuple[Provider, ...]


# ---- operations that end by themselves (design §2 rule 7) -------------------------------------

BILLING_REFUND_STATUS = "billing.refund.status"  # RefundQuery -> Refunded | Error (the key's latest refund)
WALLET_PAYOUT_ABORT = "wallet.payout.abort"  # PayoutAbort -> PayoutOutcome | Error


class RefundQuery(msgspec.Struct, tag="refund_query", frozen=True):
    key_hash: str


class PayoutAbort(msgspec.Struct, tag="payout_abort", frozen=True):
    """Settle a Lightning payout for good: abort it if the mint surely did not pay, else say what it did."""

    idempotency_key: str


class PayoutOutcome(msgspec.Struct, tag="payout_outcome", frozen=True):
    state: str  # "aborted" (nothing paid; the key can never pay now), "paid" or "pending" (in flight)
    fee_msat: int = 0  # for "paid": what the payout cost the node beyond the amount


Message = (
    Error
    | Reserve | Reserved | Usage | Settled | Deposit | KeyQuery | CreateKey | KeyInfo | Refund | Refunded
    | ModelsQuery | Catalog | ReconcileQuery | Reconciliation | InvoiceCreate | InvoiceQuery | InvoiceInfo
    | MintQuote | MintQuoteCheck | MintQuoteState
    | Redeem | Redeemed | Issue | Issued | Pay | Paid | HoldingsQuery | Holdings | PubkeyQuery | NodePubkey
    | InfoQuery | NodeIdentity | ProvidersQuery | Providers | IdentitySet
    | RefundQuery | PayoutAbort | PayoutOutcome
    | CreditControl | QuotaAnswer | CreditControls | QuotaAnswers
    | RateQuery | Rating | Recall | UsageBatch | GatewayAlive
    | AdminCall | AdminAnswer
    | UpstreamsQuery | Upstreams
)  # fmt: skip

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)


# ---- who may say what on the bus ------------------------------------------------------------
# Each service connects as its own NATS user (user name = role name) and the server enforces this
# table (`nats_authorization` writes the server's `authorization` block from it). A request subject's
# first word names the service that answers it (`billing.*` by billing, `wallet.*` by the wallet,
# `discovery.*` by discovery), so a subject added under an existing prefix is answered and permitted
# with no change here: every role listed with that prefix may request it. Add an entry to a role's
# `deny` when it must not, e.g. an operator command under `billing.`; add a new prefix to `ANSWERS`
# and to the roles that call it. `tests/test_security.py` fails for a subject no role may send or
# answer. Replies go to `_INBOX.<role>.…` (each client's `inbox_prefix`), so no role reads another's.


class Role(msgspec.Struct, frozen=True):
    """One NATS user's rights: `requests` and `publishes` are subjects (NATS wildcards allowed) it may
    send to, minus `deny`; `listens` are event subjects it may subscribe to; `jetstream` the
    `$JS.API`/`$JS.ACK` subjects its stream calls use. Answering its `ANSWERS` prefix is implied."""

    requests: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    publishes: tuple[str, ...] = ()
    listens: tuple[str, ...] = ()
    jetstream: tuple[str, ...] = ()


_USAGE_STREAM_ADMIN = (
    f"$JS.API.STREAM.CREATE.{USAGE_STREAM}", f"$JS.API.STREAM.UPDATE.{USAGE_STREAM}",
    f"$JS.API.STREAM.INFO.{USAGE_STREAM}", f"$JS.API.CONSUMER.CREATE.{USAGE_STREAM}.>",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{USAGE_STREAM}.>",
)  # fmt: skip

ANSWERS: dict[str, str] = {"billing": "billing.>", "wallet": "wallet.>", "discovery": "discovery.>"}

ROLES: dict[str, Role] = {
    # Gateways reserve, settle, deposit, refund and read; operator commands are not theirs.
    "gateway": Role(
        requests=("billing.>", "discovery.>", WALLET_PUBKEY),
        deny=(BILLING_CREATE_KEY, BILLING_RECONCILE, DISCOVERY_IDENTITY_SET),
        publishes=(USAGE_SUBJECT, GATEWAY_ALIVE),
        listens=(EVENT_CATALOG_CHANGED, QUOTA_RECALL, EVENT_IDENTITY_CHANGED),
        jetstream=_USAGE_STREAM_ADMIN,
    ),
    # Billing alone asks the wallet to redeem, issue and pay; it consumes the usage stream.
    "billing": Role(
        requests=("wallet.>", DISCOVERY_IDENTITY_SET),  # the admin API's PATCH /admin/api/nsec
        publishes=(EVENT_CATALOG_CHANGED, EVENT_PROVIDERS_CHANGED, QUOTA_RECALL),
        listens=(EVENT_PROVIDERS_CHANGED, GATEWAY_ALIVE),
        jetstream=(
            *_USAGE_STREAM_ADMIN,
            f"$JS.API.CONSUMER.INFO.{USAGE_STREAM}.{USAGE_CONSUMER}",
            f"$JS.API.CONSUMER.MSG.NEXT.{USAGE_STREAM}.{USAGE_CONSUMER}",
            f"$JS.ACK.{USAGE_STREAM}.{USAGE_CONSUMER}.>",
        ),
    ),
    "wallet": Role(),
    "discovery": Role(
        requests=(BILLING_MODELS, WALLET_PUBKEY),
        publishes=(EVENT_IDENTITY_CHANGED,),
        listens=(EVENT_CATALOG_CHANGED, EVENT_IDENTITY_CHANGED),
    ),
    # The operator's commands (`python -m services.billing create-key|reconcile`, a provider change),
    # never the hot path, and never the providers' keys (BILLING_UPSTREAMS).
    "operator": Role(
        requests=("billing.>", WALLET_HOLDINGS, "discovery.>"),
        deny=(
            BILLING_RESERVE,
            BILLING_SETTLE,
            BILLING_DEPOSIT,
            BILLING_REFUND,
            BILLING_UPSTREAMS,
            BILLING_CREDIT_CONTROL,
        ),
        publishes=(EVENT_PROVIDERS_CHANGED,),
    ),
}


def inbox_prefix(role: str) -> str:
    """Where `role`'s replies arrive; only `role` may subscribe under it."""
    return f"_INBOX.{role}"


def nats_permissions(role: str) -> dict[str, Any]:
    """The NATS `permissions` map of `role`: publish and subscribe allow/deny lists, replies allowed.

    Raises KeyError for an unknown role."""
    spec = ROLES[role]
    answers = (ANSWERS[role],) if role in ANSWERS else ()
    # A responder's readiness probe is a request to its own last subject, hence `answers` in publish.
    publish: dict[str, Any] = {"allow": [*spec.requests, *spec.publishes, *spec.jetstream, *answers]}
    if spec.deny:
        publish["deny"] = list(spec.deny)
    subscribe = {"allow": [f"{inbox_prefix(role)}.>", *answers, *spec.listens]}
    return {"publish": publish, "subscribe": subscribe, "allow_responses": True}


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, a trailing `>` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def may_publish(role: str, subject: str) -> bool:
    """Whether the server lets `role` publish on `subject` (allow minus deny), as the table says."""
    rules = nats_permissions(role)["publish"]
    allowed = any(subject_matches(p, subject) for p in rules["allow"])
    return allowed and not any(subject_matches(p, subject) for p in rules.get("deny", ()))


def nats_authorization(passwords: dict[str, str] | None = None, unrestricted: dict[str, str] | None = None) -> str:
    """nats-server's `authorization { users = [...] }` block for every role in `ROLES`.

    `passwords` maps role -> password (a missing role gets `$NATS_<ROLE>_PASSWORD`, a variable the
    server reads from its environment, as in Kubernetes); `unrestricted` adds users with no permission
    limits (test harnesses only). Unauthenticated clients are refused by the block's mere presence."""
    users = []
    for role in ROLES:
        secret = json.dumps(passwords[role]) if passwords and role in passwords else f"$NATS_{role.upper()}_PASSWORD"
        users.append(f"    {{user: {json.dumps(role)}, password: {secret}, permissions: "
                     f"{json.dumps(nats_permissions(role))}}}")  # fmt: skip
    for user, secret in (unrestricted or {}).items():
        users.append(f"    {{user: {json.dumps(user)}, password: {json.dumps(secret)}}}")
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"
