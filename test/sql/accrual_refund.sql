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
           -- the lots, and the deferred purchases' lots not written yet (docs/accrual.md)
           (SELECT coalesce(sum(l.remaining::bigint), 0)::bigint FROM loyalty.lot l WHERE l.account_id = a.id)
           + (SELECT coalesce(sum(x.points), 0)::bigint FROM loyalty.accrual x
               WHERE x.account_id = a.id AND x.transfer_id IS NULL AND x.points > 0),
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
-- Any credit repays at once, not only a purchase: c4 owes 30, 20 bonus
-- points repay 20 (balance 0 under "debt", 10 still owed).
SELECT loyalty.enroll('shop', 'c4', occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled;
SELECT loyalty.accrue('shop', 'c4', 30, 'o40', '2025-02-01 10:00+00') AS earned;
SELECT loyalty.adjust('shop', 'c4', -30, 'spend-40', 'spent in store') > 0 AS spent;
SELECT loyalty.refund('shop', 'o40') AS clawed;
SELECT loyalty.earn('shop', 'c4', 20, 'c4-bonus', 'goodwill') > 0 AS bonus;
SELECT loyalty.balance('shop', 'c4') AS balance;
SELECT * FROM pg_temp.state('c4');
SELECT kind, points FROM loyalty.statement('shop', 'c4') ORDER BY transfer_id;

-- Points held by a checkout stay capturable: c5 has 100 points, 80 of them
-- held; refunding half the order takes the 20 free points and records 30
-- as debt. 25 bonus points repay 25 of the 30 (the held 80 stay), and the
-- checkout still captures its 80.
SELECT loyalty.enroll('shop', 'c5', occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled;
SELECT loyalty.accrue('shop', 'c5', 100, 'o50', '2025-02-01 10:00+00') AS earned;
SELECT loyalty.hold('shop', 'c5', 80, 'c5-hold') > 0 AS held;
SELECT loyalty.refund('shop', 'o50', 50, 'o50-r1') AS clawed;
SELECT refund_ref, taken, shortfall FROM loyalty.accrual_refund WHERE purchase_ref = 'o50';
SELECT * FROM pg_temp.state('c5');
SELECT loyalty.earn('shop', 'c5', 25, 'c5-bonus', 'goodwill') > 0 AS bonus;
SELECT * FROM pg_temp.state('c5');
SELECT loyalty.capture('shop', 'c5-hold') > 0 AS captured;
SELECT * FROM pg_temp.state('c5');
SELECT loyalty.balance('shop', 'c5') AS balance;
SELECT kind, points FROM loyalty.statement('shop', 'c5') ORDER BY transfer_id;
-- What a hold gives back repays what the member owes: c6's hold of 80 is
-- released after a refund left 80 owed, c7's is captured for 30 only (50
-- come back), c8's expires (the release_holds job): each repays at once.
SELECT loyalty.enroll('shop', m, occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled
FROM unnest(ARRAY['c6', 'c7', 'c8']) m;
SELECT loyalty.accrue('shop', m, 100, 'o6' || m, '2025-02-01 10:00+00') AS earned
FROM unnest(ARRAY['c6', 'c7', 'c8']) m;
SELECT loyalty.hold('shop', 'c6', 80, 'c6-hold') > 0 AS held;
SELECT loyalty.hold('shop', 'c7', 80, 'c7-hold') > 0 AS held;
SELECT loyalty.hold('shop', 'c8', 80, 'c8-hold', '1 minute', now() - interval '1 hour') > 0 AS held;
SELECT loyalty.refund('shop', 'o6' || m) AS clawed FROM unnest(ARRAY['c6', 'c7', 'c8']) m;
SELECT m, (pg_temp.state(m)).* FROM unnest(ARRAY['c6', 'c7', 'c8']) m;
SELECT loyalty.release('shop', 'c6-hold') AS released;
SELECT loyalty.capture('shop', 'c7-hold', 30) > 0 AS captured;
SELECT rows, points FROM loyalty.run_job('release_holds', now());
SELECT m, (pg_temp.state(m)).*, loyalty.balance('shop', m) AS balance FROM unnest(ARRAY['c6', 'c7', 'c8']) m;
-- A capture spends vested points: c10 has 100 vested (o10a, all held) and
-- 50 pending; returning o10a takes the 50 pending points, not the held
-- vested ones, and owes 50; the checkout captures its 100.
SELECT loyalty.create_program('mixed', 'Mixed', 'UTC') > 0 AS created;
SELECT loyalty.enroll('mixed', 'c10', occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('mixed', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
SELECT loyalty.accrue('mixed', 'c10', 100, 'o10a', now() - interval '10 days') AS earned;
SELECT loyalty.set_earning_rules('mixed', '{"base": {"per": 1, "points": 1}, "pending_days": 30}', now() - interval '1 day') AS version;
SELECT loyalty.accrue('mixed', 'c10', 50, 'o10b', now() - interval '1 hour') AS earned;
SELECT loyalty.hold('mixed', 'c10', 100, 'c10-hold') > 0 AS held;
SELECT loyalty.refund('mixed', 'o10a') AS clawed;
SELECT refund_ref, taken, shortfall FROM loyalty.accrual_refund WHERE purchase_ref = 'o10a';
SELECT loyalty.capture('mixed', 'c10-hold') > 0 AS captured;
SELECT * FROM pg_temp.state('c10');
-- A credit dated later in business time is not there yet to repay: c10's
-- bonus dated in ten days leaves the 50 owed.
SELECT loyalty.earn('mixed', 'c10', 30, 'c10-later', 'later', now() + interval '10 days') > 0 AS earned;
SELECT * FROM pg_temp.state('c10');
-- A hold placed at a later business time may count on points that vest by
-- then: c9's 100 pending points, all held for a checkout in 14 days, stay
-- where they are when the order is returned (100 owed), and the checkout
-- captures them.
SELECT loyalty.create_program('later', 'Later', 'UTC') > 0 AS created;
SELECT loyalty.enroll('later', 'c9', occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('later', '{"base": {"per": 1, "points": 1}, "pending_days": 14}', '2025-01-01') AS version;
SELECT loyalty.accrue('later', 'c9', 100, 'l1', now() - interval '1 day') AS earned;
SELECT loyalty.hold('later', 'c9', 100, 'c9-hold', '1 day', now() + interval '14 days') > 0 AS held;
SELECT loyalty.refund('later', 'l1') AS clawed;
SELECT * FROM pg_temp.state('c9');
SELECT loyalty.capture('later', 'c9-hold', NULL, now() + interval '14 days') > 0 AS captured;
SELECT * FROM pg_temp.state('c9');

-- Points that expired unused are not taken twice: x1 earns 100 (x-1),
-- spends 30 of them, and the other 70 expire. Returning half the order
-- (50 points) forgives 50 of the expired 70; returning the rest (50)
-- forgives the last 20 and takes 30 from x-2's lot: what was spent.
SELECT loyalty.create_program('exp', 'Expiring', 'UTC', '{"expiry": {"policy": "fixed", "after": "30 days"}}') > 0 AS created;
SELECT loyalty.enroll('exp', 'x1', occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('exp', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
SELECT loyalty.accrue('exp', 'x1', 100, 'x-1', now() - interval '40 days') AS earned;
SELECT loyalty.adjust('exp', 'x1', -30, 'x-spend', 'spent in store', now() - interval '35 days') > 0 AS spent;
SELECT loyalty.accrue('exp', 'x1', 50, 'x-2', now() - interval '5 days') AS earned;
SELECT rows, points FROM loyalty.run_job('expire', now());
SELECT loyalty.refund('exp', 'x-1', 50, 'x-1-r1') AS clawed;
SELECT loyalty.refund('exp', 'x-1', NULL, 'x-1-r2') AS clawed;
SELECT loyalty.refund('exp', 'x-1', NULL, 'x-1-r2') AS replayed;
SELECT refund_ref, points, taken, shortfall, forgiven FROM loyalty.accrual_refund
WHERE purchase_ref = 'x-1' ORDER BY refund_ref;
SELECT * FROM pg_temp.state('x1');
SELECT loyalty.balance('exp', 'x1') AS balance;
SELECT kind, ref, points FROM loyalty.statement('exp', 'x1') ORDER BY transfer_id;
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('exp');

-- Points past their expiry that the expire job has not swept yet are
-- expired all the same: returning x-3, whose 40 points expired unused,
-- forgives them and takes nothing; the job then sweeps them.
SELECT loyalty.accrue('exp', 'x1', 40, 'x-3', now() - interval '31 days') AS earned;
SELECT loyalty.refund('exp', 'x-3') AS clawed;
SELECT refund_ref, points, taken, shortfall, forgiven FROM loyalty.accrual_refund WHERE purchase_ref = 'x-3';
SELECT rows, points FROM loyalty.run_job('expire', now());
SELECT * FROM pg_temp.state('x1');
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('exp');

-- A redemption cancelled after the refund of the purchase it spent, once
-- that purchase's points have expired: x2 earns 100 (x-5), redeems 60 of
-- them, and the other 40 expire. Returning the order forgives the 40 and
-- owes the 60 that were spent. Cancelling the redemption gives those 60
-- back to x-5's expired lot: they are the points the refund owes, so they
-- repay the debt at once instead of expiring (the member gave them back
-- once, not twice). Cancelled before the refund, the same 60 expire and
-- the refund forgives them: 100 gone either way.
SELECT loyalty.enroll('exp', 'x2', occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled;
SELECT loyalty.accrue('exp', 'x2', 100, 'x-5', now() - interval '40 days') AS earned;
SELECT loyalty.add_reward('exp', 'pin', 'A pin', 60) AS reward;
SELECT points FROM loyalty.redeem('exp', 'x2', 'pin', 'x2-pin', 1, now() - interval '35 days');
SELECT rows, points FROM loyalty.run_job('expire', now());
SELECT loyalty.refund('exp', 'x-5') AS clawed;
SELECT refund_ref, points, taken, shortfall, forgiven FROM loyalty.accrual_refund WHERE purchase_ref = 'x-5';
SELECT * FROM pg_temp.state('x2');
SELECT loyalty.cancel_redemption('exp', 'x2-pin') > 0 AS cancelled;
SELECT * FROM pg_temp.state('x2');
SELECT rows, points FROM loyalty.run_job('expire', now());
SELECT kind, points, balance FROM loyalty.statement('exp', 'x2') ORDER BY transfer_id;
SELECT lifetime_expired, lifetime_adjusted FROM loyalty.account_summary('exp', 'x2');
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('exp');
-- The other order: x3's redemption is cancelled first (its 60 expire at
-- the cancel), then the refund forgives all 100 and owes nothing.
SELECT loyalty.enroll('exp', 'x3', occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled;
SELECT loyalty.accrue('exp', 'x3', 100, 'x-6', now() - interval '40 days') AS earned;
SELECT points FROM loyalty.redeem('exp', 'x3', 'pin', 'x3-pin', 1, now() - interval '35 days');
SELECT rows, points FROM loyalty.run_job('expire', now());
SELECT loyalty.cancel_redemption('exp', 'x3-pin') > 0 AS cancelled;
SELECT loyalty.refund('exp', 'x-6') AS clawed;
SELECT refund_ref, points, taken, shortfall, forgiven FROM loyalty.accrual_refund WHERE purchase_ref = 'x-6';
SELECT * FROM pg_temp.state('x3');
SELECT lifetime_expired, lifetime_adjusted FROM loyalty.account_summary('exp', 'x3');

-- When the refund took the member's other points in place of the spent
-- ones, the cancel gives those back too: x4 earns 100 (x-7) and 30 (x-8),
-- spends 60 of x-7's on a pin, and x-7's other 40 expire. Returning x-7
-- takes x-8's 30 and owes 30. Cancelling the pin gives 60 back to x-7's
-- expired lot: 30 repay the debt, the other 30 settle the refund in place
-- of x-8's, which get their 30 back. x4 keeps x-8's 30, as x5 does, whose
-- pin is cancelled before the refund; a second cancel path (a replay)
-- gives nothing twice.
SELECT loyalty.enroll('exp', m, occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled
FROM unnest(ARRAY['x4', 'x5']) m;
SELECT loyalty.accrue('exp', m, 100, m || '-a', now() - interval '40 days') AS earned,
       loyalty.accrue('exp', m, 30, m || '-b', now() - interval '2 days') AS earned_later
FROM unnest(ARRAY['x4', 'x5']) m;
SELECT m, r.points FROM unnest(ARRAY['x4', 'x5']) m,
       loyalty.redeem('exp', m, 'pin', m || '-pin', 1, now() - interval '35 days') r;
SELECT rows, points FROM loyalty.run_job('expire', now());
SELECT loyalty.refund('exp', 'x4-a') AS clawed;
SELECT loyalty.cancel_redemption('exp', 'x4-pin') > 0 AS cancelled;
SELECT loyalty.cancel_redemption('exp', 'x4-pin') > 0 AS cancelled_again;
SELECT loyalty.cancel_redemption('exp', 'x5-pin') > 0 AS cancelled;
SELECT loyalty.refund('exp', 'x5-a') AS clawed;
SELECT refund_ref, points, taken, shortfall, forgiven, returned FROM loyalty.accrual_refund
WHERE refund_ref IN ('x4-a', 'x5-a') ORDER BY refund_ref;
SELECT m, s.* FROM unnest(ARRAY['x4', 'x5']) m, pg_temp.state(m) s;
SELECT m, loyalty.balance('exp', m) AS balance FROM unnest(ARRAY['x4', 'x5']) m;
SELECT l.amount, l.remaining FROM loyalty.lot l JOIN loyalty.transfer t ON t.id = l.transfer_id
WHERE t.ref = 'x4-b';
SELECT kind, points, balance FROM loyalty.statement('exp', 'x4') ORDER BY transfer_id;
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('exp');

-- What a later credit already repaid of the debt comes back too: x6 does
-- what x4 did, but between the refund and the cancel it earns 20 (x6-c),
-- which repay 20 of the 30 owed. Cancelling the pin then gives 60 back
-- to x6-a's expired lot: 10 repay the rest of the debt, 30 settle the
-- refund in place of x6-b's (which get their 30 back), and the last 20
-- settle it in place of the 20 x6-c repaid, which x6-c's lot gets back.
-- x7 does the same with the pin cancelled before the refund: both keep
-- 30 + 20.
SELECT loyalty.enroll('exp', m, occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled
FROM unnest(ARRAY['x6', 'x7']) m;
SELECT loyalty.accrue('exp', m, 100, m || '-a', now() - interval '40 days') AS earned,
       loyalty.accrue('exp', m, 30, m || '-b', now() - interval '2 days') AS earned_later
FROM unnest(ARRAY['x6', 'x7']) m;
SELECT m, r.points FROM unnest(ARRAY['x6', 'x7']) m,
       loyalty.redeem('exp', m, 'pin', m || '-pin', 1, now() - interval '35 days') r;
SELECT rows, points FROM loyalty.run_job('expire', now());
SELECT loyalty.refund('exp', 'x6-a') AS clawed;
SELECT loyalty.accrue('exp', 'x6', 20, 'x6-c', now() - interval '1 day') AS earned;
SELECT * FROM pg_temp.state('x6');
SELECT loyalty.cancel_redemption('exp', 'x6-pin') > 0 AS cancelled;
SELECT loyalty.cancel_redemption('exp', 'x6-pin') > 0 AS cancelled_again;
SELECT loyalty.cancel_redemption('exp', 'x7-pin') > 0 AS cancelled;
SELECT loyalty.refund('exp', 'x7-a') AS clawed;
SELECT loyalty.accrue('exp', 'x7', 20, 'x7-c', now() - interval '1 day') AS earned;
SELECT refund_ref, points, taken, shortfall, forgiven, returned FROM loyalty.accrual_refund
WHERE refund_ref IN ('x6-a', 'x7-a') ORDER BY refund_ref;
SELECT refund_ref, amount, outstanding, refilled, given_back FROM loyalty.accrual_debt WHERE refund_ref IN ('x6-a', 'x7-a');
SELECT m, s.* FROM unnest(ARRAY['x6', 'x7']) m, pg_temp.state(m) s;
SELECT m, loyalty.balance('exp', m) AS balance FROM unnest(ARRAY['x6', 'x7']) m;
SELECT t.ref, l.amount, l.remaining FROM loyalty.lot l JOIN loyalty.transfer t ON t.id = l.transfer_id
WHERE t.ref IN ('x6-b', 'x6-c', 'x7-b', 'x7-c') ORDER BY t.ref;
SELECT kind, points, balance FROM loyalty.statement('exp', 'x6') ORDER BY transfer_id;
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('exp');

-- Under a rolling policy, points that lapsed are neither taken by a refund
-- nor owed: y1's 100 from a year ago lapsed (6 months without activity);
-- returning p1, whose 50 were spent, owes 50.
SELECT loyalty.create_program('roll', 'Rolling', 'UTC',
    '{"expiry": {"policy": "rolling", "inactivity": "6 months"}}') > 0 AS created;
SELECT loyalty.enroll('roll', 'y1', occurred_at => now() - interval '2 years') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('roll', '{"base": {"per": 1, "points": 1}}', now() - interval '2 years') AS version;
SELECT loyalty.earn('roll', 'y1', 100, 'y-old', NULL, now() - interval '1 year') > 0 AS earned;
SELECT loyalty.accrue('roll', 'y1', 50, 'p1', now() - interval '5 days') AS earned;
SELECT loyalty.adjust('roll', 'y1', -50, 'y-spend', 'spent', now() - interval '4 days') > 0 AS spent;
SELECT loyalty.refund('roll', 'p1') AS clawed;
SELECT refund_ref, points, taken, shortfall, forgiven FROM loyalty.accrual_refund WHERE purchase_ref = 'p1';
SELECT rows, points FROM loyalty.run_job('expire', now());
SELECT * FROM pg_temp.state('y1');

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

-- ---- shortfall "negative" ----
-- Program neg shows a refund's shortfall as a balance below zero. Business
-- times before the refund are relative to now(), so that the statement (by
-- occurred_at) lists the lines in the order they were posted; refunds and
-- recoveries occur at their posting time.
SELECT loyalty.create_program('neg', 'Negative', 'UTC', '{"shortfall": "negative"}') > 0 AS created;
SELECT loyalty.enroll('neg', m, occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled
FROM unnest(ARRAY['n1', 'n2', 'n3']) m;
SELECT loyalty.set_earning_rules('neg', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
SELECT loyalty.add_reward('neg', 'cup', 'A cup', 5) AS reward;
SELECT loyalty.add_charity('neg', 'trees') > 0 AS charity;
CREATE FUNCTION pg_temp.lines(m text) RETURNS TABLE (has_transfer boolean, kind text, ref text, points bigint,
                                                    balance bigint, explanation text)
LANGUAGE sql AS $$
    SELECT transfer_id IS NOT NULL, kind,
           CASE WHEN kind = 'recover' THEN 'recovery' ELSE ref END,   -- its ref names ids
           points, balance, explanation
    FROM loyalty.statement('neg', m)
$$;
CREATE FUNCTION pg_temp.refund_at(r text) RETURNS timestamptz LANGUAGE sql AS $$
    SELECT occurred_at FROM loyalty.accrual_refund WHERE refund_ref = r
$$;

-- n1 earns 100, spends 60, returns the whole order: 40 are taken from the
-- lot, 60 are owed, and the balance is 40 - 100 = -60. The account row and
-- the lots stay at 0 (they are the same as under "debt").
SELECT loyalty.accrue('neg', 'n1', 100, 'a1', now() - interval '10 days') AS earned;
SELECT loyalty.adjust('neg', 'n1', -60, 'a1-spend', 'spent in store', now() - interval '5 days') > 0 AS spent;
SELECT loyalty.refund('neg', 'a1') AS clawed;
SELECT loyalty.balance('neg', 'n1') AS balance;
SELECT * FROM pg_temp.state('n1');
SELECT refund_ref, taken, shortfall FROM loyalty.accrual_refund WHERE purchase_ref = 'a1';
SELECT d.refund_ref, d.amount, d.outstanding, d.shown_as_negative, d.created_at = pg_temp.refund_at('a1') AS at_refund
FROM loyalty.accrual_debt d WHERE d.refund_ref = 'a1';
-- earned 100, adjusted -60 (spend) - 100 (the whole clawback): -160
SELECT available, pending, held, expiring_soon, next_expiry_at, lifetime_earned, lifetime_redeemed,
       lifetime_expired, lifetime_adjusted
FROM loyalty.account_summary('neg', 'n1');
-- the refund line claws all 100 back, so the running balance goes to -60
SELECT * FROM pg_temp.lines('n1');
-- before the refund the balance was 40; from the refund on, -60
SELECT loyalty.balance('neg', 'n1', pg_temp.refund_at('a1') - interval '1 microsecond') AS before_refund,
       loyalty.balance('neg', 'n1', pg_temp.refund_at('a1')) AS at_refund;
SELECT available, lifetime_adjusted
FROM loyalty.account_summary('neg', 'n1', pg_temp.refund_at('a1') - interval '1 microsecond');
-- Nothing can be spent while the balance is below zero: there are no lots.
SELECT throws_ok($$SELECT * FROM loyalty.redeem('neg', 'n1', 'cup', 'n1-cup')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.hold('neg', 'n1', 1, 'n1-hold')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.donate('neg', 'n1', 'trees', 1, 'n1-gift')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.transfer_points('neg', 'n1', 'n2', 1, 'n1-move')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.adjust('neg', 'n1', -1, 'n1-fix', 'test')$$, 'LY001', 'insufficient points');

-- A later purchase of 50 repays 50 of the 60 at once: -10. The recover
-- line shows 0, its 50 points being already in the refund line.
SELECT loyalty.accrue('neg', 'n1', 50, 'a2') AS earned;
SELECT loyalty.balance('neg', 'n1') AS balance;
SELECT * FROM pg_temp.state('n1');
SELECT * FROM pg_temp.lines('n1');
SELECT throws_ok($$SELECT * FROM loyalty.redeem('neg', 'n1', 'cup', 'n1-cup')$$, 'LY001', 'insufficient points');
-- A purchase of 30 through an attached table repays the last 10: 20.
CREATE TABLE public.neg_orders (id text, customer text, total numeric, placed_at timestamptz DEFAULT now());
SELECT loyalty.attach_accrual('public.neg_orders', 'neg', member_column => 'customer', amount_column => 'total',
                              ref_column => 'id', occurred_at_column => 'placed_at');
INSERT INTO public.neg_orders (id, customer, total) VALUES ('a3', 'n1', 30);
SELECT loyalty.balance('neg', 'n1') AS balance;
SELECT * FROM pg_temp.state('n1');
SELECT * FROM pg_temp.lines('n1');
SELECT loyalty.account_summary('neg', 'n1') AS summary;
-- as of each recovery: -10 after the first, 20 after the second
SELECT loyalty.balance('neg', 'n1', t.occurred_at - interval '1 microsecond') AS just_before,
       loyalty.balance('neg', 'n1', t.occurred_at) AS after
FROM loyalty.transfer t JOIN loyalty.account a ON a.id = t.debit_account_id
JOIN loyalty.member m ON m.id = a.member_id
WHERE m.member_ref = 'n1' AND t.kind = 'recover' ORDER BY t.id;
-- now spending works again, up to the balance
SELECT points FROM loyalty.redeem('neg', 'n1', 'cup', 'n1-cup');
SELECT loyalty.balance('neg', 'n1') AS balance;

-- Partial refunds and a repeat: n2 earns 100, spends 90.
SELECT loyalty.accrue('neg', 'n2', 100, 'b1', now() - interval '10 days') AS earned;
SELECT loyalty.adjust('neg', 'n2', -90, 'b1-spend', 'spent in store', now() - interval '5 days') > 0 AS spent;
-- 30.00 of 100.00: 30 points, 10 from the lot, 20 owed: -20
SELECT loyalty.refund('neg', 'b1', 30.00, 'b1-r1') AS clawed;
SELECT loyalty.balance('neg', 'n2') AS balance;
-- the same refund again changes nothing
SELECT loyalty.refund('neg', 'b1', 30.00, 'b1-r1') AS replayed;
SELECT loyalty.balance('neg', 'n2') AS balance;
-- 20.00 more: round(100 * 50 / 100) - 30 = 20 points, all owed (no lot
-- left, so no transfer: the statement still shows the line): -40
SELECT loyalty.refund('neg', 'b1', 20.00, 'b1-r2') AS clawed;
SELECT loyalty.refund('neg', 'b1', 20.00, 'b1-r2') AS replayed;
SELECT loyalty.balance('neg', 'n2') AS balance;
SELECT * FROM pg_temp.state('n2');
SELECT refund_ref, points, taken, shortfall FROM loyalty.accrual_refund WHERE purchase_ref = 'b1' ORDER BY refund_ref;
SELECT * FROM pg_temp.lines('n2');
SELECT loyalty.balance('neg', 'n2', pg_temp.refund_at('b1-r2') - interval '1 microsecond') AS before_second,
       loyalty.balance('neg', 'n2', pg_temp.refund_at('b1-r2')) AS after_second;
SELECT available, lifetime_earned, lifetime_adjusted FROM loyalty.account_summary('neg', 'n2');
-- a statement from the second refund on: its line, the running balance counting every line before it
SELECT transfer_id IS NULL AS no_transfer, kind, ref, points, balance
FROM loyalty.statement('neg', 'n2', pg_temp.refund_at('b1-r2'));

-- The mode is the one in force at the refund. n3 earns 100 and spends it.
-- Under "debt", returning 30.00 owes 30, which the balance does not show.
SELECT loyalty.accrue('neg', 'n3', 100, 'c1', now() - interval '10 days') AS earned;
SELECT loyalty.adjust('neg', 'n3', -100, 'c1-spend', 'spent in store', now() - interval '5 days') > 0 AS spent;
SELECT loyalty.update_program('neg', '{"shortfall": "debt"}', 'shortfall shown as debt') > 0 AS updated;
SELECT loyalty.refund('neg', 'c1', 30.00, 'c1-r1') AS clawed;
SELECT loyalty.balance('neg', 'n3') AS balance;
-- switched to "negative": the 30 stay hidden; returning 20.00 more shows -20
SELECT loyalty.update_program('neg', '{"shortfall": "negative"}', 'shortfall shown as a negative balance') > 0 AS updated;
SELECT loyalty.balance('neg', 'n3') AS balance;
SELECT loyalty.refund('neg', 'c1', 20.00, 'c1-r2') AS clawed;
SELECT loyalty.balance('neg', 'n3') AS balance;
-- switched back to "debt": the 20 stay shown
SELECT loyalty.update_program('neg', '{"shortfall": "debt"}', 'shortfall shown as debt') > 0 AS updated;
SELECT loyalty.balance('neg', 'n3') AS balance;
SELECT refund_ref, amount, outstanding, shown_as_negative FROM loyalty.accrual_debt
WHERE refund_ref LIKE 'c1-%' ORDER BY id;
-- a purchase of 40 repays the oldest debt first: the 30 hidden, then 10 of
-- the 20 shown: -10; the recover line shows only the 30 not shown before
SELECT loyalty.accrue('neg', 'n3', 40, 'c2') AS earned;
SELECT loyalty.balance('neg', 'n3') AS balance;
SELECT * FROM pg_temp.state('n3');
SELECT refund_ref, amount, outstanding, shown_as_negative FROM loyalty.accrual_debt
WHERE refund_ref LIKE 'c1-%' ORDER BY id;
SELECT * FROM pg_temp.lines('n3');
SELECT loyalty.accrue('neg', 'n3', 10, 'c3') AS earned;
SELECT loyalty.balance('neg', 'n3') AS balance;
SELECT * FROM pg_temp.lines('n3');
SELECT available, lifetime_earned, lifetime_adjusted FROM loyalty.account_summary('neg', 'n3');

-- Points credited otherwise than by a purchase repay at once too: n4 owes
-- 100 and gets 30 bonus points, which a recover transfer takes at once
-- (-70, 70 owed, no lots left); it cannot spend while below zero, and the
-- next purchase repays the 70.
SELECT loyalty.enroll('neg', 'n4', occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled;
SELECT loyalty.accrue('neg', 'n4', 100, 'd1', now() - interval '10 days') AS earned;
SELECT loyalty.adjust('neg', 'n4', -100, 'd1-spend', 'spent in store', now() - interval '5 days') > 0 AS spent;
SELECT loyalty.update_program('neg', '{"shortfall": "negative"}', 'shortfall shown as a negative balance') > 0 AS updated;
SELECT loyalty.refund('neg', 'd1') AS clawed;
SELECT loyalty.earn('neg', 'n4', 30, 'd-bonus', 'goodwill') > 0 AS bonus;
SELECT loyalty.balance('neg', 'n4') AS balance;
SELECT * FROM pg_temp.state('n4');
SELECT throws_ok($$SELECT * FROM loyalty.redeem('neg', 'n4', 'cup', 'n4-cup')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.hold('neg', 'n4', 1, 'n4-hold')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.donate('neg', 'n4', 'trees', 1, 'n4-gift')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.transfer_points('neg', 'n4', 'n1', 1, 'n4-move')$$, 'LY001', 'insufficient points');
DO $$
DECLARE d text; h text;
BEGIN
    PERFORM loyalty.redeem('neg', 'n4', 'cup', 'n4-cup');
EXCEPTION WHEN sqlstate 'LY001' THEN
    GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT;
    RAISE NOTICE '% %', regexp_replace(d, ' at [^;]*;', ' at (now);'), h;
END $$;
-- 80 more points: 70 repay the debt, 10 are left
SELECT loyalty.accrue('neg', 'n4', 80, 'd2') AS earned;
SELECT loyalty.balance('neg', 'n4') AS balance;
SELECT * FROM pg_temp.state('n4');
SELECT * FROM pg_temp.lines('n4');
SELECT points FROM loyalty.redeem('neg', 'n4', 'cup', 'n4-cup');
SELECT loyalty.donate('neg', 'n4', 'trees', 5, 'n4-gift') > 0 AS donated;
SELECT loyalty.donate('neg', 'n4', 'trees', 5, 'n4-gift') > 0 AS donated_again;
SELECT loyalty.balance('neg', 'n4') AS balance;

-- Every credit repays: n5 owes 60 (shown as negative); its redemption of
-- 20 points is cancelled (20 repay, 40 owed), n6 transfers 5 points to it
-- (35 owed), and an upward adjust of 30 repays 30: 5 owed, balance -5. A
-- replayed credit posts nothing and repays nothing; a member who owes
-- nothing keeps what it is credited (n6's purchase).
SELECT loyalty.enroll('neg', m, occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled
FROM unnest(ARRAY['n5', 'n6']) m;
SELECT loyalty.accrue('neg', 'n6', 10, 'f1', now() - interval '10 days') AS earned;
SELECT loyalty.accrue('neg', 'n5', 60, 'e1', now() - interval '10 days') AS earned;
SELECT loyalty.add_reward('neg', 'mug', 'A mug', 20) AS reward;
SELECT points FROM loyalty.redeem('neg', 'n5', 'mug', 'n5-mug');
SELECT loyalty.adjust('neg', 'n5', -40, 'e1-spend', 'spent in store', now() - interval '5 days') > 0 AS spent;
SELECT loyalty.refund('neg', 'e1') AS clawed;
SELECT * FROM pg_temp.state('n5');
SELECT loyalty.cancel_redemption('neg', 'n5-mug') > 0 AS cancelled;
SELECT loyalty.balance('neg', 'n5') AS balance;
SELECT * FROM pg_temp.state('n5');
SELECT loyalty.transfer_points('neg', 'n6', 'n5', 5, 'n6-to-n5') > 0 AS moved;
SELECT loyalty.balance('neg', 'n5') AS balance;
SELECT * FROM pg_temp.state('n5');
SELECT loyalty.adjust('neg', 'n5', 30, 'n5-goodwill', 'goodwill') > 0 AS adjusted;
SELECT loyalty.adjust('neg', 'n5', 30, 'n5-goodwill', 'goodwill') > 0 AS replayed;
SELECT loyalty.balance('neg', 'n5') AS balance;
SELECT * FROM pg_temp.state('n5');
SELECT * FROM pg_temp.lines('n5');
SELECT * FROM pg_temp.state('n6');

-- The books: the chains verify, each account row is the sum of its lots,
-- and every point is in a member's lot or back in the issuance account.
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('neg');
SELECT m.member_ref, a.available::bigint + a.pending::bigint AS account,
       (SELECT sum(l.remaining::bigint) FROM loyalty.lot l WHERE l.account_id = a.id) AS lots,
       (SELECT coalesce(sum(CASE WHEN t.credit_account_id = a.id THEN t.amount::bigint ELSE -t.amount::bigint END), 0)
        FROM loyalty.transfer t WHERE a.id IN (t.credit_account_id, t.debit_account_id)) AS journal
FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id
JOIN loyalty.program p ON p.id = m.program_id WHERE p.code = 'neg' ORDER BY 1;
SELECT sum(CASE WHEN a.kind = 'member' THEN 1 ELSE 0 END * (a.available::bigint + a.pending::bigint)) AS members,
       (SELECT sum(t.amount::bigint) FROM loyalty.transfer t JOIN loyalty.account s ON s.id = t.debit_account_id
        WHERE s.kind <> 'member' AND t.program_id = p.id)
       - (SELECT sum(t.amount::bigint) FROM loyalty.transfer t JOIN loyalty.account s ON s.id = t.credit_account_id
          WHERE s.kind <> 'member' AND t.program_id = p.id) AS out_of_system_accounts
FROM loyalty.account a JOIN loyalty.program p ON p.id = a.program_id WHERE p.code = 'neg' GROUP BY p.id;
SELECT loyalty.detach_accrual('public.neg_orders');
DROP TABLE public.neg_orders;

-- A purchase that did not say when it happened (accrue() without
-- occurred_at, an attached table without the column or with NULL in it)
-- is posted at the transaction's start; a retry in a later transaction,
-- whose now() differs, is the same purchase, not 23505. One that gives a
-- time is another purchase.
SELECT loyalty.create_program('retry', 'Retry', 'UTC') > 0 AS created;
SELECT loyalty.enroll('retry', 'r1', occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('retry', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
SELECT loyalty.accrue('retry', 'r1', 10, 'r-1') AS earned;
SELECT loyalty.accrue('retry', 'r1', 10, 'r-1') AS replayed;
SELECT loyalty.accrue('retry', 'r1', 10, 'r-1', NULL) AS replayed_with_null;
\set VERBOSITY terse
SELECT loyalty.accrue('retry', 'r1', 10, 'r-1', '2025-06-01 00:00+00');
\set VERBOSITY default
CREATE TABLE public.till (id text, customer text, total numeric);
SELECT loyalty.attach_accrual('public.till', 'retry', 'customer', 'total', 'id');
INSERT INTO public.till VALUES ('t-1', 'r1', 5);
INSERT INTO public.till VALUES ('t-1', 'r1', 5), ('t-2', 'r1', 7);   -- a retried batch
SELECT ref, points FROM loyalty.accrual WHERE ref LIKE 't-%' OR ref LIKE 'r-%' ORDER BY ref;
SELECT count(*) AS quarantined FROM loyalty.accrual_quarantine WHERE source = 'public.till'::regclass;
SELECT loyalty.balance('retry', 'r1') AS balance;
SELECT loyalty.detach_accrual('public.till');
DROP TABLE public.till;

-- ---- a purchase dated in the future, refunded now ----
-- The refund is dated at the purchase's own time: its lot does not exist
-- before then. Dated now, the statement showed the refund's debit before
-- the credit it takes back (a running balance of -40 under "negative",
-- where balance() said 0).
SELECT loyalty.create_program('ahead', 'Ahead', 'UTC', '{"shortfall": "negative"}') > 0 AS created;
SELECT loyalty.set_earning_rules('ahead', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
SELECT loyalty.enroll('ahead', 'f1', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.accrue('ahead', 'f1', 40, 'f-1', now() + interval '10 days') AS earned;
SELECT loyalty.refund('ahead', 'f-1') AS refunded;
SELECT kind, points, balance, occurred_at = (SELECT occurred_at FROM loyalty.accrual WHERE ref = 'f-1') AS at_purchase_time
FROM loyalty.statement('ahead', 'f1');
SELECT loyalty.balance('ahead', 'f1') AS now, loyalty.balance('ahead', 'f1', now() + interval '20 days') AS later;
SELECT points, taken, shortfall, occurred_at = (SELECT occurred_at FROM loyalty.accrual WHERE ref = 'f-1') AS at_purchase_time
FROM loyalty.accrual_refund WHERE refund_ref = 'f-1';
-- The debt such a refund records exists from the purchase's time, and a
-- credit now repays it then, not now: the recovery dated now made
-- balance() 30 lower than the statement for ten days.
SELECT loyalty.accrue('ahead', 'f1', 40, 'f-2', now() + interval '10 days') AS earned;
SELECT loyalty.add_reward('ahead', 'cap', 'A cap', 30) AS version;
SELECT points FROM loyalty.redeem('ahead', 'f1', 'cap', 'r-f', 1, now() + interval '12 days');
SELECT loyalty.refund('ahead', 'f-2') AS refunded;
SELECT taken, shortfall FROM loyalty.accrual_refund WHERE refund_ref = 'f-2';
SELECT loyalty.earn('ahead', 'f1', 50, 'e-f') > 0 AS earned;
SELECT kind, points, occurred_at = (SELECT occurred_at FROM loyalty.accrual WHERE ref = 'f-2') AS at_purchase_time
FROM loyalty.statement('ahead', 'f1') WHERE kind = 'recover';
SELECT t AS days, loyalty.balance('ahead', 'f1', now() + t * interval '1 day') AS balance,
       (SELECT s.balance FROM loyalty.statement('ahead', 'f1', to_ts => now() + t * interval '1 day') s
        ORDER BY s.occurred_at DESC, s.transfer_id DESC LIMIT 1) AS statement
FROM unnest(ARRAY[1, 5, 11, 20]) t;

-- A one-row sale looks for debts to recover only when its member's account
-- says it owes (account.owes, set with every debt a refund records): every
-- account that has a debt has the flag, and the repayments above went
-- through it.
SELECT count(*) > 0 AS some_debts, count(*) FILTER (WHERE NOT a.owes) AS debts_of_accounts_not_owing
FROM loyalty.accrual_debt d JOIN loyalty.account a ON a.id = d.account_id;
SELECT count(*) FILTER (WHERE a.owes) > 0 AS some_owe,
       count(*) FILTER (WHERE a.owes AND NOT EXISTS (SELECT FROM loyalty.accrual_debt d WHERE d.account_id = a.id))
         AS owing_without_debt
FROM loyalty.account a WHERE a.member_id IS NOT NULL;
