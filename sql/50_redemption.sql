-- Redemption: the rewards catalogue (versioned), one-step redemption,
-- two-step holds for checkouts, vouchers, charities and donations, transfers
-- between members, cancellation and ratings. See docs/redemption.md.
--
-- Every movement of points posts through the ledger's posting routine
-- (loyalty._redemption_post, C, src/redemption.c), which locks the member
-- accounts in account-id order. Functions here lock a member account
-- (SELECT ... FOR UPDATE) before they read or change that member's holds,
-- redemptions or vouchers, so each is decided once under the same lock the
-- posting takes. The only shared row on the path is a reward with limited
-- stock, locked last and only for such rewards.

INSERT INTO loyalty.transfer_kind VALUES
    ('redeem',        'Reward redeemed',       'redeem'),
    ('capture',       'Points paid at checkout', 'redeem'),
    ('donate',        'Donation',              'redeem'),
    ('redeem_cancel', 'Redemption cancelled',  'redeem'),
    ('capture_cancel', 'Checkout payment cancelled', 'redeem'),
    ('transfer',      'Points transferred',    'move');

-- ---- tables ----

CREATE SEQUENCE loyalty.reward_id_seq;
CREATE TABLE loyalty.reward (
    id          bigint PRIMARY KEY DEFAULT nextval('loyalty.reward_id_seq'),
    program_id  bigint NOT NULL REFERENCES loyalty.program,
    code        text NOT NULL,
    version     integer NOT NULL,
    stock_left  bigint CHECK (stock_left >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (program_id, code)
);
ALTER SEQUENCE loyalty.reward_id_seq OWNED BY loyalty.reward.id;
COMMENT ON TABLE loyalty.reward IS 'A reward of a program''s catalogue: its current version and the units of stock left (NULL: unlimited)';

CREATE TABLE loyalty.reward_version (
    reward_id          bigint NOT NULL REFERENCES loyalty.reward,
    version            integer NOT NULL,
    name               text NOT NULL,
    cost               loyalty.points NOT NULL,
    kind               text NOT NULL CHECK (kind IN ('voucher', 'product', 'cashback', 'donation')),
    min_tier           text,
    valid_from         timestamptz,
    valid_until        timestamptz,
    limit_count        integer,
    limit_period       interval,
    voucher_valid_for  interval,
    charity            text,
    options            jsonb NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reward_id, version)
);
COMMENT ON TABLE loyalty.reward_version IS 'Every version of every reward, kept: what a redemption paid is explained by the version it records';

CREATE SEQUENCE loyalty.redemption_id_seq;
CREATE TABLE loyalty.redemption (
    id                  bigint PRIMARY KEY DEFAULT nextval('loyalty.redemption_id_seq'),
    program_id          bigint NOT NULL,
    ref                 text NOT NULL,
    member_id           bigint NOT NULL,
    account_id          bigint NOT NULL,
    reward_id           bigint NOT NULL,
    reward_version      integer NOT NULL,
    quantity            integer NOT NULL CHECK (quantity > 0),
    cost                loyalty.points NOT NULL,
    points              loyalty.points NOT NULL,
    transfer_id         bigint NOT NULL,
    credit_account_id   bigint NOT NULL,
    occurred_at         timestamptz NOT NULL,
    state               text NOT NULL DEFAULT 'done' CHECK (state IN ('done', 'cancelled')),
    cancel_transfer_id  bigint,
    cancelled_at        timestamptz,
    UNIQUE (program_id, ref)
);
ALTER SEQUENCE loyalty.redemption_id_seq OWNED BY loyalty.redemption.id;
CREATE INDEX redemption_member_idx ON loyalty.redemption (member_id, reward_id, occurred_at);
COMMENT ON TABLE loyalty.redemption IS 'What a member redeemed: the reward version, the cost per unit it paid, the posting, and whether it was cancelled';

CREATE SEQUENCE loyalty.hold_id_seq;
CREATE TABLE loyalty.hold (
    id           bigint PRIMARY KEY DEFAULT nextval('loyalty.hold_id_seq'),
    program_id   bigint NOT NULL,
    account_id   bigint NOT NULL,
    ref          text NOT NULL,
    amount       loyalty.points NOT NULL,
    occurred_at  timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    state        text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'captured', 'released', 'expired')),
    captured     loyalty.points,
    transfer_id  bigint,
    resolved_at  timestamptz,
    cancel_transfer_id bigint,
    UNIQUE (program_id, ref)
);
ALTER SEQUENCE loyalty.hold_id_seq OWNED BY loyalty.hold.id;
CREATE INDEX hold_active_idx ON loyalty.hold (expires_at, id) WHERE state = 'active';
COMMENT ON TABLE loyalty.hold IS 'Points reserved by a checkout (two-step redemption): active until captured, released or expired, exactly once; account.held is the sum of a member''s active holds';

CREATE SEQUENCE loyalty.voucher_id_seq;
CREATE TABLE loyalty.voucher (
    id             bigint PRIMARY KEY DEFAULT nextval('loyalty.voucher_id_seq'),
    program_id     bigint NOT NULL,
    redemption_id  bigint NOT NULL,
    code           text NOT NULL UNIQUE,
    issued_at      timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    state          text NOT NULL DEFAULT 'issued' CHECK (state IN ('issued', 'used', 'cancelled')),
    used_at        timestamptz,
    used_ref       text
);
ALTER SEQUENCE loyalty.voucher_id_seq OWNED BY loyalty.voucher.id;
CREATE INDEX voucher_redemption_idx ON loyalty.voucher (redemption_id);
CREATE UNIQUE INDEX voucher_used_ref_key ON loyalty.voucher (program_id, used_ref) WHERE used_ref IS NOT NULL;
COMMENT ON TABLE loyalty.voucher IS 'Voucher codes issued by redemptions of voucher rewards: random, checked, used at most once';

CREATE TABLE loyalty.reward_rating (
    reward_id   bigint NOT NULL REFERENCES loyalty.reward,
    member_id   bigint NOT NULL REFERENCES loyalty.member,
    stars       integer NOT NULL CHECK (stars BETWEEN 1 AND 5),
    comment     text,
    rated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reward_id, member_id)
);
COMMENT ON TABLE loyalty.reward_rating IS 'One rating (1 to 5 stars, optional comment) per member per reward they redeemed; a new rating replaces the old';

SELECT pg_catalog.pg_extension_config_dump('loyalty.reward', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.reward_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.reward_version', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.redemption', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.redemption_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.hold', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.hold_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.voucher', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.voucher_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.reward_rating', '');

REVOKE ALL ON loyalty.reward, loyalty.reward_version, loyalty.redemption, loyalty.hold,
              loyalty.voucher, loyalty.reward_rating FROM PUBLIC;
REVOKE ALL ON SEQUENCE loyalty.reward_id_seq, loyalty.redemption_id_seq, loyalty.hold_id_seq,
              loyalty.voucher_id_seq FROM PUBLIC;

-- ---- internal helpers ----

CREATE FUNCTION loyalty._redemption_post(program_id bigint, kind text, ref text, debit bigint, credit bigint,
                                         debit_is_member boolean, credit_is_member boolean, amount bigint,
                                         occurred_at timestamptz, reason text, expires_at timestamptz,
                                         debit_label text, lots bigint[], amounts bigint[])
RETURNS bigint AS 'MODULE_PATHNAME', 'loyalty_redemption_post' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION loyalty._redemption_post(bigint, text, text, bigint, bigint, boolean, boolean, bigint, timestamptz, text, timestamptz, text, bigint[], bigint[]) IS 'Internal: posts one redemption transfer through the ledger''s posting routine (LedgerPost); explicit lots with negative amounts restore lots';

CREATE FUNCTION loyalty._voucher_code() RETURNS text
    AS 'MODULE_PATHNAME', 'loyalty_voucher_code' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION loyalty._voucher_code() IS 'Internal: a new voucher code, 15 random Crockford base32 characters from pg_strong_random and a Luhn mod 32 check character';

CREATE FUNCTION loyalty._voucher_normalize(code text) RETURNS text
    AS 'MODULE_PATHNAME', 'loyalty_voucher_normalize' LANGUAGE C IMMUTABLE;
COMMENT ON FUNCTION loyalty._voucher_normalize(text) IS 'Internal: the canonical form of a typed voucher code; 22P02 for what cannot be a code, LY041 when the check character does not match';

CREATE FUNCTION loyalty._check_ref(p_ref text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_ref IS NULL THEN
        RAISE EXCEPTION 'ref must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_ref = '' OR length(p_ref) > 200 THEN
        RAISE EXCEPTION 'invalid ref "%"', p_ref
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A ref is the caller''s key for the posting (an order id, a request id), 1 to 200 characters.';
    END IF;
END $$;
COMMENT ON FUNCTION loyalty._check_ref(text) IS 'Internal: a ref is 1 to 200 characters (22004, 22023)';

CREATE FUNCTION loyalty._check_amount(p_what text, p_points loyalty.points) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_points IS NULL THEN
        RAISE EXCEPTION '% must not be null', p_what USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_points::bigint <= 0 THEN
        RAISE EXCEPTION '% must be positive', p_what
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('Got %s.', p_points);
    END IF;
    RETURN p_points::bigint;
END $$;
COMMENT ON FUNCTION loyalty._check_amount(text, loyalty.points) IS 'Internal: a positive number of points (22004, 22023)';

-- A member of a program, resolved with the precise errors of the ledger
-- (LY002 unknown program, LY003 unknown member, LY004 not active); with
-- p_lock, its account is locked (FOR UPDATE) before anything else is read.
CREATE FUNCTION loyalty._redemption_member(p_program text, p_member_ref text, p_lock boolean,
                                           OUT program_id bigint, OUT member_id bigint,
                                           OUT account_id bigint, OUT tier text)
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_deferred boolean;
BEGIN
    IF p_program IS NULL OR p_member_ref IS NULL THEN
        RAISE EXCEPTION 'program and member_ref must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_lock THEN  -- the common case in one statement
        SELECT p.id, m.id, m.status, m.tier, a.id, a.deferred_day IS NOT NULL
          INTO program_id, member_id, v_status, tier, account_id, v_deferred
        FROM loyalty.program p
        JOIN loyalty.member m ON m.program_id = p.id AND m.member_ref = p_member_ref
        JOIN loyalty.account a ON a.member_id = m.id
        WHERE p.code = p_program
        FOR UPDATE OF a;
        IF v_deferred THEN  -- its lots are read next: the deferred ones written first
            PERFORM loyalty._materialize(ARRAY[account_id]);
        END IF;
    END IF;
    IF account_id IS NULL THEN
        SELECT p.id, m.id, m.status, m.tier, a.id INTO program_id, member_id, v_status, tier, account_id
        FROM loyalty.program p
        LEFT JOIN loyalty.member m ON m.program_id = p.id AND m.member_ref = p_member_ref
        LEFT JOIN loyalty.account a ON a.member_id = m.id
        WHERE p.code = p_program;
    END IF;
    IF program_id IS NULL THEN
        RAISE EXCEPTION 'program "%" does not exist', p_program
            USING ERRCODE = 'LY002', HINT = 'Create it with loyalty.create_program().';
    ELSIF member_id IS NULL THEN
        RAISE EXCEPTION 'member "%" does not exist in program "%"', p_member_ref, p_program
            USING ERRCODE = 'LY003', HINT = 'Enrol the member with loyalty.enroll().';
    END IF;
    IF v_status <> 'active' THEN
        RAISE EXCEPTION 'member "%" of program "%" is %', p_member_ref, p_program, v_status
            USING ERRCODE = 'LY004', DETAIL = 'Only active members'' points can change.';
    END IF;
END $$;
COMMENT ON FUNCTION loyalty._redemption_member(text, text, boolean) IS 'Internal: resolves (and with p_lock, locks the account of) an active member, with LY002, LY003, LY004';

-- The points of an account available at p_at for a new hold: vested,
-- unexpired lots less the active holds, less what the member owes below zero
-- (a refund's shortfall under the program option shortfall "negative",
-- docs/accrual.md). The caller holds the account lock.
CREATE FUNCTION loyalty._available_for_hold(p_account bigint, p_at timestamptz) RETURNS bigint
LANGUAGE sql STABLE AS $$
    WITH r AS (
        SELECT a.held::bigint AS held, coalesce(p.options #>> '{expiry,policy}' = 'rolling', false) AS rolling
        FROM loyalty.account a JOIN loyalty.program p ON p.id = a.program_id
        WHERE a.id = p_account
    )
    SELECT coalesce((SELECT sum(l.remaining::bigint) FROM loyalty.lot l
                     WHERE l.account_id = p_account AND l.remaining OPERATOR(loyalty.>) 0
                       AND l.occurred_at <= p_at AND l.vests_at <= p_at
                       AND (l.expires_at IS NULL OR l.expires_at > p_at)
                       AND (NOT r.rolling OR p_at < loyalty._rolling_lapse(p_account, l.occurred_at, p_at))), 0)
           - r.held - loyalty._negative_shortfall(p_account, p_at)
    FROM r
$$;
COMMENT ON FUNCTION loyalty._available_for_hold(bigint, timestamptz) IS 'Internal: the points a member can still spend or hold at a moment: open lots less active holds and less what it owes below zero';

-- The rank of a tier when the tiers capability defines loyalty.tier
-- (program_id, code, rank); NULL otherwise.
CREATE FUNCTION loyalty._tier_rank(p_program bigint, p_tier text) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v integer;
BEGIN
    IF p_tier IS NULL OR to_regclass('loyalty.tier') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT rank FROM loyalty.tier WHERE program_id = $1 AND code = $2' INTO v USING p_program, p_tier;
    RETURN v;
EXCEPTION WHEN undefined_column THEN
    RETURN NULL;
END $$;
COMMENT ON FUNCTION loyalty._tier_rank(bigint, text) IS 'Internal: the rank of a tier code in loyalty.tier when that table exists, else NULL';

-- ---- catalogue ----

CREATE FUNCTION loyalty.add_reward(program text, code text, name text, cost loyalty.points,
                                   options jsonb DEFAULT '{}')
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_program bigint;
    v_reward loyalty.reward;
    v_cur loyalty.reward_version;
    o jsonb := options;
    k text;
    v_kind text := coalesce(options ->> 'kind', 'product');
    v_stock bigint;
    v_from timestamptz;
    v_until timestamptz;
    v_count integer;
    v_period interval;
    v_valid interval;
    v_charity text;
    v_version integer;
BEGIN
    IF program IS NULL OR code IS NULL OR name IS NULL OR cost IS NULL OR options IS NULL THEN
        RAISE EXCEPTION 'program, code, name, cost and options must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_program := loyalty._program_id(program);
    PERFORM loyalty._check_code('reward', code);
    IF btrim(name) = '' THEN
        RAISE EXCEPTION 'reward name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM loyalty._check_amount('cost', cost);
    IF jsonb_typeof(o) <> 'object' THEN
        PERFORM loyalty._bad_option('$', 'expected a JSON object', 'reward', 'redemption');
    END IF;
    FOR k IN SELECT jsonb_object_keys(o) ORDER BY 1 LOOP
        IF k NOT IN ('kind', 'stock', 'min_tier', 'valid_from', 'valid_until', 'limit',
                     'voucher_valid_for', 'charity') THEN
            PERFORM loyalty._bad_option('$.' || k, 'unknown key; expected one of kind, stock, min_tier, '
                || 'valid_from, valid_until, limit, voucher_valid_for, charity', 'reward', 'redemption');
        END IF;
    END LOOP;
    IF v_kind NOT IN ('voucher', 'product', 'cashback', 'donation') OR jsonb_typeof(o -> 'kind') <> 'string' THEN
        PERFORM loyalty._bad_option('$.kind', 'expected "voucher", "product", "cashback" or "donation"', 'reward', 'redemption');
    END IF;
    IF o ? 'stock' THEN
        IF jsonb_typeof(o -> 'stock') <> 'number' OR (o ->> 'stock') !~ '^[0-9]{1,15}$' THEN
            PERFORM loyalty._bad_option('$.stock', 'expected a whole number of units, 0 or more', 'reward', 'redemption');
        END IF;
        v_stock := (o ->> 'stock')::bigint;
    END IF;
    IF o ? 'min_tier' AND (jsonb_typeof(o -> 'min_tier') <> 'string' OR o ->> 'min_tier' = '') THEN
        PERFORM loyalty._bad_option('$.min_tier', 'expected a tier code', 'reward', 'redemption');
    END IF;
    BEGIN
        v_from := (o ->> 'valid_from')::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM loyalty._bad_option('$.valid_from', 'expected a timestamp', 'reward', 'redemption');
    END;
    BEGIN
        v_until := (o ->> 'valid_until')::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM loyalty._bad_option('$.valid_until', 'expected a timestamp', 'reward', 'redemption');
    END;
    IF v_from >= v_until THEN
        PERFORM loyalty._bad_option('$.valid_until', 'must be after valid_from', 'reward', 'redemption');
    END IF;
    IF o ? 'limit' THEN
        IF jsonb_typeof(o -> 'limit') <> 'object'
           OR EXISTS (SELECT FROM jsonb_object_keys(o -> 'limit') x WHERE x NOT IN ('count', 'period')) THEN
            PERFORM loyalty._bad_option('$.limit', 'expected an object with count and period', 'reward', 'redemption');
        END IF;
        IF jsonb_typeof(o #> '{limit,count}') IS DISTINCT FROM 'number'
           OR (o #>> '{limit,count}') !~ '^[0-9]{1,6}$' OR (o #>> '{limit,count}')::integer < 1 THEN
            PERFORM loyalty._bad_option('$.limit.count', 'expected a whole number of units above 0', 'reward', 'redemption');
        END IF;
        v_count := (o #>> '{limit,count}')::integer;
        IF o #> '{limit,period}' IS NOT NULL THEN
            v_period := loyalty._check_interval('$.limit.period', o #> '{limit,period}', 'reward', 'redemption');
        END IF;
    END IF;
    IF o ? 'voucher_valid_for' THEN
        IF v_kind <> 'voucher' THEN
            PERFORM loyalty._bad_option('$.voucher_valid_for', 'only a voucher reward issues vouchers', 'reward', 'redemption');
        END IF;
        v_valid := loyalty._check_interval('$.voucher_valid_for', o -> 'voucher_valid_for', 'reward', 'redemption');
    ELSIF v_kind = 'voucher' THEN
        v_valid := interval '1 year';
    END IF;
    IF o ? 'charity' THEN
        IF v_kind <> 'donation' THEN
            PERFORM loyalty._bad_option('$.charity', 'only a donation reward names a charity', 'reward', 'redemption');
        END IF;
        v_charity := o ->> 'charity';
        IF NOT EXISTS (SELECT FROM loyalty.account a WHERE a.program_id = v_program AND a.kind <> 'member' AND a.kind = 'donation'
                       AND a.name = v_charity AND a.name <> '') THEN
            RAISE EXCEPTION 'charity "%" does not exist in program "%"', v_charity, program
                USING ERRCODE = 'LY042', HINT = 'Register it with loyalty.add_charity().';
        END IF;
    END IF;

    INSERT INTO loyalty.reward (program_id, code, version, stock_left)
    VALUES (v_program, code, 0, v_stock)
    ON CONFLICT ON CONSTRAINT reward_program_id_code_key DO NOTHING;
    SELECT * INTO v_reward FROM loyalty.reward r WHERE r.program_id = v_program AND r.code = add_reward.code
    FOR UPDATE;
    SELECT * INTO v_cur FROM loyalty.reward_version rv
    WHERE rv.reward_id = v_reward.id AND rv.version = v_reward.version;
    IF FOUND AND (v_cur.name, v_cur.cost, v_cur.options) = (name, cost, o) THEN
        RETURN v_cur.version;   -- the same definition again: nothing changes
    END IF;
    v_version := v_reward.version + 1;
    INSERT INTO loyalty.reward_version (reward_id, version, name, cost, kind, min_tier, valid_from, valid_until,
                                        limit_count, limit_period, voucher_valid_for, charity, options)
    VALUES (v_reward.id, v_version, name, cost, v_kind, o ->> 'min_tier', v_from, v_until,
            v_count, v_period, v_valid, v_charity, o);
    UPDATE loyalty.reward r SET version = v_version,
           stock_left = CASE WHEN v_version = 1 OR o ? 'stock' THEN v_stock ELSE NULL END
    WHERE r.id = v_reward.id;
    RETURN v_version;
END $$;
COMMENT ON FUNCTION loyalty.add_reward(text, text, text, loyalty.points, jsonb) IS 'Adds a reward to the catalogue, or a new version of it when the definition differs (the same definition again changes nothing); returns the version';

CREATE FUNCTION loyalty.add_charity(program text, charity text)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    v_program bigint := loyalty._program_id(program);
    v_id bigint;
BEGIN
    IF charity IS NULL OR btrim(charity) = '' OR length(charity) > 200 THEN
        RAISE EXCEPTION 'invalid charity name "%"', charity
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'A charity name is 1 to 200 characters, not all spaces.';
    END IF;
    INSERT INTO loyalty.account (program_id, kind, name) VALUES (v_program, 'donation', charity)
    ON CONFLICT DO NOTHING RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        SELECT a.id INTO v_id FROM loyalty.account a
        WHERE a.program_id = v_program AND a.kind <> 'member' AND a.kind = 'donation' AND a.name = charity;
    END IF;
    RETURN v_id;
END $$;
COMMENT ON FUNCTION loyalty.add_charity(text, text) IS 'Registers a charity: a donation account of the program with the charity''s name; idempotent; returns the account id';

CREATE VIEW loyalty.catalogue AS
SELECT p.code AS program, r.code AS reward, v.name, v.kind, v.cost, r.version, r.stock_left,
       v.min_tier, v.valid_from, v.valid_until, v.limit_count, v.limit_period,
       round(rt.avg_stars, 2) AS rating_avg, coalesce(rt.n, 0) AS rating_count
FROM loyalty.reward r
JOIN loyalty.program p ON p.id = r.program_id
JOIN loyalty.reward_version v ON v.reward_id = r.id AND v.version = r.version
LEFT JOIN (SELECT reward_id, avg(stars) AS avg_stars, count(*) AS n
           FROM loyalty.reward_rating GROUP BY reward_id) rt ON rt.reward_id = r.id;
COMMENT ON VIEW loyalty.catalogue IS 'Every program''s rewards as they stand (current version), with stock and ratings';
COMMENT ON COLUMN loyalty.catalogue.program IS 'Program code';
COMMENT ON COLUMN loyalty.catalogue.reward IS 'Reward code';
COMMENT ON COLUMN loyalty.catalogue.name IS 'Reward name (current version)';
COMMENT ON COLUMN loyalty.catalogue.kind IS 'voucher, product, cashback or donation';
COMMENT ON COLUMN loyalty.catalogue.cost IS 'Points per unit (current version)';
COMMENT ON COLUMN loyalty.catalogue.version IS 'Current version of the reward';
COMMENT ON COLUMN loyalty.catalogue.stock_left IS 'Units left; NULL when unlimited';
COMMENT ON COLUMN loyalty.catalogue.min_tier IS 'Lowest tier that may redeem it; NULL for every member';
COMMENT ON COLUMN loyalty.catalogue.valid_from IS 'Redeemable from (business time); NULL for always';
COMMENT ON COLUMN loyalty.catalogue.valid_until IS 'Redeemable until, exclusive (business time); NULL for always';
COMMENT ON COLUMN loyalty.catalogue.limit_count IS 'Units a member may redeem per limit_period (lifetime when no period); NULL for no limit';
COMMENT ON COLUMN loyalty.catalogue.limit_period IS 'The rolling period of limit_count';
COMMENT ON COLUMN loyalty.catalogue.rating_avg IS 'Average stars of members'' ratings, two decimals; NULL when unrated';
COMMENT ON COLUMN loyalty.catalogue.rating_count IS 'Number of ratings';

-- ---- one-step redemption ----

CREATE FUNCTION loyalty.redeem(program text, member_ref text, reward text, ref text, quantity integer DEFAULT 1,
                               occurred_at timestamptz DEFAULT now())
RETURNS TABLE (redemption_id bigint, points loyalty.points, vouchers text[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    m record;
    x record;
    v_red loyalty.redemption;
    v_reward loyalty.reward;
    v loyalty.reward_version;
    v_code text;
    v_at timestamptz := coalesce(occurred_at, now());
    v_used bigint;
    v_points bigint;
    v_credit bigint;
    v_transfer bigint;
    v_vouchers text[];
BEGIN
    PERFORM loyalty._check_ref(ref);
    IF reward IS NULL OR quantity IS NULL THEN
        RAISE EXCEPTION 'reward and quantity must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF quantity < 1 OR quantity > 1000 THEN
        RAISE EXCEPTION 'invalid quantity %', quantity
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'A redemption is for 1 to 1000 units.';
    END IF;
    m := loyalty._redemption_member(program, member_ref, true);

    -- Under the member's lock, a repeat of a committed redemption is seen.
    SELECT * INTO v_red FROM loyalty.redemption r WHERE r.program_id = m.program_id AND r.ref = redeem.ref;
    IF FOUND THEN
        SELECT rw.code INTO v_code FROM loyalty.reward rw WHERE rw.id = v_red.reward_id;
        IF v_red.member_id <> m.member_id OR v_code <> reward OR v_red.quantity <> quantity THEN
            RAISE EXCEPTION 'ref "%" was already used for a different redemption', ref
                USING ERRCODE = 'unique_violation',
                      DETAIL = format('The first redemption was %s x %s by member %s; this one asks for %s x %s by member %s.',
                                      v_red.quantity, v_code,
                                      (SELECT mm.member_ref FROM loyalty.member mm WHERE mm.id = v_red.member_id),
                                      quantity, reward, member_ref),
                      HINT = 'Repeat a redemption with exactly the same content, or give a new redemption a new ref.';
        END IF;
        RETURN QUERY SELECT v_red.id, v_red.points,
               (SELECT array_agg(vo.code ORDER BY vo.id) FROM loyalty.voucher vo WHERE vo.redemption_id = v_red.id);
        RETURN;
    END IF;

    SELECT rw AS rw, rv AS rv, ca.id AS credit INTO x
    FROM loyalty.reward rw
    JOIN loyalty.reward_version rv ON rv.reward_id = rw.id AND rv.version = rw.version
    JOIN loyalty.account ca ON ca.program_id = rw.program_id
                           AND ca.kind <> 'member' AND ca.kind = CASE WHEN rv.charity IS NULL THEN 'redemption' ELSE 'donation' END
                           AND ca.name = coalesce(rv.charity, '')
    WHERE rw.program_id = m.program_id AND rw.code = reward;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'reward "%" does not exist in program "%"', reward, program
            USING ERRCODE = 'LY030', HINT = 'See loyalty.catalogue for the rewards on offer.';
    END IF;
    v_reward := x.rw;
    v := x.rv;
    v_credit := x.credit;
    IF v_at < v.valid_from OR v_at >= v.valid_until THEN
        RAISE EXCEPTION 'reward "%" is not available at %', reward, v_at
            USING ERRCODE = 'LY031',
                  DETAIL = format('It can be redeemed from %s until %s.', coalesce(v.valid_from::text, 'always'),
                                  coalesce(v.valid_until::text, 'forever'));
    END IF;
    IF v.min_tier IS NOT NULL AND m.tier IS DISTINCT FROM v.min_tier
       AND coalesce(loyalty._tier_rank(m.program_id, m.tier) >= loyalty._tier_rank(m.program_id, v.min_tier), false)
           IS NOT TRUE THEN
        RAISE EXCEPTION 'reward "%" needs tier "%" or above', reward, v.min_tier
            USING ERRCODE = 'LY033',
                  DETAIL = format('Member %s is in %s.', member_ref,
                                  CASE WHEN m.tier IS NULL THEN 'no tier' ELSE format('tier "%s"', m.tier) END);
    END IF;
    IF v.limit_count IS NOT NULL THEN
        SELECT coalesce(sum(r.quantity), 0) INTO v_used FROM loyalty.redemption r
        WHERE r.member_id = m.member_id AND r.reward_id = v_reward.id AND r.state = 'done'
          AND (v.limit_period IS NULL OR r.occurred_at > v_at - v.limit_period);
        IF v_used + quantity > v.limit_count THEN
            RAISE EXCEPTION 'member "%" has reached the limit of reward "%"', member_ref, reward
                USING ERRCODE = 'LY034',
                      DETAIL = format('The limit is %s per member%s; %s already redeemed, %s asked.', v.limit_count,
                                      coalesce(' per ' || v.limit_period::text, ''), v_used, quantity);
        END IF;
    END IF;

    v_points := v.cost::bigint * quantity;
    v_transfer := loyalty._redemption_post(m.program_id, 'redeem', ref, m.account_id, v_credit, true, false,
                                           v_points, v_at, NULL, NULL, format('member "%s"', member_ref),
                                           NULL, NULL);
    -- The reward's stock is the one shared row: taken last, only when limited.
    IF v_reward.stock_left IS NOT NULL THEN
        UPDATE loyalty.reward rw SET stock_left = rw.stock_left - quantity
        WHERE rw.id = v_reward.id AND rw.stock_left >= quantity;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'reward "%" is out of stock', reward
                USING ERRCODE = 'LY032',
                      DETAIL = format('%s units are left; %s asked.',
                                      (SELECT rw.stock_left FROM loyalty.reward rw WHERE rw.id = v_reward.id), quantity);
        END IF;
    END IF;
    INSERT INTO loyalty.redemption (program_id, ref, member_id, account_id, reward_id, reward_version, quantity,
                                    cost, points, transfer_id, credit_account_id, occurred_at)
    VALUES (m.program_id, ref, m.member_id, m.account_id, v_reward.id, v.version, quantity,
            v.cost, v_points, v_transfer, v_credit, v_at)
    RETURNING * INTO v_red;
    IF v.kind = 'voucher' THEN
        WITH n AS (
            INSERT INTO loyalty.voucher (program_id, redemption_id, code, issued_at, expires_at)
            SELECT m.program_id, v_red.id, loyalty._voucher_code(), v_at, v_at + v.voucher_valid_for
            FROM generate_series(1, quantity)
            RETURNING id, code)
        SELECT array_agg(n.code ORDER BY n.id) INTO v_vouchers FROM n;
    END IF;
    RETURN QUERY SELECT v_red.id, v_red.points, v_vouchers;
END $$;
COMMENT ON FUNCTION loyalty.redeem(text, text, text, text, integer, timestamptz) IS 'Redeems quantity units of a reward in one step (balance, stock, tier, window and limits checked; lots consumed earliest expiry first; vouchers issued for a voucher reward); idempotent on ref';

-- ---- two-step redemption: hold, capture, release ----

CREATE FUNCTION loyalty.hold(program text, member_ref text, points loyalty.points, ref text,
                             ttl interval DEFAULT '15 minutes', occurred_at timestamptz DEFAULT now())
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    m record;
    h loyalty.hold;
    v_points bigint := loyalty._check_amount('points', points);
    v_at timestamptz := coalesce(occurred_at, now());
    v_available bigint;
    v_held bigint;
BEGIN
    PERFORM loyalty._check_ref(ref);
    IF ttl IS NULL OR ttl <= interval '0' OR ttl > interval '7 days' THEN
        RAISE EXCEPTION 'invalid hold ttl %', coalesce(ttl::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'A hold lasts more than 0 and at most 7 days.';
    END IF;
    m := loyalty._redemption_member(program, member_ref, true);
    SELECT * INTO h FROM loyalty.hold hh WHERE hh.program_id = m.program_id AND hh.ref = hold.ref;
    IF FOUND THEN
        IF h.account_id <> m.account_id OR h.amount::bigint <> v_points THEN
            RAISE EXCEPTION 'ref "%" was already used for a different hold', ref
                USING ERRCODE = 'unique_violation',
                      DETAIL = format('The first hold reserved %s points of member %s; this one asks for %s points of member %s.',
                                      h.amount, (SELECT mm.member_ref FROM loyalty.member mm JOIN loyalty.account a
                                                 ON a.member_id = mm.id WHERE a.id = h.account_id),
                                      v_points, member_ref),
                      HINT = 'Repeat a hold with exactly the same content, or give a new hold a new ref.';
        END IF;
        RETURN h.id;
    END IF;
    v_available := loyalty._available_for_hold(m.account_id, v_at);
    IF v_available < v_points THEN
        SELECT a.held::bigint INTO v_held FROM loyalty.account a WHERE a.id = m.account_id;
        RAISE EXCEPTION 'insufficient points'
            USING ERRCODE = 'LY001',
                  DETAIL = format('member "%s" has %s points available at %s%s; %s are needed.',
                                  member_ref, greatest(v_available, 0), v_at,
                                  CASE WHEN v_held > 0 THEN format(' (%s more are held)', v_held) ELSE '' END,
                                  v_points);
    END IF;
    INSERT INTO loyalty.hold (program_id, account_id, ref, amount, occurred_at, expires_at)
    VALUES (m.program_id, m.account_id, ref, v_points, v_at, v_at + ttl)
    RETURNING * INTO h;
    UPDATE loyalty.account a SET held = a.held + v_points WHERE a.id = m.account_id;
    RETURN h.id;
END $$;
COMMENT ON FUNCTION loyalty.hold(text, text, loyalty.points, text, interval, timestamptz) IS 'Reserves points for a checkout: they stop being available until the hold is captured, released or expires (occurred_at + ttl); idempotent on ref; returns the hold id';

-- The hold of a ref with its member account locked, then the hold row
-- locked: every resolution of a hold goes through here, so each is decided
-- once. LY035 for an unknown ref.
CREATE FUNCTION loyalty._lock_hold(p_program text, p_ref text) RETURNS loyalty.hold
LANGUAGE plpgsql AS $$
DECLARE
    v_program bigint := loyalty._program_id(p_program);
    h loyalty.hold;
BEGIN
    PERFORM loyalty._check_ref(p_ref);
    SELECT * INTO h FROM loyalty.hold hh WHERE hh.program_id = v_program AND hh.ref = p_ref;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'hold "%" does not exist in program "%"', p_ref, p_program
            USING ERRCODE = 'LY035', HINT = 'Reserve points with loyalty.hold() first.';
    END IF;
    PERFORM loyalty._lock_accounts(ARRAY[h.account_id]);
    SELECT * INTO h FROM loyalty.hold hh WHERE hh.id = h.id FOR UPDATE;
    RETURN h;
END $$;
COMMENT ON FUNCTION loyalty._lock_hold(text, text) IS 'Internal: a hold by ref, read after locking its member account (LY035 when unknown)';

-- What a member owes after a refund it could not pay (accrual_debt) is
-- repaid by whatever credits it next; points a hold gives back count: a
-- refund leaves held points in place and records them as owed, so that the
-- checkout can still capture them (docs/accrual.md, "Held points stay
-- held"). Called under the member account's lock.
CREATE FUNCTION loyalty._recover_debt(account_id bigint) RETURNS void
AS 'MODULE_PATHNAME', 'loyalty_recover_debt' LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION loyalty._recover_debt(bigint) IS 'Internal: repays a member account''s outstanding refund debt from its lots, if it owes any (after a hold gave points back)';

-- A reversal that gives a purchase's lot back points its refund recorded as
-- owed (they had been spent by what the reversal undoes) repays that debt
-- from them at once, expired or not, and with the rest settles the refund
-- in place of the member's other points it took, which go back to their
-- lots (src/accrual_refund.c).
CREATE FUNCTION loyalty._recover_refilled(reversal bigint) RETURNS bigint
AS 'MODULE_PATHNAME', 'loyalty_recover_refilled' LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION loyalty._recover_refilled(bigint) IS 'Internal: from the lots a reversal refilled, repays the refund debt of the purchases those lots belong to and gives back what their refunds took from other lots; returns the points used so';

CREATE FUNCTION loyalty.capture(program text, ref text, points loyalty.points DEFAULT NULL,
                                occurred_at timestamptz DEFAULT now())
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    h loyalty.hold := loyalty._lock_hold(program, ref);
    v_at timestamptz := coalesce(occurred_at, now());
    v_points bigint;
    v_credit bigint;
    v_member text;
BEGIN
    v_points := CASE WHEN points IS NULL THEN h.amount::bigint ELSE loyalty._check_amount('points', points) END;
    IF h.state = 'captured' THEN
        IF v_points <> h.captured::bigint AND points IS NOT NULL THEN
            RAISE EXCEPTION 'hold "%" was already captured with a different amount', ref
                USING ERRCODE = 'unique_violation',
                      DETAIL = format('It captured %s points; this capture asks for %s.', h.captured, v_points);
        END IF;
        RETURN h.transfer_id;
    ELSIF h.state <> 'active' THEN
        RAISE EXCEPTION 'hold "%" was already %', ref, h.state
            USING ERRCODE = 'LY036', DETAIL = format('Its %s points went back to the member.', h.amount),
                  HINT = 'Place a new hold.';
    ELSIF v_at >= h.expires_at THEN
        RAISE EXCEPTION 'hold "%" has expired', ref
            USING ERRCODE = 'LY037', DETAIL = format('It expired at %s.', h.expires_at),
                  HINT = 'Place a new hold; the release_holds job returns the points of this one.';
    ELSIF v_points > h.amount::bigint THEN
        RAISE EXCEPTION 'cannot capture more than the hold'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Hold "%s" holds %s points; %s were asked.', ref, h.amount, v_points);
    END IF;

    -- Resolve the hold first: the capture then spends points no hold covers.
    UPDATE loyalty.account a SET held = a.held - h.amount WHERE a.id = h.account_id;
    SELECT a.id INTO v_credit FROM loyalty.account a
    WHERE a.program_id = h.program_id AND a.kind <> 'member' AND a.kind = 'redemption' AND a.name = '';
    SELECT mm.member_ref INTO v_member FROM loyalty.member mm JOIN loyalty.account a ON a.member_id = mm.id
    WHERE a.id = h.account_id;
    h.transfer_id := loyalty._redemption_post(h.program_id, 'capture', ref, h.account_id, v_credit, true, false,
                                              v_points, v_at, NULL, NULL, format('member "%s"', v_member),
                                              NULL, NULL);
    UPDATE loyalty.hold hh SET state = 'captured', captured = v_points, transfer_id = h.transfer_id,
                               resolved_at = now()
    WHERE hh.id = h.id;
    IF v_points < h.amount::bigint THEN
        PERFORM loyalty._recover_debt(h.account_id);     -- the rest went back to the member
    END IF;
    RETURN h.transfer_id;
END $$;
COMMENT ON FUNCTION loyalty.capture(text, text, loyalty.points, timestamptz) IS 'Posts all (points NULL) or part of a hold and resolves it (the rest goes back); repeating it returns the same transfer id';

CREATE FUNCTION loyalty.release(program text, ref text)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
DECLARE
    h loyalty.hold := loyalty._lock_hold(program, ref);
BEGIN
    IF h.state = 'captured' THEN
        RAISE EXCEPTION 'hold "%" was already captured', ref
            USING ERRCODE = 'LY036', DETAIL = format('It captured %s points in transfer %s.', h.captured, h.transfer_id),
                  HINT = 'Cancel the order with a refund instead.';
    ELSIF h.state = 'active' THEN
        UPDATE loyalty.account a SET held = a.held - h.amount WHERE a.id = h.account_id;
        UPDATE loyalty.hold hh SET state = 'released', resolved_at = now() WHERE hh.id = h.id;
        PERFORM loyalty._recover_debt(h.account_id);
        RETURN 'released';
    END IF;
    RETURN h.state;     -- released or expired already: nothing more to do
END $$;
COMMENT ON FUNCTION loyalty.release(text, text) IS 'Returns the points of an active hold to the member; idempotent: returns the state the hold ended in (released or expired)';

CREATE FUNCTION loyalty._job_release_holds(as_of timestamptz, batch_size integer)
RETURNS TABLE (rows bigint, points bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_accounts bigint[];
BEGIN
    IF as_of IS NULL OR batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'as_of must not be null and batch_size must be at least 1'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(DISTINCT c.account_id) INTO v_accounts
    FROM (SELECT h.account_id FROM loyalty.hold h
          WHERE h.state = 'active' AND h.expires_at <= _job_release_holds.as_of
          ORDER BY h.expires_at, h.id LIMIT batch_size) c;
    IF v_accounts IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    -- The member accounts first, in id order, as every posting locks them.
    PERFORM loyalty._lock_accounts(v_accounts);
    RETURN QUERY
    WITH r AS (
        UPDATE loyalty.hold h SET state = 'expired', resolved_at = now()
        WHERE h.id IN (SELECT x.id FROM loyalty.hold x
                       WHERE x.state = 'active' AND x.expires_at <= _job_release_holds.as_of
                         AND x.account_id = ANY (v_accounts)
                       ORDER BY x.expires_at, x.id LIMIT batch_size)
          AND h.state = 'active'
        RETURNING h.account_id, h.amount::bigint AS amount
    ), s AS (
        SELECT r.account_id, sum(r.amount) AS amount, count(*) AS n FROM r GROUP BY r.account_id
    ), u AS (
        UPDATE loyalty.account a SET held = (a.held::bigint - s.amount)::loyalty.points
        FROM s WHERE a.id = s.account_id
        RETURNING s.n, s.amount
    )
    SELECT coalesce(sum(u.n), 0)::bigint, coalesce(sum(u.amount), 0)::bigint FROM u;
    -- the points that came back repay what their members owe
    PERFORM loyalty._recover_debt(x.id) FROM unnest(v_accounts) AS x(id);
END $$;
COMMENT ON FUNCTION loyalty._job_release_holds(timestamptz, integer) IS 'Job handler of release_holds: expires at most batch_size active holds whose TTL has passed at as_of, returning their points; returns (rows, points), rows = 0 when nothing is left; idempotent';

-- ---- vouchers ----

CREATE FUNCTION loyalty.use_voucher(program text, code text, ref text, occurred_at timestamptz DEFAULT now())
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_code text := loyalty._voucher_normalize(code);     -- a typo fails here, before any lookup
    v_program bigint := loyalty._program_id(program);
    v_at timestamptz := coalesce(occurred_at, now());
    vo loyalty.voucher;
    v_other text;
    v_reward text;
BEGIN
    PERFORM loyalty._check_ref(ref);
    SELECT * INTO vo FROM loyalty.voucher x WHERE x.code = v_code AND x.program_id = v_program FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'voucher "%" does not exist in program "%"', v_code, program
            USING ERRCODE = 'LY038', HINT = 'Check the code with the member.';
    END IF;
    SELECT rw.code INTO v_reward FROM loyalty.redemption r JOIN loyalty.reward rw ON rw.id = r.reward_id
    WHERE r.id = vo.redemption_id;
    IF vo.state = 'used' THEN
        IF vo.used_ref = ref THEN
            RETURN v_reward;    -- the same use again
        END IF;
        RAISE EXCEPTION 'voucher "%" was already used', v_code
            USING ERRCODE = 'LY039', DETAIL = format('It was used at %s under ref "%s".', vo.used_at, vo.used_ref);
    ELSIF vo.state = 'cancelled' THEN
        RAISE EXCEPTION 'voucher "%" was cancelled', v_code
            USING ERRCODE = 'LY046', DETAIL = 'The redemption that issued it was cancelled.';
    ELSIF v_at >= vo.expires_at THEN
        RAISE EXCEPTION 'voucher "%" has expired', v_code
            USING ERRCODE = 'LY040', DETAIL = format('It was valid until %s.', vo.expires_at);
    END IF;
    SELECT x.code INTO v_other FROM loyalty.voucher x WHERE x.program_id = v_program AND x.used_ref = ref;
    IF FOUND THEN
        RAISE EXCEPTION 'ref "%" was already used for a different voucher', ref
            USING ERRCODE = 'unique_violation', DETAIL = format('It used voucher %s.', v_other),
                  HINT = 'Give each use of a voucher its own ref.';
    END IF;
    UPDATE loyalty.voucher x SET state = 'used', used_at = v_at, used_ref = ref WHERE x.id = vo.id;
    RETURN v_reward;
END $$;
COMMENT ON FUNCTION loyalty.use_voucher(text, text, text, timestamptz) IS 'Marks a voucher used, once (the same ref again returns the same answer); the code''s check character is verified before any lookup; returns the reward code';

-- ---- donations and transfers between members ----

CREATE FUNCTION loyalty.donate(program text, member_ref text, charity text, points loyalty.points, ref text,
                               occurred_at timestamptz DEFAULT now())
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_points bigint := loyalty._check_amount('points', points);
    m record;
    v_charity bigint;
BEGIN
    PERFORM loyalty._check_ref(ref);
    m := loyalty._redemption_member(program, member_ref, false);
    SELECT a.id INTO v_charity FROM loyalty.account a
    WHERE a.program_id = m.program_id AND a.kind <> 'member' AND a.kind = 'donation' AND a.name = charity AND a.name <> '';
    IF v_charity IS NULL THEN
        RAISE EXCEPTION 'charity "%" does not exist in program "%"', charity, program
            USING ERRCODE = 'LY042', HINT = 'Register it with loyalty.add_charity().';
    END IF;
    RETURN loyalty._redemption_post(m.program_id, 'donate', ref, m.account_id, v_charity, true, false, v_points,
                                    coalesce(occurred_at, now()), NULL, NULL, format('member "%s"', member_ref),
                                    NULL, NULL);
END $$;
COMMENT ON FUNCTION loyalty.donate(text, text, text, loyalty.points, text, timestamptz) IS 'Gives a member''s points to a charity registered with add_charity(); idempotent on ref; returns the transfer id';

CREATE FUNCTION loyalty.transfer_points(program text, from_member text, to_member text, points loyalty.points,
                                        ref text, occurred_at timestamptz DEFAULT now())
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_points bigint := loyalty._check_amount('points', points);
    v_at timestamptz := coalesce(occurred_at, now());
    f record;
    t record;
    v_expires timestamptz;
BEGIN
    PERFORM loyalty._check_ref(ref);
    IF from_member = to_member THEN
        RAISE EXCEPTION 'cannot transfer points to the same member'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('Both sides are member %s.', from_member);
    END IF;
    f := loyalty._redemption_member(program, from_member, false);
    t := loyalty._redemption_member(program, to_member, false);
    -- Both accounts in id order, as the posting will lock them.
    PERFORM loyalty._lock_accounts(ARRAY[f.account_id, t.account_id]);
    -- The receiver's lot expires when the earliest of the lots it comes from
    -- would have: a transfer never extends the life of points.
    SELECT min(x.expires_at) INTO v_expires FROM (
        SELECT l.expires_at,
               sum(l.remaining::bigint) OVER (ORDER BY l.expires_at NULLS LAST, l.occurred_at, l.id)
                   - l.remaining::bigint AS before
        FROM loyalty.lot l
        JOIN loyalty.program p ON p.id = f.program_id
        WHERE l.account_id = f.account_id AND l.remaining > 0
          AND l.occurred_at <= v_at AND l.vests_at <= v_at
          AND (l.expires_at IS NULL OR l.expires_at > v_at)
          AND (p.options #>> '{expiry,policy}' IS DISTINCT FROM 'rolling'
               OR v_at < loyalty._rolling_lapse(f.account_id, l.occurred_at, v_at))) x
    WHERE x.before < v_points;
    RETURN loyalty._redemption_post(f.program_id, 'transfer', ref, f.account_id, t.account_id, true, true,
                                    v_points, v_at, NULL, v_expires, format('member "%s"', from_member),
                                    NULL, NULL);
END $$;
COMMENT ON FUNCTION loyalty.transfer_points(text, text, text, loyalty.points, text, timestamptz) IS 'Moves points from one member to another of the same program; the receiver''s new lot keeps the earliest expiry of the lots given; idempotent on ref; returns the transfer id';

-- ---- cancellation ----

-- The reversal of a redemption or a capture (transfer p_transfer, member
-- to reward or charity account): the points go back to exactly the lots it
-- consumed, each with its expiry. It is dated no earlier than the transfer
-- it undoes: one dated in the future is undone at its own time, or the lots
-- would count as restored before they were used, and the balance until
-- then would show the points twice. Points given back to the lot of a
-- purchase whose refund recorded them as owed repay that debt first
-- (loyalty._recover_refilled); what a lot already past its expiry gets back
-- beyond that expires at once (loyalty._expire_refilled).
CREATE FUNCTION loyalty._reverse_transfer(p_transfer bigint, p_kind text, p_ref text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    t loyalty.transfer;
    v_lots bigint[];
    v_amounts bigint[];
    v_reversal bigint;
BEGIN
    SELECT * INTO t FROM loyalty.transfer x WHERE x.id = p_transfer;
    SELECT array_agg(u.lot_id ORDER BY u.lot_id), array_agg(-u.amount::bigint ORDER BY u.lot_id)
    INTO v_lots, v_amounts
    FROM loyalty.lot_use u WHERE u.transfer_id = p_transfer;
    v_reversal := loyalty._redemption_post(t.program_id, p_kind, p_ref, t.credit_account_id, t.debit_account_id,
                                           false, true, t.amount::bigint, greatest(now(), t.occurred_at),
                                           NULL, NULL, NULL, v_lots, v_amounts);
    PERFORM loyalty._recover_refilled(v_reversal);
    PERFORM loyalty._expire_refilled(v_reversal);
    RETURN v_reversal;
END $$;
COMMENT ON FUNCTION loyalty._reverse_transfer(bigint, text, text) IS 'Internal: reverses a redemption or capture transfer, restoring exactly the lots it consumed, dated no earlier than it';

-- Cancelling a checkout: the capture of a hold is reversed like a
-- redemption, restoring exactly the lots it consumed.
CREATE FUNCTION loyalty._cancel_capture(p_program text, p_ref text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    h loyalty.hold := loyalty._lock_hold(p_program, p_ref);
BEGIN
    IF h.cancel_transfer_id IS NOT NULL THEN
        RETURN h.cancel_transfer_id;
    END IF;
    h.cancel_transfer_id := loyalty._reverse_transfer(h.transfer_id, 'capture_cancel', p_ref);
    UPDATE loyalty.hold x SET cancel_transfer_id = h.cancel_transfer_id WHERE x.id = h.id;
    RETURN h.cancel_transfer_id;
END $$;
COMMENT ON FUNCTION loyalty._cancel_capture(text, text) IS 'Internal: reverses the capture of a hold, restoring exactly the lots it consumed; idempotent';

CREATE FUNCTION loyalty.cancel_redemption(program text, ref text)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_program bigint := loyalty._program_id(program);
    r loyalty.redemption;
    v_transfer bigint;
    v_used text;
BEGIN
    PERFORM loyalty._check_ref(ref);
    SELECT * INTO r FROM loyalty.redemption x WHERE x.program_id = v_program AND x.ref = ref;
    IF NOT FOUND THEN
        IF EXISTS (SELECT FROM loyalty.hold h WHERE h.program_id = v_program AND h.ref = ref
                   AND h.state = 'captured') THEN
            RETURN loyalty._cancel_capture(program, ref);
        END IF;
        RAISE EXCEPTION 'redemption "%" does not exist in program "%"', ref, program
            USING ERRCODE = 'LY043', HINT = 'Give the ref of a redemption or of a captured hold.';
    END IF;
    PERFORM loyalty._lock_accounts(ARRAY[r.account_id]);
    SELECT * INTO r FROM loyalty.redemption x WHERE x.id = r.id;
    IF r.state = 'cancelled' THEN
        RETURN r.cancel_transfer_id;
    END IF;
    SELECT string_agg(vo.code, ', ' ORDER BY vo.id) INTO v_used FROM loyalty.voucher vo
    WHERE vo.redemption_id = r.id AND vo.state = 'used';
    IF v_used IS NOT NULL THEN
        RAISE EXCEPTION 'redemption "%" cannot be cancelled', ref
            USING ERRCODE = 'LY044', DETAIL = format('Its voucher %s was already used.', v_used);
    END IF;
    v_transfer := loyalty._reverse_transfer(r.transfer_id, 'redeem_cancel', ref);
    UPDATE loyalty.redemption x SET state = 'cancelled', cancel_transfer_id = v_transfer, cancelled_at = now()
    WHERE x.id = r.id;
    UPDATE loyalty.voucher vo SET state = 'cancelled' WHERE vo.redemption_id = r.id;
    UPDATE loyalty.reward rw SET stock_left = rw.stock_left + r.quantity
    WHERE rw.id = r.reward_id AND rw.stock_left IS NOT NULL;
    RETURN v_transfer;
END $$;
COMMENT ON FUNCTION loyalty.cancel_redemption(text, text) IS 'Cancels a redemption (or the capture of a checkout hold, by its ref): restores exactly the lots it consumed (original expiry), cancels its unused vouchers and returns the stock; idempotent; returns the reversing transfer id';

-- ---- ratings ----

CREATE FUNCTION loyalty.rate_reward(program text, member_ref text, reward text, stars integer,
                                    comment text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = loyalty, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    m record := loyalty._redemption_member(program, member_ref, false);
    v_reward bigint;
BEGIN
    IF stars IS NULL OR stars NOT BETWEEN 1 AND 5 THEN
        RAISE EXCEPTION 'invalid rating %', coalesce(stars::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'A rating is 1 to 5 stars.';
    END IF;
    SELECT rw.id INTO v_reward FROM loyalty.reward rw WHERE rw.program_id = m.program_id AND rw.code = reward;
    IF v_reward IS NULL THEN
        RAISE EXCEPTION 'reward "%" does not exist in program "%"', reward, program
            USING ERRCODE = 'LY030', HINT = 'See loyalty.catalogue for the rewards on offer.';
    END IF;
    IF NOT EXISTS (SELECT FROM loyalty.redemption r
                   WHERE r.member_id = m.member_id AND r.reward_id = v_reward AND r.state = 'done') THEN
        RAISE EXCEPTION 'member "%" has not redeemed reward "%"', member_ref, reward
            USING ERRCODE = 'LY045', DETAIL = 'A member may rate only a reward they redeemed.';
    END IF;
    INSERT INTO loyalty.reward_rating AS rr (reward_id, member_id, stars, comment)
    VALUES (v_reward, m.member_id, stars, comment)
    ON CONFLICT ON CONSTRAINT reward_rating_pkey
    DO UPDATE SET stars = excluded.stars, comment = excluded.comment, rated_at = now();
END $$;
COMMENT ON FUNCTION loyalty.rate_reward(text, text, text, integer, text) IS 'Rates a reward the member redeemed, 1 to 5 stars with an optional comment; rating again replaces the rating';

