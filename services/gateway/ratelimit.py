"""Inbound rate limiting per client address: a token bucket each, so bursts pass and floods do not.

The limit is per gateway replica and in memory (no shared state on the hot path). Behind a reverse
proxy the client is the last `X-Forwarded-For` hop, the one our own proxy added; earlier hops are
the client's to forge.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from aiohttp import web

MAX_CLIENTS = 100_000  # buckets kept; the least recently seen are forgotten first


def client_address(request: web.Request) -> str:
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()
    return request.remote or "unknown"


class RateLimiter:
    def __init__(self, per_minute: int):
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = float(max(per_minute, 1))
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, updated)

    def retry_after(self, address: str) -> int:
        """0 when the request may pass (and it is counted), else the seconds until it may."""
        now = time.monotonic()
        tokens, updated = self.buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        allowed = tokens >= 1
        self.buckets[address] = (tokens - 1 if allowed else tokens, now)
        if len(self.buckets) > MAX_CLIENTS:
            self.buckets.popitem(last=False)
        return 0 if allowed else max(1, int((1 - tokens) / self.rate + 0.999))
