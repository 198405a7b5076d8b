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

SELECT plan(26);
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

-- A purchase's journal line leaves the journal's indexes WHERE kind <>
-- 'accrual' alone, unopened: the writer declares kind the same in every
-- row. Its credit index (transfer_credit_idx, how a member's lines are
-- found), an index whose predicate is true for accruals, or one that reads
-- another column, is written (each DBA index below), in one-row and bulk.
CREATE INDEX writer_test_accrual_lines ON loyalty.transfer (credit_account_id) WHERE kind = 'accrual';
CREATE INDEX writer_test_big_lines ON loyalty.transfer (id) WHERE kind <> 'accrual' OR amount OPERATOR(loyalty.>) 15;
SELECT loyalty.accrue('shop', 'c1', 10, 'g1', '2025-02-07') AS earned;
BEGIN;
SELECT loyalty.accrue('shop', 'c2', 20, 'g2', '2025-02-07') AS earned;
SELECT is(array_agg(l.relation::regclass::text ORDER BY l.relation::regclass::text),
          ARRAY['loyalty.transfer_credit_idx', 'loyalty.transfer_pkey', 'loyalty.writer_test_accrual_lines',
                'loyalty.writer_test_big_lines'],
          'a sale locks only the journal indexes that can take its line')
FROM pg_locks l JOIN pg_index i ON i.indexrelid = l.relation
WHERE l.pid = pg_backend_pid() AND i.indrelid = 'loyalty.transfer'::regclass;
COMMIT;
CREATE TABLE writer_test_orders (id text PRIMARY KEY, customer text, total numeric);
SELECT loyalty.attach_accrual('writer_test_orders', 'shop', 'customer', 'total', 'id');
INSERT INTO writer_test_orders SELECT 'h' || i, 'c' || (i % 2 + 1), 10 + i % 10 FROM generate_series(1, 200) i;
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.transfer WHERE kind = 'accrual' AND credit_account_id > 0$$),
          (SELECT count(*) FROM loyalty.transfer WHERE kind = 'accrual'), 'an index WHERE kind = ''accrual'' has every line');
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.transfer WHERE (kind <> 'accrual' OR amount OPERATOR(loyalty.>) 15) AND id > 0$$),
          (SELECT count(*) FROM loyalty.transfer WHERE kind <> 'accrual' OR amount::bigint > 15), 'an index reading amount too has its lines');
SELECT cmp_ok((SELECT count(*) FROM loyalty.transfer WHERE kind = 'accrual' AND amount::bigint > 15), '>', 50::bigint,
              'of which there are many');
-- A lot's two partial indexes are left alone the same way when no lot of
-- the posting can take an entry: lot_expiry_idx (expires_at IS NOT NULL,
-- one of its ANDed conditions) in a program without expiry, lot_pending_idx
-- (WHERE pending) when no purchase has a return window. shop has neither.
BEGIN;
SELECT loyalty.accrue('shop', 'c2', 20, 'k1', '2025-02-08') AS earned;
SELECT is(array_agg(l.relation::regclass::text ORDER BY l.relation::regclass::text),
          ARRAY['loyalty.lot_open_idx', 'loyalty.lot_pkey'],
          'a sale without expiry or return window locks two lot indexes')
FROM pg_locks l JOIN pg_index i ON i.indexrelid = l.relation
WHERE l.pid = pg_backend_pid() AND i.indrelid = 'loyalty.lot'::regclass;
COMMIT;
SELECT loyalty.create_program('exp', 'Expiring', 'UTC', '{"expiry": {"policy": "fixed", "after": "12 months"}}') > 0 AS created;
SELECT loyalty.enroll('exp', 'c1', occurred_at => '2025-01-01') > 0 AS enrolled;
-- no return window until March, ten days from then
SELECT loyalty.set_earning_rules('exp', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
SELECT loyalty.set_earning_rules('exp', '{"base": {"per": 1, "points": 1}, "pending_days": 10}', '2025-03-01') AS version;
-- A sale still in its return window defers its journal line and lot
-- (docs/accrual.md): it touches no index of either table, and its
-- account takes an entry in account_deferred_idx instead.
BEGIN;
SELECT loyalty.accrue('exp', 'c1', 20, 'x1', '2025-03-02') AS earned;
SELECT is(array_agg(l.relation::regclass::text ORDER BY l.relation::regclass::text), NULL,
          'a sale whose points wait locks no index of the lots or the journal')
FROM pg_locks l JOIN pg_index i ON i.indexrelid = l.relation
WHERE l.pid = pg_backend_pid() AND i.indrelid IN ('loyalty.lot'::regclass, 'loyalty.transfer'::regclass);
COMMIT;
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.account WHERE deferred_due < 'infinity'$$),
          1::bigint, 'the account of the deferred purchase is in the deferred index');
SELECT is(a.deferred_due, timestamptz '2025-03-12', 'it falls due when the purchase vests')
FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id JOIN loyalty.program p ON p.id = m.program_id
WHERE p.code = 'exp' AND m.member_ref = 'c1';
-- one statement of purchases on both sides of the change: the account has
-- a deferred purchase, so all of them are deferred (lines are chained in
-- id order); written together, some lots are pending, some not, and the
-- pending index takes just those
CREATE TABLE writer_test_exp (id text PRIMARY KEY, customer text, total numeric, at timestamptz);
SELECT loyalty.attach_accrual('writer_test_exp', 'exp', 'customer', 'total', 'id', 'at');
INSERT INTO writer_test_exp SELECT 'y' || i, 'c1', 10, timestamptz '2025-02-20' + i * interval '1 day' FROM generate_series(1, 20) i;
SELECT is((SELECT count(*) FROM loyalty.accrual x JOIN loyalty.program p ON p.id = x.program_id
           WHERE p.code = 'exp' AND x.transfer_id IS NULL), 21::bigint, 'all 21 purchases are deferred');
SELECT written FROM loyalty._materialize(ARRAY(SELECT a.id FROM loyalty.account a JOIN loyalty.program p ON p.id = a.program_id
                                               WHERE p.code = 'exp' AND a.kind = 'member'));
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.lot WHERE pending AND vests_at > '2000-01-01'$$),
          (SELECT count(*) FROM loyalty.lot WHERE pending), 'the pending index has every pending lot of a mixed statement');
SELECT is((SELECT count(*) FILTER (WHERE l.pending) || '/' || count(*) FROM loyalty.lot l
           JOIN loyalty.account a ON a.id = l.account_id JOIN loyalty.program p ON p.id = a.program_id
           WHERE p.code = 'exp'), '13/21', 'of the program''s 21 lots, 13 are pending (x1 and twelve March purchases)');
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.lot WHERE remaining OPERATOR(loyalty.>) 0 AND expires_at IS NOT NULL AND expires_at > '2000-01-01'$$),
          21::bigint, 'the expiry index has every lot that expires, and only those');
-- Under a rolling expiry nothing is deferred (a lapse reads the lines as
-- written): the sale's writer opens the pending index for a statement
-- whose lots are mixed, and it takes just the pending ones.
SELECT loyalty.create_program('roll', 'Rolling', 'UTC', '{"expiry": {"policy": "rolling", "inactivity": "12 months"}}') > 0 AS created;
SELECT loyalty.enroll('roll', 'c1', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('roll', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
SELECT loyalty.set_earning_rules('roll', '{"base": {"per": 1, "points": 1}, "pending_days": 10}', '2025-03-01') AS version;
CREATE TABLE writer_test_roll (id text PRIMARY KEY, customer text, total numeric, at timestamptz);
SELECT loyalty.attach_accrual('writer_test_roll', 'roll', 'customer', 'total', 'id', 'at');
INSERT INTO writer_test_roll SELECT 'r' || i, 'c1', 10, timestamptz '2025-02-20' + i * interval '1 day' FROM generate_series(1, 20) i;
SELECT is((SELECT count(*) FILTER (WHERE l.pending) || '/' || count(*) FROM loyalty.lot l
           JOIN loyalty.account a ON a.id = l.account_id JOIN loyalty.program p ON p.id = a.program_id
           WHERE p.code = 'roll'), '12/20', 'under a rolling policy the sales write their lots, 12 of 20 pending');
SELECT is(pg_temp.through_index($$SELECT count(*) FROM loyalty.lot WHERE pending AND vests_at > '2000-01-01'$$),
          (SELECT count(*) FROM loyalty.lot WHERE pending), 'the pending index has every pending lot of that statement too');

-- amcheck: every row each btree index should hold is in it, and no other
CREATE EXTENSION IF NOT EXISTS amcheck;
SELECT is(count(bt_index_check(i.indexrelid, true)), 16::bigint, 'the btree indexes of the journal, lots, purchases and accounts check')
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
WHERE a.amname = 'btree'
  AND i.indrelid IN ('loyalty.transfer'::regclass, 'loyalty.lot'::regclass, 'loyalty.accrual'::regclass, 'loyalty.account'::regclass);
-- one id per sale: the purchase, its journal line and its lot share it
SELECT is((SELECT count(*) FROM loyalty.accrual a LEFT JOIN loyalty.lot l ON l.transfer_id = a.transfer_id
           WHERE a.transfer_id IS NOT NULL AND (a.transfer_id <> a.id OR l.id IS DISTINCT FROM a.id)), 0::bigint,
          'a purchase that earned has its own id as its transfer''s and its lot''s');
SELECT is((SELECT count(*) FROM loyalty.lot l WHERE l.id <> l.transfer_id), 0::bigint, 'every lot has its transfer''s id');

SELECT is((SELECT count(*) FROM loyalty.verify_chain('shop')), 0::bigint, 'the chain holds');
SELECT * FROM finish();
