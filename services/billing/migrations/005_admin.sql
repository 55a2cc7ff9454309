-- The operator's plane: admin credentials and sessions, withdrawals of revenue, the request log and
-- the operator's live model overrides. Every gateway replica checks admin tokens here (through
-- billing), so a session works whichever replica a request lands on.

-- The admin password as an argon2id hash (never in the clear). `seed_hash` is the hash of the
-- ADMIN_PASSWORD the node was started with, so a changed environment value replaces the password,
-- while a rotation through the API survives restarts with the same environment.
CREATE TABLE billing.admin_password (
    id         int PRIMARY KEY CHECK (id = 1),
    hash       text NOT NULL,
    seed_hash  text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Session (login) and CLI tokens, by sha256 of the token. Revoked = deleted.
CREATE TABLE billing.admin_tokens (
    id           bigserial PRIMARY KEY,
    token_hash   text NOT NULL UNIQUE,
    kind         text NOT NULL CHECK (kind IN ('session', 'cli')),
    name         text NOT NULL DEFAULT '',
    preview      text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    expires_at   timestamptz
);

-- Failed logins per client address, for rate limiting across replicas.
CREATE TABLE billing.admin_login_failures (
    client text NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX admin_login_failures_client ON billing.admin_login_failures (client, at);

-- Operator revenue taken out, as a token or a Lightning payment. Ledger rows: withdraw:<id> moves
-- revenue to ecash:out or lightning:out; withdraw-fee:<id> moves the mint fee to fees:mint.
CREATE TABLE billing.withdrawals (
    withdrawal_id   text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    amount_msat     bigint NOT NULL CHECK (amount_msat > 0),
    method          text NOT NULL CHECK (method IN ('cashu', 'lightning')),
    recipient       text,
    mint_url        text,
    automatic       boolean NOT NULL DEFAULT false,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'paid', 'failed')),
    token           text,
    fee_msat        bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per paid call: no content, no tokens, no keys (only the first 8 hex of the key's hash).
CREATE TABLE billing.request_log (
    request_id        text PRIMARY KEY,
    created_at        timestamptz NOT NULL DEFAULT now(),
    key_prefix        text NOT NULL,
    model             text NOT NULL,
    provider          text NOT NULL DEFAULT '',
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost_msat         bigint NOT NULL DEFAULT 0,
    status            int NOT NULL,
    source            text NOT NULL,
    latency_ms        int NOT NULL DEFAULT 0,
    attempts          int NOT NULL DEFAULT 1
);
CREATE INDEX request_log_created ON billing.request_log (created_at);

-- Settings the operator changed at run time (only those documented as live).
CREATE TABLE billing.admin_settings (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
