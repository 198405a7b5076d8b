-- Program options over time: update_program validates a new document,
-- keeps every earlier one with its note, and what it changes takes effect
-- at once (the accrual cache of every backend is dropped).
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET TIME ZONE 'UTC';
SELECT * FROM no_plan();

SELECT loyalty.create_program('shop', 'The Shop', 'UTC', '{"unknown_member": "quarantine"}') AS program;
SELECT version, options, note, changed_by = session_user AS by_me FROM loyalty.program_version ORDER BY version;

-- ---- refused changes leave nothing behind ----
SELECT throws_ok($$SELECT loyalty.update_program('nope', '{}', 'x')$$, 'LY002', 'program "nope" does not exist', 'unknown program');
SELECT throws_ok($$SELECT loyalty.update_program(NULL, '{}', 'x')$$, '22004', 'code, options and note must not be null', 'null code');
SELECT throws_ok($$SELECT loyalty.update_program('shop', NULL, 'x')$$, '22004', 'code, options and note must not be null', 'null options');
SELECT throws_ok($$SELECT loyalty.update_program('shop', '{}', NULL)$$, '22004', 'code, options and note must not be null', 'null note');
SELECT throws_ok($$SELECT loyalty.update_program('shop', '{}', '  ')$$, '22023', 'a change of program options needs a note', 'blank note');
SELECT throws_ok($$SELECT loyalty.update_program('shop', '{"shortfall": "maybe"}', 'x')$$, '22023', 'invalid program options', 'bad option value');
SELECT throws_ok($$SELECT loyalty.update_program('shop', '{"colour": "red"}', 'x')$$, '22023', 'invalid program options', 'unknown option');
-- the JSON path of the bad value in DETAIL, as create_program
\set SHOW_CONTEXT never
SELECT loyalty.update_program('shop', '{"expiry": {"policy": "fixed", "after": "soon"}}', 'x');
\set SHOW_CONTEXT errors
SELECT is((SELECT count(*) FROM loyalty.program_version), 1::bigint, 'no version written by a refused change');
SELECT is((SELECT options FROM loyalty.program), '{"unknown_member": "quarantine"}'::jsonb, 'options unchanged by a refused change');

-- ---- a change, then the same options again ----
-- An application's table: an unknown member's purchase waits in the
-- quarantine until the program enrols unknown members.
CREATE TABLE public.sales (ref text, customer text, total numeric, at timestamptz);
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}}', '2025-01-01', 'one point per euro');
SELECT loyalty.attach_accrual('public.sales', 'shop', 'customer', 'total', 'ref', 'at');
INSERT INTO public.sales VALUES ('s1', 'newcomer', 10, '2025-02-01');
SELECT ref, sqlstate FROM loyalty.accrual_quarantine;

SELECT is(loyalty.update_program('shop', '{"unknown_member": "enroll", "shortfall": "negative"}',
                                 'Enrol walk-in customers; show clawbacks as a negative balance.'),
          2, 'update_program returns the new version');
SELECT is(loyalty.update_program('shop', '{"shortfall": "negative", "unknown_member": "enroll"}', 'the same again'),
          2, 'the same options write no version');
SELECT version, options, note FROM loyalty.program_version ORDER BY version;
SELECT options FROM loyalty.program;

-- in force at once, in this session: the next purchase enrols its member
INSERT INTO public.sales VALUES ('s2', 'walkin', 20, '2025-02-02');
SELECT member_ref, loyalty.balance('shop', member_ref) FROM loyalty.member ORDER BY member_ref;

-- and back: unknown members wait in the quarantine again
SELECT is(loyalty.update_program('shop', '{"unknown_member": "quarantine"}', 'Enrolment only at the till.'),
          3, 'a third version');
INSERT INTO public.sales VALUES ('s3', 'stranger', 30, '2025-02-03');
SELECT ref, member_ref, sqlstate FROM loyalty.accrual_quarantine ORDER BY id;

-- ---- the history is append-only ----
SELECT throws_ok($$UPDATE loyalty.program_version SET note = 'rewritten'$$, 'LY005', NULL, 'versions cannot be rewritten');
SELECT throws_ok($$DELETE FROM loyalty.program_version$$, 'LY005', NULL, 'versions cannot be deleted');
SELECT throws_ok($$TRUNCATE loyalty.program_version$$, 'LY005', NULL, 'versions cannot be truncated');
SELECT is((SELECT count(*) FROM loyalty.program_version), 3::bigint, 'three versions kept');

SELECT * FROM finish();

-- The extension dropped and created again in one session: the tables the
-- backend remembered are gone, and posting looks them up again.
SET client_min_messages = warning;
DROP EXTENSION loyalty CASCADE;
CREATE EXTENSION loyalty;
RESET client_min_messages;
SELECT loyalty.create_program('shop', 'The Shop', 'UTC') AS program;
SELECT loyalty.enroll('shop', 'walkin', occurred_at => '2025-01-01') AS member;
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}}', '2025-01-01', 'again') AS version;
SELECT loyalty.attach_accrual('public.sales', 'shop', 'customer', 'total', 'ref', 'at');
INSERT INTO public.sales VALUES ('s4', 'walkin', 7, '2025-02-04');
SELECT loyalty.accrue('shop', 'walkin', 3, 's5', '2025-02-05') AS points;
SELECT loyalty.balance('shop', 'walkin') AS balance, (SELECT count(*) FROM loyalty.verify_chain('shop')) AS chain_problems;
