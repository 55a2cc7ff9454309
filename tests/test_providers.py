"""Upstream providers: the store, the providers file, prices out of the box, routing and failover."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from services.billing.app import MIGRATIONS
from services.billing.providers import Provider, ProviderStore, load_providers_file, parse_provider
from shared import db
from shared.config import ConfigError

# ---- the store and the providers file --------------------------------------------------------


async def test_store_lists_upserts_and_deletes_providers_and_models(database):
    await db.migrate_url(database, "billing", MIGRATIONS)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        store = ProviderStore(pool)
        a, _ = parse_provider({"slug": "a", "provider_type": "openai", "api_key": "sk-a", "priority": 2}, "admin")
        b, _ = parse_provider({"slug": "b", "provider_type": "vllm", "base_url": "http://127.0.0.1:9/v1"}, "admin")
        stored_a = await store.upsert(a)
        await store.upsert(b)
        assert [p.slug for p in await store.list()] == ["b", "a"]  # lower priority number first
        assert stored_a.id and (await store.get(stored_a.id)).slug == "a" and (await store.get("a")).api_key == "sk-a"
        assert stored_a.base_url == "https://api.openai.com/v1" and stored_a.provider_fee is None
        assert (await store.upsert(Provider(**{
            "slug": "a", "provider_type": "openai", "base_url": "https://x.example/v1", "api_key": "sk-a",
            "provider_fee": Decimal("1.2")}))).provider_fee == Decimal("1.2")  # fmt: skip
        model = {"id": "meta/llama", "pricing": {"prompt": "0.000001", "completion": "0.000002"}, "alias_ids": ["l"]}
        assert await store.upsert_model("b", model) == model
        assert await store.get_model("b", "meta/llama") == model and await store.models("b") == [model]
        assert await store.upsert_model("nobody", model) is None
        assert await store.delete_model("b", "meta/llama") and not await store.delete_model("b", "meta/llama")
        assert await store.delete("a") == stored_a.id and await store.get("a") is None
        assert await store.delete("a") is None
        assert (await store.get("b")).redacted()["api_key"] == ""

        file_providers = [
            parse_provider({"slug": "f", "provider_type": "generic", "base_url": "http://127.0.0.1:1/v1",
                            "models": ["x", {"id": "y", "pricing": {"prompt": 1e-6}}]}, "PROVIDERS_PATH", "file"),
        ]  # fmt: skip
        await store.apply("file", file_providers)
        assert (await store.get("f")).models == ("x", "y") and [m["id"] for m in await store.models("f")] == ["y"]
        await store.apply("file", [])
        assert await store.get("f") is None and await store.get("b") is not None  # admin rows are not the file's
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"slug": "x", "provider_type": "azure"}, "provider x: provider_type"),
        ({"slug": "x", "provider_type": "generic", "base_url": "ftp://h"}, "provider x: base_url"),
        ({"slug": "x", "provider_type": "generic", "base_url": "not a url"}, "provider x: base_url"),
        ({"slug": "x", "provider_type": "openai", "api_key_env": "ROUTSTR_TEST_UNSET_KEY"}, "provider x: api_key_env"),
        ({"slug": "x", "provider_type": "openai"}, "provider x: api_key"),
        ({"slug": "x", "provider_type": "vllm", "provider_fee": 0}, "provider x: provider_fee"),
        ({"slug": "x", "provider_type": "vllm", "priority": "high"}, "provider x: priority"),
        ({"slug": "X Y", "provider_type": "vllm"}, "slug"),
        ({"slug": "x", "provider_type": "vllm", "models": [{"id": "m", "pricing": {"prompt": "-1"}}]}, "prompt"),
        ({"slug": "x", "provider_type": "vllm", "colour": "red"}, "provider x: colour"),
    ],
)
def test_bad_provider_file_names_the_provider_and_field(tmp_path: Path, entry, message):
    import yaml

    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"providers": [entry]}))
    with pytest.raises(ConfigError, match=message):
        load_providers_file(str(path), {})


def test_provider_file_reads_keys_from_the_environment(tmp_path: Path):
    path = tmp_path / "providers.yaml"
    path.write_text("providers:\n  - {slug: oa, provider_type: openai, api_key_env: OA_KEY, priority: 1}\n")
    [(provider, overrides)] = load_providers_file(str(path), {"OA_KEY": "sk-secret"})
    assert provider.api_key == "" and provider.key({"OA_KEY": "sk-secret"}) == "sk-secret" and overrides == []
    assert "sk-secret" not in repr(provider.redacted())
