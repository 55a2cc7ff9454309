-- A deposit billing began: written before the wallet is asked to redeem the token, deleted in the
-- transaction that credits it (or once the wallet says it never took the token). A row left behind
-- (billing killed, Postgres or the bus failing between the redeem and the credit) is finished by
-- billing's deposit loop once `due_at` has passed. The token is kept sealed (SECRETS_KEY), and only
-- while the row lives: the wallet needs it to carry an interrupted swap through.
CREATE TABLE billing.deposit_intents (
    token_hash  text PRIMARY KEY,
    key_hash    text NOT NULL,
    create_key  boolean NOT NULL,
    token       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    due_at      timestamptz NOT NULL,
    attempts    integer NOT NULL DEFAULT 0
);
CREATE INDEX deposit_intents_due ON billing.deposit_intents (due_at);
