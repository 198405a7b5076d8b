-- Jobs: one registry (loyalty.job) that is also the workers' schedule, a
-- record of every run (loyalty.job_run), and the jobs of the ledger: vest and
-- expire. See docs/jobs.md.
--
-- A job is a handler function
--     handler(as_of timestamptz, batch_size integer)
--         RETURNS TABLE (rows bigint, points bigint)
-- that processes at most one batch of the work due at as_of, is idempotent,
-- and says what it did (rows = 0: nothing left). run_job() calls it batch
-- after batch in the caller's transaction; the background worker commits
-- each batch on its own (src/worker.c), through the same _job_* functions.

CREATE TABLE loyalty.job (
    name         text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    handler      text NOT NULL,
    schedule     interval NOT NULL DEFAULT '1 hour' CHECK (schedule > interval '0'),
    enabled      boolean NOT NULL DEFAULT true,
    batch_size   integer NOT NULL DEFAULT 1000 CHECK (batch_size > 0),
    last_run_at  timestamptz,
    description  text NOT NULL DEFAULT '',
    builtin      boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE loyalty.job IS 'Registry of jobs and the workers'' schedule: the handler function, how often it runs, whether it is enabled, its batch size and when it last ran';
COMMENT ON COLUMN loyalty.job.handler IS 'Schema-qualified name of a function (as_of timestamptz, batch_size integer) RETURNS TABLE (rows bigint, points bigint), resolved when the job runs';
COMMENT ON COLUMN loyalty.job.schedule IS 'A worker runs the job when last_run_at + schedule has passed';
COMMENT ON COLUMN loyalty.job.last_run_at IS 'When the last run (by a worker or by run_job) started, wall-clock time';
COMMENT ON COLUMN loyalty.job.builtin IS 'Registered by the install script (true) rather than added later: only added jobs are dumped by pg_dump';

-- Capabilities register their jobs here with builtin = true: CREATE EXTENSION
-- recreates those rows on restore, so pg_dump keeps only the others.
INSERT INTO loyalty.job (name, handler, schedule, batch_size, description, builtin) VALUES
    ('vest',          'loyalty._job_vest',          '1 hour',    5000, 'Pending points whose return window has ended become available', true),
    ('expire',        'loyalty._job_expire',        '1 hour',   10000, 'Points past their expiry move to the breakage account', true),
    ('release_holds', 'loyalty._job_release_holds', '1 minute',  1000, 'Holds past their time to live give their points back', true);
SELECT pg_catalog.pg_extension_config_dump('loyalty.job', 'WHERE NOT builtin');

CREATE SEQUENCE loyalty.job_run_id_seq;
CREATE TABLE loyalty.job_run (
    id           bigint PRIMARY KEY DEFAULT nextval('loyalty.job_run_id_seq'),
    job          text NOT NULL,
    database     name NOT NULL DEFAULT current_database(),
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    as_of        timestamptz NOT NULL,
    batches      integer NOT NULL DEFAULT 0,
    rows         bigint NOT NULL DEFAULT 0,
    points       bigint NOT NULL DEFAULT 0,
    by_worker    boolean NOT NULL DEFAULT false,
    error        text,
    sqlstate     text
);
ALTER SEQUENCE loyalty.job_run_id_seq OWNED BY loyalty.job_run.id;
CREATE INDEX job_run_job_idx ON loyalty.job_run (job, started_at);
COMMENT ON TABLE loyalty.job_run IS 'One row per run of a job: when, at which as_of, how many batches, rows and points, and the error if it failed (finished_at NULL: interrupted, e.g. by a crash)';
SELECT pg_catalog.pg_extension_config_dump('loyalty.job_run', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.job_run_id_seq', '');
REVOKE ALL ON loyalty.job, loyalty.job_run FROM PUBLIC;
REVOKE ALL ON SEQUENCE loyalty.job_run_id_seq FROM PUBLIC;

-- The expire job finds due lots by expiry (lots that never expire have no
-- entry: a program without expiry pays nothing for it); the vest job finds
-- pending lots.
CREATE INDEX lot_expiry_idx ON loyalty.lot (expires_at, id) WHERE remaining > 0 AND expires_at IS NOT NULL;
CREATE INDEX lot_pending_idx ON loyalty.lot (vests_at) WHERE pending;

-- The handler of a job, resolved now, or a precise error.
CREATE FUNCTION loyalty._job_handler(p_name text) RETURNS regprocedure
LANGUAGE plpgsql STABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_handler text;
    v_proc regprocedure;
BEGIN
    IF p_name IS NULL THEN
        RAISE EXCEPTION 'job name must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT j.handler INTO v_handler FROM loyalty.job j WHERE j.name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job "%" does not exist', p_name
            USING ERRCODE = 'LY020',
                  HINT = 'The jobs are the rows of loyalty.job: ' ||
                         (SELECT string_agg(j.name, ', ' ORDER BY j.name) FROM loyalty.job j) || '.';
    END IF;
    v_proc := pg_catalog.to_regprocedure(v_handler || '(timestamptz, integer)');
    IF v_proc IS NULL THEN
        RAISE EXCEPTION 'handler of job "%" does not exist', p_name
            USING ERRCODE = 'LY021',
                  DETAIL = format('Function %s(timestamptz, integer) was not found.', v_handler),
                  HINT = format('Install the capability that provides it, or disable the job: '
                                'SELECT loyalty.set_job(%L, enabled => false).', p_name);
    END IF;
    RETURN v_proc;
END $$;
COMMENT ON FUNCTION loyalty._job_handler(text) IS 'Internal: the handler function of a job, resolved at run time (LY020 unknown job, LY021 missing handler)';

-- Start a run: check the job and its handler, record the run.
CREATE FUNCTION loyalty._job_start(p_name text, p_as_of timestamptz, p_by_worker boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_run bigint;
BEGIN
    IF p_as_of IS NULL OR NOT isfinite(p_as_of) THEN
        RAISE EXCEPTION 'as_of must be a finite time' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM loyalty._job_handler(p_name);
    INSERT INTO loyalty.job_run (job, as_of, by_worker) VALUES (p_name, p_as_of, p_by_worker)
    RETURNING id INTO v_run;
    RETURN v_run;
END $$;
COMMENT ON FUNCTION loyalty._job_start(text, timestamptz, boolean) IS 'Internal: starts a run of a job and returns its job_run id';

-- One batch of a run: call the handler once and add what it did to the run.
CREATE FUNCTION loyalty._job_step(p_run bigint)
RETURNS bigint LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_job loyalty.job;
    v_as_of timestamptz;
    v_rows bigint;
    v_points bigint;
BEGIN
    -- One batch of one job at a time in the database: run_job() holds the
    -- accounts of every batch it has run until its caller commits, so two
    -- runs side by side (or a run and the worker's batch) could each hold
    -- an account the other's next batch locks. A batch waits for the run
    -- or batch before it to commit.
    PERFORM pg_advisory_xact_lock(hashtext('loyalty'), hashtext('jobs'));
    SELECT j.* INTO v_job FROM loyalty.job_run r JOIN loyalty.job j ON j.name = r.job WHERE r.id = p_run;
    SELECT r.as_of INTO v_as_of FROM loyalty.job_run r WHERE r.id = p_run;
    PERFORM set_config('loyalty_job.wrote', '', true);
    EXECUTE format('SELECT h.rows, h.points FROM %s($1, $2) h', loyalty._job_handler(v_job.name)::regproc)
        INTO v_rows, v_points USING v_as_of, v_job.batch_size;
    v_rows := coalesce(v_rows, 0);
    IF v_rows > 0 THEN
        UPDATE loyalty.job_run r
           SET batches = r.batches + 1, rows = r.rows + v_rows, points = r.points + coalesce(v_points, 0)
         WHERE r.id = p_run;
        RETURN v_rows;
    END IF;
    -- A batch that wrote accounts' deferred lines but had none of them to
    -- vest or expire (the handler says how many accounts, in
    -- loyalty_job.wrote) did something: the run goes on, to the accounts
    -- after them, in a batch of its own. It adds no row to the run.
    RETURN coalesce(nullif(current_setting('loyalty_job.wrote', true), ''), '0')::bigint;
END $$;
COMMENT ON FUNCTION loyalty._job_step(bigint) IS 'Internal: runs one batch of a run and returns its row count, or for a batch that only wrote deferred lines the number of accounts it wrote them for (0: nothing left)';

-- End a run (p_run NULL: a run that failed before it started), with the
-- error if it failed; the job's last_run_at moves either way, so a failing
-- job is retried on its schedule rather than at every wake-up.
CREATE FUNCTION loyalty._job_finish(p_run bigint, p_name text, p_as_of timestamptz,
                                    p_error text DEFAULT NULL, p_sqlstate text DEFAULT NULL,
                                    p_by_worker boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
BEGIN
    IF p_run IS NULL THEN
        INSERT INTO loyalty.job_run (job, as_of, by_worker, finished_at, error, sqlstate)
        VALUES (p_name, p_as_of, p_by_worker, clock_timestamp(), p_error, p_sqlstate)
        RETURNING id INTO p_run;
    ELSE
        UPDATE loyalty.job_run r SET finished_at = clock_timestamp(), error = p_error, sqlstate = p_sqlstate
         WHERE r.id = p_run;
    END IF;
    UPDATE loyalty.job j SET last_run_at = r.started_at
      FROM loyalty.job_run r WHERE r.id = p_run AND j.name = r.job;
END $$;
COMMENT ON FUNCTION loyalty._job_finish(bigint, text, timestamptz, text, text, boolean) IS 'Internal: ends a run, with its error if it failed, and moves the job''s last_run_at';

CREATE FUNCTION loyalty.run_job(name text, as_of timestamptz DEFAULT now())
RETURNS TABLE (rows bigint, points bigint, batches integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_run bigint := loyalty._job_start(name, as_of);
BEGIN
    WHILE loyalty._job_step(v_run) > 0 LOOP
    END LOOP;
    PERFORM loyalty._job_finish(v_run, name, as_of);
    RETURN QUERY SELECT r.rows, r.points, r.batches FROM loyalty.job_run r WHERE r.id = v_run;
END $$;
COMMENT ON FUNCTION loyalty.run_job(text, timestamptz) IS 'Runs a job to completion at as_of (business time) in the caller''s transaction, batch after batch; records the run in job_run and returns rows, points and batches';

CREATE FUNCTION loyalty.set_job(name text, schedule interval DEFAULT NULL, enabled boolean DEFAULT NULL,
                                batch_size integer DEFAULT NULL)
RETURNS loyalty.job LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v loyalty.job;
BEGIN
    IF schedule <= interval '0' OR batch_size <= 0 THEN
        RAISE EXCEPTION 'schedule and batch_size must be positive'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Got schedule %s and batch_size %s.', schedule, batch_size);
    END IF;
    UPDATE loyalty.job j
       SET schedule = coalesce(set_job.schedule, j.schedule),
           enabled = coalesce(set_job.enabled, j.enabled),
           batch_size = coalesce(set_job.batch_size, j.batch_size)
     WHERE j.name = set_job.name
    RETURNING j.* INTO v;
    IF NOT FOUND THEN
        PERFORM loyalty._job_handler(name);     -- LY020
    END IF;
    RETURN v;
END $$;
COMMENT ON FUNCTION loyalty.set_job(text, interval, boolean, integer) IS 'Changes a job''s schedule, enabled flag or batch size (NULL keeps the current value); returns the job';

-- ---- vest ----------------------------------------------------------------

-- Pending lots whose return window has ended at as_of become available: the
-- lot loses its pending flag and its remaining points move from the
-- account's pending to its available balance (no transfer: no points change
-- accounts). Member accounts are locked in id order first, as postings do.
-- enable_bitmapscan off: the pending lots are read in vests_at order up to
-- the batch size, and with statistics older than the lots (the deferred
-- ones are all written by this job) the planner would read every pending
-- lot into a bitmap and sort it at each batch (_deferred_due).
CREATE FUNCTION loyalty._job_vest(as_of timestamptz, batch_size integer)
RETURNS TABLE (rows bigint, points bigint)
LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp SET enable_bitmapscan = off AS $$
#variable_conflict use_column
DECLARE
    v_lots bigint[];
    v_deferred bigint[];
    v_wrote bigint[];
    v_written_by_other bigint[];
    v_vested bigint;
    v_vested_points bigint;
    v_n bigint;
    v_pts bigint;
BEGIN
    -- accounts with deferred purchases that vest by as_of (docs/accrual.md)
    v_deferred := loyalty._deferred_due(as_of, batch_size, true);
    SELECT array_agg(l.id) INTO v_lots
    FROM (SELECT l.id FROM loyalty.lot l WHERE l.pending AND l.vests_at <= as_of
          ORDER BY l.vests_at, l.id LIMIT batch_size) l;
    IF v_lots IS NULL AND v_deferred IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    -- Every account of the batch locked at once, in id order, as postings
    -- lock them (locking the deferred ones first, then the others, could
    -- deadlock with a statement holding one of the others), which writes
    -- their deferred lines and lots, those due by as_of already vested
    -- (_materialize): one version of each lot, not two.
    SELECT k.written_for, k.vested, k.vested_points INTO v_wrote, v_vested, v_vested_points
    FROM loyalty._lock_accounts_of_lots(v_lots, v_deferred, as_of) k;
    -- An account chosen for its deferred purchases whose lines another
    -- transaction wrote while this one waited for its lock: their lots are
    -- pending, written after the batch chose its lots, and vest with them.
    -- (The other accounts' lots written pending before come with the
    -- pending lots above, in this batch or a later one.)
    v_written_by_other := ARRAY(SELECT unnest(v_deferred) EXCEPT SELECT unnest(v_wrote));
    IF cardinality(v_written_by_other) > 0 THEN
        v_lots := ARRAY(SELECT x.id FROM unnest(v_lots) AS x(id)
                        UNION
                        SELECT l.id FROM loyalty.lot l
                        WHERE l.account_id = ANY (v_written_by_other) AND l.remaining OPERATOR(loyalty.>) 0
                          AND l.pending AND l.vests_at <= as_of);
    END IF;
    WITH l AS (
        UPDATE loyalty.lot l SET pending = false
          FROM unnest(v_lots) AS x(id)
         WHERE l.id = x.id AND l.pending AND l.vests_at <= as_of
        RETURNING l.account_id, l.remaining
    ), s AS (
        SELECT l.account_id, count(*) AS n, sum(l.remaining::bigint) AS pts FROM l GROUP BY l.account_id
    ), a AS (
        UPDATE loyalty.account a
           SET available = (a.available::bigint + s.pts)::loyalty.points,
               pending = (a.pending::bigint - s.pts)::loyalty.points
          FROM s WHERE a.id = s.account_id
    )
    SELECT coalesce(sum(s.n), 0)::bigint + v_vested, coalesce(sum(s.pts), 0)::bigint + v_vested_points
      INTO v_n, v_pts FROM s;
    -- A batch that only wrote lines (its deferred purchases expire before
    -- they vest) vested nothing: not the end of the run (_job_step).
    IF v_n = 0 AND v_deferred IS NOT NULL THEN
        PERFORM set_config('loyalty_job.wrote', cardinality(v_deferred)::text, true);
    END IF;
    RETURN QUERY SELECT v_n, v_pts;
END $$;
COMMENT ON FUNCTION loyalty._job_vest(timestamptz, integer) IS 'Job handler: moves one batch of pending lots whose return window ended by as_of to available';

-- ---- expire --------------------------------------------------------------

-- The ref of the transfer that expires a lot: "lot:<id>" the first time,
-- "lot:<id>#<n>" for the n-th time (a lot can expire again after a reversal
-- gave points back to it). Deterministic from the committed ledger, so a
-- rerun after a crash finds the lot already expired, and a race on the same
-- lot meets the unique (program, kind, ref). _expire_due computes the same
-- set-based; this is the one-lot form, for reading.
CREATE FUNCTION loyalty._expire_ref(p_lot bigint) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT 'lot:' || p_lot || CASE WHEN n > 0 THEN '#' || (n + 1) ELSE '' END
    FROM (SELECT count(*) AS n FROM loyalty.lot_use u
          JOIN loyalty.transfer t ON t.id = u.transfer_id AND t.kind = 'expire'
          WHERE u.lot_id = p_lot AND u.amount > 0) x
$$;
COMMENT ON FUNCTION loyalty._expire_ref(bigint) IS 'Internal: the deterministic ref of the transfer that expires a lot';

-- Candidates: at most p_limit lots with points left whose expiry is at or
-- before as_of: a lot's own expires_at (fixed, calendar) or, under a rolling
-- policy, its lapse. Read without locks; _expire_due re-checks.
-- Within one transaction (run_job) the scan resumes after the last batch
-- (a transaction-local cursor), so that it does not wade again through the
-- index entries of the lots it has just expired; a new transaction (a
-- worker's next batch) starts from the beginning, which costs little once
-- those entries are dead.
CREATE FUNCTION loyalty._expire_candidates(p_as_of timestamptz, p_limit integer)
RETURNS bigint[] LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_cursor text[] := string_to_array(current_setting('loyalty_job.expire_cursor', true), '|');
    v_at timestamptz := '-infinity';
    v_id bigint := 0;
    v_account bigint := 0;
    v_lots bigint[];
    v_last_at timestamptz;
    v_last_id bigint;
    v_n integer;
    v_more bigint[];
    r_acc record;
BEGIN
    IF v_cursor[1] = p_as_of::text THEN     -- the same run, in the same transaction
        v_at := v_cursor[2]::timestamptz;
        v_id := v_cursor[3]::bigint;
        v_account := v_cursor[4]::bigint;
    END IF;

    -- fixed and calendar: the lot's own expiry. The next p_limit due lots
    -- in expiry order name the accounts; a batch takes all the due lots of
    -- those accounts (whole accounts, in order of first appearance, while
    -- they add up to p_limit, and at least one), so that each account is
    -- locked, updated and chained once per run rather than once per batch.
    WITH scan AS MATERIALIZED (
        SELECT l.id, l.account_id, l.expires_at, row_number() OVER (ORDER BY l.expires_at, l.id) AS pos
        FROM (SELECT l.id, l.account_id, l.expires_at FROM loyalty.lot l
               WHERE l.remaining > 0 AND l.expires_at <= p_as_of AND (l.expires_at, l.id) > (v_at, v_id)
               ORDER BY l.expires_at, l.id LIMIT p_limit) l
    ), accounts AS MATERIALIZED (
        SELECT s.account_id, min(s.pos) AS first_pos FROM scan s GROUP BY s.account_id
    ), sized AS MATERIALIZED (
        SELECT a.account_id, a.first_pos, d.lots,
               sum(cardinality(d.lots)) OVER (ORDER BY a.first_pos) AS total
        FROM accounts a
        CROSS JOIN LATERAL (SELECT ARRAY(SELECT l.id FROM loyalty.lot l
                                         WHERE l.account_id = a.account_id AND l.remaining > 0
                                           AND l.expires_at <= p_as_of) AS lots) d
    ), chosen AS (
        SELECT z.* FROM sized z WHERE z.total - cardinality(z.lots) < p_limit
    )
    SELECT (SELECT array_agg(x ORDER BY x) FROM chosen c, unnest(c.lots) x),
           (SELECT s.expires_at FROM scan s WHERE s.pos = coalesce(
                (SELECT min(z.first_pos) - 1 FROM sized z WHERE z.total - cardinality(z.lots) >= p_limit),
                (SELECT max(s2.pos) FROM scan s2))),
           (SELECT s.id FROM scan s WHERE s.pos = coalesce(
                (SELECT min(z.first_pos) - 1 FROM sized z WHERE z.total - cardinality(z.lots) >= p_limit),
                (SELECT max(s2.pos) FROM scan s2)))
      INTO v_lots, v_last_at, v_last_id;
    v_n := coalesce(array_length(v_lots, 1), 0);
    IF v_last_id IS NOT NULL THEN       -- the scan resumes after what this batch covers
        v_at := v_last_at;
        v_id := v_last_id;
    END IF;

    -- rolling: every lot of an account whose lapse has passed, account by
    -- account (the last one is looked at again next time, in case the limit
    -- cut through its lots)
    IF v_n < p_limit THEN
        FOR r_acc IN SELECT acc.id FROM loyalty.program p
                   JOIN loyalty.account acc ON acc.program_id = p.id AND acc.kind = 'member'
                  WHERE p.options #>> '{expiry,policy}' = 'rolling' AND acc.id >= v_account
                    AND EXISTS (SELECT FROM loyalty.lot o WHERE o.account_id = acc.id AND o.remaining > 0)
                  ORDER BY acc.id LOOP
            SELECT array_agg(x.id) INTO v_more
              FROM (SELECT l.id FROM loyalty.lot l
                     WHERE l.account_id = r_acc.id AND l.remaining > 0
                       AND loyalty._rolling_lapse(r_acc.id, l.occurred_at, p_as_of) <= p_as_of
                       AND NOT l.id = ANY (coalesce(v_lots, '{}'))
                     ORDER BY l.id LIMIT p_limit - v_n) x;
            v_lots := v_lots || v_more;
            v_n := coalesce(array_length(v_lots, 1), 0);
            v_account := r_acc.id;
            EXIT WHEN v_n >= p_limit;
        END LOOP;
    END IF;

    PERFORM set_config('loyalty_job.expire_cursor',
                       concat_ws('|', p_as_of::text, v_at::text, v_id::text, v_account::text), true);
    RETURN v_lots;
END $$;
COMMENT ON FUNCTION loyalty._expire_candidates(timestamptz, integer) IS 'Internal: at most p_limit lots that may be due to expire at as_of, read without locks';

-- What to expire among the candidate lots, read after their accounts are
-- locked: each lot's remaining points, the expiry moment (occurred_at of
-- the expire transfer), the breakage account and the ref; in posting order.
CREATE FUNCTION loyalty._expire_due(p_lots bigint[], p_as_of timestamptz, p_again bigint[])
RETURNS TABLE (lot_id bigint, account_id bigint, program_id bigint, breakage_id bigint,
               remaining loyalty.points, pending boolean, moment timestamptz, ref text)
LANGUAGE sql STABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
    WITH lots AS MATERIALIZED (
        SELECT l.id, l.account_id, l.remaining, l.pending, l.occurred_at, l.expires_at
        FROM (SELECT DISTINCT x.id FROM unnest(p_lots) AS x(id)) x
        JOIN loyalty.lot l ON l.id = x.id
        WHERE l.remaining > 0
    ), acct AS MATERIALIZED (
        SELECT a.id, a.program_id, b.id AS breakage_id,
               p.options #>> '{expiry,policy}' IS NOT DISTINCT FROM 'rolling' AS rolling
        FROM (SELECT DISTINCT l.account_id FROM lots l) x
        JOIN loyalty.account a ON a.id = x.account_id
        JOIN loyalty.program p ON p.id = a.program_id
        JOIN loyalty.account b ON b.program_id = a.program_id AND b.kind = 'breakage' AND b.name = ''
    )
    SELECT x.id, x.account_id, x.program_id, x.breakage_id, x.remaining, x.pending, x.moment,
           CASE WHEN NOT x.id = ANY (p_again) THEN 'lot:' || x.id
                ELSE 'lot:' || x.id || '#' || (1 + (SELECT count(*) FROM loyalty.lot_use u
                                                     JOIN loyalty.transfer t ON t.id = u.transfer_id
                                                                            AND t.kind = 'expire'
                                                     WHERE u.lot_id = x.id AND u.amount > 0)) END
    FROM (SELECT l.id, l.account_id, c.program_id, c.breakage_id, l.remaining, l.pending,
                 least(l.expires_at,
                       CASE WHEN c.rolling THEN loyalty._rolling_lapse(l.account_id, l.occurred_at, p_as_of) END)
                   AS moment
          FROM lots l JOIN acct c ON c.id = l.account_id) x
    WHERE x.moment <= p_as_of
    ORDER BY x.account_id, x.moment, x.id
$$;
COMMENT ON FUNCTION loyalty._expire_due(bigint[], timestamptz, bigint[]) IS 'Internal: the lots to expire among candidates, re-read under the accounts'' locks, in posting order';

-- Which of the lots have expired before (a reversal gave points back since):
-- their first expiry's ref looked up by the transfer table's unique key,
-- one index scan per program with the refs as array keys, a plan that does
-- not depend on the statistics of freshly written rows.
CREATE FUNCTION loyalty._expired_before(p_lots bigint[]) RETURNS bigint[]
LANGUAGE plpgsql STABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_refs text[] := ARRAY(SELECT 'lot:' || x FROM unnest(p_lots) x);
    v_program bigint;
    v_again bigint[] := '{}';
BEGIN
    FOR v_program IN SELECT DISTINCT a.program_id FROM unnest(p_lots) AS x(id)
                       JOIN loyalty.lot l ON l.id = x.id JOIN loyalty.account a ON a.id = l.account_id LOOP
        v_again := v_again || ARRAY(SELECT substr(t.ref, 5)::bigint FROM loyalty.transfer t
                                     WHERE t.program_id = v_program AND t.kind = 'expire' AND t.ref = ANY (v_refs));
    END LOOP;
    RETURN v_again;
END $$;
COMMENT ON FUNCTION loyalty._expired_before(bigint[]) IS 'Internal: the lots among these that have expired before';

-- A job batch's accounts: those owning its lots and p_accounts, locked in
-- one statement, in id order (locking one set, then another, could
-- deadlock with a statement holding one of the second), which writes
-- their deferred journal lines and lots (p_vest_by and what it returns: as
-- _lock_accounts's).
CREATE FUNCTION loyalty._lock_accounts_of_lots(p_lots bigint[], p_accounts bigint[] DEFAULT '{}',
                                               p_vest_by timestamptz DEFAULT NULL,
                                               OUT written_for bigint[], OUT vested bigint, OUT vested_points bigint)
LANGUAGE sql SET search_path = loyalty, pg_catalog, pg_temp AS $$
    SELECT * FROM loyalty._lock_accounts(coalesce(p_accounts, '{}')
                                         || ARRAY(SELECT l.account_id
                                                  FROM unnest(p_lots) AS x(id) JOIN loyalty.lot l ON l.id = x.id),
                                         p_vest_by)
$$;
COMMENT ON FUNCTION loyalty._lock_accounts_of_lots(bigint[], bigint[], timestamptz) IS 'Internal: locks the member accounts owning the given lots and the accounts given, in account-id order, and writes their deferred journal lines (those vesting by p_vest_by vested); returns the accounts it wrote them for and how many lots it vested';

-- One expiry transfer through the posting routine (C, LedgerPost).
CREATE FUNCTION loyalty._post_expire(program_id bigint, account_id bigint, breakage_id bigint,
                                     lot_id bigint, points bigint, ref text, occurred_at timestamptz)
RETURNS bigint AS 'MODULE_PATHNAME', 'loyalty_post_expire' LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION loyalty._post_expire(bigint, bigint, bigint, bigint, bigint, text, timestamptz) IS 'Internal: posts the expiry of a lot''s points to the breakage account through the posting routine';

-- A reversal (a cancelled redemption or capture) that gives points back to
-- a lot already past its expiry moment at the reversal's time: those
-- points came back expired, and go to breakage at once, dated at the
-- reversal, except those that settled a refund right after it
-- (loyalty._recover_refilled: the later 'recover' and 'refund_settle'
-- lines of the lot). Left
-- to the expire job they would be dated at the lot's expiry, before they
-- came back, and merged with what the lot had left then (which the job
-- still expires at its expiry moment).
CREATE FUNCTION loyalty._expire_refilled(p_transfer bigint) RETURNS void
LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    d record;
BEGIN
    FOR d IN SELECT u.lot_id, a.program_id, a.id AS account_id, b.id AS breakage_id, t.occurred_at,
                    -u.amount::bigint - coalesce((SELECT sum(r.amount::bigint) FROM loyalty.lot_use r
                                                  JOIN loyalty.transfer rt ON rt.id = r.transfer_id
                                                  WHERE r.lot_id = u.lot_id
                                                    AND rt.kind IN ('recover', 'refund_settle')
                                                    AND rt.id > t.id)::bigint, 0) AS points
             FROM loyalty.transfer t
             JOIN loyalty.lot_use u ON u.transfer_id = t.id AND u.amount < 0
             JOIN loyalty.lot l ON l.id = u.lot_id
             JOIN loyalty.account a ON a.id = l.account_id
             JOIN loyalty.program p ON p.id = a.program_id
             JOIN loyalty.account b ON b.program_id = a.program_id AND b.kind = 'breakage' AND b.name = ''
             WHERE t.id = p_transfer
               AND least(l.expires_at,
                         CASE WHEN p.options #>> '{expiry,policy}' IS NOT DISTINCT FROM 'rolling'
                              THEN loyalty._rolling_lapse(l.account_id, l.occurred_at, t.occurred_at) END)
                   <= t.occurred_at
             ORDER BY u.lot_id LOOP
        CONTINUE WHEN d.points <= 0;
        PERFORM loyalty._post_expire(d.program_id, d.account_id, d.breakage_id, d.lot_id, d.points,
                                     loyalty._expire_ref(d.lot_id), d.occurred_at);
    END LOOP;
END $$;
COMMENT ON FUNCTION loyalty._expire_refilled(bigint) IS 'Internal: expires at once, dated at the reversal, the points a reversal gave back to lots already past their expiry';

-- The expire job, one transfer per lot through the posting routine: the
-- reference the set-based handler is checked against (test/sql/expiry_bulk).
-- The expire job's next batch: its candidate lots and the accounts whose
-- deferred purchases expire by as_of (docs/accrual.md, "Deferred journal
-- lines"), all locked at once (_lock_accounts_of_lots, which writes the
-- deferred lines and lots); the newly written lots that have expired join
-- the batch. NULL: nothing left to expire.
CREATE FUNCTION loyalty._expire_batch(p_as_of timestamptz, p_limit integer)
RETURNS bigint[] LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_deferred bigint[] := loyalty._deferred_due(p_as_of, p_limit, false);
    v_lots bigint[] := loyalty._expire_candidates(p_as_of, p_limit);
BEGIN
    IF v_lots IS NULL AND v_deferred IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM loyalty._lock_accounts_of_lots(v_lots, v_deferred);
    IF v_deferred IS NULL THEN
        RETURN v_lots;
    END IF;
    v_lots := nullif(ARRAY(SELECT x.id FROM unnest(v_lots) AS x(id)
                           UNION
                           SELECT l.id FROM loyalty.lot l
                           WHERE l.account_id = ANY (v_deferred) AND l.remaining OPERATOR(loyalty.>) 0
                             AND l.expires_at <= p_as_of),
                     '{}');
    -- Accounts whose deferred purchases vest by p_as_of, none of which has
    -- expired: their lines are written and there is nothing to expire, which
    -- is not the end of the run (_job_step).
    IF v_lots IS NULL THEN
        PERFORM set_config('loyalty_job.wrote', cardinality(v_deferred)::text, true);
    END IF;
    RETURN v_lots;
END $$;
COMMENT ON FUNCTION loyalty._expire_batch(timestamptz, integer) IS 'Internal: the expire job''s next lots, with those of the deferred purchases that have expired by then, their accounts locked and their deferred lines written';

CREATE FUNCTION loyalty._job_expire_rows(as_of timestamptz, batch_size integer)
RETURNS TABLE (rows bigint, points bigint)
LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_lots bigint[];
    v_rows bigint := 0;
    v_points bigint := 0;
    d record;
BEGIN
    v_lots := loyalty._expire_batch(as_of, batch_size);
    IF v_lots IS NOT NULL THEN
        FOR d IN SELECT * FROM loyalty._expire_due(v_lots, as_of, loyalty._expired_before(v_lots)) LOOP
            PERFORM loyalty._post_expire(d.program_id, d.account_id, d.breakage_id, d.lot_id,
                                         d.remaining::bigint, d.ref, d.moment);
            v_rows := v_rows + 1;
            v_points := v_points + d.remaining::bigint;
        END LOOP;
    END IF;
    RETURN QUERY SELECT v_rows, v_points;
END $$;
COMMENT ON FUNCTION loyalty._job_expire_rows(timestamptz, integer) IS 'Job handler: expires one batch of lots, one posting per lot through the posting routine';

-- The expire job, set-based: one statement writes what the posting routine
-- would for each lot (transfer chained with loyalty.chain(), lot_use, lot,
-- member balances and chain head), after locking the accounts in id order.
CREATE FUNCTION loyalty._job_expire(as_of timestamptz, batch_size integer)
RETURNS TABLE (rows bigint, points bigint)
LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_lots bigint[];
    v_again bigint[];
    v_actor text := coalesce(nullif(current_setting('loyalty.actor', true), ''), session_user::text);
BEGIN
    v_lots := loyalty._expire_batch(as_of, batch_size);
    IF v_lots IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    v_again := loyalty._expired_before(v_lots);
    RETURN QUERY
    WITH due AS (
        SELECT d.*, nextval('loyalty.transfer_id_seq') AS tid
        FROM (SELECT d.*, a.last_hash AS head
              FROM loyalty._expire_due(v_lots, as_of, v_again) d
              JOIN loyalty.account a ON a.id = d.account_id
              ORDER BY d.account_id, d.moment, d.lot_id) d
    ), hashed AS (
        SELECT d.*, loyalty.chain(d.head, false, d.program_id, d.account_id, d.breakage_id, d.remaining,
                                  'expire', d.ref, d.moment, now(), NULL::integer, v_actor, NULL::text)
                        OVER (PARTITION BY d.account_id ORDER BY d.tid) AS hash
        FROM due d
    ), chained AS (
        SELECT h.*,
               coalesce(lag(h.hash) OVER w, h.head) AS prev,
               row_number() OVER (PARTITION BY h.account_id ORDER BY h.tid DESC) AS from_last
        FROM hashed h WINDOW w AS (PARTITION BY h.account_id ORDER BY h.tid)
    ), t AS (
        INSERT INTO loyalty.transfer (id, program_id, debit_account_id, credit_account_id, amount, kind, ref,
                                      occurred_at, posted_at, rule_version, actor, reason,
                                      debit_prev_hash, credit_prev_hash, hash)
        SELECT c.tid, c.program_id, c.account_id, c.breakage_id, c.remaining, 'expire', c.ref,
               c.moment, now(), NULL, v_actor, NULL, c.prev, NULL, c.hash
        FROM chained c
    ), u AS (
        INSERT INTO loyalty.lot_use (transfer_id, lot_id, account_id, amount, occurred_at)
        SELECT c.tid, c.lot_id, c.account_id, c.remaining, c.moment FROM chained c
    ), l AS (
        UPDATE loyalty.lot l SET remaining = 0 FROM chained c WHERE l.id = c.lot_id
    ), s AS (
        SELECT c.account_id,
               sum(c.remaining::bigint) FILTER (WHERE NOT c.pending) AS avail,
               sum(c.remaining::bigint) FILTER (WHERE c.pending) AS pend,
               (array_agg(c.hash) FILTER (WHERE c.from_last = 1))[1] AS last_hash,
               max(c.tid) AS last_tid
        FROM chained c GROUP BY c.account_id
    ), a AS (
        UPDATE loyalty.account a
           SET available = (a.available::bigint - coalesce(s.avail, 0))::loyalty.points,
               pending = (a.pending::bigint - coalesce(s.pend, 0))::loyalty.points,
               last_hash = s.last_hash, last_transfer_id = s.last_tid
          FROM s WHERE a.id = s.account_id
    )
    SELECT count(*)::bigint, coalesce(sum(c.remaining::bigint), 0)::bigint FROM chained c;
END $$;
COMMENT ON FUNCTION loyalty._job_expire(timestamptz, integer) IS 'Job handler: expires one batch of lots set-based, writing exactly what the posting routine would';

-- ---- expiring_points -----------------------------------------------------

CREATE FUNCTION loyalty.expiring_points(program text, member_ref text, within interval DEFAULT NULL,
                                        as_of timestamptz DEFAULT now())
RETURNS TABLE (expires_at timestamptz, points loyalty.points)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
    WITH a AS (
        SELECT acc.id,
               coalesce(within, (p.options #>> '{expiry,notice}')::interval, interval '30 days') AS win
        FROM loyalty.account acc JOIN loyalty.program p ON p.id = acc.program_id
        WHERE acc.id = loyalty._account_of(program, member_ref)
    )
    SELECT l.expires_at, loyalty.sum(l.remaining)
    FROM a, loyalty._lots_as_of(a.id, as_of) l
    WHERE l.remaining > 0 AND l.expires_at > as_of AND l.expires_at <= as_of + a.win
    GROUP BY l.expires_at
    ORDER BY l.expires_at
$$;
COMMENT ON FUNCTION loyalty.expiring_points(text, text, interval, timestamptz) IS 'What of a member''s points will expire within the window after as_of (default: the program''s expiry.notice, else 30 days), and when; one row per expiry moment';
