-- Quota grants (RFC 4006 credit control). A grant holds part of a key's balance for one gateway, in
-- keys.reserved_msat like a reservation, so all grants and reservations together never exceed the
-- balance (the CHECK on billing.keys). held_msat is what the grant still holds: granted units, less
-- units settled against it, less units the gateway gave back. Ledger: a grant moves user:<h> ->
-- held:<h> ('grant'), a settled call held:<h> -> revenue, a return or expiry held:<h> -> user:<h>.
CREATE TABLE billing.grants (
    grant_id          text PRIMARY KEY,
    key_hash          text NOT NULL,
    gateway_id        text NOT NULL,
    granted_msat      bigint NOT NULL DEFAULT 0,
    settled_msat      bigint NOT NULL DEFAULT 0,
    returned_msat     bigint NOT NULL DEFAULT 0,
    held_msat         bigint NOT NULL DEFAULT 0 CHECK (held_msat >= 0),
    request_number    int NOT NULL DEFAULT 0,     -- CC-Request-Number of the last request answered
    last_granted_msat bigint NOT NULL DEFAULT 0,  -- that answer's units, repeated to a retried request
    state             text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'terminated', 'expired')),
    expires_at        timestamptz NOT NULL,       -- Validity-Time from the last answer
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX grants_open ON billing.grants (key_hash) WHERE state = 'open';
CREATE INDEX grants_holding ON billing.grants (expires_at) WHERE held_msat > 0;

-- While set and in the future, no new units are granted on the key: a refund is calling grants back.
ALTER TABLE billing.keys ADD COLUMN recall_until timestamptz;

-- One Credit-Control-Request: take back `p_returned` unused units, grant up to `p_requested` (at
-- least `p_minimum`, else nothing) out of the key's free balance, renew or close the grant. A new
-- grant gets at most half of what is free beyond the minimum, so gateways sharing a key share it.
-- A repeated request number moves nothing and repeats the last answer.
CREATE FUNCTION billing.credit_control(p_grant text, p_key text, p_gateway text, p_number int, p_requested bigint,
                                       p_minimum bigint, p_returned bigint, p_final boolean, p_validity int)
RETURNS TABLE (outcome text, granted_msat bigint, spendable bigint)
LANGUAGE plpgsql AS $$
DECLARE
    g billing.grants%ROWTYPE;
    k billing.keys%ROWTYPE;
    v_exists boolean;
    v_return bigint;
    v_grant bigint := 0;
    v_free bigint;
BEGIN
    SELECT * INTO g FROM billing.grants WHERE grants.grant_id = p_grant FOR UPDATE;
    v_exists := FOUND;
    IF v_exists AND g.key_hash <> p_key THEN
        RAISE EXCEPTION 'grant of another key' USING ERRCODE = 'P0002';
    END IF;
    SELECT * INTO k FROM billing.keys WHERE keys.key_hash = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_key', 0::bigint, 0::bigint;
        RETURN;
    END IF;
    IF v_exists AND p_number <= g.request_number THEN
        RETURN QUERY SELECT CASE WHEN g.state = 'open' THEN 'repeat' ELSE 'closed' END, g.last_granted_msat,
                            k.balance_msat - k.reserved_msat;
        RETURN;
    END IF;
    IF NOT v_exists THEN
        IF p_final THEN
            RETURN QUERY SELECT 'closed', 0::bigint, k.balance_msat - k.reserved_msat;
            RETURN;
        END IF;
        INSERT INTO billing.grants (grant_id, key_hash, gateway_id, expires_at)
        VALUES (p_grant, p_key, p_gateway, now() + make_interval(secs => p_validity)) RETURNING * INTO g;
    ELSIF g.state <> 'open' THEN
        RETURN QUERY SELECT 'closed', 0::bigint, k.balance_msat - k.reserved_msat;
        RETURN;
    END IF;
    v_return := LEAST(GREATEST(p_returned, 0), g.held_msat);
    v_free := k.balance_msat - k.reserved_msat + v_return;
    IF NOT p_final AND p_requested > 0 AND v_free >= GREATEST(p_minimum, 1)
       AND (k.recall_until IS NULL OR k.recall_until < now()) THEN
        v_grant := LEAST(p_requested, GREATEST(p_minimum, v_free / 2), v_free);
    END IF;
    UPDATE billing.keys SET reserved_msat = reserved_msat - v_return + v_grant WHERE keys.key_hash = p_key;
    UPDATE billing.grants SET held_msat = held_msat - v_return + v_grant, granted_msat = grants.granted_msat + v_grant,
           returned_msat = returned_msat + v_return, request_number = p_number, last_granted_msat = v_grant,
           state = CASE WHEN p_final THEN 'terminated' ELSE 'open' END,
           expires_at = CASE WHEN p_final THEN expires_at ELSE now() + make_interval(secs => p_validity) END
     WHERE grants.grant_id = p_grant;
    INSERT INTO billing.ledger (idempotency_key, kind, debit, credit, amount_msat, key_hash)
    SELECT e.k, e.kind, e.debit, e.credit, e.amount, p_key FROM (VALUES
        ('grant:' || p_grant || ':' || p_number, 'grant_quota', 'user:' || p_key, 'held:' || p_key, v_grant),
        ('return:' || p_grant || ':' || p_number, 'return_quota', 'held:' || p_key, 'user:' || p_key, v_return)
    ) AS e(k, kind, debit, credit, amount) WHERE e.amount > 0;
    RETURN QUERY SELECT CASE WHEN p_final OR p_requested <= 0 OR v_grant > 0 THEN 'ok'
                             WHEN k.recall_until IS NOT NULL AND k.recall_until >= now() THEN 'recalling'
                             ELSE 'insufficient' END,
                        v_grant, v_free - v_grant;
END $$;

-- Grants past their Validity-Time that still hold units (a gateway that died or lost its answer, or
-- a closed grant whose last usage never came): give the units back to the key, once per grant.
CREATE FUNCTION billing.expire_grants(p_limit int)
RETURNS TABLE (grant_id text, key_hash text, released_msat bigint)
LANGUAGE plpgsql AS $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT * FROM billing.grants x WHERE x.held_msat > 0 AND x.expires_at < now()
             ORDER BY x.grant_id LIMIT p_limit FOR UPDATE SKIP LOCKED LOOP
        UPDATE billing.keys k SET reserved_msat = k.reserved_msat - g.held_msat WHERE k.key_hash = g.key_hash;
        UPDATE billing.grants x SET held_msat = 0, returned_msat = x.returned_msat + g.held_msat,
               state = CASE WHEN x.state = 'open' THEN 'expired' ELSE x.state END
         WHERE x.grant_id = g.grant_id;
        INSERT INTO billing.ledger (idempotency_key, kind, debit, credit, amount_msat, key_hash)
        VALUES ('grant-expire:' || g.grant_id, 'expire_quota', 'held:' || g.key_hash, 'user:' || g.key_hash,
                g.held_msat, g.key_hash);
        grant_id := g.grant_id;
        key_hash := g.key_hash;
        released_msat := g.held_msat;
        RETURN NEXT;
    END LOOP;
    -- Open grants past their time that hold nothing are closed too, so a late request starts afresh.
    UPDATE billing.grants x SET state = 'expired' WHERE x.state = 'open' AND x.held_msat = 0 AND x.expires_at < now();
END $$;
