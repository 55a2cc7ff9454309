"""PATCH /admin/api/nsec: the operator replaces the node's Nostr key live, through billing and discovery."""

from __future__ import annotations

import json
import logging

from nostr_sdk import Keys

from tests.test_admin import PASSWORD, call, login
from tests.test_discovery import eventually, identity, relay, tags_of  # noqa: F401 (relay is a fixture)


async def npub_in_info(http, node) -> str:
    async with http.get(f"{node.url}/v1/info") as response:
        assert response.status == 200
        return (await response.json())["npub"]


async def test_operator_sets_and_clears_the_key_live(make_node, http, relay, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    node = await make_node(
        ("billing", "discovery", "gateway"), ADMIN_PASSWORD=PASSWORD, RELAYS=relay.url, HTTP_URL="https://n.example"
    )
    token = await login(http, node.url)
    url = f"{node.url}/admin/api/nsec"
    first = (await identity(node)).npub
    assert await npub_in_info(http, node) == first  # cached by the gateway from here on
    await relay.wait_for(lambda evs: any(e.author().to_bech32() == first for e in evs))

    keys = Keys.generate()
    nsec, npub = keys.secret_key().to_bech32(), keys.public_key().to_bech32()
    status, body = await call(http, "PATCH", url, token, json={"nsec": nsec})
    assert (status, body) == (200, {"ok": True, "npub": npub})
    assert (await identity(node)).npub == npub
    assert await npub_in_info(http, node) == npub  # the identity event refreshed the gateway's cache
    events = await relay.wait_for(lambda evs: any(e.author().to_bech32() == npub for e in evs))
    [event] = [e for e in events if e.author().to_bech32() == npub]
    assert event.verify() and event.kind().as_u16() == 38421
    assert tags_of(event)["u"] == ["https://n.example"] and "name" in json.loads(event.content())

    # Hex works too; bad keys change nothing; no or a wrong token is refused before anything is looked at.
    hex_keys = Keys.generate()
    status, body = await call(http, "PATCH", url, token, json={"nsec": hex_keys.secret_key().to_hex()})
    assert (status, body) == (200, {"ok": True, "npub": hex_keys.public_key().to_bech32()})
    status, body = await call(http, "PATCH", url, token, json={"nsec": nsec})
    assert (status, body) == (200, {"ok": True, "npub": npub})
    for bad in ({"nsec": "nsec1notakey"}, {"nsec": "ab" * 31}, {"nsec": 7}, {}, [1]):
        status, body = await call(http, "PATCH", url, token, json=bad)
        assert status == 400 and body["detail"], (bad, body)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with http.patch(url, json={"nsec": Keys.generate().secret_key().to_bech32()}, headers=headers) as r:
            assert (r.status, await r.json()) == (403, {"detail": "Unauthorized"})
    assert (await identity(node)).npub == npub and await npub_in_info(http, node) == npub

    # A discovery replica started now (or after a restart) uses the stored key.
    again = await make_node(("discovery",), RELAYS=relay.url, HTTP_URL="https://n.example")
    assert (await identity(again)).npub == npub

    # Empty clears: with NSEC unset, a freshly generated key (not the first one, not the operator's);
    # the other replica loads it on the identity event.
    status, body = await call(http, "PATCH", url, token, json={"nsec": ""})
    fresh = body["npub"]
    assert status == 200 and fresh not in (npub, first) and fresh.startswith("npub1")
    assert (await eventually(lambda: identity(again), lambda answer: answer.npub == fresh)).npub == fresh
    assert (await identity(node)).npub == fresh and await npub_in_info(http, node) == fresh

    secrets = (nsec, keys.secret_key().to_hex(), hex_keys.secret_key().to_hex())
    assert not any(secret in caplog.text for secret in secrets)


async def test_clearing_goes_back_to_the_configured_nsec(make_node, http):
    configured = Keys.generate()
    node = await make_node(
        ("billing", "discovery", "gateway"), ADMIN_PASSWORD=PASSWORD, NSEC=configured.secret_key().to_bech32()
    )
    token = await login(http, node.url)
    url = f"{node.url}/admin/api/nsec"
    chosen = Keys.generate()
    status, body = await call(http, "PATCH", url, token, json={"nsec": chosen.secret_key().to_bech32()})
    assert (status, body) == (200, {"ok": True, "npub": chosen.public_key().to_bech32()})  # wins over NSEC
    status, body = await call(http, "PATCH", url, token, json={"nsec": ""})
    assert (status, body) == (200, {"ok": True, "npub": configured.public_key().to_bech32()})
    assert await npub_in_info(http, node) == configured.public_key().to_bech32()
