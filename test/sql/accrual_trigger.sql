SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';

SELECT loyalty.create_program('shop', 'Shop', 'UTC') > 0 AS created;
SELECT loyalty.enroll('shop', m, occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled
FROM unnest(ARRAY['c1', 'c2', 'c3']) m;
UPDATE loyalty.member SET status = 'closed' WHERE member_ref = 'c3';
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1},
  "multipliers": [{"when": {"category": ["electronics"]}, "factor": 2}],
  "bonuses": [{"when": {"first_purchase": true}, "points": 100}]}', '2025-01-01') AS version;

-- The application's own table, untouched but for the triggers.
CREATE TABLE public.orders (
    id        text PRIMARY KEY,
    customer  text,
    total     numeric(12,2),
    placed_at timestamptz,
    kind      text,
    note      text
);

SELECT plan(8);
SELECT throws_ok($$SELECT loyalty.attach_accrual('public.orders', 'nope', 'customer', 'total', 'id')$$,
                 'LY002', 'program "nope" does not exist');
SELECT throws_ok($$SELECT loyalty.attach_accrual('public.orders', 'shop', 'client', 'total', 'id')$$,
                 '42703', 'column "client" of "public.orders" does not exist');
SELECT throws_ok($$SELECT loyalty.attach_accrual('public.orders', 'shop', 'customer', NULL, 'id')$$,
                 '22004', 'source, program, member_column, amount_column and ref_column must not be null');
-- the amount and the time must be of types whose values always convert
SELECT throws_ok($$SELECT loyalty.attach_accrual('public.orders', 'shop', 'customer', 'note', 'id')$$,
                 '42804', 'column "note" of "public.orders" cannot hold amounts');
SELECT throws_ok($$SELECT loyalty.attach_accrual('public.orders', 'shop', 'customer', 'total', 'id', 'kind')$$,
                 '42804', 'column "kind" of "public.orders" cannot hold purchase times');
SELECT throws_ok($$SELECT loyalty.detach_accrual('public.orders')$$, 'LY013', 'accrual is not attached to "public.orders"');
SELECT lives_ok($$SELECT loyalty.attach_accrual('public.orders', 'shop', 'customer', 'total', 'id',
                                               occurred_at_column => 'placed_at', category_column => 'kind')$$,
                'attach_accrual');
SELECT throws_ok($$SELECT loyalty.attach_accrual('public.orders', 'shop', 'customer', 'total', 'id')$$,
                 'LY013', 'accrual is already attached to "public.orders"');
SELECT * FROM finish();
SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass ORDER BY 1;

-- One statement, good and bad rows together: the statement succeeds, the
-- good rows earn, the bad rows wait in the quarantine.
INSERT INTO public.orders VALUES
    ('o1', 'c1', 10.00, '2025-02-01 10:00+00', 'books', NULL),        -- 10 + first purchase 100
    ('o2', 'c1', 20.00, '2025-02-01 11:00+00', 'electronics', NULL),  -- 40
    ('o3', 'c2', 5.50,  '2025-02-01 12:00+00', 'books', NULL),        -- 5 + 100
    ('o4', NULL, 10.00, '2025-02-01 13:00+00', 'books', 'no member'),
    ('o5', 'zz', 10.00, '2025-02-01 13:00+00', 'books', 'unknown member'),
    ('o6', 'c1', -3.00, '2025-02-01 13:00+00', 'books', 'negative'),
    ('o7', 'c3', 10.00, '2025-02-01 13:00+00', 'books', 'closed member'),
    ('o8', 'c1', NULL,  '2025-02-01 13:00+00', 'books', 'no amount'),
    ('o9', 'c2', 10.00, '2024-06-01 13:00+00', 'books', 'before the rules');
SELECT count(*) AS orders FROM public.orders;
SELECT ref, points, rule_version FROM loyalty.accrual ORDER BY ref;
SELECT ref, member_ref, sqlstate, reason, row_data ->> 'note' AS note FROM loyalty.accrual_quarantine ORDER BY id;
SELECT program, source, sqlstate, reason, rows FROM loyalty.quarantine_summary ORDER BY sqlstate, reason;
SELECT loyalty.balance('shop', 'c1') AS c1, loyalty.balance('shop', 'c2') AS c2;

-- Re-inserting an order never earns twice: deleted and inserted again, it
-- gets back what its DELETE took (accrual_reinsert.sql), and no new journal
-- line of kind accrual.
DELETE FROM public.orders WHERE id = 'o3';   -- refunds o3 (105 points)
SELECT loyalty.balance('shop', 'c2') AS c2_after_delete;
INSERT INTO public.orders VALUES ('o3', 'c2', 5.50, '2025-02-01 12:00+00', 'books', NULL);
SELECT loyalty.balance('shop', 'c2') AS c2_after_reinsert;
SELECT count(*) AS accrual_transfers FROM loyalty.transfer WHERE kind = 'accrual';
-- The same purchase through the function API is a replay.
SELECT loyalty.accrue('shop', 'c1', 20.00, 'o2', '2025-02-01 11:00+00', 'electronics') AS replay_same;
-- A second shop's table feeding the same program: a row reusing the ref of a
-- different purchase goes to the quarantine (23505), the same one is skipped.
-- Within one statement too: w1 twice is one purchase; w2 for c2 then for c1
-- earns for c2, and c1's row is quarantined with all its data.
CREATE TABLE public.web_orders (ref text, member text, amount numeric, at timestamptz);
SELECT loyalty.attach_accrual('public.web_orders', 'shop', 'member', 'amount', 'ref', 'at');
INSERT INTO public.web_orders VALUES ('o1', 'c1', 10.00, '2025-02-01 10:00+00'),
                                     ('o2', 'c1', 99.00, '2025-02-01 11:00+00'),
                                     ('w1', 'c2', 1.00, '2025-02-01 11:00+00'),
                                     ('w1', 'c2', 1.00, '2025-02-01 11:00+00'),
                                     ('w2', 'c2', 3.00, '2025-02-01 12:00+00'),
                                     ('w2', 'c1', 4.00, '2025-02-01 12:00+00');
SELECT ref, member_ref, sqlstate, reason, row_data FROM loyalty.accrual_quarantine
WHERE source = 'public.web_orders'::regclass ORDER BY id;
SELECT a.ref, m.member_ref, a.points FROM loyalty.accrual a JOIN loyalty.member m ON m.id = a.member_id
WHERE a.ref IN ('w1', 'w2') ORDER BY a.ref;
SELECT loyalty.detach_accrual('public.web_orders');

-- UPDATE lowering an amount refunds in proportion; raising it does not earn.
UPDATE public.orders SET total = 10.00 WHERE id = 'o2';       -- 40 -> 20 back
SELECT refunded_amount, refunded_points FROM loyalty.accrual WHERE ref = 'o2';
UPDATE public.orders SET total = 20.00 WHERE id = 'o2';
UPDATE public.orders SET note = 'touched' WHERE id = 'o2';
SELECT refunded_amount, refunded_points FROM loyalty.accrual WHERE ref = 'o2';
-- Lowering it again after the raise refunds down from what is left
-- unrefunded (10.00), not by the difference from the raised amount: 15.00
-- refunds nothing, 8.00 refunds 2.00 more (24 of the 40 points in all).
UPDATE public.orders SET total = 15.00 WHERE id = 'o2';
SELECT refunded_amount, refunded_points FROM loyalty.accrual WHERE ref = 'o2';
UPDATE public.orders SET total = 8.00 WHERE id = 'o2';
SELECT refunded_amount, refunded_points FROM loyalty.accrual WHERE ref = 'o2';
-- A refund the trigger cannot post is quarantined with the new amount: a
-- refund_ref already used by a refund() for another amount (23505). Once
-- the quarantined row names a free refund_ref, the replay below refunds
-- down to 5.00.
SELECT loyalty.refund('shop', 'o2', 1.00, 'o2:amount:5.00') AS clawed;
UPDATE public.orders SET total = 5.00 WHERE id = 'o2';
SELECT ref, kind, sqlstate, row_data FROM loyalty.accrual_quarantine WHERE kind <> 'purchase';
UPDATE loyalty.accrual_quarantine SET row_data = row_data || '{"refund_ref": "o2:amount:5.00:b"}'
WHERE kind = 'refund_to';
SELECT refund_ref, amount, points FROM loyalty.accrual_refund ORDER BY refund_ref;
-- DELETE of a quarantined row refunds nothing, and withdraws it: a replay
-- does not earn for an order the application deleted (o10's member zz is
-- enrolled below). A quarantined row the application updates is replayed
-- as it is now: o7 at 12.00, not 10.00.
DELETE FROM public.orders WHERE id = 'o4';
INSERT INTO public.orders VALUES ('o10', 'zz', 50.00, '2025-02-01 14:00+00', 'books', 'deleted');
DELETE FROM public.orders WHERE id = 'o10';
UPDATE public.orders SET total = 12.00 WHERE id = 'o7';
SELECT ref, withdrawn_at IS NOT NULL AS withdrawn, row_data ->> 'total' AS total
FROM loyalty.accrual_quarantine WHERE ref IN ('o4', 'o7', 'o10') ORDER BY id;
SELECT sqlstate, rows FROM loyalty.quarantine_summary WHERE program = 'shop' ORDER BY sqlstate, reason;

-- Fix the causes and replay: enrol zz, reopen c3, correct the amounts.
SELECT loyalty.enroll('shop', 'zz', occurred_at => '2025-01-01') > 0 AS enrolled;
UPDATE loyalty.member SET status = 'active' WHERE member_ref = 'c3';
UPDATE loyalty.accrual_quarantine SET row_data = row_data || '{"total": 3.00}' WHERE ref = 'o6';
SELECT * FROM loyalty.replay_quarantine('shop');
SELECT ref, sqlstate, reason, replayed_at IS NOT NULL AS replayed, withdrawn_at IS NOT NULL AS withdrawn, attempts
FROM loyalty.accrual_quarantine ORDER BY id;
SELECT * FROM loyalty.replay_quarantine('shop');
SELECT ref, amount, points FROM loyalty.accrual WHERE ref IN ('o5', 'o6', 'o7', 'o10') ORDER BY ref;
-- o2, refunded down to 5.00 of 20.00: 30 of its 40 points
SELECT refunded_amount, refunded_points FROM loyalty.accrual WHERE ref = 'o2';
SELECT refund_ref, amount, points FROM loyalty.accrual_refund WHERE purchase_ref = 'o2' ORDER BY refund_ref;

-- Unknown members enrolled on first purchase, when the program says so.
SELECT loyalty.update_program('shop', '{"unknown_member": "enroll"}', 'enrol unknown members') AS version;
INSERT INTO public.orders VALUES ('o10', 'newbie', 7.00, '2025-02-03 10:00+00', 'books', NULL);
SELECT m.member_ref, a.points FROM loyalty.accrual a JOIN loyalty.member m ON m.id = a.member_id WHERE a.ref = 'o10';
-- A member_ref enroll() would refuse is quarantined (22023); the other
-- rows of the statement earn, their new member enrolled.
INSERT INTO public.orders VALUES ('o12', 'newbie3', 7.00, '2025-02-03 10:00+00', 'books', NULL),
                                 ('o13', repeat('m', 201), 7.00, '2025-02-03 10:00+00', 'books', 'too long'),
                                 ('o14', '  ', 7.00, '2025-02-03 10:00+00', 'books', 'blank');
SELECT m.member_ref, a.points FROM loyalty.accrual a JOIN loyalty.member m ON m.id = a.member_id WHERE a.ref IN ('o12', 'o13', 'o14');
SELECT ref, sqlstate, left(reason, 40) AS reason FROM loyalty.accrual_quarantine WHERE ref IN ('o13', 'o14') ORDER BY ref;
-- and through the function API
SELECT loyalty.accrue('shop', 'newbie2', 8.00, 'o11', '2025-02-03 11:00+00') AS points;

-- A bulk INSERT ... SELECT is one pass; many purchases per member chain correctly.
SELECT loyalty.enroll('shop', 'm' || i, occurred_at => '2025-01-01') > 0 AS enrolled
FROM generate_series(1, 50) i GROUP BY 1;
SET loyalty.accrual_chunk = 700;   -- 8 chunks: first purchases and chains across chunks
INSERT INTO public.orders (id, customer, total, placed_at, kind)
SELECT 'b' || i, 'm' || (i % 50 + 1), (i % 7) + 0.99, '2025-03-01'::timestamptz + i * interval '1 minute',
       CASE WHEN i % 3 = 0 THEN 'electronics' ELSE 'books' END
FROM generate_series(1, 5000) i;
RESET loyalty.accrual_chunk;
SELECT count(*) AS bulk_purchases, sum(points) AS bulk_points FROM loyalty.accrual WHERE ref LIKE 'b%';
-- hand check: per purchase floor((i % 7 + 0.99) * (2 if i % 3 = 0)) plus 100 once per member
SELECT sum(floor(((i % 7) + 0.99) * CASE WHEN i % 3 = 0 THEN 2 ELSE 1 END)) + 50 * 100 AS expected
FROM generate_series(1, 5000) i;
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('shop');
SELECT count(*) AS unbalanced FROM loyalty.account a
WHERE a.kind = 'member'
  AND (a.available::bigint + a.pending::bigint)
      <> (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l WHERE l.account_id = a.id);
-- 2,500 purchases that earn in one chunk: the journal lines and lots are
-- appended 1,000 at a time (LedgerWriter's batches), the last batch when
-- the chunk ends. Every purchase has its line and its lot, chains hold.
INSERT INTO public.orders (id, customer, total, placed_at, kind)
SELECT 'k' || i, 'm' || (i % 50 + 1), 10, '2025-05-05'::timestamptz + i * interval '1 second', 'books'
FROM generate_series(1, 2500) i;
SELECT count(*) AS purchases, sum(a.points) AS points, count(t.id) AS lines, sum(t.amount::bigint) AS line_points,
       count(l.id) AS lots, sum(l.amount::bigint) AS lot_points
FROM loyalty.accrual a LEFT JOIN loyalty.transfer t ON t.id = a.transfer_id
LEFT JOIN loyalty.lot l ON l.transfer_id = a.transfer_id
WHERE a.ref LIKE 'k%';
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('shop');
SELECT count(*) AS unbalanced FROM loyalty.account a
WHERE a.kind = 'member'
  AND (a.available::bigint + a.pending::bigint)
      <> (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l WHERE l.account_id = a.id);

-- COPY goes through the same trigger.
COPY public.orders (id, customer, total, placed_at, kind) FROM stdin;
c1	c1	12.00	2025-04-01 10:00:00+00	books
c2	nobody-yet	3.00	2025-04-01 10:00:00+00	books
c3	c2	\N	2025-04-01 10:00:00+00	books
\.
SELECT ref, points FROM loyalty.accrual WHERE ref IN ('c1', 'c2') ORDER BY ref;
SELECT ref, reason FROM loyalty.accrual_quarantine WHERE ref = 'c3';

-- A sale that would take a balance past 2^63 - 1 points raises 22003 and
-- posts nothing (one-row path and multi-row statement alike): 900 points
-- plus the first-purchase bonus of 100 do not fit in the 807 left.
SELECT loyalty.enroll('shop', 'rich', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.earn('shop', 'rich', 9223372036854775000, 'rich-gift', NULL, '2025-01-02') > 0 AS earned;
\set VERBOSITY terse
INSERT INTO public.orders VALUES ('r1', 'rich', 900.00, '2025-02-01', 'books', NULL);
INSERT INTO public.orders VALUES ('r2', 'rich', 900.00, '2025-02-01', 'books', NULL),
                                 ('r3', 'c1', 1.00, '2025-02-01', 'books', NULL);
\set VERBOSITY default
SELECT count(*) AS posted FROM loyalty.accrual WHERE ref IN ('r1', 'r2', 'r3');
SELECT count(*) AS orders FROM public.orders WHERE id IN ('r1', 'r2', 'r3');
SELECT loyalty.balance('shop', 'rich') AS rich_balance;

-- An order number the ledger cannot take as a ref (empty, or longer than
-- 200 characters) does not fail the sale: it is quarantined (22023), one
-- row or several.
INSERT INTO public.orders VALUES ('', 'c1', 5.00, '2025-02-01', 'books', NULL);
INSERT INTO public.orders VALUES (repeat('x', 201), 'c1', 5.00, '2025-02-01', 'books', NULL),
                                 ('ok-1', 'c1', 5.00, '2025-02-01', 'books', NULL);
SELECT left(ref, 10) AS ref, sqlstate, left(reason, 40) AS reason
FROM loyalty.accrual_quarantine WHERE ref = '' OR ref LIKE 'xxx%' ORDER BY id;
SELECT ref, points FROM loyalty.accrual WHERE ref = 'ok-1';

-- Rules that use the birthday: a one-row sale reads the member's birthday
-- month as a statement of many rows does. A sale in that month doubles, one
-- outside it does not, a member without a birthday never gets it.
SELECT loyalty.create_program('bday', 'Birthday', 'UTC') > 0 AS created;
SELECT loyalty.enroll('bday', 'b1', birthday => '1990-03-15', occurred_at => '2025-01-01') > 0 AS b1,
       loyalty.enroll('bday', 'b2', occurred_at => '2025-01-01') > 0 AS b2;
SELECT loyalty.set_earning_rules('bday', '{"base": {"per": 1, "points": 1},
  "bonuses": [{"when": {"birthday_month": true}, "factor": 2}]}', '2025-01-01') AS version;
CREATE TABLE public.bday_sales (ref text, who text, total numeric, at timestamptz);
SELECT loyalty.attach_accrual('public.bday_sales', 'bday', 'who', 'total', 'ref', 'at');
INSERT INTO public.bday_sales VALUES ('b-1', 'b1', 10, '2025-03-20');     -- March: 20
INSERT INTO public.bday_sales VALUES ('b-2', 'b1', 10, '2025-04-20');     -- April: 10
INSERT INTO public.bday_sales VALUES ('b-3', 'b2', 10, '2025-03-20');     -- no birthday: 10
INSERT INTO public.bday_sales VALUES ('b-4', 'b1', 10, '2025-03-21'),     -- two rows: 20
                                     ('b-5', 'b2', 10, '2025-03-21');     -- and 10
SELECT ref, points, loyalty._accrual_breakdown(a) #> '{context,birthday_month}' AS birthday_month
FROM loyalty.accrual a WHERE ref LIKE 'b-%' ORDER BY ref;
-- The same in a statement read in chunks, whose members come from the
-- query that locks their accounts (AccrualReadMembers), not from joins of
-- every row: the birthday month (c-1, not c-5 in April), a tier (c-2), a
-- suspended member (LY004), an unknown one (LY003), and a ref posted
-- before for another member (23505, though amount and time are the same).
UPDATE loyalty.member SET tier = 'gold'
WHERE member_ref = 'b2' AND program_id = (SELECT id FROM loyalty.program WHERE code = 'bday');
SELECT loyalty.enroll('bday', 'b3', occurred_at => '2025-01-01') > 0 AS b3;
UPDATE loyalty.member SET status = 'suspended'
WHERE member_ref = 'b3' AND program_id = (SELECT id FROM loyalty.program WHERE code = 'bday');
SET loyalty.accrual_chunk = 2;
INSERT INTO public.bday_sales VALUES ('c-1', 'b1', 10, '2025-03-22'), ('c-2', 'b2', 10, '2025-03-22'),
                                     ('c-3', 'b3', 10, '2025-03-22'), ('c-4', 'zz', 10, '2025-03-22'),
                                     ('b-1', 'b2', 10, '2025-03-20'), ('c-5', 'b1', 10, '2025-04-22');
RESET loyalty.accrual_chunk;
SELECT a.ref, m.member_ref, a.points, loyalty._accrual_breakdown(a) -> 'context' AS context
FROM loyalty.accrual a JOIN loyalty.member m ON m.id = a.member_id
WHERE a.ref LIKE 'c-%' AND a.program_id = (SELECT id FROM loyalty.program WHERE code = 'bday') ORDER BY a.ref;
SELECT ref, sqlstate, reason FROM loyalty.accrual_quarantine
WHERE program_id = (SELECT id FROM loyalty.program WHERE code = 'bday') ORDER BY ref;
SELECT loyalty.detach_accrual('public.bday_sales');

-- A line repeated within one statement (an import sending an order twice)
-- is one purchase: the repeat counts neither towards the day cap nor the
-- first purchase, so the member's next order that day still earns; the
-- same ref with another amount is quarantined with its own row.
SELECT loyalty.create_program('capped', 'Capped', 'UTC') > 0 AS created;
SELECT loyalty.enroll('capped', 'k1', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('capped', '{"base": {"per": 1, "points": 1},
  "caps": {"per_member_per_day": 100}}', '2025-01-01') AS version;
CREATE TABLE public.import (ref text, who text, total numeric, at timestamptz, note text);
SELECT loyalty.attach_accrual('public.import', 'capped', 'who', 'total', 'ref', 'at');
INSERT INTO public.import VALUES ('i-1', 'k1', 80, '2025-03-01 10:00+00', 'first'),
                                 ('i-1', 'k1', 80, '2025-03-01 10:00+00', 'repeated line'),
                                 ('i-1', 'k1', 90, '2025-03-01 10:00+00', 'other amount'),
                                 ('i-2', 'k1', 20, '2025-03-01 11:00+00', 'next order');
SELECT ref, points FROM loyalty.accrual WHERE ref LIKE 'i-%' ORDER BY ref;
SELECT ref, sqlstate, row_data ->> 'note' AS note FROM loyalty.accrual_quarantine WHERE ref LIKE 'i-%';
SELECT loyalty.balance('capped', 'k1') AS balance;
-- The same across chunks of one statement (two rows a chunk here): the
-- repeat and the other amount of j-1 come in the second chunk, j-2 in the
-- third; j-2 still earns the 20 left under the cap.
SELECT loyalty.enroll('capped', 'k2', occurred_at => '2025-01-01') > 0 AS enrolled;
SET loyalty.accrual_chunk = 2;
INSERT INTO public.import VALUES ('j-1', 'k2', 80, '2025-03-01 10:00+00', 'first'),
                                 ('j-x', 'k2', 5, '2025-03-02 10:00+00', 'another day'),
                                 ('j-1', 'k2', 80, '2025-03-01 10:00+00', 'repeated line'),
                                 ('j-1', 'k2', 90, '2025-03-01 10:00+00', 'other amount'),
                                 ('j-2', 'k2', 20, '2025-03-01 11:00+00', 'next order');
RESET loyalty.accrual_chunk;
SELECT ref, points FROM loyalty.accrual WHERE ref LIKE 'j-%' ORDER BY ref;
SELECT ref, sqlstate, row_data ->> 'note' AS note FROM loyalty.accrual_quarantine WHERE ref LIKE 'j-%';
SELECT loyalty.balance('capped', 'k2') AS balance;
-- A quarantined row keeps its own application row, found again by its
-- place in the statement: rows alike in every mapped column but not in
-- the others (note) each keep theirs, in chunks of two, whatever the
-- problem (an unknown member, a repeated ref with another amount).
SET loyalty.accrual_chunk = 2;
INSERT INTO public.import VALUES ('u-1', 'nobody', 5, '2025-03-03 10:00+00', 'first unknown'),
                                 ('u-2', 'k2', 1, '2025-03-03 10:00+00', 'earns'),
                                 ('u-1', 'nobody', 5, '2025-03-03 10:00+00', 'second unknown'),
                                 ('u-2', 'k2', 2, '2025-03-03 10:00+00', 'other amount'),
                                 ('u-1', 'nobody', 5, '2025-03-03 10:00+00', 'third unknown');
RESET loyalty.accrual_chunk;
SELECT ref, sqlstate, row_data ->> 'note' AS note FROM loyalty.accrual_quarantine WHERE ref LIKE 'u-%' ORDER BY id;
SELECT loyalty.detach_accrual('public.import');
-- A chunked statement first locks the accounts of its members, taken
-- from the member column: as they are from a text or varchar column (read
-- in C), through the column's cast to text from any other (SELECT
-- DISTINCT): an integer, or char(n), whose cast drops the blanks it is
-- padded with. Each earns once for its member; a NULL member is
-- quarantined (22004), whichever way the members were read.
SELECT count(loyalty.enroll('capped', m, occurred_at => '2025-01-01')) AS enrolled FROM unnest(ARRAY['7', 'k3']) m;
CREATE TABLE public.typed_members (ref text, v varchar(10), n int, c char(4), total numeric, at timestamptz);
SET loyalty.accrual_chunk = 2;
SELECT loyalty.attach_accrual('public.typed_members', 'capped', 'v', 'total', 'ref', 'at');
INSERT INTO public.typed_members VALUES ('tm-v1', 'k3', 7, 'k3', 5, '2025-03-05 10:00+00'),
                                        ('tm-v2', NULL, 7, 'k3', 6, '2025-03-05 11:00+00'),
                                        ('tm-v3', 'k3', 7, 'k3', 7, '2025-03-05 12:00+00');
SELECT loyalty.detach_accrual('public.typed_members');
SELECT loyalty.attach_accrual('public.typed_members', 'capped', 'n', 'total', 'ref', 'at');
INSERT INTO public.typed_members VALUES ('tm-n1', 'k3', 7, 'k3', 5, '2025-03-06 10:00+00'),
                                        ('tm-n2', 'k3', NULL, 'k3', 6, '2025-03-06 11:00+00'),
                                        ('tm-n3', 'k3', 7, 'k3', 7, '2025-03-06 12:00+00');
SELECT loyalty.detach_accrual('public.typed_members');
SELECT loyalty.attach_accrual('public.typed_members', 'capped', 'c', 'total', 'ref', 'at');
INSERT INTO public.typed_members VALUES ('tm-c1', 'k3', 7, 'k3', 5, '2025-03-07 10:00+00'),
                                        ('tm-c2', 'k3', 7, NULL, 6, '2025-03-07 11:00+00'),
                                        ('tm-c3', 'k3', 7, 'k3', 7, '2025-03-07 12:00+00');
SELECT loyalty.detach_accrual('public.typed_members');
RESET loyalty.accrual_chunk;
SELECT a.ref, m.member_ref, a.points FROM loyalty.accrual a JOIN loyalty.member m ON m.id = a.member_id
WHERE a.ref LIKE 'tm-%' ORDER BY a.ref;
SELECT ref, sqlstate FROM loyalty.accrual_quarantine WHERE source = 'public.typed_members'::regclass ORDER BY id;
DROP TABLE public.typed_members;

-- A program's first daily cap counts the day's purchases posted before it
-- was set: they join the cap's index (accrual_day_cap_idx) then. z-2 earns
-- what is left of 100 after z-1's 80, and z-3 on another day its whole.
SELECT loyalty.create_program('latecap', 'Late cap', 'UTC') > 0 AS created;
SELECT loyalty.enroll('latecap', 'z1', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('latecap', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
SELECT loyalty.accrue('latecap', 'z1', 80, 'z-1', '2025-03-01 09:00+00') AS earned;
SELECT day_capped FROM loyalty.accrual WHERE ref = 'z-1';
SELECT loyalty.set_earning_rules('latecap', '{"base": {"per": 1, "points": 1}, "caps": {"per_member_per_day": 100}}',
                                 '2025-03-01 10:00+00') AS version;
SELECT loyalty.accrue('latecap', 'z1', 50, 'z-2', '2025-03-01 11:00+00') AS earned_under_cap,
       loyalty.accrue('latecap', 'z1', 50, 'z-3', '2025-03-02 11:00+00') AS earned_next_day;
SELECT ref, day_capped FROM loyalty.accrual WHERE ref LIKE 'z-%' ORDER BY ref;

-- Numbers and times that are not finite are quarantined, never posted: a
-- NaN or infinite amount (22023), an infinite purchase time (22008), an
-- amount whose points could not be counted (22003). A
-- ref is measured in characters: 200 of them, 400 bytes, earns. An UPDATE
-- to a negative amount is quarantined (22023), and refunds nothing.
CREATE TABLE public.odd_orders (id text, customer text, total numeric, placed_at timestamptz);
SELECT loyalty.attach_accrual('public.odd_orders', 'shop', 'customer', 'total', 'id', 'placed_at');
INSERT INTO public.odd_orders VALUES
    ('d1', 'c1', 'NaN', '2025-04-01 10:00+00'),
    ('d2', 'c1', 'Infinity', '2025-04-01 10:00+00'),
    ('d3', 'c1', 10, 'infinity'),
    ('d4', 'c1', 10, '-infinity'),
    (repeat('é', 200), 'c1', 10, '2025-04-01 10:00+00'),
    ('d5', 'c1', 10, '2025-04-01 11:00+00'),
    ('d6', 'c1', 1e20, '2025-04-01 12:00+00');
SELECT length(ref) AS ref_length, points FROM loyalty.accrual WHERE ref LIKE 'é%' OR ref LIKE 'd_' ORDER BY ref;
SELECT ref, sqlstate, reason, row_data ->> 'total' AS total FROM loyalty.accrual_quarantine
WHERE source = 'public.odd_orders'::regclass ORDER BY id;
UPDATE public.odd_orders SET total = -5 WHERE id = 'd5';
SELECT ref, sqlstate, reason, row_data FROM loyalty.accrual_quarantine
WHERE source = 'public.odd_orders'::regclass AND kind = 'refund_to';
SELECT refunded_amount FROM loyalty.accrual WHERE ref = 'd5';
SELECT loyalty.detach_accrual('public.odd_orders');
DROP TABLE public.odd_orders;

-- A replay reads the amount and the time through the columns' own types:
-- money (whose text is '$7.50') and a timestamp without time zone, read in
-- the time zone of the session that inserted the row (10:00 in Tokyo is
-- 01:00 UTC), not the replaying session's.
SELECT loyalty.create_program('cash', 'Cash', 'UTC') > 0 AS created;
SELECT loyalty.set_earning_rules('cash', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
CREATE TABLE public.cash_sales (id int, who text, amt money, sold timestamp);
SELECT loyalty.attach_accrual('public.cash_sales', 'cash', 'who', 'amt', 'id', 'sold');
SET TIME ZONE 'Asia/Tokyo';
INSERT INTO public.cash_sales VALUES (1, 'cz', '$7.50', '2025-04-01 10:00');   -- not enrolled yet
SET TIME ZONE 'UTC';
SELECT time_zone FROM loyalty.accrual_quarantine WHERE source = 'public.cash_sales'::regclass;
SELECT ref, sqlstate, row_data ->> 'amt' AS amt FROM loyalty.accrual_quarantine WHERE source = 'public.cash_sales'::regclass;
SELECT loyalty.enroll('cash', 'cz', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT * FROM loyalty.replay_quarantine('cash');
SELECT ref, amount, occurred_at, points FROM loyalty.accrual WHERE program_id = (SELECT id FROM loyalty.program WHERE code = 'cash');
SELECT loyalty.detach_accrual('public.cash_sales');
DROP TABLE public.cash_sales;

-- A row quarantined before a column it was read from was renamed (detach,
-- rename, attach again) replays from the key it was stored under: the
-- quarantine row keeps the columns it was read through. A row quarantined
-- after the rename replays by the new names.
CREATE TABLE public.till (id text, who text, total numeric, at timestamptz);
SELECT loyalty.attach_accrual('public.till', 'cash', 'who', 'total', 'id', 'at');
INSERT INTO public.till VALUES ('t1', 'cy', 12.00, '2025-04-02 10:00+00');   -- cy is not enrolled yet
SELECT loyalty.detach_accrual('public.till');
ALTER TABLE public.till RENAME COLUMN total TO amount;
ALTER TABLE public.till RENAME COLUMN who TO customer;
SELECT loyalty.attach_accrual('public.till', 'cash', 'customer', 'amount', 'id', 'at');
INSERT INTO public.till VALUES ('t2', 'cy', 3.00, '2025-04-03 10:00+00');
SELECT ref, sqlstate, columns FROM loyalty.accrual_quarantine
WHERE source = 'public.till'::regclass ORDER BY id;
SELECT loyalty.enroll('cash', 'cy', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT * FROM loyalty.replay_quarantine('cash');
SELECT ref, amount, occurred_at, points FROM loyalty.accrual
WHERE program_id = (SELECT id FROM loyalty.program WHERE code = 'cash') AND ref LIKE 't%' ORDER BY ref;
SELECT loyalty.detach_accrual('public.till');
DROP TABLE public.till;

-- Two attached tables whose mapped columns have the same names, in another
-- order and of other types, in one session: each statement reads its own
-- table's rows (the trigger's plans are kept per table and row type).
SELECT loyalty.create_program('two', 'Two', 'UTC') > 0 AS created;
SELECT loyalty.enroll('two', m, occurred_at => '2025-01-01') > 0 AS enrolled FROM unnest(ARRAY['t1', 't2']) m;
SELECT loyalty.set_earning_rules('two', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
CREATE TABLE public.web_two (id text, cust text, total numeric, at timestamptz);
CREATE TABLE public.pos_two (cust text, id text, total money, at timestamptz);
SELECT loyalty.attach_accrual('public.web_two', 'two', 'cust', 'total', 'id', 'at');
SELECT loyalty.attach_accrual('public.pos_two', 'two', 'cust', 'total', 'id', 'at');
INSERT INTO public.web_two VALUES ('w1', 't1', 10, '2025-02-01'), ('w2', 't1', 11, '2025-02-01');
INSERT INTO public.pos_two VALUES ('t2', 'p1', '$30', '2025-02-01'), ('t2', 'p2', '$40', '2025-02-01');
INSERT INTO public.web_two VALUES ('w3', 't2', 12, '2025-02-01'), ('w4', 't2', 13, '2025-02-01');
SELECT a.ref, m.member_ref, a.points FROM loyalty.accrual a JOIN loyalty.member m ON m.id = a.member_id
WHERE a.program_id = (SELECT id FROM loyalty.program WHERE code = 'two') ORDER BY a.ref;
SELECT count(*) AS quarantined FROM loyalty.accrual_quarantine
WHERE source IN ('public.web_two'::regclass, 'public.pos_two'::regclass);
-- An application column named like a refund's marker (refund_of) does not
-- make a quarantined purchase a refund: the replay posts it.
CREATE TABLE public.marked (id text, cust text, total numeric, refund_of text);
SELECT loyalty.attach_accrual('public.marked', 'two', 'cust', 'total', 'id');
INSERT INTO public.marked VALUES ('mk1', 't3', 5, 'w1');   -- t3 is not enrolled yet
SELECT loyalty.enroll('two', 't3', occurred_at => '2025-01-01') > 0 AS enrolled;
SELECT * FROM loyalty.replay_quarantine('two');
SELECT ref, points, refunded_points FROM loyalty.accrual
WHERE ref IN ('w1', 'mk1') AND program_id = (SELECT id FROM loyalty.program WHERE code = 'two') ORDER BY ref;
SELECT loyalty.detach_accrual(t) FROM unnest(ARRAY['public.web_two', 'public.pos_two', 'public.marked']::regclass[]) t;
DROP TABLE public.web_two, public.pos_two, public.marked;

-- Rows are posted in the statement's order whatever plan the read query
-- gets: with statistics that make the planner hash the transition table,
-- the first of two rows with one ref still earns, the second is
-- quarantined (23505).
SELECT loyalty.create_program('order', 'Order', 'UTC') > 0 AS created;
SELECT count(loyalty.enroll('order', 'q' || i, occurred_at => '2025-01-01')) AS enrolled FROM generate_series(1, 200) i;
SELECT loyalty.set_earning_rules('order', '{"base": {"per": 1, "points": 1}}', '2025-01-01') AS version;
CREATE TABLE public.ordered (id text, customer text, total numeric);
SELECT loyalty.attach_accrual('public.ordered', 'order', 'customer', 'total', 'id');
ANALYZE loyalty.member, loyalty.account;
INSERT INTO public.ordered VALUES ('s1', 'q2', 30), ('s1', 'q1', 10), ('s2', 'q200', 5), ('s2', 'q3', 7);
SELECT a.ref, m.member_ref, a.points FROM loyalty.accrual a JOIN loyalty.member m ON m.id = a.member_id
WHERE a.ref IN ('s1', 's2') AND a.program_id = (SELECT id FROM loyalty.program WHERE code = 'order') ORDER BY a.ref;
SELECT ref, member_ref, sqlstate FROM loyalty.accrual_quarantine WHERE source = 'public.ordered'::regclass ORDER BY ref;
SELECT loyalty.detach_accrual('public.ordered');
DROP TABLE public.ordered;

-- DDL on an attached table. A column the triggers read cannot be dropped,
-- renamed or given a type they cannot read, and the accrual triggers cannot
-- be dropped or renamed alone: each would make every later INSERT fail, or
-- the sales earn nothing. Other DDL passes.
CREATE TABLE public.ddl_orders (id text, cust text, total numeric, at timestamptz, note text);
SELECT loyalty.attach_accrual('public.ddl_orders', 'shop', 'cust', 'total', 'id', 'at');
SELECT throws_ok($$ALTER TABLE public.ddl_orders DROP COLUMN total$$,
                 '2BP01', 'column "total" of "public.ddl_orders" is read by accrual');
SELECT throws_ok($$ALTER TABLE public.ddl_orders RENAME COLUMN at TO placed$$,
                 '2BP01', 'column "at" of "public.ddl_orders" is read by accrual');
SELECT throws_ok($$ALTER TABLE public.ddl_orders ALTER COLUMN total TYPE text$$,
                 '42804', 'column "total" of "public.ddl_orders" cannot hold amounts');
SELECT throws_ok($$DROP TRIGGER loyalty_accrual_insert ON public.ddl_orders$$,
                 '2BP01', 'cannot drop trigger loyalty_accrual_insert on "public.ddl_orders": accrual is attached to it');
SELECT throws_ok($$ALTER TRIGGER loyalty_accrual_delete ON public.ddl_orders RENAME TO gone$$,
                 '2BP01', 'cannot change trigger loyalty_accrual_delete on "public.ddl_orders": accrual is attached to it');
-- every command tag, and every attached table, is checked: a rename under
-- ALTER VIEW, an ALTER of a parent table or of a typed table's type, a
-- DROP ... CASCADE of a domain, a trigger replaced in place
SELECT throws_ok($$ALTER VIEW public.ddl_orders RENAME COLUMN total TO amount$$,
                 '2BP01', 'column "total" of "public.ddl_orders" is read by accrual');
CREATE TABLE public.ddl_parent (id text, cust text, total numeric);
CREATE TABLE public.ddl_child () INHERITS (public.ddl_parent);
SELECT loyalty.attach_accrual('public.ddl_child', 'shop', 'cust', 'total', 'id');
SELECT throws_ok($$ALTER TABLE public.ddl_parent RENAME COLUMN total TO amount$$,
                 '2BP01', 'column "total" of "public.ddl_child" is read by accrual');
SELECT throws_ok($$ALTER TABLE public.ddl_parent ALTER COLUMN total TYPE text$$,
                 '42804', 'column "total" of "public.ddl_child" cannot hold amounts');
CREATE TYPE public.ddl_row AS (id text, cust text, total numeric);
CREATE DOMAIN public.ddl_amount AS numeric;
CREATE TABLE public.ddl_typed OF public.ddl_row;
CREATE TABLE public.ddl_domain (id text, cust text, total public.ddl_amount);
SELECT loyalty.attach_accrual(t, 'shop', 'cust', 'total', 'id')
FROM unnest(ARRAY['public.ddl_typed', 'public.ddl_domain']::regclass[]) t;
SELECT throws_ok($$ALTER TYPE public.ddl_row RENAME ATTRIBUTE total TO amount CASCADE$$,
                 '2BP01', 'column "total" of "public.ddl_typed" is read by accrual');
SELECT throws_ok($$DROP DOMAIN public.ddl_amount CASCADE$$,
                 '2BP01', 'column "total" of "public.ddl_domain" is read by accrual');
CREATE FUNCTION public.ddl_noop() RETURNS trigger LANGUAGE plpgsql AS $f$BEGIN RETURN NULL; END$f$;
SELECT throws_ok($$CREATE OR REPLACE TRIGGER loyalty_accrual_insert AFTER INSERT ON public.ddl_orders
                   FOR EACH STATEMENT EXECUTE FUNCTION public.ddl_noop()$$,
                 '2BP01', 'cannot change trigger loyalty_accrual_insert on "public.ddl_orders": accrual is attached to it');
SELECT throws_ok($$CREATE OR REPLACE TRIGGER loyalty_accrual_insert AFTER INSERT ON public.ddl_orders
                   REFERENCING NEW TABLE AS loyalty_new FOR EACH STATEMENT WHEN (false)
                   EXECUTE FUNCTION loyalty._accrual_trigger()$$,
                 '2BP01', 'cannot change trigger loyalty_accrual_insert on "public.ddl_orders": accrual is attached to it');
SELECT loyalty.detach_accrual(t)
FROM unnest(ARRAY['public.ddl_child', 'public.ddl_typed', 'public.ddl_domain']::regclass[]) t;
DROP TABLE public.ddl_child, public.ddl_parent, public.ddl_typed, public.ddl_domain;
DROP TYPE public.ddl_row;
DROP DOMAIN public.ddl_amount;
DROP FUNCTION public.ddl_noop();
-- a temporary table would go at the end of its session unseen
CREATE TEMP TABLE ddl_temp (id text, cust text, total numeric);
SELECT throws_ok($$SELECT loyalty.attach_accrual('ddl_temp', 'shop', 'cust', 'total', 'id')$$,
                 '42809', '"ddl_temp" is a temporary table');
DROP TABLE ddl_temp;
SELECT lives_ok($$ALTER TABLE public.ddl_orders ALTER COLUMN total TYPE numeric(12,2), DROP COLUMN note,
                  ADD PRIMARY KEY (id)$$, 'other DDL, and a type accrual reads, pass');
SELECT lives_ok($$INSERT INTO public.ddl_orders VALUES ('dd1', 'c1', 12.50, '2025-05-01'),
                                                       ('dd2', NULL, 5, '2025-05-01')$$,
                'the altered table earns, and quarantines');
-- A dropped table takes its attachment with it; its quarantined row stays
-- and replays with LY013.
SELECT lives_ok($$DROP TABLE public.ddl_orders$$, 'DROP TABLE');
SELECT is((SELECT count(*) FROM loyalty.accrual_source WHERE source::oid NOT IN (SELECT oid FROM pg_class)),
          0::bigint, 'no attachment is left for the dropped table');
SELECT points FROM loyalty.accrual WHERE ref = 'dd1';
SELECT * FROM loyalty.replay_quarantine('shop', (SELECT source FROM loyalty.accrual_quarantine WHERE ref = 'dd2'));
SELECT ref, sqlstate, reason ~ '^the table this row came from \(oid \d+\) was dropped$' AS dropped
FROM loyalty.accrual_quarantine WHERE ref = 'dd2';

-- A waiting row follows the application's UPDATE even when the UPDATE
-- changes its ref: a NULL or wrong ref corrected in the application is a
-- fix a replay sees. The row is matched by the whole row it was
-- quarantined as; two rows corrected by one statement each get their own
-- new version (the transition tables pair them by position, a wrong
-- pairing would swap c1 and c2). A DELETE withdraws a row whose ref is NULL.
CREATE TABLE public.loose_orders (id text, customer text, total numeric, placed_at timestamptz, note text);
SELECT loyalty.attach_accrual('public.loose_orders', 'shop', 'customer', 'total', 'id', 'placed_at');
INSERT INTO public.loose_orders VALUES
    (NULL, 'c1', 10.00, '2025-05-01', 'no ref 1'),
    (NULL, 'c2', 20.00, '2025-05-01', 'no ref 2'),
    (NULL, 'c1', 30.00, '2025-05-01', 'no ref 3'),
    ('lo4', 'c1', -4.00, '2025-05-01', 'negative');
SELECT ref, member_ref, sqlstate, row_data ->> 'note' AS note
FROM loyalty.accrual_quarantine WHERE source = 'public.loose_orders'::regclass ORDER BY id;
UPDATE public.loose_orders SET id = 'lo' || right(note, 1) WHERE note IN ('no ref 1', 'no ref 2');
UPDATE public.loose_orders SET id = 'lo4b', total = 4.00 WHERE id = 'lo4';
DELETE FROM public.loose_orders WHERE note = 'no ref 3';
SELECT ref, member_ref, withdrawn_at IS NOT NULL AS withdrawn, row_data ->> 'id' AS id,
       row_data ->> 'customer' AS customer, row_data ->> 'total' AS total
FROM loyalty.accrual_quarantine WHERE source = 'public.loose_orders'::regclass ORDER BY id;
SELECT * FROM loyalty.replay_quarantine('shop', 'public.loose_orders');
SELECT a.ref, m.member_ref, a.amount, a.points
FROM loyalty.accrual a JOIN loyalty.member m ON m.id = a.member_id
WHERE a.ref LIKE 'lo%' ORDER BY a.ref;

-- A DELETE whose refunds outlast statement_timeout is cancelled, as any
-- statement is: the cancel reaches the refund under way, which raises it
-- rather than quarantining that one refund and going on with the others
-- (the statement would have run past its timeout, and an administrator
-- would have had a refund to replay). Wherever the timeout falls, nothing
-- of the statement stays.
CREATE TABLE public.timed_orders (id text PRIMARY KEY, customer text, total numeric, placed_at timestamptz);
SELECT loyalty.attach_accrual('public.timed_orders', 'shop', 'customer', 'total', 'id', 'placed_at');
INSERT INTO public.timed_orders SELECT 'to' || i, 'c1', 10.00, '2025-05-02' FROM generate_series(1, 3000) i;
\set VERBOSITY terse
SET statement_timeout = '200ms';
DELETE FROM public.timed_orders;
RESET statement_timeout;
\set VERBOSITY default
SELECT (SELECT count(*) FROM public.timed_orders) AS orders_left,
       (SELECT count(*) FROM loyalty.accrual_quarantine WHERE source = 'public.timed_orders'::regclass) AS quarantined,
       (SELECT count(*) FROM loyalty.accrual WHERE ref LIKE 'to%' AND refunded_points > 0) AS refunded;
SELECT loyalty.detach_accrual('public.timed_orders');

-- A statement's purchases are written all at once, in a subtransaction
-- (docs/accrual.md, "Writing many purchases at once"); a transaction takes
-- at most 32 such subtransactions, and its later chunks write their
-- purchases one by one, with the transaction's own xid. 35 chunks of 1,000:
-- 32 subtransactions' xids and the transaction's own on the last 3,000.
CREATE TABLE public.many_orders (id text PRIMARY KEY, customer text, total numeric, placed_at timestamptz);
SELECT loyalty.attach_accrual('public.many_orders', 'shop', 'customer', 'total', 'id', 'placed_at');
BEGIN;
SET LOCAL loyalty.accrual_chunk = 1000;
INSERT INTO public.many_orders SELECT 'mo' || i, 'c1', 1.00, '2025-06-01' FROM generate_series(1, 35000) i;
SELECT count(DISTINCT a.xmin::text) AS xids,
       count(*) FILTER (WHERE a.xmin::text::bigint = txid_current() % 4294967296) AS own_xid,
       count(*) AS purchases
FROM loyalty.accrual a WHERE a.ref LIKE 'mo%';
COMMIT;
-- An error while they are written (here the journal's sequence runs out):
-- the subtransaction is rolled back with the statement, nothing of it
-- stays, and the transaction goes on from its savepoint.
SELECT last_value + 1500 AS seq_max FROM loyalty.transfer_id_seq \gset
ALTER SEQUENCE loyalty.transfer_id_seq MAXVALUE :seq_max NO CYCLE;
BEGIN;
SAVEPOINT before;
\set VERBOSITY sqlstate
INSERT INTO public.many_orders SELECT 'mx' || i, 'c1', 1.00, '2025-06-02' FROM generate_series(1, 2000) i;
\set VERBOSITY default
ROLLBACK TO SAVEPOINT before;
ALTER SEQUENCE loyalty.transfer_id_seq NO MAXVALUE;
INSERT INTO public.many_orders SELECT 'my' || i, 'c1', 1.00, '2025-06-02' FROM generate_series(1, 1200) i;
COMMIT;
SELECT count(*) FILTER (WHERE ref LIKE 'mx%') AS mx, count(*) FILTER (WHERE ref LIKE 'my%') AS my,
       (SELECT count(*) FROM public.many_orders WHERE id LIKE 'mx%') AS mx_orders
FROM loyalty.accrual;
-- A chunked statement of 3,000 members, each earning for its own: the
-- members read for the lock query (more than its set of them starts with)
-- and the accounts it locks are all of them, and no row is quarantined.
SELECT count(loyalty.enroll('shop', 'dm' || i, occurred_at => '2025-01-01')) AS enrolled
FROM generate_series(1, 3000) i;
SET loyalty.accrual_chunk = 1000;
INSERT INTO public.many_orders
SELECT 'dm-o' || i, 'dm' || (i * 7 % 3000 + 1), 2.00, '2025-06-03' FROM generate_series(1, 3600) i;
RESET loyalty.accrual_chunk;
SELECT count(*) AS purchases, count(DISTINCT a.member_id) AS members,
       count(*) FILTER (WHERE m.member_ref = o.customer) AS own_member
FROM loyalty.accrual a JOIN loyalty.member m ON m.id = a.member_id JOIN public.many_orders o ON o.id = a.ref
WHERE a.ref LIKE 'dm-o%';
SELECT count(*) AS quarantined FROM loyalty.accrual_quarantine WHERE ref LIKE 'dm-o%';
-- Such a write looks each block range of the time index up once, and
-- inserts its rows into the range's summary only when it has one: here
-- the table's last range is summarized first (brin_summarize_new_values
-- takes the partial one too), and purchases of 2031 that go into it must
-- widen it, or the index would hide them.
SELECT brin_summarize_new_values('loyalty.accrual_time_brin') >= 0 AS summarized;
INSERT INTO public.many_orders SELECT 'mb' || i, 'c1', 1.00, '2031-01-01' FROM generate_series(1, 1500) i;
SET enable_seqscan = off;
SET enable_indexscan = off;
EXPLAIN (COSTS OFF) SELECT count(*) FROM loyalty.accrual WHERE occurred_at >= '2031-01-01';
SELECT count(*) AS purchases_of_2031 FROM loyalty.accrual WHERE occurred_at >= '2031-01-01';
RESET enable_seqscan;
RESET enable_indexscan;
SELECT loyalty.detach_accrual('public.many_orders');

-- Detach: the triggers go, what was posted stays.
SELECT loyalty.detach_accrual('public.orders');
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass;
INSERT INTO public.orders VALUES ('o99', 'c1', 100.00, '2025-05-01', 'books', NULL);
SELECT count(*) AS o99 FROM loyalty.accrual WHERE ref = 'o99';
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('shop');
-- Every purchase posted above (bulk, chunks, repeated refs, quarantined
-- rows) points to its own journal line, and only those that earned do.
SELECT count(*) AS misfiled_transfers
FROM loyalty.accrual a FULL JOIN (SELECT * FROM loyalty.transfer WHERE kind = 'accrual') t ON t.id = a.transfer_id
WHERE CASE WHEN t.id IS NULL THEN a.points <> 0 OR a.transfer_id IS NOT NULL
           WHEN a.ref IS NULL THEN true
           ELSE a.ref <> t.ref OR a.account_id <> t.credit_account_id OR a.points <> t.amount::bigint END;
