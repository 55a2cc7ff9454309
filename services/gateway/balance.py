"""The balance API (`/v1/balance/*`, and the same handlers under the older `/v1/wallet/*`).

Errors here use FastAPI's `{"detail": "..."}` shape, with the exact strings clients match on.
"""

from __future__ import annotations

import json

from aiohttp import web

from services.gateway import multi_mint
from services.gateway.billing_client import BillingClient
from services.gateway.credentials import (
    Credential,
    CredentialError,
    credential,
    from_token,
    normalise_token,
)
from services.gateway.errors import detail_error, from_bus
from shared import bus
from shared.messaging import BusError

PREFIXES = ("/v1/balance", "/v1/wallet")


async def json_body(request: web.Request) -> dict:
    """The JSON object body, `{}` when there is none; a client's malformed body is a 400, never a 500."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        raise web.HTTPBadRequest(text=json.dumps({"detail": "Request body is not valid JSON"}),
                                 content_type="application/json") from None  # fmt: skip
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"detail": "Request body must be a JSON object"}),
                                 content_type="application/json")  # fmt: skip
    return body


def _info_body(cred: Credential, info: bus.KeyInfo) -> dict:
    body = {
        "api_key": cred.api_key,
        "balance": info.balance_msat,
        "reserved": info.reserved_msat,
        "total_requests": info.total_requests,
        "total_spent": info.total_spent_msat,
    }
    if info.refundable_msat is not None:  # an extra field: the part of `balance` a refund pays (msat)
        body["refundable"] = info.refundable_msat
    return body


class BalanceAPI:
    def __init__(self, billing: BillingClient):
        self.billing = billing

    async def create(self, request: web.Request) -> web.Response:
        """Turn a token into a balance key `sk-` + sha256(token); a retry returns the same key and balance."""
        raw = request.query.get("initial_balance_token")
        if raw is None and request.method == "POST":
            raw = (await json_body(request)).get("initial_balance_token")
        if not isinstance(raw, str) or not raw.strip():
            return detail_error(400, "initial_balance_token is required")
        try:
            cred = from_token(normalise_token(raw), "cashu")
            info = await self.billing.deposit(cred.key_hash, cred.token, create=True)
        except CredentialError as exc:
            return detail_error(exc.status, exc.message, exc.code)
        except BusError as exc:
            return from_bus(exc.error, detail=True)
        return web.json_response({"api_key": cred.api_key, "balance": info.balance_msat})

    async def info(self, request: web.Request) -> web.Response:
        """Balance of a key; a token as the Bearer creates its account first (pyRoutstr's "get credits")."""
        try:
            cred = credential(request, allow_xcashu=False)
            await self.billing.ensure_account(cred)
            info = await self.billing.key_info(cred.key_hash)
        except CredentialError as exc:
            return detail_error(exc.status, exc.message, exc.code)
        except BusError as exc:
            return from_bus(exc.error, detail=True)
        return web.json_response(_info_body(cred, info))

    async def topup(self, request: web.Request) -> web.Response:
        """Credit a token to an existing key (JSON `cashu_token`, or `?cashu_token=`); never creates a key."""
        raw = request.query.get("cashu_token")
        if raw is None:
            raw = (await json_body(request)).get("cashu_token")
        if not isinstance(raw, str) or not raw.strip():
            return detail_error(400, "cashu_token is required")
        try:
            cred = credential(request, allow_xcashu=False)
            await self.billing.ensure_account(cred)
            token = normalise_token(raw)
            info = await self.billing.deposit(cred.key_hash, token, create=False)
        except CredentialError as exc:
            return detail_error(exc.status, exc.message, exc.code)
        except BusError as exc:
            return from_bus(exc.error, detail=True)
        return web.json_response({"msats": info.credited_msat, "balance": info.balance_msat})

    async def refund(self, request: web.Request) -> web.Response:
        """Pay out the remaining balance as a token (or to a Lightning address); a retry replays it."""
        body = await json_body(request)
        address = body.get("lightning_address")
        if address is not None and (not isinstance(address, str) or "@" not in address):
            return detail_error(400, "lightning_address must look like name@domain")
        mint_url = body.get("mint_url", body.get("mint"))
        if mint_url is not None and (not isinstance(mint_url, str) or not mint_url.startswith(("http://", "https://"))):
            return detail_error(400, "mint_url must be the http(s) URL of one of the node's mints")
        xcashu = "X-Cashu" in request.headers
        try:
            cred = credential(request, allow_xcashu=True)
        except CredentialError as exc:
            return detail_error(exc.status, exc.message, exc.code)
        try:
            if cred.mode == "cashu":
                await self.billing.ensure_account(cred)
            refunded = await self._refund(cred, address, mint_url.rstrip("/") if mint_url else None)
        except BusError as exc:
            if xcashu and exc.error.code in ("unknown_key", "unknown_token"):
                return detail_error(404, "Unknown payment token: it was never received by this node", "unknown_token")
            return from_bus(exc.error, detail=True)
        sats = refunded.amount_msat // 1000
        if refunded.token is None:
            return web.json_response({
                "refund_id": refunded.refund_id, "status": refunded.status, "recipient": refunded.recipient,
                "sats": str(sats), "msats": str(refunded.amount_msat),
            })  # fmt: skip
        headers = {"X-Cashu": refunded.token} if xcashu else {}
        answer = {
            "token": refunded.token, "cashu_token": refunded.token, "refund_id": refunded.refund_id,
            "sats": str(sats), "msats": str(refunded.amount_msat), "api_key": cred.api_key,
        }  # fmt: skip
        parts = multi_mint.per_mint(refunded.token)
        if parts:  # cut from several mints: one V3 token holding all, and each mint's part on its own
            answer["tokens"] = parts
        return web.json_response(answer, headers=headers)

    async def _refund(self, cred: Credential, address: str | None, mint_url: str | None) -> bus.Refunded:
        """Refund the key; for an X-Cashu payment billing has no record of (the call failed while the mint,
        the wallet or billing was down), first finish crediting it if the wallet took the token's proofs:
        the wallet then knows the token (`resume_only`), and a token it never took stays `unknown_token`."""
        try:
            return await self.billing.refund(cred.key_hash, address, mint_url)
        except BusError as exc:
            if cred.mode != "xcashu" or exc.error.code != "unknown_key" or cred.token is None:
                raise
        await self.billing.deposit(cred.key_hash, cred.token, create=True, resume_only=True)
        return await self.billing.refund(cred.key_hash, address, mint_url)

    async def refund_status(self, request: web.Request) -> web.Response:
        """`GET …/refund`: the key's latest refund and its state, so a client can see how a refund or an
        X-Cashu call's change ended: `pending` (it ends by itself), `paid` (the token is here, or the
        Lightning payment went out) or `failed` (the amount is back on the balance: refund again)."""
        try:
            cred = credential(request, allow_xcashu=True)
            refunded = await self.billing.refund_status(cred.key_hash)
        except CredentialError as exc:
            return detail_error(exc.status, exc.message, exc.code)
        except BusError as exc:
            return from_bus(exc.error, detail=True)
        body = {
            "refund_id": refunded.refund_id, "status": refunded.status, "recipient": refunded.recipient,
            "sats": str(refunded.amount_msat // 1000), "msats": str(refunded.amount_msat),
        }  # fmt: skip
        if refunded.token:
            body["token"] = refunded.token
        return web.json_response(body)


BALANCE = web.AppKey("balance_api", BalanceAPI)


def delegate(key: web.AppKey, name: str):
    """A route handler calling method `name` of the API object at `app[key]`, which is made at start-up
    (it needs NATS) after the router is already frozen."""

    async def handler(request: web.Request) -> web.Response:
        return await getattr(request.app[key], name)(request)

    return handler


def add_routes(app: web.Application) -> None:
    """Mount the same handlers under both prefixes."""

    def via(name: str):
        return delegate(BALANCE, name)

    for prefix in PREFIXES:
        app.router.add_get(f"{prefix}/create", via("create"))
        app.router.add_post(f"{prefix}/create", via("create"))
        app.router.add_get(f"{prefix}/info", via("info"))
        app.router.add_get(f"{prefix}/", via("info"))
        app.router.add_get(prefix, via("info"))
        app.router.add_post(f"{prefix}/topup", via("topup"))
        app.router.add_post(f"{prefix}/refund", via("refund"))
        app.router.add_get(f"{prefix}/refund", via("refund_status"))
