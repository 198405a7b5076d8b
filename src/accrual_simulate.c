/*
 * accrual_simulate.c: what a draft rule version would have issued over the
 * purchases already posted, posting nothing
 *
 * Each purchase is evaluated again with the draft, with the context stored
 * when it was posted (tier, first purchase, birthday month); daily caps and
 * campaign budgets start from zero at from_ts, and purchases are taken in
 * the order they were posted. A purchase posted under a version that did
 * not use first_purchase or birthday_month did not compute them, so they
 * are found again: the member's first purchase is its first posted (the
 * smallest id of its account), and its birthday month is the month of the
 * birthday its contact row holds now.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "accrual.h"
#include "accrual_post.h"
#include "ledger.h"

PG_FUNCTION_INFO_V1(loyalty_simulate_accrual);

typedef struct SimulateDay
{
	int64		key[2];			/* account, day */
	int64		used;
} SimulateDay;

static void
SimulateRow(Tuplestorestate *ts, TupleDesc desc, const char *rule, int64 purchases, int64 points,
			bool points_null)
{
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	values[0] = CStringGetTextDatum(rule);
	values[1] = Int64GetDatum(purchases);
	values[2] = Int64GetDatum(points);
	nulls[2] = points_null;
	tuplestore_putvalues(ts, desc, values, nulls);
}

static void
SimulateBudgets(AccrualRules *r, AccrualState *st)
{
	st->budgets = palloc0(sizeof(AccrualBudget) * Max(r->nbonus, 1));
	for (int i = 0; i < r->nbonus; i++)
		if (r->bonus[i].campaign != NULL)
			st->budgets[st->nbudgets++].campaign = r->bonus[i].campaign;
}

static HTAB *
SimulateDays(void)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(int64) * 2;
	ctl.entrysize = sizeof(SimulateDay);
	ctl.hcxt = CurrentMemoryContext;
	return hash_create("loyalty simulate days", 1024, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

/* The program's rule version of this number, or NULL. */
static AccrualRules *
SimulateVersion(AccrualBatch *b, int32 version)
{
	for (int i = 0; i < b->rules->nversions; i++)
		if (b->rules->versions[i].version == version)
			return &b->rules->versions[i];
	return NULL;
}

/* Evaluate every purchase of the period; returns how many there were. */
static int64
SimulateRun(AccrualBatch *b, AccrualRules *r, AccrualState *st, TimestampTz from, TimestampTz to,
			int64 *draft, int64 *posted)
{
	static const Oid argtypes[] = {INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		args[3];
	HTAB	   *days = SimulateDays();
	uint64		n;

	args[0] = Int64GetDatum(b->program_id);
	args[1] = TimestampTzGetDatum(from);
	args[2] = TimestampTzGetDatum(to);
	LedgerExpect(SPI_execute_with_args(
										"SELECT a.amount::float8, a.occurred_at, a.category, a.channel, a.store,"
										"       a.breakdown #>> '{context,tier}',"
										"       coalesce((a.breakdown #>> '{context,first_purchase}')::boolean, false),"
										"       coalesce((a.breakdown #>> '{context,birthday_month}')::boolean, false),"
										"       a.account_id, a.points, coalesce(extract(month FROM c.birthday)::int, 0),"
										"       a.prev_ref IS NULL, a.rule_version"
										"  FROM loyalty.accrual a"
										"  LEFT JOIN loyalty.member_contact c ON c.member_id = a.member_id"
										" WHERE a.program_id = $1 AND a.occurred_at >= $2 AND a.occurred_at < $3"
										" ORDER BY a.id",
										3, (Oid *) argtypes, args, NULL, true, 0),
				  SPI_OK_SELECT, "reading purchases");
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		AccrualInput in;
		SimulateDay *e;
		AccrualRules *posted_by;
		int64		key[2];
		int			month;
		bool		isnull,
					found;

		in.amount = DatumGetFloat8(SPI_getbinval(t, d, 1, &isnull));
		in.occurred_at = DatumGetTimestampTz(SPI_getbinval(t, d, 2, &isnull));
		in.category = SPI_getvalue(t, d, 3);
		in.channel = SPI_getvalue(t, d, 4);
		in.store = SPI_getvalue(t, d, 5);
		in.tier = SPI_getvalue(t, d, 6);
		AccrualLocalTime(in.occurred_at, b->tz, &in.weekday, &in.day, &month);
		posted_by = SimulateVersion(b, DatumGetInt32(SPI_getbinval(t, d, 13, &isnull)));
		/* what the posting computed, or, if its version did not, found again */
		if (posted_by != NULL && AccrualVersionUses(posted_by, false))
			in.first_purchase = DatumGetBool(SPI_getbinval(t, d, 7, &isnull));
		else
			in.first_purchase = DatumGetBool(SPI_getbinval(t, d, 12, &isnull));
		if (posted_by != NULL && AccrualVersionUses(posted_by, true))
			in.birthday_month = DatumGetBool(SPI_getbinval(t, d, 8, &isnull));
		else
			in.birthday_month = DatumGetInt32(SPI_getbinval(t, d, 11, &isnull)) == month;
		key[0] = DatumGetInt64(SPI_getbinval(t, d, 9, &isnull));
		key[1] = in.day;
		e = hash_search(days, key, HASH_ENTER, &found);
		if (!found)
			e->used = 0;
		st->day_used = e->used;
		*draft += AccrualEvaluate(r, &in, st, NULL);
		e->used = st->day_used;
		*posted += DatumGetInt64(SPI_getbinval(t, d, 10, &isnull));
	}
	return (int64) n;
}

/* simulate_accrual(program, rules, from_ts, to_ts) */
Datum
loyalty_simulate_accrual(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	AccrualBatch b;
	AccrualRules *r;
	AccrualState st;
	AccrualTrace trace;
	int64		draft = 0,
				posted = 0,
				n;

	for (int i = 0; i < 4; i++)
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("program, rules, from_ts and to_ts must not be null")));
	InitMaterializedSRF(fcinfo, 0);
	r = AccrualCompile(PG_GETARG_JSONB_P(1), CurrentMemoryContext);
	r->version = 0;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	memset(&b, 0, sizeof(b));
	AccrualLoadProgram(&b, 0, text_to_cstring(PG_GETARG_TEXT_PP(0)));
	memset(&st, 0, sizeof(st));
	SimulateBudgets(r, &st);
	trace.applied = palloc0(sizeof(int64) * TRACE_SIZE(r));
	trace.points = palloc0(sizeof(int64) * TRACE_SIZE(r));
	st.trace = &trace;
	n = SimulateRun(&b, r, &st, PG_GETARG_TIMESTAMPTZ(2), PG_GETARG_TIMESTAMPTZ(3), &draft, &posted);
	SPI_finish();

	for (int i = 0; i < r->nmult; i++)
		SimulateRow(rsinfo->setResult, rsinfo->setDesc, r->mult[i].path, trace.applied[i], 0, true);
	for (int i = 0; i < r->nbonus; i++)
		SimulateRow(rsinfo->setResult, rsinfo->setDesc, r->bonus[i].path, trace.applied[r->nmult + i],
					trace.points[r->nmult + i], r->bonus[i].is_factor);
	SimulateRow(rsinfo->setResult, rsinfo->setDesc, "caps.per_purchase", trace.applied[TRACE_CAP_PURCHASE(r)],
				-trace.points[TRACE_CAP_PURCHASE(r)], false);
	SimulateRow(rsinfo->setResult, rsinfo->setDesc, "caps.per_member_per_day", trace.applied[TRACE_CAP_DAY(r)],
				-trace.points[TRACE_CAP_DAY(r)], false);
	SimulateRow(rsinfo->setResult, rsinfo->setDesc, "excluded or below min_amount", trace.applied[TRACE_NOTHING(r)],
				0, false);
	SimulateRow(rsinfo->setResult, rsinfo->setDesc, "total (draft)", n, draft, false);
	SimulateRow(rsinfo->setResult, rsinfo->setDesc, "total (as posted)", n, posted, false);
	return (Datum) 0;
}
