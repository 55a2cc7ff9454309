"""The pure pricing arithmetic billing charges with and the gateway reports with: exact integers, rounded up."""

from __future__ import annotations

from decimal import Decimal

import pytest

from shared import bus, pricing

RATE = Decimal(100_000)  # USD per BTC: 1 USD = 1,000,000 msat


def test_usd_to_msat_is_exact_and_rounds_up():
    assert pricing.usd_to_msat(Decimal(1), RATE) == 1_000_000
    assert pricing.usd_to_msat(Decimal("0.000000001"), RATE) == 1  # 0.001 msat -> 1
    assert pricing.usd_to_msat(Decimal("0.0000010001"), RATE) == 2  # 1.0001 msat -> 2
    assert pricing.usd_to_msat(Decimal(0), RATE) == 0


def test_usd_price_per_million_tokens_with_margin():
    usd = {"prompt": Decimal("0.00000015"), "completion": Decimal("0.0000006"), "request": Decimal("0.001")}
    price = pricing.usd_price(usd, RATE)
    # 0.15 USD per million prompt tokens at 100k USD/BTC = 150 sats = 150,000 msat per million.
    assert price == bus.Price(request_msat=1000, prompt_msat_per_m=150_000, completion_msat_per_m=600_000)
    margin = Decimal("1.05") * Decimal("1.005")
    marked = pricing.usd_price({"prompt": Decimal("0.000001"), "completion": Decimal("0.000002")}, RATE, margin)
    assert marked.prompt_msat_per_m == 1_055_250
    assert marked.completion_msat_per_m == 2_110_500
    odd = pricing.usd_price({"prompt": Decimal("0.0000000000003")}, Decimal(3), Decimal(1))
    assert odd.prompt_msat_per_m == 10_000  # 0.3e-6 USD per M / 3 * 1e11 = exactly 10,000


def test_usd_price_reads_cache_prices():
    price = pricing.usd_price(
        {"prompt": Decimal("0.000003"), "input_cache_read": Decimal("0.0000003"),
         "input_cache_write": Decimal("0.00000375")}, RATE,
    )  # fmt: skip
    assert (price.cache_read_msat_per_m, price.cache_write_msat_per_m) == (300_000, 3_750_000)


def test_fixed_price_in_sats():
    price = pricing.fixed_price(Decimal(2), Decimal("0.5"), Decimal("1.5"))
    assert price == bus.Price(request_msat=2000, prompt_msat_per_m=500_000, completion_msat_per_m=1_500_000)
    tiny = pricing.fixed_price(Decimal("0.0001"), Decimal("0.0000001"), Decimal(0))
    assert (tiny.request_msat, tiny.prompt_msat_per_m, tiny.completion_msat_per_m) == (1, 1, 0)


def test_cost_rounds_each_part_up_and_adds_them():
    price = bus.Price(request_msat=2000, prompt_msat_per_m=500_000, completion_msat_per_m=1_500_000)
    # 1001 * 0.5 = 500.5 -> 501; 333 * 1.5 = 499.5 -> 500
    assert pricing.cost(price, 1001, 333) == (2000, 501, 500, 3001)
    assert pricing.cost(price, 0, 0) == (2000, 0, 0, 2000)
    assert pricing.cost(bus.Price(prompt_msat_per_m=1), 1, 0) == (0, 1, 0, 1)  # never free by rounding
    assert pricing.cost(bus.Price(), 10**9, 10**9) == (0, 0, 0, 0)


def test_cost_uses_cache_prices_only_when_the_model_has_them():
    plain = bus.Price(prompt_msat_per_m=1_000_000)
    assert pricing.cost(plain, 1000, 0, cache_read_tokens=400) == (0, 1000, 0, 1000)
    cached = bus.Price(prompt_msat_per_m=1_000_000, cache_read_msat_per_m=100_000, cache_write_msat_per_m=2_000_000)
    # Of 1000 prompt tokens: 590 uncached at 1 msat + 400 read at 0.1 msat + 10 written at 2 msat = 590 + 40 + 20
    assert pricing.cost(cached, 1000, 0, cache_read_tokens=400, cache_write_tokens=10) == (0, 650, 0, 650)


def test_cache_tokens_without_a_cache_price_cost_the_prompt_price_never_zero():
    plain = bus.Price(prompt_msat_per_m=3_000_000, completion_msat_per_m=15_000_000)
    # Anthropic-style usage normalized: 10 uncached + 2000 read + 500 written = 2510 prompt tokens, all at 3 msat.
    assert pricing.cost(plain, 2510, 100, cache_read_tokens=2000, cache_write_tokens=500) == (0, 7530, 1500, 9030)
    assert pricing.cost(plain, 2510, 0, 2000, 500) == pricing.cost(plain, 2510, 0)
    # Only a read price: writes fall back to the prompt price, reads use theirs.
    read_only = bus.Price(prompt_msat_per_m=3_000_000, cache_read_msat_per_m=300_000)
    assert pricing.cost(read_only, 2510, 0, 2000, 500) == (0, 30 + 600 + 1500, 0, 2130)
    # Usage that claims more cache than prompt never goes negative: the cache parts are charged.
    assert pricing.cost(plain, 10, 0, cache_read_tokens=20)[1] == 60


@pytest.mark.parametrize("prompt,completion", [(0, 0), (1, 1), (17, 4096), (123_457, 9_999)])
def test_max_cost_is_the_cost_of_the_cap(prompt, completion):
    price = bus.Price(request_msat=7, prompt_msat_per_m=333_333, completion_msat_per_m=1_234_567)
    assert pricing.max_cost(price, prompt, completion) == pricing.cost(price, prompt, completion)[3]
    # Using fewer tokens than reserved can never cost more than the reservation.
    assert pricing.cost(price, prompt, completion // 2)[3] <= pricing.max_cost(price, prompt, completion)


def test_display_helpers():
    assert pricing.sats_per_token(150_000) == pytest.approx(0.00015)
    assert pricing.sats_per_token(0) == 0
