"""Print a fresh Cashu token from the dev mint that `make run` started: `python -m devstack.token SATS`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import tempfile

from devstack.__main__ import RUN_DIR
from devstack.client_wallet import ClientWallet


async def _token(mint_url: str, sats: int) -> str:
    with tempfile.TemporaryDirectory(prefix="client-wallet-") as directory:  # the token printed is all that is kept
        return await ClientWallet(mint_url, directory).token(sats)


def main() -> int:
    sats = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    try:
        mint_url = json.loads((RUN_DIR / "state.json").read_text())["mints"][0]
    except (OSError, ValueError, KeyError, IndexError):
        print("no dev mint: start the node with `make run` (and no CASHU_MINTS) first", file=sys.stderr)
        return 1
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the cashu library prints a mnemonic notice
            token = asyncio.run(_token(mint_url, sats))
    except Exception as exc:  # the node (and its dev mint) stopped, or the mint refused
        print(f"the dev mint at {mint_url} did not give a token ({exc.__class__.__name__}: {exc}); "
              "is `make run` running?", file=sys.stderr)  # fmt: skip
        return 1
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
