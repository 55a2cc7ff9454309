"""Inbound rate limiting per client address and per credential: a token bucket each, so bursts pass
and floods do not.

The limit is per gateway replica and in memory (no shared state on the hot path). `X-Forwarded-For`
counts only when the peer is a trusted proxy (TRUSTED_PROXIES): then the client is the rightmost hop
that is not itself a trusted proxy; every hop left of it is the client's to forge.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import OrderedDict

from aiohttp import web

MAX_CLIENTS = 100_000  # buckets kept; the least recently seen are forgotten first
TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple)  # the app's TRUSTED_PROXIES, as networks


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def networks(cidrs: tuple[str, ...]) -> Networks:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _trusted(address: str, proxies: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(request: web.Request, proxies: Networks = ()) -> str:
    """The client's address: the TCP peer, or, when the peer is a trusted proxy, the rightmost
    `X-Forwarded-For` hop that is not a trusted proxy (MDN's "trusted proxy list" rule)."""
    peer = request.remote or "unknown"
    if not proxies or not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for hop in ",".join(request.headers.getall("X-Forwarded-For", ())).split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer


def credential(request: web.Request) -> str | None:
    """A short hash of the presented API key or Cashu token (Bearer or X-Cashu), None when there is none."""
    auth = request.headers.get("Authorization", "")
    secret = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("X-Cashu", "").strip()
    return hashlib.sha256(secret.encode()).hexdigest()[:32] if secret else None


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
