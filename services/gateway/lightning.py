"""Lightning top-up (`/v2/lightning/*` as the SDK calls it, `/lightning/*` as core serves it, and the legacy
`/v1/balance/lightning/*`): an invoice funds a new key (`create`) or an existing one (`topup`).

The gateway only shapes HTTP: billing asks the wallet for the invoice, and on a status check the wallet
mints the paid ecash and billing credits the key once per invoice. A `create` invoice's key is shown
once, in the first paid status answer, to whoever holds the invoice id; it cannot be shown again.
"""

from __future__ import annotations

from aiohttp import web
from nats.aio.client import Client as NATS

from services.gateway.balance import delegate, json_body
from services.gateway.credentials import CredentialError, credential
from services.gateway.errors import detail_error, from_bus
from shared import bus
from shared.messaging import BusError, request

PREFIXES = ("/v2/lightning", "/lightning", "/v1/balance/lightning")
MAX_SATS = 1_000_000


def _answer(info: bus.InvoiceInfo) -> dict:
    return {
        "invoice_id": info.invoice_id,
        "bolt11": info.bolt11,
        "amount_sats": info.amount_msat // 1000,
        "payment_hash": info.payment_hash,
        "status": info.status,
        "api_key": info.api_key,
        "paid_at": info.paid_at,
        "created_at": info.created_at,
        "expires_at": info.expires_at,
    }


class LightningAPI:
    def __init__(self, nc: NATS):
        self.nc = nc

    async def create(self, request_: web.Request) -> web.Response:
        body = await json_body(request_)
        amount, purpose = body.get("amount_sats"), body.get("purpose", "create")
        if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= MAX_SATS:
            return detail_error(400, f"amount_sats must be a whole number from 1 to {MAX_SATS}")
        if purpose not in ("create", "topup"):
            return detail_error(400, "purpose must be 'create' or 'topup'")
        key_hash = ""
        if purpose == "topup":
            try:
                cred = credential(request_, allow_xcashu=False)
            except CredentialError as exc:
                return detail_error(401, exc.message, exc.code)
            if cred.mode != "sk":
                return detail_error(401, "a topup invoice needs Authorization: Bearer sk-…", "invalid_api_key")
            key_hash = cred.key_hash
        try:
            info = await request(
                self.nc, bus.BILLING_INVOICE_CREATE, bus.InvoiceCreate(amount * 1000, purpose, key_hash),
                bus.InvoiceInfo, bus.MINT_TIMEOUT,
            )  # fmt: skip
        except BusError as exc:
            return from_bus(exc.error, detail=True)
        answer = _answer(info)
        return web.json_response({k: answer[k] for k in ("invoice_id", "bolt11", "amount_sats", "expires_at",
                                                         "payment_hash")})  # fmt: skip

    async def status(self, request_: web.Request) -> web.Response:
        return await self._query(bus.InvoiceQuery(invoice_id=request_.match_info["invoice_id"]))

    async def recover(self, request_: web.Request) -> web.Response:
        invoice = (await json_body(request_)).get("bolt11")
        if not isinstance(invoice, str) or not invoice.strip():
            return detail_error(400, "bolt11 is required")
        return await self._query(bus.InvoiceQuery(bolt11=invoice.strip()))

    async def _query(self, query: bus.InvoiceQuery) -> web.Response:
        try:
            info = await request(self.nc, bus.BILLING_INVOICE_STATUS, query, bus.InvoiceInfo, bus.MINT_TIMEOUT)
        except BusError as exc:
            return from_bus(exc.error, detail=True)
        return web.json_response(_answer(info))


LIGHTNING = web.AppKey("lightning_api", LightningAPI)


def add_routes(app: web.Application) -> None:
    """The same handlers under every prefix clients use."""

    def via(name: str):
        return delegate(LIGHTNING, name)

    for prefix in PREFIXES:
        app.router.add_post(f"{prefix}/invoice", via("create"))
        app.router.add_get(f"{prefix}/invoice/{{invoice_id}}/status", via("status"))
        app.router.add_post(f"{prefix}/recover", via("recover"))
