-- Accrual: a refund of points already spent, under the program option
-- shortfall "negative" (the balance goes below zero) rather than "debt" (the
-- default, the debt kept apart). Runs after demo/30_accrual.sql; uses its own
-- program "kiosk".
SET TIME ZONE 'Europe/Paris';

\echo
\echo == Program kiosk shows what a refund cannot take back as a balance below zero
SELECT loyalty.create_program('kiosk', 'Kiosk', 'Europe/Paris', '{"shortfall": "negative"}') > 0 AS created;
SELECT loyalty.enroll('kiosk', 'dan', occurred_at => now() - interval '1 month') > 0 AS enrolled;
SELECT loyalty.set_earning_rules('kiosk', '{"base": {"per": 1.00, "points": 1}}', now() - interval '1 month') AS version;

\echo
\echo == dan buys for 100.00 (100 points), spends 60, then returns the order
SELECT loyalty.accrue('kiosk', 'dan', 100.00, 'k-1', now() - interval '10 days') AS points;
SELECT loyalty.adjust('kiosk', 'dan', -60, 'k-spend', 'spent at the till', now() - interval '5 days') > 0 AS spent;
SELECT loyalty.refund('kiosk', 'k-1') AS clawed_back;
\echo == 40 came from his lot, 60 are owed: his balance is -60
SELECT refund_ref, taken, shortfall FROM loyalty.accrual_refund WHERE refund_ref = 'k-1';
SELECT loyalty.balance('kiosk', 'dan') AS balance;
SELECT kind, ref, points, balance, explanation FROM loyalty.statement('kiosk', 'dan');

\echo
\echo == While below zero he cannot spend (LY001)
\set ON_ERROR_STOP off
SELECT loyalty.adjust('kiosk', 'dan', -1, 'k-fix', 'try to spend');
\set ON_ERROR_STOP on

\echo
\echo == His next purchases repay first: 50 points bring him to -10, 30 more to 20
SELECT loyalty.accrue('kiosk', 'dan', 50.00, 'k-2') AS points;
SELECT loyalty.balance('kiosk', 'dan') AS balance;
SELECT loyalty.accrue('kiosk', 'dan', 30.00, 'k-3') AS points;
SELECT loyalty.balance('kiosk', 'dan') AS balance;
SELECT kind, points, balance, explanation FROM loyalty.statement('kiosk', 'dan') WHERE kind <> 'adjust';
SELECT available, lifetime_earned, lifetime_adjusted FROM loyalty.account_summary('kiosk', 'dan');

\echo
\echo == The journal and the lots are those of "debt": the chain verifies
SELECT count(*) AS chain_problems FROM loyalty.verify_chain('kiosk');

\echo
\echo == The owner switches the kiosk to "debt", with a note: every options version is kept
SELECT loyalty.update_program('kiosk', '{"shortfall": "debt"}',
       'Owed points are kept apart from the balance from now on.') AS version;
SELECT v.version, v.options, v.note
FROM loyalty.program_version v JOIN loyalty.program p ON p.id = v.program_id
WHERE p.code = 'kiosk' ORDER BY v.version;
