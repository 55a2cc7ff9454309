"""The operator's dashboard in a real browser: Debian's chromium driven by Playwright.

Log in, change a model's price and see it in /v1/models, pay for calls, withdraw revenue and see the
ledger move. A screenshot of each page is left under the test's tmp folder for a human look.
"""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest
from playwright.async_api import async_playwright, expect

from tests.test_admin import HELLO, PASSWORD, wait_for
from tests.test_gateway import CHAT, auth

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")


async def test_dashboard_login_price_edit_and_withdrawal(make_node, http, client_wallet, tmp_path):
    node = await make_node(("billing", "wallet", "gateway"), ADMIN_PASSWORD=PASSWORD)
    async with http.get(f"{node.url}/v1/balance/create",
                        params={"initial_balance_token": await client_wallet.token(100)}) as response:  # fmt: skip
        key = (await response.json())["api_key"]
    outside: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda r: None if r.url.startswith(node.url) else outside.append(r.url))
        await page.goto(f"{node.url}/admin/")

        await page.fill("#password", "not it")
        await page.click("#login-form button")
        await expect(page.locator("#login-error")).to_have_text("Invalid password")
        await page.fill("#password", PASSWORD)
        await page.click("#login-form button")
        await expect(page.locator("#cards .stat").first).to_contain_text("Revenue")

        # Price: 0.002 USD a request (2 sats at 100k USD/BTC, times the operator's margin).
        await page.click("a[data-view=models]")
        await expect(page.locator('tr[data-provider="upstream"]')).to_have_count(1)
        await page.select_option("#provider-form [name=provider_type]", "generic")
        await page.fill("#provider-form [name=slug]", "spare")
        await page.fill("#provider-form [name=base_url]", "not a url")
        await page.click("#provider-form button")
        await expect(page.locator("#flash")).to_contain_text("base_url")
        await page.fill("#provider-form [name=base_url]", "http://127.0.0.1:9/v1")
        await page.click("#provider-form button")
        await expect(page.locator('tr[data-provider="spare"]')).to_have_count(1)
        await page.locator('tr[data-provider="spare"]').get_by_role("button", name="Remove").click()
        await expect(page.locator('tr[data-provider="spare"]')).to_have_count(0)
        await page.fill("#model-filter", "gpt-4o-mini")
        row = page.locator('tr[data-model="openai/gpt-4o-mini"]')
        await row.locator('[data-field="request"]').fill("0.002")
        await row.get_by_role("button", name="Save").click()
        await expect(page.locator("#flash")).to_have_text("Saved openai/gpt-4o-mini")
        await row.locator('[data-field="prompt"]').fill("-1")
        await row.get_by_role("button", name="Save").click()
        await expect(page.locator("#flash")).to_contain_text("must be 0 or more")

        async def repriced():
            async with http.get(f"{node.url}/v1/models") as response:
                models = {m["id"]: m for m in (await response.json())["data"]}
            return models["openai/gpt-4o-mini"]["pricing"]["request"] == 0.002

        await wait_for(repriced)
        for _ in range(3):
            async with http.post(f"{node.url}{CHAT}", json=HELLO, headers=auth(key)) as response:
                assert response.status == 200, await response.text()
                assert int(response.headers["X-Routstr-Cost-Msats"]) > 2000

        await page.click("a[data-view=overview]")
        await page.select_option("#hours", "24")
        await expect(page.locator("#chart-calls svg rect")).to_have_count(2)  # one hour: calls and errors
        await page.screenshot(path=tmp_path / "overview.png", full_page=True)

        await page.click("a[data-view=money]")
        owner = page.locator("#balances .owner-balance").first
        await expect(owner).not_to_have_text("0")
        before = float(await owner.inner_text())
        assert before >= 6
        await page.fill("#withdraw-amount", "5")
        await page.click("#withdraw-form button")
        await expect(page.locator("#flash")).to_have_text("Withdrew 5 sats (paid)")
        await expect(page.locator("#withdraw-token")).to_have_value(re.compile("^cashu"))
        await expect(page.locator("#transactions tr.tx-withdraw")).to_have_count(1)
        assert float(await owner.inner_text()) == pytest.approx(before - 5)
        token = await page.locator("#withdraw-token").input_value()
        await page.fill("#withdraw-amount", "100000")
        await page.click("#withdraw-form button")
        await expect(page.locator("#flash")).to_contain_text("exceeds the operator's share")
        await page.screenshot(path=tmp_path / "money.png", full_page=True)

        await page.click("a[data-view=logs]")
        await page.fill("#log-filters [name=model]", "openai/gpt-4o-mini")
        await page.click("#log-filters button")
        await expect(page.locator("#logs tbody tr")).to_have_count(3)
        await page.screenshot(path=tmp_path / "logs.png", full_page=True)
        await page.click("a[data-view=models]")
        await page.screenshot(path=tmp_path / "models.png", full_page=True)
        await browser.close()
    assert outside == []  # nothing fetched from anywhere but the node
    assert await client_wallet.receive(token) == 5
    await asyncio.sleep(0)
