"""Where a paid call goes: the providers billing knows (`billing.upstreams`), their circuit breakers, their auth.

Billing's reservation names the model's routes, best first (lower `priority`, then lower price). The
gateway tries them in that order, leaving out a provider that is cooling down: a connect error, no first
byte within UPSTREAM_FIRST_BYTE_TIMEOUT, `429` or `5xx` cools a provider for UPSTREAM_COOLDOWN seconds,
after which the next call probes it (half-open) and a success closes the breaker again. When every
route is cooling, the one whose cool-down ends first is probed at once (a lone provider is never
refused by its own breaker); a model no usable provider serves is refused with `503` + `Retry-After`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from nats.aio.client import Client as NATS

from shared import bus
from shared.messaging import BusError
from shared.messaging import request as ask
from shared.metrics import GatewayMetrics, child
from shared.upstream_auth import auth_headers

log = logging.getLogger(__name__)

UPSTREAMS_TTL = 30.0  # seconds before billing is asked again (a catalog change event refreshes sooner)


class Router:
    """The routing table and one circuit breaker per provider slug."""

    def __init__(self, nc: NATS, metrics: GatewayMetrics, cooldown: float):
        self.nc = nc
        self.metrics = metrics
        self.cooldown = cooldown
        self.upstreams: dict[str, bus.Upstream] = {}
        self.fetched_at = -math.inf
        self.cooling_until: dict[str, float] = {}
        self._lock = asyncio.Lock()

    def stale(self) -> None:
        """Ask billing again on the next call (the providers or the catalog changed)."""
        self.fetched_at = -math.inf

    async def table(self) -> dict[str, bus.Upstream]:
        """slug -> Upstream, cached; the last one kept while billing does not answer."""
        if time.monotonic() - self.fetched_at < UPSTREAMS_TTL:
            return self.upstreams
        async with self._lock:
            if time.monotonic() - self.fetched_at < UPSTREAMS_TTL:
                return self.upstreams
            try:
                found = await ask(self.nc, bus.BILLING_UPSTREAMS, bus.UpstreamsQuery(), bus.Upstreams)
            except BusError as exc:
                if not self.upstreams:
                    raise
                log.warning("billing did not answer for the upstreams (%s); using the last table", exc)
                self.fetched_at = time.monotonic() - UPSTREAMS_TTL / 2
                return self.upstreams
            self.upstreams = {u.slug: u for u in found.upstreams}
            self.fetched_at = time.monotonic()
            for slug in self.upstreams:
                child(self.metrics.provider_up, slug).set(0 if self._cooling(slug) else 1)
            return self.upstreams

    async def candidates(
        self, routes: tuple[bus.Route, ...], provider_type: str | None = None
    ) -> tuple[list[tuple[bus.Upstream, bus.Route]], float]:
        """The routes to try, in order, with their providers: those cooling down left out. Also the seconds
        until the first cooling one is probed again (for `Retry-After` when nothing is left).
        `provider_type` keeps only providers of that type (Anthropic's Messages API)."""
        table = await self.table()
        usable, cooling = [], []
        for route in routes:
            upstream = table.get(route.provider)
            if upstream is None or (provider_type and upstream.provider_type != provider_type):
                continue
            remaining = self.cooling_until.get(upstream.slug, 0) - time.monotonic()
            (cooling if remaining > 0 else usable).append((remaining, upstream, route))
        if not usable and cooling:
            usable = [min(cooling, key=lambda c: c[0])]  # every one is cooling: probe the nearest now
        wait = min((c[0] for c in cooling), default=math.inf)
        return [(upstream, route) for _, upstream, route in usable], wait

    def _cooling(self, slug: str) -> bool:
        return self.cooling_until.get(slug, 0) > time.monotonic()

    def failed(self, upstream: bus.Upstream, reason: str) -> None:
        """A failure before the first byte: count it and cool the provider down."""
        child(self.metrics.provider_calls, upstream.slug, reason).inc()
        if not self._cooling(upstream.slug):
            child(self.metrics.provider_cooldowns, upstream.slug).inc()
            log.warning("provider %s failed (%s); cooling down for %gs", upstream.slug, reason, self.cooldown)
        self.cooling_until[upstream.slug] = time.monotonic() + self.cooldown
        child(self.metrics.provider_up, upstream.slug).set(0)

    def answered(self, upstream: bus.Upstream, seconds: float) -> None:
        """The provider answered (any status but 429/5xx): its breaker closes."""
        child(self.metrics.provider_calls, upstream.slug, "ok").inc()
        child(self.metrics.provider_ttfb_seconds, upstream.slug).observe(seconds)
        self.cooling_until.pop(upstream.slug, None)
        child(self.metrics.provider_up, upstream.slug).set(1)


def headers_for(upstream: bus.Upstream, path: str = "") -> dict[str, str]:
    """The provider's own auth headers (never logged). An OpenAI-shaped call to an Anthropic provider (its
    OpenAI-compatible endpoint) carries the key as a Bearer token too, as the OpenAI SDK sends it there."""
    headers = auth_headers(upstream.provider_type, upstream.api_key, upstream.api_version)
    if upstream.provider_type == "anthropic" and upstream.api_key and path != "/v1/messages":
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    return headers
