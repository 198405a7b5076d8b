-- An order deleted from an attached table and inserted again (a sync job
-- reloading a day's orders) gets back what the DELETE's refund took: the
-- refund is undone (refund_undo), restoring exactly the lots it took.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';

-- A member's balances, what its lots hold, what it owes.
CREATE FUNCTION pg_temp.state(p text, m text)
RETURNS TABLE (available bigint, pending bigint, lots bigint, debt bigint)
LANGUAGE sql AS $$
    SELECT a.available::bigint, a.pending::bigint,
           -- the lots, and the deferred purchases' lots not written yet (docs/accrual.md)
           (SELECT coalesce(sum(l.remaining::bigint), 0)::bigint FROM loyalty.lot l WHERE l.account_id = a.id)
           + (SELECT coalesce(sum(x.points), 0)::bigint FROM loyalty.accrual x
               WHERE x.account_id = a.id AND x.transfer_id IS NULL AND x.points > 0),
           (SELECT coalesce(sum(d.outstanding), 0)::bigint FROM loyalty.accrual_debt d WHERE d.account_id = a.id)
    FROM loyalty.account a JOIN loyalty.member mm ON mm.id = a.member_id
    JOIN loyalty.program pr ON pr.id = mm.program_id
    WHERE pr.code = p AND mm.member_ref = m
$$;

SELECT loyalty.create_program('shop', 'Shop', 'UTC') > 0 AS created;
SELECT loyalty.enroll('shop', m, occurred_at => '2025-01-01 00:00+00') > 0 AS enrolled
FROM unnest(ARRAY['c1', 'c2', 'c3', 'c4']) m;
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}, "pending_days": 30}',
                                 '2025-01-01') AS version;
CREATE TABLE public.orders (id text PRIMARY KEY, customer text, total numeric(12,2), placed_at timestamptz);
SELECT loyalty.attach_accrual('public.orders', 'shop', 'customer', 'total', 'id', 'placed_at');

-- One moment for the whole file: an order inserted again is the same
-- order only with the same time.
SELECT now() AS t0 \gset
SELECT plan(6);

-- c1: 100 pending (o1) and 40 available (o2, past its window). Deleting o1
-- takes its 100 pending points; inserting it again gives them back to the
-- same lot, still pending.
INSERT INTO public.orders VALUES ('o1', 'c1', 100, :'t0'::timestamptz - interval '1 day'),
                                 ('o2', 'c1', 40, :'t0'::timestamptz - interval '60 days');
SELECT loyalty.run_job('vest', now()) IS NOT NULL AS vested;
SELECT * FROM pg_temp.state('shop', 'c1');
DELETE FROM public.orders WHERE id = 'o1';
SELECT * FROM pg_temp.state('shop', 'c1');
INSERT INTO public.orders VALUES ('o1', 'c1', 100, :'t0'::timestamptz - interval '1 day');
SELECT * FROM pg_temp.state('shop', 'c1');
SELECT l.amount, l.remaining, l.pending FROM loyalty.lot l JOIN loyalty.accrual a ON a.transfer_id = l.transfer_id
WHERE a.ref = 'o1';
SELECT ref, refunded_amount, refunded_points FROM loyalty.accrual WHERE ref = 'o1';
SELECT refund_ref, points, taken, restored_at IS NOT NULL AS restored FROM loyalty.accrual_refund
WHERE purchase_ref = 'o1';
-- Inserted again, as a retried import: a repeat, nothing more.
INSERT INTO public.orders VALUES ('o1', 'c1', 100, :'t0'::timestamptz - interval '1 day') ON CONFLICT DO NOTHING;
DELETE FROM public.orders WHERE id = 'o1';
INSERT INTO public.orders VALUES ('o1', 'c1', 100, :'t0'::timestamptz - interval '1 day');
INSERT INTO public.orders SELECT 'o1', 'c1', 100, :'t0'::timestamptz WHERE false;
SELECT * FROM pg_temp.state('shop', 'c1');
-- Each deletion is a refund of its own, each insertion undoes the last one.
SELECT refund_ref, points, restored_at IS NOT NULL AS restored FROM loyalty.accrual_refund
WHERE purchase_ref = 'o1' ORDER BY refund_ref;
SELECT kind, ref, points FROM loyalty.statement('shop', 'c1') ORDER BY transfer_id;
-- explain_accrual still explains the purchase, unrefunded.
SELECT (loyalty.explain_accrual('shop', 'o1') ->> 'points')::bigint AS points;

-- A partial refund (the amount lowered) stays when the deleted order
-- comes back: only the DELETE's refund is undone.
INSERT INTO public.orders VALUES ('o3', 'c2', 80, :'t0'::timestamptz - interval '60 days');
SELECT loyalty.run_job('vest', now()) IS NOT NULL AS vested;
UPDATE public.orders SET total = 50 WHERE id = 'o3';
DELETE FROM public.orders WHERE id = 'o3';
SELECT * FROM pg_temp.state('shop', 'c2');
-- the row as it was first posted: the same purchase
INSERT INTO public.orders VALUES ('o3', 'c2', 80, :'t0'::timestamptz - interval '60 days');
SELECT * FROM pg_temp.state('shop', 'c2');
SELECT ref, refunded_amount, refunded_points FROM loyalty.accrual WHERE ref = 'o3';

-- The order back with its amount as it was when deleted (lowered from 80
-- to 50 by a partial return): the DELETE's refund is undone, the partial
-- refund stays. Back with less than that (a correction in the reload):
-- undone, then refunded down to it. Back with more: undone, and the raise
-- earns nothing, as an UPDATE raising the amount would.
INSERT INTO public.orders VALUES ('o9', 'c2', 80, :'t0'::timestamptz - interval '60 days'),
                                 ('o10', 'c2', 100, :'t0'::timestamptz - interval '60 days'),
                                 ('o11', 'c2', 20, :'t0'::timestamptz - interval '60 days');
UPDATE public.orders SET total = 50 WHERE id = 'o9';
DELETE FROM public.orders WHERE id IN ('o9', 'o10', 'o11');
INSERT INTO public.orders VALUES ('o9', 'c2', 50, :'t0'::timestamptz - interval '60 days'),
                                 ('o10', 'c2', 60, :'t0'::timestamptz - interval '60 days'),
                                 ('o11', 'c2', 35, :'t0'::timestamptz - interval '60 days');
SELECT ref, points, refunded_amount, refunded_points FROM loyalty.accrual WHERE ref IN ('o9', 'o10', 'o11') ORDER BY ref;
SELECT refund_ref, points, restored_at IS NOT NULL AS restored FROM loyalty.accrual_refund
WHERE purchase_ref IN ('o9', 'o10', 'o11') ORDER BY refund_ref;
SELECT count(*) AS quarantined FROM loyalty.accrual_quarantine WHERE ref IN ('o9', 'o10', 'o11');
SELECT * FROM pg_temp.state('shop', 'c2');

-- Spent points: c3 earns 100 (o4) and 30 (o5) and spends 120 (all of
-- o4's lot, 20 of o5's). Deleting o4 takes what is left, 10 of o5's lot,
-- and records 90 as owed. o4 back gives o5's lot its 10 and cancels the
-- debt: the member is as before the DELETE.
INSERT INTO public.orders VALUES ('o4', 'c3', 100, :'t0'::timestamptz - interval '60 days'),
                                 ('o5', 'c3', 30, :'t0'::timestamptz - interval '50 days');
SELECT loyalty.run_job('vest', now()) IS NOT NULL AS vested;
SELECT loyalty.adjust('shop', 'c3', -120, 'c3-spend', 'spent in store') > 0 AS spent;
SELECT * FROM pg_temp.state('shop', 'c3');
DELETE FROM public.orders WHERE id = 'o4';
SELECT * FROM pg_temp.state('shop', 'c3');
SELECT refund_ref, points, taken, shortfall FROM loyalty.accrual_refund WHERE purchase_ref = 'o4';
INSERT INTO public.orders VALUES ('o4', 'c3', 100, :'t0'::timestamptz - interval '60 days');
SELECT * FROM pg_temp.state('shop', 'c3');
SELECT refund_ref, amount, outstanding, cancelled_at IS NOT NULL AS cancelled FROM loyalty.accrual_debt
WHERE refund_ref LIKE 'o4:%';

-- Brought back in one statement with a new sale of the member: the debt
-- is cancelled before the statement's sales would pay it, so c5 keeps
-- the 40 of o13.
SELECT loyalty.enroll('shop', 'c5', occurred_at => '2025-01-01') > 0 AS enrolled;
INSERT INTO public.orders VALUES ('o12', 'c5', 100, :'t0'::timestamptz - interval '60 days');
SELECT loyalty.run_job('vest', now()) IS NOT NULL AS vested;
SELECT loyalty.adjust('shop', 'c5', -100, 'c5-spend', 'spent in store') > 0 AS spent;
DELETE FROM public.orders WHERE id = 'o12';
SELECT * FROM pg_temp.state('shop', 'c5');
INSERT INTO public.orders VALUES ('o12', 'c5', 100, :'t0'::timestamptz - interval '60 days'),
                                 ('o13', 'c5', 40, :'t0'::timestamptz - interval '40 days');
SELECT * FROM pg_temp.state('shop', 'c5');

-- A debt recovered in part since (a later sale, o14, paid 50 of it): the
-- refund is undone all the same. What is still owed is cancelled, the 40
-- it took from o13's lot go back there (and repay o13's own refund at
-- once: o13 is deleted too), and the 50 o14 paid go back to o14's lot.
-- c5 ends with o14's 50, as if o12 had never been deleted.
DELETE FROM public.orders WHERE id = 'o12';
DELETE FROM public.orders WHERE id = 'o13';
SELECT * FROM pg_temp.state('shop', 'c5');
INSERT INTO public.orders VALUES ('o14', 'c5', 50, :'t0'::timestamptz - interval '30 days');
SELECT * FROM pg_temp.state('shop', 'c5');
SELECT lives_ok(format($$INSERT INTO public.orders VALUES ('o12', 'c5', 100, %L::timestamptz - interval '60 days')$$,
                       :'t0'),
                'an order whose refund''s debt was repaid in part inserts');
SELECT * FROM pg_temp.state('shop', 'c5');
SELECT refund_ref, amount, outstanding, given_back, cancelled_at IS NOT NULL AS cancelled FROM loyalty.accrual_debt
WHERE refund_ref LIKE 'o12:%' OR refund_ref LIKE 'o13:%' ORDER BY refund_ref;
SELECT a.ref, l.remaining FROM loyalty.lot l JOIN loyalty.accrual a ON a.transfer_id = l.transfer_id
WHERE a.account_id = l.account_id AND a.ref IN ('o12', 'o13', 'o14') ORDER BY a.ref;
SELECT t.kind, t.ref, t.amount FROM loyalty.transfer t JOIN loyalty.account ac ON ac.id IN (t.debit_account_id, t.credit_account_id)
JOIN loyalty.member m ON m.id = ac.member_id WHERE m.member_ref = 'c5' AND t.kind IN ('refund_undo', 'recover', 'recover_return')
ORDER BY t.id;
SELECT count(*) AS quarantined FROM loyalty.accrual_quarantine WHERE ref = 'o12';

-- A debt shown as a negative balance (the program's shortfall was
-- "negative" at the refund) is not undone (LY014): the statement has
-- shown it. The insertion is quarantined and replays with the same error;
-- the order deleted again withdraws it.
SELECT loyalty.enroll('shop', 'c6', occurred_at => '2025-01-01') > 0 AS enrolled;
INSERT INTO public.orders VALUES ('o15', 'c6', 100, :'t0'::timestamptz - interval '60 days');
SELECT loyalty.run_job('vest', now()) IS NOT NULL AS vested;
SELECT loyalty.adjust('shop', 'c6', -100, 'c6-spend', 'spent in store') > 0 AS spent;
SELECT loyalty.update_program('shop', '{"shortfall": "negative"}', 'owed points below zero') AS version;
DELETE FROM public.orders WHERE id = 'o15';
SELECT loyalty.update_program('shop', '{"shortfall": "debt"}', 'owed points apart again') AS version;
SELECT * FROM pg_temp.state('shop', 'c6');
SELECT lives_ok(format($$INSERT INTO public.orders VALUES ('o15', 'c6', 100, %L::timestamptz - interval '60 days')$$,
                       :'t0'),
                'an order whose refund cannot be undone still inserts');
SELECT * FROM pg_temp.state('shop', 'c6');
SELECT kind, ref, sqlstate, reason, row_data FROM loyalty.accrual_quarantine WHERE ref = 'o15';
SELECT throws_ok($$SELECT loyalty._restore_deleted('shop', 'o15')$$, 'LY014',
                 'the refund "o15:deleted" of purchase "o15" cannot be undone');
SELECT * FROM loyalty.replay_quarantine('shop');
DELETE FROM public.orders WHERE id = 'o15';
SELECT kind, withdrawn_at IS NOT NULL AS withdrawn FROM loyalty.accrual_quarantine WHERE ref = 'o15';
SELECT * FROM pg_temp.state('shop', 'c6');

-- The refund took points from other lots: undoing it gives them back to
-- those lots. c4 earns 100 (o6) and 50 (o7), spends 100 (o6's lot, the
-- oldest), then earns 80 (o8). Deleting o6 takes 100 from o7's and o8's
-- lots (nothing owed); o6 back gives each lot exactly what it lost.
INSERT INTO public.orders VALUES ('o6', 'c4', 100, :'t0'::timestamptz - interval '70 days'),
                                 ('o7', 'c4', 50, :'t0'::timestamptz - interval '65 days');
SELECT loyalty.run_job('vest', now()) IS NOT NULL AS vested;
SELECT loyalty.adjust('shop', 'c4', -100, 'c4-spend', 'spent in store') > 0 AS spent;
INSERT INTO public.orders VALUES ('o8', 'c4', 80, :'t0'::timestamptz - interval '60 days');
SELECT loyalty.run_job('vest', now()) IS NOT NULL AS vested;
DELETE FROM public.orders WHERE id = 'o6';
SELECT refund_ref, points, taken, shortfall, forgiven FROM loyalty.accrual_refund WHERE purchase_ref = 'o6';
SELECT * FROM pg_temp.state('shop', 'c4');
SELECT a.ref, l.remaining FROM loyalty.lot l JOIN loyalty.accrual a ON a.transfer_id = l.transfer_id
WHERE a.account_id = l.account_id AND a.ref IN ('o6', 'o7', 'o8') ORDER BY a.ref;
INSERT INTO public.orders VALUES ('o6', 'c4', 100, :'t0'::timestamptz - interval '70 days');
SELECT * FROM pg_temp.state('shop', 'c4');
SELECT a.ref, l.remaining FROM loyalty.lot l JOIN loyalty.accrual a ON a.transfer_id = l.transfer_id
WHERE a.account_id = l.account_id AND a.ref IN ('o6', 'o7', 'o8') ORDER BY a.ref;

-- A whole day reloaded in one statement each: every order comes back.
INSERT INTO public.orders SELECT 'd' || i, 'c1', 10 * i, :'t0'::timestamptz - interval '2 days' FROM generate_series(1, 20) i;
SELECT * FROM pg_temp.state('shop', 'c1');
CREATE TABLE pg_temp.day AS SELECT * FROM public.orders WHERE id LIKE 'd%';
DELETE FROM public.orders WHERE id LIKE 'd%';
SELECT * FROM pg_temp.state('shop', 'c1');
INSERT INTO public.orders SELECT * FROM pg_temp.day;
SELECT * FROM pg_temp.state('shop', 'c1');
SELECT count(*) AS undone FROM loyalty.accrual_refund WHERE purchase_ref LIKE 'd%' AND restored_at IS NOT NULL;

-- A different order under a deleted ref (another member) is refused as
-- before (23505), and the deletion's refund stays.
DELETE FROM public.orders WHERE id = 'd1';
INSERT INTO public.orders VALUES ('d1', 'c2', 10, :'t0'::timestamptz - interval '2 days');
SELECT kind, sqlstate FROM loyalty.accrual_quarantine WHERE ref = 'd1';
SELECT refund_ref, restored_at IS NOT NULL AS restored FROM loyalty.accrual_refund
WHERE purchase_ref = 'd1' ORDER BY refund_ref;
-- Corrected in the application to the purchase it is (member c1), the
-- waiting row replays as the trigger would have taken it: the deletion's
-- refund is undone, down to the row's lowered amount (10 to 8).
UPDATE public.orders SET customer = 'c1', total = 8 WHERE id = 'd1';
SELECT * FROM pg_temp.state('shop', 'c1');
SELECT * FROM loyalty.replay_quarantine('shop', 'public.orders');
SELECT kind, sqlstate, replayed_at IS NOT NULL AS replayed FROM loyalty.accrual_quarantine WHERE ref = 'd1';
SELECT refund_ref, points, restored_at IS NOT NULL AS restored FROM loyalty.accrual_refund
WHERE purchase_ref = 'd1' ORDER BY refund_ref;
SELECT * FROM pg_temp.state('shop', 'c1');

-- An UPDATE changing the ref of an order that earned: the old ref is
-- refunded as a DELETE refunds it, the new one earns as an INSERT would
-- (two rows in one statement, each with its own). Deleting the row then
-- refunds it under its new ref. Changing the ref back brings the old
-- purchase back (its refund undone, then refunded down to a lowered
-- amount) and refunds the other. c2 holds 100 more pending after the
-- first UPDATE, 70 after the DELETE, 50 in the end.
SELECT * FROM pg_temp.state('shop', 'c2');
INSERT INTO public.orders VALUES ('r1', 'c2', 70, :'t0'::timestamptz - interval '3 days'),
                                 ('r2', 'c2', 30, :'t0'::timestamptz - interval '3 days');
UPDATE public.orders SET id = id || 'x' WHERE id IN ('r1', 'r2');
SELECT * FROM pg_temp.state('shop', 'c2');
SELECT ref, amount, points, refunded_points FROM loyalty.accrual WHERE ref LIKE 'r_%' ORDER BY ref;
DELETE FROM public.orders WHERE id = 'r2x';
SELECT * FROM pg_temp.state('shop', 'c2');
UPDATE public.orders SET id = 'r1', total = 50 WHERE id = 'r1x';
SELECT * FROM pg_temp.state('shop', 'c2');
SELECT ref, amount, points, refunded_amount, refunded_points FROM loyalty.accrual WHERE ref LIKE 'r_%' ORDER BY ref;
SELECT refund_ref, points, restored_at IS NOT NULL AS restored FROM loyalty.accrual_refund
WHERE purchase_ref LIKE 'r_%' ORDER BY refund_ref;

-- Through the function API a repeat is only a repeat.
SELECT loyalty.accrue('shop', 'c2', 15, 'api-1', :'t0'::timestamptz - interval '1 day') AS earned;
SELECT loyalty.refund('shop', 'api-1', NULL, 'api-1:deleted') AS clawed;
SELECT loyalty.accrue('shop', 'c2', 15, 'api-1', :'t0'::timestamptz - interval '1 day') AS repeat;
SELECT refund_ref, restored_at IS NOT NULL AS restored FROM loyalty.accrual_refund WHERE purchase_ref = 'api-1';

SELECT is((SELECT count(*) FROM loyalty.verify_chain('shop')), 0::bigint, 'the chain holds');
-- Every member's balances are what its lots hold.
SELECT is((SELECT count(*) FROM loyalty.account a
           WHERE a.member_id IS NOT NULL
             AND a.available::bigint + a.pending::bigint
                 <> (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l WHERE l.account_id = a.id)),
          0::bigint, 'balances match the lots');
-- What a purchase counts as refunded is what its refunds not undone add up to.
SELECT is((SELECT count(*) FROM loyalty.accrual x
           WHERE x.refunded_points <> (SELECT coalesce(sum(r.points), 0) FROM loyalty.accrual_refund r
                                       WHERE r.program_id = x.program_id AND r.purchase_ref = x.ref
                                         AND r.restored_at IS NULL)),
          0::bigint, 'refunded points are the refunds not undone');
SELECT * FROM finish();
DROP TABLE public.orders;
