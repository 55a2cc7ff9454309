-- Operator-granted credit (`create-key`, ledger kind 'grant') can be spent on inference but is never paid
-- out as ecash by a refund: it is not ecash anyone paid in. granted_msat is the spending mark up to which a
-- key's calls are paid from that credit: what is left of it is max(0, granted_msat - total_spent_msat), and
-- the refundable part of the balance is balance_msat - least(balance_msat, that). Spending (which already
-- adds to total_spent_msat) therefore consumes granted credit first, with no extra statement on the hot
-- path; a grant sets the mark to greatest(granted_msat, total_spent_msat) + amount (see ledger.grant).
ALTER TABLE billing.keys ADD COLUMN granted_msat bigint NOT NULL DEFAULT 0 CHECK (granted_msat >= 0);

-- Keys granted before this column: their grants from the ledger.
UPDATE billing.keys k SET granted_msat = g.total
  FROM (SELECT key_hash, sum(amount_msat) AS total FROM billing.ledger WHERE kind = 'grant' GROUP BY key_hash) g
 WHERE k.key_hash = g.key_hash;
