-- The expire job under every policy, at boundary dates (the day before, on,
-- after), with leap days and time zones, and expiring_points().
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';
\pset null '(null)'
SELECT * FROM no_plan();

-- member figures: posted available, balance() at a moment, and what expired
CREATE FUNCTION pg_temp.fig(p text, m text, at timestamptz)
RETURNS TABLE (member text, available bigint, balance bigint, expired bigint) LANGUAGE sql AS $$
    SELECT m, a.available::bigint, loyalty.balance(p, m, at)::bigint,
           (SELECT coalesce(sum(t.amount::bigint), 0) FROM loyalty.transfer t
             WHERE t.debit_account_id = a.id AND t.kind = 'expire')::bigint
    FROM loyalty.account a JOIN loyalty.member mm ON mm.id = a.member_id
    JOIN loyalty.program pp ON pp.id = mm.program_id
    WHERE pp.code = p AND mm.member_ref = m
$$;

-- fixed: 12 months after earning, in the program's time zone
SELECT loyalty.create_program('fixed', 'Fixed', 'UTC',
       '{"expiry": {"policy": "fixed", "after": "12 months", "notice": "30 days"}}') > 0 AS created;
SELECT loyalty.enroll('fixed', 'f1', occurred_at => '2024-01-01') > 0 AS enrolled;
SELECT loyalty.earn('fixed', 'f1', 100, 'e1', occurred_at => '2024-02-29 10:00') > 0 AS leap_day_earn;
SELECT loyalty.earn('fixed', 'f1', 40, 'e2', occurred_at => '2024-06-15 00:00') > 0 AS june_earn;
SELECT id > 0 AS lot, amount, expires_at FROM loyalty.lot ORDER BY id;
SELECT * FROM loyalty.expiring_points('fixed', 'f1', as_of => '2025-02-01');
SELECT * FROM loyalty.expiring_points('fixed', 'f1', '1 year', '2025-02-01');
-- the day before the leap-day lot expires (2025-02-28 10:00): nothing
SELECT * FROM loyalty.run_job('expire', '2025-02-27 10:00');
SELECT * FROM loyalty.run_job('expire', '2025-02-28 09:59:59.999999');
SELECT * FROM pg_temp.fig('fixed', 'f1', '2025-02-28 09:59:59.999999');
-- on the moment: it expires, with occurred_at = the expiry moment
SELECT * FROM loyalty.run_job('expire', '2025-02-28 10:00');
SELECT * FROM pg_temp.fig('fixed', 'f1', '2025-02-28 10:00');
SELECT t.kind, t.ref ~ '^lot:[0-9]+$' AS ref_names_lot, t.amount, t.occurred_at, u.amount AS lot_use,
       u.lot_id = (SELECT min(id) FROM loyalty.lot) AS first_lot
FROM loyalty.transfer t JOIN loyalty.lot_use u ON u.transfer_id = t.id WHERE t.kind = 'expire';
-- after, and again: nothing new
SELECT * FROM loyalty.run_job('expire', '2025-03-01');
SELECT * FROM loyalty.run_job('expire', '2025-03-01');
SELECT * FROM pg_temp.fig('fixed', 'f1', '2025-03-01');
SELECT * FROM loyalty.run_job('expire', '2025-06-15');
SELECT * FROM pg_temp.fig('fixed', 'f1', '2025-06-15');
SELECT * FROM loyalty.verify_chain('fixed');

-- fixed in a time zone: 1 month after 2024-01-31 23:30 Paris (22:30 UTC) is
-- 2024-02-29 23:30 Paris (a leap day); 1 month after 2024-03-10 12:00 Paris
-- (winter, 11:00 UTC) is 2024-04-10 12:00 Paris (summer, 10:00 UTC)
SELECT loyalty.create_program('paris', 'Paris', 'Europe/Paris',
       '{"expiry": {"policy": "fixed", "after": "1 month"}}') > 0 AS created;
SELECT loyalty.enroll('paris', 'p1', occurred_at => '2024-01-01') > 0 AS enrolled;
SELECT loyalty.earn('paris', 'p1', 10, 'e1', occurred_at => '2024-01-31 22:30') > 0;
SELECT loyalty.earn('paris', 'p1', 20, 'e2', occurred_at => '2024-03-10 11:00') > 0;
SELECT l.amount, l.expires_at, l.expires_at AT TIME ZONE 'Europe/Paris' AS paris_time
FROM loyalty.lot l JOIN loyalty.account a ON a.id = l.account_id JOIN loyalty.program p ON p.id = a.program_id
WHERE p.code = 'paris' ORDER BY l.id;
SELECT * FROM loyalty.run_job('expire', '2024-02-29 22:29:59');
SELECT * FROM loyalty.run_job('expire', '2024-02-29 22:30');
SELECT * FROM pg_temp.fig('paris', 'p1', '2024-02-29 22:30');
SELECT * FROM loyalty.run_job('expire', '2024-04-10 09:59:59');
SELECT * FROM pg_temp.fig('paris', 'p1', '2024-04-10 09:59:59');
SELECT * FROM loyalty.run_job('expire', '2024-04-10 10:00');
SELECT * FROM pg_temp.fig('paris', 'p1', '2024-04-10 10:00');
SELECT * FROM loyalty.verify_chain('paris');

-- calendar: points earned in a quarter expire at the end of the next quarter
-- (periods = 1), midnight in the program's time zone (New York)
SELECT loyalty.create_program('cal', 'Calendar', 'America/New_York',
       '{"expiry": {"policy": "calendar", "period": "quarter", "periods": 1}}') > 0 AS created;
SELECT loyalty.enroll('cal', 'c1', occurred_at => '2024-01-01') > 0 AS enrolled;
-- 2024-03-31 23:00 New York is still Q1 there (2024-04-01 03:00 UTC)
SELECT loyalty.earn('cal', 'c1', 30, 'q1', occurred_at => '2024-04-01 03:00') > 0;
SELECT loyalty.earn('cal', 'c1', 50, 'q2', occurred_at => '2024-04-01 04:00') > 0;
SELECT l.amount, l.expires_at, l.expires_at AT TIME ZONE 'America/New_York' AS local_time
FROM loyalty.lot l JOIN loyalty.account a ON a.id = l.account_id JOIN loyalty.program p ON p.id = a.program_id
WHERE p.code = 'cal' ORDER BY l.id;
SELECT * FROM loyalty.run_job('expire', '2024-06-30 12:00');
SELECT * FROM loyalty.run_job('expire', '2024-07-01 03:59:59');
SELECT * FROM loyalty.run_job('expire', '2024-07-01 04:00');
SELECT * FROM pg_temp.fig('cal', 'c1', '2024-07-01 04:00');
SELECT * FROM loyalty.run_job('expire', '2024-09-30 03:59:59');
SELECT * FROM loyalty.run_job('expire', '2024-10-01 04:00');
SELECT * FROM loyalty.run_job('expire', '2024-10-02');
SELECT * FROM pg_temp.fig('cal', 'c1', '2024-10-02');
SELECT * FROM loyalty.verify_chain('cal');

-- calendar by year, periods = 0: the end of the year of earning
SELECT loyalty.create_program('year', 'Year', 'UTC',
       '{"expiry": {"policy": "calendar", "period": "year", "periods": 0}}') > 0 AS created;
SELECT loyalty.enroll('year', 'y1', occurred_at => '2024-01-01') > 0 AS enrolled;
SELECT loyalty.earn('year', 'y1', 7, 'e1', occurred_at => '2024-12-31 23:59:59') > 0;
SELECT * FROM loyalty.run_job('expire', '2024-12-31 23:59:59');
SELECT * FROM loyalty.run_job('expire', '2025-01-01 00:00');
SELECT * FROM pg_temp.fig('year', 'y1', '2025-01-01');

-- rolling: all points expire 6 months after the last activity (earn or
-- redeem-like debits count; the expiry itself does not)
SELECT loyalty.create_program('roll', 'Rolling', 'UTC',
       '{"expiry": {"policy": "rolling", "inactivity": "6 months", "activity": ["earn", "adjust"]}}') > 0 AS created;
SELECT loyalty.enroll('roll', 'r1', occurred_at => '2024-01-01') > 0 AS enrolled;
SELECT loyalty.enroll('roll', 'r2', occurred_at => '2024-01-01') > 0 AS enrolled;
SELECT loyalty.earn('roll', 'r1', 10, 'a1', occurred_at => '2024-02-29') > 0;
SELECT loyalty.earn('roll', 'r1', 20, 'a2', occurred_at => '2024-03-15') > 0;
SELECT loyalty.earn('roll', 'r2', 5, 'b1', occurred_at => '2024-02-29') > 0;
SELECT loyalty.earn('roll', 'r2', 6, 'b2', occurred_at => '2024-08-28') > 0;
SELECT * FROM loyalty.expiring_points('roll', 'r1', '1 month', '2024-08-20');
SELECT * FROM loyalty.run_job('expire', '2024-09-14 23:59:59');
SELECT * FROM loyalty.run_job('expire', '2024-09-15');
SELECT * FROM pg_temp.fig('roll', 'r1', '2024-09-15');
SELECT * FROM pg_temp.fig('roll', 'r2', '2024-09-15');
SELECT t.amount, t.occurred_at, count(u.*) AS lots FROM loyalty.transfer t
JOIN loyalty.lot_use u ON u.transfer_id = t.id
JOIN loyalty.account a ON a.id = t.debit_account_id JOIN loyalty.member m ON m.id = a.member_id
WHERE t.kind = 'expire' AND m.member_ref = 'r1' GROUP BY 1, 2 ORDER BY 2;
-- r2 was active on 2024-08-28: its points last until 2025-02-28
SELECT * FROM loyalty.run_job('expire', '2025-02-27 23:59:59');
SELECT * FROM pg_temp.fig('roll', 'r2', '2025-02-27 23:59:59');
SELECT * FROM loyalty.run_job('expire', '2025-02-28');
SELECT * FROM pg_temp.fig('roll', 'r2', '2025-02-28');
SELECT * FROM loyalty.run_job('expire', '2025-03-01');
SELECT * FROM loyalty.verify_chain('roll');

-- none: nothing ever expires
SELECT loyalty.create_program('never', 'Never', 'UTC', '{"expiry": {"policy": "none"}}') > 0 AS created;
SELECT loyalty.enroll('never', 'n1', occurred_at => '2024-01-01') > 0 AS enrolled;
SELECT loyalty.earn('never', 'n1', 9, 'e1', occurred_at => '2000-01-01') > 0;
SELECT * FROM loyalty.run_job('expire', '2100-01-01');
SELECT * FROM pg_temp.fig('never', 'n1', '2100-01-01');
SELECT * FROM loyalty.expiring_points('never', 'n1', '100 years', '2000-01-01');

-- a partly spent lot expires only what is left; a pending lot from pending
SELECT loyalty.create_program('part', 'Part', 'UTC', '{"expiry": {"policy": "fixed", "after": "10 days"}}') > 0 AS created;
SELECT loyalty.enroll('part', 'x', occurred_at => '2024-01-01') > 0 AS enrolled;
SELECT loyalty.earn('part', 'x', 100, 'e1', occurred_at => '2024-01-01') > 0;
SET search_path = loyalty, public;
SELECT loyalty._post_member('part', 'x', 'redemption', -30, 'adjust', 'spend', 'test', '2024-01-05') > 0;
RESET search_path;
SELECT loyalty._post_member('part', 'x', 'issuance', 8, 'earn', 'e2', NULL, '2024-01-02', '2024-02-01') > 0;
SELECT a.available, a.pending FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id WHERE m.member_ref = 'x';
SELECT * FROM loyalty.run_job('expire', '2024-01-20');
SELECT a.available, a.pending FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id WHERE m.member_ref = 'x';
SELECT t.amount, t.occurred_at FROM loyalty.transfer t WHERE t.kind = 'expire' AND t.program_id = loyalty._program_id('part') ORDER BY t.id;
SELECT * FROM loyalty.verify_chain('part');

-- rolling: lapsed points stay lapsed. Earned in January, idle until
-- November (lapse on 2024-07-10), active again in November: the job still
-- expires the January points, dated at their lapse, and keeps the new ones.
SELECT loyalty.create_program('lapse', 'Lapse', 'UTC',
       '{"expiry": {"policy": "rolling", "inactivity": "6 months"}}') > 0 AS created;
SELECT loyalty.enroll('lapse', 'l1', occurred_at => '2024-01-01') > 0 AS enrolled;
SELECT loyalty.earn('lapse', 'l1', 10, 'jan', occurred_at => '2024-01-10') > 0;
SELECT loyalty.earn('lapse', 'l1', 20, 'nov', occurred_at => '2024-11-01') > 0;
SELECT * FROM loyalty.run_job('expire', '2024-11-02');
SELECT t.amount, t.occurred_at FROM loyalty.transfer t WHERE t.kind = 'expire' AND t.program_id = loyalty._program_id('lapse') ORDER BY t.id;
SELECT * FROM pg_temp.fig('lapse', 'l1', '2024-11-02');
SELECT * FROM loyalty.run_job('expire', '2024-11-02');
SELECT * FROM loyalty.verify_chain('lapse');

-- expiring_points errors
SELECT throws_ok($$SELECT * FROM loyalty.expiring_points('nope', 'x')$$, 'LY002', 'program "nope" does not exist');
SELECT throws_ok($$SELECT * FROM loyalty.expiring_points('part', 'nobody')$$, 'LY003', 'member "nobody" does not exist in program "part"');
SELECT * FROM finish();
