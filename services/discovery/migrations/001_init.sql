CREATE SCHEMA IF NOT EXISTS discovery;

-- The node's generated Nostr key, when NSEC is not set: one row, shared by every replica and restart.
CREATE TABLE discovery.node_key (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    secret_hex text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The created_at of the last announcement signed per key, so a replacement is always strictly newer
-- (relays keep the event with the lowest id when two share a timestamp) even across quick restarts.
CREATE TABLE discovery.announcement (
    pubkey text PRIMARY KEY,
    created_at bigint NOT NULL
);
