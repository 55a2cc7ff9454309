"""The operator's admin API through HTTP: sessions and tokens, money (balances, withdrawal), the
request log and its aggregates, live model edits and settings. Real NATS, Postgres and mint."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg

from services.billing import app as billing_app
from tests.support.keys import reconcile
from tests.test_discovery import relay  # noqa: F401 (a fixture)
from tests.test_gateway import CHAT, auth
from tests.test_wallet import lnurl_service  # noqa: F401 (a fixture)

CORE = ("billing", "wallet", "gateway")
PASSWORD = "correct horse battery"
PRICES = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "1",
          "FIXED_PER_1K_OUTPUT_TOKENS": "1"}  # fmt: skip
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


async def login(http, url: str, password: str = PASSWORD) -> str:
    async with http.post(f"{url}/admin/api/login", json={"password": password}) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["ok"] is True and body["expires_in"] == 3600
    return body["token"]


async def call(http, method: str, url: str, token: str | None = None, **kwargs) -> tuple[int, object]:
    headers = {**kwargs.pop("headers", {}), **(auth(token) if token else {})}
    async with http.request(method, url, headers=headers, **kwargs) as response:
        return response.status, await response.json()


async def test_admin_is_off_without_a_password(make_node, http):
    node = await make_node(("billing", "gateway"))
    for method, path in (("POST", "/admin/api/login"), ("GET", "/admin/api/balances"), ("GET", "/admin/")):
        async with http.request(method, f"{node.url}{path}", json={"password": "x"}) as response:
            assert response.status == 404, path
            assert "ADMIN_PASSWORD" in (await response.json())["detail"]


async def test_sessions_cli_tokens_password_rotation_and_replicas(make_node, http):
    # The forged X-Forwarded-For below stands for a trusted proxy's: failed logins are counted per client.
    node = await make_node(("billing", "gateway"), ADMIN_PASSWORD=PASSWORD, TRUSTED_PROXIES="127.0.0.1/32")
    other = await make_node(("gateway",), ADMIN_PASSWORD=PASSWORD)  # a second replica, same NATS and Postgres
    url = node.url
    assert await call(http, "GET", f"{url}/admin/api/balances") == (403, {"detail": "Unauthorized"})
    assert await call(http, "GET", f"{url}/admin/api/settings", "rss_forged") == (403, {"detail": "Unauthorized"})
    status, body = await call(http, "POST", f"{url}/admin/api/login", json={"password": "wrong"},
                              headers={"X-Forwarded-For": "10.0.0.1"})  # fmt: skip
    assert (status, body) == (401, {"detail": "Invalid password"})

    token = await login(http, url)
    status, settings = await call(http, "GET", f"{other.url}/admin/api/settings", token)  # another replica
    assert status == 200
    assert settings["admin_password"] == "[REDACTED]" and settings["upstream_api_key"] == "[REDACTED]"
    assert PASSWORD not in str(settings) and "stub-upstream-key" not in str(settings)

    # CLI tokens: shown once, listed by preview only, revocable everywhere at once.
    status, created = await call(http, "POST", f"{url}/admin/api/cli-tokens", token,
                                 json={"name": "ci", "expires_in_days": 7})  # fmt: skip
    assert status == 200 and created["token"].startswith("rsa_") and created["expires_at"]
    status, listed = await call(http, "GET", f"{other.url}/admin/api/cli-tokens", created["token"])
    assert status == 200 and [t["name"] for t in listed] == ["ci"]
    assert created["token"] not in str(listed) and listed[0]["last_used_at"]
    assert (await call(http, "POST", f"{url}/admin/api/cli-tokens", token, json={"name": ""}))[0] == 400
    assert await call(http, "DELETE", f"{url}/admin/api/cli-tokens/{created['id']}", token) == (
        200, {"ok": True, "deleted_id": created["id"]})  # fmt: skip
    assert (await call(http, "GET", f"{other.url}/admin/api/cli-tokens", created["token"]))[0] == 403

    # Password rotation: too short, wrong current, then right; other sessions end, the old password fails.
    second = await login(http, url)
    path = f"{url}/admin/api/password"
    assert (await call(http, "PATCH", path, token, json={"current_password": PASSWORD, "new_password": "x"}))[0] == 400
    assert (await call(http, "PATCH", path, token, json={"current_password": "nope", "new_password": "y" * 12}))[
        0
    ] == 401
    status, body = await call(http, "PATCH", path, token, json={"current_password": PASSWORD, "new_password": "n" * 12})
    assert status == 200 and body["ok"] is True
    assert (await call(http, "GET", f"{url}/admin/api/settings", second))[0] == 403
    assert (await call(http, "GET", f"{url}/admin/api/settings", token))[0] == 200
    assert (await call(http, "POST", f"{url}/admin/api/login", json={"password": PASSWORD}))[0] == 401
    await login(http, url, "n" * 12)

    # Settings: the live ones change at once, the others say they need a restart.
    status, body = await call(http, "PATCH", f"{node.url}/admin/api/settings", token,
                              json={"payout_threshold_sats": 5000, "receive_ln_address": "op@example.com"})  # fmt: skip
    assert status == 200 and body["payout_threshold_sats"] == 5000 and body["receive_ln_address"] == "op@example.com"
    assert "payout_threshold_sats" in body["runtime_settings"]
    status, body = await call(http, "PATCH", f"{node.url}/admin/api/settings", token, json={"port": 9})
    assert status == 400 and "restart" in body["detail"]
    status, body = await call(http, "PATCH", f"{node.url}/admin/api/settings", token, json={"exchange_fee": "abc"})
    assert status == 400
    _, now = await call(http, "GET", f"{node.url}/admin/api/settings", token)
    assert now["exchange_fee"] == "1.005" and now["payout_threshold_sats"] == 5000

    # Failed logins are limited per client address (across replicas: the count is in Postgres).
    headers = {"X-Forwarded-For": "10.9.9.9"}
    for _ in range(5):
        status, _ = await call(http, "POST", f"{url}/admin/api/login", json={"password": "no"}, headers=headers)
        assert status == 401
    async with http.post(f"{url}/admin/api/login", json={"password": "n" * 12}, headers=headers) as response:
        assert response.status == 429 and int(response.headers["Retry-After"]) > 0
    await login(http, url, "n" * 12)  # another address is not locked out

    # An expired token is refused like a revoked one.
    status, expiring = await call(http, "POST", f"{url}/admin/api/cli-tokens", token, json={"name": "short"})
    assert (await call(http, "GET", f"{url}/admin/api/balances", expiring["token"]))[0] == 200
    conn = await asyncpg.connect(node.settings.database_url)
    try:
        await conn.execute("UPDATE billing.admin_tokens SET expires_at = now() - interval '1 second' WHERE id = $1",
                           expiring["id"])  # fmt: skip
        stored = await conn.fetchval("SELECT string_agg(token_hash, ' ') FROM billing.admin_tokens")
    finally:
        await conn.close()
    assert await call(http, "GET", f"{other.url}/admin/api/balances", expiring["token"]) == (
        403, {"detail": "Unauthorized"})  # fmt: skip
    assert expiring["token"] not in stored and token not in stored  # only hashes are kept

    # Logout revokes the session on every replica.
    assert await call(http, "POST", f"{url}/admin/api/logout", token) == (200, {"ok": True})
    assert (await call(http, "GET", f"{other.url}/admin/api/settings", token))[0] == 403


async def paid_call(http, node, key: str) -> str:
    async with http.post(f"{node.url}{CHAT}", json=HELLO, headers=auth(key)) as response:
        assert response.status == 200, await response.text()
        return response.headers["X-Routstr-Request-Id"]


async def wait_for(check, timeout: float = 10.0):
    for _ in range(int(timeout / 0.05)):
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("condition never met")


async def test_withdraw_takes_only_the_operators_share_idempotently(make_node, http, client_wallet):
    node = await make_node(CORE, ADMIN_PASSWORD=PASSWORD, **PRICES)
    token = await login(http, node.url)
    async with http.get(f"{node.url}/v1/balance/create",
                        params={"initial_balance_token": await client_wallet.token(40)}) as response:  # fmt: skip
        key = (await response.json())["api_key"]
    request_ids = [await paid_call(http, node, key) for _ in range(8)]

    async def owner_balance():
        status, rows = await call(http, "GET", f"{node.url}/admin/api/balances", token)
        assert status == 200
        row = rows[0]
        return row if row["owner_balance"] >= 8000 else None

    before = await wait_for(owner_balance)
    assert before["wallet_balance"] == 40_000 and before["mint_url"] == node.settings.cashu_mints[0]
    assert before["user_balance"] + before["owner_balance"] == 40_000

    # More than the operator's share: refused, nothing moved.
    status, body = await call(http, "POST", f"{node.url}/admin/withdraw", token, json={"amount": 60, "unit": "sat"},
                              headers={"Idempotency-Key": "too-much-1"})  # fmt: skip
    assert status == 400 and "operator's share" in body["detail"]
    assert (await call(http, "POST", f"{node.url}/admin/withdraw", token, json={"amount": -1}))[0] == 400
    idem = {"Idempotency-Key": f"withdraw-{uuid.uuid4()}"}
    status, first = await call(http, "POST", f"{node.url}/admin/withdraw", token, json={"amount": 3}, headers=idem)
    assert status == 200, first
    assert first["token"].startswith("cashu") and first["amount"] == 3 and first["status"] == "paid"
    again = await call(http, "POST", f"{node.url}/admin/withdraw", token, json={"amount": 3}, headers=idem)
    assert again == (200, first)  # a retry returns the same token, moves nothing twice
    assert await client_wallet.receive(first["token"]) == 3

    # Concurrent withdrawals (distinct keys), each within the share but not together: one wins.
    async def attempt(i: int):
        headers = {"Idempotency-Key": f"race-{i}-{uuid.uuid4()}"}
        return await call(http, "POST", f"{node.url}/admin/withdraw", token, json={"amount": 3}, headers=headers)

    raced = await asyncio.gather(*(attempt(i) for i in range(5)))
    assert sorted(status for status, _ in raced) == [200, 400, 400, 400, 400], raced

    status, rows = await call(http, "GET", f"{node.url}/admin/api/balances", token)
    assert rows[0]["wallet_balance"] == 34_000 and rows[0]["owner_balance"] == before["owner_balance"] - 6000
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered, result
    assert (result.paid_out_msat, result.refunded_msat) == (6000, 0), result  # a payout, not a user's refund

    status, ledger = await call(http, "GET", f"{node.url}/admin/api/transactions?type=withdraw", token)
    assert status == 200 and ledger["total"] == 2 and ledger["transactions"][0]["amount"] == 3000
    assert ledger["transactions"][0]["from_account"] == "revenue"

    # The request log: one row per paid call, no key, found by request id; aggregates over it.
    status, logs = await call(http, "GET", f"{node.url}/admin/api/logs?request_id={request_ids[0]}", token)
    assert status == 200 and logs["total"] == 1
    row = logs["logs"][0]
    assert row["model"] and row["status"] == 200 and row["cost_msats"] > 0 and row["latency_ms"] >= 0
    assert key not in str(logs) and row["key_hash_prefix"] and len(row["key_hash_prefix"]) == 8
    status, summary = await call(http, "GET", f"{node.url}/admin/api/usage/summary?hours=1", token)
    assert summary["total_requests"] == 8 and summary["failed_requests"] == 0
    assert summary["revenue_msats"] == before["owner_balance"]
    status, by_model = await call(http, "GET", f"{node.url}/admin/api/usage/revenue-by-model?hours=24", token)
    assert sum(m["requests"] for m in by_model["models"]) == 8
    status, dashboard = await call(http, "GET", f"{node.url}/admin/api/usage/dashboard?hours=24", token)
    assert sum(h["requests"] for h in dashboard["hourly"]) == 8
    assert (await call(http, "GET", f"{node.url}/admin/api/usage/error-details?hours=9000", token))[0] == 400
    status, keys = await call(http, "GET", f"{node.url}/admin/api/temporary-balances", token)
    assert keys["total"] == 1 and keys["balances"][0]["total_requests"] == 8

    # The wallet down: a withdrawal is refused with 503 and Retry-After, and nothing moves.
    await node.runners.pop(1).cleanup()  # services start in CORE's order: billing, wallet, gateway
    async with http.post(f"{node.url}/admin/withdraw", json={"amount": 1}, headers={
            **auth(token), "Idempotency-Key": f"down-{uuid.uuid4()}"}) as response:  # fmt: skip
        assert response.status == 503 and response.headers["Retry-After"]
    status, ledger = await call(http, "GET", f"{node.url}/admin/api/transactions?type=withdraw", token)
    assert ledger["total"] == 2
    status, rows = await call(http, "GET", f"{node.url}/admin/api/balances", token)
    assert status == 200 and rows[0]["error"]


async def test_model_edits_reach_every_gateway_and_the_announcement_live(make_node, http, relay):  # noqa: F811
    node = await make_node(("billing", "discovery", "gateway"), ADMIN_PASSWORD=PASSWORD, RELAYS=relay.url,
                           HTTP_URL="https://node.example")  # fmt: skip
    other = await make_node(("gateway",), ADMIN_PASSWORD=PASSWORD)
    token = await login(http, node.url)
    for gateway in (node, other):  # warm both caches first
        async with http.get(f"{gateway.url}/v1/models") as response:
            assert "openai/gpt-4o" in {m["id"] for m in (await response.json())["data"]}
    path = f"{node.url}/admin/api/upstream-providers/upstream/models/openai/gpt-4o"
    _, before = await call(http, "GET", path, token)
    for bad in ({"pricing": {"prompt": -1}}, {"pricing": {"prompt": "cheap"}}, {"enabled": "yes"}, {"alias_ids": "x"},
                {"pricing": {"prompt": True}}, {"price": 1}):  # fmt: skip
        status, body = await call(http, "PATCH", path, token, json=bad)
        assert status == 400 and body["detail"], bad
    assert await call(http, "GET", path, token) == (200, before)  # nothing changed
    status, model = await call(http, "PATCH", path, token,
                               json={"pricing": {"prompt": "0.00001"}, "alias_ids": ["my-gpt"]})  # fmt: skip
    assert status == 200 and model["pricing"]["prompt"] == "0.00001" and "my-gpt" in model["alias_ids"]

    async def listed(gateway):
        async with http.get(f"{gateway.url}/v1/models") as response:
            return {m["id"]: m for m in (await response.json())["data"]}

    async def repriced():
        found = (await listed(other)).get("openai/gpt-4o")
        return found if found and found["pricing"]["prompt"] == 0.00001 else None

    found = await wait_for(repriced)
    assert found["id"] == "openai/gpt-4o"
    status, _ = await call(http, "PATCH", path, token, json={"enabled": False})
    assert status == 200

    async def gone():
        return "openai/gpt-4o" not in await listed(other)

    await wait_for(gone)

    def announced(events) -> set[str]:
        content = json.loads(events[0].content()) if len(events) == 1 else {}
        return {m["id"] for m in content.get("models", [])}

    await relay.wait_for(lambda evs: "openai/gpt-4o-mini" in announced(evs) and "openai/gpt-4o" not in announced(evs))
    status, body = await call(http, "DELETE", path, token)
    assert status == 200 and body["deleted_id"] == "openai/gpt-4o"


async def test_providers_are_created_edited_and_removed_with_keys_redacted(make_node, http, upstream):
    node = await make_node(("billing", "gateway"), ADMIN_PASSWORD=PASSWORD)
    token = await login(http, node.url)
    url = f"{node.url}/admin/api/upstream-providers"
    status, types = await call(http, "GET", f"{node.url}/admin/api/provider-types", token)
    assert status == 200 and {"openai", "anthropic", "ollama"} <= {t["id"] for t in types}
    for bad in ({"provider_type": "generic", "base_url": "ftp://x"}, {"provider_type": "nope", "base_url": upstream},
                {"provider_type": "generic", "base_url": upstream, "provider_fee": "cheap"}):  # fmt: skip
        status, body = await call(http, "POST", url, token, json={**bad, "slug": "second"})
        assert status == 400 and body["detail"], bad
    status, body = await call(http, "POST", url, token, json={"provider_type": "generic", "base_url": upstream,
                                                              "api_key": "stub-upstream-key"})  # fmt: skip
    assert status == 409, body  # the same base_url and api_key as the UPSTREAM_* provider
    status, created = await call(http, "POST", url, token, json={
        "slug": "second", "provider_type": "generic", "base_url": upstream, "api_key": "sk-other-secret",
        "provider_fee": 1.2, "priority": 5})  # fmt: skip
    assert status == 200 and created["api_key"] == "[REDACTED]" and created["slug"] == "second"
    status, listed = await call(http, "GET", url, token)
    assert [p["slug"] for p in listed] == ["upstream", "second"] and "sk-other-secret" not in str(listed)
    status, edited = await call(http, "PATCH", f"{url}/second", token, json={"enabled": False, "api_key": "[REDACTED]"})
    assert status == 200 and edited["enabled"] is False
    assert (await call(http, "PATCH", f"{url}/second", token, json={"base_url": "not a url"}))[0] == 400
    status, models = await call(http, "GET", f"{url}/upstream/models", token)
    assert status == 200 and {m["id"] for m in models["remote_models"]} >= {"openai/gpt-4o-mini"}
    assert await call(http, "DELETE", f"{url}/second", token) == (200, {"ok": True, "deleted_id": created["id"]})
    assert (await call(http, "GET", f"{url}/second", token))[0] == 404


async def test_revenue_above_the_threshold_is_paid_to_the_lightning_address(
    make_node,
    http,
    client_wallet,
    fee_mint,
    lnurl_service,  # noqa: F811 (the fixture imported above)
    monkeypatch,
):
    monkeypatch.setattr(billing_app, "ADMIN_EVERY", 0.3)
    address, quotes = await lnurl_service(fee_mint.url)  # another mint's invoice: a real outgoing payment
    node = await make_node(CORE, ADMIN_PASSWORD=PASSWORD, RECEIVE_LN_ADDRESS=address, PAYOUT_THRESHOLD_SATS="2",
                           **PRICES)  # fmt: skip
    token = await login(http, node.url)
    async with http.get(f"{node.url}/v1/balance/create",
                        params={"initial_balance_token": await client_wallet.token(40)}) as response:  # fmt: skip
        key = (await response.json())["api_key"]
    for _ in range(5):
        await paid_call(http, node, key)

    async def paid_out():
        _, body = await call(http, "GET", f"{node.url}/admin/api/withdrawals", token)
        return [w for w in body["withdrawals"] if w["status"] == "paid"]

    payouts = await wait_for(paid_out)
    assert payouts[0]["automatic"] and payouts[0]["method"] == "lightning"
    assert payouts[0]["lightning_address"] == address and payouts[0]["amount"] >= 2 and quotes
    result = await reconcile(node.settings.nats_url)
    assert result.difference_msat == 0 and result.covered, result
    assert result.paid_out_msat >= payouts[0]["amount"] * 1000 and result.refunded_msat == 0, result
    _, rows = await call(http, "GET", f"{node.url}/admin/api/balances", token)
    assert rows[0]["owner_balance"] < 2000 + 2000  # what is left is below threshold + fee reserve
