-- loyalty.points: a signed 64-bit count of points (src/points.c).
-- Reference: docs/points.md.

CREATE TYPE loyalty.points;

-- I/O

CREATE FUNCTION loyalty.points_in(cstring) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_out(loyalty.points) RETURNS cstring
    AS 'MODULE_PATHNAME', 'points_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_recv(internal) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_send(loyalty.points) RETURNS bytea
    AS 'MODULE_PATHNAME', 'points_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Category N (numeric), not U: with it COALESCE(p, 0), CASE ... ELSE 0 END,
-- GREATEST(p, 0) and UNION with an integer resolve to points, where a
-- user-defined category would make them errors.  Not a preferred type.
CREATE TYPE loyalty.points (
    INPUT = loyalty.points_in,
    OUTPUT = loyalty.points_out,
    RECEIVE = loyalty.points_recv,
    SEND = loyalty.points_send,
    INTERNALLENGTH = 8,
    PASSEDBYVALUE,
    ALIGNMENT = double,
    STORAGE = plain,
    CATEGORY = 'N'
);

COMMENT ON TYPE loyalty.points IS
    'a signed 64-bit count of loyalty points, with overflow-checked arithmetic';
COMMENT ON FUNCTION loyalty.points_in(cstring) IS
    'points text input: optional sign and digits, surrounding spaces allowed';
COMMENT ON FUNCTION loyalty.points_out(loyalty.points) IS
    'points text output: the plain integer';
COMMENT ON FUNCTION loyalty.points_recv(internal) IS
    'points binary input: a big-endian 64-bit integer';
COMMENT ON FUNCTION loyalty.points_send(loyalty.points) IS
    'points binary output: a big-endian 64-bit integer';

-- Arithmetic

CREATE FUNCTION loyalty.points_pl(loyalty.points, loyalty.points) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_pl' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_mi(loyalty.points, loyalty.points) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_mi' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_um(loyalty.points) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_um' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_mul_int4(loyalty.points, integer) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_mul_int4' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_mul_int8(loyalty.points, bigint) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_mul_int8' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.int4_mul_points(integer, loyalty.points) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'int4_mul_points' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.int8_mul_points(bigint, loyalty.points) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'int8_mul_points' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_div_int4(loyalty.points, integer) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_div_int4' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_div_int8(loyalty.points, bigint) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_div_int8' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

COMMENT ON FUNCTION loyalty.points_pl(loyalty.points, loyalty.points) IS
    'points + points, overflow-checked';
COMMENT ON FUNCTION loyalty.points_mi(loyalty.points, loyalty.points) IS
    'points - points, overflow-checked';
COMMENT ON FUNCTION loyalty.points_um(loyalty.points) IS
    'unary minus, overflow-checked';
COMMENT ON FUNCTION loyalty.points_mul_int4(loyalty.points, integer) IS
    'points * integer, overflow-checked';
COMMENT ON FUNCTION loyalty.points_mul_int8(loyalty.points, bigint) IS
    'points * bigint, overflow-checked';
COMMENT ON FUNCTION loyalty.int4_mul_points(integer, loyalty.points) IS
    'integer * points, overflow-checked';
COMMENT ON FUNCTION loyalty.int8_mul_points(bigint, loyalty.points) IS
    'bigint * points, overflow-checked';
COMMENT ON FUNCTION loyalty.points_div_int4(loyalty.points, integer) IS
    'points / integer, truncated toward zero';
COMMENT ON FUNCTION loyalty.points_div_int8(loyalty.points, bigint) IS
    'points / bigint, truncated toward zero';

CREATE OPERATOR loyalty.+ (
    LEFTARG = loyalty.points, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.points_pl,
    COMMUTATOR = OPERATOR(loyalty.+)
);
CREATE OPERATOR loyalty.- (
    LEFTARG = loyalty.points, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.points_mi
);
CREATE OPERATOR loyalty.- (
    RIGHTARG = loyalty.points,
    FUNCTION = loyalty.points_um
);
CREATE OPERATOR loyalty.* (
    LEFTARG = loyalty.points, RIGHTARG = integer,
    FUNCTION = loyalty.points_mul_int4,
    COMMUTATOR = OPERATOR(loyalty.*)
);
CREATE OPERATOR loyalty.* (
    LEFTARG = integer, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.int4_mul_points,
    COMMUTATOR = OPERATOR(loyalty.*)
);
CREATE OPERATOR loyalty.* (
    LEFTARG = loyalty.points, RIGHTARG = bigint,
    FUNCTION = loyalty.points_mul_int8,
    COMMUTATOR = OPERATOR(loyalty.*)
);
CREATE OPERATOR loyalty.* (
    LEFTARG = bigint, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.int8_mul_points,
    COMMUTATOR = OPERATOR(loyalty.*)
);
CREATE OPERATOR loyalty./ (
    LEFTARG = loyalty.points, RIGHTARG = integer,
    FUNCTION = loyalty.points_div_int4
);
CREATE OPERATOR loyalty./ (
    LEFTARG = loyalty.points, RIGHTARG = bigint,
    FUNCTION = loyalty.points_div_int8
);

COMMENT ON OPERATOR loyalty.+ (loyalty.points, loyalty.points) IS 'add';
COMMENT ON OPERATOR loyalty.- (loyalty.points, loyalty.points) IS 'subtract';
COMMENT ON OPERATOR loyalty.- (NONE, loyalty.points) IS 'negate';
COMMENT ON OPERATOR loyalty.* (loyalty.points, integer) IS 'multiply';
COMMENT ON OPERATOR loyalty.* (integer, loyalty.points) IS 'multiply';
COMMENT ON OPERATOR loyalty.* (loyalty.points, bigint) IS 'multiply';
COMMENT ON OPERATOR loyalty.* (bigint, loyalty.points) IS 'multiply';
COMMENT ON OPERATOR loyalty./ (loyalty.points, integer) IS 'divide, truncating toward zero';
COMMENT ON OPERATOR loyalty./ (loyalty.points, bigint) IS 'divide, truncating toward zero';

-- Comparison

CREATE FUNCTION loyalty.points_eq(loyalty.points, loyalty.points) RETURNS boolean
    AS 'MODULE_PATHNAME', 'points_eq' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION loyalty.points_ne(loyalty.points, loyalty.points) RETURNS boolean
    AS 'MODULE_PATHNAME', 'points_ne' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION loyalty.points_lt(loyalty.points, loyalty.points) RETURNS boolean
    AS 'MODULE_PATHNAME', 'points_lt' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION loyalty.points_le(loyalty.points, loyalty.points) RETURNS boolean
    AS 'MODULE_PATHNAME', 'points_le' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION loyalty.points_gt(loyalty.points, loyalty.points) RETURNS boolean
    AS 'MODULE_PATHNAME', 'points_gt' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION loyalty.points_ge(loyalty.points, loyalty.points) RETURNS boolean
    AS 'MODULE_PATHNAME', 'points_ge' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;

COMMENT ON FUNCTION loyalty.points_eq(loyalty.points, loyalty.points) IS 'points = points';
COMMENT ON FUNCTION loyalty.points_ne(loyalty.points, loyalty.points) IS 'points <> points';
COMMENT ON FUNCTION loyalty.points_lt(loyalty.points, loyalty.points) IS 'points < points';
COMMENT ON FUNCTION loyalty.points_le(loyalty.points, loyalty.points) IS 'points <= points';
COMMENT ON FUNCTION loyalty.points_gt(loyalty.points, loyalty.points) IS 'points > points';
COMMENT ON FUNCTION loyalty.points_ge(loyalty.points, loyalty.points) IS 'points >= points';

CREATE OPERATOR loyalty.= (
    LEFTARG = loyalty.points, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.points_eq,
    COMMUTATOR = OPERATOR(loyalty.=), NEGATOR = OPERATOR(loyalty.<>),
    RESTRICT = pg_catalog.eqsel, JOIN = pg_catalog.eqjoinsel,
    HASHES, MERGES
);
CREATE OPERATOR loyalty.<> (
    LEFTARG = loyalty.points, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.points_ne,
    COMMUTATOR = OPERATOR(loyalty.<>), NEGATOR = OPERATOR(loyalty.=),
    RESTRICT = pg_catalog.neqsel, JOIN = pg_catalog.neqjoinsel
);
CREATE OPERATOR loyalty.< (
    LEFTARG = loyalty.points, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.points_lt,
    COMMUTATOR = OPERATOR(loyalty.>), NEGATOR = OPERATOR(loyalty.>=),
    RESTRICT = pg_catalog.scalarltsel, JOIN = pg_catalog.scalarltjoinsel
);
CREATE OPERATOR loyalty.<= (
    LEFTARG = loyalty.points, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.points_le,
    COMMUTATOR = OPERATOR(loyalty.>=), NEGATOR = OPERATOR(loyalty.>),
    RESTRICT = pg_catalog.scalarlesel, JOIN = pg_catalog.scalarlejoinsel
);
CREATE OPERATOR loyalty.> (
    LEFTARG = loyalty.points, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.points_gt,
    COMMUTATOR = OPERATOR(loyalty.<), NEGATOR = OPERATOR(loyalty.<=),
    RESTRICT = pg_catalog.scalargtsel, JOIN = pg_catalog.scalargtjoinsel
);
CREATE OPERATOR loyalty.>= (
    LEFTARG = loyalty.points, RIGHTARG = loyalty.points,
    FUNCTION = loyalty.points_ge,
    COMMUTATOR = OPERATOR(loyalty.<=), NEGATOR = OPERATOR(loyalty.<),
    RESTRICT = pg_catalog.scalargesel, JOIN = pg_catalog.scalargejoinsel
);

COMMENT ON OPERATOR loyalty.= (loyalty.points, loyalty.points) IS 'equal';
COMMENT ON OPERATOR loyalty.<> (loyalty.points, loyalty.points) IS 'not equal';
COMMENT ON OPERATOR loyalty.< (loyalty.points, loyalty.points) IS 'less than';
COMMENT ON OPERATOR loyalty.<= (loyalty.points, loyalty.points) IS 'less than or equal';
COMMENT ON OPERATOR loyalty.> (loyalty.points, loyalty.points) IS 'greater than';
COMMENT ON OPERATOR loyalty.>= (loyalty.points, loyalty.points) IS 'greater than or equal';

-- Index support: btree (ordering, merge joins, min/max by index) and hash
-- (hash joins, hash aggregation), both the default for the type.

CREATE FUNCTION loyalty.points_cmp(loyalty.points, loyalty.points) RETURNS integer
    AS 'MODULE_PATHNAME', 'points_cmp' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION loyalty.points_sortsupport(internal) RETURNS void
    AS 'MODULE_PATHNAME', 'points_sortsupport' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_hash(loyalty.points) RETURNS integer
    AS 'MODULE_PATHNAME', 'points_hash' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION loyalty.points_hash_extended(loyalty.points, bigint) RETURNS bigint
    AS 'MODULE_PATHNAME', 'points_hash_extended' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;

COMMENT ON FUNCTION loyalty.points_cmp(loyalty.points, loyalty.points) IS
    'btree comparison: -1, 0 or 1';
COMMENT ON FUNCTION loyalty.points_sortsupport(internal) IS
    'btree sort support';
COMMENT ON FUNCTION loyalty.points_hash(loyalty.points) IS
    'hash, the same as hashint8 of the bigint value';
COMMENT ON FUNCTION loyalty.points_hash_extended(loyalty.points, bigint) IS
    'seeded 64-bit hash, the same as hashint8extended of the bigint value';

-- btequalimage: equal points are bitwise equal, so btree indexes may
-- deduplicate.
CREATE OPERATOR CLASS loyalty.points_ops
    DEFAULT FOR TYPE loyalty.points USING btree AS
        OPERATOR 1 loyalty.<,
        OPERATOR 2 loyalty.<=,
        OPERATOR 3 loyalty.=,
        OPERATOR 4 loyalty.>=,
        OPERATOR 5 loyalty.>,
        FUNCTION 1 loyalty.points_cmp(loyalty.points, loyalty.points),
        FUNCTION 2 loyalty.points_sortsupport(internal),
        FUNCTION 4 pg_catalog.btequalimage(oid);

CREATE OPERATOR CLASS loyalty.points_ops
    DEFAULT FOR TYPE loyalty.points USING hash AS
        OPERATOR 1 loyalty.=,
        FUNCTION 1 loyalty.points_hash(loyalty.points),
        FUNCTION 2 loyalty.points_hash_extended(loyalty.points, bigint);

COMMENT ON OPERATOR CLASS loyalty.points_ops USING btree IS
    'default btree operator class for points';
COMMENT ON OPERATOR CLASS loyalty.points_ops USING hash IS
    'default hash operator class for points';
COMMENT ON OPERATOR FAMILY loyalty.points_ops USING btree IS
    'btree operator family for points';
COMMENT ON OPERATOR FAMILY loyalty.points_ops USING hash IS
    'hash operator family for points';

-- Aggregates

CREATE FUNCTION loyalty.points_smaller(loyalty.points, loyalty.points) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_smaller' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.points_larger(loyalty.points, loyalty.points) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'points_larger' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

COMMENT ON FUNCTION loyalty.points_smaller(loyalty.points, loyalty.points) IS
    'the smaller of two points values';
COMMENT ON FUNCTION loyalty.points_larger(loyalty.points, loyalty.points) IS
    'the larger of two points values';

-- A strict transition function with no initial value: NULLs are skipped,
-- the first value starts the state, and the sum of no rows is NULL, as for
-- the built-in sum.
CREATE AGGREGATE loyalty.sum(loyalty.points) (
    SFUNC = loyalty.points_pl,
    STYPE = loyalty.points,
    COMBINEFUNC = loyalty.points_pl,
    PARALLEL = SAFE
);
CREATE AGGREGATE loyalty.min(loyalty.points) (
    SFUNC = loyalty.points_smaller,
    STYPE = loyalty.points,
    COMBINEFUNC = loyalty.points_smaller,
    SORTOP = OPERATOR(loyalty.<),
    PARALLEL = SAFE
);
CREATE AGGREGATE loyalty.max(loyalty.points) (
    SFUNC = loyalty.points_larger,
    STYPE = loyalty.points,
    COMBINEFUNC = loyalty.points_larger,
    SORTOP = OPERATOR(loyalty.>),
    PARALLEL = SAFE
);

COMMENT ON AGGREGATE loyalty.sum(loyalty.points) IS
    'sum of points, overflow-checked; NULL for no rows';
COMMENT ON AGGREGATE loyalty.min(loyalty.points) IS
    'smallest points value';
COMMENT ON AGGREGATE loyalty.max(loyalty.points) IS
    'largest points value';

-- Casts.  integer and bigint convert implicitly, so a function taking points
-- accepts 100; the other directions and numeric are explicit.  bigint and
-- points share their representation, so those two casts need no function.

CREATE FUNCTION loyalty.int4_to_points(integer) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'int4_to_points' LANGUAGE C IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION loyalty.points_to_numeric(loyalty.points) RETURNS numeric
    AS 'MODULE_PATHNAME', 'points_to_numeric' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION loyalty.numeric_to_points(numeric) RETURNS loyalty.points
    AS 'MODULE_PATHNAME', 'numeric_to_points' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

COMMENT ON FUNCTION loyalty.int4_to_points(integer) IS
    'cast integer to points';
COMMENT ON FUNCTION loyalty.points_to_numeric(loyalty.points) IS
    'cast points to numeric';
COMMENT ON FUNCTION loyalty.numeric_to_points(numeric) IS
    'cast numeric to points, exactly: a fraction, NaN or infinity is an error, never rounded';

CREATE CAST (integer AS loyalty.points)
    WITH FUNCTION loyalty.int4_to_points(integer) AS IMPLICIT;
CREATE CAST (bigint AS loyalty.points)
    WITHOUT FUNCTION AS IMPLICIT;
CREATE CAST (loyalty.points AS bigint)
    WITHOUT FUNCTION;
CREATE CAST (loyalty.points AS numeric)
    WITH FUNCTION loyalty.points_to_numeric(loyalty.points);
CREATE CAST (numeric AS loyalty.points)
    WITH FUNCTION loyalty.numeric_to_points(numeric);

COMMENT ON CAST (integer AS loyalty.points) IS 'implicit';
COMMENT ON CAST (bigint AS loyalty.points) IS 'implicit, binary';
COMMENT ON CAST (loyalty.points AS bigint) IS 'explicit, binary';
COMMENT ON CAST (loyalty.points AS numeric) IS 'explicit';
COMMENT ON CAST (numeric AS loyalty.points) IS
    'explicit and exact: a fraction, NaN or infinity is an error, never rounded';
