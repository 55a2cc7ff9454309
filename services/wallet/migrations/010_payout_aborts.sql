-- Lightning payouts settled for good as not paid (wallet.payout.abort): a later wallet.pay with the same
-- idempotency key is refused, so billing can give the amount back to the key without risk of paying twice.
CREATE TABLE wallet.payout_aborts (
    idempotency_key text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
