-- The ledger: programs, members, earn, adjust, balances, statements, the
-- append-only journal and its hash chain.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';
-- the points operators live in schema loyalty (docs/points.md)
SET search_path = public, loyalty;
SELECT * FROM no_plan();

-- ---- programs ----
SELECT is(loyalty.create_program('shop', 'The Shop', 'Europe/Paris',
          '{"expiry": {"policy": "fixed", "after": "12 months", "notice": "30 days"}}'), 1::bigint,
          'create_program returns the id');
SELECT is(loyalty.create_program('shop', 'The Shop', 'Europe/Paris',
          '{"expiry": {"policy": "fixed", "after": "12 months", "notice": "30 days"}}'), 1::bigint,
          'create_program again with the same settings returns the same id');
SELECT results_eq($$SELECT kind FROM loyalty.account WHERE program_id = 1 ORDER BY kind$$,
                  ARRAY['adjustment', 'breakage', 'donation', 'issuance', 'redemption'],
                  'a program has its five system accounts');
SELECT throws_ok($$SELECT loyalty.create_program('shop', 'Other', 'UTC')$$, '23505',
                 'program "shop" already exists with other settings', 'same code, other settings');
SELECT throws_ok($$SELECT loyalty.create_program('bad code', 'x')$$, '22023', 'invalid program code "bad code"', 'code with a space');
SELECT throws_ok($$SELECT loyalty.create_program('', 'x')$$, '22023', 'invalid program code ""', 'empty code');
SELECT throws_ok($$SELECT loyalty.create_program('-x', 'x')$$, '22023', 'invalid program code "-x"', 'code starting with a dash');
SELECT throws_ok($$SELECT loyalty.create_program('p1', ' ')$$, '22023', 'program name must not be empty', 'blank name');
SELECT throws_ok($$SELECT loyalty.create_program(NULL, 'x')$$, '22004', 'code, name, time_zone and options must not be null', 'null code');
SELECT throws_ok($$SELECT loyalty.create_program('p1', 'x', 'Mars/Olympus')$$, '22023', 'time zone "Mars/Olympus" not recognized', 'unknown time zone');
SELECT throws_ok($$SELECT loyalty.create_program('p1', 'x', 'UTC', '[]')$$, '22023', 'invalid program options', 'options not an object');

-- every bad option names its JSON path in DETAIL
CREATE FUNCTION pg_temp.option_error(opts jsonb) RETURNS text LANGUAGE plpgsql AS $$
DECLARE d text; s text;
BEGIN
    PERFORM loyalty.create_program('p1', 'x', 'UTC', opts);
    RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL, s = RETURNED_SQLSTATE;
    RETURN s || ' ' || d;
END $$;
SELECT o AS options, pg_temp.option_error(o::jsonb) AS error FROM (VALUES
    ('{"colour": "red"}'),
    ('{"point_value": -1}'),
    ('{"point_value": "1"}'),
    ('{"currency": "eur"}'),
    ('{"unknown_member": "drop"}'),
    ('{"shortfall": "forgive"}'),
    ('{"welcome": 100}'),
    ('{"welcome": {"points": 0}}'),
    ('{"welcome": {"points": 1.5}}'),
    ('{"welcome": {"points": 10, "email": true}}'),
    ('{"expiry": "12 months"}'),
    ('{"expiry": {}}'),
    ('{"expiry": {"policy": "sometimes"}}'),
    ('{"expiry": {"policy": "fixed"}}'),
    ('{"expiry": {"policy": "fixed", "after": "soon"}}'),
    ('{"expiry": {"policy": "fixed", "after": "-1 day"}}'),
    ('{"expiry": {"policy": "fixed", "after": 12}}'),
    ('{"expiry": {"policy": "fixed", "after": "1 year", "period": "month"}}'),
    ('{"expiry": {"policy": "calendar", "period": "week"}}'),
    ('{"expiry": {"policy": "calendar", "period": "year", "periods": -1}}'),
    ('{"expiry": {"policy": "rolling"}}'),
    ('{"expiry": {"policy": "rolling", "inactivity": "6 months", "activity": "earn"}}'),
    ('{"expiry": {"policy": "rolling", "inactivity": "6 months", "activity": []}}'),
    ('{"expiry": {"policy": "rolling", "inactivity": "6 months", "activity": ["earn", "shopping"]}}'),
    ('{"expiry": {"policy": "none", "notice": "0 days"}}'),
    ('{"expiry": {"policy": "calendar", "period": "quarter", "periods": 2, "notice": "2 weeks"}}')
) v(o);
SELECT results_eq($$SELECT code FROM loyalty.program ORDER BY id$$, ARRAY['shop', 'p1'],
                  'only the accepted options made a program');

-- ---- members ----
SELECT is(loyalty.enroll('shop', 'c1', email => ' Ann@Example.COM ', phone => '+33 (0)6-12 34 56 78',
                         birthday => '1990-05-17', country => 'fr', occurred_at => '2026-01-10 12:00'),
          1::bigint, 'enroll returns the member id');
SELECT is(loyalty.enroll('shop', 'c1', email => 'other@example.com'), 1::bigint, 'enroll is idempotent on member_ref');
SELECT is(loyalty.enroll('shop', 'c2', phone => '0044 20 7946 0958', birthday => '2999-01-01',
                         occurred_at => '2026-01-10 12:00'), 2::bigint, 'second member');
SELECT is(loyalty.enroll('shop', 'c3', email => 'not-an-email', occurred_at => '2026-01-10 12:00'), 3::bigint, 'third member');
SELECT m.member_ref, m.country, m.enrolled_at, c.email, c.email_valid, c.phone, c.phone_valid, c.birthday, c.birthday_valid
  FROM loyalty.member m LEFT JOIN loyalty.member_contact c ON c.member_id = m.id ORDER BY m.id;
SELECT throws_ok($$SELECT loyalty.enroll('nope', 'c1')$$, 'LY002', 'program "nope" does not exist', 'enroll: unknown program');
SELECT throws_ok($$SELECT loyalty.enroll('shop', NULL)$$, '22004', 'program and member_ref must not be null', 'enroll: null member_ref');
SELECT throws_ok($$SELECT loyalty.enroll('shop', '  ')$$, '22023', 'invalid member_ref "  "', 'enroll: blank member_ref');
SELECT throws_ok($$SELECT loyalty.enroll('shop', 'c9', country => 'France')$$, '22023', 'invalid country "France"', 'enroll: bad country');
SELECT throws_ok($$SELECT loyalty.enroll('shop', 'c9', attrs => '[1]')$$, '22023', 'member attrs must be a JSON object', 'enroll: attrs not an object');
SELECT is(count(*), 3::bigint, 'failed enrolments left no member behind') FROM loyalty.member;

-- ---- earn ----
SELECT is(loyalty.earn('shop', 'c1', 100, 'order-1', NULL, '2026-02-01 10:00'), 1::bigint, 'earn returns the transfer id');
SELECT is(loyalty.earn('shop', 'c1', 100, 'order-1', NULL, '2026-02-01 10:00'), 1::bigint, 'the same earn again returns the first transfer');
SELECT is(loyalty.earn('shop', 'c1', 100, 'order-1'), 1::bigint, 'a retry with another occurred_at is the same posting');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c1', 200, 'order-1')$$, '23505',
                 'ref "order-1" was already used for a different earn', 'same ref, other points');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c2', 100, 'order-1')$$, '23505',
                 'ref "order-1" was already used for a different earn', 'same ref, other member');
-- the error names both postings
SELECT loyalty.earn('shop', 'c2', 100, 'order-1');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c1', 0, 'o-2')$$, '22023', 'points to earn must be positive', 'zero points');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c1', -5, 'o-2')$$, '22023', 'points to earn must be positive', 'negative points');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c1', NULL, 'o-2')$$, '22004', 'points must not be null', 'null points');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c1', 5, NULL)$$, '22004', 'ref must not be null', 'null ref');
SELECT throws_ok($$SELECT loyalty.earn(NULL, 'c1', 5, 'o-2')$$, '22004', 'program must not be null', 'null program');
SELECT throws_ok($$SELECT loyalty.earn('shop', NULL, 5, 'o-2')$$, '22004', 'member_ref must not be null', 'null member');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c1', 5, '')$$, '22023', 'invalid ref ""', 'empty ref');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c1', 5, 'o-2', NULL, 'infinity')$$, '22008', 'occurred_at must be a finite time', 'infinite time');
SELECT throws_ok($$SELECT loyalty.earn('nope', 'c1', 5, 'o-2')$$, 'LY002', 'program "nope" does not exist', 'unknown program');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'zz', 5, 'o-2')$$, 'LY003', 'member "zz" does not exist in program "shop"', 'unknown member');
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c1', '9223372036854775808', 'o-2')$$, '22003', NULL, 'points beyond 64 bits');
UPDATE loyalty.member SET status = 'suspended' WHERE member_ref = 'c3';
SELECT throws_ok($$SELECT loyalty.earn('shop', 'c3', 5, 'o-2')$$, 'LY004', 'member "c3" of program "shop" is suspended', 'inactive member');
UPDATE loyalty.member SET status = 'active' WHERE member_ref = 'c3';
SELECT is(count(*), 1::bigint, 'refused earns left no transfer behind') FROM loyalty.transfer;

-- implicit casts: integer and bigint literals, and the points type itself
SELECT is(loyalty.earn('shop', 'c1', 50::bigint, 'order-2', 'second', '2026-03-15 10:00'), 2::bigint, 'bigint points');
SELECT is(loyalty.earn('shop', 'c2', '70'::loyalty.points, 'order-3', NULL, '2026-03-20 10:00'), 3::bigint, 'points literal');

-- ---- lots and expiry (fixed, 12 months, program time zone Europe/Paris) ----
SELECT t.ref, l.amount, l.remaining, l.occurred_at, l.vests_at, l.expires_at
  FROM loyalty.lot l JOIN loyalty.transfer t ON t.id = l.transfer_id ORDER BY l.id;
SELECT is(loyalty.balance('shop', 'c1', '2026-02-01 09:59'), '0'::loyalty.points, 'nothing before the first earn');
SELECT is(loyalty.balance('shop', 'c1', '2026-02-01 10:00'), '100'::loyalty.points, 'earned at occurred_at');
SELECT is(loyalty.balance('shop', 'c1', '2027-02-01 09:59'), '150'::loyalty.points, 'earned 11:00 Paris time, it lives until 11:00 Paris time a year later');
SELECT is(loyalty.balance('shop', 'c1', '2027-02-01 10:00'), '50'::loyalty.points, 'and is gone then (11:00 Paris = 10:00 UTC)');
SELECT is(loyalty.balance('shop', 'c1', '2027-03-15 09:59'), '50'::loyalty.points, 'the second lot lives until 2027-03-15 11:00 Paris time');
SELECT is(loyalty.balance('shop', 'c1', '2027-03-15 10:00'), '0'::loyalty.points, 'and is gone then');

-- ---- adjust: staff corrections, debits earliest expiry first ----
SELECT is(loyalty.adjust('shop', 'c1', -120, 'fix-1', 'double scan', '2026-04-01'), 4::bigint, 'a negative adjustment');
SELECT lot_id, amount FROM loyalty.lot_use WHERE transfer_id = 4 ORDER BY lot_id;
SELECT is(loyalty.balance('shop', 'c1', '2026-04-01'), '30'::loyalty.points, '150 - 120');
SELECT throws_ok($$SELECT loyalty.adjust('shop', 'c1', -31, 'fix-2', 'too much', '2026-04-01')$$, 'LY001', 'insufficient points', 'debit beyond the balance');
SELECT is(count(*), 0::bigint, 'the refused debit left nothing behind') FROM loyalty.transfer WHERE ref = 'fix-2';
SELECT is(available, '30'::loyalty.points, 'the account is unchanged') FROM loyalty.account WHERE member_id = 1;
SELECT throws_ok($$SELECT loyalty.adjust('shop', 'c1', 0, 'fix-3', 'nothing')$$, '22023', 'an adjustment must change the balance', 'zero delta');
SELECT throws_ok($$SELECT loyalty.adjust('shop', 'c1', 5, 'fix-3', NULL)$$, '22023', 'an adjustment needs a reason', 'no reason');
SELECT throws_ok($$SELECT loyalty.adjust('shop', 'c1', 5, 'fix-3', '   ')$$, '22023', 'an adjustment needs a reason', 'blank reason');
SELECT throws_ok($$SELECT loyalty.adjust('shop', 'c1', -9223372036854775808, 'fix-3', 'x')$$, '22003', 'points out of range', 'delta of -2^63');
SET loyalty.actor = 'cashier-12';
SELECT is(loyalty.adjust('shop', 'c2', 15, 'fix-4', 'missing receipt 1234', '2026-04-02'), 5::bigint, 'a positive adjustment');
RESET loyalty.actor;
SELECT is(actor, 'cashier-12 via ' || session_user, 'loyalty.actor names who posted, and through which login') FROM loyalty.transfer WHERE id = 5;
SELECT throws_ok($$SELECT loyalty.adjust('shop', 'c2', 16, 'fix-4', 'missing receipt 1234')$$, '23505',
                 'ref "fix-4" was already used for a different adjust', 'adjust is idempotent on ref too');

-- ---- summary and statement ----
SELECT * FROM loyalty.account_summary('shop', 'c1', '2026-12-01');
SELECT * FROM loyalty.account_summary('shop', 'c1', '2027-02-20');
-- as_of NULL means now, as in balance() (it gave zeros)
SELECT is((SELECT s::text FROM loyalty.account_summary('shop', 'c1', NULL) s),
          (SELECT s::text FROM loyalty.account_summary('shop', 'c1') s), 'account_summary: as_of NULL is now');
SELECT is((SELECT available FROM loyalty.account_summary('shop', 'c1', NULL)),
          loyalty.balance('shop', 'c1', NULL), 'account_summary and balance agree on as_of NULL');
SELECT transfer_id, occurred_at, kind, ref, points, balance, explanation
  FROM loyalty.statement('shop', 'c1');
SELECT transfer_id, points, balance FROM loyalty.statement('shop', 'c1', '2026-03-01', '2026-04-01');
SELECT throws_ok($$SELECT * FROM loyalty.statement('shop', 'nobody')$$, 'LY003', 'member "nobody" does not exist in program "shop"', 'statement: unknown member');
SELECT throws_ok($$SELECT loyalty.balance('nope', 'c1')$$, 'LY002', 'program "nope" does not exist', 'balance: unknown program');

-- ---- other policies ----
SELECT loyalty.create_program('cal', 'Calendar', 'America/New_York',
       '{"expiry": {"policy": "calendar", "period": "year", "periods": 1}}');
SELECT loyalty.enroll('cal', 'm', occurred_at => '2025-01-01');
SELECT loyalty.earn('cal', 'm', 10, 'e1', NULL, '2026-03-10 12:00');
SELECT loyalty.earn('cal', 'm', 20, 'e2', NULL, '2027-01-01 04:59');  -- still 2026 in New York
SELECT ref, expires_at FROM loyalty.lot l JOIN loyalty.transfer t ON t.id = l.transfer_id WHERE t.program_id = 3 ORDER BY l.id;
SELECT is(loyalty.balance('cal', 'm', '2028-01-01 04:59'), '30'::loyalty.points, 'calendar: both lots live until the end of 2027 in New York');
SELECT is(loyalty.balance('cal', 'm', '2028-01-01 05:00'), '0'::loyalty.points, 'calendar: both expire at midnight New York time');

SELECT loyalty.create_program('roll', 'Rolling', 'UTC',
       '{"expiry": {"policy": "rolling", "inactivity": "6 months"}}');
SELECT loyalty.enroll('roll', 'm', occurred_at => '2025-01-01');
SELECT loyalty.earn('roll', 'm', 10, 'e1', NULL, '2026-01-31 00:00');
SELECT loyalty.earn('roll', 'm', 20, 'e2', NULL, '2026-05-01 00:00');
SELECT is(loyalty.balance('roll', 'm', '2026-10-31 23:59'), '30'::loyalty.points, 'rolling: 6 months after the last activity, not before');
SELECT is(loyalty.balance('roll', 'm', '2026-11-01 00:00'), '0'::loyalty.points, 'rolling: everything expires 6 months after the last activity');
SELECT is(loyalty.balance('roll', 'm', '2026-07-31 00:00'), '30'::loyalty.points, 'rolling: the first lot lives on through later activity');
SELECT throws_ok($$SELECT loyalty.adjust('roll', 'm', -1, 'late', 'x', '2026-11-01')$$, 'LY001', 'insufficient points', 'rolling: expired points cannot be spent');
-- lapsed points stay lapsed: new activity starts afresh
SELECT loyalty.earn('roll', 'm', 5, 'e3', NULL, '2026-12-01 00:00');
SELECT is(loyalty.balance('roll', 'm', '2026-12-01 00:00'), '5'::loyalty.points, 'rolling: activity after the lapse does not bring lapsed points back');
SELECT is(loyalty.balance('roll', 'm', '2026-10-31 23:59'), '30'::loyalty.points, 'rolling: and the past is unchanged');
SELECT is(loyalty.balance('roll', 'm', '2027-06-01 00:00'), '0'::loyalty.points, 'rolling: the new points lapse 6 months later');
SELECT is(loyalty.adjust('roll', 'm', -5, 'spend', 'x', '2026-12-02') > 0, true, 'rolling: only the live points can be spent');
SELECT throws_ok($$SELECT loyalty.adjust('roll', 'm', -1, 'spend-2', 'x', '2026-12-02')$$, 'LY001', 'insufficient points', 'rolling: and no more');

SELECT loyalty.create_program('leap', 'Leap', 'UTC', '{"expiry": {"policy": "fixed", "after": "1 year"}}');
SELECT loyalty.enroll('leap', 'm', occurred_at => '2024-01-01');
SELECT loyalty.earn('leap', 'm', 10, 'e1', NULL, '2024-02-29 12:00');
SELECT expires_at AS leap_day_lot_expires FROM loyalty.lot l JOIN loyalty.account a ON a.id = l.account_id WHERE a.program_id = 5;

-- pending points (the return window) are not available until they vest
SELECT loyalty._post_member('shop', 'c3', 'issuance', 40, 'earn', 'pending-1', NULL, '2026-04-01', '2026-05-01');
SELECT is(loyalty.balance('shop', 'c3', '2026-04-30'), '0'::loyalty.points, 'pending before vesting');
SELECT is(loyalty.balance('shop', 'c3', '2026-05-01'), '40'::loyalty.points, 'available once vested');
SELECT available, pending FROM loyalty.account_summary('shop', 'c3', '2026-04-15');
SELECT available, pending FROM loyalty.account WHERE member_id = 3;

-- welcome points, once per member
SELECT loyalty.create_program('hello', 'Welcome', 'UTC', '{"welcome": {"points": 25}}');
SELECT loyalty.enroll('hello', 'w1', occurred_at => '2026-06-01');
SELECT loyalty.enroll('hello', 'w1', occurred_at => '2026-06-02');
SELECT is(loyalty.balance('hello', 'w1'), '25'::loyalty.points, 'welcome points are posted once');

-- ---- the books balance ----
SELECT results_eq(
    $$SELECT a.id, (a.available::bigint + a.pending::bigint)
        FROM loyalty.account a WHERE a.kind = 'member' ORDER BY a.id$$,
    $$SELECT a.id, coalesce((SELECT sum(CASE WHEN t.credit_account_id = a.id THEN t.amount::bigint ELSE -t.amount::bigint END)
                             FROM loyalty.transfer t WHERE a.id IN (t.credit_account_id, t.debit_account_id)), 0)::bigint
        FROM loyalty.account a WHERE a.kind = 'member' ORDER BY a.id$$,
    'each member account holds the sum of its transfers');
SELECT results_eq(
    $$SELECT a.id, (a.available::bigint + a.pending::bigint) FROM loyalty.account a WHERE a.kind = 'member' ORDER BY a.id$$,
    $$SELECT a.id, coalesce((SELECT sum(l.remaining::bigint) FROM loyalty.lot l WHERE l.account_id = a.id), 0)::bigint
        FROM loyalty.account a WHERE a.kind = 'member' ORDER BY a.id$$,
    'each member account holds the sum of its lots');
SELECT is((SELECT sum(CASE WHEN a.kind = 'member' THEN 1 ELSE 0 END * (CASE WHEN t.credit_account_id = a.id THEN 1 ELSE -1 END) * t.amount::bigint)
             + sum(CASE WHEN a.kind <> 'member' THEN 1 ELSE 0 END * (CASE WHEN t.credit_account_id = a.id THEN 1 ELSE -1 END) * t.amount::bigint)
           FROM loyalty.transfer t JOIN loyalty.account a ON a.id IN (t.debit_account_id, t.credit_account_id)),
          0::numeric, 'system accounts mirror member accounts: the books sum to zero');

-- ---- append-only journal ----
SELECT throws_ok($$UPDATE loyalty.transfer SET amount = 1000 WHERE id = 1$$, 'LY005', 'UPDATE on transfer is not allowed: the ledger is append-only', 'no UPDATE');
SELECT throws_ok($$DELETE FROM loyalty.transfer WHERE id = 1$$, 'LY005', 'DELETE on transfer is not allowed: the ledger is append-only', 'no DELETE');
SELECT throws_ok($$TRUNCATE loyalty.transfer CASCADE$$, 'LY005', 'TRUNCATE on transfer is not allowed: the ledger is append-only', 'no TRUNCATE');
SELECT throws_ok($$UPDATE loyalty.lot_use SET amount = 1$$, 'LY005', 'UPDATE on lot_use is not allowed: the ledger is append-only', 'lot_use: no UPDATE');
SELECT throws_ok($$DELETE FROM loyalty.lot_use$$, 'LY005', 'DELETE on lot_use is not allowed: the ledger is append-only', 'lot_use: no DELETE');
SELECT throws_ok($$TRUNCATE loyalty.lot_use$$, 'LY005', 'TRUNCATE on lot_use is not allowed: the ledger is append-only', 'lot_use: no TRUNCATE');
SELECT throws_ok($$DELETE FROM loyalty.lot$$, 'LY005', 'DELETE on lot is not allowed: the ledger is append-only', 'lot: no DELETE');
SET session_replication_role = replica;
SELECT throws_ok($$DELETE FROM loyalty.transfer WHERE id = 1$$, 'LY005', 'DELETE on transfer is not allowed: the ledger is append-only', 'not even as a replica');
RESET session_replication_role;

-- ---- the hash chain ----
-- The canonical content, hashed here with PostgreSQL's own sha256(): the
-- serialisation documented in ledger.md, pinned so that a chain written by
-- one build verifies under the next. Integers as 8 big-endian bytes
-- (timestamps as microseconds since 2000-01-01), texts and hashes as a
-- 4-byte length (-1 for NULL) and their bytes, a NULL rule version as the
-- smallest int8. The second case has a reason longer than the 256 bytes
-- the C code buffers.
CREATE FUNCTION pg_temp.canon_text(t text) RETURNS bytea LANGUAGE sql AS $$
    SELECT CASE WHEN t IS NULL THEN int4send(-1) ELSE int4send(octet_length(t)) || convert_to(t, 'UTF8') END
$$;
CREATE FUNCTION pg_temp.canon_ts(t timestamptz) RETURNS bytea LANGUAGE sql AS $$
    SELECT int8send((extract(epoch FROM t - timestamptz '2000-01-01 00:00+00') * 1000000)::bigint)
$$;
SELECT is(loyalty.transfer_hash(7, 11, 12, 250, 'earn', 'ord-é1', '2026-03-01 10:00:00.123456+00',
                                '2026-03-02 08:30+00', NULL, 'alice', NULL, NULL, '\x0102'::bytea),
          sha256(int8send(7) || int8send(11) || int8send(12) || int8send(250)
                 || pg_temp.canon_text('earn') || pg_temp.canon_text('ord-é1')
                 || pg_temp.canon_ts('2026-03-01 10:00:00.123456+00') || pg_temp.canon_ts('2026-03-02 08:30+00')
                 || int8send(-9223372036854775808) || pg_temp.canon_text('alice') || pg_temp.canon_text(NULL)
                 || int4send(-1) || int4send(2) || '\x0102'::bytea),
          'transfer_hash: the canonical content, hashed by sha256()');
SELECT is(loyalty.transfer_hash(7, 11, 12, -40, 'adjust', 'fix-1', '2026-03-01 10:00+00',
                                '2026-03-01 10:00+00', 3, 'bob', repeat('long reason ', 40), sha256('\x01'), sha256('\x02')),
          sha256(int8send(7) || int8send(11) || int8send(12) || int8send(-40)
                 || pg_temp.canon_text('adjust') || pg_temp.canon_text('fix-1')
                 || pg_temp.canon_ts('2026-03-01 10:00+00') || pg_temp.canon_ts('2026-03-01 10:00+00')
                 || int8send(3) || pg_temp.canon_text('bob') || pg_temp.canon_text(repeat('long reason ', 40))
                 || int4send(32) || sha256('\x01') || int4send(32) || sha256('\x02')),
          'transfer_hash: a rule version, a reason longer than the buffer, both previous hashes');
SELECT is_empty($$SELECT * FROM loyalty.verify_chain('shop')$$, 'every chain verifies');
SELECT throws_ok($$SELECT * FROM loyalty.verify_chain('nope')$$, 'LY002', 'program "nope" does not exist', 'verify_chain: unknown program');
-- a superuser who drops the guard can still change rows: the chain shows where
BEGIN;
ALTER TABLE loyalty.transfer DISABLE TRIGGER transfer_append_only;
UPDATE loyalty.transfer SET amount = 1000 WHERE id = 2;
SELECT * FROM loyalty.verify_chain('shop');
ROLLBACK;
BEGIN;
ALTER TABLE loyalty.transfer DISABLE TRIGGER transfer_append_only;
DELETE FROM loyalty.transfer WHERE id = 2;
SELECT * FROM loyalty.verify_chain('shop');
ROLLBACK;
BEGIN;
ALTER TABLE loyalty.transfer DISABLE TRIGGER transfer_append_only;
DELETE FROM loyalty.transfer WHERE id = 4;
SELECT * FROM loyalty.verify_chain('shop');
ROLLBACK;
BEGIN;
UPDATE loyalty.account SET last_hash = NULL WHERE member_id = 2;
SELECT * FROM loyalty.verify_chain('shop');
ROLLBACK;
SELECT is_empty($$SELECT * FROM loyalty.verify_chain('shop')$$, 'and verifies again after the rollbacks');

-- ---- user data survives pg_dump ----
-- Every table and sequence of the extension is registered for pg_dump, but
-- the registries that the install script itself fills.
SELECT results_eq(
    $$SELECT c.relname::text COLLATE "default" FROM pg_class c
       WHERE c.relnamespace = 'loyalty'::regnamespace AND c.relkind IN ('r', 'S')
         AND c.oid <> ALL ((SELECT extconfig FROM pg_extension WHERE extname = 'loyalty')::oid[])
       ORDER BY 1$$,
    ARRAY['transfer_kind'],
    'every user-data table and sequence is dumped');

SELECT * FROM finish();
