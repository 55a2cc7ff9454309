"""Write services/billing/price_data.json from the genai-prices package (pydantic/genai-prices, MIT).

genai-prices cannot be installed beside the node (its httpx2 needs h11>=0.16, cashu pins h11<0.15), so
`make tools` installs it into .venv-tools and this script snapshots what billing needs: per provider its
model-matching rules and each model's current USD prices per million tokens (a tiered price keeps its
base tier). tests/test_providers.py regenerates it and fails when the committed file differs.

    .venv-tools/bin/python scripts/price_table.py > services/billing/price_data.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import UTC, datetime
from importlib.metadata import version

from genai_prices import data

FIELDS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "requests_kcount")


def _clause(clause) -> dict | None:
    """A match clause as {"equals"|"starts_with"|"ends_with"|"contains"|"regex": str} or {"or"|"and": [...]}."""
    if clause is None:
        return None
    for field in ("or_", "and_"):
        if hasattr(clause, field):
            return {field.rstrip("_"): [_clause(c) for c in getattr(clause, field)]}
    [(field, value)] = [(f.name, getattr(clause, f.name)) for f in dataclasses.fields(clause)]
    return {field: value}


def _number(value) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "base", value))  # TieredPrices: the base tier


def main() -> None:
    now = datetime(2026, 11, 1, tzinfo=UTC)  # fixed, so the output depends on the package version only
    providers = []
    for provider in data.providers:
        models = []
        for model in provider.models:
            prices = model.get_prices(now)
            usd = {field: _number(getattr(prices, field, None)) for field in FIELDS}
            usd = {k: v for k, v in usd.items() if v is not None}
            if "input_mtok" not in usd and "output_mtok" not in usd:
                continue  # priced by something we do not meter (characters, seconds, images)
            models.append({"id": model.id, "match": _clause(model.match), "usd_per_mtok": usd})
        providers.append({"id": provider.id, "match": _clause(provider.model_match), "models": models})
    json.dump({"source": f"genai-prices {version('genai-prices')}", "providers": providers}, sys.stdout,
              separators=(",", ":"), sort_keys=True)  # fmt: skip
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
