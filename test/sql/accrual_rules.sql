SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';

SELECT loyalty.create_program('shop', 'Shop', 'Europe/Paris') > 0 AS created;
SELECT loyalty.enroll('shop', 'c1', birthday => '1990-03-15', occurred_at => '2027-01-01 00:00+00') > 0 AS c1;
SELECT loyalty.enroll('shop', 'c2', occurred_at => '2027-01-01 00:00+00') > 0 AS c2;
SELECT loyalty.enroll('shop', 'c3', occurred_at => '2027-01-01 00:00+00') > 0 AS c3;
UPDATE loyalty.member SET tier = 'gold' WHERE member_ref = 'c2';
UPDATE loyalty.member SET status = 'suspended' WHERE member_ref = 'c3';
SELECT plan(18);

-- Every validation error: 22023 with the JSON path of the first problem.
CREATE FUNCTION pg_temp.try_rules(doc text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    s text; m text; d text;
BEGIN
    PERFORM loyalty.set_earning_rules('shop', doc::jsonb, '2027-01-01');
    RETURN 'accepted';
EXCEPTION WHEN others THEN
    GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL;
    RETURN s || ' ' || m || ' | ' || d;
END $$;
SELECT doc, pg_temp.try_rules(doc) FROM (VALUES
    ('[]'),
    ('5'),
    ('{"bogus": 1}'),
    ('{"base": {"per": 0}}'),
    ('{"base": {"per": "1"}}'),
    ('{"base": {"per": 1e400}}'),
    ('{"multipliers": [{"factor": 1e400}]}'),
    ('{"base": {"points": -1}}'),
    ('{"base": {"rounding": "up"}}'),
    ('{"base": {"rate": 1}}'),
    ('{"exclude": {"category": "gift_card"}}'),
    ('{"exclude": {"category": [1]}}'),
    ('{"exclude": {"weekday": [1]}}'),
    ('{"multipliers": {"factor": 2}}'),
    ('{"multipliers": [{"factor": -2}]}'),
    ('{"multipliers": [{"when": {"category": ["x"]}}]}'),
    ('{"multipliers": [{"when": {"weekday": [0]}, "factor": 2}]}'),
    ('{"multipliers": [{"when": {"colour": ["red"]}, "factor": 2}]}'),
    ('{"multipliers": [{"when": {"first_purchase": "yes"}, "factor": 2}]}'),
    ('{"multipliers": [{"factor": 2, "name": "x"}]}'),
    ('{"bonuses": [{"points": 10, "factor": 2}]}'),
    ('{"bonuses": [{"when": {}}]}'),
    ('{"bonuses": [{"campaign": "summer", "from": "2027-06-01", "points": 50}]}'),
    ('{"bonuses": [{"campaign": "summer", "from": "2027-06-01", "to": "2027-13-01", "points": 50}]}'),
    ('{"bonuses": [{"campaign": "summer", "from": "2027-06-01", "to": "2027-05-01", "points": 50}]}'),
    ('{"bonuses": [{"campaign": "summer", "from": "2027-06-01", "to": "2027-08-01", "factor": 2}]}'),
    ('{"bonuses": [{"points": 10, "budget": 100}]}'),
    ('{"bonuses": [{"points": 1.5}]}'),
    ('{"caps": {"per_purchase": -1}}'),
    ('{"caps": {"per_day": 10}}'),
    ('{"pending_days": 3.5}'),
    ('{"pending_days": 4000}'),
    ('{"min_amount": -5}'),
    ('{"expiry": {"policy": "rolling", "inactivity": "1 year"}}'),
    ('{"expiry": {"policy": "fixed"}}'),
    ('{"expiry": {"policy": "fixed", "after": "soon"}}')
) v(doc);
SELECT count(*) AS versions_after_errors FROM loyalty.earning_rule;

SELECT throws_ok($$SELECT loyalty.set_earning_rules('nope', '{}', '2027-01-01')$$, 'LY002', 'program "nope" does not exist');
SELECT throws_ok($$SELECT loyalty.set_earning_rules('shop', NULL, '2027-01-01')$$, '22004', 'program, rules and effective_from must not be null');
SELECT throws_ok($$SELECT loyalty.set_earning_rules('shop', '{}', 'infinity')$$, '22023', 'effective_from must be a finite time');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', 10, 'too-early', '2026-12-31 12:00+00')$$, 'LY010',
                 'program "shop" has no earning rules in force at 2026-12-31 12:00:00+00');

-- Version 1: the issue's document (budget lowered to show it run out).
SELECT loyalty.set_earning_rules('shop', '{
  "base": {"per": 1.00, "points": 1, "rounding": "floor"},
  "exclude": {"category": ["gift_card"]},
  "multipliers": [{"when": {"category": ["electronics"]}, "factor": 2},
                  {"when": {"tier": ["gold"]}, "factor": 1.5},
                  {"when": {"weekday": [6, 7]}, "factor": 2},
                  {"when": {"channel": ["app"]}, "factor": 1.2}],
  "bonuses": [{"when": {"first_purchase": true}, "points": 100},
              {"when": {"birthday_month": true}, "factor": 2},
              {"campaign": "summer", "from": "2027-06-01", "to": "2027-08-31", "points": 50, "budget": 120}],
  "caps": {"per_purchase": 10000, "per_member_per_day": 20000},
  "min_amount": 5.00}', '2027-01-01 00:00+01', 'launch') AS version;

-- Purchases with hand-computed points (Paris time; 2027-01-04 is a Monday).
SELECT ref, loyalty.accrue('shop', m, amount, ref, at, category, channel) AS points, expected
FROM (VALUES
  -- first purchase: floor(10.50) = 10, + 100
  ('p1',  'c1', 10.50,  '2027-01-04 10:00+00'::timestamptz, 'books',       NULL,  110),
  -- electronics x2, app x1.2: 10.50 * 2.4 = 25.2 -> 25
  ('p2',  'c1', 10.50,  '2027-01-04 11:00+00', 'electronics', 'app', 25),
  -- below min_amount
  ('p3',  'c1', 4.99,   '2027-01-04 12:00+00', 'books',       NULL,  0),
  -- excluded category
  ('p4',  'c1', 100,    '2027-01-04 13:00+00', 'gift_card',   NULL,  0),
  -- gold x1.5, Saturday x2, electronics x2: 20 * 6 = 120, + first purchase 100
  ('p5',  'c2', 20,     '2027-01-09 10:00+00', 'electronics', NULL,  220),
  -- Saturday 2027-03-06 in c1's birthday month: 10 * 2 * 2 = 40
  ('p6',  'c1', 10,     '2027-03-06 10:00+00', 'books',       NULL,  40),
  -- Saturday in Paris (00:30 local) though Friday in UTC: 10 * 2 = 20
  ('p6b', 'c1', 10,     '2027-01-08 23:30+00', 'books',       NULL,  20),
  -- campaign: gold 10.99 * 1.5 = 16.485 -> 16, + 50 (budget 120 -> 70 left)
  ('p7',  'c2', 10.99,  '2027-06-02 10:00+00', 'books',       NULL,  66),
  -- 10 + 50 (20 left)
  ('p8',  'c1', 10,     '2027-06-03 10:00+00', 'books',       NULL,  60),
  -- 10 + 20, the budget runs out
  ('p9',  'c1', 10,     '2027-06-04 10:00+00', 'books',       NULL,  30),
  -- Saturday 20, no budget left
  ('p10', 'c1', 10,     '2027-06-05 10:00+00', 'books',       NULL,  20),
  -- per-purchase cap: 12000 -> 10000
  ('p11', 'c1', 12000,  '2027-01-05 10:00+00', 'books',       NULL,  10000),
  -- same day, 15000 -> 10000 (day total 20000)
  ('p12', 'c1', 15000,  '2027-01-05 11:00+00', 'books',       NULL,  10000),
  -- same day, the daily cap is reached
  ('p13', 'c1', 500,    '2027-01-05 12:00+00', 'books',       NULL,  0),
  -- the next day (Paris) earns again
  ('p14', 'c1', 500,    '2027-01-05 23:30+00', 'books',       NULL,  500)
) v(ref, m, amount, at, category, channel, expected)
ORDER BY at;

-- Each breakdown reproduces the points posted.
SELECT ref, rule_version, points, loyalty._accrual_breakdown(a) AS breakdown FROM loyalty.accrual a ORDER BY occurred_at;
-- What is stored: only what the row's columns, its rule version and the
-- defaults cannot say (no rule version, points, pending_until, rounding,
-- rounded product, empty list, factor 1, NULL tier or false flag).
SELECT ref, breakdown FROM loyalty.accrual ORDER BY occurred_at LIMIT 4;
-- (posted amount = points = base times factor, rounded as the version says,
-- plus the bonuses, less what the caps cut; 0 for a purchase without a base;
-- no row differs)
SELECT a.ref, a.points, t.amount AS posted
FROM loyalty.accrual a LEFT JOIN loyalty.transfer t ON t.kind = 'accrual' AND t.ref = a.ref
CROSS JOIN LATERAL (SELECT loyalty._accrual_breakdown(a) AS e) x
CROSS JOIN LATERAL (SELECT round((x.e ->> 'base')::numeric * (x.e ->> 'factor')::numeric, 6) AS v) p
WHERE coalesce(t.amount::bigint, 0) <> a.points
   OR (NOT x.e ? 'base' AND a.points <> 0)
   OR (x.e ? 'base'
       AND CASE x.e ->> 'rounding' WHEN 'floor' THEN floor(p.v) WHEN 'ceil' THEN ceil(p.v) ELSE floor(p.v + 0.5) END
           + coalesce((SELECT sum((b ->> 'points')::bigint) FROM jsonb_array_elements(x.e -> 'bonuses') b), 0)
           - coalesce((SELECT sum((c ->> 'cut')::bigint) FROM jsonb_array_elements(x.e -> 'caps') c), 0)
           <> a.points);
SELECT * FROM loyalty.accrual_campaign;
-- accrual.transfer_id is the purchase's journal line: same ref, member and
-- points; NULL exactly when it earned nothing; every accrual transfer has
-- its purchase (no row differs).
SELECT a.ref, a.transfer_id, t.id, t.ref AS transfer_ref
FROM loyalty.accrual a FULL JOIN (SELECT * FROM loyalty.transfer WHERE kind = 'accrual') t ON t.id = a.transfer_id
WHERE CASE WHEN t.id IS NULL THEN a.points <> 0 OR a.transfer_id IS NOT NULL
           WHEN a.ref IS NULL THEN true
           ELSE a.ref <> t.ref OR a.account_id <> t.credit_account_id OR a.points <> t.amount::bigint END;
SELECT count(*) FILTER (WHERE transfer_id IS NULL) AS earned_nothing, count(transfer_id) AS earned
FROM loyalty.accrual;

-- Idempotency: the same purchase again earns nothing more; other content is refused.
SELECT loyalty.accrue('shop', 'c1', 10.50, 'p1', '2027-01-04 10:00+00', 'books') AS replayed;
SELECT count(*) AS accrual_transfers FROM loyalty.transfer WHERE kind = 'accrual';
\set VERBOSITY default
SELECT loyalty.accrue('shop', 'c1', 11.50, 'p1', '2027-01-04 10:00+00', 'books');
\set VERBOSITY terse

-- Function API errors.
SELECT throws_ok($$SELECT loyalty.accrue('shop', NULL, 10, 'e1')$$, '22004', 'member_ref must not be null');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', NULL, 'e1')$$, '22004', 'amount must not be null');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', 10, NULL)$$, '22004', 'ref must not be null');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', 10, '')$$, '22023', 'invalid ref ""');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', -10, 'e1', '2027-02-01')$$, '22023', 'the amount -10 is negative');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'zz', 10, 'e1', '2027-02-01')$$, 'LY003', 'member "zz" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c3', 10, 'e1', '2027-02-01')$$, 'LY004', 'member "c3" of program "shop" is suspended');
SELECT throws_ok($$SELECT loyalty.accrue('nope', 'c1', 10, 'e1')$$, 'LY002', 'program "nope" does not exist');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', 10, 'e1', 'infinity')$$, '22008', 'occurred_at must be a finite time');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', 'NaN', 'e1', '2027-02-01')$$, '22023', 'the amount NaN is not a finite number');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', 'Infinity', 'e1', '2027-02-01')$$, '22023', 'the amount Infinity is not a finite number');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', 10, repeat('é', 201), '2027-02-01')$$, '22023');
SELECT throws_ok($$SELECT loyalty.refund('shop', 'e1', 'NaN')$$, '22023', 'a refund amount must be a finite number');
SELECT throws_ok($$SELECT loyalty.accrue('shop', 'c1', 1e20, 'e1', '2027-02-01')$$, '22003', 'the amount 100000000000000000000 would earn more points than can be counted');
SELECT * FROM finish();

-- Version 2 from July: 3 points per 2.00, ceil, 30 days pending, lots expire after 12 months.
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 2, "points": 3, "rounding": "ceil"},
  "pending_days": 30, "expiry": {"policy": "fixed", "after": "12 months"}}', '2027-07-01 00:00+02', 'summer') AS version;
-- Version 3 from September: round half up.
SELECT loyalty.set_earning_rules('shop', '{"base": {"rounding": "round"}}', '2027-09-01 00:00+02', 'autumn') AS version;
SELECT loyalty.accrue('shop', 'c2', 10.01, 'p20', '2027-07-02 10:00+00') AS v2_ceil_15_015;
SELECT loyalty.accrue('shop', 'c2', 10.50, 'p21', '2027-09-02 10:00+00') AS v3_round_10_5;
SELECT loyalty.accrue('shop', 'c2', 10.49, 'p22', '2027-09-02 11:00+00') AS v3_round_10_49;
SELECT ref, rule_version, points, vests_at, expires_at FROM loyalty.accrual WHERE ref IN ('p1', 'p20', 'p21') ORDER BY ref;
-- the journal lines as a member's statement reads them: those of purchases
-- still pending are deferred (docs/accrual.md), and carry their version too
SELECT t.rule_version, count(*) FROM loyalty.account a CROSS JOIN LATERAL loyalty._account_transfers(a.id) t
WHERE a.kind = 'member' AND t.kind = 'accrual' GROUP BY 1 ORDER BY 1;
SELECT count(*) AS deferred FROM loyalty.accrual WHERE transfer_id IS NULL AND points > 0;
-- pending for 30 days: not in the balance before, in it after
SELECT loyalty.balance('shop', 'c2', '2027-07-03') AS before_vesting,
       loyalty.balance('shop', 'c2', '2027-08-02') AS after_vesting;
SELECT available, pending FROM loyalty.account_summary('shop', 'c2', '2027-07-03');
-- A rule change does not alter a posted purchase.
SELECT e ->> 'rule_version' AS version, e ->> 'points' AS points, e ->> 'posted_points' AS posted
FROM loyalty.explain_accrual('shop', 'p1') e;
SELECT loyalty.explain_accrual('shop', 'p20');
SELECT loyalty.explain_accrual('shop', 'nope');
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('shop');
-- the ledger balances the member accounts
SELECT m.member_ref, a.available, a.pending,
       ((SELECT sum(l.remaining::bigint) FROM loyalty.lot l WHERE l.account_id = a.id)
        + (SELECT coalesce(sum(x.points), 0) FROM loyalty.accrual x
            WHERE x.account_id = a.id AND x.transfer_id IS NULL AND x.points > 0))::bigint::loyalty.points AS lots
FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id ORDER BY 1;

-- Simulation posts nothing: version 1 replayed over January-June gives what
-- was posted (21091); with electronics x3 instead of x2, p2 earns
-- floor(10.50 x 3 x 1.2) = 37 (+12) and p5 floor(20 x 3 x 1.5 x 2) + 100 = 280 (+60).
SELECT * FROM loyalty.simulate_accrual('shop', (SELECT rules FROM loyalty.earning_rule WHERE version = 1),
                                       '2027-01-01', '2027-07-01');
SELECT * FROM loyalty.simulate_accrual('shop', jsonb_set((SELECT rules FROM loyalty.earning_rule WHERE version = 1),
                                                         '{multipliers,0,factor}', '3'),
                                       '2027-01-01', '2027-07-01')
WHERE rule LIKE 'total%' OR rule = 'multipliers[0]';
SELECT (SELECT count(*) FROM loyalty.transfer)
       + (SELECT count(*) FROM loyalty.accrual WHERE transfer_id IS NULL AND points > 0) AS transfers_after_simulation;
SELECT * FROM loyalty.simulate_accrual('shop', '{"base": {"per": -1}}', '2027-01-01', '2027-07-01');

-- A draft can use first_purchase and birthday_month over purchases posted
-- while no version did: those did not store them, so the simulation finds
-- them again (the member's first posted purchase; the birthday month its
-- contact row holds). s1 bought twice in March, s2 once in its birthday
-- month (May): the first-purchase bonus applies twice, the birthday
-- factor once.
SELECT loyalty.create_program('sim', 'Sim', 'UTC') > 0 AS created;
SELECT loyalty.enroll('sim', 's1', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.enroll('sim', 's2', birthday => '1990-05-17', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('sim', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
SELECT loyalty.accrue('sim', 's1', 10, 's-1', '2025-03-01 10:00+00') AS earned;
SELECT loyalty.accrue('sim', 's1', 10, 's-2', '2025-03-02 10:00+00') AS earned;
SELECT loyalty.accrue('sim', 's2', 10, 's-3', '2025-05-20 10:00+00') AS earned;
SELECT * FROM loyalty.simulate_accrual('sim', '{"base": {"per": 1, "points": 1},
  "bonuses": [{"when": {"first_purchase": true}, "points": 100}, {"when": {"birthday_month": true}, "factor": 2}]}',
  '2025-01-01', '2026-01-01');

-- A points bonus of 0 adds nothing (it is not a factor of 0): z1 earns its
-- 100.
SELECT loyalty.create_program('zero', 'Zero', 'UTC') > 0 AS created;
SELECT loyalty.enroll('zero', 'z', birthday => '1990-03-10', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('zero', '{"bonuses": [{"when": {"category": ["x"]}, "points": 0}]}', '2025-01-01') AS version;
SELECT loyalty.accrue('zero', 'z', 100, 'z1', '2025-03-15 12:00+00', category => 'x') AS earned;
SELECT loyalty._accrual_breakdown(a) FROM loyalty.accrual a WHERE ref = 'z1';
-- The simulation takes purchases in the order they were posted, as the
-- budgets and caps counted them: r1 (posted first, dated later) used the
-- campaign's whole budget; replaying version 2 gives what was posted. The
-- campaign counts as applied to r1 only: r2 and r3 list it with their
-- budget cut, granting nothing.
SELECT loyalty.set_earning_rules('zero', '{"caps": {"per_purchase": 100},
  "bonuses": [{"campaign": "c", "from": "2026-01-01", "to": "2026-12-31", "points": 50, "budget": 50},
              {"when": {"birthday_month": true}, "factor": 2}]}', '2026-01-01') AS version;
SELECT loyalty.accrue('zero', 'z', 100, 'r1', '2026-03-01 12:00+00') AS earned;
SELECT loyalty.accrue('zero', 'z', 10, 'r2', '2026-03-01 10:00+00') AS earned;
-- r3 was posted outside the birthday month as it was then (April); the
-- birthday moved to April since: the version used birthday_month, so the
-- simulation keeps what the posting computed.
SELECT loyalty.accrue('zero', 'z', 10, 'r3', '2026-04-15 12:00+00') AS earned;
UPDATE loyalty.member_contact SET birthday = '1990-04-01'
WHERE member_id = (SELECT id FROM loyalty.member WHERE member_ref = 'z');
SELECT * FROM loyalty.simulate_accrual('zero', (SELECT rules FROM loyalty.earning_rule r JOIN loyalty.program p ON p.id = r.program_id
                                               WHERE p.code = 'zero' AND r.version = 2),
                                       '2026-01-01', '2027-01-01') WHERE rule LIKE 'total%' OR rule = 'bonuses[0]';

-- A purchase whose row alone gives its breakdown back does not store one
-- (docs/accrual.md, "Posting"). Two programs with the same rules, except
-- that the second has a daily cap no member reaches (a cap carries state,
-- so its purchases keep their breakdown): the same 600 purchases, posted to
-- the first through an attached table and to the second by accrue(), give
-- the same points and the same whole breakdown, rebuilt in the first,
-- stored in the second (no row differs). The rebuilt day and weekday are
-- New York's, not UTC's.
SELECT loyalty.create_program(code, code, 'America/New_York') > 0 AS created FROM (VALUES ('rb_a'), ('rb_b')) v(code);
SELECT count(loyalty.enroll(code, 'm' || i, occurred_at => '2027-01-01')) AS enrolled
FROM (VALUES ('rb_a'), ('rb_b')) v(code), generate_series(1, 5) i;
SELECT loyalty.set_earning_rules(code, '{
  "base": {"per": 2.5, "points": 3, "rounding": "ceil"},
  "exclude": {"store": ["outlet"]},
  "multipliers": [{"when": {"category": ["electronics", "toys"]}, "factor": 1.75},
                  {"when": {"weekday": [6, 7]}, "factor": 2},
                  {"when": {"channel": ["app"], "store": ["paris"]}, "factor": 1.1}],
  "bonuses": [{"when": {"category": ["books"]}, "points": 7},
              {"when": {"channel": ["web"]}, "factor": 1.3},
              {"campaign": "spring", "from": "2027-03-01", "to": "2027-03-31", "points": 25}],
  "min_amount": 3}'::jsonb || caps::jsonb, '2027-01-01') AS version
FROM (VALUES ('rb_a', '{"caps": {"per_purchase": 400}}'),
             ('rb_b', '{"caps": {"per_purchase": 400, "per_member_per_day": 1000000000}}')) v(code, caps);
CREATE TABLE public.rb_orders (id text PRIMARY KEY, customer text, total numeric(12,2), placed_at timestamptz,
                               category text, channel text, store text);
SELECT loyalty.attach_accrual('public.rb_orders', 'rb_a', 'customer', 'total', 'id', 'placed_at',
                              'category', 'channel', 'store');
CREATE TEMP TABLE rb_src AS
SELECT 'rb' || i AS id, 'm' || (1 + i % 5) AS customer, ((i * 7919) % 40000) / 100.0 AS total,
       '2027-02-20 02:00+00'::timestamptz + i * interval '97 minutes' AS placed_at,
       (ARRAY['books', 'electronics', 'toys', 'food', NULL])[1 + i % 5] AS category,
       (ARRAY['app', 'web', 'store', NULL])[1 + i % 4] AS channel,
       (ARRAY['paris', 'outlet', 'lyon', NULL, 'paris', 'lyon', 'nice'])[1 + i % 7] AS store
FROM generate_series(1, 600) i;
INSERT INTO public.rb_orders SELECT * FROM rb_src;
SELECT sum(loyalty.accrue('rb_b', customer, total, id, placed_at, category, channel, store)) AS points_b FROM rb_src;
SELECT p.code, count(*) AS purchases, count(a.breakdown) AS stored, sum(a.points) AS points
FROM loyalty.accrual a JOIN loyalty.program p ON p.id = a.program_id WHERE p.code IN ('rb_a', 'rb_b')
GROUP BY 1 ORDER BY 1;
SELECT a.ref, a.points, b.points, loyalty._accrual_breakdown(a) AS rebuilt, loyalty._accrual_breakdown(b) AS stored
FROM loyalty.accrual a JOIN loyalty.accrual b ON b.ref = a.ref
WHERE a.program_id = (SELECT id FROM loyalty.program WHERE code = 'rb_a')
  AND b.program_id = (SELECT id FROM loyalty.program WHERE code = 'rb_b')
  AND (a.points <> b.points OR loyalty._accrual_breakdown(a) <> loyalty._accrual_breakdown(b));
-- what the purchases went through: every kind of step, many times
SELECT count(*) FILTER (WHERE e ? 'excluded') AS excluded, count(*) FILTER (WHERE e ? 'below_min_amount') AS below_min,
       count(*) FILTER (WHERE jsonb_array_length(e -> 'multipliers') > 1) AS several_factors,
       count(*) FILTER (WHERE e -> 'bonuses' @> '[{"rule": "bonuses[0]"}]') AS books_bonus,
       count(*) FILTER (WHERE e -> 'bonuses' @> '[{"campaign": "spring"}]') AS campaign,
       count(*) FILTER (WHERE jsonb_array_length(e -> 'caps') > 0) AS capped,
       count(DISTINCT e #> '{context,weekday}') AS weekdays
FROM loyalty.accrual a CROSS JOIN LATERAL (SELECT loyalty._accrual_breakdown(a) AS e) x
WHERE a.program_id = (SELECT id FROM loyalty.program WHERE code = 'rb_a');
-- The first purchase that earned on a day of the week other than UTC's:
-- its weekday is New York's.
SELECT a.ref, a.occurred_at, loyalty.explain_accrual('rb_a', a.ref) #> '{context,weekday}' AS weekday,
       loyalty.explain_accrual('rb_a', a.ref) -> 'multipliers' AS multipliers
FROM loyalty.accrual a
WHERE a.program_id = (SELECT id FROM loyalty.program WHERE code = 'rb_a') AND a.points > 0
  AND extract(isodow FROM a.occurred_at AT TIME ZONE 'UTC') <> extract(isodow FROM a.occurred_at AT TIME ZONE 'America/New_York')
ORDER BY a.id LIMIT 1;
-- The row does not have the member's tier: a purchase by a member with one
-- stores its breakdown (so does a first purchase or a birthday month that
-- the rules reward: p1 and p6 above).
UPDATE loyalty.member SET tier = 'silver' WHERE member_ref = 'm1'
   AND program_id = (SELECT id FROM loyalty.program WHERE code = 'rb_a');
INSERT INTO public.rb_orders VALUES ('rb-tier', 'm1', 10, '2027-06-01 12:00+00', NULL, NULL, NULL);
SELECT breakdown FROM loyalty.accrual WHERE ref = 'rb-tier';
-- A row changed by hand no longer gives its points: explaining it fails
-- rather than explain something else (XX001), and so does a version that
-- keeps breakdowns when the row has none.
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    s text; m text; d text;
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN others THEN
    GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL;
    RETURN s || ' ' || m || ' | ' || d;
END $$;
BEGIN;
UPDATE loyalty.accrual SET points = points + 1
WHERE ref = 'rb2' AND program_id = (SELECT id FROM loyalty.program WHERE code = 'rb_a');
SELECT pg_temp.try($$SELECT loyalty.explain_accrual('rb_a', 'rb2')$$);
ROLLBACK;
BEGIN;
UPDATE loyalty.accrual SET breakdown = NULL
WHERE ref = 'rb2' AND program_id = (SELECT id FROM loyalty.program WHERE code = 'rb_b');
SELECT pg_temp.try($$SELECT loyalty.explain_accrual('rb_b', 'rb2')$$);
ROLLBACK;
SELECT loyalty.explain_accrual('rb_a', 'rb2') ->> 'points' AS rb2_points;

-- Every purchase's day is its local date in its program's time zone, the
-- days of a change of the clocks included (New York: 2027-03-14 and
-- 2027-11-07, rows every 17 minutes across them, one statement; the
-- posting keeps the last date it converted for the rest of that day).
INSERT INTO public.rb_orders
SELECT 'dst' || k || '-' || i, 'm' || (2 + i % 4), 10, t0 + i * interval '17 minutes', 'food', NULL, NULL
FROM (VALUES (1, '2027-03-13 00:00+00'::timestamptz), (2, '2027-11-06 00:00+00')) v(k, t0),
     generate_series(0, 250) i;
SELECT count(*) AS dst_purchases, count(DISTINCT a.day) AS days FROM loyalty.accrual a WHERE a.ref LIKE 'dst%';
SELECT a.ref, a.occurred_at, a.day, (a.occurred_at AT TIME ZONE p.time_zone)::date AS local_date
FROM loyalty.accrual a JOIN loyalty.program p ON p.id = a.program_id
WHERE a.day <> (a.occurred_at AT TIME ZONE p.time_zone)::date;

-- An amount as the rules see it (loyalty._amount_double, which reads the
-- numeric's digits where it can) is the double nearest its value, the one
-- numeric's own cast to float8 gives: amounts of every scale up to 12
-- decimals, large and tiny, negative, and around 2^53 (no value differs).
SELECT count(*) AS amounts, count(*) FILTER (WHERE loyalty._amount_double(x) IS DISTINCT FROM x::float8) AS differ,
       count(DISTINCT scale(x)) AS scales
FROM (SELECT round((i::bigint * 7919 % 1000003)::numeric / 10 ^ (i % 13)::numeric, i % 13) * (1 - 2 * (i % 2)) AS x
      FROM generate_series(1, 100000) i
      UNION ALL
      SELECT (i::bigint * 104729)::numeric * 10 ^ (i % 22)::numeric FROM generate_series(1, 20000) i
      UNION ALL
      SELECT 9007199254740992::numeric + d FROM generate_series(-3, 3) d
      UNION ALL
      SELECT 900719925474099.2::numeric + d / 10.0 FROM generate_series(-3, 3) d
      UNION ALL
      SELECT v FROM unnest('{0, 0.1, 0.3, 0.0001, 1e-20, 123456789012.3456, 99999999999999999999.99,
                            1e16, 10000000000000001, 0.00000000000000000001, 4503599627370496.5}'::numeric[]) v) s;
SELECT loyalty._amount_double(10.5) AS a, loyalty._amount_double(-0.0001) AS b, loyalty._amount_double(NULL) AS c;
