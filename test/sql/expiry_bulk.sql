-- The set-based expire handler writes exactly what the posting routine
-- writes: the same program expired through each path gives the same
-- balances, lots, lot uses and transfers (up to ids), and both chains verify.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';
SELECT * FROM no_plan();

-- the same members and postings in programs rows_p and set_p
CREATE FUNCTION pg_temp.setup(p text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM loyalty.create_program(p, p, 'Europe/Paris', '{"expiry": {"policy": "fixed", "after": "30 days"}}');
    FOR i IN 1..6 LOOP
        PERFORM loyalty.enroll(p, 'm' || i, occurred_at => '2024-01-01');
        FOR j IN 1..i LOOP
            PERFORM loyalty.earn(p, 'm' || i, 10 * j, 'm' || i || '-e' || j, occurred_at => timestamptz '2024-01-01' + j * interval '3 days');
        END LOOP;
    END LOOP;
    -- a partly spent lot, and a pending one
    PERFORM set_config('search_path', 'loyalty, public', true);
    PERFORM loyalty._post_member(p, 'm3', 'redemption', -15, 'adjust', 'spend', 'test', '2024-01-08');
    PERFORM loyalty._post_member(p, 'm4', 'issuance', 7, 'earn', 'late', NULL, '2024-01-05', '2024-03-01');
    PERFORM set_config('search_path', '"$user", public', true);
END $$;

-- a program's ledger, with ids replaced by ordinals within the program
CREATE FUNCTION pg_temp.ledger(p text)
RETURNS TABLE (member text, what text) LANGUAGE sql AS $$
    WITH lots AS (
        SELECT l.*, m.member_ref, row_number() OVER (PARTITION BY l.account_id ORDER BY l.id) AS n
        FROM loyalty.lot l JOIN loyalty.account a ON a.id = l.account_id
        JOIN loyalty.member m ON m.id = a.member_id JOIN loyalty.program pr ON pr.id = m.program_id
        WHERE pr.code = p
    )
    SELECT m.member_ref, format('account available %s pending %s', a.available, a.pending)
    FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id JOIN loyalty.program pr ON pr.id = m.program_id
    WHERE pr.code = p
    UNION ALL
    SELECT l.member_ref, format('lot %s amount %s remaining %s pending %s expires %s', l.n, l.amount, l.remaining, l.pending, l.expires_at)
    FROM lots l
    UNION ALL
    SELECT l.member_ref, format('%s %s %s at %s by %s reason %s rule %s, lot %s uses %s at %s, ref %s',
                                t.kind, t.amount, b.kind, t.occurred_at, t.actor, t.reason, t.rule_version,
                                l.n, u.amount, u.occurred_at, replace(t.ref, l.id::text, 'L' || l.n))
    FROM loyalty.transfer t JOIN loyalty.lot_use u ON u.transfer_id = t.id
    JOIN lots l ON l.id = u.lot_id JOIN loyalty.account b ON b.id = t.credit_account_id
    WHERE t.kind = 'expire'
$$;

INSERT INTO loyalty.job (name, handler, batch_size) VALUES ('expire_rows', 'loyalty._job_expire_rows', 4);
SELECT loyalty.set_job('expire', batch_size => 4) IS NOT NULL AS set;

SELECT pg_temp.setup('rows_p');
SELECT * FROM loyalty.run_job('expire_rows', '2024-02-10');
SELECT pg_temp.setup('set_p');
SELECT * FROM loyalty.run_job('expire', '2024-02-10');

SELECT is((SELECT count(*) FROM pg_temp.ledger('rows_p') WHERE what LIKE 'expire%'), 15::bigint, 'the row path expired 15 lots');
SELECT is((SELECT count(*) FROM pg_temp.ledger('set_p') WHERE what LIKE 'expire%'), 15::bigint, 'the set path expired 15 lots');
SELECT set_eq($$SELECT * FROM pg_temp.ledger('rows_p')$$, $$SELECT * FROM pg_temp.ledger('set_p')$$,
              'both paths write the same ledger');
SELECT is_empty($$SELECT * FROM loyalty.verify_chain('rows_p')$$, 'the row path''s chains verify');
SELECT is_empty($$SELECT * FROM loyalty.verify_chain('set_p')$$, 'the set path''s chains verify');
SELECT is((SELECT count(DISTINCT t.posted_at) FROM loyalty.transfer t JOIN loyalty.program p ON p.id = t.program_id
           WHERE p.code = 'set_p' AND t.kind = 'expire'), 1::bigint,
          'posted_at is the transaction start, as in the posting routine');

-- the rest, later, through the set path in both: still the same, and the
-- set path continues the chains the row path left
SELECT * FROM loyalty.run_job('expire', '2024-03-01');
SELECT set_eq($$SELECT * FROM pg_temp.ledger('rows_p')$$, $$SELECT * FROM pg_temp.ledger('set_p')$$,
              'both paths still write the same ledger');
SELECT is_empty($$SELECT * FROM loyalty.verify_chain('rows_p')$$, 'chains verify after the set path continued the row path');
SELECT is_empty($$SELECT * FROM loyalty.verify_chain('set_p')$$, 'chains verify');
SELECT is((SELECT sum(l.remaining::bigint) FROM loyalty.lot l)::bigint, 0::bigint, 'nothing left');

-- a rerun posts nothing
SELECT * FROM loyalty.run_job('expire', '2024-03-01');
SELECT * FROM loyalty.run_job('expire_rows', '2024-03-01');

-- each lot expired once, with ref lot:<id>
SELECT is_empty($$SELECT u.lot_id FROM loyalty.lot_use u JOIN loyalty.transfer t ON t.id = u.transfer_id
                  WHERE t.kind = 'expire' GROUP BY u.lot_id HAVING count(*) > 1 OR min(t.ref) <> 'lot:' || u.lot_id$$,
                'each lot expired once, under ref lot:<id>');
SELECT * FROM finish();
