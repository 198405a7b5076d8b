/*
 * accrual_post.c: posting purchases, one (accrue) or a whole statement (the
 * trigger) at a time, through the same set-based path
 *
 * A batch is: read the purchases joined with their members (one query over
 * the source: the trigger's transition table or the function's arguments),
 * lock the member accounts in id order, read what the rules need about the
 * members' earlier purchases, compute every purchase's points in C with the
 * compiled rules, and write everything in one statement: the purchases,
 * their transfers chained per member account by loyalty.chain(), their lots
 * and the member balances aggregated per account. Bad purchases raise (the
 * function) or go to the quarantine (the trigger).
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "accrual.h"
#include "accrual_post.h"
#include "ledger.h"
#include "points.h"

PG_FUNCTION_INFO_V1(loyalty_accrue);

static SPIPlanPtr plan_program;
static SPIPlanPtr plan_lock;
static SPIPlanPtr plan_seen;
static SPIPlanPtr plan_days;
static SPIPlanPtr plan_campaign_add;
static SPIPlanPtr plan_campaign_lock;
static SPIPlanPtr plan_campaign_save;
static SPIPlanPtr plan_post;
static SPIPlanPtr plan_post_small;
static SPIPlanPtr plan_quarantine;
static SPIPlanPtr plan_debts;
static SPIPlanPtr plan_accrue_read;

/* Columns of the read query, in order. */
enum
{
	COL_REF = 1, COL_MEMBER_REF, COL_AMOUNT, COL_OCCURRED_AT, COL_CATEGORY, COL_CHANNEL,
	COL_STORE, COL_ATTRS, COL_MEMBER_ID, COL_STATUS, COL_TIER, COL_ACCOUNT, COL_BIRTH_MONTH,
	COL_EXISTS, COL_SAME, COL_EXISTING_POINTS, COL_ROW
};

/* The key of the per-batch state of a member: (account, day); day INT_MIN: "has purchases". */
typedef struct AccrualDayKey
{
	int64		account;
	int32		day;
} AccrualDayKey;

typedef struct AccrualDayEntry
{
	AccrualDayKey key;
	int64		used;
} AccrualDayEntry;

/*
 * Prepare and keep a plan with the given cursor options:
 * CURSOR_OPT_GENERIC_PLAN for a statement of a few rows that runs often
 * (replanning it each time would cost more than running it),
 * CURSOR_OPT_CUSTOM_PLAN for a bulk statement (planned with its real
 * sizes), 0 to leave the choice to the plan cache (LedgerPrepare always
 * asks for generic plans).
 */
SPIPlanPtr
AccrualPrepare(SPIPlanPtr *slot, int options, const char *sql, int nargs, const Oid *argtypes)
{
	if (*slot == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, (Oid *) argtypes, options);

		if (plan == NULL)
			elog(ERROR, "could not prepare \"%s\": %s", sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "could not keep the plan of \"%s\"", sql);
		*slot = plan;
	}
	return *slot;
}

/* Per-chunk allocations go to the batch's chunk context, reset after each chunk. */
static MemoryContext
AccrualChunkMemory(AccrualBatch *b)
{
	return MemoryContextSwitchTo(b->chunk_cxt != NULL ? b->chunk_cxt : CurrentMemoryContext);
}

/*
 * The SQL of the read query around a source that yields (ref, member_ref,
 * amount, occurred_at, category, channel, store, attrs, whole) where whole
 * is the application's row (NULL for the function API). $1 is the program.
 */
char *
AccrualReadSql(const char *source)
{
	return psprintf(
					"SELECT n.ref, n.member_ref, n.amount, n.occurred_at, n.category, n.channel, n.store,"
					"       n.attrs, m.id, m.status, m.tier, a.id, extract(month FROM c.birthday)::int,"
					"       x.id IS NOT NULL,"
					"       (x.member_id, x.amount, x.occurred_at, x.category, x.channel, x.store, x.attrs)"
					"         IS NOT DISTINCT FROM (m.id, n.amount, n.occurred_at, n.category, n.channel,"
					"                               n.store, coalesce(n.attrs, '{}')),"
					"       x.points,"
					"       CASE WHEN n.ref IS NULL OR n.member_ref IS NULL OR n.amount IS NULL OR n.amount < 0"
					"              OR n.occurred_at IS NULL OR m.id IS NULL OR m.status <> 'active'"
					"              OR x.id IS NOT NULL OR n.occurred_at < $2"
					"            THEN to_jsonb(n.whole) END"
					"  FROM (%s) n"
					"  LEFT JOIN loyalty.member m ON m.program_id = $1 AND m.member_ref = n.member_ref"
					"  LEFT JOIN loyalty.account a ON a.member_id = m.id"
					"  LEFT JOIN loyalty.member_contact c ON c.member_id = m.id"
					"  LEFT JOIN loyalty.accrual x ON x.program_id = $1 AND x.ref = n.ref",
					source);
}

/* Read the program: time zone, options, issuance account. */
void
AccrualLoadProgram(AccrualBatch *b, int64 program_id, const char *code)
{
	static const Oid argtypes[] = {INT8OID, TEXTOID};
	Datum		args[2];
	char		nulls[2] = {' ', ' '};
	char	   *tz;
	char	   *s;

	LedgerPrepare(&plan_program,
				  "SELECT p.id, p.code, p.time_zone, coalesce(p.options ->> 'unknown_member', 'quarantine'),"
				  "       s.id,"
				  "       EXISTS (SELECT FROM loyalty.accrual_debt d WHERE d.program_id = p.id AND d.outstanding > 0)"
				  "  FROM loyalty.program p"
				  "  JOIN loyalty.account s ON s.program_id = p.id AND s.kind = 'issuance' AND s.name = ''"
				  " WHERE p.id = $1 OR p.code = $2",
				  2, argtypes);
	args[0] = Int64GetDatum(program_id);
	args[1] = code ? CStringGetTextDatum(code) : (Datum) 0;
	nulls[1] = code ? ' ' : 'n';
	LedgerExpect(SPI_execute_plan(plan_program, args, nulls, true, 1), SPI_OK_SELECT, "reading a program");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_UNKNOWN_PROGRAM),
				 errmsg("program \"%s\" does not exist", code ? code : "?"),
				 errhint("Create it with loyalty.create_program().")));
	b->program_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &(bool){0}));
	b->code = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	tz = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
	s = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4);
	b->enroll_unknown = strcmp(s, "enroll") == 0;
	b->issuance = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 5, &(bool){0}));
	b->has_debts = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 6, &(bool){0}));
	b->tz = pg_tzset(tz);
	if (b->tz == NULL)
		elog(ERROR, "program \"%s\" has an unknown time zone \"%s\"", b->code, tz);
	b->rules = AccrualProgram(b->program_id);
	b->earliest = b->rules->nversions > 0 ? b->rules->versions[0].effective_from : DT_NOEND;
}

static char *
AccrualText(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* Decide what is wrong with a row, if anything. */
static void
AccrualProblem(AccrualBatch *b, AccrualRow *r, HeapTuple tup, TupleDesc desc)
{
	bool		isnull;
	char	   *status;

	if (r->ref == NULL)
		r->problem = "the purchase has no ref", r->sqlstate = "22004";
	else if (r->member_ref == NULL)
		r->problem = "the purchase has no member", r->sqlstate = "22004";
	else if (r->amount_null)
		r->problem = "the purchase has no amount", r->sqlstate = "22004";
	else if (r->amount_d < 0)
		r->problem = psprintf("the amount %s is negative", DatumGetCString(DirectFunctionCall1(numeric_out, r->amount))),
			r->sqlstate = "22023";
	else if (r->account_id == 0)
		r->problem = psprintf("member \"%s\" does not exist in program \"%s\"", r->member_ref, b->code),
			r->sqlstate = "LY003";
	else if (strcmp((status = AccrualText(tup, desc, COL_STATUS)), "active") != 0)
		r->problem = psprintf("member \"%s\" of program \"%s\" is %s", r->member_ref, b->code, status),
			r->sqlstate = "LY004";
	else if (DatumGetBool(SPI_getbinval(tup, desc, COL_EXISTS, &isnull)))
	{
		r->existing = true;
		r->existing_points = DatumGetInt64(SPI_getbinval(tup, desc, COL_EXISTING_POINTS, &isnull));
		if (!DatumGetBool(SPI_getbinval(tup, desc, COL_SAME, &isnull)))
			r->problem = psprintf("ref \"%s\" was already used for a different purchase", r->ref),
				r->sqlstate = "23505";
	}
	else if ((r->rules = AccrualRulesAt(b->rules, r->occurred_at)) == NULL)
		r->problem = psprintf("program \"%s\" has no earning rules in force at %s", b->code,
							  timestamptz_to_str(r->occurred_at)),
			r->sqlstate = "LY010";
}

/* Copy the rows of the read query into the batch. */
void
AccrualReadRows(AccrualBatch *b)
{
	TupleDesc	desc = SPI_tuptable->tupdesc;
	MemoryContext old = AccrualChunkMemory(b);

	b->nrows = SPI_processed;
	b->rows = palloc0(sizeof(AccrualRow) * Max(b->nrows, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		AccrualRow *r = &b->rows[i];
		bool		isnull;
		Datum		d;

		r->ref = AccrualText(tup, desc, COL_REF);
		r->member_ref = AccrualText(tup, desc, COL_MEMBER_REF);
		d = SPI_getbinval(tup, desc, COL_AMOUNT, &r->amount_null);
		if (!r->amount_null)
		{
			r->amount = datumCopy(d, false, -1);
			r->amount_d = DatumGetFloat8(DirectFunctionCall1(numeric_float8_no_overflow, r->amount));
		}
		d = SPI_getbinval(tup, desc, COL_OCCURRED_AT, &isnull);
		r->occurred_at = isnull ? 0 : DatumGetTimestampTz(d);
		r->category = AccrualText(tup, desc, COL_CATEGORY);
		r->channel = AccrualText(tup, desc, COL_CHANNEL);
		r->store = AccrualText(tup, desc, COL_STORE);
		d = SPI_getbinval(tup, desc, COL_ATTRS, &r->attrs_null);
		if (!r->attrs_null)
			r->attrs = datumCopy(d, false, -1);
		d = SPI_getbinval(tup, desc, COL_MEMBER_ID, &isnull);
		r->member_id = isnull ? 0 : DatumGetInt64(d);
		r->tier = AccrualText(tup, desc, COL_TIER);
		d = SPI_getbinval(tup, desc, COL_ACCOUNT, &isnull);
		r->account_id = isnull ? 0 : DatumGetInt64(d);
		d = SPI_getbinval(tup, desc, COL_BIRTH_MONTH, &isnull);
		r->birth_month = isnull ? 0 : DatumGetInt32(d);
		d = SPI_getbinval(tup, desc, COL_ROW, &r->whole_null);
		if (!r->whole_null)
			r->whole = datumCopy(d, false, -1);
		AccrualProblem(b, r, tup, desc);
	}
	MemoryContextSwitchTo(old);
}

static int
AccrualCmpInt64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a,
				y = *(const int64 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

static Datum
AccrualInt64Array(int64 *v, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int64GetDatum(v[i]);
	return PointerGetDatum(construct_array(d, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
}

/* Lock the member accounts of the good rows, in account-id order. */
static void
AccrualLock(AccrualBatch *b)
{
	static const Oid argtypes[] = {INT8ARRAYOID};
	int64	   *ids = palloc(sizeof(int64) * Max(b->nrows, 1));
	int			n = 0,
				u = 0;
	Datum		arg;

	for (int i = 0; i < b->nrows; i++)
		if (b->rows[i].problem == NULL && !b->rows[i].existing)
			ids[n++] = b->rows[i].account_id;
	if (n > 1)
		qsort(ids, n, sizeof(int64), AccrualCmpInt64);
	for (int i = 0; i < n; i++)
		if (u == 0 || ids[u - 1] != ids[i])
			ids[u++] = ids[i];
	b->accounts = ids;
	b->naccounts = u;
	if (u == 0)
		return;
	LedgerPrepare(&plan_lock,
				  "SELECT id FROM loyalty.account WHERE id = ANY ($1) ORDER BY id FOR UPDATE",
				  1, argtypes);
	arg = AccrualInt64Array(ids, u);
	LedgerExpect(SPI_execute_plan(plan_lock, &arg, NULL, false, 0), SPI_OK_SELECT, "locking accounts");
}

static HTAB *
AccrualDayTable(void)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(AccrualDayKey);
	ctl.entrysize = sizeof(AccrualDayEntry);
	ctl.hcxt = CurrentMemoryContext;
	return hash_create("loyalty accrual days", 256, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

static void
AccrualPut(HTAB *h, int64 account, int32 day, int64 used)
{
	AccrualDayKey key;
	AccrualDayEntry *e;
	bool		found;

	memset(&key, 0, sizeof(key));
	key.account = account;
	key.day = day;
	e = hash_search(h, &key, HASH_ENTER, &found);
	e->used = found ? e->used + used : used;
}

static AccrualDayEntry *
AccrualGet(HTAB *h, int64 account, int32 day)
{
	AccrualDayKey key;

	memset(&key, 0, sizeof(key));
	key.account = account;
	key.day = day;
	return hash_search(h, &key, HASH_FIND, NULL);
}

/* What the rules need about earlier purchases, read under the lock. */
static void
AccrualReadHistory(AccrualBatch *b)
{
	static const Oid argtypes[] = {INT8ARRAYOID};
	Datum		arg = AccrualInt64Array(b->accounts, b->naccounts);

	b->days = AccrualDayTable();
	if (b->naccounts == 0)
		return;
	if (b->rules->uses_first)
	{
		LedgerPrepare(&plan_seen,
					  "SELECT DISTINCT account_id FROM loyalty.accrual WHERE account_id = ANY ($1)",
					  1, argtypes);
		LedgerExpect(SPI_execute_plan(plan_seen, &arg, NULL, false, 0), SPI_OK_SELECT, "reading purchases");
		for (uint64 i = 0; i < SPI_processed; i++)
			AccrualPut(b->days, DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1,
															&(bool){0})), PG_INT32_MIN, 1);
	}
	if (b->rules->uses_day_cap)
	{
		LedgerPrepare(&plan_days,
					  "SELECT account_id, day - date '2000-01-01', sum(points)::bigint FROM loyalty.accrual"
					  " WHERE account_id = ANY ($1) GROUP BY 1, 2",
					  1, argtypes);
		LedgerExpect(SPI_execute_plan(plan_days, &arg, NULL, false, 0), SPI_OK_SELECT, "reading daily points");
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	t = SPI_tuptable->vals[i];
			TupleDesc	d = SPI_tuptable->tupdesc;

			AccrualPut(b->days, DatumGetInt64(SPI_getbinval(t, d, 1, &(bool){0})),
					   DatumGetInt32(SPI_getbinval(t, d, 2, &(bool){0})),
					   DatumGetInt64(SPI_getbinval(t, d, 3, &(bool){0})));
		}
	}
}

/* Campaign budgets: lock the program's campaign counters. */
static void
AccrualReadBudgets(AccrualBatch *b)
{
	static const Oid argtypes[] = {INT8OID, TEXTARRAYOID};
	Datum		args[2];
	Datum	   *names;
	int			n = 0;

	b->state.nbudgets = 0;
	if (!b->rules->uses_campaign)
		return;
	names = palloc(sizeof(Datum) * 64);
	for (int v = 0; v < b->rules->nversions; v++)
		for (int i = 0; i < b->rules->versions[v].nbonus; i++)
			if (b->rules->versions[v].bonus[i].campaign != NULL && n < 64)
				names[n++] = CStringGetTextDatum(b->rules->versions[v].bonus[i].campaign);
	args[0] = Int64GetDatum(b->program_id);
	args[1] = PointerGetDatum(construct_array(names, n, TEXTOID, -1, false, TYPALIGN_INT));
	LedgerPrepare(&plan_campaign_add,
				  "INSERT INTO loyalty.accrual_campaign (program_id, campaign)"
				  " SELECT $1, unnest($2) ON CONFLICT DO NOTHING", 2, argtypes);
	LedgerExpect(SPI_execute_plan(plan_campaign_add, args, NULL, false, 0), SPI_OK_INSERT, "adding campaigns");
	LedgerPrepare(&plan_campaign_lock,
				  "SELECT campaign, used FROM loyalty.accrual_campaign"
				  " WHERE program_id = $1 AND campaign = ANY ($2) ORDER BY campaign FOR UPDATE",
				  2, argtypes);
	LedgerExpect(SPI_execute_plan(plan_campaign_lock, args, NULL, false, 0), SPI_OK_SELECT, "locking campaigns");
	b->state.budgets = palloc0(sizeof(AccrualBudget) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		AccrualBudget *bud = &b->state.budgets[b->state.nbudgets++];

		bud->campaign = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		bud->used = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &(bool){0}));
	}
}

static void
AccrualSaveBudgets(AccrualBatch *b)
{
	static const Oid argtypes[] = {INT8OID, TEXTOID, INT8OID};

	LedgerPrepare(&plan_campaign_save,
				  "UPDATE loyalty.accrual_campaign SET used = used + $3 WHERE program_id = $1 AND campaign = $2",
				  3, argtypes);
	for (int i = 0; i < b->state.nbudgets; i++)
	{
		Datum		args[3];

		if (b->state.budgets[i].added == 0)
			continue;
		args[0] = Int64GetDatum(b->program_id);
		args[1] = CStringGetTextDatum(b->state.budgets[i].campaign);
		args[2] = Int64GetDatum(b->state.budgets[i].added);
		LedgerExpect(SPI_execute_plan(plan_campaign_save, args, NULL, false, 0), SPI_OK_UPDATE,
					  "saving campaign budgets");
	}
}

/* Compute the points of every good row, in the order of the statement. */
static void
AccrualCompute(AccrualBatch *b)
{
	StringInfoData buf;
	MemoryContext old = AccrualChunkMemory(b);

	initStringInfo(&buf);
	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];
		AccrualInput in;
		AccrualDayEntry *e;
		int			month;

		if (r->problem != NULL || r->existing)
			continue;
		AccrualLocalTime(r->occurred_at, b->tz, &in.weekday, &in.day, &month);
		r->day = in.day;
		in.amount = r->amount_d;
		in.occurred_at = r->occurred_at;
		in.category = r->category;
		in.channel = r->channel;
		in.store = r->store;
		in.tier = r->tier;
		in.birthday_month = r->birth_month == month;
		in.first_purchase = false;
		if (b->rules->uses_first)
		{
			in.first_purchase = AccrualGet(b->days, r->account_id, PG_INT32_MIN) == NULL;
			AccrualPut(b->days, r->account_id, PG_INT32_MIN, 1);
		}
		e = b->rules->uses_day_cap ? AccrualGet(b->days, r->account_id, in.day) : NULL;
		b->state.day_used = e ? e->used : 0;
		resetStringInfo(&buf);
		r->points = AccrualEvaluate(r->rules, &in, &b->state, &buf);
		if (b->rules->uses_day_cap)
			AccrualPut(b->days, r->account_id, in.day, r->points);
		r->breakdown = pstrdup(buf.data);
		r->vests_at = r->occurred_at + (int64) r->rules->pending_days * USECS_PER_DAY;
	}
	MemoryContextSwitchTo(old);
}

static Datum
AccrualArray(Datum *d, bool *nulls, int n, Oid type)
{
	int16		len;
	bool		byval;
	char		align;
	int			dims[1] = {n};
	int			lbs[1] = {1};

	get_typlenbyvalalign(type, &len, &byval, &align);
	return PointerGetDatum(construct_md_array(d, nulls, 1, dims, lbs, type, len, byval, align));
}

#define POST_COLS 14

/* Write the good rows: purchases, transfers, lots, balances. */
static void
AccrualWrite(AccrualBatch *b)
{
	static const Oid types[POST_COLS] = {TEXTOID, INT8OID, INT8OID, NUMERICOID, TIMESTAMPTZOID, DATEOID,
		TEXTOID, TEXTOID, TEXTOID, JSONBOID, INT4OID, INT8OID, TIMESTAMPTZOID, TEXTOID};
	static const Oid argtypes[4 + POST_COLS] = {INT8OID, INT8OID, TIMESTAMPTZOID, TEXTOID,
		TEXTARRAYOID, INT8ARRAYOID, INT8ARRAYOID, NUMERICARRAYOID, TIMESTAMPTZARRAYOID, DATEARRAYOID,
		TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, JSONBARRAYOID, INT4ARRAYOID, INT8ARRAYOID,
	TIMESTAMPTZARRAYOID, TEXTARRAYOID};
	Datum	   *cols[POST_COLS];
	bool	   *nulls[POST_COLS];
	Datum		args[4 + POST_COLS];
	int			n = 0;
	MemoryContext old;

	old = AccrualChunkMemory(b);
	for (int c = 0; c < POST_COLS; c++)
	{
		cols[c] = palloc(sizeof(Datum) * Max(b->nrows, 1));
		nulls[c] = palloc0(sizeof(bool) * Max(b->nrows, 1));
	}
	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];

		if (r->problem != NULL || r->existing)
			continue;
		cols[0][n] = CStringGetTextDatum(r->ref);
		cols[1][n] = Int64GetDatum(r->member_id);
		cols[2][n] = Int64GetDatum(r->account_id);
		cols[3][n] = r->amount;
		cols[4][n] = TimestampTzGetDatum(r->occurred_at);
		cols[5][n] = DateADTGetDatum(r->day);
		nulls[6][n] = r->category == NULL;
		cols[6][n] = r->category ? CStringGetTextDatum(r->category) : (Datum) 0;
		nulls[7][n] = r->channel == NULL;
		cols[7][n] = r->channel ? CStringGetTextDatum(r->channel) : (Datum) 0;
		nulls[8][n] = r->store == NULL;
		cols[8][n] = r->store ? CStringGetTextDatum(r->store) : (Datum) 0;
		nulls[9][n] = r->attrs_null;
		cols[9][n] = r->attrs;
		cols[10][n] = Int32GetDatum(r->rules->version);
		cols[11][n] = Int64GetDatum(r->points);
		cols[12][n] = TimestampTzGetDatum(r->vests_at);
		cols[13][n] = CStringGetTextDatum(r->breakdown);
		n++;
	}
	b->nposted = n;
	b->nposted_total += n;
	if (n == 0)
	{
		MemoryContextSwitchTo(old);
		return;
	}

	args[0] = Int64GetDatum(b->program_id);
	args[1] = Int64GetDatum(b->issuance);
	args[2] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	args[3] = CStringGetTextDatum(LedgerActor());
	for (int c = 0; c < POST_COLS; c++)
		args[4 + c] = AccrualArray(cols[c], nulls[c], n, types[c]);

	MemoryContextSwitchTo(old);
	AccrualPrepare(n <= ACCRUAL_SMALL ? &plan_post_small : &plan_post,
				   n <= ACCRUAL_SMALL ? CURSOR_OPT_GENERIC_PLAN : CURSOR_OPT_CUSTOM_PLAN,
				   "WITH s AS ("
				  "  SELECT * FROM unnest($5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
				  "    AS s(ref, member_id, account_id, amount, occurred_at, day, category, channel, store,"
				  "         attrs, rule_version, points, vests_at, breakdown)),"
				  " e AS ("
				  "  SELECT s.*, CASE WHEN s.points > 0 THEN loyalty._lot_expiry("
				  "             coalesce(r.rules -> 'expiry', p.options -> 'expiry'), p.time_zone, s.occurred_at)"
				  "         END AS expires_at"
				  "    FROM s JOIN loyalty.program p ON p.id = $1"
				  "    JOIN loyalty.earning_rule r ON r.program_id = $1 AND r.version = s.rule_version),"
				  " ins AS ("
				  "  INSERT INTO loyalty.accrual (program_id, ref, member_id, account_id, amount, occurred_at, day,"
				  "         category, channel, store, attrs, rule_version, points, vests_at, expires_at,"
				  "         breakdown, posted_at)"
				  "  SELECT $1, ref, member_id, account_id, amount, occurred_at, day, category, channel, store,"
				  "         coalesce(attrs, '{}'), rule_version, points, vests_at, expires_at, breakdown::jsonb, $3"
				  "    FROM e"
				  "  ON CONFLICT (program_id, ref) DO NOTHING"
				  "  RETURNING ref, account_id, points, occurred_at, vests_at, expires_at, rule_version),"
				  " t0 AS (SELECT ins.*, nextval('loyalty.transfer_id_seq') AS tid FROM ins WHERE points > 0),"
				  " t1 AS ("
				  "  SELECT t0.*, a.last_hash AS head,"
				  "         loyalty.chain(a.last_hash, true, $1, $2, t0.account_id, t0.points::loyalty.points,"
				  "                       'accrual', t0.ref, t0.occurred_at, $3, t0.rule_version, $4, NULL)"
				  "           OVER (PARTITION BY t0.account_id ORDER BY t0.tid) AS hash"
				  "    FROM t0 JOIN loyalty.account a ON a.id = t0.account_id),"
				  " t2 AS ("
				  "  SELECT t1.*, coalesce(lag(t1.hash) OVER (PARTITION BY t1.account_id ORDER BY t1.tid),"
				  "                        t1.head) AS prev FROM t1),"
				  " tr AS ("
				  "  INSERT INTO loyalty.transfer (id, program_id, debit_account_id, credit_account_id, amount,"
				  "         kind, ref, occurred_at, posted_at, rule_version, actor, reason, debit_prev_hash,"
				  "         credit_prev_hash, hash)"
				  "  SELECT tid, $1, $2, account_id, points::loyalty.points, 'accrual', ref, occurred_at, $3,"
				  "         rule_version, $4, NULL, NULL, prev, hash FROM t2),"
				  " lo AS ("
				  "  INSERT INTO loyalty.lot (account_id, transfer_id, amount, remaining, occurred_at, vests_at,"
				  "         expires_at, pending)"
				  "  SELECT account_id, tid, points::loyalty.points, points::loyalty.points, occurred_at,"
				  "         vests_at, expires_at, vests_at > occurred_at FROM t2),"
				  " g AS ("
				  "  SELECT account_id, sum(points) FILTER (WHERE vests_at <= occurred_at) AS avail,"
				  "         sum(points) FILTER (WHERE vests_at > occurred_at) AS pend, max(tid) AS last"
				  "    FROM t2 GROUP BY account_id),"
				  " up AS ("
				  "  UPDATE loyalty.account a"
				  "     SET available = (a.available::bigint + coalesce(g.avail, 0)::bigint)::loyalty.points,"
				  "         pending = (a.pending::bigint + coalesce(g.pend, 0)::bigint)::loyalty.points,"
				  "         last_hash = t2.hash, last_transfer_id = g.last"
				  "    FROM g JOIN t2 ON t2.tid = g.last WHERE a.id = g.account_id)"
				  "SELECT count(*) FROM ins",
				  4 + POST_COLS, argtypes);
	LedgerExpect(SPI_execute_plan(n <= ACCRUAL_SMALL ? plan_post_small : plan_post, args, NULL, false, 0), SPI_OK_SELECT, "posting purchases");
	b->ninserted = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &(bool){0}));
}

/* Rows that could not earn, into the quarantine. */
static void
AccrualQuarantine(AccrualBatch *b)
{
	static const Oid argtypes[] = {INT8OID, OIDOID, TEXTARRAYOID, TEXTARRAYOID, JSONBARRAYOID,
	TEXTARRAYOID, TEXTARRAYOID};
	Datum	   *cols[5];
	bool	   *nulls[5];
	static const Oid types[5] = {TEXTOID, TEXTOID, JSONBOID, TEXTOID, TEXTOID};
	Datum		args[7];
	int			n = 0;
	MemoryContext old = AccrualChunkMemory(b);

	for (int c = 0; c < 5; c++)
	{
		cols[c] = palloc(sizeof(Datum) * Max(b->nrows, 1));
		nulls[c] = palloc0(sizeof(bool) * Max(b->nrows, 1));
	}
	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];

		if (r->problem == NULL)
			continue;
		nulls[0][n] = r->ref == NULL;
		cols[0][n] = r->ref ? CStringGetTextDatum(r->ref) : (Datum) 0;
		nulls[1][n] = r->member_ref == NULL;
		cols[1][n] = r->member_ref ? CStringGetTextDatum(r->member_ref) : (Datum) 0;
		nulls[2][n] = r->whole_null;
		cols[2][n] = r->whole;
		cols[3][n] = CStringGetTextDatum(r->problem);
		cols[4][n] = CStringGetTextDatum(r->sqlstate);
		n++;
	}
	b->nquarantined += n;
	MemoryContextSwitchTo(old);
	if (n == 0)
		return;
	args[0] = Int64GetDatum(b->program_id);
	args[1] = ObjectIdGetDatum(b->source);
	for (int c = 0; c < 5; c++)
		args[2 + c] = AccrualArray(cols[c], nulls[c], n, types[c]);
	LedgerPrepare(&plan_quarantine,
				  "INSERT INTO loyalty.accrual_quarantine (program_id, source, ref, member_ref, row_data, reason,"
				  "       sqlstate)"
				  " SELECT $1, $2, q.ref, q.member_ref, coalesce(q.row_data, '{}'), q.reason, q.sqlstate"
				  "   FROM unnest($3, $4, $5, $6, $7) AS q(ref, member_ref, row_data, reason, sqlstate)",
				  7, argtypes);
	LedgerExpect(SPI_execute_plan(plan_quarantine, args, NULL, false, 0), SPI_OK_INSERT,
				  "quarantining purchases");
}

/* Recover outstanding refund debts of the batch's members from what they just earned. */
static void
AccrualRecoverDebts(AccrualBatch *b)
{
	static const Oid argtypes[] = {INT8ARRAYOID};
	Datum		arg;
	SPITupleTable *tab;
	uint64		n;

	if (b->naccounts == 0 || b->nposted_total == 0 || !b->has_debts)
		return;
	arg = AccrualInt64Array(b->accounts, b->naccounts);
	LedgerPrepare(&plan_debts,
				  "SELECT DISTINCT account_id FROM loyalty.accrual_debt"
				  " WHERE account_id = ANY ($1) AND outstanding > 0 ORDER BY 1",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_debts, &arg, NULL, false, 0), SPI_OK_SELECT, "reading debts");
	tab = SPI_tuptable;
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
		AccrualRecover(b, DatumGetInt64(SPI_getbinval(tab->vals[i], tab->tupdesc, 1, &(bool){0})));
}

/*
 * Post a batch whose rows were read (AccrualReadRows): lock, compute,
 * write, and either quarantine the bad rows or leave them to the caller.
 */
void
AccrualPostBatch(AccrualBatch *b, bool quarantine)
{
	AccrualLock(b);
	AccrualReadHistory(b);
	AccrualReadBudgets(b);
	AccrualCompute(b);
	AccrualWrite(b);
	AccrualSaveBudgets(b);
	AccrualRecoverDebts(b);
	if (quarantine)
		AccrualQuarantine(b);
}

/* The query locking the member accounts a source names, all of them, in id order. */
char *
AccrualLockSql(const char *source)
{
	return psprintf("SELECT a.id FROM loyalty.account a"
					" WHERE a.id IN (SELECT a2.id FROM (%s) n"
					"                JOIN loyalty.member m ON m.program_id = $1"
					"                                     AND m.member_ref = n.member_ref"
					"                JOIN loyalty.account a2 ON a2.member_id = m.id)"
					" ORDER BY a.id FOR UPDATE OF a",
					source);
}

static void
AccrualLockSource(AccrualBatch *b, SPIPlanPtr lock, Datum *args, char *nulls)
{
	LedgerExpect(SPI_execute_plan(lock, args, nulls, false, 0), SPI_OK_SELECT, "locking accounts");
	b->naccounts = SPI_processed;
	b->accounts = palloc(sizeof(int64) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
		b->accounts[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1,
													 &(bool){0}));
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Post a whole source (a statement's transition table) in chunks: every
 * member account the source names is locked first, in id order, then the
 * rows are read through a cursor, loyalty.accrual_chunk at a time, each chunk
 * computed and written; memory stays bounded whatever the statement's size.
 */
void
AccrualPostSource(AccrualBatch *b, SPIPlanPtr lock, SPIPlanPtr read, Datum *args, char *nulls)
{
	Portal		cursor;

	AccrualLockSource(b, lock, args, nulls);
	AccrualReadHistory(b);
	AccrualReadBudgets(b);
	b->chunk_cxt = AllocSetContextCreate(CurrentMemoryContext, "loyalty accrual chunk",
										 ALLOCSET_DEFAULT_SIZES);
	cursor = SPI_cursor_open(NULL, read, args, nulls, false);
	for (;;)
	{
		SPI_cursor_fetch(cursor, true, loyalty_accrual_chunk);
		if (SPI_processed == 0)
			break;
		AccrualReadRows(b);
		SPI_freetuptable(SPI_tuptable);
		AccrualCompute(b);
		AccrualWrite(b);
		AccrualQuarantine(b);
		MemoryContextReset(b->chunk_cxt);
		b->rows = NULL;
		b->nrows = 0;
	}
	SPI_cursor_close(cursor);
	AccrualSaveBudgets(b);
	AccrualRecoverDebts(b);
}

/* Enrol the unknown members of a source, when the program says so. */
void
AccrualEnrollUnknown(AccrualBatch *b, const char *source, Datum *args, char *nulls, int nargs,
					 Oid *argtypes)
{
	char	   *sql;
	int			rc;

	if (!b->enroll_unknown)
		return;
	sql = psprintf("SELECT loyalty.enroll(p.code, s.member_ref, occurred_at => s.at)"
				   "  FROM (SELECT n.member_ref, min(n.occurred_at) AS at FROM (%s) n"
				   "         WHERE n.member_ref IS NOT NULL AND NOT EXISTS ("
				   "               SELECT FROM loyalty.member m WHERE m.program_id = $1"
				   "                  AND m.member_ref = n.member_ref)"
				   "         GROUP BY 1 ORDER BY 1) s, loyalty.program p"
				   " WHERE p.id = $1 AND btrim(s.member_ref) <> ''",
				   source);
	rc = SPI_execute_with_args(sql, nargs, argtypes, args, nulls, false, 0);
	LedgerExpect(rc, SPI_OK_SELECT, "enrolling members");
}

/* ---- the function API ---- */

#define ACCRUE_SOURCE \
	"SELECT $3::text AS ref, $4::text AS member_ref, $5::numeric AS amount," \
	"       $6::timestamptz AS occurred_at, $7::text AS category, $8::text AS channel," \
	"       $9::text AS store, $10::jsonb AS attrs, NULL::jsonb AS whole"

static void
AccrualRaise(AccrualBatch *b, AccrualRow *r)
{
	int			code = MAKE_SQLSTATE(r->sqlstate[0], r->sqlstate[1], r->sqlstate[2], r->sqlstate[3],
									 r->sqlstate[4]);

	if (strcmp(r->sqlstate, "23505") == 0)
		ereport(ERROR,
				(errcode(code),
				 errmsg("ref \"%s\" was already used for a different purchase", r->ref),
				 errdetail("%s", AccrualDescribeExisting(b, r)),
				 errhint("Repeat a purchase with exactly the same content, or give a new purchase a new ref.")));
	if (strcmp(r->sqlstate, "LY003") == 0)
		ereport(ERROR,
				(errcode(code), errmsg("%s", r->problem),
				 errhint("Enrol the member with loyalty.enroll(), or set the program option unknown_member to \"enroll\".")));
	if (strcmp(r->sqlstate, "LY010") == 0)
		ereport(ERROR,
				(errcode(code), errmsg("%s", r->problem),
				 errhint("Set rules in force from that time with loyalty.set_earning_rules().")));
	ereport(ERROR, (errcode(code), errmsg("%s", r->problem)));
}

/* accrue(program, member_ref, amount, ref, occurred_at, category, channel, store, attrs) */
Datum
loyalty_accrue(PG_FUNCTION_ARGS)
{
	static const Oid argtypes[] = {INT8OID, TIMESTAMPTZOID, TEXTOID, TEXTOID, NUMERICOID,
		TIMESTAMPTZOID, TEXTOID, TEXTOID, TEXTOID, JSONBOID};
	char	   *program = LedgerTextArg(fcinfo, 0, "program");
	Datum		args[10];
	char		nulls[10];
	AccrualBatch b;
	AccrualRow *r;
	int64		points;

	LedgerTextArg(fcinfo, 1, "member_ref");
	LedgerTextArg(fcinfo, 3, "ref");
	if (PG_ARGISNULL(2))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("amount must not be null")));
	AccrualCheckRef(text_to_cstring(PG_GETARG_TEXT_PP(3)));
	if (!PG_ARGISNULL(4) && TIMESTAMP_NOT_FINITE(PG_GETARG_TIMESTAMPTZ(4)))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("occurred_at must be a finite time")));
	if (!PG_ARGISNULL(8) && JB_ROOT_IS_SCALAR(PG_GETARG_JSONB_P(8)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("purchase attrs must be a JSON object")));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	memset(&b, 0, sizeof(b));
	AccrualLoadProgram(&b, 0, program);

	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int64GetDatum(b.program_id);
	args[1] = TimestampTzGetDatum(b.earliest);
	args[2] = PG_GETARG_DATUM(3);
	args[3] = PG_GETARG_DATUM(1);
	args[4] = PG_GETARG_DATUM(2);
	args[5] = PG_ARGISNULL(4) ? TimestampTzGetDatum(GetCurrentTransactionStartTimestamp()) : PG_GETARG_DATUM(4);
	for (int i = 5; i < 9; i++)
	{
		args[i + 1] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[i + 1] = PG_ARGISNULL(i) ? 'n' : ' ';
	}
	if (PG_ARGISNULL(8))
	{
		args[9] = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
		nulls[9] = ' ';
	}

	AccrualEnrollUnknown(&b, ACCRUE_SOURCE, args, nulls, 10, (Oid *) argtypes);
	AccrualPrepare(&plan_accrue_read, 0, AccrualReadSql(ACCRUE_SOURCE), 10, argtypes);
	LedgerExpect(SPI_execute_plan(plan_accrue_read, args, nulls, false, 0), SPI_OK_SELECT,
				  "reading the purchase");
	AccrualReadRows(&b);
	r = &b.rows[0];
	if (r->problem != NULL)
		AccrualRaise(&b, r);
	if (r->existing)
	{
		SPI_finish();
		PG_RETURN_INT64(r->existing_points);
	}
	AccrualPostBatch(&b, false);
	points = r->points;
	if (b.ninserted == 0)
	{
		/* the same ref was committed meanwhile by a posting for another member */
		LedgerExpect(SPI_execute_plan(plan_accrue_read, args, nulls, false, 0), SPI_OK_SELECT,
					  "reading the purchase");
		AccrualReadRows(&b);
		r = &b.rows[0];
		if (r->problem != NULL)
			AccrualRaise(&b, r);
		points = r->existing_points;
	}
	SPI_finish();
	PG_RETURN_INT64(points);
}
