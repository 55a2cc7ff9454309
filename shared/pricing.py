"""Prices and costs in integer millisats: one set of pure functions for billing's charges and /v1/models.

A `bus.Price` holds msat per request and msat per *million* tokens, so sub-msat per-token prices
stay exact integers; every cost is rounded up to a whole msat, once per part.
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, Decimal

from shared import bus

MSAT_PER_SAT = 1000
MSAT_PER_BTC = 100_000_000_000
PER_MILLION = 1_000_000


def _ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def usd_to_msat(usd: Decimal, btc_usd: Decimal) -> int:
    """USD -> msat at `btc_usd` dollars per bitcoin, rounded up."""
    return _ceil(usd * MSAT_PER_BTC / btc_usd)


def usd_price(usd: dict[str, Decimal], btc_usd: Decimal, multiplier: Decimal = Decimal(1)) -> bus.Price:
    """A model's USD prices (per token; per request for `request`) as a msat `Price`, margin included."""

    def per_m(name: str) -> int:
        return usd_to_msat(usd.get(name, Decimal(0)) * PER_MILLION * multiplier, btc_usd)

    return bus.Price(
        request_msat=usd_to_msat(usd.get("request", Decimal(0)) * multiplier, btc_usd),
        prompt_msat_per_m=per_m("prompt"),
        completion_msat_per_m=per_m("completion"),
        cache_read_msat_per_m=per_m("input_cache_read"),
        cache_write_msat_per_m=per_m("input_cache_write"),
    )


def fixed_price(per_request_sats: Decimal, per_1k_input_sats: Decimal, per_1k_output_sats: Decimal) -> bus.Price:
    """FIXED_PRICING: sats per call and sats per 1000 tokens, as msat per call and msat per million tokens."""
    return bus.Price(
        request_msat=_ceil(per_request_sats * MSAT_PER_SAT),
        prompt_msat_per_m=_ceil(per_1k_input_sats * MSAT_PER_SAT * 1000),
        completion_msat_per_m=_ceil(per_1k_output_sats * MSAT_PER_SAT * 1000),
    )


def _tokens(count: int, msat_per_m: int) -> int:
    return math.ceil(count * msat_per_m / PER_MILLION) if count > 0 else 0


def cost(
    price: bus.Price,
    prompt_tokens: int,
    completion_tokens: int,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> tuple[int, int, int, int]:
    """(base, input, output, total) msat for a call's usage.

    ``prompt_tokens`` counts every input token (OpenAI's meaning); ``cache_read_tokens`` and
    ``cache_write_tokens`` are the parts of it read from and written to the provider's cache (the
    gateway normalizes Anthropic's usage, whose ``input_tokens`` excludes them, to this meaning).
    Each part is priced at its own price when the model has one, else at the prompt price: cached
    tokens are never free just because a model lists no cache price. Input is one part, rounded up once.
    """
    base = price.request_msat
    read, write = max(cache_read_tokens, 0), max(cache_write_tokens, 0)
    uncached = max(prompt_tokens - read - write, 0)
    read_price = price.cache_read_msat_per_m or price.prompt_msat_per_m
    write_price = price.cache_write_msat_per_m or price.prompt_msat_per_m
    input_msat = math.ceil((uncached * price.prompt_msat_per_m + read * read_price + write * write_price) / PER_MILLION)
    output_msat = _tokens(completion_tokens, price.completion_msat_per_m)
    return base, input_msat, output_msat, base + input_msat + output_msat


def max_cost(price: bus.Price, prompt_tokens: int, max_completion_tokens: int) -> int:
    """The most a call can cost: what a reservation holds."""
    return cost(price, prompt_tokens, max_completion_tokens)[3]


def sats_per_token(msat_per_m: int) -> float:
    """Display only (/v1/models `sats_pricing`): never used to charge."""
    return msat_per_m / PER_MILLION / MSAT_PER_SAT
