"""A Cashu client wallet (the payer's side): mints from a FakeWallet mint and cuts tokens. For dev and tests."""

from __future__ import annotations

import sys
import tempfile
import uuid


class ClientWallet:
    """Mints ecash at a FakeWallet mint (invoices pay themselves) and cuts tokens of exact amounts."""

    def __init__(self, mint_url: str, directory: str | None = None):
        """`directory`: where the wallet keeps its database (a fresh temporary one by default)."""
        self.mint_url = mint_url
        self._dir = directory or tempfile.mkdtemp(prefix="client-wallet-")
        self._wallet = None

    async def _get(self):
        if self._wallet is None:
            from cashu.wallet.wallet import Wallet

            sys.tracebacklimit = 1000  # importing cashu sets it to 0, hiding every traceback
            self._wallet = await Wallet.with_db(url=self.mint_url, db=self._dir, name=uuid.uuid4().hex[:8])
            await self._wallet.load_mint()
        return self._wallet

    async def fund(self, sats: int) -> None:
        wallet = await self._get()
        quote = await wallet.request_mint(sats)
        await wallet.mint(sats, quote_id=quote.quote)

    async def token(
        self, sats: int, v4: bool = True, fund: bool = True, lock_to: str | None = None, dleq: bool = False
    ) -> str:
        """A fresh token worth exactly `sats` (plus nothing: fees are the receiver's to pay); `lock_to` a
        public key (hex) locks it with NUT-11 P2PK, `dleq` includes the mint's NUT-12 DLEQ proofs."""
        wallet = await self._get()
        if fund:
            await self.fund(sats + 8)
        await wallet.load_proofs(reload=True)
        lock = await wallet.create_p2pk_lock(lock_to) if lock_to else None
        _, send = await wallet.swap_to_send(wallet.proofs, sats, secret_lock=lock, set_reserved=True)
        return await wallet.serialize_proofs(send, include_dleq=dleq, legacy=not v4)

    async def receive(self, token: str) -> int:
        """Redeem a token the node gave back (change or refund) and return its value in sats."""
        from cashu.core.base import TokenV4
        from cashu.wallet.helpers import deserialize_token_from_string

        wallet = await self._get()
        parsed = deserialize_token_from_string(token)
        proofs = parsed.proofs  # TokenV4 builds new objects on each access: bind once
        await wallet._expand_short_keyset_ids(proofs)  # V4 tokens carry short keyset ids
        await wallet.redeem(proofs)
        return sum(p.amount for p in proofs) if isinstance(parsed, TokenV4) else parsed.amount

    async def is_spent(self, token: str) -> bool:
        from cashu.wallet.helpers import deserialize_token_from_string

        wallet = await self._get()
        proofs = deserialize_token_from_string(token).proofs
        await wallet._expand_short_keyset_ids(proofs)
        states = await wallet.check_proof_state(proofs)
        return all(s.spent for s in states.states)
