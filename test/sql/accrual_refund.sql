SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';

SELECT loyalty.create_program('shop', 'Shop', 'UTC') > 0 AS created;
SELECT loyalty.enroll('shop', m, occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled
FROM unnest(ARRAY['c1', 'c2', 'c3']) m;
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;

CREATE FUNCTION pg_temp.state(m text) RETURNS TABLE (available bigint, pending bigint, lots bigint, debt bigint)
LANGUAGE sql AS $$
    SELECT a.available::bigint, a.pending::bigint,
           (SELECT coalesce(sum(l.remaining::bigint), 0)::bigint FROM loyalty.lot l WHERE l.account_id = a.id),
           (SELECT coalesce(sum(d.outstanding), 0)::bigint FROM loyalty.accrual_debt d WHERE d.account_id = a.id)
    FROM loyalty.account a JOIN loyalty.member mm ON mm.id = a.member_id WHERE mm.member_ref = m
$$;

-- 100.00 earns 100 points.
SELECT loyalty.accrue('shop', 'c1', 100.00, 'o1', '2025-02-01 10:00+00') AS earned;
-- partial: 30.00 of 100.00 -> round(100 * 30 / 100) = 30
SELECT loyalty.refund('shop', 'o1', 30.00, 'o1-r1') AS clawed;
-- the same refund again: nothing more
SELECT loyalty.refund('shop', 'o1', 30.00, 'o1-r1') AS replayed;
-- another partial: 33.33 -> cumulative 63.33 -> round(63.33) = 63, 63 - 30 = 33
SELECT loyalty.refund('shop', 'o1', 33.33, 'o1-r2') AS clawed;
SELECT * FROM pg_temp.state('c1');
-- more than is left
\set VERBOSITY default
SELECT loyalty.refund('shop', 'o1', 40.00, 'o1-r3');
-- the same refund_ref for another refund
SELECT loyalty.refund('shop', 'o1', 5.00, 'o1-r1');
\set VERBOSITY terse
-- the rest (NULL amount): 36.67 -> all 100 points, 100 - 63 = 37
SELECT loyalty.refund('shop', 'o1', NULL, 'o1-rest') AS clawed;
SELECT loyalty.refund('shop', 'o1', NULL, 'o1-rest') AS replayed;
-- a full refund after that has nothing left
SELECT loyalty.refund('shop', 'o1') AS nothing_left;
SELECT * FROM pg_temp.state('c1');
SELECT ref, amount, refunded_amount, points, refunded_points FROM loyalty.accrual WHERE ref = 'o1';
SELECT refund_ref, purchase_ref, amount, points, taken, shortfall FROM loyalty.accrual_refund ORDER BY occurred_at, refund_ref;

-- Refund after spending: c2 earns 50, spends 40, the order is returned.
SELECT loyalty.accrue('shop', 'c2', 50, 'o2', '2025-02-01 10:00+00') AS earned;
SELECT loyalty.adjust('shop', 'c2', -40, 'spend-1', 'spent in store') > 0 AS spent;
SELECT loyalty.refund('shop', 'o2') AS clawed;
-- 10 taken back from the lot, 40 recorded as debt
SELECT * FROM pg_temp.state('c2');
SELECT refund_ref, taken, shortfall FROM loyalty.accrual_refund WHERE purchase_ref = 'o2';
-- the next purchase pays the debt back first
SELECT loyalty.accrue('shop', 'c2', 25, 'o3', '2025-02-02 10:00+00') AS earned;
SELECT * FROM pg_temp.state('c2');
SELECT loyalty.accrue('shop', 'c2', 25, 'o4', '2025-02-03 10:00+00') AS earned;
SELECT * FROM pg_temp.state('c2');
SELECT kind, points FROM loyalty.statement('shop', 'c2') ORDER BY transfer_id;

-- Pending points are cancelled first: c3 has 40 available points (o6 and
-- o7, vested) and buys for 80 yesterday (o5, pending 14 days); returning
-- 20.00 of o5 takes its 20 points from o5's own pending lot.
SELECT loyalty.accrue('shop', 'c3', 30, 'o6', '2025-03-01 10:00+00') AS earned;
SELECT loyalty.accrue('shop', 'c3', 10, 'o7', '2025-03-01 11:00+00') AS earned;
SELECT loyalty.set_earning_rules('shop', '{"pending_days": 14}', '2025-03-01 12:00+00') AS version;
SELECT loyalty.accrue('shop', 'c3', 80, 'o5', now() - interval '1 day') AS earned;
SELECT * FROM pg_temp.state('c3');
SELECT loyalty.refund('shop', 'o5', 20, 'o5-r1') AS clawed;
SELECT * FROM pg_temp.state('c3');
SELECT loyalty.balance('shop', 'c3') AS available_now,
       loyalty.balance('shop', 'c3', now() + interval '14 days') AS after_vesting;
-- c3 spends 25 (from o6's lot, earliest); returning o6 (30 points) takes 5
-- from o6's own lot, then 25 from o5's pending lot, and leaves o7's
-- available 10 alone.
SELECT loyalty.adjust('shop', 'c3', -25, 'spend-2', 'spent in store') > 0 AS spent;
SELECT loyalty.refund('shop', 'o6') AS clawed;
SELECT * FROM pg_temp.state('c3');
SELECT a.ref, l.amount, l.remaining FROM loyalty.lot l
JOIN loyalty.transfer t ON t.id = l.transfer_id JOIN loyalty.accrual a ON a.ref = t.ref AND t.kind = 'accrual'
WHERE a.ref IN ('o5', 'o6', 'o7') ORDER BY a.ref;

-- Errors.
SELECT plan(6);
SELECT throws_ok($$SELECT loyalty.refund('shop', 'nope')$$, 'LY011', 'purchase "nope" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.refund('shop', 'o5', 0)$$, '22023', 'a refund amount must be positive');
SELECT throws_ok($$SELECT loyalty.refund('shop', 'o5', -1)$$, '22023', 'a refund amount must be positive');
SELECT throws_ok($$SELECT loyalty.refund('shop', NULL)$$, '22004', 'program and ref must not be null');
SELECT throws_ok($$SELECT loyalty.refund('nope', 'o5')$$, 'LY002', 'program "nope" does not exist');
SELECT throws_ok($$SELECT loyalty.refund('shop', 'o5', 1000, 'o5-big')$$, 'LY012', 'refund of 1000 exceeds what is left of purchase "o5"');
SELECT * FROM finish();

SELECT count(*) AS chain_problems FROM loyalty.verify_chain('shop');
SELECT kind, count(*), sum(amount::bigint) FROM loyalty.transfer GROUP BY 1 ORDER BY 1;
