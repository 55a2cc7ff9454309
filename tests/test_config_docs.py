"""Every place that lists the node's settings agrees with `shared.config.SETTINGS_DOC`: `.env.example`, the README's
configuration table and the Helm chart's values. Regenerate the first two with `scripts/config_table.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from shared.config import SETTINGS_DOC, _read_dotenv, load_settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "config_table.py"
VALUES = ROOT / "deploy" / "helm" / "routstr-node" / "values.yaml"
SCHEMA = ROOT / "deploy" / "helm" / "routstr-node" / "values.schema.json"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def generated(what: str) -> str:
    return subprocess.run(
        [sys.executable, str(SCRIPT), what], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_env_example_is_generated_from_settings_doc():
    assert (ROOT / ".env.example").read_text() == generated("env"), "run: python scripts/config_table.py env"


def test_env_example_loads_as_the_defaults():
    values = _read_dotenv(ROOT / ".env.example")
    assert list(values) == list(SETTINGS_DOC)
    assert values == {name: default for name, (default, _, _) in SETTINGS_DOC.items()}
    assert load_settings({}, ROOT / ".env.example") == load_settings({}, None)


def test_readme_table_matches_settings_doc():
    readme = (ROOT / "README.md").read_text()
    assert START in readme and END in readme, f"README.md needs the table between {START} and {END}"
    table = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert table + "\n" == generated("table"), "paste the output of: python scripts/config_table.py"


def test_readme_table_has_one_row_per_variable():
    rows = [line for line in generated("table").splitlines() if line.startswith("| `")]
    names = [re.match(r"\| `([A-Z0-9_]+)` \|", row).group(1) for row in rows]
    assert names == list(SETTINGS_DOC)
    for row, (default, description, secret) in zip(rows, SETTINGS_DOC.values(), strict=True):
        assert (f"`{default}`" if default else "—") in row
        assert description.split(";")[0] in row
        assert row.endswith("(secret) |") == secret


def test_chart_values_hold_every_setting_with_its_default():
    values = yaml.safe_load(VALUES.read_text())
    config, secrets = values["config"], values["secrets"]
    assert not set(config) & set(secrets)
    assert set(config) | set(secrets) == set(SETTINGS_DOC), set(SETTINGS_DOC) ^ (set(config) | set(secrets))
    for name, (default, _, secret) in SETTINGS_DOC.items():
        where = secrets if secret else config
        assert name in where, f"{name} belongs in {'secrets' if secret else 'config'}"
        assert str(where[name]) == default, f"{name}: chart default {where[name]!r}, code default {default!r}"
    assert list(config) == [n for n, (_, _, s) in SETTINGS_DOC.items() if not s], "keep the docs' order"


def test_chart_values_schema_knows_every_setting():
    properties = json.loads(SCHEMA.read_text())["properties"]
    assert set(properties["config"]["properties"]) == {n for n, (_, _, s) in SETTINGS_DOC.items() if not s}
    assert set(properties["secrets"]["properties"]) == {n for n, (_, _, s) in SETTINGS_DOC.items() if s}
    assert set(properties["secretRefs"]["properties"]) == {n for n, (_, _, s) in SETTINGS_DOC.items() if s}
