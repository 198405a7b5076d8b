-- loyalty.points: literals, text and binary I/O, arithmetic, comparison,
-- indexing, sorting, grouping, hashing, aggregates, casts and operator
-- resolution.  Errors are pinned with pgTAP's throws_ok (SQLSTATE and
-- message), one case per line; values by plain SELECTs.

-- quiet "already exists, skipping" when another test created them first
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS loyalty;
CREATE EXTENSION IF NOT EXISTS pgtap;
RESET client_min_messages;
SET search_path = loyalty, public;
\pset null '(null)'

-- show a value with its type: '5 :: points'
CREATE FUNCTION pg_temp.t(v anyelement) RETURNS text
    LANGUAGE sql AS $$ SELECT v::text || ' :: ' || pg_typeof(v)::text $$;

SELECT plan(82);

--
-- Text input: accepted literals
--
SELECT to_json(lit) AS literal, lit::points AS points
FROM (VALUES ('0'), ('-0'), ('+0'), ('7'), ('+7'), ('-7'), ('007'), ('-007'),
             ('  42'), ('42  '),
             (chr(9) || chr(10) || chr(11) || chr(12) || chr(13) || ' 42 ' || chr(9)),
             ('9223372036854775807'), ('+9223372036854775807'),
             ('-9223372036854775808'), ('000009223372036854775807'),
             ('-000009223372036854775808')) AS v(lit);

-- Text output is the plain integer, and every bigint round-trips
SELECT count(*) AS values_checked,
       bool_and(b::points::text = b::text) AS output_like_bigint,
       bool_and(b::text::points::bigint = b) AS input_round_trips
FROM (SELECT i * 4611686018427387 AS b FROM generate_series(-2000, 2000) AS i
      UNION ALL VALUES (-9223372036854775808), (9223372036854775807),
                       (-9223372036854775807), (9223372036854775806),
                       (999999999999999999), (-1000000000000000000)) AS v;

--
-- Text input: malformed literals are 22P02
--
\t on
SELECT throws_ok($$SELECT ''::points$$, '22P02', 'invalid input syntax for type points: ""');
SELECT throws_ok($$SELECT ' '::points$$, '22P02', 'invalid input syntax for type points: " "');
SELECT throws_ok($$SELECT '   '::points$$, '22P02', 'invalid input syntax for type points: "   "');
SELECT throws_ok($$SELECT '+'::points$$, '22P02', 'invalid input syntax for type points: "+"');
SELECT throws_ok($$SELECT '-'::points$$, '22P02', 'invalid input syntax for type points: "-"');
SELECT throws_ok($$SELECT ' - '::points$$, '22P02', 'invalid input syntax for type points: " - "');
SELECT throws_ok($$SELECT '- 1'::points$$, '22P02', 'invalid input syntax for type points: "- 1"');
SELECT throws_ok($$SELECT '+-1'::points$$, '22P02', 'invalid input syntax for type points: "+-1"');
SELECT throws_ok($$SELECT '--1'::points$$, '22P02', 'invalid input syntax for type points: "--1"');
SELECT throws_ok($$SELECT '++1'::points$$, '22P02', 'invalid input syntax for type points: "++1"');
SELECT throws_ok($$SELECT '1-'::points$$, '22P02', 'invalid input syntax for type points: "1-"');
SELECT throws_ok($$SELECT '1.0'::points$$, '22P02', 'invalid input syntax for type points: "1.0"');
SELECT throws_ok($$SELECT '1.'::points$$, '22P02', 'invalid input syntax for type points: "1."');
SELECT throws_ok($$SELECT '.5'::points$$, '22P02', 'invalid input syntax for type points: ".5"');
SELECT throws_ok($$SELECT '1e3'::points$$, '22P02', 'invalid input syntax for type points: "1e3"');
SELECT throws_ok($$SELECT '1E3'::points$$, '22P02', 'invalid input syntax for type points: "1E3"');
SELECT throws_ok($$SELECT '0x10'::points$$, '22P02', 'invalid input syntax for type points: "0x10"');
SELECT throws_ok($$SELECT '0o17'::points$$, '22P02', 'invalid input syntax for type points: "0o17"');
SELECT throws_ok($$SELECT '0b11'::points$$, '22P02', 'invalid input syntax for type points: "0b11"');
SELECT throws_ok($$SELECT '12 3'::points$$, '22P02', 'invalid input syntax for type points: "12 3"');
SELECT throws_ok($$SELECT '1_000'::points$$, '22P02', 'invalid input syntax for type points: "1_000"');
SELECT throws_ok($$SELECT '1,000'::points$$, '22P02', 'invalid input syntax for type points: "1,000"');
SELECT throws_ok($$SELECT '１２'::points$$, '22P02', 'invalid input syntax for type points: "１２"');
SELECT throws_ok($$SELECT 'abc'::points$$, '22P02', 'invalid input syntax for type points: "abc"');
SELECT throws_ok($$SELECT '12abc'::points$$, '22P02', 'invalid input syntax for type points: "12abc"');
SELECT throws_ok($$SELECT 'NaN'::points$$, '22P02', 'invalid input syntax for type points: "NaN"');
SELECT throws_ok($$SELECT 'Infinity'::points$$, '22P02', 'invalid input syntax for type points: "Infinity"');
-- a literal that is malformed is reported so even when its digits overflow
SELECT throws_ok($$SELECT '99999999999999999999x'::points$$, '22P02', 'invalid input syntax for type points: "99999999999999999999x"');

--
-- Text input: well-formed but out of range is 22003
--
SELECT throws_ok($$SELECT '9223372036854775808'::points$$, '22003', 'value "9223372036854775808" is out of range for type points');
SELECT throws_ok($$SELECT '+9223372036854775808'::points$$, '22003', 'value "+9223372036854775808" is out of range for type points');
SELECT throws_ok($$SELECT '-9223372036854775809'::points$$, '22003', 'value "-9223372036854775809" is out of range for type points');
SELECT throws_ok($$SELECT '18446744073709551616'::points$$, '22003', 'value "18446744073709551616" is out of range for type points');
SELECT throws_ok($$SELECT '-99999999999999999999999999999'::points$$, '22003', 'value "-99999999999999999999999999999" is out of range for type points');
SELECT throws_ok($$SELECT ' 9223372036854775808 '::points$$, '22003', 'value " 9223372036854775808 " is out of range for type points');
\t off

--
-- Binary I/O: the same bytes as bigint, and COPY BINARY round-trips
--
SELECT p, points_send(p), points_send(p) = int8send(p::bigint) AS same_as_bigint
FROM (VALUES ('-9223372036854775808'::points), (-1), (0), (1), (256),
             ('9223372036854775807')) AS v(p);

CREATE TEMP TABLE bin_src (p points);
CREATE TEMP TABLE bin_dst (p points);
INSERT INTO bin_src VALUES ('-9223372036854775808'), (-1), (0), (NULL), (1),
                           ('9223372036854775807');
-- write a query's result with COPY BINARY, then read it into a table
CREATE FUNCTION pg_temp.copy_binary(query text, target text) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    f text := current_setting('data_directory') || '/points_test.bin';
BEGIN
    EXECUTE format('COPY (%s) TO %L (FORMAT binary)', query, f);
    EXECUTE format('COPY %s FROM %L (FORMAT binary)', target, f);
END $$;
SELECT pg_temp.copy_binary('SELECT p FROM bin_src', 'bin_dst');
SELECT * FROM bin_dst;
-- the received field must be exactly 8 bytes
\t on
SELECT lives_ok($$SELECT pg_temp.copy_binary($q$SELECT '\x0000000000000005'::bytea$q$, 'bin_dst')$$, 'recv: 8 bytes are a points value');
SELECT throws_ok($$SELECT pg_temp.copy_binary($q$SELECT '\x00000005'::bytea$q$, 'bin_dst')$$, '08P01', 'insufficient data left in message');
SELECT throws_ok($$SELECT pg_temp.copy_binary($q$SELECT '\x000000000000000005'::bytea$q$, 'bin_dst')$$, '22P03', 'incorrect binary data format');
\t off

--
-- Arithmetic
--
\x on
SELECT pg_temp.t(2::points + 3) AS "2::points + 3",
       pg_temp.t(3 + 2::points) AS "3 + 2::points",
       pg_temp.t(2::points - 3) AS "2::points - 3",
       pg_temp.t(2::points - 3::bigint) AS "2::points - 3::bigint",
       pg_temp.t(-(2::points)) AS "-(2::points)",
       pg_temp.t(2::points * 3) AS "2::points * 3",
       pg_temp.t(3 * 2::points) AS "3 * 2::points",
       pg_temp.t(2::points * 3::bigint) AS "2::points * 3::bigint",
       pg_temp.t(3::bigint * 2::points) AS "3::bigint * 2::points",
       pg_temp.t(2::points * -3) AS "2::points * -3",
       pg_temp.t(7::points / 2) AS "7::points / 2",
       pg_temp.t((-7)::points / 2) AS "(-7)::points / 2",
       pg_temp.t(7::points / -2) AS "7::points / -2",
       pg_temp.t(7::points / 2::bigint) AS "7::points / 2::bigint",
       pg_temp.t('9223372036854775807'::points + '-9223372036854775808') AS "max + min",
       pg_temp.t(-('9223372036854775807'::points)) AS "-max",
       pg_temp.t('-9223372036854775807'::points - 1) AS "(min + 1) - 1",
       pg_temp.t('-9223372036854775808'::points * 1) AS "min * 1",
       pg_temp.t('-9223372036854775808'::points / 1) AS "min / 1",
       pg_temp.t('-9223372036854775808'::points / 2) AS "min / 2",
       pg_temp.t('-9223372036854775807'::points / -1) AS "(min + 1) / -1",
       pg_temp.t('4611686018427387904'::points * -2) AS "2^62 * -2";
\x off

-- overflow is 22003, division by zero 22012
\t on
SELECT throws_ok($$SELECT '9223372036854775807'::points + 1$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT 1 + '9223372036854775807'::points$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '-9223372036854775808'::points - 1$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '-9223372036854775808'::points + -1$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '9223372036854775807'::points - '-1'$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '9223372036854775807'::points - '-9223372036854775808'$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT -('-9223372036854775808'::points)$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '4611686018427387904'::points * 2$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT 2 * '4611686018427387904'::points$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '4611686018427387904'::points * 2::bigint$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT 2::bigint * '4611686018427387904'::points$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '-9223372036854775808'::points * -1$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '-9223372036854775808'::points * -1::bigint$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '-9223372036854775808'::points / -1$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT '-9223372036854775808'::points / -1::bigint$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT 7::points / 0$$, '22012', 'division by zero');
SELECT throws_ok($$SELECT 7::points / 0::bigint$$, '22012', 'division by zero');
SELECT throws_ok($$SELECT 0::points / 0$$, '22012', 'division by zero');
SELECT throws_ok($$SELECT '-9223372036854775808'::points / 0$$, '22012', 'division by zero');
\t off

--
-- Comparison
--
SELECT a, b, a = b AS eq, a <> b AS ne, a < b AS lt, a <= b AS le,
       a > b AS gt, a >= b AS ge, points_cmp(a, b) AS cmp
FROM (VALUES ('-9223372036854775808'::points, '9223372036854775807'::points),
             ('9223372036854775807', '-9223372036854775808'),
             (5, 5), (-1, 1), (1, -1), (0, '-0'), (NULL, 1)) AS v(a, b);

-- one table for sorting, indexing, joins, grouping and aggregates: 10,000
-- rows of 1,009 distinct multiples of 9e12 (9 or 10 rows each), the
-- extremes, and a NULL
CREATE TEMP TABLE pts (i int, p points);
INSERT INTO pts
SELECT i, ((i * 7919) % 1009 - 504) * 9000000000000000 / 1000
FROM generate_series(1, 10000) AS i;
INSERT INTO pts VALUES (10001, '-9223372036854775808'), (10002, '9223372036854775807'),
                       (10003, NULL);
ANALYZE pts;

SELECT p FROM pts WHERE i % 1000 = 0 OR i > 10000 ORDER BY p;
SELECT p FROM pts WHERE i % 1000 = 0 OR i > 10000 ORDER BY p DESC NULLS LAST;
-- an in-memory sort by points agrees with one by bigint
SELECT array_agg(p::bigint ORDER BY p) = array_agg(p::bigint ORDER BY p::bigint)
    AS sorts_like_bigint
FROM pts;

-- the opclasses, and btequalimage: btree indexes on points deduplicate
SELECT opc.opcname, am.amname, opc.opcdefault,
       array_agg(pr.amprocnum || ': ' || pr.amproc::regprocedure::text ORDER BY pr.amprocnum)
           AS support
FROM pg_opclass opc
JOIN pg_am am ON am.oid = opc.opcmethod
JOIN pg_amproc pr ON pr.amprocfamily = opc.opcfamily
WHERE opc.opcintype = 'loyalty.points'::regtype
GROUP BY 1, 2, 3 ORDER BY 2;

-- joins: merge join, hash join, same answer
SET enable_hashjoin = off;
SET enable_nestloop = off;
EXPLAIN (COSTS OFF) SELECT count(*) FROM pts a JOIN pts b ON a.p = b.p;
SELECT count(*) FROM pts a JOIN pts b ON a.p = b.p;
RESET enable_hashjoin;
SET enable_mergejoin = off;
EXPLAIN (COSTS OFF) SELECT count(*) FROM pts a JOIN pts b ON a.p = b.p;
SELECT count(*) FROM pts a JOIN pts b ON a.p = b.p;
RESET enable_mergejoin;
RESET enable_nestloop;

-- grouping and DISTINCT: by hashing, by sorting, same answer
SET enable_sort = off;
EXPLAIN (COSTS OFF) SELECT p, count(*) FROM pts GROUP BY p;
EXPLAIN (COSTS OFF) SELECT DISTINCT p FROM pts;
SELECT count(*) AS groups, sum(n) AS rows FROM (SELECT p, count(*) AS n FROM pts GROUP BY p) AS g;
SELECT count(*) FROM (SELECT DISTINCT p FROM pts) AS d;
RESET enable_sort;
SET enable_hashagg = off;
EXPLAIN (COSTS OFF) SELECT p, count(*) FROM pts GROUP BY p;
EXPLAIN (COSTS OFF) SELECT DISTINCT p FROM pts;
SELECT count(*) AS groups, sum(n) AS rows FROM (SELECT p, count(*) AS n FROM pts GROUP BY p) AS g;
SELECT count(*) FROM (SELECT DISTINCT p FROM pts) AS d;
RESET enable_hashagg;
SELECT count(DISTINCT p) FROM pts;

-- hashing: the same hashes as bigint
SELECT bool_and(points_hash(p) = hashint8(p::bigint)) AS hash_like_bigint,
       bool_and(points_hash_extended(p, 0) = hashint8extended(p::bigint, 0)
                AND points_hash_extended(p, 42) = hashint8extended(p::bigint, 42))
           AS extended_hash_like_bigint,
       count(DISTINCT points_hash_extended(p, 42)) AS distinct_hashes
FROM pts WHERE p IS NOT NULL;

-- btree: equality, range, ORDER BY, min/max by index, uniqueness
CREATE INDEX pts_p ON pts (p);
SET enable_seqscan = off;
SET enable_bitmapscan = off;
EXPLAIN (COSTS OFF) SELECT i FROM pts WHERE p = 1000;
EXPLAIN (COSTS OFF) SELECT i FROM pts WHERE p > 0 AND p <= 9000000000000;
EXPLAIN (COSTS OFF) SELECT p FROM pts ORDER BY p LIMIT 3;
EXPLAIN (COSTS OFF) SELECT min(p), max(p) FROM pts;
SELECT count(*) FROM pts WHERE p = '-9000000000000';
SELECT count(*) FROM pts WHERE p > 0 AND p <= 9000000000000;
SELECT p FROM pts ORDER BY p LIMIT 3;
SELECT min(p), max(p) FROM pts;
RESET enable_seqscan;
RESET enable_bitmapscan;

CREATE TEMP TABLE uniq (p points PRIMARY KEY);
INSERT INTO uniq VALUES (1), (2::bigint), ('3');
\t on
SELECT throws_ok($$INSERT INTO uniq VALUES (1::bigint)$$, '23505', 'duplicate key value violates unique constraint "uniq_pkey"');
\t off

-- hash index
DROP INDEX pts_p;
CREATE INDEX pts_p_hash ON pts USING hash (p);
SET enable_seqscan = off;
SET enable_bitmapscan = off;
EXPLAIN (COSTS OFF) SELECT i FROM pts WHERE p = 1000;
SELECT count(*) FROM pts WHERE p = '-9000000000000';
RESET enable_seqscan;
RESET enable_bitmapscan;

--
-- Aggregates
--
SELECT pg_temp.t(sum(p)) AS sum, pg_temp.t(min(p)) AS min, pg_temp.t(max(p)) AS max
FROM pts WHERE i <= 10000;
SELECT sum(p)::numeric = sum(p::bigint) AND min(p) = min(p::bigint)
       AND max(p) = max(p::bigint) AS like_bigint
FROM pts WHERE i <= 10000;
-- NULLs are skipped; no rows, or only NULLs, give NULL
SELECT sum(p), min(p), max(p) FROM (VALUES (1::points), (NULL), (-3)) AS v(p);
SELECT sum(p), min(p), max(p) FROM (VALUES (NULL::points), (NULL)) AS v(p);
SELECT sum(p), min(p), max(p) FROM pts WHERE false;
SELECT i % 3 AS k, sum(p), min(p), max(p) FROM pts WHERE i <= 10 GROUP BY 1 ORDER BY 1;
\t on
SELECT throws_ok($$SELECT sum(p) FROM (VALUES ('9223372036854775807'::points), (1)) AS v(p)$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT sum(p) FROM pts WHERE p >= 0$$, '22003', 'points out of range');
-- every step is checked, so a sum that only overflows on the way is an error
SELECT throws_ok($$SELECT sum(p) FROM (VALUES ('9223372036854775807'::points), (1), (-1)) AS v(p)$$, '22003', 'points out of range');
\t off

-- in parallel: partial aggregates combined (a temporary table is never
-- scanned in parallel, hence a plain one)
CREATE TABLE points_parallel AS SELECT * FROM pts WHERE i <= 10000;
ANALYZE points_parallel;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
EXPLAIN (COSTS OFF) SELECT sum(p), min(p), max(p) FROM points_parallel;
SELECT sum(p), min(p), max(p) FROM points_parallel;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;
DROP TABLE points_parallel;

SELECT a.aggfnoid::regprocedure AS aggregate, a.aggtransfn, a.aggcombinefn,
       a.aggtranstype::regtype, a.agginitval, a.aggsortop::regoperator,
       p.proparallel
FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid
WHERE p.proargtypes[0] = 'loyalty.points'::regtype
ORDER BY 1::text;

--
-- Casts
--
SELECT castsource::regtype, casttarget::regtype, castfunc::regprocedure,
       castcontext, castmethod
FROM pg_cast
WHERE 'loyalty.points'::regtype IN (castsource, casttarget)
ORDER BY 1::text, 2::text;

-- integer and bigint convert implicitly: a function taking points takes 100
CREATE FUNCTION pg_temp.twice(p points) RETURNS points
    LANGUAGE sql AS $$ SELECT p * 2 $$;
SELECT pg_temp.twice(100) AS int4, pg_temp.twice(100::bigint) AS int8,
       pg_temp.twice('100') AS literal, pg_temp.twice(-2147483648) AS int4_min,
       pg_temp.twice(4611686018427387903) AS int8_big;
INSERT INTO uniq VALUES (4), (5::bigint), ('6');
SELECT p FROM uniq ORDER BY p;
\t on
SELECT throws_ok($$SELECT pg_temp.twice(100.0)$$, '42883', 'function pg_temp.twice(numeric) does not exist');
SELECT throws_ok($$SELECT pg_temp.twice(100::smallint)$$, '42883', 'function pg_temp.twice(smallint) does not exist');
SELECT throws_ok($$INSERT INTO uniq VALUES (7.0)$$, '42804', 'column "p" is of type points but expression is of type numeric');
SELECT throws_ok($$INSERT INTO uniq VALUES (7.5)$$, '42804', 'column "p" is of type points but expression is of type numeric');
\t off

-- explicit casts out: to bigint, numeric, text
SELECT pg_temp.t(p::bigint) AS "::bigint", pg_temp.t(p::numeric) AS "::numeric",
       pg_temp.t(p::text) AS "::text"
FROM (VALUES ('-9223372036854775808'::points), (0), ('9223372036854775807')) AS v(p);
\t on
SELECT throws_ok($$SELECT 5::points::integer$$, '42846', 'cannot cast type points to integer');
\t off

-- numeric -> points is exact: a zero fraction is fine, anything else is not
SELECT n, n::points
FROM (VALUES (12.000), (-0.0), (0), (1e18), (-12.0),
             (9223372036854775807.000), (-9223372036854775808)) AS v(n);
\t on
SELECT throws_ok($$SELECT 12.5::points$$, '22P02', 'points must be a whole number: "12.5"');
SELECT throws_ok($$SELECT 12.50::numeric::points$$, '22P02', 'points must be a whole number: "12.50"');
SELECT throws_ok($$SELECT (-0.5)::points$$, '22P02', 'points must be a whole number: "-0.5"');
SELECT throws_ok($$SELECT 0.000001::points$$, '22P02', 'points must be a whole number: "0.000001"');
SELECT throws_ok($$SELECT 9223372036854775807.5::points$$, '22P02', 'points must be a whole number: "9223372036854775807.5"');
SELECT throws_ok($$SELECT 'NaN'::numeric::points$$, '22P02', 'points must be a whole number: "NaN"');
SELECT throws_ok($$SELECT 'Infinity'::numeric::points$$, '22P02', 'points must be a whole number: "Infinity"');
SELECT throws_ok($$SELECT '-Infinity'::numeric::points$$, '22P02', 'points must be a whole number: "-Infinity"');
SELECT throws_ok($$SELECT 9223372036854775808::points$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT (-9223372036854775809)::points$$, '22003', 'points out of range');
SELECT throws_ok($$SELECT 1e30::points$$, '22003', 'points out of range');
\t off

--
-- Operator resolution: the implicit casts change nothing for ordinary
-- integer expressions, and points with an integer resolve to points
-- operators
--
SELECT pg_temp.t(1 + 2) AS "1 + 2", pg_temp.t(2::bigint * 3) AS "2::bigint * 3",
       pg_temp.t(7 / 2) AS "7 / 2", pg_temp.t(5 = 5::bigint) AS "5 = 5::bigint",
       pg_temp.t(1 - 2::bigint) AS "1 - 2::bigint",
       pg_temp.t(-(3)) AS "-(3)", pg_temp.t(7::bigint / 2) AS "7::bigint / 2",
       pg_temp.t(1 < 2::bigint) AS "1 < 2::bigint",
       pg_temp.t(1 + 1.5) AS "1 + 1.5";
SELECT pg_temp.t(sum(i)) AS "sum(int)", pg_temp.t(max(i::bigint)) AS "max(bigint)",
       pg_temp.t(min(i)) AS "min(int)"
FROM pts;

-- the operators and functions a view depends on: none of ours for integer
-- expressions; points ones for points expressions
CREATE TEMP TABLE mixed (i int, b bigint, p points);
CREATE TEMP VIEW ordinary AS
    SELECT i + i AS a, b * i AS b, i / i AS c, i = b AS d, b - i AS e,
           -i AS f, i < b AS g, (SELECT sum(m.i) FROM mixed m) AS h,
           (SELECT max(m.b) FROM mixed m) AS k
    FROM mixed;
CREATE TEMP VIEW with_points AS
    SELECT p + 1 AS a, p > 0 AS b, p * 2 AS c, 2 * p AS d, p - b AS e,
           p / 2 AS f, p = i AS g, p * b AS h, (SELECT sum(m.p) FROM mixed m) AS k
    FROM mixed;
SELECT v.ev_class::regclass AS view,
       pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid) AS uses
FROM pg_depend d JOIN pg_rewrite v ON v.oid = d.objid
WHERE d.classid = 'pg_rewrite'::regclass
  AND v.ev_class IN ('ordinary'::regclass, 'with_points'::regclass)
  AND d.refclassid IN ('pg_operator'::regclass, 'pg_proc'::regclass)
ORDER BY 1::text, 2;

-- COALESCE, CASE, GREATEST and UNION of points and an integer give points
SELECT pg_temp.t(COALESCE(NULL::points, 0)) AS "coalesce",
       pg_temp.t(CASE WHEN true THEN 1::points ELSE 0 END) AS "case",
       pg_temp.t(GREATEST(-5::points, 0)) AS "greatest",
       pg_temp.t(LEAST(-5::points, 0::bigint)) AS "least";
SELECT pg_temp.t(x) FROM (SELECT 1 UNION ALL SELECT 2::points) AS u(x);

-- points times points, or with numeric, is not defined
\t on
SELECT throws_ok($$SELECT 2::points * 3::points$$, '42883', 'operator does not exist: points * points');
SELECT throws_ok($$SELECT 2::points * 1.5$$, '42883', 'operator does not exist: points * numeric');
SELECT throws_ok($$SELECT 2::points + 1.5$$, '42883', 'operator does not exist: points + numeric');
SELECT throws_ok($$SELECT 2::points / 3::points$$, '42883', 'operator does not exist: points / points');
SELECT throws_ok($$SELECT 2::points + 1::smallint$$, '42883', 'operator does not exist: points + smallint');
\t off

-- operators live in schema loyalty: outside the search path they need
-- OPERATOR(loyalty.+); casts and the schema-qualified aggregates work anyway
SET search_path = public;
SELECT pg_temp.t(1::loyalty.points OPERATOR(loyalty.+) 1) AS "OPERATOR(loyalty.+)",
       pg_temp.t(loyalty.sum(p)) AS "loyalty.sum",
       pg_temp.t(100::bigint::loyalty.points) AS "cast"
FROM (VALUES (1::loyalty.points), (2)) AS v(p);
\t on
SELECT throws_ok($$SELECT 1::loyalty.points + 1$$, '42883', 'operator does not exist: loyalty.points + integer');
\t off
SET search_path = loyalty, public;

--
-- Every object of the type has a comment (\dT+, \df+, \do+ show them)
--
SELECT d.classid::regclass AS catalog, pg_describe_object(d.classid, d.objid, 0) AS object
FROM (SELECT 'pg_type'::regclass AS classid, 'loyalty.points'::regtype::oid AS objid
      UNION ALL
      SELECT 'pg_proc'::regclass, p.oid FROM pg_proc p
      WHERE p.pronamespace = 'loyalty'::regnamespace
        AND (p.proname ~ '^points_|_points$'
             OR (p.prokind = 'a' AND p.proargtypes[0] = 'loyalty.points'::regtype))
      UNION ALL
      SELECT 'pg_operator'::regclass, o.oid FROM pg_operator o
      WHERE 'loyalty.points'::regtype IN (o.oprleft, o.oprright)
      UNION ALL
      SELECT 'pg_cast'::regclass, c.oid FROM pg_cast c
      WHERE 'loyalty.points'::regtype IN (c.castsource, c.casttarget)
      UNION ALL
      SELECT 'pg_opclass'::regclass, opc.oid FROM pg_opclass opc
      WHERE opc.opcintype = 'loyalty.points'::regtype
      UNION ALL
      SELECT 'pg_opfamily'::regclass, opc.opcfamily FROM pg_opclass opc
      WHERE opc.opcintype = 'loyalty.points'::regtype) AS d
WHERE NOT EXISTS (SELECT 1 FROM pg_description ds
                  WHERE ds.classoid = d.classid AND ds.objoid = d.objid
                    AND ds.objsubid = 0);
SELECT count(*) AS commented_functions FROM pg_proc p
WHERE p.pronamespace = 'loyalty'::regnamespace
  AND (p.proname ~ '^points_|_points$' AND p.proname NOT IN ('transfer_points', 'expiring_points')   -- the API's, not the type's
       OR (p.prokind = 'a' AND p.proargtypes[0] = 'loyalty.points'::regtype))
  AND obj_description(p.oid, 'pg_proc') IS NOT NULL;

SELECT * FROM finish();
