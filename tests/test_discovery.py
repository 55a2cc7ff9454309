"""Discovery against a real nostr-sdk relay on loopback: what the node announces, when, and who it sees."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from nostr_sdk import (
    ClientBuilder,
    Event,
    EventBuilder,
    Filter,
    Keys,
    Kind,
    LocalRelay,
    LocalRelayBuilder,
    RelayUrl,
    ReqTarget,
    Tag,
)

from devstack.processes import free_port
from services.discovery import announcement
from shared import bus
from shared.config import ConfigError, load_settings
from shared.messaging import Responder, connect, request

KIND = 38421


class Relay:
    """A LocalRelay that can be stopped and started again on the same port (its store is in memory)."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"ws://127.0.0.1:{port}"
        self._relay: LocalRelay | None = None

    async def start(self) -> None:
        self._relay = LocalRelayBuilder().addr("127.0.0.1").port(self.port).build()
        await self._relay.run()

    def stop(self) -> None:
        if self._relay is not None:
            self._relay.shutdown()
            self._relay = None

    async def events(self, **filters) -> list[Event]:
        """What a client sees for a `{kinds:[38421]}` REQ (plus extra filter fields)."""
        client = ClientBuilder().build()
        await client.add_relay(RelayUrl.parse(self.url))
        await client.connect(timedelta(seconds=2))
        try:
            query = Filter().kinds([Kind(KIND)]).limit(100)
            if "author" in filters:
                query = query.author(filters["author"])
            return await client.fetch_events(ReqTarget.auto([query]), timedelta(seconds=2))
        finally:
            await client.shutdown()

    async def publish(self, event: Event) -> None:
        client = ClientBuilder().build()
        await client.add_relay(RelayUrl.parse(self.url))
        await client.connect(timedelta(seconds=2))
        try:
            output = await client.send_event(event)
            assert output.success, output.failed
        finally:
            await client.shutdown()

    async def wait_for(self, predicate, timeout: float = 15.0, **filters) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            events = await self.events(**filters)
            if predicate(events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"relay never satisfied the condition; it holds {[e.as_json() for e in events]}")
            await asyncio.sleep(0.2)


async def eventually(probe, done, timeout: float = 10.0):
    """Poll `probe()` until `done(value)` or the timeout; return the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


@pytest_asyncio.fixture(loop_scope="session")
async def relay() -> AsyncIterator[Relay]:
    relay = Relay(free_port())
    await relay.start()
    yield relay
    relay.stop()


def tags_of(event: Event) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for tag in event.tags():
        values = tag.to_vec()
        found.setdefault(values[0], []).append(values[1] if len(values) > 1 else "")
    return found


async def identity(node) -> bus.NodeIdentity:
    nc = await connect(node.settings.nats_url, "test")
    try:
        return await request(nc, bus.DISCOVERY_INFO, bus.InfoQuery(), bus.NodeIdentity)
    finally:
        await nc.close()


async def providers(node) -> bus.Providers:
    nc = await connect(node.settings.nats_url, "test")
    try:
        return await request(nc, bus.DISCOVERY_PROVIDERS, bus.ProvidersQuery(), bus.Providers)
    finally:
        await nc.close()


# ---- pure logic --------------------------------------------------------------------------------


def settings_for(**env):
    base = {"NAME": "Node A", "DESCRIPTION": "about A", "RELAYS": "", "HTTP_URL": "https://a.example"}
    return load_settings({**base, **env}, dotenv=None)


def test_announcement_shape():
    catalog = bus.Catalog(
        models=(
            bus.ModelEntry(
                id="gpt-4o", name="GPT-4o", upstream_id="gpt-4o", context_length=128000, max_completion_tokens=4096,
                architecture={}, usd={}, price=bus.Price(request_msat=2000, prompt_msat_per_m=3_000_000,
                                                         completion_msat_per_m=12_000_000),
            ),
            bus.ModelEntry(
                id="off", name="Off", upstream_id="off", context_length=1, max_completion_tokens=1,
                architecture={}, usd={}, price=bus.Price(), enabled=False,
            ),
        ),
        btc_usd="100000", fixed_pricing=False, revision="r1",
    )  # fmt: skip
    settings = settings_for(ONION_URL="http://abc.onion", CASHU_MINTS="https://m1.example/,https://m2.example")
    built = announcement.build(settings, "d-1", "0.2.0", catalog)
    assert built is not None
    assert built.tags == (
        ("d", "d-1"), ("u", "https://a.example"), ("u", "http://abc.onion"),
        ("mint", "https://m1.example"), ("mint", "https://m2.example"), ("version", "0.2.0"),
    )  # fmt: skip
    content = json.loads(built.content)
    assert (content["name"], content["about"]) == ("Node A", "about A")
    assert content["models"] == [{"id": "gpt-4o", "prompt": 0.003, "completion": 0.012, "request": 2.0}]
    # Without a public URL there is nothing to announce.
    assert announcement.build(settings_for(HTTP_URL=""), "d-1", "0.2.0", catalog) is None


def test_public_https_is_what_getbased_accepts():
    assert announcement.is_public_https("https://node.example")
    assert announcement.is_public_https("https://8.8.8.8:8443")
    for url in (
        "http://node.example",
        "https://localhost",
        "https://127.0.0.1",
        "https://192.168.1.2",
        "https://[::1]",
    ):
        assert not announcement.is_public_https(url), url


def test_parse_provider_tolerates_junk():
    tags = [["d", "x"], ["u", "https://b.example"], ["mint", "https://m/"], ["version", "1.0"], ["u"]]
    peer = announcement.parse_provider("ab" * 32, 123, tags, "not json")
    assert peer == bus.Provider(
        pubkey="ab" * 32, d="x", name="", about="", urls=("https://b.example",), mints=("https://m",),
        version="1.0", last_seen=123,
    )  # fmt: skip
    assert announcement.parse_provider("ab" * 32, 1, [["d", "x"]], "{}") is None  # no URL: unreachable
    assert announcement.parse_provider("ab" * 32, 1, [["u", "https://b"]], "{}") is None  # no d: not replaceable
    named = announcement.parse_provider("ab" * 32, 1, [["d", "x"], ["u", "https://b"]], '{"name":"B","about":7}')
    assert named is not None and (named.name, named.about) == ("B", "")


# ---- against a relay ---------------------------------------------------------------------------


async def test_announces_once_matching_info_and_models(make_node, relay, http):
    keys = Keys.generate()
    node = await make_node(
        services=("billing", "discovery", "gateway"), RELAYS=relay.url, NSEC=keys.secret_key().to_bech32(),
        HTTP_URL="https://node.example", ONION_URL="http://node.onion",
    )  # fmt: skip
    async with http.get(f"{node.url}/v1/info") as response:
        info = await response.json()
    async with http.get(f"{node.url}/v1/models") as response:
        listed = {m["id"]: m["sats_pricing"] for m in (await response.json())["data"]}
    # Exactly one current announcement, and it carries the catalog (the first one may have gone out before it).
    [event] = await relay.wait_for(lambda evs: len(evs) == 1 and "models" in json.loads(evs[0].content()))
    assert event.verify() and event.author().to_bech32() == info["npub"] == keys.public_key().to_bech32()
    tags = tags_of(event)
    assert tags["d"] == [info["provider_id"]] == [(await identity(node)).provider_id]
    assert tags["u"] == [info["http_url"], info["onion_url"]] == ["https://node.example", "http://node.onion"]
    assert tags["mint"] == info["mints"] == list(node.settings.cashu_mints)
    assert tags["version"] == [info["version"]]
    content = json.loads(event.content())
    assert (content["name"], content["about"]) == (info["name"], info["description"])
    assert content["models"] and all(
        (m["prompt"], m["completion"], m["request"])
        == (listed[m["id"]]["prompt"], listed[m["id"]]["completion"], listed[m["id"]]["request"])
        for m in content["models"]
    )
    async with http.get(f"{node.urls['discovery']}/metrics") as response:
        metrics = await response.text()
    assert f'routstr_relay_publish_total{{outcome="ok",relay="{relay.url}"}}' in metrics
    assert f'routstr_relay_connected{{relay="{relay.url}"}} 1.0' in metrics


async def test_change_replaces_the_announcement(make_node, relay, mint):
    nsec = Keys.generate().secret_key().to_bech32()
    env = {"RELAYS": relay.url, "NSEC": nsec, "HTTP_URL": "https://node.example"}
    first = await make_node(services=("discovery",), **env)
    [old] = await relay.wait_for(lambda evs: len(evs) == 1)
    await first.stop()
    await make_node(services=("discovery",), CASHU_MINTS=f"{mint.url},https://other-mint.example", **env)
    [new] = await relay.wait_for(lambda evs: len(evs) == 1 and len(tags_of(evs[0])["mint"]) == 2)
    assert tags_of(new)["d"] == tags_of(old)["d"]
    assert new.created_at().as_secs() > old.created_at().as_secs()
    assert tags_of(new)["mint"] == [mint.url, "https://other-mint.example"]


async def test_relay_down_at_start_gets_it_when_back(make_node, http):
    relay = Relay(free_port())
    try:
        node = await make_node(services=("discovery",), RELAYS=relay.url, HTTP_URL="https://node.example")
        await asyncio.sleep(1.5)  # the node has tried and failed by now
        async with http.get(f"{node.urls['discovery']}/readyz") as response:
            assert response.status == 200  # a relay being down is not a reason to be unready
        async with http.get(f"{node.urls['discovery']}/metrics") as response:
            assert f'routstr_relay_connected{{relay="{relay.url}"}} 0.0' in await response.text()
        await relay.start()
        await relay.wait_for(lambda evs: len(evs) == 1, timeout=10)
        # Reading peers also resumes once the relay is there.
        peer = EventBuilder(Kind(KIND), "{}").tags([Tag.identifier("p"), Tag.custom("u", ["https://p.example"])])
        await relay.publish(peer.finalize(Keys.generate()))
        found = await eventually(lambda: providers(node), lambda found: found.providers)
        assert [p.urls for p in found.providers] == [("https://p.example",)]
    finally:
        relay.stop()


async def test_no_key_no_url_starts_and_says_why(make_node, relay, caplog):
    caplog.set_level(logging.WARNING, logger="services.discovery")
    node = await make_node(services=("discovery",), RELAYS=relay.url)
    me = await identity(node)
    assert me.npub.startswith("npub1")
    assert any("not announcing" in r.getMessage() and "HTTP_URL" in r.getMessage() for r in caplog.records)
    await asyncio.sleep(1.0)
    assert await relay.events() == []
    # The generated key was stored: a restart (or a replica) uses the same one.
    await node.stop()
    again = await make_node(services=("discovery",), RELAYS=relay.url)
    assert (await identity(again)).npub == me.npub


@pytest.mark.parametrize("nsec", ["nsec1notakey", "zz" * 32, "abc"])
async def test_malformed_nsec_fails_at_start(make_node, nsec):
    with pytest.raises(ConfigError, match="NSEC") as failure:
        await make_node(services=("discovery",), NSEC=nsec)
    assert nsec not in str(failure.value)


def test_non_websocket_relay_fails_at_start():
    with pytest.raises(ConfigError, match="RELAYS"):
        load_settings({"RELAYS": "wss://ok.example,https://relay.example"}, dotenv=None)


async def test_peers_show_up(make_node, relay):
    node = await make_node(services=("discovery",), RELAYS=relay.url, HTTP_URL="https://node.example")
    other = Keys.generate()
    tags = [Tag.identifier("peer-1"), Tag.custom("u", ["https://peer.example"]), Tag.custom("mint", ["https://pm"])]
    body = json.dumps({"name": "Peer", "about": "another node"})
    await relay.publish(EventBuilder(Kind(KIND), body).tags([*tags, Tag.custom("version", ["9.9.9"])]).finalize(other))
    seen = await eventually(lambda: providers(node), lambda found: found.providers)
    seen = seen.providers
    assert [(p.pubkey, p.d, p.name, p.urls, p.mints, p.version) for p in seen] == [
        (other.public_key().to_hex(), "peer-1", "Peer", ("https://peer.example",), ("https://pm",), "9.9.9")
    ]


def priced_catalog(revision: str, prompt_msat_per_m: int) -> bus.Catalog:
    model = bus.ModelEntry(
        id="gpt-4o", name="GPT-4o", upstream_id="gpt-4o", context_length=1000, max_completion_tokens=100,
        architecture={}, usd={}, price=bus.Price(prompt_msat_per_m=prompt_msat_per_m),
    )  # fmt: skip
    return bus.Catalog(models=(model,), btc_usd="100000", fixed_pricing=False, revision=revision)


async def test_catalog_change_event_republishes_with_new_prices(make_node, relay, nats_server):
    """Billing's side of the bus contract is played here, so the test decides when prices change."""
    nc = await connect(nats_server.url, "billing-stand-in")
    current = {"catalog": priced_catalog("r1", 1_000_000)}

    async def answer(message):
        return current["catalog"]

    try:
        billing = Responder(nc, "billing")
        await billing.serve(bus.BILLING_MODELS, answer)
        await billing.ready()  # subscribed before discovery asks
        await make_node(services=("discovery",), RELAYS=relay.url, HTTP_URL="https://node.example")

        def prompt_price(events) -> float | None:
            models = json.loads(events[0].content()).get("models") if len(events) == 1 else None
            return models[0]["prompt"] if models else None

        [first] = await relay.wait_for(lambda evs: prompt_price(evs) == 0.001)
        current["catalog"] = priced_catalog("r2", 3_000_000)
        await nc.publish(bus.EVENT_CATALOG_CHANGED, b"")
        [second] = await relay.wait_for(lambda evs: prompt_price(evs) == 0.003, timeout=5)
        assert tags_of(second)["d"] == tags_of(first)["d"]
        assert second.created_at().as_secs() > first.created_at().as_secs()
    finally:
        await nc.close()
