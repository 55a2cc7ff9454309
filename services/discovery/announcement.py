"""The kind-38421 announcement Routstr clients read, built from settings and the catalog; and its parser for peers.

Pure functions over plain values, so the event's exact shape is unit-tested without a relay.
"""

from __future__ import annotations

import ipaddress
import json
from importlib import metadata
from urllib.parse import urlsplit

import msgspec

from shared import bus, pricing
from shared.config import Settings

KIND = 38421
MAX_MODELS = 300  # keeps the event well under relays' usual 64-128 KiB size limits


def node_version() -> str:
    return metadata.version("routstr-node")


class Announcement(msgspec.Struct, frozen=True):
    """What the node says about itself; two equal announcements need no new event."""

    tags: tuple[tuple[str, ...], ...]
    content: str


def public_urls(settings: Settings) -> tuple[str, ...]:
    return tuple(url for url in (settings.http_url, settings.onion_url) if url)


def is_public_https(url: str) -> bool:
    """What getbased accepts as a node URL: https on a public host (no loopback, RFC 1918 or link-local)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" or host == "localhost" or host.endswith(".local"):
        return False
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return True  # a DNS name


def build(
    settings: Settings, d: str, version: str, catalog: bus.Catalog | None, p2pk_pubkey: str = ""
) -> Announcement | None:
    """The announcement, or None while the node has no public URL (nothing a client could reach).
    `p2pk_pubkey`: the wallet's NUT-11 key (hex), as a `p2pk` tag and in the content, so a client can
    lock the tokens it sends to this node."""
    urls = public_urls(settings)
    if not urls:
        return None
    tags = [("d", d), *(("u", url) for url in urls), *(("mint", mint) for mint in settings.cashu_mints)]
    tags.append(("version", version))
    content: dict = {"name": settings.name, "about": settings.description, "version": version}
    if p2pk_pubkey:
        tags.append(("p2pk", p2pk_pubkey))
        content["p2pk_pubkey"] = p2pk_pubkey
    if settings.cashu_mints:
        content["mints"] = list(settings.cashu_mints)
    if catalog is not None:
        content["models"] = [_model_summary(m) for m in catalog.models if m.enabled][:MAX_MODELS]
    return Announcement(tuple(tags), json.dumps(content, separators=(",", ":"), sort_keys=True))


def _model_summary(model: bus.ModelEntry) -> dict:
    """Sats prices as /v1/models shows them (per token; per request), so a client can compare nodes."""
    return {
        "id": model.id,
        "prompt": pricing.sats_per_token(model.price.prompt_msat_per_m),
        "completion": pricing.sats_per_token(model.price.completion_msat_per_m),
        "request": model.price.request_msat / pricing.MSAT_PER_SAT,
    }


def parse_provider(pubkey: str, created_at: int, tags: list[list[str]], content: str) -> bus.Provider | None:
    """Another node's announcement as a Provider; None when it lacks a `d` tag or any URL."""
    d = next((t[1] for t in tags if len(t) > 1 and t[0] == "d"), "")
    urls = tuple(t[1] for t in tags if len(t) > 1 and t[0] == "u" and t[1])
    if not d or not urls:
        return None
    mints = tuple(t[1].rstrip("/") for t in tags if len(t) > 1 and t[0] == "mint" and t[1])
    version = next((t[1] for t in tags if len(t) > 1 and t[0] == "version"), "")
    try:
        body = json.loads(content) if content else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    name, about = body.get("name", ""), body.get("about", "")
    return bus.Provider(
        pubkey=pubkey,
        d=d,
        name=name if isinstance(name, str) else "",
        about=about if isinstance(about, str) else "",
        urls=urls,
        mints=mints,
        version=version,
        last_seen=created_at,
    )
