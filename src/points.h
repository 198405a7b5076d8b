/*-------------------------------------------------------------------------
 *
 * points.h
 *	  The loyalty.points base type: a signed 64-bit count of points.
 *
 * A points value is an int64 passed by value, so a Datum holding points is
 * exactly a Datum holding a bigint (the cast between the two is binary).
 * Code elsewhere in the extension (the ledger) does its arithmetic with
 * PointsAdd and PointsSub, which raise the same error as the SQL operators.
 *
 * src/points.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef LOYALTY_POINTS_H
#define LOYALTY_POINTS_H

#include "common/int.h"
#include "fmgr.h"

typedef int64 Points;

#define DatumGetPoints(X)		DatumGetInt64(X)
#define PointsGetDatum(X)		Int64GetDatum(X)
#define PG_GETARG_POINTS(n)		DatumGetPoints(PG_GETARG_DATUM(n))
#define PG_RETURN_POINTS(x)		return PointsGetDatum(x)

/*
 * Raise "points out of range" (SQLSTATE 22003).  Out of line so that the
 * inline helpers below stay small at every call site.
 */
extern void PointsOutOfRange(void) pg_attribute_noreturn();

/* a + b, or ERROR 22003 if the result does not fit in 64 bits */
static inline Points
PointsAdd(Points a, Points b)
{
	Points		result;

	if (unlikely(pg_add_s64_overflow(a, b, &result)))
		PointsOutOfRange();
	return result;
}

/* a - b, or ERROR 22003 if the result does not fit in 64 bits */
static inline Points
PointsSub(Points a, Points b)
{
	Points		result;

	if (unlikely(pg_sub_s64_overflow(a, b, &result)))
		PointsOutOfRange();
	return result;
}

#endif							/* LOYALTY_POINTS_H */
