"""Upstream providers: the store, the providers file, prices out of the box, routing and failover."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import asyncpg
import msgspec
import pytest
import yaml
from aiohttp import web

from devstack import upstream
from services.billing import price_db
from services.billing.app import MIGRATIONS
from services.billing.providers import Provider, ProviderStore, load_providers_file, parse_provider
from services.discovery import announcement
from shared import bus, db, messaging, pricing
from shared.config import ConfigError
from tests.conftest import node_env, serve_app, start_node
from tests.support.keys import funded_key

ROOT = Path(__file__).resolve().parent.parent

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


# ---- a node with four providers --------------------------------------------------------------
#   a: generic, priority 0, lists m-shared at $1/$2 per M (published `pricing`), key from TEST_PROVIDER_KEY_A
#   b: openrouter, priority 1, provider_fee 1.2, lists m-shared at $3/$6, m-only-b, m-hidden (disabled in the
#      models file)
#   c: openai, lists like OpenAI (no prices): gpt-4o-mini (priced by genai-prices' data), my-finetune-xyz
#   d: anthropic, Anthropic's own model list and Messages API: claude-sonnet-4-5
#   e: ollama, only its native /api/tags: llama3.2:latest (priced in the models file) and gpt-4o-mini (a local
#      model: not priced from the database, so only c sells gpt-4o-mini)

BTC_USD = Decimal(100000)
MARGIN = Decimal("1.05") * Decimal("1.005")  # UPSTREAM_PROVIDER_FEE x EXCHANGE_FEE (defaults)
CHAT = "/v1/chat/completions"


def usd(prompt: str, completion: str, margin: Decimal = MARGIN, **more: str) -> bus.Price:
    prices = {"prompt": Decimal(prompt), "completion": Decimal(completion)}
    prices.update({k: Decimal(v) for k, v in more.items()})
    return pricing.usd_price(prices, BTC_USD, margin)


B_MARGIN = Decimal("1.2") * Decimal("1.005")  # b's own provider_fee replaces UPSTREAM_PROVIDER_FEE
PRICE_A, PRICE_B = usd("0.000001", "0.000002"), usd("0.000003", "0.000006", B_MARGIN)
PRICE_ONLY_B = usd("0.000001", "0.000001", B_MARGIN)
PRICE_MINI = usd("0.00000015", "0.0000006", input_cache_read="0.000000075")  # genai-prices: $0.15 / $0.60 per M
PRICE_SONNET = usd("0.000003", "0.000015", input_cache_read="0.0000003", input_cache_write="0.00000375")


@dataclass
class Stub:
    app: web.Application
    runner: web.AppRunner
    url: str

    @property
    def hits(self) -> int:
        return sum(self.app[upstream.HITS].values())

    def behave(self, **behaviour) -> None:
        self.app[upstream.BEHAVIOUR].clear()
        self.app[upstream.BEHAVIOUR].update(behaviour)


async def start_stub(key: str, models, **options) -> Stub:
    app = upstream.create_app(key, models=models, **options)
    runner, url = await serve_app(app)
    return Stub(app, runner, url)


def ollama_app() -> web.Application:
    """Ollama's native model list only (`GET /api/tags`); its OpenAI-compatible `/v1/models` is not there."""

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": name, "model": name, "modified_at": "2025-01-01T00:00:00Z", "size": 2_019_393_189,
             "digest": "a80c4f17acd5", "details": {"format": "gguf", "family": "llama", "parameter_size": "3.2B"}}
            for name in ("llama3.2:latest", "gpt-4o-mini")
        ]})  # fmt: skip

    app = web.Application()
    app.router.add_get("/api/tags", tags)
    return app


@pytest.fixture
async def stubs():
    ollama, ollama_url = await serve_app(ollama_app())
    found = {
        "a": await start_stub("key-a", (("m-shared", 64_000, "0.000001", "0.000002"),)),
        "b": await start_stub(
            "key-b",
            (
                ("m-shared", 64_000, "0.000003", "0.000006"),
                ("m-only-b", 64_000, "0.000001", "0.000001"),
                ("m-hidden", 64_000, "0.000001", "0.000001"),
            ),
        ),
        "c": await start_stub("key-c", (("gpt-4o-mini", 0, "", ""), ("my-finetune-xyz", 0, "", "")), priced=False),
        "d": await start_stub("key-d", (("claude-sonnet-4-5", 0, "", ""),), flavor="anthropic"),
        "e": Stub(ollama_app(), ollama, ollama_url),
    }
    yield found
    for stub in found.values():
        await stub.runner.cleanup()


@pytest.fixture
async def node(nats_server, database, mint, stubs, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_PROVIDER_KEY_A", "key-a")
    providers = tmp_path / "providers.yaml"
    providers.write_text(yaml.safe_dump({"providers": [
        {"slug": "a", "provider_type": "generic", "base_url": f"{stubs['a'].url}/v1",
         "api_key_env": "TEST_PROVIDER_KEY_A", "priority": 0},
        {"slug": "b", "provider_type": "openrouter", "base_url": f"{stubs['b'].url}/v1", "api_key": "key-b",
         "priority": 1, "provider_fee": 1.2},
        {"slug": "c", "provider_type": "openai", "base_url": f"{stubs['c'].url}/v1", "api_key": "key-c"},
        {"slug": "d", "provider_type": "anthropic", "base_url": f"{stubs['d'].url}/v1", "api_key": "key-d"},
        {"slug": "e", "provider_type": "ollama", "base_url": f"{stubs['e'].url}/v1"},
    ]}))  # fmt: skip
    models = tmp_path / "models.json"
    models.write_text(
        json.dumps(
            [
                {"id": "m-hidden", "enabled": False},
                {"id": "llama3.2:latest", "pricing": {"prompt": "1e-7", "completion": "2e-7"}},
            ]
        )
    )
    env = node_env(nats_server.url, database, "", mint.url, PROVIDERS_PATH=str(providers), MODELS_PATH=str(models),
                   UPSTREAM_API_KEY="", UPSTREAM_COOLDOWN="1", UPSTREAM_FIRST_BYTE_TIMEOUT="1")  # fmt: skip
    started = await start_node(env, ("billing", "gateway"))
    yield started
    await started.stop()


async def listed(http, node) -> dict[str, dict]:
    async with http.get(f"{node.url}/v1/models") as response:
        assert response.status == 200, await response.text()
        return {m["id"]: m for m in (await response.json())["data"]}


async def spendable(http, node, key: str) -> int:
    """The key's balance in msat once nothing is reserved any more."""
    for _ in range(100):
        async with http.get(f"{node.url}/v1/balance/info", headers=auth(key)) as response:
            info = await response.json()
        if info["reserved"] == 0:
            return info["balance"]
        await asyncio.sleep(0.05)
    raise AssertionError(f"reservation never settled: {info}")


async def chat(http, node, key: str, model: str, text: str = "hi", **extra) -> tuple[int, dict, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 100, **extra}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        return response.status, await response.json(), dict(response.headers)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_models_are_the_union_priced_out_of_the_box(node, http, stubs):
    models = await listed(http, node)
    assert {"m-shared", "m-only-b", "gpt-4o-mini", "claude-sonnet-4-5"} <= set(models)
    assert "my-finetune-xyz" not in models and "m-hidden" not in models  # unpriced; disabled by the operator
    # The cheapest route of the best priority sets the listed price; gpt-4o-mini at genai-prices' $0.15/$0.60.
    for model_id, price in (("m-shared", PRICE_A), ("gpt-4o-mini", PRICE_MINI), ("claude-sonnet-4-5", PRICE_SONNET)):
        sats = models[model_id]["sats_pricing"]
        assert sats["prompt"] == pricing.sats_per_token(price.prompt_msat_per_m), model_id
        assert sats["completion"] == pricing.sats_per_token(price.completion_msat_per_m), model_id
    nc = await messaging.connect(node.settings.nats_url, "test")
    try:
        catalog = await messaging.request(nc, bus.BILLING_MODELS, bus.ModelsQuery(), bus.Catalog)
        upstreams = await messaging.request(nc, bus.BILLING_UPSTREAMS, bus.UpstreamsQuery(), bus.Upstreams)
    finally:
        await nc.close()
    unpriced = next(m for m in catalog.models if m.id == "my-finetune-xyz")
    assert not unpriced.enabled and "no price" in unpriced.disabled_reason and unpriced.price == bus.Price()
    shared = next(m for m in catalog.models if m.id == "m-shared")
    assert [(r.provider, r.price) for r in shared.routes] == [("a", PRICE_A), ("b", PRICE_B)]
    mini = next(m for m in catalog.models if m.id == "gpt-4o-mini")
    assert [r.provider for r in mini.routes] == ["c"]  # ollama's gpt-4o-mini has no operator price
    local = next(m for m in catalog.models if m.id == "llama3.2:latest")
    assert [(r.provider, r.price) for r in local.routes] == [("e", usd("1e-7", "2e-7"))] and "llama3.2:latest" in models
    assert {u.slug: u.api_key for u in upstreams.upstreams}["a"] == "key-a"  # read from its variable
    for path in ("/v1/models", "/v1/info"):  # keys never in an answer
        async with http.get(f"{node.url}{path}") as response:
            text = await response.text()
        assert not any(k in text for k in ("key-a", "key-b", "key-c", "key-d")), path
    # The kind-38421 announcement carries the same union, with sats prices.
    settings = node.settings.replace(http_url="https://node.example")
    content = json.loads(announcement.build(settings, "d", "1", catalog).content)
    assert {m["id"] for m in content["models"]} == {m.id for m in catalog.models if m.enabled}
    assert "my-finetune-xyz" not in {m["id"] for m in content["models"]}
    async with http.get(f"{node.url}/v1/info") as response:
        info = await response.json()
    assert set(info["models"]) == {m.id for m in catalog.models if m.enabled}
    assert info["models"]["gpt-4o-mini"] == models["gpt-4o-mini"]["sats_pricing"]

    key = await funded_key(node.settings.nats_url, 10_000_000)
    status, body, headers = await chat(http, node, key, "gpt-4o-mini", "hi [[tokens:30]]")
    assert status == 200 and stubs["c"].hits == 1, body
    usage = body["usage"]
    expected = pricing.cost(PRICE_MINI, usage["prompt_tokens"], usage["completion_tokens"])[3]
    assert int(headers["X-Routstr-Cost-Msats"]) == expected == body["usage"]["cost"]["total_msats"]
    assert await spendable(http, node, key) == 10_000_000 - expected
    for model_id in ("my-finetune-xyz", "no-such-model", "m-hidden"):
        status, body, _ = await chat(http, node, key, model_id)
        assert status == 404 and body["error"]["code"] == "model_not_found", body
    assert await spendable(http, node, key) == 10_000_000 - expected  # refused calls cost nothing
    assert stubs["c"].hits == 1


async def test_failover_charges_once_at_the_answering_provider_and_cools_the_failing_one(node, http, stubs, caplog):
    caplog.set_level("DEBUG")
    a, b = stubs["a"], stubs["b"]
    key = await funded_key(node.settings.nats_url, 10_000_000)
    balance = 10_000_000

    async def call_charged_at(price: bus.Price, model: str = "m-shared") -> None:
        nonlocal balance
        status, body, headers = await chat(http, node, key, model, "hi [[tokens:12]]")
        assert status == 200, body
        cost = pricing.cost(price, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])[3]
        assert int(headers["X-Routstr-Cost-Msats"]) == cost
        balance -= cost
        assert await spendable(http, node, key) == balance  # charged once, at that price

    await call_charged_at(PRICE_ONLY_B, "m-only-b")  # only B serves it
    assert (a.hits, b.hits) == (0, 1)
    await call_charged_at(PRICE_A)  # both serve it: A first (priority 0)
    assert (a.hits, b.hits) == (1, 1)
    for failure in ({"fail": 503}, {"fail": 429}, {"first_byte_delay": 2}):
        a.behave(**failure)
        before_a, before_b = a.hits, b.hits
        await call_charged_at(PRICE_B)  # A failed before its first byte: B answered, at B's price
        assert (a.hits, b.hits) == (before_a + 1, before_b + 1), failure
        await call_charged_at(PRICE_B)  # A is cooling down: not even tried
        assert (a.hits, b.hits) == (before_a + 1, before_b + 2), failure
        a.behave()
        await asyncio.sleep(1.1)  # UPSTREAM_COOLDOWN=1: A is probed back in
        await call_charged_at(PRICE_A)
        assert a.hits == before_a + 2, failure

    port = int(a.url.rsplit(":", 1)[1])
    await a.runner.cleanup()  # A refuses connections
    before_b = b.hits
    await call_charged_at(PRICE_B)
    assert b.hits == before_b + 1
    a.runner, _ = await serve_app(a.app, port)
    await asyncio.sleep(1.1)

    a.behave(fail=503)  # a stream fails over too, before its first byte
    body = {"model": "m-shared", "messages": [{"role": "user", "content": "hi [[tokens:6]]"}], "max_tokens": 50,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 200
        events = [e for e in (await response.text()).split("\n\n") if e.startswith("data: {")]
    usage = json.loads(events[-1][6:])["usage"]
    balance -= pricing.cost(PRICE_B, usage["prompt_tokens"], usage["completion_tokens"])[3]
    assert usage["cost"]["total_msats"] == pricing.cost(PRICE_B, usage["prompt_tokens"], usage["completion_tokens"])[3]
    assert await spendable(http, node, key) == balance
    a.behave()
    await asyncio.sleep(1.1)

    metrics = await (await http.get(f"{node.urls['gateway_metrics']}/metrics")).text()
    assert 'routstr_provider_up{provider="a"} 0.0' in metrics  # its last call failed; the next one probes it
    assert 'routstr_provider_cooldowns_total{provider="a"} 5.0' in metrics
    assert 'routstr_provider_failovers_total{provider="a"} 5.0' in metrics
    assert 'routstr_provider_up{provider="b"} 1.0' in metrics
    assert "key-a" not in metrics and a.url not in metrics
    assert "provider a failed" in caplog.text and not any(k in caplog.text for k in ("key-a", "key-b"))

    a.behave(fail=503)
    b.behave(fail=503)
    status, body, _ = await chat(http, node, key, "m-shared")
    assert status in (502, 503) and body["error"]["code"] in ("upstream_error", "upstream_unavailable"), body
    assert await spendable(http, node, key) == balance  # both down: nothing charged


async def test_a_stream_never_switches_provider_after_its_first_byte(node, http, stubs):
    a, b = stubs["a"], stubs["b"]
    key = await funded_key(node.settings.nats_url, 10_000_000)
    body = {"model": "m-shared", "messages": [{"role": "user", "content": "hi [[tokens:20]] [[midfail]]"}],
            "max_tokens": 100, "stream": True}  # fmt: skip
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 200
        text = await response.text()
    assert text.startswith("data: ") and "upstream_error" in text  # 200 went out; the failure is told in-stream
    assert (a.hits, b.hits) == (1, 0)  # B was never asked
    charged = 10_000_000 - await spendable(http, node, key)
    full = pricing.max_cost(PRICE_A, 10, 100)
    assert 0 < charged < full  # what was delivered, at A's price


async def test_anthropic_messages_natively_priced_by_anthropic_usage(node, http, stubs):
    key = await funded_key(node.settings.nats_url, 10_000_000)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi [[tokens:9]] [[cacheread:100]]"}]}  # fmt: skip
    headers = {"x-api-key": "not-forwarded", **auth(key)}  # Bearer wins; the stub refuses any key but its own
    async with http.post(f"{node.url}/v1/messages", json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
        cost = int(response.headers["X-Routstr-Cost-Msats"])
    usage = answer["usage"]
    assert answer["type"] == "message" and usage["output_tokens"] == 9 and usage["cache_read_input_tokens"] == 100
    # input_tokens excludes cache reads: they are charged at the cache-read price, on top.
    expected = pricing.cost(PRICE_SONNET, usage["input_tokens"] + 100, 9, 100)[3]
    assert cost == expected
    assert expected == pricing.cost(PRICE_SONNET, usage["input_tokens"], 9)[3] + math.ceil(
        100 * PRICE_SONNET.cache_read_msat_per_m / 1_000_000
    )
    balance = await spendable(http, node, key)
    assert balance == 10_000_000 - expected
    async with http.post(f"{node.url}/v1/messages", json={**body, "stream": True}, headers=headers) as response:
        assert response.status == 200
        text = await response.text()
    events = text.split("\n\n")
    delta = next(json.loads(e.split("data: ", 1)[1]) for e in events if e.startswith("event: message_delta"))
    assert delta["usage"]["output_tokens"] == 9 and delta["cost"]["total_msats"] == expected  # with the node's cost
    assert await spendable(http, node, key) == balance - expected
    assert stubs["d"].hits == 2
    anthropic_sdk = {"x-api-key": key, "anthropic-version": "2023-06-01"}  # how Anthropic's SDKs authenticate
    async with http.post(f"{node.url}/v1/messages", json=body, headers=anthropic_sdk) as response:
        assert response.status == 200, await response.text()
    assert await spendable(http, node, key) == balance - 2 * expected and stubs["d"].hits == 3
    status, _, _ = await chat(http, node, key, "m-only-b")
    assert status == 200  # OpenAI-shaped calls keep their routes
    status, answer, _ = await chat(http, node, key, "claude-sonnet-4-5", "hi [[tokens:4]]")
    assert status == 200 and answer["object"] == "chat.completion", answer  # Anthropic's OpenAI-compatible endpoint
    assert stubs["d"].app[upstream.HITS]["/v1/chat/completions"] == 1
    async with http.post(f"{node.url}/v1/messages", json={**body, "model": "m-only-b"}, headers=headers) as response:
        assert response.status == 400  # no Anthropic-type provider serves it: a configuration, not an outage
        assert (await response.json())["error"]["code"] == "unsupported_api"


async def test_a_provider_added_to_the_store_is_sold_after_the_change_event(node, http, stubs):
    """The admin API's path: write the store, publish events.providers.changed; billing and gateways follow."""
    pool = await asyncpg.create_pool(node.settings.database_url, min_size=1, max_size=1)
    try:
        store = ProviderStore(pool)
        extra, _ = parse_provider({"slug": "extra", "provider_type": "generic", "base_url": f"{stubs['b'].url}/v1",
                                   "api_key": "key-b", "priority": 5, "models": ["m-only-b"]}, "admin")  # fmt: skip
        await store.upsert(extra)
        await store.upsert_model("extra", {"id": "m-only-b", "alias_ids": ["b-alias"], "forwarded_model_id": "m-only-b",
                                           "pricing": {"prompt": "0.000002", "completion": "0.000002"}})  # fmt: skip
        await store.upsert(Provider(**{**msgspec.structs.asdict(await store.get("a")), "enabled": False}))
    finally:
        await pool.close()
    nc = await messaging.connect(node.settings.nats_url, "admin-stand-in")
    try:
        await nc.publish(bus.EVENT_PROVIDERS_CHANGED, b"")
        await nc.flush()
    finally:
        await nc.close()
    for _ in range(100):
        models = await listed(http, node)
        if "b-alias" in models:
            break
        await asyncio.sleep(0.1)
    assert "b-alias" in models  # the override's alias, on the new provider's route
    key = await funded_key(node.settings.nats_url, 1_000_000)
    status, body, headers = await chat(http, node, key, "m-shared", "hi [[tokens:3]]")
    assert status == 200 and stubs["a"].hits == 0  # a was disabled: b answers, at b's price
    cost = pricing.cost(PRICE_B, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])[3]
    assert int(headers["X-Routstr-Cost-Msats"]) == cost


async def test_bad_provider_configuration_stops_the_start(nats_server, database, mint, tmp_path):
    providers = tmp_path / "providers.yaml"
    providers.write_text("providers:\n  - {slug: broken, provider_type: openai, api_key_env: TEST_UNSET_KEY_VAR}\n")
    env = node_env(nats_server.url, database, "", mint.url, PROVIDERS_PATH=str(providers))
    with pytest.raises(ConfigError, match="provider broken: api_key_env"):
        await start_node(env, ("billing",))


def test_price_data_is_genai_prices_own():
    """The committed snapshot is what scripts/price_table.py makes from the pinned genai-prices."""
    tools_python = ROOT / ".venv-tools" / "bin" / "python"
    assert tools_python.exists(), "run `make tools` (it installs genai-prices)"
    fresh = subprocess.run([str(tools_python), str(ROOT / "scripts" / "price_table.py")], capture_output=True,
                           check=True, timeout=120).stdout  # fmt: skip
    assert fresh == (ROOT / "services" / "billing" / "price_data.json").read_bytes()
    assert price_db.lookup("gpt-4o-mini", "openai") == {
        "prompt": Decimal("0.15") / 10**6, "completion": Decimal("0.6") / 10**6,
        "input_cache_read": Decimal("0.075") / 10**6,
    }  # fmt: skip
    assert price_db.lookup("openai/gpt-4o-mini-2024-07-18") == price_db.lookup("gpt-4o-mini", "openai")
    assert price_db.lookup("my-finetune-xyz", "openai") is None


async def test_readme_real_node_recipe_sells_openai_models(nats_server, database, mint, stubs, http):
    """UPSTREAM_BASE_URL + UPSTREAM_API_KEY against a server answering like OpenAI (no prices in /models)."""
    env = node_env(nats_server.url, database, f"{stubs['c'].url}/v1", mint.url, UPSTREAM_API_KEY="key-c")
    started = await start_node(env, ("billing", "gateway"))
    try:
        models = await listed(http, started)
        assert set(models) == {"gpt-4o-mini"}  # my-finetune-xyz has no price anywhere: not sold
        assert models["gpt-4o-mini"]["sats_pricing"]["prompt"] == pricing.sats_per_token(PRICE_MINI.prompt_msat_per_m)
        key = await funded_key(started.settings.nats_url, 1_000_000)
        status, body, headers = await chat(http, started, key, "gpt-4o-mini", "hi [[tokens:5]]")
        assert status == 200, body
        usage = body["usage"]
        cost = pricing.cost(PRICE_MINI, usage["prompt_tokens"], usage["completion_tokens"])[3]
        assert int(headers["X-Routstr-Cost-Msats"]) == cost > 0
    finally:
        await started.stop()
