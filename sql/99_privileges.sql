-- Privileges, last so that they cover every topic's objects.
--
-- Applications hold EXECUTE on the API and nothing else: the tables are
-- revoked from PUBLIC in their topic files, the API functions are SECURITY
-- DEFINER, and here EXECUTE on every function is taken from PUBLIC except
-- the ones that make the points type work (its I/O, operators, casts,
-- opclass support and aggregates), which any query reading points needs.
-- A DBA grants an application what it may call (docs/security.md).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
        FROM pg_proc p
        WHERE p.pronamespace = 'loyalty'::regnamespace
          AND p.prokind IN ('f', 'p')
          AND NOT EXISTS (SELECT FROM pg_type t
                          WHERE p.oid IN (t.typinput, t.typoutput, t.typreceive, t.typsend))
          AND NOT EXISTS (SELECT FROM pg_operator o WHERE o.oprcode = p.oid)
          AND NOT EXISTS (SELECT FROM pg_cast c WHERE c.castfunc = p.oid)
          AND NOT EXISTS (SELECT FROM pg_amproc a WHERE a.amproc = p.oid)
          AND NOT EXISTS (SELECT FROM pg_aggregate g
                          WHERE p.oid IN (g.aggtransfn, g.aggfinalfn, g.aggcombinefn))
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;
