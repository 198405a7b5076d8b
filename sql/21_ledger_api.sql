-- Programs, members and the ledger API.

-- Every transfer kind the ledger knows: how a statement names it and which
-- lifetime figure it counts in. Later capabilities add their own kinds here.
CREATE TABLE loyalty.transfer_kind (
    kind   text PRIMARY KEY,
    label  text NOT NULL,
    class  text NOT NULL CHECK (class IN ('earn', 'redeem', 'expire', 'adjust', 'move'))
);
COMMENT ON TABLE loyalty.transfer_kind IS 'Registry of transfer kinds: the label a statement shows and the lifetime figure (class) each counts in';
INSERT INTO loyalty.transfer_kind VALUES
    ('earn',    'Points earned',   'earn'),
    ('welcome', 'Welcome points',  'earn'),
    ('adjust',  'Adjustment',      'adjust'),
    ('expire',  'Points expired',  'expire');

-- A bad option in an options document (a program's, a reward's): 22023
-- with the JSON path, and the docs page that describes the document.
CREATE FUNCTION loyalty._bad_option(p_path text, p_problem text, p_document text DEFAULT 'program',
                                    p_page text DEFAULT 'ledger') RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RAISE EXCEPTION 'invalid % options', p_document
        USING ERRCODE = 'invalid_parameter_value',
              DETAIL = format('At %s: %s.', p_path, p_problem),
              HINT = format('See the %s options in docs/%s.md.', p_document, p_page);
END $$;
COMMENT ON FUNCTION loyalty._bad_option(text, text, text, text) IS 'Internal: raises 22023 for a bad option of an options document, with its JSON path';

-- A positive interval written as a string in an options document.
CREATE FUNCTION loyalty._check_interval(p_path text, p_value jsonb, p_document text DEFAULT 'program',
                                        p_page text DEFAULT 'ledger') RETURNS interval
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v interval;
BEGIN
    IF jsonb_typeof(p_value) IS DISTINCT FROM 'string' THEN
        PERFORM loyalty._bad_option(p_path, 'expected an interval as a string, such as "12 months"', p_document, p_page);
    END IF;
    BEGIN
        v := (p_value #>> '{}')::interval;
    EXCEPTION WHEN others THEN
        PERFORM loyalty._bad_option(p_path, format('%s is not an interval', p_value), p_document, p_page);
    END;
    IF v <= interval '0' THEN
        PERFORM loyalty._bad_option(p_path, format('%s must be positive', p_value), p_document, p_page);
    END IF;
    RETURN v;
END $$;
COMMENT ON FUNCTION loyalty._check_interval(text, jsonb, text, text) IS 'Internal: a positive interval in an options document, or 22023 with its JSON path';

CREATE FUNCTION loyalty._check_keys(p_path text, p_doc jsonb, p_allowed text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    k text;
BEGIN
    IF jsonb_typeof(p_doc) IS DISTINCT FROM 'object' THEN
        PERFORM loyalty._bad_option(p_path, 'expected a JSON object');
    END IF;
    FOR k IN SELECT jsonb_object_keys(p_doc) ORDER BY 1 LOOP
        IF NOT k = ANY (p_allowed) THEN
            PERFORM loyalty._bad_option(p_path || '.' || k,
                format('unknown key; expected one of %s', array_to_string(p_allowed, ', ')));
        END IF;
    END LOOP;
END $$;

-- Validate a program options document (docs/ledger.md), raising 22023 with
-- the JSON path of the first problem.
CREATE FUNCTION loyalty._check_options(p jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    e jsonb := p -> 'expiry';
    policy text;
BEGIN
    PERFORM loyalty._check_keys('$', p, ARRAY['point_value', 'currency', 'expiry',
                                              'unknown_member', 'shortfall', 'welcome']);
    IF p ? 'point_value' AND (jsonb_typeof(p -> 'point_value') <> 'number' OR (p ->> 'point_value')::numeric < 0) THEN
        PERFORM loyalty._bad_option('$.point_value', 'expected a number of at least 0');
    END IF;
    IF p ? 'currency' AND (jsonb_typeof(p -> 'currency') <> 'string' OR (p ->> 'currency') !~ '^[A-Z]{3}$') THEN
        PERFORM loyalty._bad_option('$.currency', 'expected an ISO 4217 code such as "EUR"');
    END IF;
    IF p ? 'unknown_member' AND (p -> 'unknown_member') NOT IN ('"quarantine"', '"enroll"') THEN
        PERFORM loyalty._bad_option('$.unknown_member', 'expected "quarantine" or "enroll"');
    END IF;
    IF p ? 'shortfall' AND (p -> 'shortfall') NOT IN ('"debt"', '"negative"') THEN
        PERFORM loyalty._bad_option('$.shortfall', 'expected "debt" or "negative"');
    END IF;
    IF p ? 'welcome' THEN
        PERFORM loyalty._check_keys('$.welcome', p -> 'welcome', ARRAY['points']);
        IF jsonb_typeof(p #> '{welcome,points}') IS DISTINCT FROM 'number'
           OR (p #>> '{welcome,points}') !~ '^[0-9]{1,18}$' OR (p #>> '{welcome,points}')::bigint <= 0 THEN
            PERFORM loyalty._bad_option('$.welcome.points', 'expected a whole number of points above 0');
        END IF;
    END IF;
    IF e IS NULL THEN
        RETURN p;
    END IF;
    PERFORM loyalty._check_keys('$.expiry', e, ARRAY['policy', 'after', 'period', 'periods',
                                                     'inactivity', 'activity', 'notice']);
    policy := e ->> 'policy';
    IF policy IS NULL OR policy NOT IN ('none', 'fixed', 'calendar', 'rolling') THEN
        PERFORM loyalty._bad_option('$.expiry.policy', 'expected "none", "fixed", "calendar" or "rolling"');
    END IF;
    PERFORM loyalty._check_keys('$.expiry', e, CASE policy
        WHEN 'none'     THEN ARRAY['policy', 'notice']
        WHEN 'fixed'    THEN ARRAY['policy', 'after', 'notice']
        WHEN 'calendar' THEN ARRAY['policy', 'period', 'periods', 'notice']
        WHEN 'rolling'  THEN ARRAY['policy', 'inactivity', 'activity', 'notice'] END);
    IF e ? 'notice' THEN
        PERFORM loyalty._check_interval('$.expiry.notice', e -> 'notice');
    END IF;
    IF policy = 'fixed' THEN
        IF NOT e ? 'after' THEN
            PERFORM loyalty._bad_option('$.expiry.after', 'required by the fixed policy');
        END IF;
        PERFORM loyalty._check_interval('$.expiry.after', e -> 'after');
    ELSIF policy = 'calendar' THEN
        IF (e -> 'period') IS NULL OR (e -> 'period') NOT IN ('"month"', '"quarter"', '"year"') THEN
            PERFORM loyalty._bad_option('$.expiry.period', 'expected "month", "quarter" or "year"');
        END IF;
        IF e ? 'periods' AND (jsonb_typeof(e -> 'periods') <> 'number' OR (e ->> 'periods') !~ '^[0-9]{1,4}$') THEN
            PERFORM loyalty._bad_option('$.expiry.periods', 'expected a whole number of periods, 0 or more');
        END IF;
    ELSIF policy = 'rolling' THEN
        IF NOT e ? 'inactivity' THEN
            PERFORM loyalty._bad_option('$.expiry.inactivity', 'required by the rolling policy');
        END IF;
        PERFORM loyalty._check_interval('$.expiry.inactivity', e -> 'inactivity');
        IF e ? 'activity' AND (jsonb_typeof(e -> 'activity') <> 'array' OR jsonb_array_length(e -> 'activity') = 0
            OR EXISTS (SELECT FROM jsonb_array_elements(e -> 'activity') a WHERE jsonb_typeof(a) <> 'string')) THEN
            PERFORM loyalty._bad_option('$.expiry.activity', 'expected a non-empty array of transfer kinds');
        END IF;
        IF e ? 'activity' THEN
            SELECT a INTO policy FROM jsonb_array_elements_text(e -> 'activity') a
            WHERE a NOT IN (SELECT kind FROM loyalty.transfer_kind) LIMIT 1;
            IF FOUND THEN
                PERFORM loyalty._bad_option('$.expiry.activity',
                    format('unknown transfer kind "%s"; the kinds are listed in loyalty.transfer_kind', policy));
            END IF;
        END IF;
    END IF;
    RETURN p;
END $$;

-- When a lot credited at p_at expires under a fixed or calendar policy, in
-- the program's time zone (so "12 months" and "end of the year" mean the
-- program's local calendar); NULL for none and rolling.
CREATE FUNCTION loyalty._lot_expiry(p_expiry jsonb, p_time_zone text, p_at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE p_expiry ->> 'policy'
        WHEN 'fixed' THEN
            ((p_at AT TIME ZONE p_time_zone) + (p_expiry ->> 'after')::interval) AT TIME ZONE p_time_zone
        WHEN 'calendar' THEN
            (date_trunc(p_expiry ->> 'period', p_at AT TIME ZONE p_time_zone)
             + (coalesce((p_expiry ->> 'periods')::int, 1) + 1)
               * CASE p_expiry ->> 'period' WHEN 'month' THEN interval '1 month'
                                            WHEN 'quarter' THEN interval '3 months'
                                            ELSE interval '1 year' END) AT TIME ZONE p_time_zone
    END
$$;

-- Whether the account's program has a rolling expiry policy.
CREATE FUNCTION loyalty._is_rolling(p_account bigint) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT p.options #>> '{expiry,policy}' IS NOT DISTINCT FROM 'rolling'
    FROM loyalty.account a JOIN loyalty.program p ON p.id = a.program_id
    WHERE a.id = p_account
$$;

-- The deferred purchases of member accounts (docs/accrual.md, "Deferred
-- journal lines"): those that earned and whose journal line is not written
-- yet. A member's purchases form a list, newest first, from
-- account.last_purchase_ref through accrual.prev_ref, in id order; the
-- deferred ones all come after the account's last written line (no line
-- is written while an earlier one waits), so the walk stops at
-- account.last_transfer_id and reads only them (and any purchase without
-- points among them), one primary-key probe each. An account whose
-- deferred_day is NULL has none and is not walked. Nested loops of plain
-- index scans only: the planner would hash all purchases ever to join them
-- to a few list heads, and with statistics from before a bulk load it
-- takes a bitmap scan for each one-row probe (four times slower, measured
-- over 8,000 steps).
CREATE FUNCTION loyalty._deferred_purchases(p_accounts bigint[]) RETURNS SETOF loyalty.accrual
LANGUAGE sql STABLE PARALLEL SAFE SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off AS $$
    WITH RECURSIVE walk AS (
        SELECT x, coalesce(a.last_transfer_id, 0) AS bound
        FROM loyalty.account a
        JOIN loyalty.accrual x ON x.program_id = a.program_id AND x.ref = a.last_purchase_ref
        WHERE a.id = ANY (p_accounts) AND a.deferred_day IS NOT NULL AND x.id > coalesce(a.last_transfer_id, 0)
        UNION ALL
        SELECT y, w.bound
        FROM walk w JOIN loyalty.accrual y ON y.program_id = (w.x).program_id AND y.ref = (w.x).prev_ref
        WHERE y.id > w.bound
    )
    SELECT (w.x).* FROM walk w WHERE (w.x).transfer_id IS NULL AND (w.x).points > 0
$$;
COMMENT ON FUNCTION loyalty._deferred_purchases(bigint[]) IS 'Internal: the purchases of member accounts whose journal lines and lots are deferred, read from each account''s list of purchases';

-- The journal lines of a member account: those it is credited by (its
-- purchases' lines among them), those it is debited by, and the lines its
-- deferred purchases will be. The debit index leaves accruals out (their
-- debit side is the issuance account), and saying kind <> 'accrual' is what
-- lets the planner use it; a member is never an accrual's debit side.
CREATE FUNCTION loyalty._account_transfers(p_account bigint) RETURNS SETOF loyalty.transfer
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT t.* FROM loyalty.transfer t WHERE t.credit_account_id = p_account
    UNION ALL
    SELECT t.* FROM loyalty.transfer t WHERE t.kind <> 'accrual' AND t.debit_account_id = p_account
    UNION ALL
    -- deferred purchases: the line each will be, without its hash yet
    SELECT x.id, x.program_id, s.id, x.account_id, x.points::loyalty.points, 'accrual', x.ref,
           x.occurred_at, x.posted_at, x.rule_version, x.actor, NULL::text, NULL::bytea, NULL::bytea, NULL::bytea
    FROM loyalty._deferred_purchases(ARRAY[p_account]) x
    JOIN loyalty.account s ON s.program_id = x.program_id AND s.kind = 'issuance' AND s.name = ''
$$;
COMMENT ON FUNCTION loyalty._account_transfers(bigint) IS 'Internal: the journal lines of a member account (credited or debited, and those its deferred purchases will be), written so that both account indexes serve it';

-- Under a rolling policy, when points credited at p_credited lapse, as far
-- as is known at p_as_of: at the end of the first stretch of `inactivity`
-- without activity that starts at or after their credit (the credit itself
-- counts as activity for its own points). A later activity does not bring
-- lapsed points back. NULL when the program has no rolling policy.
CREATE FUNCTION loyalty._rolling_lapse(p_account bigint, p_credited timestamptz, p_as_of timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE AS $$
    WITH p AS (
        SELECT p.time_zone AS tz, (p.options #>> '{expiry,inactivity}')::interval AS inactivity,
               p.options #> '{expiry,activity}' AS activity
        FROM loyalty.account a JOIN loyalty.program p ON p.id = a.program_id
        WHERE a.id = p_account AND p.options #>> '{expiry,policy}' = 'rolling'
    ), act AS (
        SELECT DISTINCT t.occurred_at AS at
        FROM p, loyalty._account_transfers(p_account) t
        WHERE t.occurred_at >= p_credited AND t.occurred_at <= p_as_of
          AND CASE WHEN p.activity IS NULL THEN t.kind <> 'expire' ELSE p.activity ? t.kind END
        UNION
        SELECT p_credited FROM p
    ), runs AS (
        SELECT ((act.at AT TIME ZONE p.tz) + p.inactivity) AT TIME ZONE p.tz AS lapse,
               lead(act.at) OVER (ORDER BY act.at) AS next_at
        FROM act, p
    )
    SELECT min(lapse) FROM runs WHERE next_at IS NULL OR next_at >= lapse
$$;

-- A code (of a program, a reward): 1 to 63 letters, digits, "_", "." or
-- "-", starting with a letter or digit; 22023 otherwise.
CREATE FUNCTION loyalty._check_code(p_what text, p_code text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_code !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid % code "%"', p_what, p_code
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('A %s code is 1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit.', p_what);
    END IF;
END $$;

-- A program's id, or a precise error.
CREATE FUNCTION loyalty._program_id(p_program text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_id bigint;
BEGIN
    IF p_program IS NULL THEN
        RAISE EXCEPTION 'program must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT p.id INTO v_id FROM loyalty.program p WHERE p.code = p_program;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'program "%" does not exist', p_program
            USING ERRCODE = 'LY002', HINT = 'Create it with loyalty.create_program().';
    END IF;
    RETURN v_id;
END $$;

-- The account of a member, or a precise error.
CREATE FUNCTION loyalty._account_of(p_program text, p_member_ref text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_program bigint;
    v_account bigint;
BEGIN
    IF p_program IS NULL OR p_member_ref IS NULL THEN
        RAISE EXCEPTION 'program and member_ref must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT p.id, a.id INTO v_program, v_account
    FROM loyalty.program p
    LEFT JOIN loyalty.member m ON m.program_id = p.id AND m.member_ref = p_member_ref
    LEFT JOIN loyalty.account a ON a.member_id = m.id
    WHERE p.code = p_program;
    IF v_program IS NULL THEN
        RAISE EXCEPTION 'program "%" does not exist', p_program
            USING ERRCODE = 'LY002', HINT = 'Create it with loyalty.create_program().';
    ELSIF v_account IS NULL THEN
        RAISE EXCEPTION 'member "%" does not exist in program "%"', p_member_ref, p_program
            USING ERRCODE = 'LY003', HINT = 'Enrol the member with loyalty.enroll().';
    END IF;
    RETURN v_account;
END $$;

-- The lots of an account as they stood at p_as_of (business time): what
-- remained of each then, and when it vested and expired (under a rolling
-- policy, when it lapses as known at p_as_of). Only lots with something left now, or
-- used after p_as_of, can have had something left then, so the work is
-- proportional to the open lots, not to the account's history. Internal
-- code qualifies the points operators (callers' search_path may lack them).
CREATE FUNCTION loyalty._lots_as_of(p_account bigint, p_as_of timestamptz)
RETURNS TABLE (lot_id bigint, remaining loyalty.points, vests_at timestamptz, expires_at timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    WITH used AS (
        SELECT lu.lot_id, sum(lu.amount::bigint) AS used_after
        FROM loyalty.lot_use lu
        WHERE lu.account_id = p_account AND lu.occurred_at > p_as_of
        GROUP BY lu.lot_id
    ), lots AS (
        SELECT l.id, l.remaining, l.occurred_at, l.vests_at, l.expires_at, coalesce(u.used_after, 0) AS used_after
        FROM loyalty.lot l LEFT JOIN used u ON u.lot_id = l.id
        WHERE l.account_id = p_account AND l.remaining OPERATOR(loyalty.>) 0 AND l.occurred_at <= p_as_of
        UNION ALL
        SELECT l.id, l.remaining, l.occurred_at, l.vests_at, l.expires_at, u.used_after
        FROM used u JOIN loyalty.lot l ON l.id = u.lot_id
        WHERE l.remaining OPERATOR(loyalty.=) 0 AND l.occurred_at <= p_as_of
        UNION ALL
        -- deferred purchases: the lot each will be, never used yet
        SELECT x.id, x.points::loyalty.points, x.occurred_at, x.vests_at, x.expires_at, 0
        FROM loyalty._deferred_purchases(ARRAY[p_account]) x
        WHERE x.occurred_at <= p_as_of
    )
    SELECT l.id, (l.remaining::bigint + l.used_after)::loyalty.points, l.vests_at,
           CASE WHEN r.rolling THEN least(l.expires_at, loyalty._rolling_lapse(p_account, l.occurred_at, p_as_of))
                ELSE l.expires_at END
    FROM lots l
    CROSS JOIN (SELECT loyalty._is_rolling(p_account) AS rolling) r
$$;

CREATE FUNCTION loyalty.create_program(code text, name text, time_zone text DEFAULT 'UTC',
                                       options jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_old loyalty.program;
BEGIN
    IF code IS NULL OR name IS NULL OR time_zone IS NULL OR options IS NULL THEN
        RAISE EXCEPTION 'code, name, time_zone and options must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM loyalty._check_code('program', code);
    IF btrim(name) = '' THEN
        RAISE EXCEPTION 'program name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM now() AT TIME ZONE create_program.time_zone;   -- 22023 for an unknown zone
    PERFORM loyalty._check_options(options);

    SELECT * INTO v_old FROM loyalty.program p WHERE p.code = create_program.code;
    IF FOUND THEN
        IF (v_old.name, v_old.time_zone, v_old.options) IS DISTINCT FROM (name, time_zone, options) THEN
            RAISE EXCEPTION 'program "%" already exists with other settings', code
                USING ERRCODE = 'unique_violation',
                      DETAIL = format('Existing: name %L, time zone %L, options %s. Asked: name %L, time zone %L, options %s.',
                                      v_old.name, v_old.time_zone, v_old.options, name, time_zone, options);
        END IF;
        RETURN v_old.id;
    END IF;

    INSERT INTO loyalty.program (code, name, time_zone, options)
    VALUES (code, name, time_zone, options)
    ON CONFLICT ON CONSTRAINT program_code_key DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN    -- created concurrently: compare as above
        RETURN loyalty.create_program(code, name, time_zone, options);
    END IF;
    INSERT INTO loyalty.account (program_id, kind)
    SELECT v_id, k FROM unnest(ARRAY['issuance', 'breakage', 'redemption', 'adjustment', 'donation']) k;
    INSERT INTO loyalty.program_version (program_id, version, options, note)
    VALUES (v_id, 1, options, 'created');
    RETURN v_id;
END $$;
COMMENT ON FUNCTION loyalty.create_program(text, text, text, jsonb) IS 'Creates a program with its system accounts; idempotent on code when the settings are the same';

CREATE FUNCTION loyalty.update_program(code text, options jsonb, note text)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_program loyalty.program;
    v_version integer;
BEGIN
    IF code IS NULL OR options IS NULL OR note IS NULL THEN
        RAISE EXCEPTION 'code, options and note must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF btrim(note) = '' THEN
        RAISE EXCEPTION 'a change of program options needs a note'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Say why the options change: the note is kept with the new version.';
    END IF;
    PERFORM loyalty._check_options(options);
    -- the program's row lock orders concurrent changes; versions follow it
    SELECT * INTO v_program FROM loyalty.program p
    WHERE p.id = loyalty._program_id(update_program.code) FOR UPDATE;
    SELECT max(v.version) INTO v_version FROM loyalty.program_version v WHERE v.program_id = v_program.id;
    IF v_program.options = options THEN
        RETURN v_version;
    END IF;
    v_version := coalesce(v_version, 0) + 1;
    INSERT INTO loyalty.program_version (program_id, version, options, note)
    VALUES (v_program.id, v_version, options, note);
    UPDATE loyalty.program p SET options = update_program.options WHERE p.id = v_program.id;
    RETURN v_version;
END $$;
COMMENT ON FUNCTION loyalty.update_program(text, jsonb, text) IS 'Replaces a program''s options document (validated as in create_program), keeping the previous ones with the note that explains the change; returns the version in force (unchanged when the options are the same)';

CREATE FUNCTION loyalty.enroll(program text, member_ref text, email text DEFAULT NULL, phone text DEFAULT NULL,
                               birthday date DEFAULT NULL, country text DEFAULT NULL, attrs jsonb DEFAULT '{}',
                               occurred_at timestamptz DEFAULT now())
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_program loyalty.program;
    v_member bigint;
    v_email text := lower(btrim(email));
    v_phone text := regexp_replace(replace(btrim(phone), '(0)', ''), '[[:space:]().-]', '', 'g');
    v_country text := upper(btrim(country));
    v_at timestamptz := coalesce(occurred_at, now());
    v_welcome bigint;
BEGIN
    IF program IS NULL OR member_ref IS NULL THEN
        RAISE EXCEPTION 'program and member_ref must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_program FROM loyalty.program p WHERE p.code = enroll.program;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'program "%" does not exist', program
            USING ERRCODE = 'LY002', HINT = 'Create it with loyalty.create_program().';
    END IF;
    IF btrim(member_ref) = '' OR length(member_ref) > 200 THEN
        RAISE EXCEPTION 'invalid member_ref "%"', member_ref
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'A member_ref is 1 to 200 characters, not all spaces.';
    END IF;
    IF v_country IS NOT NULL AND v_country !~ '^[A-Z]{2}$' THEN
        RAISE EXCEPTION 'invalid country "%"', country
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use an ISO 3166-1 alpha-2 code such as "FR".';
    END IF;
    IF NOT isfinite(v_at) THEN
        RAISE EXCEPTION 'occurred_at must be a finite time' USING ERRCODE = 'datetime_field_overflow';
    END IF;
    IF attrs IS NOT NULL AND jsonb_typeof(attrs) <> 'object' THEN
        RAISE EXCEPTION 'member attrs must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Already enrolled: the first enrolment stands (looked up first, so that
    -- retries do not use up member ids).
    SELECT m.id INTO v_member FROM loyalty.member m
    WHERE m.program_id = v_program.id AND m.member_ref = enroll.member_ref;
    IF FOUND THEN
        RETURN v_member;
    END IF;
    INSERT INTO loyalty.member (program_id, member_ref, enrolled_at, country, attrs)
    VALUES (v_program.id, member_ref, v_at, v_country, coalesce(attrs, '{}'))
    ON CONFLICT (program_id, member_ref) DO NOTHING
    RETURNING id INTO v_member;
    IF v_member IS NULL THEN    -- enrolled concurrently
        SELECT m.id INTO v_member FROM loyalty.member m
        WHERE m.program_id = v_program.id AND m.member_ref = enroll.member_ref;
        RETURN v_member;
    END IF;
    INSERT INTO loyalty.account (program_id, kind, member_id) VALUES (v_program.id, 'member', v_member);

    IF v_phone LIKE '00%' THEN
        v_phone := '+' || substr(v_phone, 3);
    END IF;
    IF email IS NOT NULL OR phone IS NOT NULL OR birthday IS NOT NULL THEN
        INSERT INTO loyalty.member_contact (member_id, email, email_valid, phone, phone_valid, birthday, birthday_valid)
        VALUES (v_member,
                v_email, v_email ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:].]+$',
                CASE WHEN v_phone ~ '^\+[1-9][0-9]{6,14}$' THEN v_phone ELSE phone END,
                v_phone ~ '^\+[1-9][0-9]{6,14}$',
                birthday, birthday BETWEEN date '1900-01-01' AND (v_at AT TIME ZONE v_program.time_zone)::date);
    END IF;

    v_welcome := (v_program.options #>> '{welcome,points}')::bigint;
    IF v_welcome IS NOT NULL THEN
        PERFORM loyalty._post_member(program, member_ref, 'issuance', v_welcome, 'welcome', member_ref,
                                     NULL, v_at);
    END IF;
    RETURN v_member;
END $$;
COMMENT ON FUNCTION loyalty.enroll(text, text, text, text, date, text, jsonb, timestamptz) IS 'Enrols a member (idempotent on member_ref) with validated contact data and the program''s welcome points';

CREATE FUNCTION loyalty._post_member(program text, member_ref text, system_kind text, delta bigint,
                                     kind text, ref text, reason text, occurred_at timestamptz,
                                     vests_at timestamptz DEFAULT NULL)
RETURNS bigint AS 'MODULE_PATHNAME', 'loyalty_post_member' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION loyalty._post_member(text, text, text, bigint, text, text, text, timestamptz, timestamptz) IS 'Internal: posts delta points between a member and a system account through the posting routine (a credit vests at vests_at, default at once)';

CREATE FUNCTION loyalty.earn(program text, member_ref text, points loyalty.points, ref text,
                             reason text DEFAULT NULL, occurred_at timestamptz DEFAULT now())
RETURNS bigint AS 'MODULE_PATHNAME', 'loyalty_earn'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp;
COMMENT ON FUNCTION loyalty.earn(text, text, loyalty.points, text, text, timestamptz) IS 'Credits points to a member (a bonus, a goodwill gesture) under the expiry policy; idempotent on ref; returns the transfer id';

CREATE FUNCTION loyalty.adjust(program text, member_ref text, delta bigint, ref text, reason text,
                               occurred_at timestamptz DEFAULT now())
RETURNS bigint AS 'MODULE_PATHNAME', 'loyalty_adjust'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp;
COMMENT ON FUNCTION loyalty.adjust(text, text, bigint, text, text, timestamptz) IS 'A staff correction of a member''s points, up or down, with a required reason; idempotent on ref; returns the transfer id';

CREATE FUNCTION loyalty.transfer_hash(program_id bigint, debit_account_id bigint, credit_account_id bigint,
                                      amount loyalty.points, kind text, ref text, occurred_at timestamptz,
                                      posted_at timestamptz, rule_version integer, actor text, reason text,
                                      debit_prev_hash bytea, credit_prev_hash bytea)
RETURNS bytea AS 'MODULE_PATHNAME', 'transfer_hash' LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION loyalty.transfer_hash(bigint, bigint, bigint, loyalty.points, text, text, timestamptz, timestamptz, integer, text, text, bytea, bytea) IS 'SHA-256 of a transfer''s canonical content and the previous hashes of its member accounts';

CREATE FUNCTION loyalty._chain_step(state bytea, head bytea, credit_side boolean, program_id bigint,
                                    debit_account_id bigint, credit_account_id bigint, amount loyalty.points,
                                    kind text, ref text, occurred_at timestamptz, posted_at timestamptz,
                                    rule_version integer, actor text, reason text)
RETURNS bytea AS 'MODULE_PATHNAME', 'chain_step' LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION loyalty._chain_step(bytea, bytea, boolean, bigint, bigint, bigint, loyalty.points, text, text, timestamptz, timestamptz, integer, text, text) IS 'Internal: transition function of loyalty.chain()';

CREATE AGGREGATE loyalty.chain(head bytea, credit_side boolean, program_id bigint,
                               debit_account_id bigint, credit_account_id bigint, amount loyalty.points,
                               kind text, ref text, occurred_at timestamptz, posted_at timestamptz,
                               rule_version integer, actor text, reason text) (
    SFUNC = loyalty._chain_step,
    STYPE = bytea
);
COMMENT ON AGGREGATE loyalty.chain(bytea, boolean, bigint, bigint, bigint, loyalty.points, text, text, timestamptz, timestamptz, integer, text, text) IS 'Window aggregate for set-based postings: OVER (PARTITION BY account ORDER BY transfer id) it gives each transfer''s hash, chained from head (the account''s last_hash) on the member side named by credit_side';

-- ---- deferred journal lines ----
--
-- A purchase still in its return window is posted as its row in
-- loyalty.accrual and its member's balance only: its journal line and lot
-- are deferred (docs/accrual.md, "Deferred journal lines"). They are
-- written, exactly as the sale would have written them (the same id, the
-- same posted_at and actor, chained in id order), by whatever first needs
-- the account's lots or chain: any posting to or from the account, a
-- refund, a hold, the vest and expire jobs. Readers count deferred
-- purchases where they read lots and lines (_lots_as_of,
-- _account_transfers), so nothing a member or an analyst sees depends on
-- whether they are written yet.

-- Write the deferred journal lines and lots of the given member accounts.
-- Locks those that have any in id order first (a caller already holding
-- them waits for nothing); written is how many purchases it wrote. Set-based:
-- one statement for any number of accounts, chained as _job_expire does.
-- p_vest_by (the vest job's as_of): the lots that vest by then are written
-- vested, their points moved from the account's pending to its available
-- balance in the same statement, rather than written pending and updated
-- again by the job (a second version of every lot); vested and
-- vested_points count them. NULL (every other writer): lots are written as
-- the sale would have written them.
CREATE FUNCTION loyalty._materialize(p_accounts bigint[], p_vest_by timestamptz DEFAULT NULL,
                                     OUT written bigint, OUT vested bigint, OUT vested_points bigint)
LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_locked bigint[];
BEGIN
    written := 0;
    vested := 0;
    vested_points := 0;
    SELECT array_agg(x.id) INTO v_locked
    FROM (SELECT a.id FROM loyalty.account a
          WHERE a.id = ANY (p_accounts) AND a.deferred_day IS NOT NULL
          ORDER BY a.id FOR UPDATE) x;
    IF v_locked IS NULL THEN
        RETURN;
    END IF;
    WITH d AS (
        SELECT x.id, x.program_id, x.account_id, x.ref, x.points::loyalty.points AS points, x.occurred_at,
               x.vests_at, x.expires_at, x.rule_version, x.posted_at, x.actor, a.last_hash AS head,
               s.id AS issuance
        FROM loyalty._deferred_purchases(v_locked) x
        -- a.id = ANY: the locked accounts through their key; without it the
        -- planner hashed every account of the database at each job batch
        JOIN loyalty.account a ON a.id = x.account_id AND a.id = ANY (v_locked)
        JOIN loyalty.account s ON s.program_id = a.program_id AND s.kind = 'issuance' AND s.name = ''
    ), hashed AS (
        SELECT d.*, loyalty.chain(d.head, true, d.program_id, d.issuance, d.account_id, d.points, 'accrual',
                                  d.ref, d.occurred_at, d.posted_at, d.rule_version, d.actor, NULL::text)
                        OVER (PARTITION BY d.account_id ORDER BY d.id) AS hash
        FROM d
    ), chained AS (
        SELECT h.*, coalesce(lag(h.hash) OVER w, h.head) AS prev,
               row_number() OVER (PARTITION BY h.account_id ORDER BY h.id DESC) AS from_last,
               -- pending at the sale (in account.pending), due by p_vest_by
               h.vests_at > h.occurred_at AND coalesce(h.vests_at <= p_vest_by, false) AS vest_now
        FROM hashed h WINDOW w AS (PARTITION BY h.account_id ORDER BY h.id)
    ), t AS (
        INSERT INTO loyalty.transfer (id, program_id, debit_account_id, credit_account_id, amount, kind, ref,
                                      occurred_at, posted_at, rule_version, actor, reason,
                                      debit_prev_hash, credit_prev_hash, hash)
        SELECT c.id, c.program_id, c.issuance, c.account_id, c.points, 'accrual', c.ref,
               c.occurred_at, c.posted_at, c.rule_version, c.actor, NULL, NULL, c.prev, c.hash
        FROM chained c
    ), l AS (
        INSERT INTO loyalty.lot (id, account_id, transfer_id, amount, remaining, occurred_at, vests_at,
                                 expires_at, pending)
        SELECT c.id, c.account_id, c.id, c.points, c.points, c.occurred_at, c.vests_at, c.expires_at,
               c.vests_at > c.occurred_at AND NOT c.vest_now
        FROM chained c
    ), x AS (
        UPDATE loyalty.accrual x SET transfer_id = x.id, actor = NULL
          FROM chained c WHERE x.program_id = c.program_id AND x.ref = c.ref
    ), s AS (
        SELECT c.account_id, (array_agg(c.hash) FILTER (WHERE c.from_last = 1))[1] AS last_hash,
               max(c.id) AS last_tid, coalesce(sum(c.points::bigint) FILTER (WHERE c.vest_now), 0) AS vest_pts
        FROM chained c GROUP BY c.account_id
    ), a AS (
        UPDATE loyalty.account a
           SET last_hash = coalesce(s.last_hash, a.last_hash),
               last_transfer_id = coalesce(s.last_tid, a.last_transfer_id),
               available = (a.available::bigint + coalesce(s.vest_pts, 0))::loyalty.points,
               pending = (a.pending::bigint - coalesce(s.vest_pts, 0))::loyalty.points,
               deferred_day = NULL, deferred_due = NULL, deferred_count = NULL
          FROM unnest(v_locked) AS k(id) LEFT JOIN s ON s.account_id = k.id
         WHERE a.id = k.id
    )
    SELECT count(*), count(*) FILTER (WHERE c.vest_now), coalesce(sum(c.points::bigint) FILTER (WHERE c.vest_now), 0)
      INTO written, vested, vested_points
      FROM chained c;
END $$;
COMMENT ON FUNCTION loyalty._materialize(bigint[], timestamptz) IS 'Internal: writes the deferred journal lines and lots of member accounts (locking them), as their sales would have, those vesting by p_vest_by vested; returns how many it wrote and vested';

-- Lock member accounts in id order, as every posting does, and write their
-- deferred journal lines and lots: for writers that read or chain onto an
-- account's lots and lines next. written_for: the accounts that had
-- deferred purchases when locked (NULL: none); p_vest_by, vested and
-- vested_points: as _materialize's (the vest job's).
CREATE FUNCTION loyalty._lock_accounts(p_accounts bigint[], p_vest_by timestamptz DEFAULT NULL,
                                       OUT written_for bigint[], OUT vested bigint, OUT vested_points bigint)
LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp AS $$
BEGIN
    vested := 0;
    vested_points := 0;
    SELECT array_agg(x.id) FILTER (WHERE x.deferred) INTO written_for
    FROM (SELECT a.id, a.deferred_day IS NOT NULL AS deferred FROM loyalty.account a
          WHERE a.id = ANY (p_accounts) ORDER BY a.id FOR UPDATE) x;
    IF written_for IS NOT NULL THEN
        SELECT m.vested, m.vested_points INTO vested, vested_points
        FROM loyalty._materialize(written_for, p_vest_by) m;
    END IF;
END $$;
COMMENT ON FUNCTION loyalty._lock_accounts(bigint[], timestamptz) IS 'Internal: locks accounts in id order and writes their deferred journal lines and lots (those vesting by p_vest_by vested); returns the accounts it wrote them for and how many lots it vested';

-- The accounts whose deferred journal lines a job batch writes: those whose
-- first deferred purchase vests or expires by p_as_of (account.deferred_due,
-- through account_deferred_idx), in the order they fall due, taken whole
-- while their deferred purchases (account.deferred_count) add up to
-- p_limit (at least one account).
-- The vest job (p_vest) and the expire job take the same accounts: writing
-- an account's lines early is harmless, and an account is due for one
-- job or the other. Nothing is locked or written here: the job locks these
-- accounts together with the others of its batch, in id order, which
-- writes their lines (_lock_accounts). Within one transaction (run_job)
-- the scan resumes after the last batch, as the expire job's does, so that
-- it does not wade again through the entries of the accounts whose lines
-- it has just written.
--
-- The scan must walk the index in order and stop at p_limit: with
-- statistics taken before a bulk load the planner may think the index
-- nearly empty and read all of it into a bitmap and sort, hence
-- enable_bitmapscan off.
CREATE FUNCTION loyalty._deferred_due(p_as_of timestamptz, p_limit integer, p_vest boolean) RETURNS bigint[]
LANGUAGE plpgsql SET search_path = loyalty, pg_catalog, pg_temp SET enable_bitmapscan = off AS $$
DECLARE
    v_name text := 'loyalty_job.deferred_' || CASE WHEN p_vest THEN 'vest' ELSE 'expire' END;
    v_cursor text[] := string_to_array(current_setting(v_name, true), '|');
    v_at timestamptz := '-infinity';
    v_id bigint := 0;
    v_taken bigint[] := '{}';
    v_total bigint := 0;
    r record;
BEGIN
    IF v_cursor[1] = p_as_of::text THEN     -- the same run, in the same transaction
        v_at := v_cursor[2]::timestamptz;
        v_id := v_cursor[3]::bigint;
    END IF;
    FOR r IN SELECT a.id, a.deferred_due, a.deferred_count FROM loyalty.account a
             WHERE a.deferred_due <= p_as_of AND (a.deferred_due, a.id) > (v_at, v_id)
             ORDER BY a.deferred_due, a.id LIMIT p_limit LOOP
        EXIT WHEN v_total >= p_limit;
        v_taken := v_taken || r.id;
        v_total := v_total + coalesce(r.deferred_count, 1);
        v_at := r.deferred_due;
        v_id := r.id;
    END LOOP;
    IF cardinality(v_taken) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM set_config(v_name, p_as_of::text || '|' || v_at::text || '|' || v_id, true);
    RETURN v_taken;
END $$;
COMMENT ON FUNCTION loyalty._deferred_due(timestamptz, integer, boolean) IS 'Internal: the accounts of a job batch whose deferred purchases vest (or expire) by a moment, at most a batch of purchases; locks and writes nothing';

-- What a member owes that the balance shows below zero at p_as_of (a
-- refund's shortfall under the program option shortfall "negative"), and
-- how the statement shows it. Nothing here: accrual (sql/31_accrual_shortfall.sql)
-- replaces both functions.
CREATE FUNCTION loyalty._negative_shortfall(p_account bigint, p_as_of timestamptz) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT 0::bigint $$;
COMMENT ON FUNCTION loyalty._negative_shortfall(bigint, timestamptz) IS 'Internal: points a member owes that the balance shows below zero at a moment (none until accrual replaces it)';

CREATE FUNCTION loyalty._negative_lines(p_account bigint)
RETURNS TABLE (transfer_id bigint, occurred_at timestamptz, kind text, ref text, points bigint, note text)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT NULL::bigint, NULL::timestamptz, NULL::text, NULL::text, NULL::bigint, NULL::text WHERE false
$$;
COMMENT ON FUNCTION loyalty._negative_lines(bigint) IS 'Internal: statement lines shown otherwise than their transfer (transfer_id set) or without one (NULL) because of a negative shortfall (none until accrual replaces it)';

CREATE FUNCTION loyalty.balance(program text, member_ref text, as_of timestamptz DEFAULT now())
RETURNS loyalty.points LANGUAGE sql STABLE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
    SELECT (greatest(coalesce(loyalty.sum(l.remaining), 0)
                     - coalesce((SELECT h.held FROM loyalty.account h
                                 WHERE h.id = (SELECT loyalty._account_of(program, member_ref))
                                   AND coalesce(as_of, now()) >= now()), 0), 0)::bigint
            - loyalty._negative_shortfall((SELECT loyalty._account_of(program, member_ref)),
                                          coalesce(as_of, now())))::loyalty.points
    FROM (SELECT coalesce(as_of, now()) AS t) a,
         loyalty._lots_as_of((SELECT loyalty._account_of(program, member_ref)), a.t) l
    WHERE l.vests_at <= a.t AND (l.expires_at IS NULL OR a.t < l.expires_at)
$$;
COMMENT ON FUNCTION loyalty.balance(text, text, timestamptz) IS 'A member''s available points at as_of (business time; NULL means now): vested, unexpired, unspent';

CREATE FUNCTION loyalty.account_summary(program text, member_ref text, as_of timestamptz DEFAULT now())
RETURNS TABLE (available loyalty.points, pending loyalty.points, held loyalty.points,
               expiring_soon loyalty.points, next_expiry_at timestamptz,
               lifetime_earned loyalty.points, lifetime_redeemed loyalty.points,
               lifetime_expired loyalty.points, lifetime_adjusted bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
    -- as_of NULL means now, as in balance()
    WITH a AS (
        SELECT acc.id, acc.held,
               coalesce((p.options #>> '{expiry,notice}')::interval, interval '30 days') AS notice
        FROM loyalty.account acc JOIN loyalty.program p ON p.id = acc.program_id
        WHERE acc.id = (SELECT loyalty._account_of(program, member_ref))
    ), lots AS (
        SELECT l.* FROM a, loyalty._lots_as_of(a.id, coalesce(as_of, now())) l
        WHERE l.expires_at IS NULL OR coalesce(as_of, now()) < l.expires_at
    ), moves AS (
        SELECT k.class,
               loyalty.sum(t.amount) FILTER (WHERE t.credit_account_id = a.id) AS credited,
               loyalty.sum(t.amount) FILTER (WHERE t.debit_account_id = a.id) AS debited
        FROM a CROSS JOIN LATERAL loyalty._account_transfers(a.id) t
        LEFT JOIN loyalty.transfer_kind k ON k.kind = t.kind
        WHERE t.occurred_at <= coalesce(as_of, now())
        GROUP BY k.class
    )
    SELECT (greatest(coalesce((SELECT loyalty.sum(remaining) FROM lots WHERE vests_at <= coalesce(as_of, now())), 0)
                     - CASE WHEN coalesce(as_of, now()) >= now() THEN a.held ELSE 0 END, 0)::bigint
            - n.shortfall)::loyalty.points,
           coalesce((SELECT loyalty.sum(remaining) FROM lots WHERE vests_at > coalesce(as_of, now())), 0),
           a.held,
           coalesce((SELECT loyalty.sum(remaining) FROM lots
                     WHERE vests_at <= coalesce(as_of, now()) AND expires_at <= coalesce(as_of, now()) + a.notice), 0),
           (SELECT min(expires_at) FROM lots WHERE vests_at <= coalesce(as_of, now())),
           coalesce((SELECT loyalty.sum(credited) FROM moves WHERE class = 'earn'), 0),
           coalesce((SELECT loyalty.sum(debited) FROM moves WHERE class IN ('redeem', 'move')), 0),
           coalesce((SELECT loyalty.sum(debited) FROM moves WHERE class = 'expire'), 0),
           coalesce((SELECT sum(coalesce(credited::bigint, 0) - coalesce(debited::bigint, 0))
                     FROM moves WHERE class = 'adjust'), 0)::bigint - n.shortfall
    FROM a CROSS JOIN LATERAL (SELECT loyalty._negative_shortfall(a.id, coalesce(as_of, now())) AS shortfall) n
$$;
COMMENT ON FUNCTION loyalty.account_summary(text, text, timestamptz) IS 'A member''s figures at as_of (business time; NULL means now): available, pending, held, expiring within the program''s notice period, and lifetime totals';

CREATE FUNCTION loyalty.statement(program text, member_ref text,
                                  from_ts timestamptz DEFAULT '-infinity', to_ts timestamptz DEFAULT 'infinity')
RETURNS TABLE (transfer_id bigint, occurred_at timestamptz, posted_at timestamptz, kind text, ref text,
               points bigint, balance bigint, explanation text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
    WITH a AS (SELECT (SELECT loyalty._account_of(program, member_ref)) AS id),
    shown AS (SELECT n.* FROM a, loyalty._negative_lines(a.id) n),
    lines AS (
        SELECT t.id, t.occurred_at, t.posted_at, t.kind, t.ref, t.reason, t.actor, t.rule_version,
               coalesce(s.points, CASE WHEN t.credit_account_id = a.id THEN t.amount::bigint
                                       ELSE -t.amount::bigint END) AS delta, s.note
        FROM a CROSS JOIN LATERAL loyalty._account_transfers(a.id) t
        LEFT JOIN shown s ON s.transfer_id = t.id
        UNION ALL   -- a negative shortfall whose refund took nothing, so posted no transfer
        SELECT NULL, s.occurred_at, s.occurred_at, s.kind, s.ref, NULL, NULL, NULL, s.points, s.note
        FROM shown s WHERE s.transfer_id IS NULL
    ), running AS (
        SELECT l.*, sum(l.delta) OVER (ORDER BY l.occurred_at, l.id, l.ref ROWS UNBOUNDED PRECEDING) AS balance
        FROM lines l
    )
    SELECT r.id, r.occurred_at, r.posted_at, r.kind, r.ref, r.delta, r.balance::bigint,
           coalesce(k.label, r.kind)
           || CASE WHEN k.class = 'adjust' THEN coalesce(' by ' || r.actor, '') ELSE '' END
           || CASE WHEN r.rule_version IS NOT NULL THEN ' (rule version ' || r.rule_version || ')' ELSE '' END
           || coalesce(': ' || r.reason, '')
           || coalesce(' (' || r.note || ')', '')
    FROM running r LEFT JOIN loyalty.transfer_kind k ON k.kind = r.kind
    WHERE r.occurred_at >= coalesce(from_ts, '-infinity') AND r.occurred_at < coalesce(to_ts, 'infinity')
    ORDER BY r.occurred_at, r.id, r.ref
$$;
COMMENT ON FUNCTION loyalty.statement(text, text, timestamptz, timestamptz) IS 'A member''s journal lines between from_ts and to_ts (business time) with the running balance and an explanation of each';

CREATE FUNCTION loyalty.verify_chain(program text)
RETURNS TABLE (account_id bigint, member_ref text, transfer_id bigint, problem text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
    WITH p AS (
        SELECT loyalty._program_id(program) AS id
    ), sides AS (
        SELECT t.*, t.debit_account_id AS side, t.debit_prev_hash AS prev
        FROM p JOIN loyalty.transfer t ON t.program_id = p.id
        JOIN loyalty.account a ON a.id = t.debit_account_id AND a.kind = 'member'
        UNION ALL
        SELECT t.*, t.credit_account_id, t.credit_prev_hash
        FROM p JOIN loyalty.transfer t ON t.program_id = p.id
        JOIN loyalty.account a ON a.id = t.credit_account_id AND a.kind = 'member'
    ), links AS (
        SELECT s.side, s.id, s.prev, s.hash,
               lag(s.hash) OVER (PARTITION BY s.side ORDER BY s.id) AS expected_prev,
               loyalty.transfer_hash(s.program_id, s.debit_account_id, s.credit_account_id, s.amount,
                                     s.kind, s.ref, s.occurred_at, s.posted_at, s.rule_version,
                                     s.actor, s.reason, s.debit_prev_hash, s.credit_prev_hash) AS recomputed
        FROM sides s
    ), broken AS (
        SELECT DISTINCT ON (l.side) l.side, l.id,
               CASE WHEN l.prev IS DISTINCT FROM l.expected_prev
                    THEN 'previous hash does not match the account''s previous transfer'
                    ELSE 'content does not match its hash' END AS problem
        FROM links l
        WHERE l.prev IS DISTINCT FROM l.expected_prev OR l.hash IS DISTINCT FROM l.recomputed
        ORDER BY l.side, l.id
    ), heads AS (
        -- each account's last transfer, found through the two account
        -- indexes of the journal and, for purchases, accrual's (not by
        -- joining the links above)
        SELECT a.id AS side, last.id,
               'account''s last hash does not match its last transfer' AS problem
        FROM p JOIN loyalty.account a ON a.program_id = p.id AND a.kind = 'member'
        LEFT JOIN LATERAL (
            SELECT t.id, t.hash FROM loyalty.transfer t
            -- ordered by both columns of the account's index, so that the
            -- plan cannot walk the primary key backwards filtering on the
            -- account (a whole-journal scan for an account with no debits)
            WHERE t.id = greatest((SELECT d.id FROM loyalty.transfer d WHERE d.debit_account_id = a.id AND d.kind <> 'accrual'
                                   ORDER BY d.debit_account_id DESC, d.id DESC LIMIT 1),
                                  (SELECT c.id FROM loyalty.transfer c WHERE c.credit_account_id = a.id
                                   ORDER BY c.credit_account_id DESC, c.id DESC LIMIT 1))
        ) last ON true
        WHERE a.last_hash IS DISTINCT FROM last.hash OR a.last_transfer_id IS DISTINCT FROM last.id
    )
    SELECT b.side, m.member_ref, b.id, b.problem
    FROM (SELECT * FROM broken
          UNION ALL
          SELECT * FROM heads h WHERE NOT EXISTS (SELECT FROM broken b WHERE b.side = h.side)) b
    JOIN loyalty.account a ON a.id = b.side
    JOIN loyalty.member m ON m.id = a.member_id
    ORDER BY 1, 3
$$;
COMMENT ON FUNCTION loyalty.verify_chain(text) IS 'Recomputes every member account''s hash chain; one row per broken account naming its first broken link (no rows: all verify)';

COMMENT ON FUNCTION loyalty._account_of(text, text) IS 'Internal: a member''s account id, or LY002/LY003';
COMMENT ON FUNCTION loyalty._check_code(text, text) IS 'Internal: 22023 unless a program or reward code is well formed';
COMMENT ON FUNCTION loyalty._check_keys(text, jsonb, text[]) IS 'Internal: 22023 for an options object with a key not allowed at its JSON path';
COMMENT ON FUNCTION loyalty._check_options(jsonb) IS 'Internal: validates a program options document, 22023 with the JSON path of the first problem';
COMMENT ON FUNCTION loyalty._is_rolling(bigint) IS 'Internal: whether an account''s program has a rolling expiry policy';
COMMENT ON FUNCTION loyalty._lot_expiry(jsonb, text, timestamptz) IS 'Internal: when a lot credited at a moment expires under a fixed or calendar policy, in the program''s time zone';
COMMENT ON FUNCTION loyalty._lots_as_of(bigint, timestamptz) IS 'Internal: an account''s lots as they stood at a moment of business time';
COMMENT ON FUNCTION loyalty._program_id(text) IS 'Internal: a program''s id, or LY002';
COMMENT ON FUNCTION loyalty._rolling_lapse(bigint, timestamptz, timestamptz) IS 'Internal: under a rolling policy, when points credited at a moment lapse, as known at as_of';
