"""The operator's model edits (price, enabled, aliases, forwarded id), kept in `billing.model_overrides`.

Admin answers use routstr-core's Model shape: `{id, name, description, created, context_length,
architecture, pricing, alias_ids, enabled, forwarded_model_id}` with USD prices per token (or per
request/unit). Stored overrides use the models file's vocabulary (`aliases`, `upstream_id`), so the
catalog merges them as one more layer over the upstream list and MODELS_PATH.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg

from services.billing.catalog import PRICE_FIELDS, Catalog

EDITABLE = {"name", "description", "context_length", "architecture", "pricing", "alias_ids", "enabled",
            "forwarded_model_id", "max_completion_tokens"}  # fmt: skip


class Invalid(ValueError):
    """A model edit that cannot be applied; the message says which field and why."""


def to_admin(model: dict, overridden: bool, priced: bool) -> dict:
    return {
        "id": model["id"], "name": model.get("name") or model["id"], "description": model.get("description", ""),
        "created": int(model.get("created") or 0), "context_length": model.get("context_length"),
        "architecture": model.get("architecture") or {}, "pricing": model.get("pricing") or {},
        "alias_ids": list(model.get("aliases") or []), "enabled": model.get("enabled") is not False,
        "forwarded_model_id": model.get("upstream_id"), "max_completion_tokens": model.get("max_completion_tokens"),
        "overridden": overridden, "priced": priced,
    }  # fmt: skip


def validate(changes: Any) -> dict:
    """The override fields (models-file vocabulary) for an admin body; raises Invalid."""
    if not isinstance(changes, dict):
        raise Invalid("Body must be a JSON object")
    unknown = set(changes) - EDITABLE - {"id", "created", "overridden", "priced"}
    if unknown:
        raise Invalid(f"Unknown model field(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for field in ("name", "description"):
        if field in changes:
            if not isinstance(changes[field], str):
                raise Invalid(f"{field} must be a string")
            out[field] = changes[field]
    for field in ("context_length", "max_completion_tokens"):
        value = changes.get(field)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise Invalid(f"{field} must be a positive integer")
            out[field] = value
    if "architecture" in changes:
        if not isinstance(changes["architecture"], dict):
            raise Invalid("architecture must be an object")
        out["architecture"] = changes["architecture"]
    if "pricing" in changes:
        pricing = changes["pricing"]
        if not isinstance(pricing, dict):
            raise Invalid("pricing must be an object")
        out["pricing"] = {}
        for name, value in pricing.items():
            if name not in PRICE_FIELDS:
                raise Invalid(f"Unknown price pricing.{name}; known: {', '.join(PRICE_FIELDS)}")
            out["pricing"][name] = _price(name, value)
    if "alias_ids" in changes:
        aliases = changes["alias_ids"]
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise Invalid("alias_ids must be a list of model ids")
        out["aliases"] = aliases
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise Invalid("enabled must be true or false")
        out["enabled"] = changes["enabled"]
    if "forwarded_model_id" in changes:
        forwarded = changes["forwarded_model_id"]
        if forwarded is not None and (not isinstance(forwarded, str) or not forwarded):
            raise Invalid("forwarded_model_id must be a model id or null")
        out["upstream_id"] = forwarded
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
    def __init__(self, pool: asyncpg.Pool, catalog: Catalog):
        self.pool = pool
        self.catalog = catalog

    def _overridden(self) -> set[str]:
        return {o["id"] for o in self.catalog.overrides}

    def list(self) -> list[dict]:
        overridden = self._overridden()
        return [to_admin(m, m["id"] in overridden, self.catalog.priced(m))
                for m in sorted(self.catalog.merged().values(), key=lambda m: m["id"])]  # fmt: skip

    def get(self, model_id: str) -> dict | None:
        model = self.catalog.merged().get(model_id)
        return None if model is None else to_admin(model, model_id in self._overridden(), self.catalog.priced(model))

    def overrides(self) -> list[dict]:
        return [to_admin(o, True, self.catalog.priced(o)) for o in self.catalog.overrides]

    async def save(self, model_id: str, changes: dict, replace: bool = False) -> dict:
        """Merge (or with `replace`, set) the override of `model_id`; rebuild the catalog. Raises Invalid."""
        if not model_id or len(model_id) > 200:
            raise Invalid("Model id must be 1 to 200 characters")
        current = {o["id"]: o for o in self.catalog.overrides}.get(model_id, {})
        data = {"id": model_id, **({} if replace else current), **changes}
        if not replace and "pricing" in changes:
            data["pricing"] = {**current.get("pricing", {}), **changes["pricing"]}
        if not self.catalog.priced({**self.catalog.merged().get(model_id, {}), **data}) and data.get("enabled", True):
            if "pricing" in changes or model_id not in self.catalog.merged():
                raise Invalid(f"Model {model_id} has no price to charge: set pricing.prompt/completion/request")
        await self.pool.execute(
            "INSERT INTO billing.model_overrides (model_id, data) VALUES ($1, $2)"
            " ON CONFLICT (model_id) DO UPDATE SET data = $2, updated_at = now()",
            model_id, json.dumps(data),
        )  # fmt: skip
        await self.catalog.rebuild()
        return self.get(model_id)

    async def delete(self, model_id: str) -> bool:
        """Drop the operator's override (the model falls back to the upstream list and models file)."""
        done = await self.pool.fetchval("DELETE FROM billing.model_overrides WHERE model_id = $1 RETURNING 1", model_id)
        await self.catalog.rebuild()
        return bool(done)
