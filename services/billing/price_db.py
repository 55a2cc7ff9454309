"""The maintained price database: genai-prices' data (services/billing/price_data.json), read offline.

A model id is looked up the way genai-prices does (lower-cased, each provider's match rules, first
model whose rule matches): first at the provider named by a hint (the provider type, or the vendor
prefix of an id like `openai/gpt-4o-mini`), then at every provider whose own rule claims the id.
Prices are USD per million tokens; `usd_per_token()` gives the per-token decimals the catalog uses.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from functools import cache
from pathlib import Path

DATA = Path(__file__).with_name("price_data.json")
PER_MILLION = Decimal(1_000_000)
# Our provider types and OpenRouter-style vendor prefixes -> genai-prices provider ids.
HINTS = {
    "openai": "openai", "anthropic": "anthropic", "openrouter": "openrouter", "google": "google",
    "meta-llama": "meta", "mistralai": "mistral", "deepseek": "deepseek", "x-ai": "x-ai", "cohere": "cohere",
    "moonshotai": "moonshotai", "perplexity": "perplexity", "qwen": "qwen",
}  # fmt: skip
FIELDS = {"input_mtok": "prompt", "output_mtok": "completion", "cache_read_mtok": "input_cache_read",
          "cache_write_mtok": "input_cache_write"}  # fmt: skip


def matches(clause: dict | None, ref: str) -> bool:
    """genai-prices' match clauses: equals, starts_with, ends_with, contains, regex, or, and (ref lower-cased)."""
    if not clause:
        return False
    [(kind, value)] = clause.items()
    if kind == "or":
        return any(matches(c, ref) for c in value)
    if kind == "and":
        return all(matches(c, ref) for c in value)
    if kind == "regex":
        return re.search(value, ref) is not None
    value = value.lower()
    return {
        "equals": ref == value, "starts_with": ref.startswith(value), "ends_with": ref.endswith(value),
        "contains": value in ref,
    }[kind]  # fmt: skip


@cache
def _providers() -> tuple[dict, ...]:
    return tuple(json.loads(DATA.read_text())["providers"])


def source() -> str:
    return json.loads(DATA.read_text())["source"]


def lookup(model_id: str, hint: str = "") -> dict[str, Decimal] | None:
    """USD per token (`prompt`, `completion`, `input_cache_read`, `input_cache_write`, `request`) for a model id,
    or None when the database does not know it. `hint` is a provider type or vendor name tried first."""
    ref = model_id.lower()
    vendor, _, bare = ref.partition("/")
    candidates = [(HINTS.get(hint), ref)]
    if bare:
        candidates += [(HINTS.get(vendor), bare), (HINTS.get(hint), bare)]
    providers = _providers()
    by_id = {p["id"]: p for p in providers}
    for provider_id, name in candidates:
        if provider_id in by_id and (found := _find(by_id[provider_id], name)):
            return found
    for name in (ref, bare) if bare else (ref,):
        for provider in providers:
            if matches(provider["match"], name) and (found := _find(provider, name)):
                return found
    return None


def _find(provider: dict, ref: str) -> dict[str, Decimal] | None:
    for model in provider["models"]:
        if matches(model["match"], ref):
            mtok = model["usd_per_mtok"]
            usd = {FIELDS[k]: Decimal(v) / PER_MILLION for k, v in mtok.items() if k in FIELDS}
            if "requests_kcount" in mtok:
                usd["request"] = Decimal(mtok["requests_kcount"]) / 1000
            return usd
    return None
