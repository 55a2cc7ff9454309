-- The two statements every paid call runs, as server-side functions: one round trip each instead of
-- a dozen, with the same row locks (reservation before key) and the same ledger rows as before.

CREATE FUNCTION billing.reserve(p_key text, p_request text, p_reservation text, p_model text, p_amount bigint,
                                p_price bytea)
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
    INSERT INTO billing.reservations (reservation_id, request_id, key_hash, model, amount_msat, price)
    VALUES (p_reservation, p_request, p_key, p_model, p_amount, p_price);
    IF p_amount > 0 THEN
        INSERT INTO billing.ledger (idempotency_key, kind, debit, credit, amount_msat, key_hash)
        VALUES ('reserve:' || p_reservation, 'reserve', 'user:' || p_key, 'held:' || p_key, p_amount, p_key);
    END IF;
    RETURN QUERY SELECT 'reserved', p_reservation, p_amount, v_spendable, p_model, p_price;
END $$;

-- Charge a call once (by request id): the held amount first, then whatever no other call holds, never
-- below zero; release the rest. The parts are scaled down when the charge was capped. The cost was
-- computed by the caller at p_price, which must be the price the reservation was made at.
CREATE FUNCTION billing.settle(p_request text, p_reservation text, p_key text, p_source text,
                               p_base bigint, p_input bigint, p_output bigint, p_total bigint, p_price bytea)
RETURNS TABLE (already boolean, cost_msat bigint, base_msat bigint, input_msat bigint, output_msat bigint,
               balance_msat bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r billing.reservations%ROWTYPE;
    s billing.settlements%ROWTYPE;
    v_free bigint;
    v_held bigint;
    v_charge bigint;
    v_from_held bigint;
    v_balance bigint;
    v_base bigint := p_base;
    v_input bigint := p_input;
    v_output bigint := p_output;
BEGIN
    SELECT * INTO r FROM billing.reservations WHERE reservations.reservation_id = p_reservation FOR UPDATE;
    SELECT * INTO s FROM billing.settlements WHERE settlements.request_id = p_request;
    IF FOUND THEN
        RETURN QUERY SELECT true, s.cost_msat, s.base_msat, s.input_msat, s.output_msat, s.balance_msat;
        RETURN;
    END IF;
    IF r.reservation_id IS NULL OR r.key_hash <> p_key OR r.price <> p_price THEN
        RAISE EXCEPTION 'no such reservation' USING ERRCODE = 'P0002';
    END IF;
    v_held := CASE WHEN r.state = 'open' THEN r.amount_msat ELSE 0 END;
    SELECT k.balance_msat - k.reserved_msat INTO v_free FROM billing.keys k WHERE k.key_hash = p_key FOR UPDATE;
    v_charge := LEAST(p_total, v_held + v_free);
    v_from_held := LEAST(v_charge, v_held);
    UPDATE billing.keys k SET balance_msat = k.balance_msat - v_charge, reserved_msat = k.reserved_msat - v_held,
           total_requests = k.total_requests + (p_source <> 'failed')::int,
           total_spent_msat = k.total_spent_msat + v_charge
     WHERE k.key_hash = p_key
    RETURNING k.balance_msat - k.reserved_msat INTO v_balance;
    INSERT INTO billing.ledger (idempotency_key, kind, debit, credit, amount_msat, key_hash)
    SELECT e.k, e.kind, e.debit, e.credit, e.amount, p_key FROM (VALUES
        ('settle:' || p_request, 'settle', 'held:' || p_key, 'revenue', v_from_held),
        ('release:' || p_request, 'release', 'held:' || p_key, 'user:' || p_key, v_held - v_from_held),
        ('settle-over:' || p_request, 'settle', 'user:' || p_key, 'revenue', v_charge - v_from_held)
    ) AS e(k, kind, debit, credit, amount) WHERE e.amount > 0;
    UPDATE billing.reservations SET state = 'settled' WHERE reservations.reservation_id = p_reservation;
    IF v_charge < p_total THEN
        v_base := LEAST(p_base, v_charge);
        v_input := LEAST(p_input, GREATEST(v_charge - v_base, 0));
        v_output := v_charge - v_base - v_input;
    END IF;
    INSERT INTO billing.settlements (request_id, key_hash, source, cost_msat, base_msat, input_msat, output_msat,
                                     balance_msat)
    VALUES (p_request, p_key, p_source, v_charge, v_base, v_input, v_output, v_balance);
    RETURN QUERY SELECT false, v_charge, v_base, v_input, v_output, v_balance;
END $$;
