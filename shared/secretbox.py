"""Secrets at rest: the wallet seed, the Nostr key and stored tokens and keys, encrypted with SECRETS_KEY.

`cryptography`'s Fernet (AES-128-CBC with HMAC-SHA256, authenticated) through MultiFernet: SECRETS_KEY
is a comma-separated list of Fernet keys, the first encrypts, every one decrypts. Rotation: put a new
key first (`SECRETS_KEY=new,old`), restart, run `python -m shared.secretbox rotate` (re-encrypts every
stored secret with the new key, and encrypts any still in the clear), then drop the old key.
A key: `python -m shared.secretbox new-key`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared import tls
from shared.config import ConfigError, Settings, load_settings

FERNET_PREFIX = "gAAAAA"  # base64url of Fernet's version byte 0x80 and the timestamp's high bytes

# Every stored secret: (table, primary key column, secret column). `rotate` walks them all.
SECRET_COLUMNS = (
    ("wallet.seed", "id", "mnemonic"),
    ("wallet.issues", "idempotency_key", "token"),
    ("discovery.node_key", "id", "secret_hex"),
    ("billing.refunds", "refund_id", "token"),
    ("billing.invoices", "invoice_id", "api_key"),
    ("billing.providers", "id", "api_key"),
    ("billing.withdrawals", "withdrawal_id", "token"),
    ("billing.deposit_intents", "token_hash", "token"),
)


class SecretBox:
    """Seals and opens short secrets (strings) with the operator's keys."""

    def __init__(self, keys: tuple[str, ...]):
        """`keys`: Fernet keys (urlsafe base64 of 32 bytes), the first used to encrypt.
        Raises ConfigError naming SECRETS_KEY when there is none or one is malformed."""
        if not keys:
            raise ConfigError(
                "SECRETS_KEY: required to keep secrets encrypted at rest (make one: python -m shared.secretbox new-key)"
            )
        try:
            self._fernet = MultiFernet([Fernet(key) for key in keys])
        except ValueError:
            raise ConfigError("SECRETS_KEY: each key must be 32 url-safe base64-encoded bytes (a Fernet key)") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        return cls(settings.secrets_key)

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, stored: str) -> str:
        """The plaintext of a sealed value; a value stored before encryption (not a Fernet token) is
        returned as it is. Raises ConfigError when no key opens it (an old key dropped too soon)."""
        if not is_sealed(stored):
            return stored
        try:
            return self._fernet.decrypt(stored.encode()).decode()
        except InvalidToken:
            raise ConfigError("SECRETS_KEY: no key opens a stored secret (was the old key dropped?)") from None

    def reseal(self, stored: str) -> str:
        """`stored` encrypted with the first key (rotation), whether it was sealed or still in the clear."""
        return self.seal(self.open(stored))


def is_sealed(value: str) -> bool:
    return value.startswith(FERNET_PREFIX)


async def rotate(conn: asyncpg.Connection, box: SecretBox) -> int:
    """Re-encrypt every stored secret with the box's first key; returns how many values changed.

    A row changed meanwhile keeps its new value (compare-and-set). Tables of services not migrated
    into this database are skipped."""
    changed = 0
    for table, key, column in SECRET_COLUMNS:
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            continue
        rows = await conn.fetch(f"SELECT {key} AS k, {column} AS v FROM {table} WHERE {column} <> ''")
        for row in rows:
            status = await conn.execute(
                f"UPDATE {table} SET {column} = $2 WHERE {key} = $1 AND {column} = $3",
                row["k"], box.reseal(row["v"]), row["v"],
            )  # fmt: skip
            changed += status == "UPDATE 1"
    return changed


async def _rotate(settings: Settings) -> int:
    box = SecretBox.from_settings(settings)
    context = tls.database_context(settings)
    conn = await asyncpg.connect(settings.database_url, **({"ssl": context} if context else {}))
    try:
        return await rotate(conn, box)
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.secretbox", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["new-key", "rotate"])
    args = parser.parse_args()
    if args.command == "new-key":
        print(Fernet.generate_key().decode())
        return 0
    try:
        settings = load_settings()
        if not settings.database_url:
            raise ConfigError("DATABASE_URL: required to rotate the stored secrets")
        print(f"re-encrypted {asyncio.run(_rotate(settings))} stored secret(s) with the first SECRETS_KEY")
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
