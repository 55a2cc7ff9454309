"""HTTP client for the Cashu mint API (NUT-01/02 keys, NUT-03 swap, NUT-04 mint, NUT-05 melt, NUT-07
check-state, NUT-09 restore).

The cashu library's client opens a new httpx client on every call (75-110 ms per swap here) and never
closes it, and its `load_mint` swallows errors. This one shares one aiohttp session (kept-alive
connections), bounds every call by a timeout shorter than the bus's, and tells a caller whether a
failed request may have reached the mint: that decides whether a swap can simply be undone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from services.wallet.ecash import BlindedMessage, BlindedSignature, Keyset, Proof, PublicKey
from shared.metrics import WalletMetrics

log = logging.getLogger(__name__)

KEYSETS_TTL = 300.0  # seconds before the keyset list (active flags, fees) is fetched again

# NUT error codes the wallet acts on.
PROOFS_SPENT = 11001
PROOFS_PENDING = 11002
OUTPUTS_SIGNED = 11003


class MintUnavailable(Exception):
    """The mint did not answer. `sent` is False only when the request surely never reached it."""

    def __init__(self, mint_url: str, reason: str, sent: bool):
        super().__init__(f"{mint_url}: {reason}")
        self.sent = sent


class MintError(Exception):
    """The mint answered with an error (`code` is its NUT error code, when it gave one)."""

    def __init__(self, code: int | None, detail: str):
        super().__init__(f"mint error {code}: {detail}")
        self.code = code
        self.detail = detail


class MintClient:
    """One mint: its keysets (cached) and the calls the wallet makes, each counted in metrics."""

    def __init__(self, url: str, session: aiohttp.ClientSession, metrics: WalletMetrics, timeout: float):
        self.url = url
        self._session = session
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0))
        self._keysets: dict[str, Keyset] = {}
        self._keys: dict[str, dict[int, PublicKey]] = {}
        self._loaded_at = 0.0
        self._load_lock = asyncio.Lock()

    async def _call(self, operation: str, method: str, path: str, body: Any = None) -> Any:
        started = time.perf_counter()
        outcome = "error"
        try:
            async with self._session.request(method, f"{self.url}/v1/{path}", json=body, timeout=self._timeout) as resp:
                self._metrics.mint_up.labels(self.url).set(1)
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                if resp.status >= 500 or data is None:
                    raise MintUnavailable(self.url, f"{operation} answered HTTP {resp.status}", sent=True)
                if resp.status != 200 or "detail" in data:
                    outcome = "rejected"
                    raise MintError(data.get("code"), str(data.get("detail", f"HTTP {resp.status}")))
                outcome = "ok"
                return data
        except aiohttp.ClientConnectorError as exc:
            self._metrics.mint_up.labels(self.url).set(0)
            raise MintUnavailable(self.url, f"cannot connect ({exc.__class__.__name__})", sent=False) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._metrics.mint_up.labels(self.url).set(0)
            raise MintUnavailable(self.url, f"{operation} failed ({exc.__class__.__name__})", sent=True) from None
        finally:
            self._metrics.mint_requests.labels(self.url, operation, outcome).inc()
            self._metrics.mint_seconds.labels(operation).observe(time.perf_counter() - started)

    async def keysets(self, refresh: bool = False) -> dict[str, Keyset]:
        """The mint's sat keysets (ids, active flags, fees), fetched with the active ones' keys. Fetched
        once, again after KEYSETS_TTL or on `refresh` (a token naming a keyset we have not seen)."""
        if self._keysets and not refresh and time.monotonic() - self._loaded_at < KEYSETS_TTL:
            return self._keysets
        async with self._load_lock:
            if self._keysets and not refresh and time.monotonic() - self._loaded_at < KEYSETS_TTL:
                return self._keysets
            listing = [
                k for k in (await self._call("keysets", "GET", "keysets")).get("keysets", []) if k.get("unit") == "sat"
            ]
            if any(k.get("active", True) and k["id"] not in self._keys for k in listing):
                for entry in (await self._call("keys", "GET", "keys")).get("keysets", []):
                    self._keys[entry["id"]] = _parse_keys(entry["keys"])
            self._keysets = {
                k["id"]: Keyset(
                    id=k["id"],
                    unit="sat",
                    active=bool(k.get("active", True)),
                    input_fee_ppk=int(k.get("input_fee_ppk") or 0),
                )
                for k in listing
            }
            self._loaded_at = time.monotonic()
            return self._keysets

    async def keys(self, keyset_id: str) -> dict[int, PublicKey]:
        """A keyset's public keys (fetched once: they never change), to unblind its signatures."""
        if keyset_id not in self._keys:
            data = await self._call("keys", "GET", f"keys/{keyset_id}")
            self._keys[keyset_id] = _parse_keys(data["keysets"][0]["keys"])
        return self._keys[keyset_id]

    async def active_keyset(self) -> Keyset:
        """The keyset new outputs go to: the cheapest active sat keyset."""
        active = [k for k in (await self.keysets()).values() if k.active]
        if not active:
            raise MintError(None, "mint has no active sat keyset")
        return min(active, key=lambda k: (k.input_fee_ppk, k.id))

    async def swap(self, inputs: Sequence[Proof], outputs: Sequence[BlindedMessage]) -> list[BlindedSignature]:
        body = {"inputs": _inputs(inputs), "outputs": [{"amount": o.amount, "id": o.id, "B_": o.B_} for o in outputs]}
        data = await self._call("swap", "POST", "swap", body)
        return [BlindedSignature(**s) for s in data.get("signatures", [])]

    async def check_state(self, ys: Sequence[str]) -> dict[str, str]:
        """NUT-07: Y -> UNSPENT | PENDING | SPENT."""
        data = await self._call("checkstate", "POST", "checkstate", {"Ys": list(ys)})
        return {s["Y"]: s["state"] for s in data.get("states", [])}

    async def mint_quote(self, sats: int) -> dict:
        """NUT-04: an invoice that, once paid, lets us mint `sats` (quote, request, state, expiry)."""
        return await self._call("mint_quote", "POST", "mint/quote/bolt11", {"unit": "sat", "amount": sats})

    async def mint_state(self, quote_id: str) -> dict:
        return await self._call("mint_state", "GET", f"mint/quote/bolt11/{quote_id}")

    async def mint(self, quote_id: str, outputs: Sequence[BlindedMessage]) -> list[BlindedSignature]:
        body = {"quote": quote_id, "outputs": [{"amount": o.amount, "id": o.id, "B_": o.B_} for o in outputs]}
        data = await self._call("mint", "POST", "mint/bolt11", body)
        return [BlindedSignature(**s) for s in data.get("signatures", [])]

    async def melt_quote(self, invoice: str) -> dict:
        """NUT-05: a quote to pay `invoice` (amount and fee reserve, in sat)."""
        return await self._call("melt_quote", "POST", "melt/quote/bolt11", {"unit": "sat", "request": invoice})

    async def melt_state(self, quote_id: str) -> dict:
        return await self._call("melt_state", "GET", f"melt/quote/bolt11/{quote_id}")

    async def melt(self, quote_id: str, inputs: Sequence[Proof], outputs: Sequence[BlindedMessage]) -> dict:
        """NUT-05 melt with NUT-08 blank `outputs` for the unused fee reserve."""
        body = {
            "quote": quote_id,
            "inputs": _inputs(inputs),
            "outputs": [{"amount": o.amount, "id": o.id, "B_": o.B_} for o in outputs],
        }
        return await self._call("melt", "POST", "melt/bolt11", body)

    async def restore(self, outputs: Sequence[BlindedMessage]) -> dict[str, BlindedSignature]:
        """NUT-09: the signatures the mint already gave for any of `outputs`, by blinded message."""
        body = {"outputs": [{"amount": o.amount, "id": o.id, "B_": o.B_} for o in outputs]}
        data = await self._call("restore", "POST", "restore", body)
        signatures = data.get("signatures") or data.get("promises") or []
        return {o["B_"]: BlindedSignature(**s) for o, s in zip(data.get("outputs", []), signatures, strict=False)}


def _inputs(proofs: Sequence[Proof]) -> list[dict]:
    """Proofs as NUT-03/05 inputs; a NUT-11 witness (signature unlocking a P2PK lock) when there is one."""
    return [
        {"id": p.id, "amount": p.amount, "secret": p.secret, "C": p.C, **({"witness": p.witness} if p.witness else {})}
        for p in proofs
    ]


def _parse_keys(keys: dict[str, str]) -> dict[int, PublicKey]:
    return {int(amount): PublicKey(bytes.fromhex(point)) for amount, point in keys.items()}


class Mints:
    """A MintClient per mint URL, made on first use and kept (clients and keysets are reused)."""

    def __init__(self, session: aiohttp.ClientSession, metrics: WalletMetrics, timeout: float):
        self._session = session
        self._metrics = metrics
        self._timeout = timeout
        self._clients: dict[str, MintClient] = {}

    def get(self, url: str) -> MintClient:
        url = url.rstrip("/")
        if url not in self._clients:
            self._clients[url] = MintClient(url, self._session, self._metrics, self._timeout)
        return self._clients[url]
