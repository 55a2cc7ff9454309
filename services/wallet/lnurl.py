"""LNURL-pay (LUD-06/16): turn a Lightning address and an amount into a bolt11 invoice, safely.

The address comes from a client, so every fetch is guarded against server-side request forgery:
only `https` to a host whose every resolved address is public (no loopback, private, link-local,
multicast, reserved or unspecified address; OWASP SSRF prevention), connected to the very addresses
that were checked (no DNS rebinding), no redirects, the callback on the address's own host, bodies
and times bounded. `allow_loopback` (LNURL_ALLOW_LOOPBACK, development only) lets loopback hosts be
called over plain http. The invoice is checked with the `bolt11` library: exactly the amount asked,
and when it commits to a description hash, that of the service's metadata (LUD-06).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import bolt11
from aiohttp.abc import AbstractResolver, ResolveResult

_ADDRESS = re.compile(r"^([a-z0-9_.+-]+)@([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?$")
_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)
MAX_BODY = 64 * 1024  # bytes of an LNURL answer; real ones are a few hundred

Resolve = Callable[[str, int], Awaitable[list[str]]]  # host, port -> IP addresses


class LnurlError(Exception):
    """The address is malformed or not allowed (`bad_address`: the caller's fault, a 400), or its
    service failed to give a usable invoice."""

    def __init__(self, message: str, bad_address: bool = False):
        super().__init__(message)
        self.bad_address = bad_address


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host:port."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def public_address(address: str, allow_loopback: bool = False) -> bool:
    """Whether an IP address may be called: globally routable unicast, or loopback when allowed.
    IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return allow_loopback
    return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_link_local or ip.is_reserved)


def parse_address(address: str) -> tuple[str, str, int | None]:
    """LUD-16 `user@domain[:port]` -> (user, host, port); raises LnurlError(bad_address)."""
    match = _ADDRESS.match(address.strip().lower())
    if not match:
        raise LnurlError(f"not a Lightning address: {address!r}", bad_address=True)
    user, host, port = match.groups()
    return user, host.strip("[]"), int(port) if port else None


class LnurlClient:
    """Fetches LNURL-pay invoices under the rules of this module's docstring."""

    def __init__(self, allow_loopback: bool = False, resolve: Resolve = system_resolve):
        self.allow_loopback = allow_loopback
        self.resolve = resolve

    async def check_host(self, host: str, port: int) -> list[str]:
        """The addresses of host:port, all of them callable; raises LnurlError(bad_address) otherwise."""
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addresses = await self.resolve(host, port)
            except OSError:
                raise LnurlError(f"{host} does not resolve", bad_address=True) from None
        if not addresses:
            raise LnurlError(f"{host} does not resolve", bad_address=True)
        refused = [a for a in addresses if not public_address(a, self.allow_loopback)]
        if refused:
            raise LnurlError(f"{host} is not a public host ({', '.join(refused)})", bad_address=True)
        return addresses

    async def check_address(self, address: str) -> list[str]:
        """Parse `address` and check its host (see `check_host`); raises LnurlError(bad_address)."""
        _, host, port = parse_address(address)
        return await self.check_host(host, port or 443)

    def _scheme(self, host: str, addresses: list[str]) -> str:
        loopback = all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses)
        return "http" if self.allow_loopback and loopback else "https"

    async def fetch_invoice(self, address: str, amount_msat: int) -> str:
        """A bolt11 invoice for exactly `amount_msat` from `address`'s LNURL-pay service.

        Raises LnurlError: `bad_address` (refused before any connection) for a malformed address, a
        host that is not public, or a callback on another host; otherwise the service failed."""
        user, host, port = parse_address(address)
        addresses = await self.check_host(host, port or 443)  # before any connection
        scheme = self._scheme(host, addresses)
        netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
        params = await self._get_json(f"{scheme}://{netloc}/.well-known/lnurlp/{quote(user)}", host, addresses)
        if not isinstance(params, dict) or params.get("tag") != "payRequest" or "callback" not in params:
            reason = params.get("reason", "no payRequest") if isinstance(params, dict) else "no payRequest"
            raise LnurlError(f"{address} is not an LNURL-pay service ({reason})")
        callback = urlsplit(str(params["callback"]))
        default_port = 443 if scheme == "https" else 80
        if (callback.scheme, callback.hostname, callback.port or default_port) != (scheme, host, port or default_port):
            raise LnurlError(f"{address}: the callback is not on {netloc} over {scheme}", bad_address=True)
        try:
            low, high = int(params.get("minSendable", 1)), int(params.get("maxSendable", 0))
        except (TypeError, ValueError):
            raise LnurlError(f"{address} gave unreadable amount limits") from None
        if not low <= amount_msat <= high:
            raise LnurlError(f"{address} accepts {low}-{high} msat, not {amount_msat}")
        separator = "&" if callback.query else "?"
        answer = await self._get_json(f"{callback.geturl()}{separator}amount={amount_msat}", host, addresses)
        invoice = answer.get("pr") if isinstance(answer, dict) else None
        if not isinstance(invoice, str) or not invoice:
            reason = answer.get("reason") if isinstance(answer, dict) else ""
            raise LnurlError(f"{address} gave no invoice ({reason})")
        check_invoice(invoice, amount_msat, params.get("metadata"), address)
        return invoice

    async def _get_json(self, url: str, host: str, addresses: list[str]) -> Any:
        """GET `url`, connecting only to `addresses` (checked already), no redirects, body ≤ MAX_BODY."""
        connector = aiohttp.TCPConnector(resolver=_Pinned(host, addresses), use_dns_cache=False)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT) as session:
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise LnurlError(f"{urlsplit(url).netloc}: LNURL service answered {resp.status}")
                    body = await resp.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise LnurlError(f"{urlsplit(url).netloc}: LNURL answer larger than {MAX_BODY} bytes")
            return json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LnurlError(f"{urlsplit(url).netloc}: LNURL service failed ({exc.__class__.__name__})") from None


def check_invoice(invoice: str, amount_msat: int, metadata: Any, address: str) -> None:
    """The invoice is for `amount_msat` and, when it commits to a description hash, to sha256 of the
    service's `metadata` string (LUD-06). Raises LnurlError."""
    try:
        decoded = bolt11.decode(invoice)
    except Exception:
        raise LnurlError(f"{address} gave an undecodable invoice") from None
    if decoded.amount_msat != amount_msat:
        raise LnurlError(f"{address} gave an invoice for {decoded.amount_msat} msat instead of {amount_msat}")
    committed = decoded.description_hash
    if committed and (
        not isinstance(metadata, str) or hashlib.sha256(metadata.encode()).hexdigest() != committed.lower()
    ):
        raise LnurlError(f"{address} gave an invoice whose description hash is not its metadata's")


class _Pinned(AbstractResolver):
    """Resolves the one checked host to its checked addresses, and nothing else."""

    def __init__(self, host: str, addresses: list[str]):
        self.host, self.addresses = host, addresses

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        if host.strip("[]") != self.host:
            raise OSError(f"{host} was not checked")
        return [
            ResolveResult(
                hostname=host, host=a, port=port, flags=socket.AI_NUMERICHOST, proto=0,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
            )
            for a in self.addresses
        ]  # fmt: skip

    async def close(self) -> None:
        return None
