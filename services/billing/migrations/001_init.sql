-- Billing owns keys, balances, reservations and the ledger. Amounts are integer msat.
CREATE SCHEMA billing;

-- A key is known only by the sha256 of its `sk-` string. balance includes what is reserved.
CREATE TABLE billing.keys (
    key_hash         text PRIMARY KEY,
    balance_msat     bigint NOT NULL DEFAULT 0 CHECK (balance_msat >= 0),
    reserved_msat    bigint NOT NULL DEFAULT 0 CHECK (reserved_msat >= 0 AND reserved_msat <= balance_msat),
    total_requests   bigint NOT NULL DEFAULT 0,
    total_spent_msat bigint NOT NULL DEFAULT 0,
    last_refund_id   text,        -- replayable while nothing was credited since
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Double-entry and append-only: each row moves amount_msat from `debit` to `credit`.
-- Accounts: user:<hash>, held:<hash> (reserved), revenue, fees:mint, ecash:in, ecash:out,
-- lightning:out, operator:grants.
CREATE TABLE billing.ledger (
    id              bigserial PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    kind            text NOT NULL,
    debit           text NOT NULL,
    credit          text NOT NULL,
    amount_msat     bigint NOT NULL CHECK (amount_msat >= 0),
    key_hash        text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_debit ON billing.ledger (debit);
CREATE INDEX ledger_credit ON billing.ledger (credit);

CREATE TABLE billing.deposits (
    token_hash    text PRIMARY KEY,
    key_hash      text NOT NULL,
    mint_url      text NOT NULL,
    amount_msat   bigint NOT NULL,
    fee_msat      bigint NOT NULL,
    credited_msat bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE billing.reservations (
    reservation_id text PRIMARY KEY,
    request_id     text NOT NULL UNIQUE,
    key_hash       text NOT NULL,
    model          text NOT NULL,
    amount_msat    bigint NOT NULL,
    price          bytea NOT NULL,   -- the msgpack-encoded bus.Price the call is charged at
    state          text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'settled', 'expired')),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reservations_open ON billing.reservations (created_at) WHERE state = 'open';

CREATE TABLE billing.settlements (
    request_id   text PRIMARY KEY,
    key_hash     text NOT NULL,
    source       text NOT NULL,
    cost_msat    bigint NOT NULL,
    base_msat    bigint NOT NULL,
    input_msat   bigint NOT NULL,
    output_msat  bigint NOT NULL,
    balance_msat bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE billing.refunds (
    refund_id   text PRIMARY KEY,
    key_hash    text NOT NULL,
    amount_msat bigint NOT NULL,
    method      text NOT NULL CHECK (method IN ('cashu', 'lightning')),
    recipient   text,
    state       text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'paid', 'failed')),
    token       text,
    fee_msat    bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refunds_pending ON billing.refunds (key_hash) WHERE state = 'pending';

CREATE TABLE billing.state (
    name  text PRIMARY KEY,
    value text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
