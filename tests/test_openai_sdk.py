"""The official OpenAI Python SDK against the node: a cashuB token as api_key, an sk- key, and X-Cashu."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from tests.support.keys import funded_key

PRICES = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "1",
          "FIXED_PER_1K_OUTPUT_TOKENS": "1"}  # fmt: skip
MESSAGES = [{"role": "user", "content": "hello [[tokens:5]]"}]


@pytest.fixture
async def node(make_node):
    return await make_node(("billing", "wallet", "gateway"), **PRICES)


async def _exercise(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
    assert completion.choices[0].message.content == "w0 w1 w2 w3 w4 "
    assert completion.usage.completion_tokens == 5
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "w0 w1 w2 w3 w4 " and usage.completion_tokens == 5
    assert usage.model_extra["cost"]["total_msats"] > 0


async def test_sdk_with_sk_key(node):
    key = await funded_key(node.settings.nats_url, 100_000)
    await _exercise(openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=key))


async def test_sdk_with_cashu_token_as_api_key(node, client_wallet):
    token = await client_wallet.token(30)
    await _exercise(openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=token))


async def test_sdk_with_x_cashu_default_headers(node, client_wallet):
    for stream in (False, True):
        token = await client_wallet.token(20)
        client = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="x-cashu", default_headers={"X-Cashu": token})
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=stream
        )
        if stream:
            async for _ in raw.parse():
                pass
            async with aiohttp.ClientSession() as http:
                for _ in range(50):
                    async with http.post(f"{node.url}/v1/balance/refund", headers={"X-Cashu": token}) as response:
                        if response.status == 200:
                            change = response.headers["X-Cashu"]
                            break
                    await asyncio.sleep(0.1)
        else:
            change = raw.headers["x-cashu"]
        assert 15 <= await client_wallet.receive(change) < 20


async def test_sdk_sees_402_as_an_api_error(node):
    key = await funded_key(node.settings.nats_url, 10)
    client = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 402


async def test_sdk_lists_and_retrieves_models_and_gets_json_errors_for_wrong_methods(node, http):
    key = await funded_key(node.settings.nats_url, 100_000)
    client = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=key, max_retries=0)
    listed = {model.id: model for model in (await client.models.list()).data}
    assert "gpt-4o-mini" in listed
    for model_id in ("gpt-4o-mini", next(i for i in listed if "/" in i)):  # an id with a slash routes too
        model = await client.models.retrieve(model_id)
        assert (
            model.id == model_id and model.model_extra["sats_pricing"] == listed[model_id].model_extra["sats_pricing"]
        )
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"
    # A GET on one of the node's own POST routes is the node's 405 (or 404), as JSON, never the upstream's text.
    headers = {"Authorization": f"Bearer {key}"}
    for path, status, shape in (("/v1/chat/completions", 405, "error"), ("/v1/balance/topup", 405, "detail"),
                                ("/v1/balance/no-such-thing", 404, "detail")):  # fmt: skip
        async with http.get(f"{node.url}{path}", headers=headers) as response:
            assert (response.status, response.content_type) == (status, "application/json"), path
            assert shape in await response.json(), path
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
    assert completion.choices[0].message.content  # the POST routes still answer
