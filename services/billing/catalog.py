"""The model catalog and its prices: the one source of truth for what a call costs.

Models come from each provider's own model list merged with the operator's models file and per-provider
overrides (prices, aliases, enable/disable, forwarded id). USD prices become integer-msat `bus.Price`s at
the BTC/USD rate (fixed by BTC_USD_RATE, else fetched live and cached in Postgres) times the operator's margin.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from services.billing import price_db
from services.billing.ledger import LedgerError
from services.billing.model_lists import fetch_models
from services.billing.providers import LOCAL_TYPES, Provider, ProviderStore
from shared import bus, pricing
from shared.config import ConfigError, Settings

log = logging.getLogger(__name__)

RATE_SOURCES = (
    ("https://api.kraken.com/0/public/Ticker?pair=XBTUSD", lambda d: d["result"]["XXBTZUSD"]["c"][0]),
    ("https://api.coinbase.com/v2/prices/BTC-USD/spot", lambda d: d["data"]["amount"]),
    ("https://api.binance.com/api/v3/ticker/price?symbol=BTCUSDT", lambda d: d["price"]),
)
PRICE_FIELDS = ("prompt", "completion", "request", "image", "web_search", "internal_reasoning",
                "input_cache_read", "input_cache_write")  # fmt: skip
TEXT = {"modality": "text->text", "input_modalities": ["text"], "output_modalities": ["text"],
        "tokenizer": "Other", "instruct_type": None}  # fmt: skip


def _decimal(value: Any, where: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"MODELS_PATH: {where} is not a number: {value!r}") from None
    if not number.is_finite() or number < 0:
        raise ConfigError(f"MODELS_PATH: {where} must be a non-negative number, got {value!r}")
    return number


def load_models_file(path: str) -> list[dict]:
    """Read and validate the operator's models file; a malformed one stops start-up naming the problem."""
    if not path:
        return []
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"MODELS_PATH: cannot read {path}: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else data
    if not isinstance(models, list):
        raise ConfigError('MODELS_PATH: expected a JSON list of models (or {"models": [...]})')
    for i, model in enumerate(models):
        if not isinstance(model, dict) or not isinstance(model.get("id"), str) or not model["id"]:
            raise ConfigError(f"MODELS_PATH: model #{i} needs a string `id`")
        for field in ("pricing", "architecture"):
            if field in model and not isinstance(model[field], dict):
                raise ConfigError(f"MODELS_PATH: model {model['id']}: `{field}` must be an object")
        for name, value in (model.get("pricing") or {}).items():
            _decimal(value, f"model {model['id']} pricing.{name}")
        aliases = model.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ConfigError(f"MODELS_PATH: model {model['id']}: `aliases` must be a list of strings")
        for field in ("context_length", "max_completion_tokens"):
            if field in model and (not isinstance(model[field], int) or model[field] <= 0):
                raise ConfigError(f"MODELS_PATH: model {model['id']}: `{field}` must be a positive integer")
    return models


class Catalog:
    """Holds the current models, their routes and prices; `refresh()` rebuilds them, `resolve()` finds a model.

    Per model and provider the price is the first that applies: the operator's (per-provider model override
    or MODELS_PATH) -> the provider's own `pricing` in its model list -> the price database (genai-prices'
    data) -> none: listed disabled with the reason, never sold. Local providers (vLLM, Ollama) take only
    the operator's price. FIXED_PRICING prices every route at the FIXED_* prices. A model several providers
    serve gets one route each, best first: lower `priority`, then lower price.
    """

    def __init__(self, settings: Settings, pool: asyncpg.Pool, session: aiohttp.ClientSession,
                 store: ProviderStore, environ: Mapping[str, str]):  # fmt: skip
        self.settings = settings
        self.pool = pool
        self.session = session
        self.store = store
        self.environ = environ
        self.file_models = load_models_file(settings.models_path)
        self.listed: dict[str, list[dict]] = {}  # provider slug -> its last model list
        self.providers: list[Provider] = []
        self.upstreams = bus.Upstreams(())
        self.btc_usd: Decimal | None = settings.btc_usd_rate
        self.current = bus.Catalog((), "0", settings.fixed_pricing, "")
        self._by_id: dict[str, bus.ModelEntry] = {}
        self._usd_priced: set[str] = set()  # ids of models whose price depends on the BTC/USD rate
        self.fixed = pricing.fixed_price(
            settings.fixed_cost_per_request, settings.fixed_per_1k_input_tokens, settings.fixed_per_1k_output_tokens
        )

    async def refresh(self) -> bool:
        """Rebuild from the providers, their model lists and the rate; True when anything a client or gateway sees
        changed."""
        await self._load_providers()
        _, live_rate = await asyncio.gather(self._fetch_lists(), self._fetch_rate())
        models = self._build(await self.store.all_models())
        if not live_rate and self._usd_priced:
            log.warning(
                "no live BTC/USD rate; %d model(s) priced in USD %s", len(self._usd_priced),
                "use the cached rate" if self.btc_usd else "cannot be priced",
            )  # fmt: skip
        rate = str(self.btc_usd or 0)
        digest = hashlib.sha256(
            bus.encode(bus.Catalog(models, rate, self.settings.fixed_pricing, "")) + bus.encode(self.upstreams)
        ).hexdigest()[:16]
        changed = digest != self.current.revision
        self.current = bus.Catalog(models, rate, self.settings.fixed_pricing, digest)
        self.upstreams = bus.Upstreams(self.upstreams.upstreams, digest)
        self._by_id = {}
        for entry in models:
            self._by_id[entry.id] = entry
        for entry in models:
            for alias in entry.aliases:
                self._by_id.setdefault(alias, entry)
        return changed

    def resolve(self, model: str) -> tuple[str, bus.Price, int, tuple[bus.Route, ...]]:
        """(canonical model id, best price, max completion tokens, routes best first) for a requested model.

        Raises LedgerError `model_not_found` (404; also for a listed model that is not sold, with the reason),
        `pricing_unavailable` (503) before a BTC/USD rate is known, `no_upstream` (503) with no provider.
        """
        entry = self._by_id.get(model)
        if entry is None and self.settings.fixed_pricing:
            routes = tuple(bus.Route(p.slug, model, self.fixed) for p in self._routable())
            if not routes:
                raise _error("no_upstream", "No upstream provider is configured or enabled", 503)
            return model, self.fixed, self.settings.default_max_tokens, routes
        if entry is None:
            if self.btc_usd is None:
                raise _error("pricing_unavailable", "No BTC/USD rate is available to price models yet", 503)
            raise _error("model_not_found", f"Model {model!r} is not offered by this node", 404)
        if not entry.enabled:
            raise _error("model_not_found", f"Model {model!r} is not sold by this node: {entry.disabled_reason}", 404)
        return entry.id, entry.price, entry.max_completion_tokens, entry.routes

    def route_prices(self, model: str) -> set[bus.Price]:
        """The prices a call of this (canonical) model may be settled at: one per current route."""
        entry = self._by_id.get(model)
        return {route.price for route in entry.routes} if entry else set()

    # ---- providers and their lists -------------------------------------------------------

    async def _load_providers(self) -> None:
        upstreams = []
        providers = []
        for provider in await self.store.list():
            if not provider.enabled:
                continue
            try:
                key = provider.key(self.environ)
            except ConfigError as exc:
                log.error("%s; the provider is left out", exc)
                continue
            providers.append(provider)
            upstreams.append(bus.Upstream(provider.slug, provider.provider_type, provider.base_url, key,
                                          provider.api_version, provider.priority))  # fmt: skip
        self.providers = providers
        self.upstreams = bus.Upstreams(tuple(upstreams), self.upstreams.revision)

    def _routable(self) -> list[Provider]:
        return sorted(self.providers, key=lambda p: (p.priority, p.slug))

    async def _fetch_lists(self) -> None:
        keys = {u.slug: u.api_key for u in self.upstreams.upstreams}

        async def one(provider: Provider) -> None:
            models = await fetch_models(self.session, provider, keys.get(provider.slug, ""))
            if models is not None:
                self.listed[provider.slug] = models  # else: keep the last list it gave

        await asyncio.gather(*(one(p) for p in self.providers))

    # ---- building ------------------------------------------------------------------------

    def _offers(self, provider: Provider, overrides: list[dict]) -> list[tuple[dict, dict | None]]:
        """(model as listed and overridden, operator pricing or None) for each model this provider sells."""
        listed = {m["id"]: dict(m) for m in self.listed.get(provider.slug, ())}
        operator: dict[str, dict] = {}
        files = {m["id"]: m for m in self.file_models}
        if provider.source == "env":
            for model_id in files:
                listed.setdefault(model_id, {"id": model_id})  # the one-upstream shorthand: the file names models
        for model_id, model in list(listed.items()):
            if model_id in files:
                listed[model_id] = {**model, **files[model_id], "pricing": model.get("pricing", {})}
                if files[model_id].get("pricing"):
                    operator[model_id] = files[model_id]["pricing"]
        for override in overrides:
            base = listed.get(override["id"], {"id": override["id"]})
            listed[override["id"]] = {**base, **override, "pricing": base.get("pricing", {})}
            if override.get("pricing"):
                operator[override["id"]] = override["pricing"]
        if provider.models is not None:
            listed = {i: listed.get(i, {"id": i}) for i in provider.models}
        return [(m, operator.get(i)) for i, m in listed.items() if m.get("enabled") is not False]

    def _usd(self, provider: Provider, model: dict, operator: dict | None) -> tuple[dict[str, Decimal] | None, str]:
        """The USD prices per token by the rule's order, or None and why not."""
        if operator:
            return _usd_fields(operator, model["id"]), ""
        if provider.provider_type in LOCAL_TYPES:
            return None, "a local model is priced by the operator only (models file, admin API or FIXED_PRICING)"
        try:
            published = _usd_fields(model.get("pricing") or {}, model["id"])
        except ConfigError:
            published = {}  # e.g. OpenRouter's "-1" for a variable price
        if any(published.values()):
            return published, ""
        known = price_db.lookup(model["id"], provider.provider_type)
        if known:
            return known, ""
        return None, "no price known: the provider publishes none and the price database has none"

    def _build(self, overrides: dict[int, list[dict]]) -> tuple[bus.ModelEntry, ...]:
        offers: dict[str, list[tuple[Provider, dict, bus.Price | None, dict, str]]] = {}
        self._usd_priced = set()
        for provider in self._routable():
            for model, operator in self._offers(provider, overrides.get(provider.id or 0, [])):
                usd, reason = self._usd(provider, model, operator)
                if usd is not None and not self.settings.fixed_pricing:
                    self._usd_priced.add(model["id"])
                if self.settings.fixed_pricing:
                    price, reason = self.fixed, ""
                elif usd is not None and self.btc_usd:
                    fee = provider.provider_fee or self.settings.upstream_provider_fee
                    price = pricing.usd_price(usd, self.btc_usd, fee * self.settings.exchange_fee)
                else:
                    price, reason = None, reason or "no BTC/USD rate yet"
                offers.setdefault(model["id"], []).append((provider, model, price, usd or {}, reason))
        entries = []
        for model_id, found in offers.items():
            priced = [o for o in found if o[2] is not None]
            priced.sort(key=lambda o: (o[0].priority, pricing.max_cost(o[2], 1000, 1000), o[0].slug))
            if not priced:
                entries.append(self._entry(found[0][1], bus.Price(), {}, (), found[0][4]))
                continue
            routes = tuple(
                bus.Route(p.slug, model.get("forwarded_model_id") or model.get("upstream_id") or model_id, price)
                for p, model, price, _, _ in priced
            )  # fmt: skip
            _, model, price, usd, _ = priced[0]
            aliases = [a for _, m, _, _, _ in found for a in (*m.get("aliases", ()), *m.get("alias_ids", ()))]
            entries.append(self._entry({**model, "aliases": aliases, "alias_ids": []}, price, usd, routes, ""))
        return tuple(sorted(entries, key=lambda e: e.id))

    def _entry(self, model: dict, price: bus.Price, usd: dict[str, Decimal], routes: tuple[bus.Route, ...],
               reason: str) -> bus.ModelEntry:  # fmt: skip
        if self.settings.fixed_pricing and self.btc_usd:
            usd = _fixed_usd(self.fixed, self.btc_usd)
        top = model.get("top_provider") or {}
        context = model.get("context_length") or top.get("context_length") or 128_000
        limit = model.get("max_completion_tokens") or top.get("max_completion_tokens")
        limit = limit or self.settings.default_max_tokens
        aliases = tuple(dict.fromkeys([*model.get("aliases", ()), *model.get("alias_ids", ())]))
        if "/" in model["id"] and model["id"].split("/", 1)[1] not in aliases:
            aliases += (model["id"].split("/", 1)[1],)  # getbased filters on bare ids: claude-… next to anthropic/…
        return bus.ModelEntry(
            id=model["id"], name=model.get("name") or model["id"],
            upstream_id=routes[0].upstream_id if routes else model["id"],
            context_length=int(context), max_completion_tokens=int(limit),
            architecture={**TEXT, **(model.get("architecture") or {})},
            usd={k: str(v) for k, v in usd.items()}, price=price, aliases=aliases,
            enabled=bool(routes), disabled_reason=reason, routes=routes,
        )  # fmt: skip

    async def _fetch_rate(self) -> bool:
        """Set `btc_usd` from BTC_USD_RATE, else the first live source, else the cached rate (or leave it None);
        True unless the live sources all failed."""
        if self.settings.btc_usd_rate is not None:
            self.btc_usd = self.settings.btc_usd_rate
            return True
        for url, pick in RATE_SOURCES:
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
                    rate = Decimal(str(pick(await response.json(content_type=None))))
                if rate > 0:
                    self.btc_usd = rate
                    await self.pool.execute(
                        "INSERT INTO billing.state (name, value) VALUES ('btc_usd', $1)"
                        " ON CONFLICT (name) DO UPDATE SET value = $1, updated_at = now()", str(rate),
                    )  # fmt: skip
                    return True
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, InvalidOperation):
                continue
        cached = await self.pool.fetchval("SELECT value FROM billing.state WHERE name = 'btc_usd'")
        if cached:
            self.btc_usd = Decimal(cached)
        return False


def _usd_fields(prices: Mapping[str, Any], model_id: str) -> dict[str, Decimal]:
    return {k: _decimal(v, f"{model_id} pricing.{k}") for k, v in prices.items()
            if k in PRICE_FIELDS and v not in (None, "")}  # fmt: skip


def _fixed_usd(price: bus.Price, btc_usd: Decimal) -> dict[str, Decimal]:
    """USD per token for display when prices are fixed in sats."""
    per_msat = btc_usd / pricing.MSAT_PER_BTC
    return {
        "prompt": Decimal(price.prompt_msat_per_m) / pricing.PER_MILLION * per_msat,
        "completion": Decimal(price.completion_msat_per_m) / pricing.PER_MILLION * per_msat,
        "request": Decimal(price.request_msat) * per_msat,
    }


def _error(code: str, message: str, status: int) -> LedgerError:
    return LedgerError(bus.Error(code, message, status))
