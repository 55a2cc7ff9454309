-- A refund's token comes from the mint of the key's latest deposit (X-Cashu change from the token's own
-- mint): find it without scanning every deposit.
CREATE INDEX deposits_by_key ON billing.deposits (key_hash, created_at DESC);
