-- Accrual: versioned earning rules, purchases, refunds, triggers on the
-- application's own purchase table, quarantine (docs/accrual.md).

INSERT INTO loyalty.transfer_kind VALUES
    ('accrual',  'Points for a purchase',         'earn'),
    ('refund',   'Points taken back for a return', 'adjust'),
    ('recover',  'Refund debt recovered',          'adjust'),
    ('refund_settle', 'Returned points settle a refund', 'adjust'),
    ('refund_return', 'Points a refund took given back', 'adjust'),
    ('recover_return', 'Points a debt recovery took given back', 'adjust'),
    ('refund_undo', 'Refund undone: the order came back', 'adjust');

CREATE SEQUENCE loyalty.earning_rule_id_seq;
CREATE TABLE loyalty.earning_rule (
    id             bigint PRIMARY KEY DEFAULT nextval('loyalty.earning_rule_id_seq'),
    program_id     bigint NOT NULL REFERENCES loyalty.program,
    version        integer NOT NULL,
    effective_from timestamptz NOT NULL,
    rules          jsonb NOT NULL,
    note           text,
    author         text NOT NULL DEFAULT session_user,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (program_id, version)
);
ALTER SEQUENCE loyalty.earning_rule_id_seq OWNED BY loyalty.earning_rule.id;
CREATE INDEX earning_rule_effective_idx ON loyalty.earning_rule (program_id, effective_from);
COMMENT ON TABLE loyalty.earning_rule IS 'Versioned earning rules of a program: a purchase is earned by the latest version whose effective_from is at or before its occurred_at';

-- loyalty.accrual, the record of every purchase, is created with the journal
-- (sql/20_ledger.sql): a member's journal lines are read through it.


CREATE TABLE loyalty.accrual_refund (
    program_id   bigint NOT NULL,
    refund_ref   text NOT NULL,
    purchase_ref text NOT NULL,
    amount       numeric NOT NULL,
    points       bigint NOT NULL,
    taken        bigint NOT NULL,
    shortfall    bigint NOT NULL,
    forgiven     bigint NOT NULL DEFAULT 0,
    returned     bigint NOT NULL DEFAULT 0 CHECK (returned >= 0 AND returned <= taken),
    occurred_at  timestamptz NOT NULL,
    restored_at  timestamptz,
    PRIMARY KEY (program_id, refund_ref),
    CHECK (points = taken + shortfall + forgiven)
);
-- A purchase's earlier refunds: what they forgave of its expired points.
CREATE INDEX accrual_refund_purchase_idx ON loyalty.accrual_refund (program_id, purchase_ref);
COMMENT ON TABLE loyalty.accrual_refund IS 'Each refund of a purchase: amount returned, points it accounts for, of which taken from lots, recorded as debt (shortfall) and forgiven because they had expired';
COMMENT ON COLUMN loyalty.accrual_refund.returned IS 'Of the points the refund took from the member''s other lots (in place of the purchase''s spent ones), those given back when a cancel returned the purchase''s own points (loyalty._recover_refilled)';
COMMENT ON COLUMN loyalty.accrual_refund.restored_at IS 'When the refund a DELETE of an attached table posted was undone because the application inserted the same order again (loyalty._restore_deleted): it no longer counts against the purchase';
COMMENT ON COLUMN loyalty.accrual_refund.forgiven IS 'Points of the purchase that had expired unused before the refund: already gone from the member, so neither taken again nor owed';

CREATE SEQUENCE loyalty.accrual_debt_id_seq;
CREATE TABLE loyalty.accrual_debt (
    id          bigint PRIMARY KEY DEFAULT nextval('loyalty.accrual_debt_id_seq'),
    program_id  bigint NOT NULL,
    account_id  bigint NOT NULL,
    refund_ref  text NOT NULL,
    amount      bigint NOT NULL CHECK (amount > 0),
    outstanding bigint NOT NULL CHECK (outstanding >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    shown_as_negative boolean NOT NULL DEFAULT false,
    cancelled_at timestamptz,
    refilled    bigint NOT NULL DEFAULT 0 CHECK (refilled >= 0),
    given_back  bigint NOT NULL DEFAULT 0 CHECK (given_back >= 0),
    CHECK (cancelled_at IS NULL OR outstanding = 0),
    CHECK (outstanding + refilled + given_back <= amount)
);
ALTER SEQUENCE loyalty.accrual_debt_id_seq OWNED BY loyalty.accrual_debt.id;
CREATE INDEX accrual_debt_open_idx ON loyalty.accrual_debt (account_id) WHERE outstanding > 0;
-- A refund's debt by its ref: undoing a DELETE's refund, and a cancel giving
-- back what credits repaid of a debt already paid off (outstanding 0).
CREATE INDEX accrual_debt_refund_idx ON loyalty.accrual_debt (program_id, refund_ref);
COMMENT ON TABLE loyalty.accrual_debt IS 'Points a refund could not claw back because the member had spent them; recovered from later earnings';
CREATE INDEX accrual_debt_negative_idx ON loyalty.accrual_debt (account_id) WHERE shown_as_negative;
COMMENT ON COLUMN loyalty.accrual_debt.created_at IS 'When the refund was posted (its occurred_at): the debt counts from then';
COMMENT ON COLUMN loyalty.accrual_debt.cancelled_at IS 'When the refund that recorded the debt was undone (the order came back to its table before anything was recovered, loyalty._restore_deleted): nothing is owed, and no recover transfer paid it';
COMMENT ON COLUMN loyalty.accrual_debt.refilled IS 'Of the amount, what the purchase''s own points repaid when a cancel gave them back to its lot (loyalty._recover_refilled)';
COMMENT ON COLUMN loyalty.accrual_debt.given_back IS 'Of what later credits repaid, what a cancel gave back to the lots those recoveries took, the purchase''s returned points settling it instead (loyalty._recover_refilled)';
COMMENT ON COLUMN loyalty.accrual_debt.shown_as_negative IS 'The program option shortfall was "negative" when the refund was posted: the member''s balance shows the debt below zero until it is recovered';

CREATE TABLE loyalty.accrual_campaign (
    program_id bigint NOT NULL,
    campaign   text NOT NULL,
    used       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (program_id, campaign)
);
COMMENT ON TABLE loyalty.accrual_campaign IS 'Campaign bonus points granted so far, against the campaign''s budget';

CREATE TABLE loyalty.accrual_source (
    source          regclass PRIMARY KEY,
    program_id      bigint NOT NULL REFERENCES loyalty.program,
    member_column   name NOT NULL,
    amount_column   name NOT NULL,
    ref_column      name NOT NULL,
    occurred_at_column name,
    category_column name,
    channel_column  name,
    store_column    name,
    attached_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE loyalty.accrual_source IS 'Application tables with accrual triggers attached, and which of their columns hold the purchase';

CREATE SEQUENCE loyalty.accrual_quarantine_id_seq;
CREATE TABLE loyalty.accrual_quarantine (
    id             bigint PRIMARY KEY DEFAULT nextval('loyalty.accrual_quarantine_id_seq'),
    program_id     bigint NOT NULL,
    source         regclass,
    -- what the row is: a purchase (row_data is the application's row), or a
    -- refund an UPDATE or DELETE could not post (row_data says what to
    -- refund: by an amount, or down to a new amount), or the undoing of a
    -- DELETE's refund that the order's insertion again could not post
    kind           text NOT NULL DEFAULT 'purchase' CHECK (kind IN ('purchase', 'refund', 'refund_to', 'restore')),
    ref            text,
    member_ref     text,
    row_data       jsonb NOT NULL,
    -- the attachment's columns the row was read through (a purchase from a
    -- table): a replay after a column was renamed finds the value under the
    -- key it was stored with
    columns        jsonb,
    -- the TimeZone of the session whose statement quarantined a purchase:
    -- a replay reads a timestamp or date column in it, as the trigger did
    time_zone      text,
    reason         text NOT NULL,
    sqlstate       text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    replayed_at    timestamptz,
    -- the application deleted the row before it could earn: not replayed
    withdrawn_at   timestamptz,
    attempts       integer NOT NULL DEFAULT 0
);
ALTER SEQUENCE loyalty.accrual_quarantine_id_seq OWNED BY loyalty.accrual_quarantine.id;
CREATE INDEX accrual_quarantine_open_idx ON loyalty.accrual_quarantine (program_id, id)
    WHERE replayed_at IS NULL AND withdrawn_at IS NULL;
-- An UPDATE or DELETE of an attached table finds the waiting purchases of
-- the refs it changed (loyalty._accrual_trigger): the row as it is now is
-- what a replay posts, and a deleted order posts nothing (nor does the
-- undoing of its earlier DELETE's refund, kind restore).
CREATE INDEX accrual_quarantine_ref_idx ON loyalty.accrual_quarantine (source, ref)
    WHERE replayed_at IS NULL AND withdrawn_at IS NULL AND kind IN ('purchase', 'restore');
COMMENT ON COLUMN loyalty.accrual_quarantine.withdrawn_at IS 'When the application deleted the row from its table before it could earn: a replay skips it (an UPDATE of the row instead replaces row_data with the row as it is now)';
COMMENT ON COLUMN loyalty.accrual_quarantine.time_zone IS 'The TimeZone setting of the session whose statement quarantined the purchase: replay_quarantine reads a time column without time zone (timestamp, date) in it, as the trigger would have';
COMMENT ON COLUMN loyalty.accrual_quarantine.columns IS 'The attachment''s column names when the row was quarantined (member, amount, ref, occurred_at, category, channel, store): replay_quarantine reads a value under the current column''s name, or under this one if row_data has no such key';
COMMENT ON TABLE loyalty.accrual_quarantine IS 'Rows of an application''s purchase table that could not earn (unknown member, bad amount, no ref, ...): the reason, the row, when; replay_quarantine() retries them';

SELECT pg_catalog.pg_extension_config_dump('loyalty.earning_rule', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.earning_rule_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.accrual', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.accrual_refund', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.accrual_debt', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.accrual_debt_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.accrual_campaign', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.accrual_source', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.accrual_quarantine', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.accrual_quarantine_id_seq', '');
REVOKE ALL ON loyalty.earning_rule, loyalty.accrual, loyalty.accrual_refund, loyalty.accrual_debt,
              loyalty.accrual_campaign, loyalty.accrual_source, loyalty.accrual_quarantine FROM PUBLIC;
REVOKE ALL ON SEQUENCE loyalty.earning_rule_id_seq, loyalty.accrual_debt_id_seq,
              loyalty.accrual_quarantine_id_seq FROM PUBLIC;

-- ---- rules ----

CREATE FUNCTION loyalty._check_rules(rules jsonb) RETURNS void
AS 'MODULE_PATHNAME', 'accrual_check_rules' LANGUAGE C STRICT;
COMMENT ON FUNCTION loyalty._check_rules(jsonb) IS 'Internal: validates an earning rules document by compiling it, raising 22023 with the JSON path of the first problem';

CREATE FUNCTION loyalty._rules_changed() RETURNS void
AS 'MODULE_PATHNAME', 'accrual_rules_changed' LANGUAGE C;
COMMENT ON FUNCTION loyalty._rules_changed() IS 'Internal: tells every backend to drop its compiled earning rules (a relcache invalidation of loyalty.earning_rule)';

-- Each backend keeps programs and attachments with its compiled rules; any
-- change to the tables they come from drops that cache everywhere.
CREATE FUNCTION loyalty._accrual_cache_trigger() RETURNS trigger
AS 'MODULE_PATHNAME', 'accrual_cache_trigger' LANGUAGE C;
COMMENT ON FUNCTION loyalty._accrual_cache_trigger() IS 'Internal trigger: a change to loyalty.program or loyalty.accrual_source drops every backend''s accrual cache';
CREATE TRIGGER accrual_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON loyalty.program
    FOR EACH STATEMENT EXECUTE FUNCTION loyalty._accrual_cache_trigger();
CREATE TRIGGER accrual_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON loyalty.accrual_source
    FOR EACH STATEMENT EXECUTE FUNCTION loyalty._accrual_cache_trigger();
ALTER TABLE loyalty.program ENABLE ALWAYS TRIGGER accrual_cache;
ALTER TABLE loyalty.accrual_source ENABLE ALWAYS TRIGGER accrual_cache;

CREATE FUNCTION loyalty._amount_double(amount numeric) RETURNS float8
AS 'MODULE_PATHNAME', 'accrual_amount_double' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION loyalty._amount_double(numeric) IS 'Internal: a purchase amount as the earning rules see it, the double nearest its value (as numeric::float8), computed without printing it; for the tests';

CREATE FUNCTION loyalty._lock_rules(program_id bigint) RETURNS void
AS 'MODULE_PATHNAME', 'accrual_lock_rules' LANGUAGE C STRICT;
COMMENT ON FUNCTION loyalty._lock_rules(bigint) IS 'Internal: takes the lock on a program''s rules in SHARE mode until the transaction ends; every posting holds it in ROW EXCLUSIVE mode (set_earning_rules, before it marks purchases for a first daily cap)';

CREATE FUNCTION loyalty.set_earning_rules(program text, rules jsonb, effective_from timestamptz, note text DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_program bigint;
    v_version integer;
    v_detail text;
BEGIN
    IF program IS NULL OR rules IS NULL OR effective_from IS NULL THEN
        RAISE EXCEPTION 'program, rules and effective_from must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT isfinite(effective_from) THEN
        RAISE EXCEPTION 'effective_from must be a finite time' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_program := loyalty._program_id(program);
    PERFORM loyalty._check_rules(rules);
    IF rules ? 'expiry' THEN    -- the rest of the expiry shape is the program option's
        BEGIN
            PERFORM loyalty._check_options(jsonb_build_object('expiry', rules -> 'expiry'));
        EXCEPTION WHEN invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION 'invalid earning rules' USING ERRCODE = 'invalid_parameter_value',
                DETAIL = v_detail, HINT = 'See the rules document in docs/accrual.md.';
        END;
    END IF;
    -- one version at a time per program: versions are numbered in order
    PERFORM 1 FROM loyalty.program p WHERE p.id = v_program FOR UPDATE;
    -- The program's first daily cap: its purchases so far join the cap's
    -- index (accrual_day_cap_idx), which holds those of programs with one.
    -- The rules' lock in SHARE mode waits for the program's postings in
    -- progress (they hold it in ROW EXCLUSIVE mode), so that the UPDATE, whose snapshot
    -- is taken after it, marks their purchases too; the postings that come
    -- after wait for this commit and read the new version (docs/accrual.md,
    -- "Daily cap").
    IF rules #> '{caps,per_member_per_day}' IS NOT NULL
       AND NOT EXISTS (SELECT FROM loyalty.earning_rule r
                       WHERE r.program_id = v_program AND r.rules #> '{caps,per_member_per_day}' IS NOT NULL) THEN
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'a program''s first daily cap must be set under READ COMMITTED'
                USING ERRCODE = 'invalid_transaction_state',
                      DETAIL = 'It marks the purchases posted before it, which a transaction snapshot taken before its wait for the postings in progress would not all see.',
                      HINT = 'Call set_earning_rules in a READ COMMITTED transaction.';
        END IF;
        PERFORM loyalty._lock_rules(v_program);
        UPDATE loyalty.accrual x SET day_capped = true WHERE x.program_id = v_program AND NOT x.day_capped;
    END IF;
    SELECT coalesce(max(r.version), 0) + 1 INTO v_version
    FROM loyalty.earning_rule r WHERE r.program_id = v_program;
    INSERT INTO loyalty.earning_rule (program_id, version, effective_from, rules, note)
    VALUES (v_program, v_version, set_earning_rules.effective_from, rules, note);
    PERFORM loyalty._rules_changed();
    RETURN v_version;
END $$;
COMMENT ON FUNCTION loyalty.set_earning_rules(text, jsonb, timestamptz, text) IS 'Validates and adds a new earning rule version in force from effective_from; earlier versions stay; returns the version number';

-- ---- posting ----

CREATE FUNCTION loyalty.accrue(program text, member_ref text, amount numeric, ref text,
                               occurred_at timestamptz DEFAULT NULL, category text DEFAULT NULL,
                               channel text DEFAULT NULL, store text DEFAULT NULL, attrs jsonb DEFAULT '{}')
RETURNS bigint AS 'MODULE_PATHNAME', 'loyalty_accrue'
-- SECURITY DEFINER without SET search_path, as _accrual_trigger below
LANGUAGE C VOLATILE SECURITY DEFINER;
COMMENT ON FUNCTION loyalty.accrue(text, text, numeric, text, timestamptz, text, text, text, jsonb) IS 'Posts the points of one purchase by the rules in force at occurred_at (NULL: now, the transaction''s start, and a retry under the same ref in a later transaction is the same purchase); idempotent on ref; returns the points earned';

CREATE FUNCTION loyalty.refund(program text, ref text, amount numeric DEFAULT NULL, refund_ref text DEFAULT NULL)
RETURNS bigint AS 'MODULE_PATHNAME', 'loyalty_refund'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp;
CREATE FUNCTION loyalty._ordinal() RETURNS bigint
AS 'MODULE_PATHNAME', 'accrual_ordinal' LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION loyalty._ordinal() IS 'Internal: a number that grows with every call in a backend; numbers the rows of a transition table in the statement''s order';

CREATE FUNCTION loyalty._refund_to(program text, ref text, new_amount numeric, refund_ref text)
RETURNS bigint AS 'MODULE_PATHNAME', 'loyalty_refund_to'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp;
COMMENT ON FUNCTION loyalty._refund_to(text, text, numeric, text) IS 'Internal: refunds a purchase down to what it now amounts to (what is left unrefunded beyond new_amount, nothing if none), as an UPDATE lowering an attached table''s amount does; replay_quarantine retries such refunds with it';

-- Whether refund_ref names a refund the DELETE of an attached table posted
-- for purchase ref: ref:deleted, then ref:deleted:2, ... after each undoing
-- (loyalty._accrual_trigger). Inlined into the queries that use it.
CREATE FUNCTION loyalty._deletion_refund(refund_ref text, ref text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT $1 OPERATOR(pg_catalog.=) ($2 OPERATOR(pg_catalog.||) ':deleted')
        OR pg_catalog.starts_with($1, $2 OPERATOR(pg_catalog.||) ':deleted:')
$$;
COMMENT ON FUNCTION loyalty._deletion_refund(text, text) IS 'Internal: whether a refund_ref is one the DELETE of an attached table posted for the purchase ref (ref:deleted, ref:deleted:2, ...)';

-- An order deleted from an attached table and inserted again (a sync job
-- that reloads a day's orders, a restore from a backup): the DELETE
-- refunded the purchase (refund_ref ref:deleted, then ref:deleted:2, ...),
-- and the same order back in the table undoes that refund, as if it had
-- never gone. The refund's journal line is reversed, restoring exactly the
-- lots it took (loyalty._reverse_transfer, so points given back to a lot
-- already past its expiry expire at once, and a refilled lot of another
-- refunded purchase repays that refund's debt); the refund stops counting
-- against the purchase. What it recorded as owed (the member had spent
-- the points) is cancelled (accrual_debt.cancelled_at), and what later
-- credits already repaid of it goes back to the lots those recoveries
-- took (loyalty._give_back_recovered, accrual_debt.given_back). Undone
-- only while nothing else happened to what the refund did: a refund whose
-- debt shows as a negative balance, whose debt the purchase's own points
-- repaid or a cancel gave back to (accrual_debt.refilled, given_back), or
-- whose points a cancel already gave back (accrual_refund.returned),
-- raises LY014 and the trigger quarantines the undoing, for an
-- administrator to decide; so does one whose repaid points the lots they
-- came from can no longer all take back.
-- A refund waiting in the quarantine for the same deletion is withdrawn.
-- to_amount: the order came back with another amount (it was lowered
-- before the DELETE, or the reload carries a correction); once the refund
-- is undone, the purchase is refunded down to it as an UPDATE lowering
-- the amount would be (ref:amount:<to_amount>; nothing if it is not lower
-- than what is left). Returns the points the refund had taken or recorded
-- as owed (0: nothing to undo).
CREATE FUNCTION loyalty._give_back_recovered(account bigint, points bigint, debt bigint, since timestamptz,
                                             ref text, occurred_at timestamptz) RETURNS bigint
AS 'MODULE_PATHNAME', 'loyalty_give_back_recovered' LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION loyalty._give_back_recovered(bigint, bigint, bigint, timestamptz, text, timestamptz) IS 'Internal: gives up to points back to the lots the account''s debt recoveries since then, of that debt or older ones, took (recover_return), expiring at once what comes back to a lot past its expiry; returns the points given back';

CREATE FUNCTION loyalty._restore_deleted(program text, ref text, to_amount numeric DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_program bigint := loyalty._program_id(program);
    a loyalty.accrual;
    d loyalty.accrual_refund;
    v_debt loyalty.accrual_debt;
    v_transfer bigint;
    v_repaid bigint;
    v_given bigint;
BEGIN
    SELECT * INTO a FROM loyalty.accrual x WHERE x.program_id = v_program AND x.ref = ref;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'purchase "%" does not exist in program "%"', ref, program USING ERRCODE = 'LY011';
    END IF;
    -- the member account first, as every posting locks it, then the purchase
    PERFORM loyalty._lock_accounts(ARRAY[a.account_id]);
    SELECT * INTO a FROM loyalty.accrual x WHERE x.program_id = v_program AND x.ref = ref FOR UPDATE;
    UPDATE loyalty.accrual_quarantine q SET withdrawn_at = clock_timestamp()
    WHERE q.program_id = v_program AND q.kind = 'refund' AND q.ref = ref
      AND q.replayed_at IS NULL AND q.withdrawn_at IS NULL
      AND loyalty._deletion_refund(q.row_data ->> 'refund_ref', ref);
    SELECT * INTO d FROM loyalty.accrual_refund r
    WHERE r.program_id = v_program AND r.purchase_ref = ref AND r.restored_at IS NULL
      AND loyalty._deletion_refund(r.refund_ref, ref)
    ORDER BY r.occurred_at DESC, r.refund_ref DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- what it recorded as owed is cancelled, unless some was recovered
    -- already (from later purchases) or the program shows debt as a
    -- negative balance (whose history the statement reads)
    SELECT * INTO v_debt FROM loyalty.accrual_debt x
    WHERE x.program_id = v_program AND x.refund_ref = d.refund_ref AND x.account_id = a.account_id;
    IF d.returned > 0 OR v_debt.shown_as_negative OR v_debt.refilled > 0 OR v_debt.given_back > 0 THEN
        RAISE EXCEPTION 'the refund "%" of purchase "%" cannot be undone', d.refund_ref, ref
            USING ERRCODE = 'LY014',
                  DETAIL = CASE WHEN d.returned > 0
                                THEN format('A cancel already gave back %s of the points it took.', d.returned)
                                WHEN v_debt.shown_as_negative
                                THEN format('It recorded %s points as owed, shown as a negative balance.', v_debt.amount)
                                ELSE format('Of the %s points it recorded as owed, %s were repaid by points a cancel gave back.',
                                            v_debt.amount, v_debt.refilled + v_debt.given_back) END,
                  HINT = 'The order is back in its table: post what the member should get with loyalty.adjust().';
    END IF;
    -- what later credits repaid of the debt (recovered: amount - outstanding)
    v_repaid := coalesce(v_debt.amount - v_debt.outstanding, 0);
    UPDATE loyalty.accrual_debt x SET outstanding = 0, cancelled_at = now(), given_back = v_repaid
    WHERE x.id = v_debt.id;
    -- no longer a refund of the purchase, before the reversal reads refunds
    UPDATE loyalty.accrual_refund r SET restored_at = now()
    WHERE r.program_id = v_program AND r.refund_ref = d.refund_ref;
    UPDATE loyalty.accrual x SET refunded_amount = x.refunded_amount - d.amount,
                                 refunded_points = x.refunded_points - d.points
    WHERE x.program_id = v_program AND x.ref = ref;
    IF d.taken > 0 THEN
        SELECT t.id INTO STRICT v_transfer FROM loyalty.transfer t
        WHERE t.program_id = v_program AND t.kind = 'refund' AND t.ref = d.refund_ref;
        PERFORM loyalty._reverse_transfer(v_transfer, 'refund_undo', d.refund_ref);
    END IF;
    IF v_repaid > 0 THEN
        v_given := loyalty._give_back_recovered(a.account_id, v_repaid, v_debt.id, v_debt.created_at,
                                                d.refund_ref || ', recovery given back', now());
        IF v_given < v_repaid THEN
            RAISE EXCEPTION 'the refund "%" of purchase "%" cannot be undone', d.refund_ref, ref
                USING ERRCODE = 'LY014',
                      DETAIL = format('Of the %s points later credits repaid of what it recorded as owed, the lots they came from can take back only %s.',
                                      v_repaid, v_given),
                      HINT = 'The order is back in its table: post what the member should get with loyalty.adjust().';
        END IF;
    END IF;
    IF to_amount IS NOT NULL THEN
        PERFORM loyalty._refund_to(program, ref, to_amount, ref || ':amount:' || to_amount);
    END IF;
    RETURN d.taken + coalesce(v_debt.amount, 0);
END $$;
COMMENT ON FUNCTION loyalty._restore_deleted(text, text, numeric) IS 'Internal: undoes the refund a DELETE of an attached table posted for a purchase whose order was inserted again (restoring exactly the lots it took, cancelling the debt it recorded and giving back to their lots what later credits repaid of it), then refunds it down to to_amount if given; LY014 when that debt shows as a negative balance or was repaid by points a cancel gave back, or a cancel gave part of the refund back; returns the points the refund had taken or recorded as owed';

-- Whether an attached table's row refused as another purchase under a
-- posted ref (23505) is that purchase's order coming back after a DELETE
-- with only its amount changed: the same member, time (unless the row has
-- none), category, channel and store, no attrs, and a DELETE's refund not
-- yet undone. The trigger then undoes the refund down to the new amount
-- (loyalty._restore_deleted) instead of quarantining the row.
CREATE FUNCTION loyalty._reinserted_changed(program_id bigint, ref text, member_id bigint, occurred_at timestamptz,
                                            occurred_unset boolean, category text, channel text, store text)
RETURNS boolean LANGUAGE sql STABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
    SELECT EXISTS (
        SELECT FROM loyalty.accrual x
        JOIN loyalty.accrual_refund r ON r.program_id = x.program_id AND r.purchase_ref = x.ref
        WHERE x.program_id = $1 AND x.ref = $2 AND x.member_id = $3
          AND ($5 OR x.occurred_at = $4)
          AND x.category IS NOT DISTINCT FROM $6 AND x.channel IS NOT DISTINCT FROM $7
          AND x.store IS NOT DISTINCT FROM $8 AND x.attrs = '{}'
          AND r.restored_at IS NULL
          AND loyalty._deletion_refund(r.refund_ref, x.ref))
$$;
COMMENT ON FUNCTION loyalty._reinserted_changed(bigint, text, bigint, timestamptz, boolean, text, text, text) IS 'Internal: whether a row refused as another purchase under a posted ref is that purchase''s deleted order back with another amount (loyalty._restore_deleted then undoes the DELETE''s refund down to it)';

COMMENT ON FUNCTION loyalty.refund(text, text, numeric, text) IS 'Claws back the points of a purchase in proportion to the amount returned (NULL: all that is left), except those that expired unused; idempotent on refund_ref (default: the purchase ref); returns the points clawed back (taken from lots plus owed)';

CREATE FUNCTION loyalty._rebuilt_breakdown(program_id bigint, rule_version integer, amount numeric, day date,
                                           category text, channel text, store text, points bigint)
RETURNS json AS 'MODULE_PATHNAME', 'accrual_rebuilt_breakdown' LANGUAGE C STABLE;
COMMENT ON FUNCTION loyalty._rebuilt_breakdown(bigint, integer, numeric, date, text, text, text, bigint) IS 'Internal: the short breakdown of a purchase posted without one, computed again from its row; XX001 when the row no longer gives its points';

-- The whole breakdown of a purchase. accrual.breakdown keeps only what the
-- row's own columns, its rule version and the defaults cannot say (see
-- AccrualEvaluate): the rule version, the points and pending_until come from
-- the row, the rounding from the version's document, the rounded product is
-- the points less the bonuses plus what the caps cut; empty lists, a factor
-- of 1, a NULL tier and false flags are put back where the stored breakdown
-- does not have the key. A purchase posted without one has it computed again
-- from its row.
CREATE FUNCTION loyalty._accrual_breakdown(a loyalty.accrual) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
    SELECT jsonb_build_object('rule_version', a.rule_version, 'points', a.points)
        || CASE WHEN b ? 'base' THEN jsonb_build_object(
               'multipliers', '[]'::jsonb, 'factor', 1, 'bonuses', '[]'::jsonb, 'caps', '[]'::jsonb,
               'rounding', (SELECT coalesce(r.rules #>> '{base,rounding}', 'floor') FROM loyalty.earning_rule r
                            WHERE r.program_id = a.program_id AND r.version = a.rule_version),
               'rounded', a.points
                   - coalesce((SELECT sum((x ->> 'points')::bigint) FROM jsonb_array_elements(b -> 'bonuses') x), 0)
                   + coalesce((SELECT sum((x ->> 'cut')::bigint) FROM jsonb_array_elements(b -> 'caps') x), 0))
           ELSE '{}'::jsonb END
        || (b - 'context')
        || jsonb_build_object('context', '{"tier": null, "first_purchase": false, "birthday_month": false}'::jsonb
                                         || coalesce(b -> 'context', '{}'::jsonb))
        || CASE WHEN a.points > 0 AND a.vests_at > a.occurred_at
                THEN jsonb_build_object('pending_until', a.vests_at) ELSE '{}'::jsonb END
    FROM (SELECT coalesce(a.breakdown, loyalty._rebuilt_breakdown(a.program_id, a.rule_version, a.amount, a.day,
                                                                 a.category, a.channel, a.store, a.points))::jsonb AS b) s
$$;
COMMENT ON FUNCTION loyalty._accrual_breakdown(loyalty.accrual) IS 'The whole breakdown of a posted purchase: the stored keys with the row''s rule version, points and pending_until, the version''s rounding, the rounded product and the defaults put back';

CREATE FUNCTION loyalty.explain_accrual(program text, ref text)
RETURNS jsonb LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_program bigint := loyalty._program_id(program);
    v jsonb;
BEGIN
    SELECT loyalty._accrual_breakdown(a) || jsonb_build_object(
               'ref', a.ref, 'member_ref', m.member_ref, 'amount', a.amount,
               'occurred_at', a.occurred_at, 'category', a.category, 'channel', a.channel,
               'store', a.store, 'expires_at', a.expires_at,
               'refunded_amount', a.refunded_amount, 'refunded_points', a.refunded_points,
               -- a deferred purchase's line is not written yet: the id and
               -- points it will be written with
               'transfer_id', coalesce(t.id, d.id), 'posted_points', coalesce(t.amount::bigint, d.points))
      INTO v
    FROM loyalty.accrual a
    JOIN loyalty.member m ON m.id = a.member_id
    LEFT JOIN loyalty.transfer t ON t.id = a.transfer_id
    LEFT JOIN LATERAL (SELECT a.id, a.points WHERE a.transfer_id IS NULL AND a.points > 0) d ON true
    WHERE a.program_id = v_program AND a.ref = explain_accrual.ref;
    IF v IS NULL THEN
        RAISE EXCEPTION 'purchase "%" does not exist in program "%"', ref, program
            USING ERRCODE = 'LY011', HINT = 'Purchases are posted by loyalty.accrue() or an attached table.';
    END IF;
    RETURN v;
END $$;
COMMENT ON FUNCTION loyalty.explain_accrual(text, text) IS 'How the points of a purchase were computed: rule version, base, multipliers and bonuses applied, rounding, caps hit, pending-until, refunds';

-- ---- triggers on the application's table ----

-- SECURITY DEFINER without SET search_path: the function pushes the same
-- path (loyalty, pg_catalog; no temporary schema) itself, at a fraction of
-- what fmgr's SET costs every sale (LedgerPushSearchPath, src/ledger.c).
CREATE FUNCTION loyalty._accrual_trigger() RETURNS trigger
AS 'MODULE_PATHNAME', 'accrual_trigger'
LANGUAGE C SECURITY DEFINER;
COMMENT ON FUNCTION loyalty._accrual_trigger() IS 'Internal: statement-level trigger that posts (or refunds) a whole statement''s purchases set-based';

-- attach_accrual's check that a column's type (or a domain's base type) is
-- one whose values the trigger's casts always convert: the amount and the
-- time are read with casts that must not fail on a value of the column's
-- type (a text column holding 'abc' would make the application's INSERT
-- fail, which accrual must never do). No column (NULL): nothing to check.
CREATE FUNCTION loyalty._check_column_type(source regclass, col name, what text, allowed regtype[], hint text)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_type regtype;
    v_base regtype;
BEGIN
    IF col IS NULL THEN
        RETURN;
    END IF;
    SELECT a.atttypid, coalesce(nullif(t.typbasetype, 0), t.oid) INTO v_type, v_base
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = source AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF v_base IS NULL OR NOT v_base = ANY (allowed) THEN
        RAISE EXCEPTION 'column "%" of "%" cannot hold %', col, source::text, what
            USING ERRCODE = 'datatype_mismatch', DETAIL = format('It is of type %s.', v_type), HINT = hint;
    END IF;
END $$;
COMMENT ON FUNCTION loyalty._check_column_type(regclass, name, text, regtype[], text) IS 'Internal: refuses (42804) a column of an attached table whose type the accrual trigger cannot always convert';

-- The amount and the time are read with casts that must not fail on a
-- value of the column's type: a text column holding 'abc' would make the
-- application's INSERT fail, which accrual must never do. Checked when
-- attaching, and after any DDL (loyalty._accrual_ddl_check).
CREATE FUNCTION loyalty._check_read_types(source regclass, amount_column name, occurred_at_column name)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
BEGIN
    PERFORM loyalty._check_column_type(source, amount_column, 'amounts',
        ARRAY['numeric', 'int2', 'int4', 'int8', 'float4', 'float8', 'money']::regtype[],
        'An amount column is numeric, an integer, a floating-point number or money.');
    PERFORM loyalty._check_column_type(source, occurred_at_column, 'purchase times',
        ARRAY['timestamptz', 'timestamp', 'date']::regtype[],
        'A purchase time column is timestamp with time zone, timestamp or date.');
END $$;
COMMENT ON FUNCTION loyalty._check_read_types(regclass, name, name) IS 'Internal: refuses (42804) an amount or time column of a type the accrual trigger cannot always convert';

CREATE FUNCTION loyalty.attach_accrual(source regclass, program text, member_column name, amount_column name,
                                       ref_column name, occurred_at_column name DEFAULT NULL,
                                       category_column name DEFAULT NULL, channel_column name DEFAULT NULL,
                                       store_column name DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_program bigint;
    v_col name;
    v_tab text := source::text;
BEGIN
    IF source IS NULL OR program IS NULL OR member_column IS NULL OR amount_column IS NULL OR ref_column IS NULL THEN
        RAISE EXCEPTION 'source, program, member_column, amount_column and ref_column must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_program := loyalty._program_id(program);
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = source) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '"%" is not a table', v_tab USING ERRCODE = 'wrong_object_type';
    END IF;
    -- a temporary table goes at the end of its session without any event
    -- trigger seeing it, and would leave its attachment behind
    IF (SELECT c.relpersistence FROM pg_class c WHERE c.oid = source) = 't' THEN
        RAISE EXCEPTION '"%" is a temporary table', v_tab USING ERRCODE = 'wrong_object_type',
            HINT = 'Attach accrual to a permanent (or unlogged) table.';
    END IF;
    FOREACH v_col IN ARRAY ARRAY[member_column, amount_column, ref_column, occurred_at_column,
                                 category_column, channel_column, store_column] LOOP
        IF v_col IS NOT NULL AND NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = source
                                             AND a.attname = v_col AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'column "%" of "%" does not exist', v_col, v_tab
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;
    PERFORM loyalty._check_read_types(source, amount_column, occurred_at_column);
    IF EXISTS (SELECT FROM loyalty.accrual_source s WHERE s.source = attach_accrual.source) THEN
        RAISE EXCEPTION 'accrual is already attached to "%"', v_tab
            USING ERRCODE = 'LY013', HINT = 'Detach it first with loyalty.detach_accrual().';
    END IF;
    INSERT INTO loyalty.accrual_source (source, program_id, member_column, amount_column, ref_column,
                                        occurred_at_column, category_column, channel_column, store_column)
    VALUES (source, v_program, member_column, amount_column, ref_column, occurred_at_column,
            category_column, channel_column, store_column);
    EXECUTE format('CREATE TRIGGER loyalty_accrual_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS loyalty_new'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION loyalty._accrual_trigger()', v_tab);
    EXECUTE format('CREATE TRIGGER loyalty_accrual_update AFTER UPDATE ON %s'
                   ' REFERENCING OLD TABLE AS loyalty_old NEW TABLE AS loyalty_new'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION loyalty._accrual_trigger()', v_tab);
    EXECUTE format('CREATE TRIGGER loyalty_accrual_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS loyalty_old'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION loyalty._accrual_trigger()', v_tab);
END $$;
COMMENT ON FUNCTION loyalty.attach_accrual(regclass, text, name, name, name, name, name, name, name) IS 'Puts accrual triggers on an application''s purchase table: INSERT earns, DELETE or an amount lowered by UPDATE refunds; bad rows go to the quarantine';

CREATE FUNCTION loyalty.detach_accrual(source regclass)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM loyalty.accrual_source s WHERE s.source = detach_accrual.source;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'accrual is not attached to "%"', source::text USING ERRCODE = 'LY013';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = source) THEN
        RETURN;     -- the table is gone, and its triggers with it
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS loyalty_accrual_insert ON %s', source);
    EXECUTE format('DROP TRIGGER IF EXISTS loyalty_accrual_update ON %s', source);
    EXECUTE format('DROP TRIGGER IF EXISTS loyalty_accrual_delete ON %s', source);
END $$;
COMMENT ON FUNCTION loyalty.detach_accrual(regclass) IS 'Removes the accrual triggers from an application''s table; what was posted stays';

-- An attachment follows its table through DDL. A dropped table takes its
-- attachment with it (its quarantined rows stay, as a record). A column the
-- triggers read cannot be dropped, renamed or changed to a type they cannot
-- read, and the accrual triggers cannot be dropped or renamed on their own:
-- each would make every later INSERT of the application fail, or its sales
-- earn nothing, without a word. detach_accrual() comes first.
CREATE FUNCTION loyalty._accrual_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_trigger text;
    v_table text;
BEGIN
    DELETE FROM loyalty.accrual_source s
    USING pg_event_trigger_dropped_objects() d
    WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND d.objid = s.source::oid;
    SELECT d.address_names[3], s.source::text INTO v_trigger, v_table
    FROM pg_event_trigger_dropped_objects() d
    JOIN loyalty.accrual_source s ON s.source = to_regclass(format('%I.%I', d.address_names[1], d.address_names[2]))
    WHERE d.classid = 'pg_trigger'::regclass
      AND d.address_names[3] IN ('loyalty_accrual_insert', 'loyalty_accrual_update', 'loyalty_accrual_delete')
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'cannot drop trigger % on "%": accrual is attached to it', v_trigger, v_table
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Detach accrual with loyalty.detach_accrual(), which drops its triggers.';
    END IF;
END $$;
COMMENT ON FUNCTION loyalty._accrual_sql_drop() IS 'Internal event trigger: a dropped table takes its accrual attachment with it; an accrual trigger cannot be dropped on its own';

-- The first of an attached table's accrual triggers that is missing (only
-- if require_all) or no longer the one attach_accrual created: another
-- event, function, WHEN clause, column list or transition table.
CREATE FUNCTION loyalty._accrual_bad_trigger(source regclass, require_all boolean) RETURNS text
LANGUAGE sql STABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
    SELECT w.name
    FROM (VALUES ('loyalty_accrual_insert', 4, 'loyalty_new', NULL),
                 ('loyalty_accrual_update', 16, 'loyalty_new', 'loyalty_old'),
                 ('loyalty_accrual_delete', 8, NULL, 'loyalty_old')) AS w(name, tgtype, newtable, oldtable)
    LEFT JOIN pg_trigger t ON t.tgrelid = source AND t.tgname = w.name
    WHERE CASE WHEN t.oid IS NULL THEN require_all
               ELSE t.tgfoid <> 'loyalty._accrual_trigger'::regproc OR t.tgtype <> w.tgtype
                    OR t.tgnewtable IS DISTINCT FROM w.newtable OR t.tgoldtable IS DISTINCT FROM w.oldtable
                    OR t.tgqual IS NOT NULL OR t.tgnargs <> 0 OR t.tgattr::text <> '' OR t.tgconstraint <> 0 END
    ORDER BY w.name
    LIMIT 1
$$;
COMMENT ON FUNCTION loyalty._accrual_bad_trigger(regclass, boolean) IS 'Internal: the first accrual trigger of an attached table that is missing (if require_all) or was replaced by another definition';

-- After any DDL command: every attachment whose table still exists must
-- keep the columns it reads, of types it can read, and its triggers as
-- attach_accrual made them. All attachments are checked, not only the
-- table the command names: an ALTER of a parent table, of a typed table's
-- type, or a DROP ... CASCADE of a type or domain changes other tables'
-- columns. The triggers must all be there only after ALTER TRIGGER
-- (pg_restore adds constraints to a table before it creates its
-- triggers, one by one).
CREATE FUNCTION loyalty._accrual_ddl_check() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    s loyalty.accrual_source;
    v_col name;
    v_trigger text;
BEGIN
    FOR s IN SELECT x.* FROM loyalty.accrual_source x
             WHERE EXISTS (SELECT FROM pg_class c WHERE c.oid = x.source) ORDER BY x.source::oid LOOP
        FOREACH v_col IN ARRAY ARRAY[s.member_column, s.amount_column, s.ref_column, s.occurred_at_column,
                                     s.category_column, s.channel_column, s.store_column] LOOP
            IF v_col IS NOT NULL AND NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = s.source
                                                 AND a.attname = v_col AND a.attnum > 0 AND NOT a.attisdropped) THEN
                RAISE EXCEPTION 'column "%" of "%" is read by accrual', v_col, s.source::text
                    USING ERRCODE = 'dependent_objects_still_exist',
                          DETAIL = 'It was dropped or renamed; every later INSERT of the table would fail.',
                          HINT = 'Detach accrual with loyalty.detach_accrual() first, and attach it again after.';
            END IF;
        END LOOP;
        PERFORM loyalty._check_read_types(s.source, s.amount_column, s.occurred_at_column);
        v_trigger := loyalty._accrual_bad_trigger(s.source, tg_tag = 'ALTER TRIGGER');
        IF v_trigger IS NOT NULL THEN
            RAISE EXCEPTION 'cannot change trigger % on "%": accrual is attached to it', v_trigger, s.source::text
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = 'Detach accrual with loyalty.detach_accrual() first.';
        END IF;
    END LOOP;
END $$;
COMMENT ON FUNCTION loyalty._accrual_ddl_check() IS 'Internal event trigger: DDL must leave every attached table the columns and triggers accrual reads';

CREATE EVENT TRIGGER loyalty_accrual_sql_drop ON sql_drop
    EXECUTE FUNCTION loyalty._accrual_sql_drop();
CREATE EVENT TRIGGER loyalty_accrual_ddl_check ON ddl_command_end
    EXECUTE FUNCTION loyalty._accrual_ddl_check();

CREATE VIEW loyalty.quarantine_summary AS
    SELECT p.code AS program, q.source, q.sqlstate, q.reason, count(*) AS rows,
           min(q.quarantined_at) AS first_at, max(q.quarantined_at) AS last_at
    FROM loyalty.accrual_quarantine q JOIN loyalty.program p ON p.id = q.program_id
    WHERE q.replayed_at IS NULL AND q.withdrawn_at IS NULL
    GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW loyalty.quarantine_summary IS 'Rows waiting in the accrual quarantine, counted per program, source and reason';
COMMENT ON COLUMN loyalty.quarantine_summary.program IS 'Program code';
COMMENT ON COLUMN loyalty.quarantine_summary.source IS 'The application table the rows came from (NULL: the function API)';
COMMENT ON COLUMN loyalty.quarantine_summary.sqlstate IS 'The SQLSTATE the row would have raised through loyalty.accrue()';
COMMENT ON COLUMN loyalty.quarantine_summary.reason IS 'Why the rows could not earn';
COMMENT ON COLUMN loyalty.quarantine_summary.rows IS 'How many rows wait';
COMMENT ON COLUMN loyalty.quarantine_summary.first_at IS 'When the first of them was quarantined';
COMMENT ON COLUMN loyalty.quarantine_summary.last_at IS 'When the last of them was quarantined';
REVOKE ALL ON loyalty.quarantine_summary FROM PUBLIC;

-- The type of a column of an attached table, for replaying its rows; NULL
-- for no column.
CREATE FUNCTION loyalty._column_type(source regclass, col name) RETURNS text
LANGUAGE sql STABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
    SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
    WHERE a.attrelid = source AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
$$;
COMMENT ON FUNCTION loyalty._column_type(regclass, name) IS 'Internal: the type of a column of an attached table, as replay_quarantine reads its quarantined values';

-- The key of row_data a replay reads a field from: the column the table's
-- attachment names now, or, when the row has no such key, the column it was
-- read through when it was quarantined (renamed since: detach, rename,
-- attach again). NULL when the attachment reads no column for the field.
CREATE FUNCTION loyalty._quarantine_key(q loyalty.accrual_quarantine, col name, field text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = loyalty, pg_catalog, pg_temp AS $$
    SELECT CASE WHEN col IS NULL THEN NULL
                WHEN q.row_data ? col THEN col
                ELSE coalesce(q.columns ->> field, col) END
$$;
COMMENT ON FUNCTION loyalty._quarantine_key(loyalty.accrual_quarantine, name, text) IS 'Internal: the key of a quarantined row''s row_data that holds a field, by the current attachment or else by the columns it was quarantined with';

CREATE FUNCTION loyalty.replay_quarantine(program text, source regclass DEFAULT NULL)
RETURNS TABLE (replayed bigint, still_quarantined bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_program bigint := loyalty._program_id(program);
    q loyalty.accrual_quarantine;
    s loyalty.accrual_source;
    v_ok bigint := 0;
    v_bad bigint := 0;
    v_state text;
    v_msg text;
    v_amount numeric;
    v_at timestamptz;
    v_ref text;
    v_member text;
    v_category text;
    v_channel text;
    v_store text;
    v_time_zone text := current_setting('TimeZone');
BEGIN
    FOR q IN SELECT * FROM loyalty.accrual_quarantine x
             WHERE x.program_id = v_program AND x.replayed_at IS NULL AND x.withdrawn_at IS NULL
               AND (replay_quarantine.source IS NULL OR x.source = replay_quarantine.source)
             ORDER BY x.id FOR UPDATE LOOP
        SELECT * INTO s FROM loyalty.accrual_source x WHERE x.source = q.source;
        BEGIN
            IF q.kind = 'refund_to' THEN
                PERFORM loyalty._refund_to(program, q.row_data ->> 'refund_of', (q.row_data ->> 'to_amount')::numeric,
                                           q.row_data ->> 'refund_ref');
            ELSIF q.kind = 'restore' THEN
                PERFORM loyalty._restore_deleted(program, q.row_data ->> 'restore_of',
                                                 (q.row_data ->> 'to_amount')::numeric);
            ELSIF q.kind = 'refund' THEN
                PERFORM loyalty.refund(program, q.row_data ->> 'refund_of', (q.row_data ->> 'amount')::numeric,
                                       q.row_data ->> 'refund_ref');
            ELSIF NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = q.source) THEN
                RAISE EXCEPTION 'the table this row came from (oid %) was dropped', q.source::oid
                    USING ERRCODE = 'LY013',
                          HINT = 'Post the purchase with loyalty.accrue() if it should still earn.';
            ELSIF s.source IS NULL THEN
                RAISE EXCEPTION 'accrual is not attached to "%"', q.source::text USING ERRCODE = 'LY013';
            ELSE
                -- the amount and the time as the trigger read them: through
                -- the column's own type (money's text is '$7.50'), and a
                -- timestamp without time zone (or a date) in the time zone
                -- of the session whose statement quarantined the row
                IF q.time_zone IS NOT NULL THEN
                    PERFORM set_config('TimeZone', q.time_zone, true);
                END IF;
                EXECUTE format('SELECT ($1 ->> %L)::%s::numeric, ($1 ->> %L)::%s::timestamptz',
                               loyalty._quarantine_key(q, s.amount_column, 'amount'),
                               loyalty._column_type(q.source, s.amount_column),
                               loyalty._quarantine_key(q, s.occurred_at_column, 'occurred_at'),
                               coalesce(loyalty._column_type(q.source, s.occurred_at_column), 'timestamptz'))
                    INTO v_amount, v_at USING q.row_data;
                PERFORM set_config('TimeZone', v_time_zone, true);
                v_ref := q.row_data ->> loyalty._quarantine_key(q, s.ref_column, 'ref');
                v_member := q.row_data ->> loyalty._quarantine_key(q, s.member_column, 'member');
                v_category := q.row_data ->> loyalty._quarantine_key(q, s.category_column, 'category');
                v_channel := q.row_data ->> loyalty._quarantine_key(q, s.channel_column, 'channel');
                v_store := q.row_data ->> loyalty._quarantine_key(q, s.store_column, 'store');
                -- the order of a purchase its table's DELETE refunded, back
                -- (the same member, time, category, channel and store; any
                -- amount): undone as the trigger undoes it, where accrue
                -- would only see a repeat, or another purchase (23505)
                IF v_ref IS NOT NULL AND loyalty._reinserted_changed(v_program, v_ref,
                       (SELECT m.id FROM loyalty.member m WHERE m.program_id = v_program AND m.member_ref = v_member),
                       v_at, v_at IS NULL, v_category, v_channel, v_store) THEN
                    PERFORM loyalty._restore_deleted(program, v_ref, v_amount);
                ELSE
                    PERFORM loyalty.accrue(program, v_member, v_amount, v_ref, coalesce(v_at, q.quarantined_at),
                                           v_category, v_channel, v_store);
                END IF;
            END IF;
            UPDATE loyalty.accrual_quarantine x SET replayed_at = clock_timestamp(), attempts = x.attempts + 1
            WHERE x.id = q.id;
            v_ok := v_ok + 1;
        EXCEPTION
            -- errors of the moment, not of the row (as the trigger's
            -- refunds raise them): the caller retries the replay; a cancel
            -- (57014) is never caught by OTHERS
            WHEN transaction_rollback OR lock_not_available OR insufficient_resources OR system_error THEN
                RAISE;
            WHEN others THEN
                GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
                UPDATE loyalty.accrual_quarantine x
                   SET reason = v_msg, sqlstate = v_state, attempts = x.attempts + 1
                WHERE x.id = q.id;
                v_bad := v_bad + 1;
        END;
    END LOOP;
    RETURN QUERY SELECT v_ok, v_bad;
END $$;
COMMENT ON FUNCTION loyalty.replay_quarantine(text, regclass) IS 'Retries every quarantined row of a program (or of one source) through loyalty.accrue(); rows that now earn are marked replayed, the others keep their new reason';

-- ---- simulation ----

CREATE FUNCTION loyalty.simulate_accrual(program text, rules jsonb, from_ts timestamptz, to_ts timestamptz)
RETURNS TABLE (rule text, purchases bigint, points bigint)
AS 'MODULE_PATHNAME', 'loyalty_simulate_accrual'
LANGUAGE C STABLE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp;
COMMENT ON FUNCTION loyalty.simulate_accrual(text, jsonb, timestamptz, timestamptz) IS 'What a draft rules document would have issued for the purchases posted between from_ts and to_ts: per multiplier, bonus and cap (purchases it applied to, points it added or cut) and in total, next to what was posted; posts nothing';
