"""How clients find out what this node sells: `/v1/info`, `/v1/models` and `/v1/providers/`.

The model list is billing's catalog (`billing.models`) rendered in the shape routstr-core and
OpenRouter use. The rendered body is cached per catalog revision and refreshed on
`events.catalog.changed` or after a short TTL, so `/v1/models` (every client's health check) costs
one dict lookup. The sats prices come from the same integer-msat `bus.Price` billing charges with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from services.gateway.errors import openai_error
from services.gateway.payment_request import NODE_KEY
from shared import bus, pricing
from shared.messaging import BusError
from shared.messaging import request as ask
from shared.service import NC, SETTINGS

log = logging.getLogger(__name__)

CATALOG_TTL = 30.0  # seconds a catalog is served before billing is asked again (events refresh it sooner)
IDENTITY_TTL = 300.0  # seconds the node's npub is cached once discovery answered
IDENTITY_RETRY = 10.0  # seconds before asking discovery again after it did not answer
DISCOVERY_TIMEOUT = 1.0  # /v1/info must stay fast even when discovery hangs


class _Cache:
    """Per-app state: the last catalog, its rendered /v1/models body, and the node's npub."""

    def __init__(self) -> None:
        self.catalog: bus.Catalog | None = None
        self.body = b""
        self.entries: dict[str, dict] = {}  # id -> its entry in `body` (`GET /v1/models/{id}`)
        self.fetched_at = -math.inf
        self.first_seen: dict[str, int] = {}  # model id -> unix time first listed (OpenAI's `created`)
        self.lock = asyncio.Lock()
        self.identity: bus.NodeIdentity | None = None
        self.identity_at = -math.inf
        self.refreshing: asyncio.Task | None = None
        self.labelled: bus.Catalog | None = None  # the catalog `model_ids` was taken from
        self.model_ids: frozenset[str] = frozenset()  # its model ids and upstream ids (metric labels)


CACHE = web.AppKey("catalog_cache", _Cache)


def setup(app: web.Application) -> None:
    app[CACHE] = _Cache()
    app.router.add_get("/v1/info", _info)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id:.+}", _model)
    app.router.add_get("/models", _models)
    app.router.add_get("/v1/providers/", _providers)
    app.router.add_get("/v1/providers", _providers)
    app.on_startup.append(_follow_changes)  # runs after cleanup_ctx, so the NATS connection exists


async def _follow_changes(app: web.Application) -> None:
    cache = app[CACHE]

    async def changed(msg) -> None:
        cache.fetched_at = -math.inf

    await app[NC].subscribe(bus.EVENT_CATALOG_CHANGED, cb=changed)

    async def identity_changed(msg) -> None:  # PATCH /admin/api/nsec: /v1/info shows the new npub at once
        cache.identity_at = -math.inf

    await app[NC].subscribe(bus.EVENT_IDENTITY_CHANGED, cb=identity_changed)
    _refresh_soon(app)  # so the first paid call can already show its cost in USD


def _refresh_soon(app: web.Application) -> None:
    """Fetch the catalog in the background (best effort: billing may not be up yet)."""

    async def refresh() -> None:
        try:
            await current_catalog(app)
        except BusError as exc:
            log.info("catalog not fetched yet: %s", exc)

    task = asyncio.ensure_future(refresh())
    app[CACHE].refreshing = task  # keep a reference until it is done


def node_version() -> str:
    return metadata.version("routstr-node")


# ---- /v1/info ----------------------------------------------------------------------------------


async def _identity(app: web.Application) -> bus.NodeIdentity | None:
    """The npub from discovery, cached; None (and a short pause before asking again) when it is down."""
    cache = app[CACHE]
    now = time.monotonic()
    fresh_for = IDENTITY_TTL if cache.identity is not None else IDENTITY_RETRY
    if now - cache.identity_at < fresh_for:
        return cache.identity
    cache.identity_at = now
    try:
        cache.identity = await ask(
            app[NC], bus.DISCOVERY_INFO, bus.InfoQuery(), bus.NodeIdentity, timeout=DISCOVERY_TIMEOUT
        )
    except BusError as exc:
        log.warning("discovery did not say who we are (%s); /v1/info shows no npub", exc)
        cache.identity = None
    return cache.identity


async def _info(request: web.Request) -> web.Response:
    """The node's identity, and the models it sells with their sats prices (as the announcement lists them)."""
    settings = request.app[SETTINGS]
    identity = await _identity(request.app)
    try:
        catalog, _ = await current_catalog(request.app)
        models = {m.id: sats_pricing(m) for m in catalog.models if m.enabled}
    except BusError:
        models = {}  # billing not up yet: the rest of /v1/info still answers
    return web.json_response(
        {
            "name": settings.name,
            "description": settings.description,
            "version": node_version(),
            "npub": identity.npub if identity else "",
            "provider_id": identity.provider_id if identity else "",
            "mints": list(settings.cashu_mints),
            "http_url": settings.http_url,
            "onion_url": settings.onion_url,
            "child_key_cost_msats": 0,
            "p2pk_pubkey": await request.app[NODE_KEY].get() or "",  # NUT-11: lock tokens to the node
            "models": models,
        }
    )


# ---- /v1/models --------------------------------------------------------------------------------


async def current_catalog(app: web.Application) -> tuple[bus.Catalog, bytes]:
    """The catalog and its rendered body: cached, refetched when stale, the stale one kept if billing is down."""
    cache = app[CACHE]
    if time.monotonic() - cache.fetched_at < CATALOG_TTL and cache.catalog is not None:
        return cache.catalog, cache.body
    async with cache.lock:
        if time.monotonic() - cache.fetched_at < CATALOG_TTL and cache.catalog is not None:
            return cache.catalog, cache.body
        try:
            catalog = await ask(app[NC], bus.BILLING_MODELS, bus.ModelsQuery(), bus.Catalog)
        except BusError as exc:
            if cache.catalog is None:
                raise
            log.warning("billing did not answer for the catalog (%s); serving the last one", exc)
            cache.fetched_at = time.monotonic() - CATALOG_TTL / 2  # ask again soon, not on every request
            return cache.catalog, cache.body
        if cache.catalog is None or catalog.revision != cache.catalog.revision:
            now = int(time.time())
            for model in catalog.models:
                cache.first_seen.setdefault(model.id, now)
            data = render_models(catalog, cache.first_seen)
            cache.body = json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()
            cache.entries = {entry["id"]: entry for entry in data}
            cache.catalog = catalog
        cache.fetched_at = time.monotonic()
        return cache.catalog, cache.body


def metric_model(app: web.Application, model: str) -> str:
    """A bounded `model` label: a model of the cached catalog (id or upstream id), "" for none, else "unknown"."""
    if not model:
        return ""
    cache = app[CACHE]
    if cache.catalog is not cache.labelled:  # a new catalog: the set of its ids, for an O(1) look-up per call
        cache.labelled = cache.catalog
        cache.model_ids = frozenset(
            name for entry in (cache.catalog.models if cache.catalog else ()) for name in (entry.id, entry.upstream_id)
        )
    return model if model in cache.model_ids else "unknown"


def usd_per_msat(app: web.Application) -> float | None:
    """The BTC/USD rate of the last catalog, per msat, for showing a call's cost in USD (display only)."""
    cache = app[CACHE]
    if time.monotonic() - cache.fetched_at >= CATALOG_TTL and (cache.refreshing is None or cache.refreshing.done()):
        _refresh_soon(app)
    rate = float(cache.catalog.btc_usd) if cache.catalog is not None else 0.0
    return rate / 100_000_000_000 if rate > 0 else None


async def _models(request: web.Request) -> web.Response:
    try:
        _, body = await current_catalog(request.app)
    except BusError as exc:
        return _catalog_unavailable(exc)
    return web.Response(body=body, content_type="application/json")


def _catalog_unavailable(exc: BusError) -> web.Response:
    return openai_error(503, f"The model catalog is not available right now ({exc.error.message})",
                        "catalog_unavailable", headers={"Retry-After": "1"})  # fmt: skip


async def _model(request: web.Request) -> web.Response:
    """`GET /v1/models/{id}` (the OpenAI SDK's `models.retrieve`): the entry `/v1/models` lists under that
    id (an alias included), free; OpenAI's 404 `model_not_found` for any other id."""
    try:
        await current_catalog(request.app)
    except BusError as exc:
        return _catalog_unavailable(exc)
    wanted = request.match_info["model_id"]
    entry = request.app[CACHE].entries.get(wanted)
    if entry is None:
        return openai_error(404, f"The model `{wanted}` does not exist", "model_not_found")
    return web.json_response(entry)


def sats_pricing(model: bus.ModelEntry) -> dict[str, float]:
    """Sats per token (and sats per request; `max_*` in sats) from the integer-msat price billing charges."""
    price = model.price
    base, max_prompt, _, _ = pricing.cost(price, model.context_length, 0)
    _, _, max_completion, _ = pricing.cost(price, 0, model.max_completion_tokens)
    max_total = pricing.max_cost(price, model.context_length, model.max_completion_tokens)
    completion = pricing.sats_per_token(price.completion_msat_per_m)
    return {
        "prompt": pricing.sats_per_token(price.prompt_msat_per_m),
        "completion": completion,
        "request": base / pricing.MSAT_PER_SAT,
        "image": 0.0,  # not charged separately: images are counted in prompt tokens
        "web_search": 0.0,  # not charged separately
        "internal_reasoning": completion,  # reasoning tokens are billed as completion tokens
        "input_cache_read": pricing.sats_per_token(price.cache_read_msat_per_m),
        "input_cache_write": pricing.sats_per_token(price.cache_write_msat_per_m),
        "max_prompt_cost": max_prompt / pricing.MSAT_PER_SAT,
        "max_completion_cost": max_completion / pricing.MSAT_PER_SAT,
        "max_cost": max_total / pricing.MSAT_PER_SAT,
    }


def usd_pricing(model: bus.ModelEntry, sats: dict[str, float], btc_usd: str) -> dict[str, float]:
    """USD per token as the operator configured it; the `max_*` ceilings converted from sats at the catalog's rate."""
    rate = float(btc_usd) / 100_000_000  # USD per sat
    usd = {key: float(value) for key, value in model.usd.items()}
    for key in ("prompt", "completion", "request", "image", "web_search", "internal_reasoning"):
        usd.setdefault(key, 0.0)
    for key in ("max_prompt_cost", "max_completion_cost", "max_cost"):
        usd[key] = sats[key] * rate
    return usd


_ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "modality": "text->text",
    "input_modalities": ["text"],
    "output_modalities": ["text"],
    "tokenizer": "Other",
    "instruct_type": None,
}


def render_model(model: bus.ModelEntry, btc_usd: str, created: int) -> dict[str, Any]:
    sats = sats_pricing(model)
    return {
        "id": model.id,
        "name": model.name,
        "object": "model",
        "created": created,
        "owned_by": model.upstream_id.split("/", 1)[0] if "/" in model.upstream_id else "routstr",
        "description": model.name,
        "enabled": True,
        "context_length": model.context_length,
        "architecture": {**_ARCHITECTURE_DEFAULTS, **model.architecture},
        "pricing": usd_pricing(model, sats, btc_usd),
        "sats_pricing": sats,
        "per_request_limits": {
            "prompt_tokens": model.context_length,
            "completion_tokens": model.max_completion_tokens,
        },
        "top_provider": {
            "context_length": model.context_length,
            "max_completion_tokens": model.max_completion_tokens,
            "is_moderated": False,
        },
        "alias_ids": list(model.aliases),
    }


def render_models(catalog: bus.Catalog, first_seen: dict[str, int]) -> list[dict[str, Any]]:
    """Enabled models, then each alias as an entry of its own (getbased filters on bare ids like `gpt-4o`)."""
    data: list[dict[str, Any]] = []
    aliases: list[dict[str, Any]] = []
    ids = {model.id for model in catalog.models if model.enabled}
    for model in catalog.models:
        if not model.enabled:
            continue
        entry = render_model(model, catalog.btc_usd, first_seen.get(model.id, 0))
        data.append(entry)
        for alias in model.aliases:
            if alias not in ids:
                aliases.append({**entry, "id": alias, "alias_ids": [], "canonical_slug": model.id})
                ids.add(alias)
    return data + aliases


# ---- /v1/providers/ ----------------------------------------------------------------------------


def _is_onion(url: str) -> bool:
    return (urlsplit(url).hostname or "").endswith(".onion")


def render_provider(provider: bus.Provider) -> dict[str, Any]:
    """One peer in routstr-core's shape; the SDK's fallback reads `endpoint_url` and `onion_url`."""
    clear = [url for url in provider.urls if not _is_onion(url)]
    onion = [url for url in provider.urls if _is_onion(url)]
    return {
        "id": provider.d,
        "pubkey": provider.pubkey,
        "kind": 38421,
        "created_at": provider.last_seen,
        "last_seen": provider.last_seen,
        "endpoint_url": (clear or onion)[0],
        "endpoint_urls": list(provider.urls),
        "onion_url": onion[0] if onion else None,
        "name": provider.name,
        "description": provider.about,
        "mints": list(provider.mints),
        "mint_urls": list(provider.mints),
        "version": provider.version,
    }


async def _providers(request: web.Request) -> web.Response:
    try:
        found = await ask(request.app[NC], bus.DISCOVERY_PROVIDERS, bus.ProvidersQuery(), bus.Providers, timeout=2.0)
    except BusError as exc:
        return openai_error(503, f"Provider discovery is not available right now ({exc.error.message})",
                            "discovery_unavailable", headers={"Retry-After": "5"})  # fmt: skip
    pubkey = request.query.get("pubkey")
    providers = [render_provider(p) for p in found.providers if not pubkey or p.pubkey == pubkey]
    return web.json_response({"providers": providers})
