-- The job registry, run_job, job_run and the vest job.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';
\pset null '(null)'
SELECT * FROM no_plan();

SELECT name, handler, schedule, enabled, batch_size, last_run_at FROM loyalty.job ORDER BY name;

-- a registered job whose handler is not installed
INSERT INTO loyalty.job (name, handler) VALUES ('ghost', 'loyalty._job_ghost');

-- errors, one per line
SELECT throws_ok($$SELECT * FROM loyalty.run_job('nope', '2026-01-01')$$, 'LY020', 'job "nope" does not exist');
SELECT throws_ok($$SELECT * FROM loyalty.run_job(NULL, '2026-01-01')$$, '22004', 'job name must not be null');
SELECT throws_ok($$SELECT * FROM loyalty.run_job('vest', 'infinity')$$, '22023', 'as_of must be a finite time');
SELECT throws_ok($$SELECT * FROM loyalty.run_job('vest', NULL)$$, '22023', 'as_of must be a finite time');
SELECT throws_ok($$SELECT * FROM loyalty.run_job('ghost', '2026-01-01')$$, 'LY021', 'handler of job "ghost" does not exist');
SELECT throws_ok($$SELECT loyalty.set_job('nope', enabled => false)$$, 'LY020', 'job "nope" does not exist');
SELECT throws_ok($$SELECT loyalty.set_job('vest', schedule => '-1 hour')$$, '22023', 'schedule and batch_size must be positive');
SELECT throws_ok($$SELECT loyalty.set_job('vest', batch_size => 0)$$, '22023', 'schedule and batch_size must be positive');

SELECT * FROM loyalty.run_job('ghost', '2026-01-01');
DELETE FROM loyalty.job WHERE name = 'ghost';

SELECT (loyalty.set_job('vest', schedule => '10 minutes', batch_size => 1)).*;
SELECT count(*) AS runs_so_far FROM loyalty.job_run;

-- vest: three pending lots in their return window
SELECT loyalty.create_program('shop', 'Shop', 'UTC') > 0 AS created;
SELECT loyalty.enroll('shop', m, occurred_at => '2026-01-01') > 0 AS enrolled FROM unnest(ARRAY['a', 'b']) m;
SELECT loyalty._post_member('shop', 'a', 'issuance', 100, 'earn', 'o1', NULL, '2026-03-01', '2026-03-15') > 0;
SELECT loyalty._post_member('shop', 'a', 'issuance', 50, 'earn', 'o2', NULL, '2026-03-02', '2026-03-16') > 0;
SELECT loyalty._post_member('shop', 'b', 'issuance', 70, 'earn', 'o3', NULL, '2026-03-01', '2026-03-15 12:00') > 0;
SELECT loyalty._post_member('shop', 'b', 'issuance', 5, 'earn', 'o4', NULL, '2026-03-01') > 0;
SELECT m.member_ref, a.available, a.pending FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id ORDER BY 1;

-- the day before: nothing vests
SELECT * FROM loyalty.run_job('vest', '2026-03-14 23:59:59');
-- the moment a's first lot vests: only that one
SELECT * FROM loyalty.run_job('vest', '2026-03-15 00:00');
SELECT m.member_ref, a.available, a.pending FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id ORDER BY 1;
-- after: the others, in batches of 1
SELECT * FROM loyalty.run_job('vest', '2026-03-17');
SELECT m.member_ref, a.available, a.pending FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id ORDER BY 1;
-- again: nothing to do
SELECT * FROM loyalty.run_job('vest', '2026-03-17');
SELECT count(*) AS pending_lots FROM loyalty.lot WHERE pending;
SELECT m.member_ref, a.available::bigint = loyalty.balance('shop', m.member_ref, '2026-03-17')::bigint AS matches_balance
FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id ORDER BY 1;
SELECT * FROM loyalty.verify_chain('shop');

SELECT job, database = current_database() AS this_db, as_of, batches, rows, points, by_worker,
       finished_at IS NOT NULL AS finished, error, sqlstate
FROM loyalty.job_run ORDER BY id;
SELECT last_run_at IS NOT NULL AS ran FROM loyalty.job WHERE name = 'vest';

-- a later capability adds a job by inserting a row; its handler is found at run time
CREATE FUNCTION public._job_demo(as_of timestamptz, batch_size integer)
RETURNS TABLE (rows bigint, points bigint) LANGUAGE sql AS $$ SELECT 0::bigint, 0::bigint $$;
INSERT INTO loyalty.job (name, handler) VALUES ('demo', 'public._job_demo');
SELECT * FROM loyalty.run_job('demo', '2026-01-01');

-- release_holds: the redemption capability's handler, found through the registry
SELECT * FROM loyalty.run_job('release_holds', '2026-01-01');

SELECT * FROM finish();
