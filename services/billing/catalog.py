"""The model catalog and its prices: the one source of truth for what a call costs.

Models come from the upstream's own `/models` list merged with the operator's models file (prices,
aliases, enable/disable). USD prices become integer-msat `bus.Price`s at the BTC/USD rate (fixed by
BTC_USD_RATE, else fetched live and cached in Postgres) times the operator's margin.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from services.billing.ledger import LedgerError
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
    """Holds the current models and prices; `refresh()` rebuilds them, `resolve()` finds a model by id or alias."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, session: aiohttp.ClientSession):
        self.settings = settings
        self.pool = pool
        self.session = session
        self.file_models = load_models_file(settings.models_path)
        self.upstream_models: list[dict] = []
        self.overrides: list[dict] = []  # the operator's live edits (billing.model_overrides), merged last
        self.btc_usd: Decimal | None = settings.btc_usd_rate
        self.current = bus.Catalog((), "0", settings.fixed_pricing, "")
        self._by_id: dict[str, bus.ModelEntry] = {}
        self.fixed = pricing.fixed_price(
            settings.fixed_cost_per_request, settings.fixed_per_1k_input_tokens, settings.fixed_per_1k_output_tokens
        )

    async def refresh(self) -> bool:
        """Rebuild from the upstream list and the rate; True when anything a client sees changed."""
        await asyncio.gather(self._fetch_upstream(), self._fetch_rate())
        return await self.rebuild()

    async def rebuild(self) -> bool:
        """Rebuild from what is known plus the operator's overrides as stored now (no upstream fetch);
        True when anything a client sees changed. Called after an admin edit and on catalog events."""
        rows = await self.pool.fetch("SELECT data FROM billing.model_overrides ORDER BY model_id")
        self.overrides = [json.loads(row["data"]) for row in rows]
        models = self._build()
        rate = str(self.btc_usd or 0)
        digest = hashlib.sha256(bus.encode(bus.Catalog(models, rate, self.settings.fixed_pricing, ""))).hexdigest()
        changed = digest[:16] != self.current.revision
        self.current = bus.Catalog(models, rate, self.settings.fixed_pricing, digest[:16])
        self._by_id = {}
        for entry in models:
            self._by_id[entry.id] = entry
            for alias in entry.aliases:
                self._by_id.setdefault(alias, entry)
        return changed

    def resolve(self, model: str) -> tuple[str, bus.Price, int]:
        """(upstream model id, price, max completion tokens) for a requested model, or a typed error."""
        entry = self._by_id.get(model)
        if self.settings.fixed_pricing:
            upstream = entry.upstream_id if entry else model
            limit = entry.max_completion_tokens if entry else self.settings.default_max_tokens
            return upstream, self.fixed, limit
        if entry is None:
            if self.btc_usd is None:
                raise _error("pricing_unavailable", "No BTC/USD rate is available to price models yet", 503)
            raise _error("model_not_found", f"Model {model!r} is not offered by this node", 404)
        return entry.upstream_id, entry.price, entry.max_completion_tokens

    # ---- building ------------------------------------------------------------------------

    def merged(self) -> dict[str, dict]:
        """Every model known, disabled ones included: the upstream list, then the models file, then the
        operator's overrides, each layer's fields (and pricing fields) winning over the one before."""
        merged: dict[str, dict] = {}
        for model in self.upstream_models:
            if isinstance(model, dict) and isinstance(model.get("id"), str):
                merged[model["id"]] = dict(model)
        for model in (*self.file_models, *self.overrides):
            base = merged.get(model["id"], {})
            merged[model["id"]] = {**base, **model, "pricing": {**base.get("pricing", {}), **model.get("pricing", {})}}
        return merged

    def priced(self, model: dict) -> bool:
        """Whether a model (as `merged()` gives it) can be sold: it has a price to charge."""
        return self._entry(model) is not None

    def _build(self) -> tuple[bus.ModelEntry, ...]:
        entries = []
        for model in self.merged().values():
            if model.get("enabled") is False:
                continue
            entry = self._entry(model)
            if entry is not None:
                entries.append(entry)
        return tuple(sorted(entries, key=lambda e: e.id))

    def _entry(self, model: dict) -> bus.ModelEntry | None:
        usd = {k: _decimal(v, f"{model['id']} pricing.{k}") for k, v in (model.get("pricing") or {}).items()
               if k in PRICE_FIELDS and v not in (None, "")}  # fmt: skip
        if self.settings.fixed_pricing:
            price = self.fixed
        elif usd and self.btc_usd:
            price = pricing.usd_price(
                usd, self.btc_usd, self.settings.upstream_provider_fee * self.settings.exchange_fee
            )
        else:
            return None  # a model without a price cannot be sold
        if self.settings.fixed_pricing and self.btc_usd:
            usd = _fixed_usd(self.fixed, self.btc_usd)
        context = model.get("context_length") or model.get("top_provider", {}).get("context_length") or 128_000
        limit = (
            model.get("max_completion_tokens")
            or (model.get("top_provider") or {}).get("max_completion_tokens")
            or self.settings.default_max_tokens
        )
        aliases = tuple(model.get("aliases", ()))
        if "/" in model["id"] and model["id"].split("/", 1)[1] not in aliases:
            aliases += (model["id"].split("/", 1)[1],)  # getbased filters on bare ids: claude-… next to anthropic/…
        return bus.ModelEntry(
            id=model["id"], name=model.get("name") or model["id"], upstream_id=model.get("upstream_id") or model["id"],
            context_length=int(context), max_completion_tokens=int(limit),
            architecture={**TEXT, **(model.get("architecture") or {})},
            usd={k: str(v) for k, v in usd.items()}, price=price, aliases=aliases,
        )  # fmt: skip

    async def _fetch_upstream(self) -> None:
        if not self.settings.upstream_base_url:
            return
        headers = (
            {"Authorization": f"Bearer {self.settings.upstream_api_key}"} if self.settings.upstream_api_key else {}
        )
        try:
            async with self.session.get(f"{self.settings.upstream_base_url}/models", headers=headers) as response:
                if response.status == 200:
                    data = await response.json(content_type=None)
                    models = data.get("data") if isinstance(data, dict) else None
                    if isinstance(models, list):
                        self.upstream_models = models
                        return
                log.warning("upstream model list answered %s", response.status)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("upstream model list unavailable: %s", exc.__class__.__name__)

    async def _fetch_rate(self) -> None:
        if self.settings.btc_usd_rate is not None:
            self.btc_usd = self.settings.btc_usd_rate
            return
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
                    return
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, InvalidOperation):
                continue
        cached = await self.pool.fetchval("SELECT value FROM billing.state WHERE name = 'btc_usd'")
        if cached:
            self.btc_usd = Decimal(cached)
        log.warning("no live BTC/USD rate; using %s", "the cached one" if cached else "none (models cannot be priced)")


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
