-- Accrual: earning rules, purchases, the application's own orders table,
-- the quarantine, refunds. Runs after demo/10_ledger.sql (program "coffee",
-- members alice, bob and carol).
SET TIME ZONE 'Europe/Paris';

\echo
\echo == Earning rules, version 1: 1 point per euro, x2 on pastries, x2 at weekends,
\echo == +50 on the first purchase of a member, points pending for 14 days
SELECT loyalty.set_earning_rules('coffee', '{
  "base": {"per": 1.00, "points": 1, "rounding": "floor"},
  "exclude": {"category": ["gift_card"]},
  "multipliers": [{"when": {"category": ["pastry"]}, "factor": 2},
                  {"when": {"weekday": [6, 7]}, "factor": 2}],
  "bonuses": [{"when": {"first_purchase": true}, "points": 50}],
  "caps": {"per_purchase": 500},
  "pending_days": 14}', '2025-01-01', 'launch') AS version;

\echo
\echo == A bad rules document is refused with the JSON path of the problem
DO $$
DECLARE
    d text;
BEGIN
    PERFORM loyalty.set_earning_rules('coffee', '{"multipliers": [{"factor": -1}]}', '2025-01-01');
EXCEPTION WHEN invalid_parameter_value THEN
    GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL;
    RAISE NOTICE '% (%)', SQLERRM, d;
END $$;

\echo
\echo == alice buys a croissant and a coffee on Saturday 2025-03-01: 7.40 x 2 (pastry) x 2 (Saturday) = 29, + 50
SELECT loyalty.accrue('coffee', 'alice', 7.40, 'demo-acc-1', '2025-03-01 09:30+01', 'pastry') AS points;
\echo == the same order again earns nothing more
SELECT loyalty.accrue('coffee', 'alice', 7.40, 'demo-acc-1', '2025-03-01 09:30+01', 'pastry') AS points;
\echo == how each point was computed
SELECT jsonb_pretty(loyalty.explain_accrual('coffee', 'demo-acc-1') - 'context');

\echo
\echo == The own orders table of the shop: attach accrual, then insert as usual
CREATE TABLE public.demo_orders (
    order_no  text PRIMARY KEY,
    customer  text,
    total     numeric(10,2),
    sold_at   timestamptz,
    product   text
);
SELECT loyalty.attach_accrual('public.demo_orders', 'coffee', 'customer', 'total', 'order_no',
                              occurred_at_column => 'sold_at', category_column => 'product');
INSERT INTO public.demo_orders VALUES
    ('demo-1', 'bob',     4.20, '2025-03-03 08:00+01', 'coffee'),
    ('demo-2', 'carol',  12.00, '2025-03-03 08:05+01', 'pastry'),
    ('demo-3', 'dave',    3.50, '2025-03-03 08:10+01', 'coffee'),   -- not a member yet
    ('demo-4', 'bob',    -1.00, '2025-03-03 08:15+01', 'coffee'),   -- a till error
    ('demo-5', 'alice',  25.00, '2025-03-03 08:20+01', 'gift_card');
\echo == the sale never fails; good rows earned, bad ones wait in the quarantine.
\echo == Points in their return window cost the sale its purchase row and balance only: the
\echo == journal line and lot are written when the account next needs them, or by the vest job
SELECT ref, points, rule_version, transfer_id IS NULL AS line_deferred FROM loyalty.accrual
WHERE ref LIKE 'demo-%' ORDER BY ref;
SELECT program, source, sqlstate, reason, rows FROM loyalty.quarantine_summary WHERE program = 'coffee';

\echo
\echo == Fix the causes and replay: enrol dave, correct the till error in the orders table
\echo == (the waiting row follows the UPDATE, here its order number too)
SELECT loyalty.enroll('coffee', 'dave', occurred_at => '2025-03-01') > 0 AS dave_enrolled;
UPDATE public.demo_orders SET order_no = 'demo-4b', total = 1.00 WHERE order_no = 'demo-4';
SELECT ref, sqlstate, row_data ->> 'total' AS total FROM loyalty.accrual_quarantine
WHERE ref LIKE 'demo-%' AND replayed_at IS NULL ORDER BY id;
SELECT * FROM loyalty.replay_quarantine('coffee');

\echo
\echo == carol returns half of her order: half of her points go back (pending ones first)
SELECT points FROM loyalty.accrual WHERE ref = 'demo-2';
UPDATE public.demo_orders SET total = 6.00 WHERE order_no = 'demo-2';
SELECT points, refunded_amount, refunded_points FROM loyalty.accrual WHERE ref = 'demo-2';
\echo == and the rest through the function API
SELECT loyalty.refund('coffee', 'demo-2', NULL, 'demo-2-rest') AS clawed_back;

\echo
\echo == A nightly sync deletes an order of bob and loads it again: the DELETE refunds it,
\echo == the same order back undoes that refund (no point lost, none earned twice)
INSERT INTO public.demo_orders VALUES ('demo-6', 'bob', 9.90, now() - interval '1 day', 'coffee');
CREATE TEMPORARY TABLE demo_yesterday AS SELECT * FROM public.demo_orders WHERE sold_at > now() - interval '2 days';
DELETE FROM public.demo_orders WHERE sold_at > now() - interval '2 days';
INSERT INTO public.demo_orders SELECT * FROM demo_yesterday;
SELECT kind, ref, points, balance FROM loyalty.statement('coffee', 'bob') WHERE ref LIKE 'demo-6%' ORDER BY transfer_id;

\echo
\echo == Version 2 from April: 2 points per euro; March purchases keep version 1
SELECT loyalty.set_earning_rules('coffee', '{"base": {"per": 1.00, "points": 2}}', '2025-04-01', 'spring') AS version;
SELECT loyalty.accrue('coffee', 'bob', 4.20, 'demo-acc-2', '2025-04-02 08:00+02', 'coffee') AS points;
SELECT ref, rule_version, points FROM loyalty.accrual WHERE ref IN ('demo-1', 'demo-acc-2') ORDER BY ref;

\echo
\echo == The statement of bob and the chain check
SELECT occurred_at, kind, ref, points, balance, explanation FROM loyalty.statement('coffee', 'bob')
WHERE ref LIKE 'demo%';
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('coffee');
SELECT loyalty.detach_accrual('public.demo_orders');
