"""LNURL-pay (LUD-06/16): turn a Lightning address and an amount into a bolt11 invoice."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import quote

import aiohttp
import bolt11

_ADDRESS = re.compile(r"^([a-z0-9_.+-]+)@([a-z0-9.-]+(?::\d{1,5})?)$")
_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)


class LnurlError(Exception):
    """The address is malformed (`bad_address`) or its service failed to give a usable invoice."""

    def __init__(self, message: str, bad_address: bool = False):
        super().__init__(message)
        self.bad_address = bad_address


def address_url(address: str) -> str:
    """LUD-16: user@domain -> https://domain/.well-known/lnurlp/user (http only for loopback and .onion)."""
    match = _ADDRESS.match(address.strip().lower())
    if not match:
        raise LnurlError(f"not a Lightning address: {address!r}", bad_address=True)
    user, domain = match.groups()
    host = domain.rsplit(":", 1)[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    scheme = "http" if loopback or host.endswith(".onion") else "https"
    return f"{scheme}://{domain}/.well-known/lnurlp/{quote(user)}"


async def fetch_invoice(session: aiohttp.ClientSession, address: str, amount_msat: int) -> str:
    """Ask the address's LNURL service for an invoice of exactly `amount_msat`."""
    url = address_url(address)
    try:
        async with session.get(url, timeout=_TIMEOUT) as resp:
            params = await resp.json(content_type=None)
        if not isinstance(params, dict) or params.get("tag") != "payRequest" or "callback" not in params:
            raise LnurlError(f"{address} is not an LNURL-pay service ({params.get('reason', 'no payRequest')})")
        low, high = int(params.get("minSendable", 1)), int(params.get("maxSendable", 0))
        if not low <= amount_msat <= high:
            raise LnurlError(f"{address} accepts {low}-{high} msat, not {amount_msat}")
        separator = "&" if "?" in params["callback"] else "?"
        async with session.get(f"{params['callback']}{separator}amount={amount_msat}", timeout=_TIMEOUT) as resp:
            answer = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise LnurlError(f"{address}: LNURL service failed ({exc.__class__.__name__})") from None
    invoice = answer.get("pr") if isinstance(answer, dict) else None
    if not invoice:
        raise LnurlError(f"{address} gave no invoice ({answer.get('reason') if isinstance(answer, dict) else ''})")
    try:
        invoiced = bolt11.decode(invoice).amount_msat
    except Exception:
        raise LnurlError(f"{address} gave an undecodable invoice") from None
    if invoiced != amount_msat:
        raise LnurlError(f"{address} gave an invoice for {invoiced} msat instead of {amount_msat}")
    return invoice
