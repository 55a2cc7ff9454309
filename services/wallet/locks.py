"""Tokens nobody can steal in transit: NUT-11 P2PK locks to the node's key, NUT-12 DLEQ proofs.

The node's P2PK key derives from its wallet seed (BIP-32 path P2PK_PATH), so every replica holds the
same key and a restored seed restores it. Its public key is published (`/v1/info`, the Nostr
announcement, NUT-18 payment requests). A proof locked to it is signed (SIG_INPUTS witness) before
the swap; one locked to anybody else, needing several signatures or SIG_ALL, or under another
spending condition (NUT-14 HTLC) is refused before any mint sees it, so it stays its owner's.

DLEQ proofs (NUT-12), when a token carries them, are checked offline against the mint's public keys
(the keyset, which the wallet caches): a proof whose DLEQ fails was not signed by that mint, and the
token is refused before any swap is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from services.wallet.ecash import (
    P2PKSecret,
    PrivateKey,
    Proof,
    PublicKey,
    Secret,
    SecretKind,
    SigFlags,
    TokenError,
    b_dhke,
    schnorr_sign,
)

P2PK_PATH = "m/129372'/10'/0'"  # NUT-13's purpose (129372'), then a branch no keyset id can take


class Locks:
    """Checks and unlocks a token's proofs with the node's P2PK key (`private_key`)."""

    def __init__(self, private_key: PrivateKey):
        self._key = private_key
        self.pubkey = private_key.public_key.format().hex()  # compressed SEC1, 33 bytes hex

    def __repr__(self) -> str:
        return f"Locks(pubkey={self.pubkey})"

    def unlock(self, proofs: Sequence[Proof], keys: dict[str, dict[int, PublicKey]]) -> None:
        """Verify each proof's DLEQ when it has one and sign the P2PK locks made to the node, in place.
        `keys` holds each proof's keyset's public keys by amount. Raises TokenError naming the reason."""
        for proof in proofs:
            if proof.dleq is not None:
                _check_dleq(proof, keys.get(proof.id, {}))
            if proof.secret.startswith("["):
                proof.witness = self._witness(proof)

    def _witness(self, proof: Proof) -> str:
        try:
            secret = Secret.deserialize(proof.secret)
        except (ValueError, TypeError, KeyError):
            raise TokenError("a proof's secret is neither a plain secret nor a NUT-10 spending condition") from None
        if secret.kind != SecretKind.P2PK.value:
            raise TokenError(f"a proof is locked by a {secret.kind} spending condition, which this node cannot unlock")
        lock = P2PKSecret.from_secret(secret)
        if lock.sigflag != SigFlags.SIG_INPUTS or lock.n_sigs != 1:
            raise TokenError("a proof's P2PK lock needs SIG_ALL or several signatures; send it unlocked or "
                             "locked to this node's key alone")  # fmt: skip
        if self.pubkey not in (lock.data, *lock.tags.get_tag_all("pubkeys")):
            raise TokenError("the token is locked (NUT-11) to another key, not this node's; it was not spent")
        return json.dumps({"signatures": [schnorr_sign(proof.secret.encode(), self._key).hex()]})


def _check_dleq(proof: Proof, keys: dict[int, PublicKey]) -> None:
    """NUT-12: the mint's DLEQ proof that it signed this proof with its key for the amount."""
    dleq, key = proof.dleq, keys.get(proof.amount)
    if key is None:
        raise TokenError("a proof's keyset has no key for its amount")
    try:
        valid = b_dhke.carol_verify_dleq(
            secret_msg=proof.secret, C=PublicKey(bytes.fromhex(proof.C)), r=PrivateKey(bytes.fromhex(dleq.r)),
            e=PrivateKey(bytes.fromhex(dleq.e)), s=PrivateKey(bytes.fromhex(dleq.s)), A=key,
        )  # fmt: skip
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise TokenError("a proof's DLEQ proof (NUT-12) does not verify: the token was not signed by its mint")


def node_key(derivation) -> PrivateKey:
    """The node's P2PK private key from the wallet seed's BIP-32 root (`derivation.bip32`)."""
    return PrivateKey(derivation.bip32.get_privkey_from_path(P2PK_PATH))
