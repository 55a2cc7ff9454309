"""The gateway as an OpenAI-compatible streaming proxy, through its public HTTP API."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from devstack.processes import free_port
from services.gateway.credentials import sha256_hex
from shared import bus, messaging
from tests.support.keys import funded_key

CORE = ("billing", "wallet", "gateway")
CHAT = "/v1/chat/completions"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def balance(http: aiohttp.ClientSession, node, key: str) -> dict:
    async with http.get(f"{node.url}/v1/balance/info", headers=auth(key)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def settled_balance(http, node, key: str, expect_reserved: int = 0) -> dict:
    """Balance once every reservation is settled (settlement may trail the response by a moment)."""
    for _ in range(100):
        info = await balance(http, node, key)
        if info["reserved"] == expect_reserved:
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"reservation never settled: {info}")


def sse_events(text: str) -> list[str]:
    return [block[len("data: ") :] for block in text.split("\n\n") if block.startswith("data: ")]


@pytest.fixture
async def node(make_node):
    return await make_node(CORE, FIXED_PRICING="true", FIXED_COST_PER_REQUEST="1",
                           FIXED_PER_1K_INPUT_TOKENS="2", FIXED_PER_1K_OUTPUT_TOKENS="10")  # fmt: skip


async def test_chat_completion_is_proxied_billed_and_reports_cost(node, http):
    key = await funded_key(node.settings.nats_url, 100_000)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi [[tokens:20]]"}], "max_tokens": 50}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 200, await response.text()
        data = await response.json()
        headers = response.headers
    usage = data["usage"]
    assert data["choices"][0]["message"]["content"].startswith("w0 w1")
    assert usage["completion_tokens"] == 20
    # FIXED pricing: 1 sat per request + 2 sats / 1k prompt + 10 sats / 1k completion, in msat, rounded up.
    expected = 1000 + -(-usage["prompt_tokens"] * 2000 // 1000) + 20 * 10
    assert usage["cost"]["total_msats"] == expected
    assert data["cost"]["total_msats"] == expected
    assert usage["sats_cost"] == usage["cost_sats"] == expected / 1000
    assert headers["X-Routstr-Cost-Msats"] == str(expected)
    # USD at the test's BTC_USD_RATE of 100000: 1 msat = 1e-6 USD.
    assert data["cost"]["total_usd"] == pytest.approx(expected * 1e-6)
    assert float(headers["X-Routstr-Cost-Usd"]) == pytest.approx(expected * 1e-6)
    assert len(headers["X-Routstr-Request-Id"]) == 32
    info = await settled_balance(http, node, key)
    assert info["balance"] == 100_000 - expected
    assert usage["remaining_balance_msats"] == info["balance"]
    assert info["total_requests"] == 1 and info["total_spent"] == expected


async def test_stream_passes_chunks_through_and_adds_usage_only_when_asked(node, http):
    key = await funded_key(node.settings.nats_url, 100_000)
    body = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 100,
            "messages": [{"role": "user", "content": "[[tokens:6]]"}]}  # fmt: skip
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await response.text())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "".join(
        f"w{i} " for i in range(6)
    )
    assert not any(c.get("usage") for c in chunks), "the client did not ask for usage"
    first = 100_000 - (await settled_balance(http, node, key))["balance"]
    assert first > 1000, "a stream without client-visible usage is still billed"

    body["stream_options"] = {"include_usage": True}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        events = sse_events(await response.text())
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert usage_chunk["usage"]["cost"]["total_msats"] == first and usage_chunk["cost"]["total_msats"] == first
    info = await settled_balance(http, node, key)
    assert info["balance"] == 100_000 - 2 * first
    assert usage_chunk["usage"]["remaining_balance_msats"] == info["balance"]


async def test_stream_arrives_chunk_by_chunk_not_buffered(node, http):
    key = await funded_key(node.settings.nats_url, 100_000)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "[[tokens:4]] [[slow:2]]"}]}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = await response.content.readuntil(b"\n\n")
        first_at = loop.time() - started
        await response.read()
        total = loop.time() - started
    assert b"assistant" in first
    assert first_at < total / 2, f"first event after {first_at:.2f}s of {total:.2f}s: the stream was buffered"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": b"{not json"}, 400, "invalid_json"),
        ({"data": b"[1, 2]"}, 400, "invalid_body"),
        ({"json": {"messages": []}}, 400, "missing_model"),
        ({"json": {"model": 5, "messages": []}}, 400, "invalid_model"),
    ],
)
async def test_bad_bodies_get_openai_errors_and_cost_nothing(node, http, kwargs, status, code):
    key = await funded_key(node.settings.nats_url, 50_000)
    headers = {**auth(key), "Content-Type": "application/json"}
    async with http.post(f"{node.url}{CHAT}", headers=headers, **kwargs) as response:
        assert response.status == status
        body = await response.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert (await balance(http, node, key))["balance"] == 50_000


async def test_auth_errors(node, http):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(f"{node.url}{CHAT}", json=body) as response:
        assert response.status == 401
        assert (await response.json())["error"]["type"] == "authentication_error"
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth("sk-" + "0" * 64)) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unknown_key"
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth("not-a-key")) as response:
        assert response.status == 401
    async with http.post(f"{node.url}{CHAT}", json=body, headers={"X-Cashu": "garbage"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_token"


async def test_unknown_path_method_and_oversized_body(make_node, http):
    node = await make_node(CORE, FIXED_PRICING="true", MAX_BODY_BYTES="2048")
    async with http.get(f"{node.url}/nope") as response:
        assert response.status == 404
        assert "Unknown path" in (await response.json())["error"]["message"]
    async with http.delete(f"{node.url}{CHAT}") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
    key = await funded_key(node.settings.nats_url, 50_000)
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 4096}]}
    async with http.post(f"{node.url}{CHAT}", json=big, headers=auth(key)) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "body_too_large"
    assert (await balance(http, node, key))["balance"] == 50_000


async def test_dead_upstream_is_502_and_free(make_node, http):
    node = await make_node(CORE, FIXED_PRICING="true", UPSTREAM_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    key = await funded_key(node.settings.nats_url, 50_000)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_unavailable"
    info = await settled_balance(http, node, key)
    assert info["balance"] == 50_000 and info["total_spent"] == 0


async def test_slow_upstream_times_out_as_504_and_free(make_node, http):
    node = await make_node(CORE, FIXED_PRICING="true", UPSTREAM_TIMEOUT="1")
    key = await funded_key(node.settings.nats_url, 50_000)
    body = {"model": "m", "messages": [{"role": "user", "content": "[[slow:3]]"}]}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"
    assert (await settled_balance(http, node, key))["balance"] == 50_000


async def test_upstream_error_is_relayed_in_openai_shape_and_free(node, http):
    key = await funded_key(node.settings.nats_url, 50_000)
    for directive, status in (("[[fail:400]]", 400), ("[[fail:500]]", 502), ("[[fail:429]]", 429)):
        body = {"model": "m", "messages": [{"role": "user", "content": directive}]}
        async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
            assert response.status == status
            error = (await response.json())["error"]
            assert error["message"] == "the stub upstream failed on purpose"
    assert (await settled_balance(http, node, key))["balance"] == 50_000


async def test_midstream_failure_reports_error_in_stream_and_charges_only_what_arrived(node, http):
    key = await funded_key(node.settings.nats_url, 100_000)
    body = {"model": "m", "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "[[tokens:40]] [[midfail]]"}]}  # fmt: skip
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        events = sse_events(await response.text())
    error = json.loads(events[-2])
    assert error["error"]["code"] == "upstream_error" and events[-1] == "[DONE]"
    info = await settled_balance(http, node, key)
    charged = 100_000 - info["balance"]
    # 20 of 40 words arrived ("wN " ~ 3-4 chars each): a few tokens, never the 200-token reservation.
    assert 1000 < charged < 1000 + 200 * 10 // 2
    assert info["total_spent"] == charged


async def test_client_credentials_never_reach_upstream(node, http):
    """The stub rejects any key but the node's: a forwarded client key would turn into a 502."""
    key = await funded_key(node.settings.nats_url, 50_000)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 200


async def test_embeddings_completions_and_responses_are_proxied(node, http):
    key = await funded_key(node.settings.nats_url, 100_000)
    cases = [
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello"}, "data"),
        ("/v1/completions", {"model": "m", "prompt": "say [[tokens:3]]"}, "choices"),
        ("/v1/responses", {"model": "m", "input": "say [[tokens:3]]"}, "output"),
    ]
    for path, body, field in cases:
        async with http.post(f"{node.url}{path}", json=body, headers=auth(key)) as response:
            assert response.status == 200, await response.text()
            data = await response.json()
            assert data[field] and data["cost"]["total_msats"] > 0
    info = await settled_balance(http, node, key)
    assert info["total_requests"] == 3


async def test_other_reads_pass_through_for_a_known_key_only(node, http):
    key = await funded_key(node.settings.nats_url, 1000)
    async with http.get(f"{node.url}/v1/files") as response:
        assert response.status == 401
    async with http.get(f"{node.url}/v1/files", headers=auth(key)) as response:
        assert response.status == 404  # relayed from the upstream, which has no files API
    assert (await balance(http, node, key))["balance"] == 1000


async def test_cors_preflight_and_exposed_headers(node, http):
    headers = {
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, x-cashu, content-type, x-routstr-model",
    }  # fmt: skip
    async with http.options(f"{node.url}{CHAT}", headers=headers) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "x-cashu" in response.headers["Access-Control-Allow-Headers"].lower()
    async with http.get(f"{node.url}/v1/balance/info", headers={"Origin": "https://app.example"}) as response:
        exposed = response.headers["Access-Control-Expose-Headers"].lower()
    for name in ("x-cashu", "x-routstr-request-id", "x-routstr-cost-msats"):
        assert name in exposed


async def test_ops_endpoints(node, http):
    async with http.get(f"{node.url}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{node.url}/readyz") as response:
        assert response.status == 200 and (await response.json())["checks"]["nats"] is True
    async with http.get(f"{node.urls['gateway_metrics']}/metrics") as response:
        assert "routstr_http_requests_total" in await response.text()
    async with http.get(f"{node.url}/metrics") as response:
        assert response.status == 404  # not on the public port


async def test_client_disconnect_stops_the_stream_and_charges_only_what_was_sent(node, http):
    key = await funded_key(node.settings.nats_url, 100_000)
    body = {"model": "m", "stream": True, "max_tokens": 400,
            "messages": [{"role": "user", "content": "[[tokens:400]] [[slow:8]]"}]}  # fmt: skip
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        await response.content.readuntil(b"\n\n")
        await response.content.readuntil(b"\n\n")
        response.close()  # the client walks away after two events
    info = await settled_balance(http, node, key)
    charged = 100_000 - info["balance"]
    # Estimated from what reached the client: the per-request price and a few tokens, far below the
    # 400-token reservation (4000 msat) and far below what the full answer would have cost.
    assert 1000 <= charged < 1000 + 2000
    assert info["total_requests"] == 1 and info["total_spent"] == charged


async def test_inbound_rate_limit_answers_429_in_each_shape(make_node, http):
    node = await make_node(CORE, FIXED_PRICING="true", RATE_LIMIT_PER_MINUTE="3", TRUSTED_PROXIES="127.0.0.1/32")
    key = await funded_key(node.settings.nats_url, 50_000)
    for _ in range(3):
        async with http.get(f"{node.url}/v1/balance/info", headers=auth(key)) as response:
            assert response.status == 200
    async with http.get(f"{node.url}/v1/balance/info", headers=auth(key)) as response:
        assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
        assert "Rate limited" in (await response.json())["detail"]
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(f"{node.url}{CHAT}", json=body, headers=auth(key)) as response:
        assert response.status == 429
        assert (await response.json())["error"]["code"] == "rate_limited"
    async with http.get(f"{node.url}/healthz") as response:
        assert response.status == 200  # probes are never limited
    # Another client (as its trusted proxy reports it) has its own allowance.
    other = {**auth(key), "X-Forwarded-For": "203.0.113.7"}
    async with http.get(f"{node.url}/v1/balance/info", headers=other) as response:
        assert response.status == 200
    assert (await balance_unlimited(node, key)) == 50_000


async def balance_unlimited(node, key: str) -> int:

    nc = await messaging.connect(node.settings.nats_url, "test")
    try:
        info = await messaging.request(nc, bus.BILLING_KEY_INFO, bus.KeyQuery(sha256_hex(key)), bus.KeyInfo)
    finally:
        await nc.drain()
    return info.balance_msat


async def test_messages_api_without_an_anthropic_provider_is_a_clear_400(node, http):
    """Only OpenAI-shaped providers: Anthropic's Messages API is refused as a configuration, not a 503 to retry."""
    key = await funded_key(node.settings.nats_url, 50_000)
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(f"{node.url}/v1/messages", headers=auth(key), json=body) as response:
        assert response.status == 400 and "Retry-After" not in response.headers
        assert (await response.json())["error"]["code"] == "unsupported_api"
    assert (await balance(http, node, key))["balance"] == 50_000
