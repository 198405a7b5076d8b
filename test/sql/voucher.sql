SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
SELECT * FROM no_plan();

SELECT loyalty.create_program('shop', 'Shop') > 0 AS program;
SELECT loyalty.create_program('other', 'Other') > 0 AS program;
SELECT loyalty.enroll('shop', 'ann', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.earn('shop', 'ann', 10000, 'e-ann', occurred_at => '2025-01-01') > 0 AS earned;
SELECT loyalty.add_reward('shop', 'v10', '10 EUR off', 100, '{"kind": "voucher", "voucher_valid_for": "30 days"}') AS version;
SELECT loyalty.add_reward('shop', 'v5', '5 EUR off', 50, '{"kind": "voucher"}') AS version;

-- ---- codes: 16 characters of the unambiguous alphabet, grouped, checked ----
SELECT array_length(vouchers, 1) AS issued FROM loyalty.redeem('shop', 'ann', 'v10', 'r1', 3, '2025-02-01');
SELECT array_length(vouchers, 1) AS issued FROM loyalty.redeem('shop', 'ann', 'v5', 'r2', 1, '2025-02-01');
SELECT count(*) AS codes, count(DISTINCT code) AS distinct_codes,
       bool_and(code ~ '^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}$') AS well_formed,
       bool_and(loyalty._voucher_normalize(code) = code) AS check_character_verifies
FROM loyalty.voucher;
SELECT expires_at - issued_at AS valid_for, count(*) FROM loyalty.voucher GROUP BY 1 ORDER BY 1;
-- a thousand fresh codes: all distinct, every one verifies
SELECT count(DISTINCT c) AS distinct_codes, bool_and(loyalty._voucher_normalize(c) = c) AS all_verify
FROM (SELECT loyalty._voucher_code() AS c FROM generate_series(1, 1000)) x;
-- every single mistyped character of a code is caught by the check character (16 x 31 typos)
CREATE FUNCTION pg_temp.typos(p_code text) RETURNS TABLE (typos bigint, caught bigint) LANGUAGE plpgsql AS $$
DECLARE
    a text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    c text := replace(p_code, '-', '');
    t text;
BEGIN
    typos := 0; caught := 0;
    FOR pos IN 1..16 LOOP
        FOR i IN 1..32 LOOP
            CONTINUE WHEN substr(a, i, 1) = substr(c, pos, 1);
            t := overlay(c placing substr(a, i, 1) from pos for 1);
            typos := typos + 1;
            BEGIN
                PERFORM loyalty._voucher_normalize(t);
            EXCEPTION WHEN SQLSTATE 'LY041' THEN
                caught := caught + 1;
            END;
        END LOOP;
    END LOOP;
    RETURN NEXT;
END $$;
SELECT * FROM pg_temp.typos('7KQ2-M9XD-4RTB-HN6G');
SELECT * FROM pg_temp.typos((SELECT code FROM loyalty.voucher ORDER BY id LIMIT 1));
-- typing is forgiving: case, spaces and dashes do not matter; I and L read as 1, O as 0
SELECT loyalty._voucher_normalize('7kq2m9xd4rtbhn6g'), loyalty._voucher_normalize(' 7KQ2 M9XD 4RTB HN6G '),
       loyalty._voucher_normalize('OOOO-OOOO-OOOO-OOOO'), loyalty._voucher_normalize('0000-0000-0000-0000');
SELECT throws_ok($$SELECT loyalty._voucher_normalize('7KQ2-M9XD-4RTB-HN6H')$$, 'LY041', 'voucher code "7KQ2-M9XD-4RTB-HN6H" is mistyped');
SELECT throws_ok($$SELECT loyalty._voucher_normalize('7KQ2-M9XD-4RTB-NH6G')$$, 'LY041', 'voucher code "7KQ2-M9XD-4RTB-NH6G" is mistyped');
SELECT throws_ok($$SELECT loyalty._voucher_normalize('7KQ2-M9XD-4RTB-HN6')$$, '22P02', 'invalid voucher code "7KQ2-M9XD-4RTB-HN6"');
SELECT throws_ok($$SELECT loyalty._voucher_normalize('7KQ2-M9XD-4RTB-HN6GG')$$, '22P02', 'invalid voucher code "7KQ2-M9XD-4RTB-HN6GG"');
SELECT throws_ok($$SELECT loyalty._voucher_normalize('7KQ2-M9XD-4RTB-HU6G')$$, '22P02', 'invalid voucher code "7KQ2-M9XD-4RTB-HU6G"');
SELECT throws_ok($$SELECT loyalty._voucher_normalize('7KQ2_M9XD')$$, '22P02', 'invalid voucher code "7KQ2_M9XD"');
SELECT throws_ok($$SELECT loyalty._voucher_normalize(NULL)$$, '22004', 'voucher code must not be null');

-- ---- use_voucher: once; unknown, used, expired, cancelled and mistyped are distinct errors ----
CREATE TEMP TABLE v AS SELECT id, code FROM loyalty.voucher ORDER BY id;
SELECT loyalty.use_voucher('shop', (SELECT code FROM v ORDER BY id LIMIT 1), 'till-1', '2025-02-10') AS reward;
-- the same use again answers the same; typed in lower case without dashes, it is the same code
SELECT loyalty.use_voucher('shop', lower(replace((SELECT code FROM v ORDER BY id LIMIT 1), '-', '')), 'till-1') AS reward;
SELECT state, used_at, used_ref FROM loyalty.voucher ORDER BY id LIMIT 1;
DO $$
BEGIN
    PERFORM loyalty.use_voucher('shop', (SELECT code FROM v ORDER BY id LIMIT 1), 'till-2');
EXCEPTION WHEN SQLSTATE 'LY039' THEN
    RAISE NOTICE 'LY039: %', replace(SQLERRM, (SELECT code FROM v ORDER BY id LIMIT 1), 'CODE');
END $$;
SELECT throws_ok($$SELECT loyalty.use_voucher('shop', '7KQ2-M9XD-4RTB-HN6G', 'till-3')$$, 'LY038', 'voucher "7KQ2-M9XD-4RTB-HN6G" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.use_voucher('shop', '7KQ2-M9XD-4RTB-HN6H', 'till-3')$$, 'LY041', 'voucher code "7KQ2-M9XD-4RTB-HN6H" is mistyped');
SELECT throws_ok($$SELECT loyalty.use_voucher('shop', 'hello', 'till-3')$$, '22P02', 'invalid voucher code "hello"');
SELECT throws_ok($$SELECT loyalty.use_voucher('nope', '7KQ2-M9XD-4RTB-HN6G', 'till-3')$$, 'LY002', 'program "nope" does not exist');
SELECT throws_ok($$SELECT loyalty.use_voucher('shop', '7KQ2-M9XD-4RTB-HN6G', '')$$, '22023', 'invalid ref ""');
DO $$
DECLARE
    c2 text := (SELECT code FROM v ORDER BY id OFFSET 1 LIMIT 1);
    c3 text := (SELECT code FROM v ORDER BY id OFFSET 2 LIMIT 1);
    c4 text := (SELECT code FROM v ORDER BY id OFFSET 3 LIMIT 1);
    state text;
BEGIN
    -- a voucher of one program is unknown to another
    BEGIN
        PERFORM loyalty.use_voucher('other', c2, 'till-4');
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
        RAISE NOTICE '%: %', state, replace(SQLERRM, c2, 'CODE');
    END;
    -- expired: 30 days after issue (2025-02-01)
    BEGIN
        PERFORM loyalty.use_voucher('shop', c2, 'till-4', '2025-03-03 00:00');
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
        RAISE NOTICE '%: %', state, replace(SQLERRM, c2, 'CODE');
    END;
    RAISE NOTICE 'just before expiry: %', loyalty.use_voucher('shop', c2, 'till-4', '2025-03-02 23:59');
    -- a ref names one use of one voucher
    BEGIN
        PERFORM loyalty.use_voucher('shop', c3, 'till-4', '2025-02-10');
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
        RAISE NOTICE '%: %', state, SQLERRM;
    END;
    -- cancelled with its redemption: the v5 voucher (r2)
    PERFORM loyalty.cancel_redemption('shop', 'r2');
    BEGIN
        PERFORM loyalty.use_voucher('shop', c4, 'till-5', '2025-02-10');
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
        RAISE NOTICE '%: %', state, replace(SQLERRM, c4, 'CODE');
    END;
    -- a redemption whose voucher was used cannot be cancelled
    BEGIN
        PERFORM loyalty.cancel_redemption('shop', 'r1');
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
        RAISE NOTICE '%: %', state, SQLERRM;
    END;
END $$;
SELECT v.id - (SELECT min(id) FROM v) + 1 AS n, vo.state, vo.used_ref FROM v JOIN loyalty.voucher vo USING (id) ORDER BY v.id;
SELECT * FROM finish();
