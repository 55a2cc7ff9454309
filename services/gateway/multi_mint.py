"""Split a V3 (`cashuA`) token holding proofs of several mints into one token per mint.

A refund cut from several mints comes back as one NUT-00 V3 token with an entry per mint; many
wallets (nutshell, cashu-ts 2) receive single-mint tokens only, so the refund answer lists the
parts as well. V3 is base64url JSON, so no Cashu library is needed here.
"""

from __future__ import annotations

import base64
import json


def per_mint(token: str) -> list[str]:
    """The per-mint V3 tokens of a multi-mint `cashuA` token, in its order; [] for any other token."""
    if not token.startswith("cashuA"):
        return []
    data = token[len("cashuA") :]
    try:
        body = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        entries = body["token"]
    except (ValueError, KeyError, TypeError):
        return []
    if not isinstance(entries, list) or len(entries) < 2:
        return []
    extra = {k: body[k] for k in ("memo", "unit") if k in body}
    return [_encode({"token": [entry], **extra}) for entry in entries]


def _encode(body: dict) -> str:
    return "cashuA" + base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode().rstrip("=")
