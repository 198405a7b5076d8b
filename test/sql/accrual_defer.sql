-- Deferred journal lines (docs/accrual.md): a purchase still in its return
-- window is posted as its row in loyalty.accrual and its member's balance;
-- its journal line and lot are written later, exactly as the sale would
-- have written them, by whatever first needs the account's lots or chain.
-- Every reader sees the purchase the same before and after.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';

-- (points that never expire: the debits below are dated now, in 2026)
SELECT loyalty.create_program('shop', 'Shop', 'UTC') > 0 AS created;
SELECT loyalty.enroll('shop', m, occurred_at => '2025-01-01') > 0 AS enrolled
FROM unnest(ARRAY['c1', 'c2', 'c3', 'c4']) m;
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}, "pending_days": 30}', '2025-01-01') AS version;

-- What a member's account holds: balances, purchases deferred, journal
-- lines and lots written, the deferred day, when the first deferred
-- purchase falls due, and whether the balances are the lots plus the
-- deferred points.
CREATE FUNCTION pg_temp.ledger(m text)
RETURNS TABLE (available bigint, pending bigint, deferred bigint, lines bigint, lots bigint,
               deferred_day date, deferred_due timestamptz, balanced boolean)
LANGUAGE sql AS $$
    SELECT a.available::bigint, a.pending::bigint,
           (SELECT count(*) FROM loyalty.accrual x WHERE x.account_id = a.id AND x.transfer_id IS NULL AND x.points > 0),
           (SELECT count(*) FROM loyalty.transfer t WHERE a.id IN (t.debit_account_id, t.credit_account_id)),
           (SELECT count(*) FROM loyalty.lot l WHERE l.account_id = a.id),
           a.deferred_day, a.deferred_due,
           a.available::bigint + a.pending::bigint
           = (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l WHERE l.account_id = a.id)
             + (SELECT coalesce(sum(x.points), 0) FROM loyalty.accrual x
                 WHERE x.account_id = a.id AND x.transfer_id IS NULL AND x.points > 0)
    FROM loyalty.account a JOIN loyalty.member mm ON mm.id = a.member_id
    JOIN loyalty.program p ON p.id = mm.program_id
    WHERE p.code = 'shop' AND mm.member_ref = m
$$;

-- 1. Sales in their return window, by the function and by an attached
-- table: the purchase rows and the balances, no line, no lot.
CREATE TABLE orders (id text PRIMARY KEY, customer text, total numeric, at timestamptz);
SELECT loyalty.attach_accrual('orders', 'shop', 'customer', 'total', 'id', 'at');
SELECT loyalty.accrue('shop', 'c1', 100, 'o1', '2025-02-01') AS earned;
INSERT INTO orders VALUES ('o2', 'c1', 50, '2025-02-10');
SELECT ref, points, transfer_id IS NULL AS line_deferred, actor = session_user AS actor_kept, vests_at
FROM loyalty.accrual ORDER BY id;
SELECT * FROM pg_temp.ledger('c1');
-- the same sale again is a replay, deferred or not
SELECT loyalty.accrue('shop', 'c1', 100, 'o1', '2025-02-01') AS replayed;
INSERT INTO orders VALUES ('o2', 'c1', 50, '2025-02-10') ON CONFLICT DO NOTHING;

-- 2. Readers count them as written: balance at any moment, the summary,
-- the statement, the explanation, the chain.
SELECT loyalty.balance('shop', 'c1', '2025-02-05') AS before_vesting,
       loyalty.balance('shop', 'c1', '2025-03-05') AS o1_vested,
       loyalty.balance('shop', 'c1', '2025-03-20') AS both_vested;
SELECT available, pending, lifetime_earned FROM loyalty.account_summary('shop', 'c1', '2025-03-05');
SELECT occurred_at, kind, ref, points, balance, explanation
FROM loyalty.statement('shop', 'c1');
SELECT (e ->> 'transfer_id')::bigint = (SELECT id FROM loyalty.accrual WHERE ref = 'o1') AS line_id_is_the_purchase_id,
       e ->> 'posted_points' AS posted_points, e ->> 'pending_until' AS pending_until
FROM loyalty.explain_accrual('shop', 'o1') e;
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('shop');

-- 3. A debit writes the account's deferred lines first, then its own after
-- them: ids and chain in the same order. Its lot choice is the one it
-- would have made with the lots written at the sale.
SELECT loyalty.adjust('shop', 'c1', -30, 'a1', 'correction') > (SELECT max(id) FROM loyalty.accrual) AS after_them;
SELECT * FROM pg_temp.ledger('c1');
SELECT t.kind, t.ref, t.amount, t.credit_prev_hash IS NOT NULL OR t.debit_prev_hash IS NOT NULL AS chained,
       t.actor = session_user AS actor, t.posted_at = x.posted_at AS sale_posted_at
FROM loyalty.transfer t LEFT JOIN loyalty.accrual x ON x.transfer_id = t.id
ORDER BY t.id;
SELECT l.remaining, l.pending, l.vests_at, l.expires_at FROM loyalty.lot l ORDER BY l.id;
SELECT ref, transfer_id = id AS line_written, actor IS NULL AS actor_cleared FROM loyalty.accrual ORDER BY id;
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('shop');
-- the statement reads the same, with the debit (dated now) after
SELECT kind, ref, points, balance FROM loyalty.statement('shop', 'c1');
-- nothing left to write: nothing written again
SELECT written AS written_again FROM loyalty._materialize(ARRAY(SELECT id FROM loyalty.account));

-- 4. The vest job writes the lines of the purchases due, with the rest of
-- their accounts' deferred ones, then vests what is due.
SELECT loyalty.accrue('shop', 'c2', 40, 'o3', '2025-02-01') AS earned,
       loyalty.accrue('shop', 'c2', 60, 'o4', '2025-03-10') AS earned;
SELECT * FROM pg_temp.ledger('c2');
SELECT rows, points FROM loyalty.run_job('vest', '2025-03-15');
SELECT * FROM pg_temp.ledger('c2');
SELECT rows, points FROM loyalty.run_job('vest', '2025-03-15') AS again;
-- a sale after it is deferred again; a hold writes it, as it reads lots
SELECT loyalty.accrue('shop', 'c2', 20, 'o5', '2025-03-20') AS earned;
SELECT * FROM pg_temp.ledger('c2');
-- an older purchase arriving late moves the day and the due date back
SELECT loyalty.accrue('shop', 'c2', 10, 'o5b', '2025-03-16') AS earned;
SELECT * FROM pg_temp.ledger('c2');
SELECT loyalty.hold('shop', 'c2', 10, 'h1') > 0 AS held;
SELECT * FROM pg_temp.ledger('c2');

-- 5. A refund of a deferred purchase writes its line and lot, then takes
-- them back from the pending lot.
SELECT loyalty.accrue('shop', 'c3', 80, 'o6', '2025-03-01') AS earned;
SELECT loyalty.refund('shop', 'o6', 40, 'o6-r') AS clawed;
SELECT * FROM pg_temp.ledger('c3');
SELECT refunded_amount, refunded_points FROM loyalty.accrual WHERE ref = 'o6';

-- 6. Rules without a return window from June: a sale of a member with a
-- deferred purchase is deferred too (lines are chained in id order), and
-- counts as available at once; the vest job writes both.
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}, "pending_days": 0}', '2025-06-01') AS version;
SELECT loyalty.accrue('shop', 'c1', 10, 'o7', '2025-05-20') AS pending_earned,
       loyalty.accrue('shop', 'c1', 5, 'o8', '2025-06-02') AS available_earned;
SELECT ref, vests_at > occurred_at AS pending, transfer_id IS NULL AS deferred FROM loyalty.accrual
WHERE ref IN ('o7', 'o8') ORDER BY ref;
SELECT * FROM pg_temp.ledger('c1');
SELECT loyalty.balance('shop', 'c1', '2025-06-03') AS balance_before_job;
SELECT rows, points FROM loyalty.run_job('vest', '2025-06-20');
SELECT * FROM pg_temp.ledger('c1');
SELECT loyalty.balance('shop', 'c1', '2025-06-03') AS balance_after_job;
-- with no deferred purchase, a sale without a return window is written at once
SELECT loyalty.accrue('shop', 'c1', 7, 'o9', '2025-06-21') AS earned;
SELECT transfer_id = id AS written FROM loyalty.accrual WHERE ref = 'o9';
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('shop');

-- 7. A debt repaid by a deferred sale: the recovery writes the line first.
-- c4 earns 100, spends it all, and the purchase is refunded: 100 owed.
SELECT loyalty.accrue('shop', 'c4', 100, 'p1', '2025-01-10') AS earned;
SELECT rows FROM loyalty.run_job('vest', '2025-05-01');
SELECT loyalty.adjust('shop', 'c4', -100, 'p-spent', 'spent') > 0 AS spent;
SELECT loyalty.refund('shop', 'p1', NULL, 'p1-r') AS clawed;
SELECT sum(outstanding) AS owed FROM loyalty.accrual_debt;
SELECT loyalty.accrue('shop', 'c4', 30, 'p2', '2025-05-15') AS earned;
SELECT sum(outstanding) AS owed FROM loyalty.accrual_debt;
SELECT * FROM pg_temp.ledger('c4');

-- 8. The expire job writes a deferred purchase whose points expire before
-- they vest (a return window longer than their life), and expires them.
SELECT loyalty.create_program('short', 'Short', 'UTC', '{"expiry": {"policy": "fixed", "after": "10 days"}}') > 0 AS created;
SELECT loyalty.enroll('short', 's1', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('short', '{"base": {"per": 1, "points": 1}, "pending_days": 30}', '2025-01-01') AS version;
SELECT loyalty.accrue('short', 's1', 25, 'q1', '2025-01-02') AS earned;
-- due when it expires, before it would vest: the expire job's to write
SELECT a.deferred_due FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id WHERE m.member_ref = 's1';
SELECT rows, points FROM loyalty.run_job('vest', '2025-01-11') AS nothing_due;
SELECT rows, points FROM loyalty.run_job('expire', '2025-01-20');
SELECT rows, points FROM loyalty.run_job('vest', '2025-02-20');
SELECT a.available, a.pending, a.deferred_day, a.deferred_due,
       (SELECT count(*) FROM loyalty.accrual x WHERE x.account_id = a.id AND x.transfer_id IS NULL) AS deferred
FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id WHERE m.member_ref = 's1';
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('short');

-- 9. A rolling expiry lapses by the lines as written: nothing is deferred.
SELECT loyalty.create_program('roll', 'Rolling', 'UTC',
                              '{"expiry": {"policy": "rolling", "inactivity": "6 months"}}') > 0 AS created;
SELECT loyalty.enroll('roll', 'r1', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('roll', '{"base": {"per": 1, "points": 1}, "pending_days": 30}', '2025-01-01') AS version;
SELECT loyalty.accrue('roll', 'r1', 25, 'u1', '2025-01-02') AS earned;
SELECT transfer_id = id AS written, (SELECT count(*) FROM loyalty.lot l WHERE l.id = x.id) AS lots
FROM loyalty.accrual x WHERE ref = 'u1';

-- 10. A statement of many sales for a few members: all deferred, one
-- deferred day per account (the earliest), then written by the vest job in
-- batches, chained in id order.
SELECT count(loyalty.enroll('shop', 'b' || i, occurred_at => '2025-01-01')) AS enrolled FROM generate_series(1, 10) i;
CREATE TABLE bulk_orders (id text PRIMARY KEY, customer text, total numeric, at timestamptz);
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}, "pending_days": 30}', '2025-07-01') AS version;
SELECT loyalty.attach_accrual('bulk_orders', 'shop', 'customer', 'total', 'id', 'at');
INSERT INTO bulk_orders
SELECT 'b-' || i, 'b' || (i % 10 + 1), 1 + i % 7, timestamptz '2025-07-01' + (i % 50) * interval '1 day'
FROM generate_series(1, 1000) i;
SELECT count(*) AS deferred, sum(points) AS points FROM loyalty.accrual WHERE ref LIKE 'b-%' AND transfer_id IS NULL;
-- each account's list of purchases leads to exactly those, and the
-- account counts them (what the jobs size their batches by)
SELECT count(*) AS listed, sum(points) AS points
FROM loyalty._deferred_purchases(ARRAY(SELECT a.id FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id
                                       WHERE m.member_ref LIKE 'b%'));
SELECT bool_and(coalesce(a.deferred_count, 0) = (SELECT count(*) FROM loyalty.accrual x
                                                 WHERE x.account_id = a.id AND x.transfer_id IS NULL AND x.points > 0))
       AS counted
FROM loyalty.account a WHERE a.kind = 'member';
SELECT count(DISTINCT a.deferred_day) AS days, min(a.deferred_day) AS earliest
FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id WHERE m.member_ref LIKE 'b%';
SELECT sum(a.pending::bigint) AS pending FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id
WHERE m.member_ref LIKE 'b%';
UPDATE loyalty.job SET batch_size = 7 WHERE name = 'vest';
-- The lots it writes that are due go in vested, their points moved from
-- pending to available with the line: only the lots pending before it (two,
-- of other members) are updated, so each lot it writes has one version, not
-- two. (The transaction's counts before and after: they may hold counts of
-- earlier transactions not yet reported.)
SELECT count(*) AS lots_pending_before FROM loyalty.lot WHERE pending;
BEGIN;
SELECT n_tup_ins AS ins0, n_tup_upd AS upd0 FROM pg_stat_xact_user_tables WHERE relid = 'loyalty.lot'::regclass \gset
SELECT rows, points, batches > 1 AS in_batches FROM loyalty.run_job('vest', '2025-12-31');
SELECT n_tup_ins - :ins0 AS lots_written, n_tup_upd - :upd0 AS lots_updated FROM pg_stat_xact_user_tables
WHERE relid = 'loyalty.lot'::regclass;
COMMIT;
SELECT count(*) AS still_deferred FROM loyalty.accrual WHERE transfer_id IS NULL AND points > 0;
SELECT count(*) AS lines FROM loyalty.transfer t JOIN loyalty.accrual x ON x.transfer_id = t.id WHERE x.ref LIKE 'b-%';
SELECT sum(a.available::bigint) AS available, sum(a.pending::bigint) AS pending, bool_and(a.deferred_day IS NULL) AS none_left
FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id WHERE m.member_ref LIKE 'b%';
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('shop');
-- every written line is what the sale would have written: its id, amount,
-- version, times and hash chained in id order (verify_chain, above)
SELECT count(*) AS mismatches FROM loyalty.accrual x JOIN loyalty.transfer t ON t.id = x.transfer_id
JOIN loyalty.lot l ON l.id = x.id
WHERE t.id <> x.id OR t.amount::bigint <> x.points OR t.rule_version <> x.rule_version
   OR t.occurred_at <> x.occurred_at OR t.posted_at <> x.posted_at OR t.kind <> 'accrual' OR t.ref <> x.ref
   OR l.amount::bigint <> x.points OR l.vests_at <> x.vests_at OR l.expires_at IS DISTINCT FROM x.expires_at
   OR l.occurred_at <> x.occurred_at;

-- 11. Each member's purchases form a list, newest first: the account
-- names its latest purchase, each purchase the one before (NULL for the
-- first), in id order. It holds every purchase posted, earning or not, and
-- nothing else: not a repeated line, not a quarantined row, across chunks.
CREATE FUNCTION pg_temp.list_problems() RETURNS bigint LANGUAGE sql AS $$
    WITH RECURSIVE walk AS (
        SELECT a.id AS account_id, a.program_id, x.ref, x.prev_ref, x.id
        FROM loyalty.account a JOIN loyalty.accrual x ON x.program_id = a.program_id AND x.ref = a.last_purchase_ref
        UNION ALL
        SELECT w.account_id, w.program_id, x.ref, x.prev_ref, x.id
        FROM walk w JOIN loyalty.accrual x ON x.program_id = w.program_id AND x.ref = w.prev_ref AND x.id < w.id
    )
    SELECT count(*) FROM (
        (SELECT account_id, ref FROM walk EXCEPT ALL SELECT account_id, ref FROM loyalty.accrual)
        UNION ALL
        (SELECT account_id, ref FROM loyalty.accrual EXCEPT ALL SELECT account_id, ref FROM walk)
    ) d
$$;
CREATE TABLE list_orders (id text, customer text, total numeric, at timestamptz);
SELECT loyalty.attach_accrual('list_orders', 'shop', 'customer', 'total', 'id', 'at');
SET loyalty.accrual_chunk = 7;
INSERT INTO list_orders
SELECT 'l-' || i, 'b' || (i % 3 + 1), CASE WHEN i % 4 = 0 THEN 0 ELSE i END, timestamptz '2025-08-01' + i * interval '1 hour'
FROM generate_series(1, 40) i
UNION ALL SELECT 'l-5', 'b3', 5, timestamptz '2025-08-01' + 5 * interval '1 hour'    -- a repeated line
UNION ALL SELECT 'l-bad', 'nobody', 5, timestamptz '2025-08-01';                    -- quarantined
RESET loyalty.accrual_chunk;
SELECT count(*) AS purchases, count(*) FILTER (WHERE points = 0) AS without_points FROM loyalty.accrual WHERE ref LIKE 'l-%';
SELECT pg_temp.list_problems() AS list_problems;
SELECT count(*) FILTER (WHERE x.prev_ref IS NULL) AS firsts, count(DISTINCT x.account_id) AS members
FROM loyalty.accrual x;
SELECT x.ref, x.prev_ref FROM loyalty.accrual x JOIN loyalty.account a ON a.last_purchase_ref = x.ref
JOIN loyalty.member m ON m.id = a.member_id WHERE m.member_ref IN ('b1', 'b2', 'b3') ORDER BY m.member_ref;

-- 12. Internal, and not for applications.
SELECT has_function_privilege('public', 'loyalty._materialize(bigint[], timestamptz)', 'EXECUTE') AS public_may_write_lines;
SELECT has_function_privilege('public', 'loyalty._deferred_purchases(bigint[])', 'EXECUTE') AS public_may_walk;

-- 13. A batch that writes an account's deferred lines but vests, or
-- expires, none of them does not end the run: the accounts after it in
-- the jobs' list are still done. g1's purchase expires (10 days) before
-- it vests (30 days), so it comes first in the vest job's list and vests
-- nothing by 2027-01-25; g2's vests on 2027-01-19. For the expire job, g3's
-- purchase vests (2027-02-01) long before it expires (a year), and g4's
-- expires on 2027-02-04. One account a batch, once the jobs have done
-- everything else due by then.
SELECT rows > 0 AS vested_others FROM loyalty.run_job('vest', '2027-01-25');
SELECT rows > 0 AS expired_others FROM loyalty.run_job('expire', '2027-02-10');
SELECT loyalty.create_program('gap_short', 'Short life', 'UTC', '{"expiry": {"policy": "fixed", "after": "10 days"}}') > 0 AS created;
SELECT loyalty.create_program('gap_long', 'Long life', 'UTC', '{"expiry": {"policy": "fixed", "after": "1 year"}}') > 0 AS created;
SELECT loyalty.set_earning_rules(p, '{"base": {"per": 1, "points": 1}, "pending_days": 30}', '2026-01-01') AS version
FROM unnest(ARRAY['gap_short', 'gap_long']) p;
SELECT count(loyalty.enroll(p, r, occurred_at => '2026-01-01')) AS enrolled
FROM (VALUES ('gap_short', 'g1'), ('gap_long', 'g2'), ('gap_long', 'g3'), ('gap_short', 'g4')) v (p, r);
CREATE FUNCTION pg_temp.gap_lots(refs text[])
RETURNS TABLE (member_ref text, amount bigint, remaining bigint, pending boolean, vests_at timestamptz,
               expires_at timestamptz, available bigint, account_pending bigint)
LANGUAGE sql AS $$
    SELECT m.member_ref, l.amount::bigint, l.remaining::bigint, l.pending, l.vests_at, l.expires_at,
           a.available::bigint, a.pending::bigint
    FROM loyalty.lot l JOIN loyalty.account a ON a.id = l.account_id JOIN loyalty.member m ON m.id = a.member_id
    WHERE m.member_ref = ANY (refs) ORDER BY 1
$$;
UPDATE loyalty.job SET batch_size = 1 WHERE name IN ('vest', 'expire');
SELECT loyalty.accrue('gap_short', 'g1', 11, 'g1-1', '2027-01-02') AS earned,
       loyalty.accrue('gap_long', 'g2', 12, 'g2-1', '2026-12-20') AS earned;
SELECT rows, points, batches FROM loyalty.run_job('vest', '2027-01-25');
SELECT * FROM pg_temp.gap_lots('{g1,g2}');
SELECT rows, points FROM loyalty.run_job('expire', '2027-01-25') AS g1_expires;
SELECT loyalty.accrue('gap_long', 'g3', 13, 'g3-1', '2027-01-02') AS earned,
       loyalty.accrue('gap_short', 'g4', 14, 'g4-1', '2027-01-25') AS earned;
SELECT rows, points, batches FROM loyalty.run_job('expire', '2027-02-10');
SELECT * FROM pg_temp.gap_lots('{g3,g4}');
SELECT (SELECT count(*) FROM loyalty.verify_chain('gap_short')) + (SELECT count(*) FROM loyalty.verify_chain('gap_long'))
       AS chain_problems;
UPDATE loyalty.job SET batch_size = 5000 WHERE name IN ('vest', 'expire');

DROP TABLE public.orders, public.bulk_orders, public.list_orders;
