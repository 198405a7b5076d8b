-- Random table traffic against one attached table, 2,000 steps under a
-- fixed seed: sales, amounts lowered, refs changed, orders deleted and
-- brought back (the same or lowered), redemptions and their cancels, vest
-- and expire runs.
-- Whatever the sequence, no point is lost or made: balances are their
-- lots, a purchase's refunded figures are its refunds not undone, an order
-- in the table counts for exactly its amount (at most what it was posted
-- with), an order gone counts for nothing, and the chains hold. The only
-- failures allowed are spending more than the balance (LY001) and undoing
-- a DELETE whose refund's debt was recovered in part since (LY014,
-- quarantined).
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';

SELECT loyalty.create_program('f', 'F', 'UTC', '{"expiry": {"policy": "fixed", "after": "30 days"}}') > 0;
SELECT loyalty.set_earning_rules('f', '{"base": {"per": 1, "points": 1}, "pending_days": 5}', '2020-01-01');
SELECT loyalty.add_reward('f', 'r10', 'R10', 10);
SELECT count(loyalty.enroll('f', 'm' || i, occurred_at => '2020-01-01')) FROM generate_series(1, 4) i;
CREATE TABLE public.fz_orders (id text PRIMARY KEY, customer text, total numeric(12,2), placed_at timestamptz);
SELECT loyalty.attach_accrual('public.fz_orders', 'f', 'customer', 'total', 'id', 'placed_at');
CREATE TABLE public.fz_gone (LIKE public.fz_orders);          -- deleted rows, to bring back
CREATE TABLE public.fz_log (step int, op text, err text);
DO $$
DECLARE
    i int; m text; op float; ref text; state text; msg text; g public.fz_orders;
BEGIN
    PERFORM setseed(0.17);
    FOR i IN 1..2000 LOOP
        m := 'm' || (1 + floor(random() * 4))::int;
        op := random();
        BEGIN
            IF op < 0.25 THEN
                INSERT INTO public.fz_orders VALUES ('o' || i, m, 5 + floor(random() * 60), now() - (floor(random() * 50) || ' days')::interval);
            ELSIF op < 0.35 THEN
                SELECT id INTO ref FROM public.fz_orders ORDER BY random() LIMIT 1;
                UPDATE public.fz_orders SET total = greatest(total - 1 - floor(random() * 20), 0) WHERE id = ref;
            ELSIF op < 0.40 THEN
                -- its ref changed: the old order goes (and may come back), the new one earns
                SELECT id INTO ref FROM public.fz_orders ORDER BY random() LIMIT 1;
                INSERT INTO public.fz_gone SELECT * FROM public.fz_orders WHERE id = ref;
                UPDATE public.fz_orders SET id = 'n' || i WHERE id = ref;
            ELSIF op < 0.55 THEN
                SELECT id INTO ref FROM public.fz_orders ORDER BY random() LIMIT 1;
                INSERT INTO public.fz_gone SELECT * FROM public.fz_orders WHERE id = ref ON CONFLICT DO NOTHING;
                DELETE FROM public.fz_orders WHERE id = ref;
            ELSIF op < 0.70 THEN
                SELECT * INTO g FROM public.fz_gone ORDER BY random() LIMIT 1;
                IF g.id IS NOT NULL THEN
                    DELETE FROM public.fz_gone WHERE id = g.id;
                    IF random() < 0.3 THEN g.total := greatest(g.total - floor(random() * 10), 0); END IF;
                    INSERT INTO public.fz_orders VALUES (g.*);
                END IF;
            ELSIF op < 0.80 THEN
                PERFORM loyalty.redeem('f', m, 'r10', 'x' || i, 1, now());
            ELSIF op < 0.88 THEN
                SELECT x.ref INTO ref FROM loyalty.redemption x WHERE x.cancel_transfer_id IS NULL ORDER BY random() LIMIT 1;
                IF ref IS NOT NULL THEN PERFORM loyalty.cancel_redemption('f', ref); END IF;
            ELSIF op < 0.94 THEN
                PERFORM loyalty.run_job('vest', now());
            ELSE
                PERFORM loyalty.run_job('expire', now());
            END IF;
        EXCEPTION WHEN others THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            INSERT INTO public.fz_log VALUES (i, op::text, state || ' ' || msg);
        END;
    END LOOP;
END $$;
SELECT plan(8);
SELECT is((SELECT count(*) FROM public.fz_log WHERE err NOT LIKE 'LY001 %'), 0::bigint,
          'no step failed but for spending more than the balance');
SELECT is((SELECT count(*) FROM loyalty.accrual_quarantine
           WHERE replayed_at IS NULL AND withdrawn_at IS NULL AND (kind <> 'restore' OR sqlstate <> 'LY014')),
          0::bigint, 'nothing waits in the quarantine but undoings that cannot be done (LY014)');
SELECT is((SELECT count(*) FROM loyalty.verify_chain('f')), 0::bigint, 'the chains hold');
SELECT is((SELECT count(*) FROM loyalty.account a WHERE a.member_id IS NOT NULL
             AND a.available::bigint + a.pending::bigint
                 <> (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l WHERE l.account_id = a.id)
                    + (SELECT coalesce(sum(x.points), 0) FROM loyalty.accrual x
                        WHERE x.account_id = a.id AND x.transfer_id IS NULL AND x.points > 0)),
          0::bigint, 'balances are the lots and the deferred purchases');
SELECT is((SELECT count(*) FROM loyalty.accrual x
           WHERE (x.refunded_points, x.refunded_amount)
                 <> (SELECT coalesce(sum(r.points), 0), coalesce(sum(r.amount), 0) FROM loyalty.accrual_refund r
                     WHERE r.program_id = x.program_id AND r.purchase_ref = x.ref AND r.restored_at IS NULL)),
          0::bigint, 'refunded figures are the refunds not undone');
SELECT is((SELECT count(*) FROM loyalty.accrual x JOIN public.fz_orders o ON o.id = x.ref
           WHERE x.amount - x.refunded_amount <> least(o.total, x.amount)
             AND NOT EXISTS (SELECT FROM loyalty.accrual_quarantine q WHERE q.ref = x.ref
                             AND q.replayed_at IS NULL AND q.withdrawn_at IS NULL)),
          0::bigint, 'an order in the table counts for its amount');
SELECT is((SELECT count(*) FROM loyalty.accrual x
           WHERE NOT EXISTS (SELECT FROM public.fz_orders o WHERE o.id = x.ref) AND x.refunded_amount < x.amount),
          0::bigint, 'an order gone counts for nothing');
SELECT cmp_ok((SELECT count(*) FROM loyalty.accrual_refund WHERE restored_at IS NOT NULL), '>', 100::bigint,
              'orders were brought back');
SELECT * FROM finish();
DROP TABLE public.fz_orders, public.fz_gone, public.fz_log;
