-- Every look-up on the posting and reading paths finds its rows through an
-- index, never by scanning a whole ledger table. Partial indexes make this
-- easy to break without a failing result: a query that does not spell an
-- index's predicate (kind <> 'accrual' on the journal, remaining > 0 on the
-- lots) silently becomes a scan of the table, correct and ever slower. So
-- with sequential scans disabled (the planner then takes one only where no
-- index can serve), each operation runs in a transaction of its own and
-- pg_stat_xact_user_tables must count no sequential scan of the ledger's
-- big tables. The plans are the real ones: the C code's saved SPI plans
-- (generic after their first executions) and the SQL functions'.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';
SELECT * FROM no_plan();

SELECT loyalty.create_program('shop', 'The Shop', 'UTC',
    '{"expiry": {"policy": "fixed", "after": "12 months"}, "shortfall": "debt"}') AS program;
SELECT count(loyalty.enroll('shop', 'm' || i, occurred_at => '2026-01-01')) AS members FROM generate_series(1, 3) i;
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1, "rounding": "floor"},
  "caps": {"per_member_per_day": 1000}, "bonuses": [{"when": {"first_purchase": true}, "points": 10}],
  "pending_days": 14}', '2026-01-01', 'plans') AS version;
DROP TABLE IF EXISTS plans_orders;
CREATE TABLE plans_orders (id text PRIMARY KEY, customer text, total numeric, placed_at timestamptz);
SELECT loyalty.attach_accrual('plans_orders', 'shop', 'customer', 'total', 'id', 'placed_at');
SELECT loyalty.add_reward('shop', 'mug', 'A mug', 50) AS reward;

SET enable_seqscan = off;

-- mark() notes the sequential scans counted so far (the counts of
-- pg_stat_xact_user_tables include earlier transactions not yet flushed);
-- seq_scans() lists the ledger tables scanned since, in this transaction.
CREATE TEMP TABLE scan_mark (relname name, seq_scan bigint);
CREATE FUNCTION pg_temp.mark() RETURNS void LANGUAGE sql AS $$
    DELETE FROM pg_temp.scan_mark;
    INSERT INTO pg_temp.scan_mark
        SELECT relname, seq_scan FROM pg_stat_xact_user_tables WHERE schemaname = 'loyalty';
$$;
CREATE FUNCTION pg_temp.seq_scans() RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(string_agg(s.relname || ' ' || (s.seq_scan - coalesce(m.seq_scan, 0)), ', ' ORDER BY s.relname), '')
    FROM pg_stat_xact_user_tables s LEFT JOIN pg_temp.scan_mark m ON m.relname = s.relname
    WHERE s.schemaname = 'loyalty' AND s.seq_scan > coalesce(m.seq_scan, 0)
      AND s.relname IN ('transfer', 'lot', 'lot_use', 'accrual', 'account', 'member', 'member_contact',
                        'accrual_debt', 'accrual_refund', 'hold', 'redemption', 'voucher')
$$;

-- Each step twice, so that saved plans are also run a second time (and the
-- SQL functions' plans are cached as they are in a long session).
BEGIN;
SELECT pg_temp.mark();
INSERT INTO plans_orders VALUES ('o1', 'm1', 120, '2026-02-01 10:00'), ('o2', 'm2', 80, '2026-02-01 11:00');
INSERT INTO plans_orders VALUES ('o3', 'm1', 30, '2026-02-02 10:00');
INSERT INTO plans_orders VALUES ('o4', 'm3', 60, '2026-02-02 12:00');
SELECT is(pg_temp.seq_scans(), '', 'accrual through the trigger, one-row and multi-row statements');
COMMIT;

BEGIN;
SELECT pg_temp.mark();
SELECT loyalty.accrue('shop', 'm2', 45, 'f1', '2026-02-03 09:00') AS points;
SELECT loyalty.accrue('shop', 'm2', 45, 'f1', '2026-02-03 09:00') AS replayed;
SELECT is(pg_temp.seq_scans(), '', 'accrue() and its replay');
COMMIT;

BEGIN;
SELECT pg_temp.mark();
SELECT loyalty.run_job('vest', '2026-03-01') IS NOT NULL AS vested;
SELECT is(pg_temp.seq_scans(), '', 'the vest job');
COMMIT;

BEGIN;
SELECT pg_temp.mark();
SELECT loyalty.earn('shop', 'm1', 25, 'bonus-1', 'goodwill', '2026-03-01') AS earned;
SELECT loyalty.earn('shop', 'm1', 25, 'bonus-1', 'goodwill', '2026-03-01') AS earn_replayed;
SELECT loyalty.adjust('shop', 'm3', -5, 'fix-1', 'typo', '2026-03-01') AS adjusted;
SELECT is(pg_temp.seq_scans(), '', 'earn, its replay and adjust (LedgerPost)');
COMMIT;

BEGIN;
SELECT pg_temp.mark();
SELECT points AS redeemed FROM loyalty.redeem('shop', 'm1', 'mug', 'r1', occurred_at => '2026-03-02');
SELECT points AS redeem_replayed FROM loyalty.redeem('shop', 'm1', 'mug', 'r1', occurred_at => '2026-03-02');
SELECT is(pg_temp.seq_scans(), '', 'redeem and its replay');
COMMIT;

BEGIN;
SELECT pg_temp.mark();
SELECT loyalty.add_charity('shop', 'trees') AS charity;
SELECT loyalty.hold('shop', 'm1', 10, 'h1', occurred_at => '2026-03-02') AS held;
SELECT loyalty.capture('shop', 'h1', occurred_at => '2026-03-02') AS captured;
SELECT loyalty.hold('shop', 'm1', 5, 'h2', occurred_at => '2026-03-02') AS held_again;
SELECT loyalty.release('shop', 'h2') AS released;
SELECT loyalty.transfer_points('shop', 'm1', 'm2', 5, 't1', '2026-03-02') AS transferred;
SELECT loyalty.donate('shop', 'm1', 'trees', 5, 'd1', '2026-03-02') AS donated;
SELECT loyalty.cancel_redemption('shop', 'r1') AS cancelled;
SELECT count(*) AS expiring FROM loyalty.expiring_points('shop', 'm1', as_of => '2027-01-20');
SELECT is(pg_temp.seq_scans(), '', 'hold, capture, release, transfer_points, donate, cancel_redemption, expiring_points');
COMMIT;

BEGIN;
SELECT pg_temp.mark();
INSERT INTO plans_orders VALUES ('q1', 'newcomer', 20, '2026-03-02 10:00');
SELECT loyalty.enroll('shop', 'newcomer', occurred_at => '2026-03-01') > 0 AS enrolled;
SELECT * FROM loyalty.replay_quarantine('shop');
SELECT is(pg_temp.seq_scans(), '', 'a quarantined purchase and its replay');
COMMIT;

BEGIN;
SELECT pg_temp.mark();
SELECT loyalty.refund('shop', 'o1', 60, 'o1-half') AS clawed_back;
SELECT loyalty.refund('shop', 'o1', 60, 'o1-half') AS refund_replayed;
DELETE FROM plans_orders WHERE id = 'o4';
SELECT is(pg_temp.seq_scans(), '', 'refunds, through the function and a DELETE on the attached table');
COMMIT;

BEGIN;
SELECT pg_temp.mark();
SELECT loyalty.balance('shop', 'm1', '2026-03-03') AS balance, loyalty.balance('shop', 'm1', '2026-02-15') AS earlier;
SELECT available, pending, lifetime_earned FROM loyalty.account_summary('shop', 'm1', '2026-03-03');
SELECT count(*) AS lines FROM loyalty.statement('shop', 'm1');
SELECT loyalty.explain_accrual('shop', 'o1') ->> 'posted_points' AS posted;
SELECT is(pg_temp.seq_scans(), '', 'balance, account_summary, statement, explain_accrual');
COMMIT;

BEGIN;
SELECT pg_temp.mark();
SELECT loyalty.run_job('expire', '2027-03-01') IS NOT NULL AS expired;
SELECT is(pg_temp.seq_scans(), '', 'the expire job');
COMMIT;

-- A statement of many purchases into a program with a far longer history,
-- or far more members, finds replays and members by probing their keys.
-- Left to itself, the planner hashes the purchase and member tables for
-- such a statement, and so reads every purchase ever posted and every
-- member at every bulk load (AccrualProbes: from twenty times the
-- statement's rows). With sequential scans allowed here, as in production.
SELECT loyalty.create_program('hist', 'History', 'UTC') > 0 AS program;
SELECT count(loyalty.enroll('hist', 'h' || i, occurred_at => '2026-01-01')) AS members FROM generate_series(1, 2500) i;
SELECT loyalty.set_earning_rules('hist', '{"base": {"per": 1, "points": 1}}', '2026-01-01', 'plans') AS version;
CREATE TABLE plans_hist (id text PRIMARY KEY, customer text, total numeric, placed_at timestamptz);
SELECT loyalty.attach_accrual('plans_hist', 'hist', 'customer', 'total', 'id', 'placed_at');
-- a second table of the same orders (a reload from another system): its rows are replays
CREATE TABLE plans_hist2 (LIKE plans_hist INCLUDING ALL);
SELECT loyalty.attach_accrual('plans_hist2', 'hist', 'customer', 'total', 'id', 'placed_at');
INSERT INTO plans_hist SELECT 'a' || i, 'h' || (i % 2500 + 1), 10, '2026-02-05' FROM generate_series(1, 3000) i;
ANALYZE loyalty.accrual;
ANALYZE loyalty.member;
SET enable_seqscan = on;
BEGIN;
SELECT pg_temp.mark();
INSERT INTO plans_hist SELECT 'b' || i, 'h' || (i * 7 % 2500 + 1), 10, '2026-02-06' FROM generate_series(1, 50) i;
INSERT INTO plans_hist2 SELECT 'a' || i, 'h' || (i % 2500 + 1), 10, '2026-02-05' FROM generate_series(1, 50) i;
SELECT is((SELECT string_agg(s.relname || ' ' || (s.seq_scan - coalesce(m.seq_scan, 0)), ', ' ORDER BY s.relname)
           FROM pg_stat_xact_user_tables s LEFT JOIN pg_temp.scan_mark m ON m.relname = s.relname
           WHERE s.schemaname = 'loyalty' AND s.relname IN ('accrual', 'member')
             AND s.seq_scan > coalesce(m.seq_scan, 0)), NULL,
          'a bulk statement reads no purchase of the history and no member but through their keys (new refs, then replays)');
COMMIT;
SET enable_seqscan = off;
SELECT count(*) AS purchases, sum(points) AS points FROM loyalty.accrual a JOIN loyalty.program p ON p.id = a.program_id
WHERE p.code = 'hist';

-- simulate_accrual finds its window's purchases through the BRIN index on
-- occurred_at (accrual_time_brin), not by reading the program's whole
-- history: 24 days of 1,000 purchases, a window of one day. Sequential
-- scans allowed, as in production; the index's scans are counted from
-- pg_stat_user_indexes once this backend's statistics are flushed.
SET enable_seqscan = on;
SELECT loyalty.create_program('sim', 'Simulated', 'UTC') > 0 AS program;
SELECT count(loyalty.enroll('sim', 's' || i, occurred_at => '2026-01-01')) AS members FROM generate_series(1, 500) i;
SELECT loyalty.set_earning_rules('sim', '{"base": {"per": 1, "points": 1}}', '2026-01-01', 'plans') AS version;
CREATE TABLE plans_sim (id text PRIMARY KEY, customer text, total numeric, placed_at timestamptz);
SELECT loyalty.attach_accrual('plans_sim', 'sim', 'customer', 'total', 'id', 'placed_at');
INSERT INTO plans_sim SELECT 's' || i, 's' || (i % 500 + 1), 10,
       timestamptz '2026-03-01' + (i - 1) * interval '86.4 seconds' FROM generate_series(1, 24000) i;
VACUUM ANALYZE loyalty.accrual;
SELECT pg_stat_force_next_flush();
SELECT pg_stat_clear_snapshot();
SELECT coalesce(sum(idx_scan), 0) AS brin_scans_before FROM pg_stat_user_indexes
WHERE schemaname = 'loyalty' AND indexrelname = 'accrual_time_brin' \gset
SELECT * FROM loyalty.simulate_accrual('sim', '{"base": {"per": 1, "points": 2}}', '2026-03-10', '2026-03-11');
SELECT pg_stat_force_next_flush();
SELECT pg_stat_clear_snapshot();
SELECT cmp_ok((SELECT coalesce(sum(idx_scan), 0)::bigint FROM pg_stat_user_indexes
               WHERE schemaname = 'loyalty' AND indexrelname = 'accrual_time_brin'), '>', :brin_scans_before::bigint,
              'simulate_accrual reads its window through accrual_time_brin');
SET enable_seqscan = off;

SELECT * FROM finish();
