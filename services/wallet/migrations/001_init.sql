-- The node's ecash, with Postgres as the store of record.
CREATE SCHEMA IF NOT EXISTS wallet;

-- One NUT-13 seed (BIP-39 mnemonic) for every mint: all proofs the node creates derive from it,
-- so `cashu restore` (or this service's restore on retry) can rebuild them from the mint.
CREATE TABLE wallet.seed (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    mnemonic text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Next unused NUT-13 counter per keyset. Bumped (and committed) before outputs reach a mint, so a
-- secret is never used twice even across replicas and crashes.
CREATE TABLE wallet.counters (
    keyset_id text PRIMARY KEY,
    mint_url text NOT NULL,
    next bigint NOT NULL DEFAULT 0 CHECK (next >= 0)
);

-- Proofs the node holds. unspent: ours to spend; pending: inputs of an issue whose swap outcome is
-- not known yet (resolved on retry with NUT-07 check-state); spent: gone (kept for audit).
CREATE TABLE wallet.proofs (
    secret text PRIMARY KEY,
    y text NOT NULL UNIQUE,
    mint_url text NOT NULL,
    keyset_id text NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    c text NOT NULL,
    state text NOT NULL CHECK (state IN ('unspent', 'pending', 'spent')),
    op text,  -- the redemption (token hash) that made it, or the issue (key) that holds or spent it
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX proofs_mint_state ON wallet.proofs (mint_url, state);
CREATE INDEX proofs_op ON wallet.proofs (op) WHERE state = 'pending';

-- Redeemed tokens, by sha256 of the raw token string. A pending row holds the swap's output plan
-- (keyset, first counter, amounts): every retry reuses it, so whichever attempt the mint executed,
-- its signatures can be fetched again with /v1/restore.
CREATE TABLE wallet.redemptions (
    token_hash text PRIMARY KEY,
    mint_url text NOT NULL,
    state text NOT NULL CHECK (state IN ('pending', 'done')),
    amount_sat bigint NOT NULL CHECK (amount_sat > 0),
    fee_sat bigint NOT NULL CHECK (fee_sat >= 0),
    keyset_id text NOT NULL,
    counter bigint NOT NULL,
    amounts bigint[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz
);

-- Tokens the node cut (refunds, change), by the caller's idempotency key. Same plan idea as
-- redemptions: outputs are send_amounts then keep_amounts from `counter` on.
CREATE TABLE wallet.issues (
    idempotency_key text PRIMARY KEY,
    mint_url text NOT NULL,
    state text NOT NULL CHECK (state IN ('pending', 'done')),
    amount_sat bigint NOT NULL CHECK (amount_sat > 0),
    fee_sat bigint NOT NULL CHECK (fee_sat >= 0),
    keyset_id text,
    counter bigint,
    send_amounts bigint[] NOT NULL DEFAULT '{}',
    keep_amounts bigint[] NOT NULL DEFAULT '{}',
    token text,
    created_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz
);

-- Lightning payouts (LNURL-pay + NUT-05 melt), by the caller's idempotency key. The melt inputs are
-- cut first as an issue keyed 'payout:<key>' (exact proofs, idempotent), then held pending here;
-- NUT-08 change comes back on `n_change` blank outputs derived from `counter`.
CREATE TABLE wallet.payouts (
    idempotency_key text PRIMARY KEY,
    mint_url text NOT NULL,
    recipient text NOT NULL,
    state text NOT NULL CHECK (state IN ('pending', 'paid')),
    amount_sat bigint NOT NULL CHECK (amount_sat > 0),
    quote_id text NOT NULL,
    inputs_sat bigint NOT NULL,
    cut_fee_sat bigint NOT NULL,
    keyset_id text NOT NULL,
    counter bigint NOT NULL,
    n_change int NOT NULL,
    change_sat bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz
);
