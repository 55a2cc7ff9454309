-- Tokens from mints the node does not list, swapped into a listed mint over Lightning: the token is
-- melted at its own mint (NUT-05) to pay an invoice of the listed mint (NUT-04 mint quote, recorded in
-- wallet.mint_quotes), and the ecash that invoice buys is credited. The plan (both quotes, the invoice
-- amount) is committed before the melt, so a retry or a crash resumes: a paid melt is minted and
-- credited, an unpaid one whose inputs are unspent leaves the token the client's.
CREATE TABLE wallet.foreign_swaps (
    token_hash text PRIMARY KEY,
    foreign_mint text NOT NULL,
    mint_url text NOT NULL,  -- the listed mint the value lands at
    state text NOT NULL CHECK (state IN ('melting', 'done')),
    amount_sat bigint NOT NULL CHECK (amount_sat > 0),  -- the token's face value
    input_fee_sat bigint NOT NULL CHECK (input_fee_sat >= 0),  -- the foreign mint's NUT-02 fee
    invoice_sat bigint NOT NULL CHECK (invoice_sat > 0),  -- what reaches the listed mint (credited)
    mint_quote_id text NOT NULL,
    melt_quote_id text NOT NULL,
    attempts int NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz
);
CREATE INDEX foreign_swaps_recent ON wallet.foreign_swaps (created_at);
