-- Lightning invoices the node asked its mint for (NUT-04 mint quotes), so the ecash they buy is minted
-- exactly once. Like a redemption, the output plan (keyset, first counter, amounts) is written and
-- committed before the mint call; a retry after a lost reply derives the same outputs and gets the
-- signatures back with /v1/restore.
CREATE TABLE wallet.mint_quotes (
    quote_id text PRIMARY KEY,
    mint_url text NOT NULL,
    amount_sat bigint NOT NULL CHECK (amount_sat > 0),
    request text NOT NULL,  -- the bolt11 invoice
    expiry bigint NOT NULL DEFAULT 0,  -- unix seconds, 0 when the mint gave none
    state text NOT NULL DEFAULT 'unpaid' CHECK (state IN ('unpaid', 'minting', 'issued')),
    keyset_id text,
    counter bigint,
    amounts bigint[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz
);
