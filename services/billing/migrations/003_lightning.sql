-- Lightning invoices that fund a key (NUT-04 mint quotes asked of the wallet). The state flips to
-- 'paid' in the same transaction as the credit, so a paid invoice is credited exactly once.
-- Each credit is a ledger row debiting the external account `lightning:in` (idempotency key lightning:<invoice_id>).
-- api_key: a `create` invoice's new key in the clear, kept only until the first paid status answer
-- hands it to whoever holds the invoice id, then set to NULL (billing.keys only ever has its hash).
CREATE TABLE billing.invoices (
    invoice_id   text PRIMARY KEY,
    quote_id     text NOT NULL UNIQUE,
    bolt11       text NOT NULL UNIQUE,
    payment_hash text NOT NULL,
    purpose      text NOT NULL CHECK (purpose IN ('create', 'topup')),
    key_hash     text NOT NULL,
    api_key      text,
    amount_msat  bigint NOT NULL CHECK (amount_msat > 0),
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'paid')),
    expires_at   bigint NOT NULL,  -- unix seconds, 0 when the mint gave none
    created_at   timestamptz NOT NULL DEFAULT now(),
    paid_at      timestamptz
);
