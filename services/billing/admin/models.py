"""Providers and their models for the admin API, on the provider store (`services/billing/providers.py`).

Model answers use routstr-core's Model shape: `{id, name, description, created, context_length,
architecture, pricing, alias_ids, enabled, forwarded_model_id}`, USD per token (or per request/unit).
An edit is stored as the provider's model override (`billing.provider_models`); a partial `pricing`
is merged over the model's current prices, so changing one price never zeroes the others. After a
change this replica rebuilds its catalog and announces it: `events.providers.changed` (other billing
replicas) and `events.catalog.changed` (gateways, discovery).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from services.billing.catalog import Catalog
from services.billing.providers import PRICE_FIELDS, PROVIDER_TYPES, Provider, check_model, parse_provider
from shared import bus
from shared.config import ConfigError

EDITABLE = {"name", "description", "context_length", "architecture", "pricing", "alias_ids", "enabled",
            "forwarded_model_id", "max_completion_tokens"}  # fmt: skip
SHOWN_ONLY = {"id", "created", "disabled_reason", "providers"}
REDACTED = "[REDACTED]"


class Invalid(ValueError):
    """An edit that cannot be applied; the message says which field and why (HTTP 400)."""


class Missing(LookupError):
    """No such provider or model (HTTP 404)."""


class Conflict(ValueError):
    """A provider that would duplicate another (HTTP 409)."""


def from_entry(entry: bus.ModelEntry) -> dict:
    return {
        "id": entry.id, "name": entry.name, "description": "", "created": 0, "context_length": entry.context_length,
        "architecture": entry.architecture, "pricing": dict(entry.usd), "alias_ids": list(entry.aliases),
        "enabled": entry.enabled, "forwarded_model_id": entry.upstream_id if entry.upstream_id != entry.id else None,
        "max_completion_tokens": entry.max_completion_tokens, "disabled_reason": entry.disabled_reason,
        "providers": [route.provider for route in entry.routes],
    }  # fmt: skip


def from_override(override: dict, provider: str) -> dict:
    return {
        "id": override["id"], "name": override.get("name") or override["id"], "description": "", "created": 0,
        "context_length": override.get("context_length"), "architecture": override.get("architecture") or {},
        "pricing": override.get("pricing") or {}, "alias_ids": list(override.get("alias_ids") or []),
        "enabled": override.get("enabled") is not False, "forwarded_model_id": override.get("forwarded_model_id"),
        "max_completion_tokens": override.get("max_completion_tokens"),
        "disabled_reason": "disabled by the operator", "providers": [provider],
    }  # fmt: skip


def validate(changes: Any) -> dict:
    """The override fields (routstr-core's names) of an admin body; raises Invalid naming the field."""
    if not isinstance(changes, dict):
        raise Invalid("Body must be a JSON object")
    unknown = set(changes) - EDITABLE - SHOWN_ONLY
    if unknown:
        raise Invalid(f"Unknown model field(s): {', '.join(sorted(unknown))}")
    out = {k: v for k, v in changes.items() if k in EDITABLE}
    for field in ("name", "description"):
        if field in out and not isinstance(out[field], str):
            raise Invalid(f"{field} must be a string")
    for field in ("context_length", "max_completion_tokens"):
        value = out.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise Invalid(f"{field} must be a positive integer")
        if field in out and value is None:
            del out[field]
    if "architecture" in out and not isinstance(out["architecture"], dict):
        raise Invalid("architecture must be an object")
    if "pricing" in out:
        if not isinstance(out["pricing"], dict):
            raise Invalid("pricing must be an object")
        for name in out["pricing"]:
            if name not in PRICE_FIELDS:
                raise Invalid(f"Unknown price pricing.{name}; known: {', '.join(PRICE_FIELDS)}")
        out["pricing"] = {name: _price(name, value) for name, value in out["pricing"].items()}
    if "alias_ids" in out and (not isinstance(out["alias_ids"], list)
                               or not all(isinstance(a, str) and a for a in out["alias_ids"])):  # fmt: skip
        raise Invalid("alias_ids must be a list of model ids")
    if "enabled" in out and not isinstance(out["enabled"], bool):
        raise Invalid("enabled must be true or false")
    forwarded = out.get("forwarded_model_id")
    if forwarded is not None and (not isinstance(forwarded, str) or not forwarded):
        raise Invalid("forwarded_model_id must be a model id or null")
    return out


def _price(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Invalid(f"pricing.{name} must be a number (USD)")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise Invalid(f"pricing.{name} must be a number (USD), got {value!r}") from None
    if not number.is_finite() or number < 0:
        raise Invalid(f"pricing.{name} must be 0 or more, got {value!r}")
    return str(number)


class Models:
    def __init__(self, catalog: Catalog, nc: NATS):
        self.catalog = catalog
        self.store = catalog.store
        self.nc = nc

    async def changed(self) -> None:
        """Rebuild here, then tell the other billing replicas and every gateway."""
        await self.catalog.refresh()
        await self.nc.publish(bus.EVENT_PROVIDERS_CHANGED, b"admin")
        await self.nc.publish(bus.EVENT_CATALOG_CHANGED, self.catalog.current.revision.encode())

    # ---- providers ---------------------------------------------------------------------------

    async def provider(self, ref: str) -> Provider:
        found = await self.store.get(ref)
        if found is None:
            raise Missing(f"No upstream provider {ref}")
        return found

    async def providers(self) -> list[dict]:
        return [p.redacted() for p in await self.store.list()]

    @staticmethod
    def types() -> list[dict]:
        return [msgspec.to_builtins(t) for t in PROVIDER_TYPES.values()]

    async def create_provider(self, body: Any) -> dict:
        provider, overrides = _parse(body)
        for other in await self.store.list():
            if other.slug == provider.slug:
                raise Conflict(f"A provider with slug {provider.slug} exists")
            if other.base_url == provider.base_url and other.api_key == provider.api_key:
                raise Conflict(f"Provider {other.slug} has the same base_url and api_key")
        stored = await self.store.upsert(provider)
        for model in overrides:
            await self.store.upsert_model(stored.id, model)
        await self.changed()
        return stored.redacted()

    async def update_provider(self, ref: str, body: Any) -> dict:
        current = await self.provider(ref)
        if not isinstance(body, dict):
            raise Invalid("Body must be a JSON object")
        if body.get("slug", current.slug) != current.slug:
            raise Invalid("slug cannot change; create a new provider instead")
        merged = {k: v for k, v in msgspec.to_builtins(current).items() if k not in ("id", "source")}
        merged.update({k: v for k, v in body.items() if k != "id"})
        if merged.get("api_key") == REDACTED:
            merged["api_key"] = current.api_key
        merged["models"] = list(merged["models"]) if merged.get("models") is not None else None
        provider, _ = _parse(merged)
        stored = await self.store.upsert(msgspec.structs.replace(provider, source=current.source))
        await self.changed()
        return stored.redacted()

    async def delete_provider(self, ref: str) -> int:
        deleted = await self.store.delete(ref)
        if deleted is None:
            raise Missing(f"No upstream provider {ref}")
        await self.changed()
        return deleted

    async def provider_models(self, ref: str) -> dict:
        provider = await self.provider(ref)
        return {
            "provider": {"id": provider.id, "provider_type": provider.provider_type, "base_url": provider.base_url},
            "db_models": [from_override(m, provider.slug) for m in await self.store.models(provider.id)],
            "remote_models": self.catalog.listed.get(provider.slug, []),
        }

    # ---- models ------------------------------------------------------------------------------

    async def list(self) -> list[dict]:
        """Every model of the catalog (unsold ones with the reason) and the ones the operator disabled."""
        shown = {e.id: from_entry(e) for e in self.catalog.current.models}
        for provider in await self.store.list():
            for override in await self.store.models(provider.id):
                if override.get("enabled") is False and override["id"] not in shown:
                    shown[override["id"]] = from_override(override, provider.slug)
        return [shown[k] for k in sorted(shown)]

    async def get(self, model_id: str, ref: str | None = None) -> dict:
        if ref is not None:
            provider = await self.provider(ref)
            override = await self.store.get_model(provider.id, model_id)
            entry = next((e for e in self.catalog.current.models if e.id == model_id), None)
            if entry is not None and any(r.provider == provider.slug for r in entry.routes):
                return from_entry(entry)
            if override is not None:
                return from_override(override, provider.slug)
            raise Missing(f"Provider {provider.slug} has no model {model_id}")
        for model in await self.list():
            if model["id"] == model_id:
                return model
        raise Missing(f"No model {model_id}")

    async def _provider_of(self, model_id: str) -> Provider:
        entry = next((e for e in self.catalog.current.models if e.id == model_id), None)
        if entry is not None and entry.routes:
            return await self.provider(entry.routes[0].provider)
        for provider in await self.store.list():
            listed = {m.get("id") for m in self.catalog.listed.get(provider.slug, [])}
            if model_id in listed or await self.store.get_model(provider.id, model_id) is not None:
                return provider
        if entry is not None and len(providers := await self.store.list()) == 1:
            return providers[0]
        raise Missing(f"No provider serves model {model_id}")

    async def save(self, model_id: str, changes: dict, ref: str | None = None, replace: bool = False) -> dict:
        """Merge (or with `replace`, set) a provider's override of `model_id`; raises Invalid or Missing."""
        if not model_id or len(model_id) > 200:
            raise Invalid("Model id must be 1 to 200 characters")
        provider = await self.provider(ref) if ref is not None else await self._provider_of(model_id)
        current = (await self.store.get_model(provider.id, model_id)) or {}
        data = {**({} if replace else current), **changes, "id": model_id}
        if "pricing" in changes and not replace:
            entry = next((e for e in self.catalog.current.models if e.id == model_id), None)
            shown = dict(entry.usd) if entry is not None and entry.enabled else {}
            data["pricing"] = {**shown, **current.get("pricing", {}), **changes["pricing"]}
        try:
            check_model(data, f"model {model_id}")
        except ConfigError as exc:
            raise Invalid(str(exc)) from None
        await self.store.upsert_model(provider.id, data)
        await self.changed()
        return await self.get(model_id)

    async def delete(self, model_id: str, ref: str | None = None) -> None:
        provider = await self.provider(ref) if ref is not None else await self._provider_of(model_id)
        if not await self.store.delete_model(provider.id, model_id):
            raise Missing(f"No override of model {model_id} at provider {provider.slug}")
        await self.changed()


def _parse(body: Any) -> tuple[Provider, list[dict]]:
    try:
        return parse_provider(body, "admin", source="admin")
    except ConfigError as exc:
        raise Invalid(str(exc)) from None
