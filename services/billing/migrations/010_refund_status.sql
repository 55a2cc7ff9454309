-- A key's latest refund, for `billing.refund.status` (GET /v1/balance/refund).
CREATE INDEX refunds_by_key ON billing.refunds (key_hash, created_at);
