"""Refunds larger than any one mint's holdings: one part per mint, joined in one token.

A key funded from mints A and B may be owed more than either holds. The wallet then cuts one part
per mint (largest holdings first, each an ordinary idempotent issue keyed `<key>@<mint>`, so a crash
between parts resumes with the parts already cut) and answers one V3 `cashuA` token whose entries are
the parts, one per mint: the format NUT-00 defines for ecash from several mints.
"""

from __future__ import annotations

import asyncpg

from services.wallet import ecash, storage
from shared import bus


def part_key(key: str, mint_url: str) -> str:
    return f"{key}@{mint_url}"


async def parts_of(conn: asyncpg.Connection, key: str) -> list[asyncpg.Record]:
    """The parts already cut (or being cut) for `key`."""
    return await conn.fetch(
        "SELECT * FROM wallet.issues WHERE starts_with(idempotency_key, $1) ORDER BY created_at", f"{key}@"
    )


async def issue_split(wallet, conn: asyncpg.Connection, key: str, sats: int) -> bus.Issued:
    """Cut `sats` across mints and record the joined token under `key` (done). `wallet` is the
    NodeWallet; raises its BusError `insufficient_funds` (503) when the mints together hold too little."""
    parts: dict[str, bus.Issued] = {}
    for row in await parts_of(conn, key):
        part = await wallet.issue(row["amount_sat"] * 1000, row["idempotency_key"], row["mint_url"], split_ok=False)
        parts[part.mint_url] = part
    remaining = sats - sum(p.amount_msat // 1000 for p in parts.values())
    balances = await storage.balances(conn)
    plan: dict[str, int] = {}  # planned in full first: nothing is cut unless the parts add up
    for mint, held in balances.items():
        if remaining <= 0:
            break
        if mint in parts:
            continue
        cut = await _cuttable(conn, wallet._mints.get(mint), min(remaining, held))
        if cut >= 1:
            plan[mint] = cut
            remaining -= cut
    if remaining > 0:
        raise wallet.insufficient(sats, sum(balances.values()))
    for mint, cut in plan.items():
        parts[mint] = await wallet.issue(cut * 1000, part_key(key, mint), mint, split_ok=False)
    entries = {}
    for mint, part in parts.items():
        proofs = ecash.parse_token(part.token).proofs
        ecash.expand_keyset_ids(proofs, await wallet._mints.get(mint).keysets())
        entries[mint] = proofs
    token = ecash.encode_multi_mint_token(entries)
    fee = sum(p.fee_msat for p in parts.values()) // 1000
    first = next(iter(parts))
    row = await storage.record_issue(conn, key, first, sats, fee, token=token)
    return bus.Issued(row["token"], sats * 1000, first, fee * 1000, already=False)


async def _cuttable(conn: asyncpg.Connection, client, want: int) -> int:
    """How much of `want` sats `client`'s unspent proofs can give: all of it when proofs add up to it
    exactly (no swap, no fee), else what is left after the NUT-02 fee of a swap spending them all."""
    rows = await conn.fetch(
        "SELECT secret, keyset_id, amount, c FROM wallet.proofs WHERE mint_url = $1 AND state = 'unspent'", client.url
    )
    proofs = [ecash.Proof(id=r["keyset_id"], amount=r["amount"], secret=r["secret"], C=r["c"]) for r in rows]
    if ecash.choose_exact(proofs, want) is not None:
        return want
    keysets = await client.keysets()
    fee = (sum(keysets[p.id].input_fee_ppk if p.id in keysets else 0 for p in proofs) + 999) // 1000
    return min(want, sum(p.amount for p in proofs) - fee)
