"""The wallet service: the only code that talks to Cashu mints.

It swaps incoming tokens for fresh proofs it keeps in Postgres (the store of record, so any replica
can serve and no host state matters), cuts tokens for refunds and change, and reports holdings.
Secrets are derived from one NUT-13 seed with per-keyset counters, so a crash mid-swap is recovered
from the mint (`/v1/restore`) instead of losing money.
"""
