/*-------------------------------------------------------------------------
 *
 * points.c
 *	  The loyalty.points base type: a signed 64-bit count of points.
 *
 * Text and binary I/O, overflow-checked arithmetic, comparison, btree and
 * hash support, the aggregates' transition functions and the casts.  The
 * SQL objects are declared in sql/10_points.sql; docs/points.md is the
 * reference.
 *
 * Every arithmetic error is an ereport with a SQLSTATE: 22003 when a
 * result does not fit in 64 bits, 22012 on division by zero.
 *
 * src/points.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "common/int.h"
#include "fmgr.h"
#include "libpq/pqformat.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/numeric.h"
#include "utils/sortsupport.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_in);
PG_FUNCTION_INFO_V1(points_out);
PG_FUNCTION_INFO_V1(points_recv);
PG_FUNCTION_INFO_V1(points_send);
PG_FUNCTION_INFO_V1(points_pl);
PG_FUNCTION_INFO_V1(points_mi);
PG_FUNCTION_INFO_V1(points_um);
PG_FUNCTION_INFO_V1(points_mul_int4);
PG_FUNCTION_INFO_V1(points_mul_int8);
PG_FUNCTION_INFO_V1(int4_mul_points);
PG_FUNCTION_INFO_V1(int8_mul_points);
PG_FUNCTION_INFO_V1(points_div_int4);
PG_FUNCTION_INFO_V1(points_div_int8);
PG_FUNCTION_INFO_V1(points_eq);
PG_FUNCTION_INFO_V1(points_ne);
PG_FUNCTION_INFO_V1(points_lt);
PG_FUNCTION_INFO_V1(points_le);
PG_FUNCTION_INFO_V1(points_gt);
PG_FUNCTION_INFO_V1(points_ge);
PG_FUNCTION_INFO_V1(points_cmp);
PG_FUNCTION_INFO_V1(points_sortsupport);
PG_FUNCTION_INFO_V1(points_hash);
PG_FUNCTION_INFO_V1(points_hash_extended);
PG_FUNCTION_INFO_V1(points_smaller);
PG_FUNCTION_INFO_V1(points_larger);
PG_FUNCTION_INFO_V1(int4_to_points);
PG_FUNCTION_INFO_V1(points_to_numeric);
PG_FUNCTION_INFO_V1(numeric_to_points);

void
PointsOutOfRange(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
			 errmsg("points out of range")));
}

/* a * b, or ERROR 22003 */
static inline Points
PointsMul(Points a, int64 b)
{
	Points		result;

	if (unlikely(pg_mul_s64_overflow(a, b, &result)))
		PointsOutOfRange();
	return result;
}

/*
 * a / b truncated toward zero, like bigint division.  ERROR 22012 when b is
 * zero, 22003 for PG_INT64_MIN / -1 (whose quotient is PG_INT64_MAX + 1,
 * and which traps on some CPUs rather than wrapping, so it is never
 * computed).
 */
static inline Points
PointsDiv(Points a, int64 b)
{
	if (unlikely(b == 0))
		ereport(ERROR,
				(errcode(ERRCODE_DIVISION_BY_ZERO),
				 errmsg("division by zero")));
	if (b == -1)
		return PointsSub(0, a);
	return a / b;
}

/* -------------------------------------------------------------------------
 * Text and binary I/O
 * -------------------------------------------------------------------------
 */

static bool
PointsIsDigit(char c)
{
	return c >= '0' && c <= '9';
}

/*
 * Parse a points literal: surrounding whitespace (isspace), an optional
 * sign, one or more ASCII digits, and nothing else.  No strtol: the digits
 * are accumulated by hand as a negative number, so that PG_INT64_MIN, whose
 * magnitude is one more than PG_INT64_MAX's, is reachable.
 *
 * A literal that is not a number at all is reported as such (22P02) even
 * when its digits would also overflow; only a well-formed literal can be
 * out of range (22003).
 */
static Points
PointsParse(const char *str)
{
	const char *p = str;
	const char *digits;
	bool		negative = false;
	bool		overflow = false;
	bool		valid;
	int64		acc = 0;		/* minus the magnitude read so far */

	while (isspace((unsigned char) *p))
		p++;
	if (*p == '-' || *p == '+')
		negative = (*p++ == '-');

	for (digits = p; PointsIsDigit(*p); p++)
	{
		if (!overflow &&
			(pg_mul_s64_overflow(acc, 10, &acc) ||
			 pg_sub_s64_overflow(acc, *p - '0', &acc)))
			overflow = true;
	}
	valid = (p > digits);		/* at least one digit */

	while (isspace((unsigned char) *p))
		p++;
	if (!valid || *p != '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid input syntax for type points: \"%s\"",
						str)));

	if (!negative && !overflow)
	{
		if (acc == PG_INT64_MIN)
			overflow = true;
		else
			acc = -acc;
	}
	if (overflow)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("value \"%s\" is out of range for type points",
						str)));
	return acc;
}

Datum
points_in(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsParse(PG_GETARG_CSTRING(0)));
}

Datum
points_out(PG_FUNCTION_ARGS)
{
	char		buf[MAXINT8LEN + 1];

	pg_lltoa(PG_GETARG_POINTS(0), buf);
	PG_RETURN_CSTRING(pstrdup(buf));
}

Datum
points_recv(PG_FUNCTION_ARGS)
{
	StringInfo	buf = (StringInfo) PG_GETARG_POINTER(0);

	PG_RETURN_POINTS(pq_getmsgint64(buf));
}

Datum
points_send(PG_FUNCTION_ARGS)
{
	StringInfoData buf;

	pq_begintypsend(&buf);
	pq_sendint64(&buf, PG_GETARG_POINTS(0));
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

/* -------------------------------------------------------------------------
 * Arithmetic
 * -------------------------------------------------------------------------
 */

Datum
points_pl(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsAdd(PG_GETARG_POINTS(0), PG_GETARG_POINTS(1)));
}

Datum
points_mi(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsSub(PG_GETARG_POINTS(0), PG_GETARG_POINTS(1)));
}

Datum
points_um(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsSub(0, PG_GETARG_POINTS(0)));
}

Datum
points_mul_int4(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsMul(PG_GETARG_POINTS(0), PG_GETARG_INT32(1)));
}

Datum
points_mul_int8(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsMul(PG_GETARG_POINTS(0), PG_GETARG_INT64(1)));
}

Datum
int4_mul_points(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsMul(PG_GETARG_POINTS(1), PG_GETARG_INT32(0)));
}

Datum
int8_mul_points(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsMul(PG_GETARG_POINTS(1), PG_GETARG_INT64(0)));
}

Datum
points_div_int4(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsDiv(PG_GETARG_POINTS(0), PG_GETARG_INT32(1)));
}

Datum
points_div_int8(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS(PointsDiv(PG_GETARG_POINTS(0), PG_GETARG_INT64(1)));
}

/* -------------------------------------------------------------------------
 * Comparison, btree and hash support, min and max
 * -------------------------------------------------------------------------
 */

Datum
points_eq(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(PG_GETARG_POINTS(0) == PG_GETARG_POINTS(1));
}

Datum
points_ne(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(PG_GETARG_POINTS(0) != PG_GETARG_POINTS(1));
}

Datum
points_lt(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(PG_GETARG_POINTS(0) < PG_GETARG_POINTS(1));
}

Datum
points_le(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(PG_GETARG_POINTS(0) <= PG_GETARG_POINTS(1));
}

Datum
points_gt(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(PG_GETARG_POINTS(0) > PG_GETARG_POINTS(1));
}

Datum
points_ge(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(PG_GETARG_POINTS(0) >= PG_GETARG_POINTS(1));
}

static inline int
PointsCompare(Points a, Points b)
{
	if (a < b)
		return -1;
	if (a > b)
		return 1;
	return 0;
}

Datum
points_cmp(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32(PointsCompare(PG_GETARG_POINTS(0), PG_GETARG_POINTS(1)));
}

#if SIZEOF_DATUM < 8
static int
PointsSortCompare(Datum a, Datum b, SortSupport ssup)
{
	return PointsCompare(DatumGetPoints(a), DatumGetPoints(b));
}
#endif

/*
 * The sort comparator.  A points Datum is the int64 itself, so the core's
 * signed-Datum comparator applies, and with it tuplesort's qsort routine
 * specialised for that comparator (PostgreSQL 15).
 */
Datum
points_sortsupport(PG_FUNCTION_ARGS)
{
	SortSupport ssup = (SortSupport) PG_GETARG_POINTER(0);

#if SIZEOF_DATUM >= 8
	ssup->comparator = ssup_datum_signed_cmp;
#else
	ssup->comparator = PointsSortCompare;
#endif
	PG_RETURN_VOID();
}

/* The same hash as bigint's, so a points value and its bigint hash alike. */
Datum
points_hash(PG_FUNCTION_ARGS)
{
	return DirectFunctionCall1(hashint8, PG_GETARG_DATUM(0));
}

Datum
points_hash_extended(PG_FUNCTION_ARGS)
{
	return DirectFunctionCall2(hashint8extended,
							   PG_GETARG_DATUM(0), PG_GETARG_DATUM(1));
}

Datum
points_smaller(PG_FUNCTION_ARGS)
{
	Points		a = PG_GETARG_POINTS(0);
	Points		b = PG_GETARG_POINTS(1);

	PG_RETURN_POINTS(a < b ? a : b);
}

Datum
points_larger(PG_FUNCTION_ARGS)
{
	Points		a = PG_GETARG_POINTS(0);
	Points		b = PG_GETARG_POINTS(1);

	PG_RETURN_POINTS(a > b ? a : b);
}

/* -------------------------------------------------------------------------
 * Casts (bigint <-> points needs no function: the Datum is the same)
 * -------------------------------------------------------------------------
 */

Datum
int4_to_points(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTS((Points) PG_GETARG_INT32(0));
}

Datum
points_to_numeric(PG_FUNCTION_ARGS)
{
	PG_RETURN_NUMERIC(int64_to_numeric(PG_GETARG_POINTS(0)));
}

static void PointsNotWhole(Numeric num, bool finite) pg_attribute_noreturn();

static void
PointsNotWhole(Numeric num, bool finite)
{
	char	   *str = DatumGetCString(DirectFunctionCall1(numeric_out,
														  NumericGetDatum(num)));

	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("points must be a whole number: \"%s\"", str),
			 finite ? errhint("Round the value explicitly, for example with "
							  "round() or trunc(), before the cast.") : 0));
}

/* numeric_cmp(a, b) for a numeric Datum and an int64 */
static int
PointsNumericCmp(Datum a, int64 b)
{
	Datum		bnum = NumericGetDatum(int64_to_numeric(b));

	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, a, bnum));
}

/*
 * numeric -> points, exact: a value with a non-zero fraction, NaN or an
 * infinity is refused (22P02), never rounded; 12.000 is 12.  A whole value
 * outside the 64-bit range is 22003.
 */
Datum
numeric_to_points(PG_FUNCTION_ARGS)
{
	Numeric		num = PG_GETARG_NUMERIC(0);
	Datum		whole;

	if (numeric_is_nan(num) || numeric_is_inf(num))
		PointsNotWhole(num, false);

	whole = DirectFunctionCall2(numeric_trunc, NumericGetDatum(num),
								Int32GetDatum(0));
	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(num),
										  whole)) != 0)
		PointsNotWhole(num, true);

	if (PointsNumericCmp(whole, PG_INT64_MIN) < 0 ||
		PointsNumericCmp(whole, PG_INT64_MAX) > 0)
		PointsOutOfRange();

	/* whole and in range: numeric_int8 neither rounds nor fails here */
	return DirectFunctionCall1(numeric_int8, whole);
}
