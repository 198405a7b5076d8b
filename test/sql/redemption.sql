SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
SELECT * FROM no_plan();
\pset null '(null)'

-- A program with a fixed expiry (100 years, so that balances now are not 0), three members.
SELECT loyalty.create_program('shop', 'Shop', 'UTC', '{"expiry": {"policy": "fixed", "after": "100 years"}}') > 0 AS program;
SELECT loyalty.enroll('shop', m, occurred_at => '2025-01-01') > 0 AS enrolled FROM unnest(ARRAY['ann', 'ben', 'cat']) m;
SELECT loyalty.earn('shop', 'ann', 500, 'e-ann-1', occurred_at => '2025-03-01') > 0 AS earned;
SELECT loyalty.earn('shop', 'ann', 500, 'e-ann-2', occurred_at => '2025-01-15') > 0 AS earned;
SELECT loyalty.earn('shop', 'ben', 100, 'e-ben-1', occurred_at => '2025-01-15') > 0 AS earned;

-- ---- catalogue ----
SELECT loyalty.add_reward('shop', 'mug', 'A mug', 300, '{"stock": 2, "limit": {"count": 3, "period": "1 month"}}') AS version;
SELECT loyalty.add_reward('shop', 'mug', 'A mug', 300, '{"stock": 2, "limit": {"count": 3, "period": "1 month"}}') AS same_again;
SELECT loyalty.add_reward('shop', 'tee', 'A tee-shirt', 50, '{"valid_from": "2025-02-01", "valid_until": "2025-03-01"}') AS version;
SELECT loyalty.add_reward('shop', 'vip', 'VIP lounge', 10, '{"min_tier": "gold"}') AS version;
SELECT loyalty.add_reward('shop', 'pen', 'A pen', 10, '{"limit": {"count": 2}}') AS version;
SELECT throws_ok($$SELECT loyalty.add_reward('nope', 'x', 'X', 1)$$, 'LY002', 'program "nope" does not exist');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'bad code', 'X', 1)$$, '22023', 'invalid reward code "bad code"');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', ' ', 1)$$, '22023', 'reward name must not be empty');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 0)$$, '22023', 'cost must be positive');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', NULL)$$, '22004', 'program, code, name, cost and options must not be null');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '[]')$$, '22023', 'invalid reward options');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"colour": 1}')$$, '22023', 'invalid reward options');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"kind": "car"}')$$, '22023', 'invalid reward options');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"stock": -1}')$$, '22023', 'invalid reward options');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"valid_from": "soon"}')$$, '22023', 'invalid reward options');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"valid_from": "2025-02-01", "valid_until": "2025-01-01"}')$$, '22023', 'invalid reward options');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"limit": {"count": 0}}')$$, '22023', 'invalid reward options');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"limit": {"count": 1, "period": "never"}}')$$, '22023', 'invalid reward options');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"voucher_valid_for": "1 month"}')$$, '22023', 'invalid reward options');
SELECT throws_ok($$SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"kind": "donation", "charity": "Nobody"}')$$, 'LY042', 'charity "Nobody" does not exist in program "shop"');
-- the path of the problem is in DETAIL
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"limit": {"count": 1, "period": "never"}}');
SELECT loyalty.add_reward('shop', 'x', 'X', 1, '{"stock": 1.5}');
\set VERBOSITY terse
SELECT program, reward, name, kind, cost, version, stock_left, min_tier, valid_from, valid_until, limit_count, limit_period
FROM loyalty.catalogue ORDER BY reward;

-- ---- redeem: every restriction ----
SELECT throws_ok($$SELECT loyalty.redeem('nope', 'ann', 'mug', 'x')$$, 'LY002', 'program "nope" does not exist');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'zed', 'mug', 'x')$$, 'LY003', 'member "zed" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'car', 'x')$$, 'LY030', 'reward "car" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'mug', '')$$, '22023', 'invalid ref ""');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'mug', NULL)$$, '22004', 'ref must not be null');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'mug', 'x', 0)$$, '22023', 'invalid quantity 0');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'tee', 'x', 1, '2025-01-31 23:59')$$, 'LY031', 'reward "tee" is not available at 2025-01-31 23:59:00+00');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'tee', 'x', 1, '2025-03-01')$$, 'LY031', 'reward "tee" is not available at 2025-03-01 00:00:00+00');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'vip', 'x', 1, '2025-03-01')$$, 'LY033', 'reward "vip" needs tier "gold" or above');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ben', 'mug', 'x', 1, '2025-03-01')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'mug', 'x', 3, '2025-03-01')$$, 'LY032', 'reward "mug" is out of stock');
UPDATE loyalty.member SET tier = 'gold' WHERE member_ref = 'ann';
UPDATE loyalty.member SET status = 'suspended' WHERE member_ref = 'cat';
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'cat', 'pen', 'x', 1, '2025-03-01')$$, 'LY004', 'member "cat" of program "shop" is suspended');

-- A redemption consumes the earliest-expiring lots first: the January lot.
SELECT * FROM loyalty.redeem('shop', 'ann', 'mug', 'r1', 1, '2025-03-02');
SELECT l.occurred_at, l.amount, l.remaining, l.expires_at FROM loyalty.lot l
JOIN loyalty.account a ON a.id = l.account_id JOIN loyalty.member m ON m.id = a.member_id
WHERE m.member_ref = 'ann' ORDER BY l.id;
-- idempotent on ref; the same ref with other content is refused
SELECT * FROM loyalty.redeem('shop', 'ann', 'mug', 'r1', 1, '2025-03-02');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'mug', 'r1', 2, '2025-03-02')$$, '23505', 'ref "r1" was already used for a different redemption');
SELECT * FROM loyalty.redeem('shop', 'ann', 'tee', 'r2', 2, '2025-02-15');
SELECT * FROM loyalty.redeem('shop', 'ann', 'vip', 'r3', 1, '2025-03-02');
SELECT * FROM loyalty.redeem('shop', 'ann', 'pen', 'r4', 2, '2025-03-02');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'pen', 'x', 1, '2025-03-02')$$, 'LY034', 'member "ann" has reached the limit of reward "pen"');
-- the mug's limit is per month: 1 redeemed, 2 more allowed, but 1 in stock
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'mug', 'x', 3, '2025-03-02')$$, 'LY034', 'member "ann" has reached the limit of reward "mug"');
SELECT loyalty.earn('shop', 'ann', 200, 'e-ann-3', occurred_at => '2025-03-02') > 0 AS earned;
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ann', 'mug', 'x', 2, '2025-03-02')$$, 'LY032', 'reward "mug" is out of stock');
SELECT loyalty.balance('shop', 'ann', '2025-03-02');

-- ---- versions: a redemption records the version and the cost it paid ----
SELECT loyalty.add_reward('shop', 'pen', 'A better pen', 20, '{"limit": {"count": 2}}') AS version;
SELECT rw.code, r.ref, r.reward_version, r.cost, r.quantity, r.points
FROM loyalty.redemption r JOIN loyalty.reward rw ON rw.id = r.reward_id ORDER BY r.id;
SELECT rv.version, rv.name, rv.cost FROM loyalty.reward_version rv
JOIN loyalty.reward rw ON rw.id = rv.reward_id WHERE rw.code = 'pen' ORDER BY 1;
-- a new version without stock makes the reward unlimited; with stock, sets what is left
SELECT loyalty.add_reward('shop', 'mug', 'A mug', 250, '{"stock": 5}') AS version;
SELECT reward, cost, version, stock_left FROM loyalty.catalogue WHERE reward = 'mug';

-- ---- holds: reserve, capture part, release, expire ----
SELECT loyalty.earn('shop', 'ben', 400, 'e-ben-2', occurred_at => '2025-03-01') > 0 AS earned;
SELECT loyalty.balance('shop', 'ben') AS ben_before;
SELECT loyalty.hold('shop', 'ben', 300, 'h1', '15 minutes', '2025-04-01 12:00') > 0 AS held;
SELECT loyalty.hold('shop', 'ben', 300, 'h1', '15 minutes', '2025-04-01 12:00') = loyalty.hold('shop', 'ben', 300, 'h1') AS same_hold;
SELECT loyalty.balance('shop', 'ben') AS ben_during, (SELECT held FROM loyalty.account_summary('shop', 'ben')) AS held;
-- held points are not available, to a redemption nor to another hold
SELECT throws_ok($$SELECT loyalty.hold('shop', 'ben', 201, 'h2', '15 minutes', '2025-04-01 12:00')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'ben', 'mug', 'x', 1, '2025-04-01 12:00')$$, 'LY001', 'insufficient points');
-- the ledger's debit path says how much is held
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT loyalty.redeem('shop', 'ben', 'mug', 'x', 1, '2025-04-01 12:00');
SELECT loyalty.transfer_points('shop', 'ben', 'ann', 250, 'x', '2025-04-01 12:00');
SELECT loyalty.hold('shop', 'ben', 201, 'h2', '15 minutes', '2025-04-01 12:00');
\set VERBOSITY terse
SELECT throws_ok($$SELECT loyalty.hold('shop', 'ben', 301, 'h1')$$, '23505', 'ref "h1" was already used for a different hold');
SELECT throws_ok($$SELECT loyalty.hold('shop', 'ben', 0, 'x')$$, '22023', 'points must be positive');
SELECT throws_ok($$SELECT loyalty.hold('shop', 'ben', 1, 'x', '0 minutes')$$, '22023', 'invalid hold ttl 00:00:00');
SELECT throws_ok($$SELECT loyalty.hold('shop', 'ben', 1, 'x', '8 days')$$, '22023', 'invalid hold ttl 8 days');
SELECT throws_ok($$SELECT loyalty.capture('shop', 'nope')$$, 'LY035', 'hold "nope" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.capture('shop', 'h1', 301, '2025-04-01 12:05')$$, '22023', 'cannot capture more than the hold');
SELECT throws_ok($$SELECT loyalty.capture('shop', 'h1', 0, '2025-04-01 12:05')$$, '22023', 'points must be positive');
SELECT throws_ok($$SELECT loyalty.capture('shop', 'h1', 100, '2025-04-01 12:15')$$, 'LY037', 'hold "h1" has expired');
-- capture part: 120 posted, the other 180 back
SELECT loyalty.capture('shop', 'h1', 120, '2025-04-01 12:05') > 0 AS captured;
SELECT loyalty.capture('shop', 'h1', 120, '2025-04-01 12:06') = loyalty.capture('shop', 'h1') AS same_capture;
SELECT throws_ok($$SELECT loyalty.capture('shop', 'h1', 121)$$, '23505', 'hold "h1" was already captured with a different amount');
SELECT throws_ok($$SELECT loyalty.release('shop', 'h1')$$, 'LY036', 'hold "h1" was already captured');
SELECT loyalty.balance('shop', 'ben') AS ben_after, (SELECT held FROM loyalty.account_summary('shop', 'ben')) AS held;
-- release, twice
SELECT loyalty.hold('shop', 'ben', 100, 'h2', '15 minutes', '2025-04-02') > 0 AS held;
SELECT loyalty.release('shop', 'h2'), loyalty.release('shop', 'h2');
SELECT throws_ok($$SELECT loyalty.capture('shop', 'h2')$$, 'LY036', 'hold "h2" was already released');
-- the release_holds handler: at most batch_size, only past their TTL, idempotent
SELECT loyalty.hold('shop', 'ben', 10, 'h3', '10 minutes', '2025-04-03 10:00') > 0 AS held;
SELECT loyalty.hold('shop', 'ben', 20, 'h4', '20 minutes', '2025-04-03 10:00') > 0 AS held;
SELECT loyalty.hold('shop', 'ann', 30, 'h5', '30 minutes', '2025-04-03 10:00') > 0 AS held;
SELECT loyalty.hold('shop', 'ann', 40, 'h6', '1 hour', '2025-04-03 10:00') > 0 AS held;
SELECT * FROM loyalty._job_release_holds('2025-04-03 10:09', 10);
SELECT * FROM loyalty._job_release_holds('2025-04-03 10:40', 2);
SELECT * FROM loyalty._job_release_holds('2025-04-03 10:40', 2);
SELECT * FROM loyalty._job_release_holds('2025-04-03 10:40', 2);
SELECT ref, amount, expires_at, state, captured FROM loyalty.hold ORDER BY id;
SELECT throws_ok($$SELECT loyalty.capture('shop', 'h3')$$, 'LY036', 'hold "h3" was already expired');
SELECT loyalty.release('shop', 'h4');
SELECT m.member_ref, a.held FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id ORDER BY 1;
-- account.held equals the sum of the active holds
SELECT is((SELECT sum(amount::bigint) FROM loyalty.hold WHERE state = 'active'),
          (SELECT sum(held::bigint) FROM loyalty.account), 'held is the sum of active holds');

-- ---- cancellation restores the exact lots, with their expiry, and the stock ----
SELECT loyalty.add_reward('shop', 'cap', 'A cap', 600, '{"stock": 1}') AS version;
UPDATE loyalty.member SET status = 'active' WHERE member_ref = 'cat';
SELECT loyalty.earn('shop', 'cat', 700, 'e-cat-1', occurred_at => '2025-01-10') > 0 AS earned;
SELECT loyalty.earn('shop', 'cat', 300, 'e-cat-2', occurred_at => '2025-02-10') > 0 AS earned;
SELECT points FROM loyalty.redeem('shop', 'cat', 'cap', 'r-cat', 1, '2025-03-01');
SELECT l.amount, l.remaining, l.expires_at FROM loyalty.lot l JOIN loyalty.account a ON a.id = l.account_id
JOIN loyalty.member m ON m.id = a.member_id WHERE m.member_ref = 'cat' ORDER BY l.id;
SELECT reward, stock_left FROM loyalty.catalogue WHERE reward = 'cap';
SELECT loyalty.cancel_redemption('shop', 'r-cat') = loyalty.cancel_redemption('shop', 'r-cat') AS idempotent;
SELECT l.amount, l.remaining, l.expires_at FROM loyalty.lot l JOIN loyalty.account a ON a.id = l.account_id
JOIN loyalty.member m ON m.id = a.member_id WHERE m.member_ref = 'cat' ORDER BY l.id;
SELECT reward, stock_left FROM loyalty.catalogue WHERE reward = 'cap';
SELECT ref, state FROM loyalty.redemption WHERE ref = 'r-cat';
SELECT throws_ok($$SELECT loyalty.cancel_redemption('shop', 'nope')$$, 'LY043', 'redemption "nope" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.cancel_redemption('shop', 'h2')$$, 'LY043', 'redemption "h2" does not exist in program "shop"');
-- a checkout is cancelled the same way, by the hold's ref: the capture's lots come back
SELECT loyalty.balance('shop', 'ben') AS ben_before;
SELECT u.lot_id = l.id AS same_lot, u.amount FROM loyalty.lot_use u JOIN loyalty.transfer t ON t.id = u.transfer_id
JOIN loyalty.lot l ON l.id = u.lot_id WHERE t.kind = 'capture' AND t.ref = 'h1' ORDER BY u.lot_id;
SELECT loyalty.cancel_redemption('shop', 'h1') = loyalty.cancel_redemption('shop', 'h1') AS idempotent;
SELECT loyalty.balance('shop', 'ben') AS ben_after;
SELECT t.kind, t.amount, u.amount AS lot_amount, l.expires_at FROM loyalty.transfer t
JOIN loyalty.lot_use u ON u.transfer_id = t.id JOIN loyalty.lot l ON l.id = u.lot_id
WHERE t.ref = 'h1' ORDER BY t.id, u.lot_id;
SELECT state, captured, cancel_transfer_id IS NOT NULL AS cancelled FROM loyalty.hold WHERE ref = 'h1';
-- a cancelled redemption frees the stock and no longer counts toward limits
-- (a redemption dated after the cancel: on 2025-03-02 the 600 points were
-- still spent, and one dated then is refused)
SELECT throws_ok($$SELECT loyalty.redeem('shop', 'cat', 'cap', 'r-cat-2', 1, '2025-03-02')$$, 'LY001', 'insufficient points');
SELECT points FROM loyalty.redeem('shop', 'cat', 'cap', 'r-cat-2', 1);

-- ---- donations ----
SELECT loyalty.add_charity('shop', 'Red Cross') = loyalty.add_charity('shop', 'Red Cross') AS idempotent;
SELECT throws_ok($$SELECT loyalty.add_charity('shop', ' ')$$, '22023', 'invalid charity name " "');
SELECT throws_ok($$SELECT loyalty.donate('shop', 'ben', 'Nobody', 10, 'd1')$$, 'LY042', 'charity "Nobody" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.donate('shop', 'ben', '', 10, 'd1')$$, 'LY042', 'charity "" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.donate('shop', 'ben', 'Red Cross', 100000, 'd1')$$, 'LY001', 'insufficient points');
SELECT loyalty.donate('shop', 'ben', 'Red Cross', 30, 'd1', '2025-04-05') = loyalty.donate('shop', 'ben', 'Red Cross', 30, 'd1') AS idempotent;
SELECT throws_ok($$SELECT loyalty.donate('shop', 'ben', 'Red Cross', 31, 'd1')$$, '23505', 'ref "d1" was already used for a different donate');
-- a donation reward gives to its charity
SELECT loyalty.add_reward('shop', 'tree', 'Plant a tree', 25, '{"kind": "donation", "charity": "Red Cross"}') AS version;
SELECT points FROM loyalty.redeem('shop', 'ben', 'tree', 'r-tree', 1, '2025-04-05');
SELECT a.name, sum(t.amount::bigint) AS received FROM loyalty.transfer t JOIN loyalty.account a ON a.id = t.credit_account_id
WHERE a.kind = 'donation' GROUP BY a.name;

-- ---- transfers between members ----
SELECT throws_ok($$SELECT loyalty.transfer_points('shop', 'ben', 'ben', 10, 't1')$$, '22023', 'cannot transfer points to the same member');
SELECT throws_ok($$SELECT loyalty.transfer_points('shop', 'ben', 'zed', 10, 't1')$$, 'LY003', 'member "zed" does not exist in program "shop"');
SELECT throws_ok($$SELECT loyalty.transfer_points('shop', 'ben', 'ann', -1, 't1')$$, '22023', 'points must be positive');
SELECT throws_ok($$SELECT loyalty.transfer_points('shop', 'ben', 'ann', 100000, 't1')$$, 'LY001', 'insufficient points');
SELECT loyalty.balance('shop', 'ben', '2025-04-06') AS ben, loyalty.balance('shop', 'ann', '2025-04-06') AS ann;
SELECT loyalty.transfer_points('shop', 'ben', 'ann', 60, 't1', '2025-04-06') = loyalty.transfer_points('shop', 'ben', 'ann', 60, 't1') AS idempotent;
SELECT loyalty.balance('shop', 'ben', '2025-04-06') AS ben, loyalty.balance('shop', 'ann', '2025-04-06') AS ann;
-- ann's new lot expires when the ben lot it came from does (2125-01-15: his January lot, which the
-- cancelled capture gave back), not 100 years after the transfer
SELECT l.amount, l.expires_at FROM loyalty.lot l JOIN loyalty.transfer t ON t.id = l.transfer_id WHERE t.ref = 't1';

-- ---- ratings ----
SELECT throws_ok($$SELECT loyalty.rate_reward('shop', 'ben', 'mug', 5)$$, 'LY045', 'member "ben" has not redeemed reward "mug"');
SELECT throws_ok($$SELECT loyalty.rate_reward('shop', 'ann', 'mug', 6)$$, '22023', 'invalid rating 6');
SELECT throws_ok($$SELECT loyalty.rate_reward('shop', 'ann', 'mug', NULL)$$, '22023', 'invalid rating NULL');
SELECT throws_ok($$SELECT loyalty.rate_reward('shop', 'ann', 'car', 3)$$, 'LY030', 'reward "car" does not exist in program "shop"');
SELECT loyalty.rate_reward('shop', 'ann', 'mug', 2, 'chipped');
SELECT loyalty.rate_reward('shop', 'ann', 'mug', 4, 'replaced, fine now');
SELECT loyalty.rate_reward('shop', 'ben', 'tree', 5);
SELECT reward, rating_avg, rating_count FROM loyalty.catalogue ORDER BY reward;
SELECT stars, comment FROM loyalty.reward_rating ORDER BY reward_id, member_id;

-- ---- a rolling policy: points lapsed by inactivity cannot be held or redeemed ----
SELECT loyalty.create_program('roll', 'Roll', 'UTC', '{"expiry": {"policy": "rolling", "inactivity": "30 days"}}') > 0 AS program;
SELECT loyalty.enroll('roll', 'dan', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.earn('roll', 'dan', 100, 'e-dan', occurred_at => '2025-01-01') > 0 AS earned;
SELECT loyalty.add_reward('roll', 'pen', 'A pen', 10) AS version;
SELECT throws_ok($$SELECT loyalty.hold('roll', 'dan', 10, 'h-late', '15 minutes', '2025-03-01')$$, 'LY001', 'insufficient points');
SELECT throws_ok($$SELECT loyalty.redeem('roll', 'dan', 'pen', 'r-late', 1, '2025-03-01')$$, 'LY001', 'insufficient points');
SELECT loyalty.hold('roll', 'dan', 10, 'h-early', '15 minutes', '2025-01-20') > 0 AS held;
SELECT points FROM loyalty.redeem('roll', 'dan', 'pen', 'r-early', 1, '2025-01-20');

-- ---- a redemption dated in the future, cancelled now ----
-- The reversal is dated at the redemption's own time, not now: dated now,
-- the lots would count as restored before they were used, and balance()
-- showed the points twice until that date (130 instead of 100 below).
SELECT loyalty.create_program('later', 'Later', 'UTC') > 0 AS program;
SELECT loyalty.enroll('later', 'eve', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.earn('later', 'eve', 100, 'e-eve', occurred_at => '2025-01-01') > 0 AS earned;
SELECT loyalty.add_reward('later', 'cap', 'A cap', 30) AS version;
SELECT points FROM loyalty.redeem('later', 'eve', 'cap', 'r-future', 1, now() + interval '10 days');
SELECT loyalty.balance('later', 'eve') AS now_before_cancel,
       loyalty.balance('later', 'eve', now() + interval '20 days') AS after_redemption;
SELECT loyalty.cancel_redemption('later', 'r-future') > 0 AS cancelled;
SELECT loyalty.balance('later', 'eve') AS now_after_cancel,
       loyalty.balance('later', 'eve', now() + interval '5 days') AS before_its_date,
       loyalty.balance('later', 'eve', now() + interval '20 days') AS after_its_date;
SELECT kind, points, balance, occurred_at = (SELECT occurred_at FROM loyalty.transfer WHERE kind = 'redeem' AND ref = 'r-future') AS at_its_date
FROM loyalty.statement('later', 'eve') ORDER BY transfer_id;

-- ---- a redemption cancelled after the lot it spent has expired ----
-- The cancel gives 30 points back to a lot past its expiry: they come back
-- expired and go to breakage at once, dated at the cancel. What the lot had
-- left at its expiry (70) still expires then, by the job. Dated otherwise,
-- the statement went to -30 (all at the expiry), or stayed at 70 until the
-- cancel (all at the cancel) where balance() said 0.
SELECT loyalty.create_program('refill', 'Refill', 'UTC', '{"expiry": {"policy": "fixed", "after": "30 days"}}') > 0 AS program;
SELECT loyalty.enroll('refill', 'fay', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.earn('refill', 'fay', 100, 'e-fay', occurred_at => now() - interval '40 days') > 0 AS earned;
SELECT loyalty.add_reward('refill', 'pin', 'A pin', 30) AS version;
SELECT points FROM loyalty.redeem('refill', 'fay', 'pin', 'r-fay', 1, now() - interval '35 days');
SELECT loyalty.cancel_redemption('refill', 'r-fay') > 0 AS cancelled;
SELECT loyalty.cancel_redemption('refill', 'r-fay') = (SELECT cancel_transfer_id FROM loyalty.redemption WHERE ref = 'r-fay')
       AS cancel_is_idempotent;
SELECT count(*) AS expired_at_cancel FROM loyalty.transfer t
WHERE t.kind = 'expire' AND t.program_id = (SELECT id FROM loyalty.program WHERE code = 'refill');
SELECT count(*) AS lots_expired FROM loyalty.run_job('expire') WHERE rows > 0;
SELECT kind, points, balance,
       occurred_at = (SELECT occurred_at FROM loyalty.transfer WHERE kind = 'redeem_cancel' AND ref = 'r-fay') AS at_cancel,
       occurred_at = (SELECT expires_at FROM loyalty.lot WHERE transfer_id =
                        (SELECT id FROM loyalty.transfer WHERE kind = 'earn' AND ref = 'e-fay')) AS at_expiry
FROM loyalty.statement('refill', 'fay');
SELECT loyalty.balance('refill', 'fay', now() - interval '5 days') AS balance_before_cancel,
       (SELECT balance FROM loyalty.statement('refill', 'fay', to_ts => now() - interval '5 days')
        ORDER BY occurred_at DESC, transfer_id DESC LIMIT 1) AS statement_before_cancel;

-- ---- a debit dated before a cancel cannot spend what the cancel gave back ----
-- 30 earned 30 days ago, spent 20 days ago, the redemption cancelled now:
-- 10 days ago the member had nothing, and a redemption dated then is
-- refused (it was accepted, and the statement ran at -30 until now).
SELECT loyalty.create_program('back', 'Back', 'UTC') > 0 AS program;
SELECT loyalty.enroll('back', 'gus', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.earn('back', 'gus', 30, 'e-gus', occurred_at => now() - interval '30 days') > 0 AS earned;
SELECT loyalty.add_reward('back', 'pin', 'A pin', 30) AS version;
SELECT points FROM loyalty.redeem('back', 'gus', 'pin', 'r-gus1', 1, now() - interval '20 days');
SELECT loyalty.cancel_redemption('back', 'r-gus1') > 0 AS cancelled;
SELECT throws_ok($$SELECT loyalty.redeem('back', 'gus', 'pin', 'r-gus2', 1, now() - interval '10 days')$$,
                 'LY001', 'insufficient points', 'a debit dated before a cancel cannot spend what it gave back');
SELECT points FROM loyalty.redeem('back', 'gus', 'pin', 'r-gus3', 1);
SELECT min(balance) AS lowest FROM loyalty.statement('back', 'gus');

-- ---- the books ----
SELECT * FROM loyalty.verify_chain('shop');
-- every member's posted balance is the sum of its lots, and nothing is negative
SELECT is((SELECT count(*) FROM loyalty.account a
           WHERE a.kind = 'member' AND (a.available::bigint + a.pending::bigint) IS DISTINCT FROM
                 (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l WHERE l.account_id = a.id)),
          0::bigint, 'member balances equal their lots');
SELECT k.kind, k.class FROM loyalty.transfer_kind k ORDER BY 1;
SELECT * FROM finish();
