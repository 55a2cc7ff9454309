"""Print a fresh Cashu token from the dev mint that `make run` started: `python -m devstack.token SATS`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys

from devstack.__main__ import RUN_DIR
from devstack.client_wallet import ClientWallet


async def _token(mint_url: str, sats: int) -> str:
    return await ClientWallet(mint_url).token(sats)


def main() -> int:
    sats = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    try:
        mint_url = json.loads((RUN_DIR / "state.json").read_text())["mints"][0]
    except (OSError, ValueError, KeyError, IndexError):
        print("no dev mint: start the node with `make run` (and no CASHU_MINTS) first", file=sys.stderr)
        return 1
    with contextlib.redirect_stdout(io.StringIO()):  # the cashu library prints a mnemonic notice
        token = asyncio.run(_token(mint_url, sats))
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
