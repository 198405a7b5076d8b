-- Jobs: the registry and schedule, what will expire and when, vesting and
-- expiry run at simulated dates (inside a transaction rolled back at the
-- end, so the tour leaves the coffee program as it found it).
\set ON_ERROR_STOP on
SET TIME ZONE 'Europe/Paris';

\echo
\echo '== The jobs: one registry that is also the workers'' schedule'
SELECT name, handler, schedule, enabled, batch_size FROM loyalty.job ORDER BY name;

\echo
\echo '== What will alice lose, and when? (the program''s notice period is 30 days; here, a year)'
SELECT * FROM loyalty.expiring_points('coffee', 'alice', '1 year', '2026-06-01');

BEGIN;
\echo
\echo '== A purchase with a 14-day return window: the points stay pending until the vest job runs'
SELECT loyalty._post_member('coffee', 'bob', 'issuance', 40, 'earn', 'order-77', NULL,
                            '2026-04-01 12:00', '2026-04-15 12:00') > 0 AS posted;
SELECT available, pending FROM loyalty.account_summary('coffee', 'bob', '2026-04-10');
SELECT * FROM loyalty.run_job('vest', '2026-04-15 11:59');
SELECT * FROM loyalty.run_job('vest', '2026-04-15 12:00');
SELECT a.available, a.pending FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id
 WHERE m.member_ref = 'bob';

\echo
\echo '== A year later: the expire job moves what is past its expiry to the breakage account'
SELECT * FROM loyalty.run_job('expire', '2027-03-03');
SELECT m.member_ref, t.amount, t.occurred_at, t.ref
  FROM loyalty.transfer t JOIN loyalty.account a ON a.id = t.debit_account_id
  JOIN loyalty.member m ON m.id = a.member_id
 WHERE t.kind = 'expire' ORDER BY t.id;
\echo '== Running it again posts nothing; every chain still verifies'
SELECT * FROM loyalty.run_job('expire', '2027-03-03');
SELECT count(*) AS broken_chains FROM loyalty.verify_chain('coffee');

\echo
\echo '== Every run is recorded'
SELECT job, as_of, batches, rows, points, error FROM loyalty.job_run WHERE NOT by_worker ORDER BY id;

\echo
\echo '== A job whose handler is not installed fails cleanly, with a hint'
INSERT INTO loyalty.job (name, handler) VALUES ('ghost', 'loyalty._job_ghost');
\set ON_ERROR_STOP off
SELECT * FROM loyalty.run_job('ghost');
\set ON_ERROR_STOP on
ROLLBACK;

\echo
\echo '== A worker runs the due jobs in databases listed in loyalty.databases'
SELECT name, setting, unit, context FROM pg_settings WHERE name LIKE 'loyalty.%' ORDER BY name;
