"""Rewrite the NATS users block of deploy/examples/nats-values.yaml from `shared.bus.ROLES`.

Run after changing the permission table: `.venv/bin/python scripts/nats_values.py`
(tests/test_security.py fails while the file and the table disagree).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared import bus  # noqa: E402

VALUES = ROOT / "deploy" / "examples" / "nats-values.yaml"


def main() -> None:
    lines = VALUES.read_text().split("\n")
    start, end = lines.index("  merge:"), lines.index("  cluster:")
    users = [
        {"user": role, "password": f"<< $NATS_{role.upper()}_PASSWORD >>", "permissions": bus.nats_permissions(role)}
        for role in bus.ROLES
    ]
    text = yaml.safe_dump({"merge": {"authorization": {"users": users}}}, sort_keys=False, default_flow_style=None,
                          width=110)  # fmt: skip
    VALUES.write_text("\n".join([*lines[:start], *("  " + line for line in text.splitlines()), *lines[end:]]))


if __name__ == "__main__":
    main()
