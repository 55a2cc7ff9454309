"""Upstream providers: their validation, the declarative providers file, and the store in Postgres.

Field names are routstr-core's (`slug`, `provider_type`, `base_url`, `api_key`, `api_version`,
`provider_fee`, `enabled`, `provider_settings`) plus `priority` (lower is tried first), `api_key_env`
(the name of an environment variable holding the key, so files and Helm values carry no secret) and
`models` (only these ids are sold; each may be a bare id or a Model object overriding what the
provider lists: `pricing`, `alias_ids`, `forwarded_model_id`, `enabled`, `context_length`, ...).

Sources, by `source` column: `file` (PROVIDERS_PATH, re-applied at every start: rows it no longer
names are removed), `env` (the UPSTREAM_BASE_URL / UPSTREAM_API_KEY one-provider shorthand) and
`admin` (the admin API). After any change, publish `bus.EVENT_PROVIDERS_CHANGED` so billing
rebuilds its catalog and gateways reload their routes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import yaml

from shared.config import ConfigError, Settings
from shared.secretbox import SecretBox


class ProviderType(msgspec.Struct, frozen=True):
    id: str
    name: str
    default_base_url: str
    fixed_base_url: bool = False  # we let every base URL be changed (proxies, Azure, tests)


PROVIDER_TYPES: dict[str, ProviderType] = {
    t.id: t
    for t in (
        ProviderType("openai", "OpenAI", "https://api.openai.com/v1"),
        ProviderType("anthropic", "Anthropic", "https://api.anthropic.com/v1"),
        ProviderType("openrouter", "OpenRouter", "https://openrouter.ai/api/v1"),
        ProviderType("ollama", "Ollama", "http://127.0.0.1:11434/v1"),
        ProviderType("vllm", "vLLM", "http://127.0.0.1:8000/v1"),
        ProviderType("generic", "OpenAI-compatible", ""),
    )
}
LOCAL_TYPES = frozenset({"ollama", "vllm"})  # the operator's own hardware: priced by the operator only
KEYED_TYPES = frozenset({"openai", "anthropic", "openrouter"})  # these refuse calls without a key
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Provider(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream provider as stored. `api_key` may be empty when `api_key_env` names the key."""

    slug: str
    provider_type: str
    base_url: str
    api_key: str = ""
    api_key_env: str = ""
    api_version: str | None = None
    provider_fee: Decimal | None = None  # multiplier on USD prices; None = UPSTREAM_PROVIDER_FEE
    priority: int = 0
    enabled: bool = True
    models: tuple[str, ...] | None = None  # allow-list of model ids; None = everything it lists
    provider_settings: dict[str, Any] = {}
    id: int | None = None
    source: str = "admin"

    def key(self, environ: Mapping[str, str]) -> str:
        """The key to send upstream: `api_key`, else the value of `api_key_env` (ConfigError when unset)."""
        if self.api_key or not self.api_key_env:
            return self.api_key
        value = environ.get(self.api_key_env, "").strip()
        if not value:
            raise ConfigError(f"provider {self.slug}: api_key_env: environment variable {self.api_key_env} is not set")
        return value

    def redacted(self) -> dict[str, Any]:
        """The provider as answers show it: every key replaced by "[REDACTED]" (admin-contract.md)."""
        shown = msgspec.to_builtins(self)
        shown["api_key"] = "[REDACTED]" if self.api_key else ""
        shown["provider_fee"] = float(self.provider_fee) if self.provider_fee is not None else None
        return shown


def parse_provider(raw: Any, where: str, source: str = "admin") -> tuple[Provider, list[dict]]:
    """Validate one provider (a mapping in routstr-core's field names) into a `Provider` and its model overrides.

    `where` prefixes every error (e.g. "PROVIDERS_PATH" or "admin"); errors name the provider and the
    field: `ConfigError("PROVIDERS_PATH: provider openai: base_url: expected an http(s) URL, got 'x'")`.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a provider must be a mapping of fields, got {type(raw).__name__}")
    kind = raw.get("provider_type")
    slug = raw.get("slug") or (kind if isinstance(kind, str) else "")
    name = f"{where}: provider {slug or '?'}"
    if not isinstance(slug, str) or not _SLUG.match(slug):
        raise ConfigError(f"{name}: slug: expected lower-case letters, digits, - or _ (at most 63), got {slug!r}")
    if kind not in PROVIDER_TYPES:
        raise ConfigError(f"{name}: provider_type: expected one of {', '.join(PROVIDER_TYPES)}, got {kind!r}")
    base_url = raw.get("base_url") or PROVIDER_TYPES[kind].default_base_url
    parts = urlsplit(base_url) if isinstance(base_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: base_url: expected an http(s) URL, got {base_url!r}")
    api_key, api_key_env = raw.get("api_key") or "", raw.get("api_key_env") or ""
    if not isinstance(api_key, str):
        raise ConfigError(f"{name}: api_key: expected a string")
    if not isinstance(api_key_env, str) or (api_key_env and not _ENV_NAME.match(api_key_env)):
        raise ConfigError(f"{name}: api_key_env: expected an environment variable name, got {api_key_env!r}")
    if api_key and api_key_env:
        raise ConfigError(f"{name}: api_key and api_key_env: give one of them, not both")
    if kind in KEYED_TYPES and not api_key and not api_key_env:
        raise ConfigError(f"{name}: api_key: required for provider_type {kind} (or name it with api_key_env)")
    fee = raw.get("provider_fee")
    if fee is not None:
        try:
            fee = Decimal(str(fee))
        except InvalidOperation:
            fee = Decimal(-1)
        if not fee.is_finite() or fee <= 0 or isinstance(raw.get("provider_fee"), bool):
            got = raw["provider_fee"]
            raise ConfigError(f"{name}: provider_fee: expected a positive multiplier such as 1.05, got {got!r}")
    priority = raw.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigError(f"{name}: priority: expected a whole number (lower is tried first), got {priority!r}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{name}: enabled: expected true or false, got {enabled!r}")
    version = raw.get("api_version")
    if version is not None and not isinstance(version, str):
        raise ConfigError(f"{name}: api_version: expected a string, got {version!r}")
    settings = raw.get("provider_settings") or {}
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{name}: provider_settings: expected a mapping")
    ids, overrides = _models(raw.get("models"), name)
    unknown = set(raw) - {
        "slug", "provider_type", "base_url", "api_key", "api_key_env", "api_version", "provider_fee", "priority",
        "enabled", "models", "provider_settings", "id",
    }  # fmt: skip
    if unknown:
        raise ConfigError(f"{name}: {sorted(unknown)[0]}: not a provider field")
    provider = Provider(
        slug=slug, provider_type=kind, base_url=base_url.rstrip("/"), api_key=api_key, api_key_env=api_key_env,
        api_version=version, provider_fee=fee, priority=priority, enabled=enabled, models=ids,
        provider_settings=dict(settings), source=source,
    )  # fmt: skip
    return provider, overrides


def _models(raw: Any, name: str) -> tuple[tuple[str, ...] | None, list[dict]]:
    if raw is None:
        return None, []
    if not isinstance(raw, list):
        raise ConfigError(f"{name}: models: expected a list of model ids or model objects")
    ids, overrides = [], []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item:
            ids.append(item)
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str) or not item["id"]:
            raise ConfigError(f"{name}: models[{i}]: expected a model id or an object with a string `id`")
        check_model(dict(item), f"{name}: models[{i}]")
        ids.append(item["id"])
        overrides.append(dict(item))
    return tuple(ids), overrides


PRICE_FIELDS = ("prompt", "completion", "request", "image", "web_search", "internal_reasoning",
                "input_cache_read", "input_cache_write")  # fmt: skip


def check_model(model: dict, name: str) -> None:
    """A Model override (routstr-core's shape): ConfigError naming the field when malformed."""
    pricing = model.get("pricing", {})
    if not isinstance(pricing, Mapping):
        raise ConfigError(f"{name}: pricing: expected a mapping of USD prices per token")
    for field, value in pricing.items():
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            number = Decimal(-1)
        if field in PRICE_FIELDS and (not number.is_finite() or number < 0):
            raise ConfigError(f"{name}: pricing.{field}: expected a non-negative USD amount, got {value!r}")
    for field in ("alias_ids", "aliases"):
        value = model.get(field, [])
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise ConfigError(f"{name}: {field}: expected a list of model ids")
    if "forwarded_model_id" in model and not isinstance(model["forwarded_model_id"], str | None):
        raise ConfigError(f"{name}: forwarded_model_id: expected a string")
    if "enabled" in model and not isinstance(model["enabled"], bool):
        raise ConfigError(f"{name}: enabled: expected true or false")
    for field in ("context_length", "max_completion_tokens"):
        if field in model and (not isinstance(model[field], int) or model[field] <= 0):
            raise ConfigError(f"{name}: {field}: expected a positive whole number")


def load_providers_file(path: str, environ: Mapping[str, str]) -> list[tuple[Provider, list[dict]]]:
    """Read PROVIDERS_PATH (YAML: `providers: [...]` or a list): every provider validated, every key variable set.

    Raises ConfigError naming the file, the provider and the field on the first problem.
    """
    if not path:
        return []
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"PROVIDERS_PATH: cannot read {path}: {exc}") from None
    items = data.get("providers") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError("PROVIDERS_PATH: expected a YAML list of providers (or `providers: [...]`)")
    found, seen = [], set()
    for item in items:
        provider, overrides = parse_provider(item, "PROVIDERS_PATH", source="file")
        if provider.slug in seen:
            raise ConfigError(f"PROVIDERS_PATH: provider {provider.slug}: slug: used twice")
        seen.add(provider.slug)
        try:
            provider.key(environ)
        except ConfigError as exc:
            raise ConfigError(f"PROVIDERS_PATH: {exc}") from None
        found.append((provider, overrides))
    return found


def shorthand_provider(settings: Settings) -> Provider | None:
    """UPSTREAM_BASE_URL / UPSTREAM_API_KEY as one provider, slug `upstream`, its type guessed from the host."""
    if not settings.upstream_base_url:
        return None
    host = urlsplit(settings.upstream_base_url).hostname or ""
    kind = next(
        (t for t, h in (("openai", "api.openai.com"), ("anthropic", "api.anthropic.com"),
                        ("openrouter", "openrouter.ai")) if host == h),
        "generic",
    )  # fmt: skip
    return Provider(
        slug="upstream", provider_type=kind, base_url=settings.upstream_base_url,
        api_key=settings.upstream_api_key, source="env",
    )  # fmt: skip


_COLUMNS = (
    "id, slug, provider_type, base_url, api_key, api_key_env, api_version, provider_fee, priority, enabled, models,"
    " provider_settings, source"
)


def _row(row: asyncpg.Record, box: SecretBox | None) -> Provider:
    api_key = box.open(row["api_key"]) if box and row["api_key"] else row["api_key"]
    return Provider(
        id=row["id"], slug=row["slug"], provider_type=row["provider_type"], base_url=row["base_url"],
        api_key=api_key, api_key_env=row["api_key_env"], api_version=row["api_version"],
        provider_fee=row["provider_fee"], priority=row["priority"], enabled=row["enabled"],
        models=tuple(row["models"]) if row["models"] is not None else None,
        provider_settings=json.loads(row["provider_settings"]), source=row["source"],
    )  # fmt: skip


class ProviderStore:
    """Providers and their model overrides in `billing.providers` / `billing.provider_models`.

    A provider is addressed by its numeric id or its slug (`ref`). Callers validate with
    `parse_provider` first; the store only persists.
    """

    def __init__(self, pool: asyncpg.Pool, box: SecretBox | None = None):
        """`box` seals `api_key` at rest (billing passes its SECRETS_KEY box); keys stored in the clear
        by an older version are read as they are."""
        self.pool = pool
        self.box = box

    async def list(self) -> list[Provider]:
        """Every provider, in routing order (priority, then slug)."""
        rows = await self.pool.fetch(f"SELECT {_COLUMNS} FROM billing.providers ORDER BY priority, slug")
        return [_row(r, self.box) for r in rows]

    async def get(self, ref: int | str) -> Provider | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM billing.providers WHERE {_where(ref)}", _ref(ref))
        return _row(row, self.box) if row else None

    async def upsert(self, provider: Provider, conn: asyncpg.Connection | None = None) -> Provider:
        """Create or replace the provider with this slug (every field as given); returns it with its id."""
        db = conn or self.pool
        row = await db.fetchrow(
            f"""INSERT INTO billing.providers (slug, provider_type, base_url, api_key, api_key_env, api_version,
                    provider_fee, priority, enabled, models, provider_settings, source)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)
                ON CONFLICT (slug) DO UPDATE SET provider_type = $2, base_url = $3, api_key = $4, api_key_env = $5,
                    api_version = $6, provider_fee = $7, priority = $8, enabled = $9, models = $10,
                    provider_settings = $11::jsonb, source = $12, updated_at = now()
                RETURNING {_COLUMNS}""",
            provider.slug, provider.provider_type, provider.base_url,
            self.box.seal(provider.api_key) if self.box and provider.api_key else provider.api_key,
            provider.api_key_env,
            provider.api_version, provider.provider_fee,
            provider.priority, provider.enabled, list(provider.models) if provider.models is not None else None,
            json.dumps(provider.provider_settings), provider.source,
        )  # fmt: skip
        return _row(row, self.box)

    async def delete(self, ref: int | str) -> int | None:
        """Remove a provider and its model overrides; its id, or None when there was none."""
        return await self.pool.fetchval(f"DELETE FROM billing.providers WHERE {_where(ref)} RETURNING id", _ref(ref))

    async def models(self, ref: int | str) -> list[dict]:
        """The operator's model overrides of one provider (Model objects), by model id."""
        rows = await self.pool.fetch(
            f"SELECT m.model FROM billing.provider_models m JOIN billing.providers p ON p.id = m.provider_id"
            f" WHERE p.{_where(ref)} ORDER BY m.model_id", _ref(ref),
        )  # fmt: skip
        return [json.loads(r["model"]) for r in rows]

    async def all_models(self) -> dict[int, list[dict]]:
        """Every provider's overrides: provider id -> [Model]."""
        found: dict[int, list[dict]] = {}
        for row in await self.pool.fetch("SELECT provider_id, model FROM billing.provider_models ORDER BY model_id"):
            found.setdefault(row["provider_id"], []).append(json.loads(row["model"]))
        return found

    async def get_model(self, ref: int | str, model_id: str) -> dict | None:
        value = await self.pool.fetchval(
            f"SELECT m.model FROM billing.provider_models m JOIN billing.providers p ON p.id = m.provider_id"
            f" WHERE p.{_where(ref)} AND m.model_id = $2", _ref(ref), model_id,
        )  # fmt: skip
        return json.loads(value) if value else None

    async def upsert_model(self, ref: int | str, model: dict, conn: asyncpg.Connection | None = None) -> dict | None:
        """Create or replace one model override (validate with `check_model` first); None when no such provider."""
        db = conn or self.pool
        value = await db.fetchval(
            f"""INSERT INTO billing.provider_models (provider_id, model_id, model)
                SELECT p.id, $2, $3::jsonb FROM billing.providers p WHERE p.{_where(ref)}
                ON CONFLICT (provider_id, model_id) DO UPDATE SET model = $3::jsonb, updated_at = now()
                RETURNING model""",
            _ref(ref), model["id"], json.dumps(model),
        )  # fmt: skip
        return json.loads(value) if value else None

    async def delete_model(self, ref: int | str, model_id: str) -> bool:
        deleted = await self.pool.fetchval(
            f"DELETE FROM billing.provider_models m USING billing.providers p WHERE p.id = m.provider_id"
            f" AND p.{_where(ref)} AND m.model_id = $2 RETURNING m.model_id", _ref(ref), model_id,
        )  # fmt: skip
        return deleted is not None

    async def apply(self, source: str, providers: list[tuple[Provider, list[dict]]]) -> None:
        """Make the rows of `source` ("file" or "env") exactly these providers and overrides, in one transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            slugs = [p.slug for p, _ in providers]
            await conn.execute(
                "DELETE FROM billing.providers WHERE source = $1 AND NOT (slug = ANY($2::text[]))", source, slugs
            )
            for provider, overrides in providers:
                stored = await self.upsert(provider, conn)
                if source == "file":  # the file owns its overrides; the shorthand's are the admin API's
                    await conn.execute("DELETE FROM billing.provider_models WHERE provider_id = $1", stored.id)
                for model in overrides:
                    await self.upsert_model(stored.id, model, conn)


def _where(ref: int | str) -> str:
    return "id = $1" if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()) else "slug = $1"


def _ref(ref: int | str) -> int | str:
    return int(ref) if isinstance(ref, int) or ref.isdigit() else ref
