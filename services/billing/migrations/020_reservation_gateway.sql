-- Each reservation names the gateway that made it, so billing's sweeper can release the open X-Cashu
-- reservations of a gateway that stopped sending heartbeats (killed mid-call) within GATEWAY_GONE_AFTER
-- seconds instead of RESERVATION_TTL. '' = a gateway from before heartbeats: only RESERVATION_TTL applies.
ALTER TABLE billing.reservations ADD COLUMN gateway text NOT NULL DEFAULT '';

-- billing.reserve with the gateway's instance id; the 6-argument form (a billing replica not yet
-- upgraded) stays and reserves with none.
CREATE FUNCTION billing.reserve(p_key text, p_request text, p_reservation text, p_model text, p_amount bigint,
                                p_price bytea, p_gateway text)
RETURNS TABLE (outcome text, reservation_id text, amount_msat bigint, spendable bigint, model text, price bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_spendable bigint;
    r billing.reservations%ROWTYPE;
BEGIN
    SELECT * INTO r FROM billing.reservations WHERE request_id = p_request;
    IF FOUND THEN  -- a retried request: the hold is already there
        SELECT k.balance_msat - k.reserved_msat INTO v_spendable FROM billing.keys k WHERE k.key_hash = r.key_hash;
        RETURN QUERY SELECT 'existing', r.reservation_id, r.amount_msat, v_spendable, r.model, r.price;
        RETURN;
    END IF;
    UPDATE billing.keys k SET reserved_msat = k.reserved_msat + p_amount
     WHERE k.key_hash = p_key AND k.balance_msat - k.reserved_msat >= p_amount
    RETURNING k.balance_msat - k.reserved_msat INTO v_spendable;
    IF NOT FOUND THEN
        SELECT k.balance_msat - k.reserved_msat INTO v_spendable FROM billing.keys k WHERE k.key_hash = p_key;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'unknown_key', NULL::text, p_amount, 0::bigint, NULL::text, NULL::bytea;
        ELSE
            RETURN QUERY SELECT 'insufficient', NULL::text, p_amount, v_spendable, NULL::text, NULL::bytea;
        END IF;
        RETURN;
    END IF;
    INSERT INTO billing.reservations (reservation_id, request_id, key_hash, model, amount_msat, price, gateway)
    VALUES (p_reservation, p_request, p_key, p_model, p_amount, p_price, p_gateway);
    IF p_amount > 0 THEN
        INSERT INTO billing.ledger (idempotency_key, kind, debit, credit, amount_msat, key_hash)
        VALUES ('reserve:' || p_reservation, 'reserve', 'user:' || p_key, 'held:' || p_key, p_amount, p_key);
    END IF;
    RETURN QUERY SELECT 'reserved', p_reservation, p_amount, v_spendable, p_model, p_price;
END $$;

CREATE OR REPLACE FUNCTION billing.reserve(p_key text, p_request text, p_reservation text, p_model text,
                                           p_amount bigint, p_price bytea)
RETURNS TABLE (outcome text, reservation_id text, amount_msat bigint, spendable bigint, model text, price bytea)
LANGUAGE sql AS $$
    SELECT * FROM billing.reserve(p_key, p_request, p_reservation, p_model, p_amount, p_price, '')
$$;
