-- Applications hold EXECUTE on the API and nothing else.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS loyalty CASCADE;
CREATE EXTENSION loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
DROP ROLE IF EXISTS loyalty_test_app;
RESET client_min_messages;
SET TIME ZONE 'UTC';
SET search_path = public, loyalty;
SELECT * FROM no_plan();

CREATE ROLE loyalty_test_app;
SELECT loyalty.create_program('shop', 'Shop');
SELECT loyalty.enroll('shop', 'c1', occurred_at => '2026-01-01');
GRANT USAGE ON SCHEMA loyalty TO loyalty_test_app;
GRANT EXECUTE ON FUNCTION loyalty.earn(text, text, loyalty.points, text, text, timestamptz),
                          loyalty.balance(text, text, timestamptz) TO loyalty_test_app;

SET ROLE loyalty_test_app;
SELECT is(loyalty.earn('shop', 'c1', 100, 'o-1', NULL, '2026-01-02'), 1::bigint, 'a granted API function works');
SELECT is(loyalty.balance('shop', 'c1', '2026-02-01'), '100'::loyalty.points, 'and so does reading');
SELECT is('7'::loyalty.points + 1, '8'::loyalty.points, 'the points type works for everyone');
SELECT throws_ok($$SELECT loyalty.adjust('shop', 'c1', 5, 'x', 'y')$$, '42501', 'permission denied for function adjust', 'an API function not granted');
SELECT throws_ok($$SELECT loyalty.create_program('p2', 'x')$$, '42501', 'permission denied for function create_program', 'administration not granted');
SELECT throws_ok($$SELECT * FROM loyalty.transfer$$, '42501', 'permission denied for table transfer', 'no table access');
SELECT throws_ok($$INSERT INTO loyalty.lot_use VALUES (1, 1, 1, 1, now())$$, '42501', 'permission denied for table lot_use', 'no writes');
SELECT throws_ok($$SELECT loyalty._post_member('shop', 'c1', 'issuance', 5, 'earn', 'z', NULL, now())$$, '42501',
                 'permission denied for function _post_member', 'internal functions are not public');
RESET ROLE;

SELECT is(actor, session_user::text, 'the session user is recorded as the actor') FROM loyalty.transfer;
SELECT is_empty($$SELECT p.oid::regprocedure FROM pg_proc p
                  WHERE p.pronamespace = 'loyalty'::regnamespace AND p.prosecdef
                    AND NOT EXISTS (SELECT FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%, pg\_temp')
                    AND p.oid NOT IN ('loyalty._accrual_trigger()'::regprocedure,
                                      'loyalty.accrue(text, text, numeric, text, timestamptz, text, text, text, jsonb)'::regprocedure)$$,
                'every SECURITY DEFINER function but the accrual trigger and accrue (which push their own) pins its search_path with pg_temp last');

-- Without pg_temp last, a caller's temporary objects (here a domain named
-- text whose check runs the caller's code) would shadow the ones the
-- function means, and run as the function's owner, a superuser.
GRANT EXECUTE ON FUNCTION loyalty.enroll(text, text, text, text, date, text, jsonb, timestamptz) TO loyalty_test_app;
SET ROLE loyalty_test_app;
CREATE TEMP TABLE calls (who text);
CREATE FUNCTION pg_temp.spy(text) RETURNS boolean LANGUAGE sql AS
    $$ INSERT INTO pg_temp.calls VALUES (current_user) RETURNING true $$;
CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_temp.spy(VALUE));
SELECT loyalty.enroll('shop', 'c2', email => 'x@example.com', occurred_at => '2026-01-01') > 0 AS enrolled;
SELECT is(loyalty.balance('shop', 'c1', '2026-02-01'), '100'::loyalty.points, 'balance still works');
SELECT is_empty($$SELECT * FROM pg_temp.calls$$, 'the caller''s temporary objects never run inside the API');
RESET ROLE;

-- The accrual trigger and accrue() pin their search path in C (loyalty,
-- pg_catalog, no temporary schema), not with SET: neither the caller's
-- search_path nor its temporary objects resolve a name in their SQL, on
-- the one-row path, the statement path, a repeat, refunds or deletes.
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}}', '2026-01-01', 'v1') > 0 AS rules;
CREATE TABLE public.security_sales (ref text PRIMARY KEY, member text, amount numeric, at timestamptz);
GRANT ALL ON public.security_sales TO loyalty_test_app;
-- (pg_catalog.text: the caller's temporary domain text shadows it here)
GRANT EXECUTE ON FUNCTION loyalty.accrue(pg_catalog.text, pg_catalog.text, numeric, pg_catalog.text, timestamptz,
                                         pg_catalog.text, pg_catalog.text, pg_catalog.text, jsonb)
    TO loyalty_test_app;
SELECT loyalty.attach_accrual('public.security_sales', 'shop', 'member', 'amount', 'ref', 'at');
CREATE SCHEMA evil;
GRANT USAGE, CREATE ON SCHEMA evil TO loyalty_test_app;
SET ROLE loyalty_test_app;
CREATE FUNCTION evil.spy_text(pg_catalog.text, pg_catalog.text) RETURNS boolean LANGUAGE sql AS
    $$ INSERT INTO pg_temp.calls VALUES (current_user);
       SELECT $1 OPERATOR(pg_catalog.=) $2 $$;
CREATE FUNCTION evil.spy_int8(bigint, bigint) RETURNS boolean LANGUAGE sql AS
    $$ INSERT INTO pg_temp.calls VALUES (current_user);
       SELECT $1 OPERATOR(pg_catalog.=) $2 $$;
CREATE OPERATOR evil.= (LEFTARG = pg_catalog.text, RIGHTARG = pg_catalog.text, FUNCTION = evil.spy_text);
CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.spy_int8);
SET search_path = evil, pg_catalog, pg_temp;
INSERT INTO public.security_sales VALUES ('s1', 'c1', 10, '2026-03-01'), ('s2', 'c1', 20, '2026-03-01');
INSERT INTO public.security_sales VALUES ('s3', 'c1', 30, '2026-03-01');
INSERT INTO public.security_sales VALUES ('s4', 'nobody', 40, '2026-03-01');
UPDATE public.security_sales SET amount = 5 WHERE ref OPERATOR(pg_catalog.=) 's1';
DELETE FROM public.security_sales WHERE ref OPERATOR(pg_catalog.=) 's2';
SELECT loyalty.accrue('shop', 'c1', 7, 's5', '2026-03-01') AS earned;
SELECT loyalty.accrue('shop', 'c1', 7, 's5', '2026-03-01') AS repeat;
SET search_path = public, loyalty;
SELECT is(loyalty.balance('shop', 'c1', now()), '142'::loyalty.points,
          'the application''s role earns and refunds through the attached table and accrue');
-- (the application's own statements may call them: only a call as the
-- trigger's owner would be a call from inside)
SELECT is_empty($$SELECT * FROM pg_temp.calls WHERE who <> 'loyalty_test_app'$$,
                'the caller''s search_path and temporary objects never run inside the accrual trigger or accrue');
RESET ROLE;
SELECT is(count(*), 1::bigint, 'the unknown member is quarantined') FROM loyalty.accrual_quarantine;
DROP SCHEMA evil CASCADE;

-- An error inside the trigger leaves none of its search path behind: the
-- abort of the savepoint (here a PL/pgSQL exception block) drops it, and
-- the session's own path is back, with no warning of a leaked path.
UPDATE loyalty.program SET time_zone = 'Mars/Base' WHERE code = 'shop';
SET search_path = public;
DO $$
BEGIN
    INSERT INTO public.security_sales VALUES ('e1', 'c1', 1, '2026-03-01');
EXCEPTION WHEN others THEN
    RAISE NOTICE 'the trigger failed: %', SQLERRM;
END $$;
SELECT is(current_schemas(false), ARRAY['public']::name[], 'the session''s search path is its own again');
UPDATE loyalty.program SET time_zone = 'UTC' WHERE code = 'shop';
SET search_path = public, loyalty;
DROP TABLE public.security_sales;

SELECT is_empty($$SELECT p.oid::regprocedure FROM pg_proc p
                  WHERE p.pronamespace = 'loyalty'::regnamespace
                    AND obj_description(p.oid, 'pg_proc') IS NULL$$,
                'every function of the extension has a comment (\df+ shows it)');

SELECT * FROM finish();
DROP OWNED BY loyalty_test_app;
DROP ROLE loyalty_test_app;
