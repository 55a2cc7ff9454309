"""Every Prometheus metric the node exports, named in one place (prefix `routstr_`, base units).

Each service builds its own set on a registry it owns (no import-time globals), so several services
can run in one test process. The README's metrics table and the alerts/dashboard use these names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@functools.lru_cache(maxsize=8192)
def child(metric, *labels: str):
    """`metric.labels(*labels)`, memoised for the hot path: prometheus_client validates and locks on
    every `labels()` call, and every label set here is bounded (models through `model_label`)."""
    return metric.labels(*labels)


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        # Bounds every `model` label: the app sets it to map models outside its catalog to "unknown",
        # so a client cannot mint unbounded series.
        self.model_label: Callable[[str], str] = lambda model: "unknown"
        self.requests = Counter(
            "routstr_http_requests_total", "HTTP requests answered by the gateway",
            ["route", "model", "status"], registry=registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "routstr_http_request_duration_seconds", "Time to answer a request (whole stream included)",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.upstream_seconds = Histogram(
            "routstr_upstream_request_duration_seconds", "Upstream call duration",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.upstream_ttfb_seconds = Histogram(
            "routstr_upstream_time_to_first_byte_seconds", "Time until the upstream's first byte",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "routstr_upstream_errors_total", "Upstream calls that failed", ["reason"], registry=registry
        )
        self.streams_in_flight = Gauge(
            "routstr_streams_in_flight", "Streamed responses being sent right now", registry=registry
        )
        self.payments = Counter(
            "routstr_payments_total", "Payment attempts by mode (sk, cashu, xcashu) and outcome",
            ["mode", "outcome"], registry=registry,
        )  # fmt: skip
        self.usage_published = Counter(
            "routstr_usage_events_published_total", "Usage reports handed to billing (settled now or via the stream)",
            ["source"], registry=registry,
        )  # fmt: skip
        # Per upstream provider; `provider` is the operator's slug (a bounded set), never a URL or key.
        self.provider_calls = Counter(
            "routstr_provider_calls_total", "Calls to each upstream provider by outcome (ok, http_429, http_5xx, "
            "connect_error, first_byte_timeout)", ["provider", "outcome"], registry=registry,
        )  # fmt: skip
        self.provider_ttfb_seconds = Histogram(
            "routstr_provider_time_to_first_byte_seconds", "Time until each provider's first byte",
            ["provider"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.provider_failovers = Counter(
            "routstr_provider_failovers_total", "Calls moved on from this provider to the next one",
            ["provider"], registry=registry,
        )  # fmt: skip
        self.provider_cooldowns = Counter(
            "routstr_provider_cooldowns_total", "Times this provider was taken out of routing (circuit opened)",
            ["provider"], registry=registry,
        )  # fmt: skip
        self.provider_up = Gauge(
            "routstr_provider_up", "0 from a provider's failed call until a call to it succeeds again, else 1",
            ["provider"], registry=registry,
        )  # fmt: skip
        # Quota grants (RFC 4006 credit control), refreshed at each grant-maintenance tick, not per call.
        self.quota_grants = Gauge(
            "routstr_quota_grants", "Quota grants this gateway holds: active (new calls spend them) or draining "
            "(recalled or replaced, calls still in flight)", ["state"], registry=registry,
        )  # fmt: skip
        self.quota_available_msat = Gauge(
            "routstr_quota_available_msat", "Msat granted to this gateway's active grants and neither charged nor "
            "held by calls in flight: what new calls can spend without asking billing", registry=registry,
        )  # fmt: skip
        self.quota_requests = Counter(
            "routstr_quota_requests_total", "Credit-Control-Requests sent to billing by type (initial, update, "
            "terminate) and outcome (ok, refused, no_answer)", ["type", "outcome"], registry=registry,
        )  # fmt: skip


class BillingMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.charged_msat = Counter(
            "routstr_charged_msat_total", "Msat charged for inference", ["model"], registry=registry
        )
        self.credited_msat = Counter(
            "routstr_credited_msat_total", "Msat credited to keys from redeemed tokens", registry=registry
        )
        self.refunded_msat = Counter(
            "routstr_refunded_msat_total", "Msat refunded to clients (tokens and Lightning)", registry=registry
        )
        self.settlements = Counter(
            "routstr_settlements_total", "Usage settled, by source (reported, estimated, failed)",
            ["source"], registry=registry,
        )  # fmt: skip
        self.reservations_open = Gauge(
            "routstr_reservations_open", "Reservations held and not yet settled", registry=registry
        )
        self.reservations_expired = Counter(
            "routstr_reservations_expired_total", "Reservations released by the sweeper", registry=registry
        )
        self.usage_pending = Gauge(
            "routstr_usage_events_pending", "Usage events waiting in the stream", registry=registry
        )
        self.settle_lag_seconds = Histogram(
            "routstr_settle_lag_seconds", "Time from a call's end to its settlement",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.owed_msat = Gauge("routstr_balances_owed_msat", "Msat users hold in all keys", registry=registry)
        self.revenue_msat = Gauge("routstr_revenue_msat", "Operator revenue held, in msat", registry=registry)
        self.reconcile_difference_msat = Gauge(
            "routstr_reconcile_difference_msat", "Ledger imbalance found by reconcile; must be 0",
            registry=registry,
        )  # fmt: skip
        self.deposit_intents_open = Gauge(
            "routstr_deposit_intents_open",
            "Deposits begun and not ended (the wallet was asked to redeem; no credit written yet)", registry=registry,
        )  # fmt: skip
        self.pending_oldest_age_seconds = Gauge(
            "routstr_pending_oldest_age_seconds",
            "Age of the oldest money operation not yet final, by operation (deposit: begun, not credited; refund: "
            "debited, not paid out); 0 when none", ["operation"], registry=registry,
        )  # fmt: skip
        self.grants_open = Gauge(
            "routstr_grants_open", "Quota grants open in billing (granted to a gateway, not terminated or expired)",
            registry=registry,
        )  # fmt: skip
        self.grants_held_msat = Gauge(
            "routstr_grants_held_msat", "Msat of keys' balances held by grants: granted to gateways, not yet "
            "settled or given back", registry=registry,
        )  # fmt: skip
        self.grants_expired = Counter(
            "routstr_grants_expired_total", "Grants whose held units billing gave back because their Validity-Time "
            "passed unrenewed (a gateway died or lost billing's answer)", registry=registry,
        )  # fmt: skip
        self.grant_recalls = Counter(
            "routstr_grant_recalls_total", "Recalls of a key's grants (refunds, balance queries) by outcome: "
            "returned (every gateway gave back in time) or timeout", ["outcome"], registry=registry,
        )  # fmt: skip


class WalletMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.mint_requests = Counter(
            "routstr_mint_requests_total", "Calls to mints by operation and outcome",
            ["mint", "operation", "outcome"], registry=registry,
        )  # fmt: skip
        self.mint_seconds = Histogram(
            "routstr_mint_request_duration_seconds", "Mint call duration", ["operation"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.mint_up = Gauge("routstr_mint_up", "1 when the mint answered its last call", ["mint"], registry=registry)
        self.unspent_msat = Gauge(
            "routstr_wallet_unspent_msat", "Unspent ecash the node holds", ["mint"], registry=registry
        )
        self.foreign_swaps = Counter(
            "routstr_foreign_swaps_total", "Tokens of unlisted mints swapped in over Lightning, by outcome",
            ["outcome"], registry=registry,
        )  # fmt: skip


class DiscoveryMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.relay_connected = Gauge(
            "routstr_relay_connected", "1 when the relay is connected", ["relay"], registry=registry
        )
        self.relay_last_publish = Gauge(
            "routstr_relay_last_publish_timestamp_seconds", "When an announcement last reached the relay",
            ["relay"], registry=registry,
        )  # fmt: skip
        self.publishes = Counter(
            "routstr_relay_publish_total", "Announcement publish attempts per relay and outcome",
            ["relay", "outcome"], registry=registry,
        )  # fmt: skip
        self.nodes_seen = Gauge("routstr_nostr_nodes_seen", "Other Routstr nodes seen on the relays", registry=registry)
