"""The gateway's discovery routes: /v1/info, /v1/models (prices = what billing charges) and /v1/providers/."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
import uuid
from decimal import Decimal

import pytest
from nostr_sdk import EventBuilder, Keys, Kind, Tag

from services.gateway import catalog
from shared import bus
from shared.config import ConfigError
from shared.messaging import Responder, connect, request
from tests.test_discovery import eventually, relay  # noqa: F401  (relay is a fixture)

PRICE = bus.Price(request_msat=1500, prompt_msat_per_m=2_500_000, completion_msat_per_m=10_000_001)


def entry(model_id: str, **changes) -> bus.ModelEntry:
    fields = dict(
        id=model_id, name=model_id.upper(), upstream_id=f"openai/{model_id}", context_length=1000,
        max_completion_tokens=300, architecture={"modality": "text+image->text", "input_modalities": ["text", "image"]},
        usd={"prompt": "0.0000025", "completion": "0.00001"}, price=PRICE,
    )  # fmt: skip
    fields.update(changes)
    return bus.ModelEntry(**fields)


def test_render_models_prices_aliases_and_disabled():
    models = (entry("gpt-4o", aliases=("gpt-4o-latest", "gpt-4o")), entry("old", enabled=False))
    cat = bus.Catalog(models=models, btc_usd="100000", fixed_pricing=False, revision="r")
    data = catalog.render_models(cat, {"gpt-4o": 1700000000})
    assert [m["id"] for m in data] == ["gpt-4o", "gpt-4o-latest"]  # disabled gone; an alias equal to an id skipped
    model, alias = data
    assert (model["object"], model["created"], model["owned_by"], model["enabled"]) == (
        "model",
        1700000000,
        "openai",
        True,
    )
    assert model["architecture"]["input_modalities"] == ["text", "image"]
    assert model["architecture"]["output_modalities"] == ["text"]
    sats = model["sats_pricing"]
    assert sats["prompt"] == 0.0025 and sats["completion"] == 0.010000001 and sats["request"] == 1.5
    # Ceilings: 1000 prompt tokens = 2500 msat; 300 completion tokens = 3000.0003 msat -> 3001 msat (rounded up).
    assert (sats["max_prompt_cost"], sats["max_completion_cost"], sats["max_cost"]) == (2.5, 3.001, 7.001)
    assert model["pricing"]["prompt"] == 0.0000025 and model["pricing"]["completion"] == 0.00001
    assert model["pricing"]["max_cost"] == 7.001 * 100000 / 1e8
    assert model["per_request_limits"] == {"prompt_tokens": 1000, "completion_tokens": 300}
    assert {k: v for k, v in alias.items() if k not in {"id", "alias_ids", "canonical_slug"}} == {
        k: v for k, v in model.items() if k not in {"id", "alias_ids"}
    }
    assert alias["canonical_slug"] == "gpt-4o"


def test_render_provider_splits_clear_and_onion():
    peer = bus.Provider(
        pubkey="ab" * 32, d="p", name="P", about="a", urls=("http://x.onion", "https://p.example"),
        mints=("https://m",), version="1", last_seen=5,
    )  # fmt: skip
    shown = catalog.render_provider(peer)
    assert (shown["endpoint_url"], shown["onion_url"]) == ("https://p.example", "http://x.onion")
    assert shown["mints"] == ["https://m"]


async def test_info_names_the_node(make_node, http):
    keys = Keys.generate()
    node = await make_node(
        services=("discovery", "gateway"), NSEC=keys.secret_key().to_hex(),
        HTTP_URL="https://node.example", ONION_URL="http://node.onion", CASHU_MINTS="https://a.example,https://b.example",
    )  # fmt: skip
    async with http.get(f"{node.url}/v1/info") as response:
        assert response.status == 200
        info = await response.json()
    assert info["npub"] == keys.public_key().to_bech32()
    assert info["mints"] == ["https://a.example", "https://b.example"]
    assert (info["name"], info["description"]) == ("Test Node", "A node under test")
    assert (info["http_url"], info["onion_url"], info["child_key_cost_msats"]) == (
        "https://node.example",
        "http://node.onion",
        0,
    )
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"]) and not re.match(r"^0\.1\.", info["version"])


async def test_info_without_discovery_has_empty_npub(make_node, http):
    node = await make_node(services=("gateway",))
    started = time.monotonic()
    async with http.get(f"{node.url}/v1/info") as response:
        assert response.status == 200
        info = await response.json()
    assert info["npub"] == "" and info["mints"] == list(node.settings.cashu_mints)
    assert time.monotonic() - started < 1.5


async def test_providers_lists_peers_from_the_relay(make_node, http, relay):  # noqa: F811
    node = await make_node(services=("discovery", "gateway"), RELAYS=relay.url, HTTP_URL="https://node.example")
    other = Keys.generate()
    tags = [Tag.identifier("peer"), Tag.custom("u", ["https://peer.example"]), Tag.custom("u", ["http://peer.onion"]),
            Tag.custom("mint", ["https://peer-mint.example"]), Tag.custom("version", ["0.3.0"])]  # fmt: skip
    content = json.dumps({"name": "Peer Node", "about": "elsewhere"})
    await relay.publish(EventBuilder(Kind(38421), content).tags(tags).finalize(other))

    async def listed() -> list[dict]:
        async with http.get(f"{node.url}/v1/providers/") as response:
            assert response.status == 200
            return (await response.json())["providers"]

    providers = await eventually(listed, bool)
    assert len(providers) == 1
    peer = providers[0]
    assert (peer["endpoint_url"], peer["onion_url"], peer["name"]) == (
        "https://peer.example",
        "http://peer.onion",
        "Peer Node",
    )
    assert peer["mints"] == ["https://peer-mint.example"] and peer["pubkey"] == other.public_key().to_hex()
    assert peer["last_seen"] > 0
    async with http.get(f"{node.url}/v1/providers") as response:
        assert (await response.json())["providers"] == providers


async def test_providers_without_discovery_is_503(make_node, http):
    node = await make_node(services=("gateway",))
    async with http.get(f"{node.url}/v1/providers/") as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "discovery_unavailable"


# ---- against billing ---------------------------------------------------------------------------


async def models(http, node) -> list[dict]:
    async with http.get(f"{node.url}/v1/models") as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["object"] == "list"
    return body["data"]


async def charge(nc, model_id: str, prompt_tokens: int, completion_tokens: int) -> bus.Settled:
    """What billing charges a fresh key for one call of this usage (reserve, then settle, over NATS)."""
    key_hash = hashlib.sha256(f"sk-{uuid.uuid4().hex}".encode()).hexdigest()
    await request(nc, bus.BILLING_CREATE_KEY, bus.CreateKey(key_hash, 100_000_000, uuid.uuid4().hex), bus.KeyInfo)
    request_id = uuid.uuid4().hex
    reserve = bus.Reserve(key_hash, request_id, model_id, prompt_tokens, completion_tokens)
    reserved = await request(nc, bus.BILLING_RESERVE, reserve, bus.Reserved)
    usage = bus.Usage(request_id, key_hash, reserved.reservation_id, reserved.model, prompt_tokens, completion_tokens)
    return await request(nc, bus.BILLING_SETTLE, usage, bus.Settled)


async def test_models_prices_are_what_billing_charges(make_node, http, tmp_path):
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps([
        {"id": "openai/gpt-4o", "aliases": ["gpt-4o-latest"],
         "pricing": {"prompt": "0.0000025", "completion": "0.00001", "request": "0.0002"}},
        {"id": "openai/gpt-4o-mini", "enabled": False},
    ]))  # fmt: skip
    node = await make_node(services=("billing", "discovery", "gateway"), MODELS_PATH=str(models_file))
    data = await models(http, node)
    by_id = {model["id"]: model for model in data}
    assert "openai/gpt-4o-mini" not in by_id and "gpt-4o-mini" not in by_id  # disabled in the models file
    assert {"openai/gpt-4o", "gpt-4o", "gpt-4o-latest", "anthropic/claude-sonnet-4.6"} <= set(by_id)
    for model in data:
        assert model["enabled"] is True and model["object"] == "model" and model["name"]
        assert set(model["sats_pricing"]) >= {
            "prompt", "completion", "request", "image", "web_search", "internal_reasoning",
            "max_prompt_cost", "max_completion_cost", "max_cost",
        }  # fmt: skip
        assert {"modality", "input_modalities", "output_modalities"} <= set(model["architecture"])
        assert isinstance(model["pricing"]["prompt"], float) and model["context_length"] > 0
    # USD * 1.05 margin * 1.005 exchange fee at 100000 USD/BTC: 2.638125 msat per prompt token exactly (kept
    # exact as msat per million tokens); 211.05 msat per request, rounded up to 212.
    gpt4o = by_id["openai/gpt-4o"]
    assert gpt4o["sats_pricing"]["prompt"] == 0.002638125 and gpt4o["sats_pricing"]["request"] == 0.212
    assert by_id["gpt-4o-latest"]["sats_pricing"] == gpt4o["sats_pricing"]
    nc = await connect(node.settings.nats_url, "test")
    try:
        for model_id in ("openai/gpt-4o", "gpt-4o-latest", "anthropic/claude-sonnet-4.6"):
            sats = by_id[model_id]["sats_pricing"]
            settled = await charge(nc, model_id, 1234, 567)
            # The advertised numbers (decimal as sent), in msat, each part rounded up as a charge is.
            prompt, completion, per_call = (Decimal(str(sats[k])) * 1000 for k in ("prompt", "completion", "request"))
            parts = (per_call, math.ceil(prompt * 1234), math.ceil(completion * 567))
            assert (settled.base_msat, settled.input_msat, settled.output_msat) == parts, (model_id, settled, sats)
            assert settled.cost_msat == sum(parts)
    finally:
        await nc.close()


async def test_malformed_models_file_fails_at_start(make_node, tmp_path):
    broken = tmp_path / "models.json"
    broken.write_text('{"models": [{"id": "gpt-4o", "pricing": ')
    with pytest.raises(ConfigError, match="MODELS_PATH"):
        await make_node(services=("billing",), MODELS_PATH=str(broken))


async def test_models_follow_catalog_changes_and_survive_billing_outages(make_node, http, nats_server):
    """Billing's side of the bus is played here, so the test decides when the catalog changes and when it is gone."""
    node = await make_node(services=("gateway",))
    async with http.get(f"{node.url}/v1/models") as response:
        assert response.status == 503  # nothing to show yet, and it says so
    nc = await connect(nats_server.url, "billing-stand-in")
    current = {"catalog": bus.Catalog((entry("a"),), "100000", False, "r1")}

    async def answer(message):
        return current["catalog"]

    billing = Responder(nc, "billing")
    await billing.serve(bus.BILLING_MODELS, answer)
    await billing.ready()  # subscribed before anyone asks
    try:
        assert [m["id"] for m in await models(http, node)] == ["a"]
        current["catalog"] = bus.Catalog((entry("a"), entry("b")), "100000", False, "r2")
        await nc.publish(bus.EVENT_CATALOG_CHANGED, b"r2")
        listed = await eventually(lambda: models(http, node), lambda data: len(data) == 2, timeout=3)
        assert [m["id"] for m in listed] == ["a", "b"]
    finally:
        await nc.close()
    events = await connect(nats_server.url, "events")
    try:
        await events.publish(bus.EVENT_CATALOG_CHANGED, b"r3")
        await events.flush()
        await asyncio.sleep(0.1)  # let the gateway hear it
    finally:
        await events.close()
    assert [m["id"] for m in await models(http, node)] == ["a", "b"]  # billing gone: the last catalog stays
