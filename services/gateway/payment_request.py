"""NUT-24 for the proxy: an X-Cashu token too small for the call is refused before it is redeemed,
and every 402 tells a wallet what would pay it, as a NUT-18 payment request in the `X-Cashu` header.

The token's face value is read from the token itself (V3 is base64url JSON, V4 base64url CBOR) and
compared with the call's maximum cost, computed with billing's own integer formula from the cached
catalog: a token that cannot cover it is never redeemed, so it stays the client's. The payment
request (`creqA` + base64url CBOR, NUT-18) names the amount in sats, the unit and the node's mints.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import cbor2
from aiohttp import web
from nats.aio.client import Client as NATS

from shared import bus, pricing
from shared.config import Settings
from shared.messaging import BusError
from shared.messaging import request as ask

log = logging.getLogger(__name__)


def token_face_sats(token: str) -> int | None:
    """The sum of a `cashuA`/`cashuB` token's proof amounts, or None when it cannot be read here
    (malformed, not sat): then the wallet decides, as before."""
    try:
        data = token[6:] + "=" * (-len(token[6:]) % 4)
        raw = base64.urlsafe_b64decode(data)
        if token.startswith("cashuA"):
            body = json.loads(raw)
            unit = body.get("unit", "sat")
            amounts = [p["amount"] for entry in body["token"] for p in entry["proofs"]]
        elif token.startswith("cashuB"):
            body = cbor2.loads(raw)
            unit = body.get("u", "sat")
            amounts = [p["a"] for group in body["t"] for p in group["p"]]
        else:
            return None
    except (ValueError, KeyError, TypeError, AttributeError, cbor2.CBORDecodeError):
        return None
    if unit != "sat" or not amounts or not all(isinstance(a, int) and a > 0 for a in amounts):
        return None
    return sum(amounts)


def encode_request(amount_sats: int, mints: Sequence[str], pubkey: str | None = None) -> str:
    """A NUT-18 payment request: `a` amount, `u` unit, `m` accepted mints, and (when the node has a
    key) a NUT-10 P2PK lock `nut10` so the token is useless to anyone who intercepts it."""
    request: dict = {"a": amount_sats, "u": "sat", "m": list(mints)}
    if pubkey:
        request["nut10"] = {"k": "P2PK", "d": pubkey}
    return "creqA" + base64.urlsafe_b64encode(cbor2.dumps(request)).decode().rstrip("=")


class Quoter:
    """The most a call can cost (msat), the way billing reserves it, from the gateway's cached catalog."""

    def __init__(
        self,
        settings: Settings,
        catalog: Callable[[], Awaitable[bus.Catalog]],
        pubkey: Callable[[], Awaitable[str | None]],
    ):
        self._settings = settings
        self._catalog = catalog
        self._pubkey = pubkey
        self._fixed = pricing.fixed_price(
            settings.fixed_cost_per_request, settings.fixed_per_1k_input_tokens, settings.fixed_per_1k_output_tokens
        )

    async def max_cost_msat(self, model: str, prompt_tokens: int, max_tokens: int | None) -> int | None:
        """billing.reserve's amount for this call, or None when the catalog does not say (then no pre-check)."""
        try:
            catalog = await self._catalog()  # cached; fetched from billing only when stale
        except BusError:
            return None
        entry = next((m for m in catalog.models if model == m.id or model in m.aliases), None)
        if entry is not None and entry.enabled:  # held at its dearest route, so failover is covered
            prices, limit = (entry.price, *(r.price for r in entry.routes)), entry.max_completion_tokens
        elif entry is None and catalog.fixed_pricing:
            prices, limit = (self._fixed,), self._settings.default_max_tokens
        else:
            return None
        completion = max_tokens if max_tokens is not None and max_tokens >= 0 else limit
        return max(pricing.max_cost(price, max(prompt_tokens, 0), completion) for price in prices)

    async def header(self, cost_msat: int) -> dict[str, str]:
        """The `X-Cashu` payment request for a call costing `cost_msat` (rounded up to whole sats)."""
        sats = max(1, -(-cost_msat // pricing.MSAT_PER_SAT))
        return {"X-Cashu": encode_request(sats, self._settings.cashu_mints, await self._pubkey())}


class NodeKey:
    """The wallet's NUT-11 public key, asked for once and cached (None while the wallet cannot say)."""

    RETRY_AFTER = 10.0  # seconds before asking again after the wallet did not answer

    def __init__(self, nc: Callable[[], NATS]):
        self._nc = nc
        self._pubkey: str | None = None
        self._asked_at = -math.inf

    async def get(self) -> str | None:
        if self._pubkey is None and time.monotonic() - self._asked_at >= self.RETRY_AFTER:
            self._asked_at = time.monotonic()
            try:
                answer = await ask(self._nc(), bus.WALLET_PUBKEY, bus.PubkeyQuery(), bus.NodePubkey, timeout=1.0)
                self._pubkey = answer.pubkey or None
            except BusError as exc:
                log.info("the wallet did not tell its P2PK key yet: %s", exc.error.code)
        return self._pubkey


NODE_KEY = web.AppKey("node_key", NodeKey)
