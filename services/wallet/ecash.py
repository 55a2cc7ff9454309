"""Cashu mechanics without I/O: token parsing and encoding, NUT-13 secrets, blinding, fees, coin choice.

The cashu library is used for the crypto and token formats only. Importing it has side effects that
would hurt the whole process (it sets `sys.tracebacklimit = 0`, lets a `.env` in the working
directory override `os.environ`, points loguru at stderr at DEBUG/INFO), so the import below undoes
them and routes loguru's warnings into standard logging, where secrets are scrubbed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@contextlib.contextmanager
def _tame_cashu_import() -> Iterator[None]:
    limit = getattr(sys, "tracebacklimit", None)
    environ = dict(os.environ)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if limit is None:
            with contextlib.suppress(AttributeError):
                del sys.tracebacklimit
        else:
            sys.tracebacklimit = limit
        os.environ.clear()
        os.environ.update(environ)


with _tame_cashu_import():
    from cashu.core.base import (
        BlindedMessage,
        BlindedSignature,
        Proof,
        TokenV3,
        TokenV3Token,
        TokenV4,
        TokenV4Proof,
        TokenV4Token,
    )
    from cashu.core.crypto import b_dhke
    from cashu.core.crypto.keys import derive_keyset_short_id
    from cashu.core.crypto.secp import PrivateKey, PublicKey
    from cashu.core.p2pk import P2PKSecret, SigFlags, schnorr_sign
    from cashu.core.secret import Secret, SecretKind
    from cashu.core.split import amount_split
    from cashu.wallet.helpers import deserialize_token_from_string
    from cashu.wallet.secrets import WalletSecrets
    from loguru import logger as _loguru
    from mnemonic import Mnemonic


def _to_logging(message) -> None:
    record = message.record
    logging.getLogger("cashu").log(record["level"].no, "%s", record["message"])


_loguru.remove()
_loguru.add(_to_logging, level="WARNING")

__all__ = [
    "BlindedMessage", "BlindedSignature", "P2PKSecret", "PrivateKey", "Proof", "PublicKey", "Secret", "SecretKind",
    "SigFlags", "TokenV3", "schnorr_sign",
]  # fmt: skip

MAX_TOKEN_BYTES = 64 * 1024
MAX_SATS = 21_000_000 * 100_000_000


class TokenError(ValueError):
    """The token cannot be redeemed as given; the message says why (never quoting the token)."""


@dataclass(frozen=True)
class Keyset:
    id: str
    unit: str
    active: bool
    input_fee_ppk: int


@dataclass(frozen=True)
class ParsedToken:
    mint_url: str
    unit: str
    proofs: list[Proof]

    @property
    def amount(self) -> int:
        return sum(p.amount for p in self.proofs)


def token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def parse_token(raw: str) -> ParsedToken:
    """Decode a V3 (`cashuA`) or V4 (`cashuB`) token holding sat proofs from one mint."""
    if len(raw.encode()) > MAX_TOKEN_BYTES:
        raise TokenError(f"token is larger than {MAX_TOKEN_BYTES} bytes")
    raw = raw.strip()
    if not raw.startswith(("cashuA", "cashuB")):
        raise TokenError("not a Cashu token (expected cashuA… or cashuB…)")
    try:
        token = deserialize_token_from_string(raw)
        proofs = token.proofs  # TokenV4 builds new Proof objects on every access: bind once
        mints = getattr(token, "mints", None) or [token.mint]
        unit = token.unit or "sat"
    except Exception:
        raise TokenError("malformed Cashu token") from None
    if len(set(mints)) != 1 or not mints[0]:
        raise TokenError("a token must hold proofs from exactly one mint")
    if unit != "sat":
        raise TokenError(f"unit {unit!r} is not accepted (only sat)")
    if not proofs:
        raise TokenError("token holds no proofs")
    for proof in proofs:
        if not isinstance(proof.amount, int) or proof.amount <= 0 or not proof.secret or not proof.C or not proof.id:
            raise TokenError("token holds a malformed proof")
    if sum(p.amount for p in proofs) > MAX_SATS:
        raise TokenError("token is worth more than all bitcoin")
    if len({p.secret for p in proofs}) != len(proofs):
        raise TokenError("token holds the same proof twice")
    return ParsedToken(mint_url=mints[0].rstrip("/"), unit=unit, proofs=proofs)


def expand_keyset_ids(proofs: Sequence[Proof], keysets: dict[str, Keyset]) -> list[str]:
    """Replace V4 short keyset ids by the mint's full ids in place; return the ids still unknown."""
    unknown = []
    for proof in proofs:
        if proof.id in keysets:
            continue
        matches = [k for k in keysets if k.startswith(proof.id)] if len(proof.id) == 16 else []
        if len(matches) == 1:
            proof.id = matches[0]
        else:
            unknown.append(proof.id)
    return unknown


def input_fee(proofs: Sequence[Proof], keysets: dict[str, Keyset]) -> int:
    """NUT-02: the mint charges ceil(sum of per-input ppk / 1000) sats to spend `proofs`."""
    return (sum(keysets[p.id].input_fee_ppk for p in proofs) + 999) // 1000


def split_amount(sats: int) -> list[int]:
    return amount_split(sats)


def choose_exact(proofs: Sequence[Proof], sats: int) -> list[Proof] | None:
    """Proofs summing to exactly `sats` (largest first), so a token can be cut without a swap."""
    chosen, remaining = [], sats
    for proof in sorted(proofs, key=lambda p: p.amount, reverse=True):
        if proof.amount <= remaining:
            chosen.append(proof)
            remaining -= proof.amount
            if remaining == 0:
                return chosen
    return None


def choose_inputs(proofs: Sequence[Proof], sats: int, keysets: dict[str, Keyset]) -> list[Proof] | None:
    """Fewest proofs (so the lowest input fee) worth at least `sats` plus the fee to swap them."""
    chosen: list[Proof] = []
    usable = [p for p in proofs if p.id in keysets]
    for proof in sorted(usable, key=lambda p: p.amount, reverse=True):
        chosen.append(proof)
        if sum(p.amount for p in chosen) >= sats + input_fee(chosen, keysets):
            return chosen
    return None


def encode_token(mint_url: str, proofs: Sequence[Proof]) -> str:
    """A V4 (`cashuB`) token; keyset ids are shortened the way wallets expect."""
    by_keyset: dict[str, list[Proof]] = {}
    for proof in proofs:
        by_keyset.setdefault(proof.id, []).append(proof)
    groups = [
        TokenV4Token(i=bytes.fromhex(derive_keyset_short_id(kid)), p=[TokenV4Proof.from_proof(p) for p in ps])
        for kid, ps in by_keyset.items()
    ]
    return TokenV4(m=mint_url, u="sat", t=groups).serialize()


def encode_multi_mint_token(proofs_by_mint: dict[str, Sequence[Proof]]) -> str:
    """A V3 (`cashuA`) token with one entry per mint (NUT-00), for a refund cut from several mints;
    proofs carry their full keyset ids."""
    entries = [TokenV3Token(mint=mint, proofs=list(proofs)) for mint, proofs in proofs_by_mint.items()]
    return TokenV3(token=entries).serialize()


class _Derivation(WalletSecrets):
    """cashu's own NUT-13 derivation (BIP-32 for 00 keysets, HMAC-SHA256 for 01), so any cashu
    wallet restoring from the node's mnemonic finds the same secrets."""

    def __init__(self, seed: bytes):
        from bip32 import BIP32

        self.seed = seed
        self.bip32 = BIP32.from_seed(seed)


def new_mnemonic() -> str:
    return Mnemonic("english").generate()


@dataclass(frozen=True)
class Output:
    """One planned output: its amount, and the deterministic secret and blinding factor behind it."""

    amount: int
    secret: str
    r: PrivateKey
    message: BlindedMessage


class Secrets:
    """Deterministic outputs from the node's seed: (keyset, counter) always gives the same output."""

    def __init__(self, mnemonic: str):
        if not Mnemonic("english").check(mnemonic):
            raise ValueError("stored wallet seed is not a valid BIP-39 mnemonic")
        self._derivation = _Derivation(Mnemonic("english").to_seed(mnemonic))

    def __repr__(self) -> str:
        return "Secrets(<hidden>)"

    @property
    def derivation(self) -> WalletSecrets:
        """The seed's BIP-32 derivation (`.bip32`), for keys other than outputs' (the P2PK key)."""
        return self._derivation

    async def outputs(self, keyset_id: str, counter: int, amounts: Sequence[int]) -> list[Output]:
        if not amounts:
            return []
        secrets, rs, _ = await self._derivation.generate_secrets_from_to(
            counter, counter + len(amounts) - 1, keyset_id=keyset_id
        )
        planned = []
        for amount, secret, r in zip(amounts, secrets, rs, strict=True):
            blinded, r = b_dhke.step1_alice(secret, r)
            planned.append(
                Output(amount, secret, r, BlindedMessage(amount=amount, id=keyset_id, B_=blinded.format().hex()))
            )
        return planned


def unblind(
    outputs: Sequence[Output], signatures: Sequence[BlindedSignature], keys: dict[int, PublicKey]
) -> list[Proof]:
    """Turn the mint's blind signatures on `outputs` (same order, one keyset with `keys`) into proofs."""
    if len(outputs) != len(signatures):
        raise ValueError(f"mint returned {len(signatures)} signatures for {len(outputs)} outputs")
    proofs = []
    for output, sig in zip(outputs, signatures, strict=True):
        if sig.amount != output.amount or sig.id != output.message.id:
            raise ValueError("mint signed a different amount or keyset than asked")
        c = b_dhke.step3_alice(PublicKey(bytes.fromhex(sig.C_)), output.r, keys[sig.amount])
        proofs.append(Proof(id=sig.id, amount=sig.amount, secret=output.secret, C=c.format().hex()))
    return proofs


def unblind_change(
    outputs: Sequence[Output], signatures: Sequence[BlindedSignature], keys: dict[int, PublicKey]
) -> list[Proof]:
    """NUT-08: the mint signs the first blank outputs with amounts of its choosing (the unused fee)."""
    if len(signatures) > len(outputs):
        raise ValueError(f"mint returned {len(signatures)} change signatures for {len(outputs)} blank outputs")
    return [
        Proof(
            id=sig.id,
            amount=sig.amount,
            secret=output.secret,
            C=b_dhke.step3_alice(PublicKey(bytes.fromhex(sig.C_)), output.r, keys[sig.amount]).format().hex(),
        )
        for output, sig in zip(outputs, signatures, strict=False)
    ]
