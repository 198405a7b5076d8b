-- The journal writers (src/ledger_write.c) keep each table's index set
-- (IndexInfo, partial predicates ready to evaluate) across statements: an
-- index created, dropped or rebuilt since must be seen by the next write.
-- Each check counts a table's rows through an index and by a plain scan.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';

SELECT loyalty.create_program('shop', 'Shop', 'UTC') > 0 AS created;
SELECT loyalty.enroll('shop', m, occurred_at => '2025-01-01') > 0 AS enrolled FROM unnest(ARRAY['c1', 'c2']) m;
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
-- rows counted through an index (the only path left to the planner) and by a scan
CREATE FUNCTION pg_temp.through_index(q text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    SET LOCAL enable_seqscan = off;
    SET LOCAL enable_bitmapscan = off;
    EXECUTE q INTO n;
    RESET enable_seqscan;
    RESET enable_bitmapscan;
    RETURN n;
END $$;

CREATE FUNCTION pg_temp.explain(q text) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    r text;
BEGIN
    SET LOCAL enable_seqscan = off;
    SET LOCAL enable_bitmapscan = off;
    FOR r IN EXECUTE 'EXPLAIN (COSTS OFF) ' || q LOOP
        RETURN NEXT r;
    END LOOP;
    RESET enable_seqscan;
    RESET enable_bitmapscan;
END $$;

SELECT plan(9);
-- writes before: the sets are built
SELECT sum(loyalty.accrue('shop', 'c1', 10, 'a' || i, '2025-02-01')) AS earned FROM generate_series(1, 5) i;

-- a new partial index on lot, and a new expression index on accrual
CREATE INDEX writer_test_lot_idx ON loyalty.lot (transfer_id) WHERE amount OPERATOR(loyalty.>) 5;
CREATE INDEX writer_test_ref_idx ON loyalty.accrual ((lower(ref)));
SELECT sum(loyalty.accrue('shop', 'c2', 10, 'B' || i, '2025-02-02')) AS earned FROM generate_series(1, 5) i;
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.lot WHERE amount OPERATOR(loyalty.>) 5 AND transfer_id > 0$$),
          10::bigint, 'the new partial index has every lot written since');
SELECT alike((SELECT string_agg(x, ' ') FROM pg_temp.explain(
    $$SELECT count(*) FROM loyalty.lot WHERE amount OPERATOR(loyalty.>) 5 AND transfer_id > 0$$) x),
    '%writer_test_lot_idx%', 'and is the one counted');
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.accrual WHERE lower(ref) LIKE 'b%' AND lower(ref) >= 'b'$$),
          5::bigint, 'the new expression index has the new purchases');

-- rebuilt (new files, same indexes), and one index replaced by another
-- (as many indexes as before, not the same ones)
REINDEX TABLE loyalty.lot;
DROP INDEX loyalty.writer_test_ref_idx;
CREATE INDEX writer_test_day_idx ON loyalty.accrual (day) WHERE points > 5;
SELECT sum(loyalty.accrue('shop', 'c2', 10, 'c' || i, '2025-02-03')) AS earned FROM generate_series(1, 5) i;
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.accrual WHERE points > 5 AND day > '2000-01-01'$$),
          15::bigint, 'the replacing index has the purchases written since');
DROP INDEX loyalty.writer_test_day_idx;
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.lot WHERE amount OPERATOR(loyalty.>) 5 AND transfer_id > 0$$),
          15::bigint, 'the rebuilt index has every lot written since');
DROP INDEX loyalty.writer_test_lot_idx;
SELECT lives_ok($$SELECT loyalty.accrue('shop', 'c1', 10, 'd1', '2025-02-04')$$, 'a write after the drop');

-- a refund and an expiry, which use lots through the other writers, in a
-- transaction that first created an index: all see it
BEGIN;
CREATE INDEX writer_test_lot_idx2 ON loyalty.lot (vests_at) WHERE remaining OPERATOR(loyalty.>) 0;
SELECT loyalty.refund('shop', 'a1') AS clawed;
SELECT loyalty.accrue('shop', 'c1', 10, 'e1', '2025-02-05') AS earned;
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.lot WHERE remaining OPERATOR(loyalty.>) 0 AND vests_at > '2000-01-01'$$),
          (SELECT count(*) FROM loyalty.lot WHERE remaining::bigint > 0), 'an index of the same transaction, changed by a refund');
ROLLBACK;
SELECT lives_ok($$SELECT loyalty.accrue('shop', 'c1', 10, 'f1', '2025-02-06')$$, 'a write after the rollback');
SELECT is((SELECT count(*) FROM loyalty.verify_chain('shop')), 0::bigint, 'the chain holds');
SELECT * FROM finish();
