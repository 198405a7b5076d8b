/*
 * accrual_post.c: posting purchases, one (accrue) or a whole statement (the
 * trigger) at a time, through the same set-based path
 *
 * A batch is: read the purchases joined with their members (one query over
 * the source: the trigger's transition table or the function's arguments),
 * lock the member accounts in id order (reading their chain heads), read
 * what the rules need about the members' earlier purchases, compute every
 * purchase's points in C with the compiled rules, and write without SQL
 * (LedgerWriter): the purchases (ON CONFLICT DO NOTHING on the ref), their
 * transfers chained in memory per member account, their lots, and each
 * member account's balances once. Bad purchases raise (the function) or go
 * to the quarantine (the trigger). A one-row INSERT is read and locked by
 * accrual_fast.c and joins here at AccrualPostLocked.
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "common/int.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/bloomfilter.h"
#include "mb/pg_wchar.h"
#include "nodes/makefuncs.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "storage/itemptr.h"
#include "tcop/pquery.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "accrual.h"
#include "accrual_post.h"
#include "chain.h"
#include "ledger.h"
#include "ledger_write.h"
#include "points.h"

PG_FUNCTION_INFO_V1(loyalty_accrue);

static SPIPlanPtr plan_program;
static SPIPlanPtr plan_lock;
static SPIPlanPtr plan_days;
static SPIPlanPtr plan_campaign_add;
static SPIPlanPtr plan_campaign_lock;
static SPIPlanPtr plan_campaign_save;
static SPIPlanPtr plan_quarantine;
static SPIPlanPtr plan_debts;
static SPIPlanPtr plan_accrue_read;
static SPIPlanPtr plan_expiry;

/* Columns of the read query, in order. */
enum
{
	COL_REF = 1, COL_MEMBER_REF, COL_AMOUNT, COL_OCCURRED_AT, COL_CATEGORY, COL_CHANNEL,
	COL_STORE, COL_ATTRS, COL_MEMBER_ID, COL_STATUS, COL_TIER, COL_ACCOUNT, COL_BIRTH_MONTH,
	COL_EXISTS, COL_SAME, COL_EXISTING_POINTS, COL_EXISTING_MEMBER, COL_ROW, COL_OCCURRED_UNSET, COL_ORD
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
 * amount, occurred_at, category, channel, store, attrs, occurred_unset,
 * whole, ord) where whole is the application's row (NULL for the function
 * API) and ord its place in the statement. The read query leaves whole
 * out (NULL), so that the subquery does not build every row whole (the
 * planner drops an output nobody reads): the few rows refused get theirs
 * afterwards, by their place (AccrualWholeRows). $1 is the program. A join may
 * yield the rows in another order than the statement's: AccrualReadRows
 * puts them back in it (the first of two rows with one ref earns, and
 * first purchases, day caps and campaign budgets count in that order).
 * The member's contact row (for the birth month) is joined only when the
 * rules use birthday_month: one index probe per purchase less otherwise.
 *
 * probes (AccrualProbes): ACCRUAL_PROBE_HISTORY finds each row's earlier
 * purchase (a replay) by probing the purchase key, ACCRUAL_PROBE_MEMBERS
 * each row's member by probing the member key, in nested loops the
 * planner cannot turn into joins of whole tables (OFFSET 0 keeps each
 * subquery apart). Otherwise the planner is free to hash the program's
 * purchases and members, which it does for a statement of some thousand
 * rows whatever the size of those tables.
 */
/*
 * The join that finds each row n's member m (program $1), by probing the
 * member key per row (ACCRUAL_PROBE_MEMBERS) or as the planner likes: the
 * read query's and the lock query's. A LEFT JOIN: the read query keeps the
 * rows of unknown members to quarantine them, and the lock query's join to
 * the account drops them.
 */
static const char *
AccrualMemberJoin(int probes)
{
	return (probes & ACCRUAL_PROBE_MEMBERS) ?
		"LEFT JOIN LATERAL (SELECT mm.id, mm.status, mm.tier FROM loyalty.member mm"
		"                    WHERE mm.program_id = $1 AND mm.member_ref = n.member_ref OFFSET 0) m ON true"
		: "LEFT JOIN loyalty.member m ON m.program_id = $1 AND m.member_ref = n.member_ref";
}

char *
AccrualReadSql(const char *source, bool birthday, int probes, bool members_known)
{
	/*
	 * members_known: the batch knows the members of the source already (the
	 * lock query's, AccrualLockSource), and the query leaves out the joins
	 * that would find them again per row.
	 */
	return psprintf(
					"SELECT n.ref, n.member_ref, n.amount, n.occurred_at, n.category, n.channel, n.store,"
					"       n.attrs, %s, %s,"
					"       x.id IS NOT NULL,"
					"       (x.amount, x.occurred_at, x.category, x.channel, x.store, x.attrs)"
					"         IS NOT DISTINCT FROM (n.amount,"
					"                               CASE WHEN n.occurred_unset THEN x.occurred_at ELSE n.occurred_at END,"
					"                               n.category, n.channel, n.store, coalesce(n.attrs, '{}')),"
					"       x.points, x.member_id,"
					"       NULL::jsonb,"
					"       n.occurred_unset, n.ord"
					"  FROM (%s) n"
					"  %s"
					"  %s"
					"  %s"
					"  %s",
					members_known ? "NULL::int8, NULL::text, NULL::text, NULL::int8" : "m.id, m.status, m.tier, a.id",
					birthday && !members_known ? "extract(month FROM c.birthday)::int" : "NULL::int",
					source,
					members_known ? "" : AccrualMemberJoin(probes),
					members_known ? "" : "LEFT JOIN loyalty.account a ON a.member_id = m.id",
					birthday && !members_known ? "LEFT JOIN loyalty.member_contact c ON c.member_id = m.id" : "",
					(probes & ACCRUAL_PROBE_HISTORY) ?
					"LEFT JOIN LATERAL (SELECT e.id, e.member_id, e.amount, e.occurred_at, e.category,"
					"                           e.channel, e.store, e.attrs, e.points"
					"                    FROM loyalty.accrual e WHERE e.program_id = $1 AND e.ref = n.ref"
					"                    OFFSET 0) x ON true"
					: "LEFT JOIN loyalty.accrual x ON x.program_id = $1 AND x.ref = n.ref");
}

/* The rows of loyalty.<table>, from its pages (rows_per_page: fewer than it holds). */
static double
AccrualTableRows(const char *table, double rows_per_page)
{
	Relation	rel = LedgerOpenTable(table, AccessShareLock);
	double		rows = (double) RelationGetNumberOfBlocks(rel) * rows_per_page;

	table_close(rel, NoLock);
	return rows;
}

/*
 * How a statement of nrows purchases should find its replays and members
 * (AccrualReadSql, AccrualLockSql): by probing the key of a table that is
 * far larger than the statement, rather than letting the planner hash it.
 * Hashing reads the whole table at every statement, every purchase ever
 * posted and every member of every program, and the planner chooses it
 * up to tables some hundreds of times the statement's size (its cost of a
 * random page): a load of 50,000 purchases into a program of 10 million members
 * would read all of them, and one into a history of 100 million purchases
 * would spill a hash of them to disk. Probing costs a descent per row,
 * which pays only against a much larger table. Measured on the dev
 * server: 50,000 purchases into 1,000,000 members, 557 ms hashing the
 * members against 623-765 ms probing them (pages not in shared buffers);
 * 1,000,000 purchases over 1,000,000 posted, 3.0 s hashing the history
 * against 2.5 s probing it (pages just written). So both are probed once
 * the table holds twenty times the statement's rows: there a hash reads
 * twenty rows per row of the statement for one probe. Sizes are counted
 * from the tables' pages (with fewer rows to a page than they hold), so
 * growth since the last ANALYZE counts.
 */
int
AccrualProbes(int64 nrows)
{
	int			probes = 0;

	if (AccrualTableRows("accrual", 30.0) > 20.0 * (double) nrows)
		probes |= ACCRUAL_PROBE_HISTORY;
	if (AccrualTableRows("member", 80.0) > 20.0 * (double) nrows)
		probes |= ACCRUAL_PROBE_MEMBERS;
	return probes;
}

/*
 * Read the program: time zone, options, issuance account. What a program
 * is does not change under a posting, so it is kept with the program's
 * compiled rules (dropped with them when loyalty.program changes).
 */
void
AccrualLoadProgram(AccrualBatch *b, int64 program_id, const char *code)
{
	static const Oid argtypes[] = {INT8OID, TEXTOID};
	Datum		args[2];
	char		nulls[2] = {' ', ' '};
	AccrualProgramRules *pr = AccrualFindProgram(program_id, code);

	/*
	 * The rules' lock before the rules are used (AccrualLockRules). Waiting
	 * for it may have taken in a new version: the cache is checked again.
	 */
	if (pr != NULL)
	{
		AccrualLockRules(pr->program_id, RowExclusiveLock);
		pr = AccrualFindProgram(program_id, code);
	}
	if (pr == NULL)
	{
		HeapTuple	t;
		TupleDesc	d;
		char	   *tz;
		MemoryContext old;

		AccrualCacheLoading();
		LedgerPrepare(&plan_program,
					  "SELECT p.id, p.code, p.time_zone, coalesce(p.options ->> 'unknown_member', 'quarantine'),"
					  "       s.id, coalesce(p.options #>> '{expiry,policy}' IN ('fixed', 'calendar'), false),"
					  "       p.options #>> '{expiry,policy}' IS DISTINCT FROM 'rolling'"
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
		t = SPI_tuptable->vals[0];
		d = SPI_tuptable->tupdesc;
		program_id = DatumGetInt64(SPI_getbinval(t, d, 1, &(bool){0}));
		AccrualLockRules(program_id, RowExclusiveLock);
		pr = AccrualProgram(program_id);
		old = MemoryContextSwitchTo(AccrualCacheMemory());
		pr->code = SPI_getvalue(t, d, 2);
		tz = SPI_getvalue(t, d, 3);
		pr->enroll_unknown = strcmp(SPI_getvalue(t, d, 4), "enroll") == 0;
		pr->issuance = DatumGetInt64(SPI_getbinval(t, d, 5, &(bool){0}));
		pr->program_expires = DatumGetBool(SPI_getbinval(t, d, 6, &(bool){0}));
		pr->defers = DatumGetBool(SPI_getbinval(t, d, 7, &(bool){0}));
		MemoryContextSwitchTo(old);
		pr->tz = pg_tzset(tz);
		if (pr->tz == NULL)
			elog(ERROR, "program \"%s\" has an unknown time zone \"%s\"", pr->code, tz);
		pr->has_program = true;
		SPI_freetuptable(SPI_tuptable);
	}
	b->program_id = pr->program_id;
	b->code = pr->code;
	b->tz = pr->tz;
	b->enroll_unknown = pr->enroll_unknown;
	b->issuance = pr->issuance;
	b->program_expires = pr->program_expires;
	b->defers = pr->defers;
	b->has_debts = false;		/* learnt per account when they are locked */
	b->rules = pr;
	b->earliest = b->rules->nversions > 0 ? b->rules->versions[0].effective_from : DT_NOEND;
}

/*
 * Before a posting under REPEATABLE READ, which reads the rules of its
 * snapshot: a program whose first daily cap was committed since would get
 * purchases not marked for the cap (set_earning_rules marked those before
 * it, and waited for the postings in progress). Such a posting fails with
 * a serialization failure, to be retried, as for an attachment changed
 * after the snapshot. READ COMMITTED reads the latest rules instead
 * (AccrualProgram).
 */
void
AccrualCheckFirstCap(AccrualBatch *b)
{
	static SPIPlanPtr plan_cap;
	static const Oid argtypes[] = {INT8OID};
	Datum		arg = Int64GetDatum(b->program_id);

	if (!IsolationUsesXactSnapshot() || b->rules->uses_day_cap)
		return;
	LedgerPrepare(&plan_cap,
				  "SELECT FROM loyalty.earning_rule WHERE program_id = $1"
				  "   AND rules #> '{caps,per_member_per_day}' IS NOT NULL LIMIT 1",
				  1, argtypes);
	PushActiveSnapshot(GetLatestSnapshot());
	LedgerExpect(SPI_execute_plan(plan_cap, &arg, NULL, true, 1), SPI_OK_SELECT, "reading the daily cap");
	PopActiveSnapshot();
	if (SPI_processed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to a daily cap set concurrently in program \"%s\"", b->code),
				 errdetail("The program's first per_member_per_day cap was set after this transaction's snapshot was taken."),
				 errhint("The transaction might succeed if retried.")));
}

/*
 * A row of the read query, deformed once (SPI_getbinval per column walks
 * the tuple from its first variable-width column each time).
 */
typedef struct AccrualReadTuple
{
	Datum		values[COL_ORD];
	bool		nulls[COL_ORD];
} AccrualReadTuple;

#define ACCRUAL_COL(t, col) ((t)->values[(col) - 1])
#define ACCRUAL_NULL(t, col) ((t)->nulls[(col) - 1])

static char *
AccrualText(const AccrualReadTuple *t, int col)
{
	return ACCRUAL_NULL(t, col) ? NULL : TextDatumGetCString(ACCRUAL_COL(t, col));
}

/*
 * The row repeats a ref already used for another purchase (posted before,
 * or earlier in the batch): its content is the first one's (a repeat) or
 * it is refused, 23505. A repeat of a posted purchase is noted: an attached
 * table's order deleted and inserted again undoes the DELETE's refund.
 */
static void
AccrualRepeat(AccrualRow *r, int64 first_points, bool same, bool posted)
{
	r->existing = true;
	r->existing_points = first_points;
	r->repeats_posted = posted;
	if (!same)
		r->problem = psprintf("ref \"%s\" was already used for a different purchase", r->ref),
			r->sqlstate = "23505";
}

/* Whether a string is empty or only spaces (as btrim() sees it). */
static bool
AccrualBlank(const char *s)
{
	for (; *s; s++)
		if (*s != ' ')
			return false;
	return true;
}

/* Decide what is wrong with a row, if anything. */
static void
AccrualProblem(AccrualBatch *b, AccrualRow *r, const AccrualReadTuple *t, const char *status)
{
	if (r->ref == NULL)
		r->problem = "the purchase has no ref", r->sqlstate = "22004";
	else if (r->ref[0] == '\0' || LedgerLongerThan(r->ref, 200))
		r->problem = psprintf("invalid ref \"%s\": a ref has 1 to 200 characters", r->ref),
			r->sqlstate = "22023";
	else if (r->member_ref == NULL)
		r->problem = "the purchase has no member", r->sqlstate = "22004";
	else if (AccrualBlank(r->member_ref) || LedgerLongerThan(r->member_ref, 200))
		r->problem = psprintf("invalid member_ref \"%s\": a member_ref has 1 to 200 characters, not all blank",
							  r->member_ref),
			r->sqlstate = "22023";
	else if (r->amount_null)
		r->problem = "the purchase has no amount", r->sqlstate = "22004";
	else if (numeric_is_nan(DatumGetNumeric(r->amount)) || numeric_is_inf(DatumGetNumeric(r->amount)))
		r->problem = psprintf("the amount %s is not a finite number", DatumGetCString(DirectFunctionCall1(numeric_out, r->amount))),
			r->sqlstate = "22023";
	else if (r->amount_d < 0)
		r->problem = psprintf("the amount %s is negative", DatumGetCString(DirectFunctionCall1(numeric_out, r->amount))),
			r->sqlstate = "22023";
	else if (TIMESTAMP_NOT_FINITE(r->occurred_at))
		r->problem = psprintf("the purchase time %s is not finite", timestamptz_to_str(r->occurred_at)),
			r->sqlstate = "22008";
	else if (r->account_id == 0)
		r->problem = psprintf("member \"%s\" does not exist in program \"%s\"", r->member_ref, b->code),
			r->sqlstate = "LY003";
	else if (strcmp(status, "active") != 0)
		r->problem = psprintf("member \"%s\" of program \"%s\" is %s", r->member_ref, b->code, status),
			r->sqlstate = "LY004";
	else if (DatumGetBool(ACCRUAL_COL(t, COL_EXISTS)))
		AccrualRepeat(r, DatumGetInt64(ACCRUAL_COL(t, COL_EXISTING_POINTS)),
					  DatumGetBool(ACCRUAL_COL(t, COL_SAME)) &&
					  DatumGetInt64(ACCRUAL_COL(t, COL_EXISTING_MEMBER)) == r->member_id, true);
	else if ((r->rules = AccrualRulesAt(b->rules, r->occurred_at)) == NULL)
		r->problem = psprintf("program \"%s\" has no earning rules in force at %s", b->code,
							  timestamptz_to_str(r->occurred_at)),
			r->sqlstate = "LY010";
	else if (!AccrualInRange(r->rules, r->amount_d))
		r->problem = psprintf("the amount %s would earn more points than can be counted",
							  DatumGetCString(DirectFunctionCall1(numeric_out, r->amount))),
			r->sqlstate = "22003";
}

static int
AccrualCmpOrd(const void *a, const void *b)
{
	int64		x = ((const AccrualRow *) a)->ord,
				y = ((const AccrualRow *) b)->ord;

	return x < y ? -1 : x > y ? 1 : 0;
}

/* One row of the read query (deformed into t) into r. */
static void
AccrualReadRow(AccrualBatch *b, AccrualRow *r, const AccrualReadTuple *t)
{
	const char *status;

	r->ref = AccrualText(t, COL_REF);
	r->member_ref = AccrualText(t, COL_MEMBER_REF);
	r->amount_null = ACCRUAL_NULL(t, COL_AMOUNT);
	if (!r->amount_null)
	{
		r->amount = datumCopy(ACCRUAL_COL(t, COL_AMOUNT), false, -1);
		r->amount_d = AccrualAmount(r->amount);
	}
	r->occurred_at = ACCRUAL_NULL(t, COL_OCCURRED_AT) ? 0 : DatumGetTimestampTz(ACCRUAL_COL(t, COL_OCCURRED_AT));
	r->occurred_unset = ACCRUAL_NULL(t, COL_OCCURRED_UNSET) ? false : DatumGetBool(ACCRUAL_COL(t, COL_OCCURRED_UNSET));
	r->ord = ACCRUAL_NULL(t, COL_ORD) ? 0 : DatumGetInt64(ACCRUAL_COL(t, COL_ORD));
	if (b->trans != NULL && (r->ord - b->ord_base < 1 || r->ord - b->ord_base > b->statement_rows))
		b->ord_ok = false;
	r->category = AccrualText(t, COL_CATEGORY);
	r->channel = AccrualText(t, COL_CHANNEL);
	r->store = AccrualText(t, COL_STORE);
	r->attrs_null = ACCRUAL_NULL(t, COL_ATTRS);
	if (!r->attrs_null)
		r->attrs = datumCopy(ACCRUAL_COL(t, COL_ATTRS), false, -1);
	if (b->members != NULL)
	{
		AccrualMember *m = r->member_ref == NULL ? NULL :
			hash_search(b->members, &r->member_ref, HASH_FIND, NULL);

		/* not in it: unknown when the statement's accounts were locked */
		r->member_id = m ? m->member_id : 0;
		r->tier = m ? m->tier : NULL;
		r->account_id = m ? m->account_id : 0;
		r->birth_month = m ? m->birth_month : 0;
		r->head = m ? m->head : NULL;
		status = m ? m->status : NULL;
	}
	else
	{
		r->member_id = ACCRUAL_NULL(t, COL_MEMBER_ID) ? 0 : DatumGetInt64(ACCRUAL_COL(t, COL_MEMBER_ID));
		r->tier = AccrualText(t, COL_TIER);
		r->account_id = ACCRUAL_NULL(t, COL_ACCOUNT) ? 0 : DatumGetInt64(ACCRUAL_COL(t, COL_ACCOUNT));
		r->birth_month = ACCRUAL_NULL(t, COL_BIRTH_MONTH) ? 0 : DatumGetInt32(ACCRUAL_COL(t, COL_BIRTH_MONTH));
		status = r->account_id != 0 ? AccrualText(t, COL_STATUS) : NULL;
	}
	r->whole_null = ACCRUAL_NULL(t, COL_ROW);
	if (!r->whole_null)
		r->whole = datumCopy(ACCRUAL_COL(t, COL_ROW), false, -1);
	AccrualProblem(b, r, t, status);
}

/*
 * The rows read, in the statement's order: a hash join (after ANALYZE, say)
 * does not always keep it. Sorting the rows here, only when they are out of
 * order, costs far less than a sort in the query, which would carry every
 * column. A statement read in several chunks is put in order within each
 * chunk.
 */
static void
AccrualSortRows(AccrualBatch *b)
{
	for (int i = 1; i < b->nrows; i++)
		if (b->rows[i].ord < b->rows[i - 1].ord)
		{
			qsort(b->rows, b->nrows, sizeof(AccrualRow), AccrualCmpOrd);
			break;
		}
}

/* Room for n rows, zeroed: loyalty.accrual_chunk allows more than 1 GB of them. */
static AccrualRow *
AccrualAllocRows(Size n)
{
	return MemoryContextAllocExtended(CurrentMemoryContext, sizeof(AccrualRow) * n,
									  MCXT_ALLOC_HUGE | MCXT_ALLOC_ZERO);
}

/* Copy the rows of the read query (SPI_tuptable) into the batch. */
void
AccrualReadRows(AccrualBatch *b)
{
	TupleDesc	desc = SPI_tuptable->tupdesc;
	MemoryContext old = AccrualChunkMemory(b);

	b->nrows = SPI_processed;
	b->rows = AccrualAllocRows(Max(b->nrows, 1));
	if (desc->natts != COL_ORD)
		elog(ERROR, "the read query returned %d columns, not %d", desc->natts, COL_ORD);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		AccrualReadTuple t;

		heap_deform_tuple(SPI_tuptable->vals[i], desc, t.values, t.nulls);
		AccrualReadRow(b, &b->rows[i], &t);
	}
	AccrualSortRows(b);
	MemoryContextSwitchTo(old);
}

/*
 * The rows of a chunked statement's read query go straight from the
 * executor's slots into the batch (AccrualPostSource): no result tuple is
 * formed for SPI and deformed again, 3 % of a bulk insert's time.
 */
typedef struct AccrualReceiver
{
	DestReceiver pub;
	AccrualBatch *b;
	int			capacity;
} AccrualReceiver;

static bool
AccrualReceiveSlot(TupleTableSlot *slot, DestReceiver *self)
{
	AccrualReceiver *rc = (AccrualReceiver *) self;
	AccrualBatch *b = rc->b;
	AccrualReadTuple t;
	MemoryContext old;

	if (slot->tts_tupleDescriptor->natts != COL_ORD)
		elog(ERROR, "the read query returned %d columns, not %d", slot->tts_tupleDescriptor->natts, COL_ORD);
	if (b->nrows >= rc->capacity)
		elog(ERROR, "the read query returned more than the %d rows fetched", rc->capacity);
	slot_getallattrs(slot);
	memcpy(t.values, slot->tts_values, sizeof(t.values));
	memcpy(t.nulls, slot->tts_isnull, sizeof(t.nulls));
	old = AccrualChunkMemory(b);
	AccrualReadRow(b, &b->rows[b->nrows++], &t);
	MemoryContextSwitchTo(old);
	return true;
}

static void
AccrualReceiveStartup(DestReceiver *self, int operation, TupleDesc typeinfo)
{
}

static void
AccrualReceiveNothing(DestReceiver *self)
{
}

/*
 * Fetch the next chunk of cursor (at most capacity rows) into the rows the
 * batch keeps for its chunks (AccrualPostSource);
 * returns how many were read.
 */
static int
AccrualFetchRows(AccrualBatch *b, Portal cursor, int capacity)
{
	AccrualReceiver rc;

	b->rows = b->chunk_rows;
	b->nrows = 0;
	memset(&rc, 0, sizeof(rc));
	rc.pub.receiveSlot = AccrualReceiveSlot;
	rc.pub.rStartup = AccrualReceiveStartup;
	rc.pub.rShutdown = AccrualReceiveNothing;
	rc.pub.rDestroy = AccrualReceiveNothing;
	rc.pub.mydest = DestNone;
	rc.b = b;
	rc.capacity = capacity;
	PortalRunFetch(cursor, FETCH_FORWARD, capacity, &rc.pub);
	AccrualSortRows(b);
	return b->nrows;
}

static int
AccrualCmpInt64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a,
				y = *(const int64 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/* An int8[] of the values. */
Datum
AccrualInt64Array(int64 *v, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int64GetDatum(v[i]);
	return PointerGetDatum(construct_array(d, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
}

/* A table of AccrualHead by account, for about n accounts. */
HTAB *
AccrualHeadTable(long n)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(AccrualHead);
	ctl.hcxt = CurrentMemoryContext;
	return hash_create("loyalty accrual heads", Max(n, 16), &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

/* Make ref the latest purchase of head h (kept in the heads' own memory). */
static void
AccrualSetLastRef(AccrualHead *h, const char *ref)
{
	int			size = strlen(ref) + 1;

	if (size > h->last_ref_size)
	{
		if (h->last_ref != NULL)
			pfree(h->last_ref);
		h->last_ref_size = Max(size, 32);
		h->last_ref = MemoryContextAlloc(h->cxt, h->last_ref_size);
	}
	memcpy(h->last_ref, ref, size);
}

/*
 * Add a locked account to the batch's heads (in the memory the table was
 * made in): its last_hash, row version, deferred_day (whether it has
 * purchases whose journal lines are deferred) and last_purchase_ref.
 */
AccrualHead *
AccrualAddHead(AccrualBatch *b, int64 account, Datum last_hash, bool isnull, ItemPointer tid,
			   Datum deferred_day, bool deferred_null, Datum last_ref, bool last_ref_null)
{
	AccrualHead *h = hash_search(b->heads, &account, HASH_ENTER, NULL);

	memset(h, 0, sizeof(AccrualHead));
	h->account_id = account;
	h->cxt = CurrentMemoryContext;
	ItemPointerCopy(tid, &h->tid);
	h->deferring = !deferred_null;
	if (!deferred_null)
		h->deferred_day = DatumGetDateADT(deferred_day);
	if (!last_ref_null)
		AccrualSetLastRef(h, TextDatumGetCString(last_ref));
	if (!isnull)
	{
		bytea	   *v = DatumGetByteaPP(last_hash);

		if (VARSIZE_ANY_EXHDR(v) != CHAIN_HASH_LEN)
			elog(ERROR, "account %lld has a malformed last_hash", (long long) account);
		memcpy(h->hash, VARDATA_ANY(v), CHAIN_HASH_LEN);
		h->has_hash = true;
	}
	return h;
}

/*
 * The heads of the locked accounts' chains, from the lock query's result
 * (id, last_hash, ctid of the locked version): writes chain onto them in
 * memory and update the rows in place.
 *
 * Whether the accounts owe refund debt is not a column of the lock query:
 * under READ COMMITTED, a lock that waited behind a refund returns the
 * account's latest version, but a subquery of the same statement still
 * reads with the snapshot taken before the wait and would miss the debt
 * that refund recorded. AccrualRecoverDebts asks after the lock, with a
 * snapshot of its own, whenever any debt was ever recorded.
 */
static void
AccrualReadHeads(AccrualBatch *b)
{
	b->heads = AccrualHeadTable(SPI_processed);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		int64		id = DatumGetInt64(SPI_getbinval(t, SPI_tuptable->tupdesc, 1, &(bool){0}));
		bool		isnull;
		Datum		d = SPI_getbinval(t, SPI_tuptable->tupdesc, 2, &isnull);

		bool		dnull;
		Datum		day = SPI_getbinval(t, SPI_tuptable->tupdesc, 4, &dnull);
		bool		rnull;
		Datum		last_ref = SPI_getbinval(t, SPI_tuptable->tupdesc, 5, &rnull);

		AccrualAddHead(b, id, d, isnull,
					   (ItemPointer) DatumGetPointer(SPI_getbinval(t, SPI_tuptable->tupdesc, 3, &(bool){0})),
					   day, dnull, last_ref, rnull);
	}
	b->has_debts = AccrualDebtsRecorded();
}

/*
 * Whether any refund debt was ever recorded: a program that never clawed
 * back more than a member held has no row in loyalty.accrual_debt, and an
 * empty table answers without a query.
 */
bool
AccrualDebtsRecorded(void)
{
	return AccrualTableRows("accrual_debt", 1.0) > 0;
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
				  "SELECT a.id, a.last_hash, a.ctid, a.deferred_day, a.last_purchase_ref"
				  "  FROM loyalty.account a WHERE a.id = ANY ($1) ORDER BY a.id FOR UPDATE",
				  1, argtypes);
	arg = AccrualInt64Array(ids, u);
	LedgerExpect(SPI_execute_plan(plan_lock, &arg, NULL, false, 0), SPI_OK_SELECT, "locking accounts");
	AccrualReadHeads(b);
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

static void
AccrualForget(HTAB *h, int64 account, int32 day)
{
	AccrualDayKey key;

	memset(&key, 0, sizeof(key));
	key.account = account;
	key.day = day;
	hash_search(h, &key, HASH_REMOVE, NULL);
}

/* What the rules need about earlier purchases, read under the lock. */
static void
AccrualReadHistory(AccrualBatch *b)
{
	static const Oid argtypes[] = {INT8ARRAYOID};

	b->days = AccrualDayTable();
	if (b->naccounts == 0)
		return;
	if (b->rules->uses_first)
	{
		/* a member with a purchase has the head of a list of them */
		HASH_SEQ_STATUS seq;
		AccrualHead *h;

		hash_seq_init(&seq, b->heads);
		while ((h = hash_seq_search(&seq)) != NULL)
			if (h->last_ref != NULL)
				AccrualPut(b->days, h->account_id, PG_INT32_MIN, 1);
	}
	if (b->rules->uses_day_cap)
	{
		Datum		arg = AccrualInt64Array(b->accounts, b->naccounts);

		LedgerPrepare(&plan_days,
					  "SELECT account_id, day - date '2000-01-01', sum(points)::bigint FROM loyalty.accrual"
					  " WHERE account_id = ANY ($1) AND day_capped GROUP BY 1, 2",
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

static bool
AccrualSameStr(const char *a, const char *b)
{
	return (a == NULL || b == NULL) ? a == b : strcmp(a, b) == 0;
}

/*
 * Two purchases are the same: member, amount, time, category, channel,
 * store and attrs (none is {}); the read query's COL_SAME says the same.
 * A purchase that did not say when it happened (accrue() without
 * occurred_at, an attached table without the column or with NULL in it)
 * is posted at the transaction's start, and that time is not part of what
 * it is: a retry in a later transaction is the same purchase.
 */
static bool
AccrualSameRow(const AccrualRow *a, const AccrualRow *b)
{
	Datum		empty;

	if (a->member_id != b->member_id ||
		(a->occurred_at != b->occurred_at && !a->occurred_unset && !b->occurred_unset) ||
		!AccrualSameStr(a->category, b->category) || !AccrualSameStr(a->channel, b->channel) ||
		!AccrualSameStr(a->store, b->store) ||
		!DatumGetBool(DirectFunctionCall2(numeric_eq, a->amount, b->amount)))
		return false;
	if (a->attrs_null && b->attrs_null)
		return true;
	empty = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
	return DatumGetBool(DirectFunctionCall2(jsonb_eq, a->attrs_null ? empty : a->attrs,
											b->attrs_null ? empty : b->attrs));
}

/* A text column of a posted purchase, or NULL. */
static char *
AccrualStoredText(Relation rel, TupleTableSlot *slot, const char *column)
{
	bool		isnull;
	Datum		d = slot_getattr(slot, LedgerAttnum(rel, column), &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * The purchase r under a ref already posted (the loyalty.accrual row in
 * slot): the same purchase (as AccrualSameRow tells) is a repeat and earns
 * nothing more; a different one is refused as a ref used twice (23505,
 * quarantined or raised by the caller).
 */
static void
AccrualPostedBefore(AccrualRow *r, Relation rel, TupleTableSlot *slot)
{
	AccrualRow	posted = {0};
	bool		isnull;

	posted.member_id = DatumGetInt64(slot_getattr(slot, LedgerAttnum(rel, "member_id"), &isnull));
	posted.amount = slot_getattr(slot, LedgerAttnum(rel, "amount"), &isnull);
	posted.occurred_at = DatumGetTimestampTz(slot_getattr(slot, LedgerAttnum(rel, "occurred_at"), &isnull));
	posted.category = AccrualStoredText(rel, slot, "category");
	posted.channel = AccrualStoredText(rel, slot, "channel");
	posted.store = AccrualStoredText(rel, slot, "store");
	posted.attrs = slot_getattr(slot, LedgerAttnum(rel, "attrs"), &posted.attrs_null);
	AccrualRepeat(r, DatumGetInt64(slot_getattr(slot, LedgerAttnum(rel, "points"), &isnull)),
				  AccrualSameRow(&posted, r), true);
}

/*
 * Rows of a later chunk whose ref an earlier chunk of the same statement
 * posted (the read query's snapshot, taken when the statement's cursor
 * opened, cannot see those): found through a Bloom filter of the refs
 * posted so far, then the purchase itself, so that a repeat is decided
 * before anything is computed, as within a chunk.
 */
static void
AccrualEarlierChunks(AccrualBatch *b)
{
	Relation	rel = NULL;
	TupleTableSlot *slot = NULL;
	Snapshot	snap = NULL;

	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];
		Datum		keys[2];

		if (r->problem != NULL || r->existing ||
			bloom_lacks_element(b->posted_refs, (unsigned char *) r->ref, strlen(r->ref)))
			continue;
		if (rel == NULL)
		{
			CommandCounterIncrement();	/* the earlier chunks' purchases */
			snap = RegisterSnapshot(GetTransactionSnapshot());
			rel = LedgerOpenTable("accrual", AccessShareLock);
			slot = table_slot_create(rel, NULL);
		}
		keys[0] = Int64GetDatum(b->program_id);
		keys[1] = CStringGetTextDatum(r->ref);
		if (LedgerIndexFetch(rel, "accrual_pkey", 2, keys, snap, slot))
			AccrualPostedBefore(r, rel, slot);
	}
	if (rel != NULL)
	{
		ExecDropSingleTupleTableSlot(slot);
		table_close(rel, NoLock);
		UnregisterSnapshot(snap);
	}
}

/* Remember the refs this chunk posted, for the statement's later chunks. */
static void
AccrualRememberRefs(AccrualBatch *b)
{
	for (int i = 0; i < b->nrows; i++)
		if (b->rows[i].accrual_id != 0)
			bloom_add_element(b->posted_refs, (unsigned char *) b->rows[i].ref, strlen(b->rows[i].ref));
}

/*
 * A ref twice in the batch (a line repeated by the point of sale or an
 * import): the first row is the purchase; a later one is a repeat of it
 * (nothing to post) or, with other content, refused (23505). Decided before
 * anything is computed, so that a repeat does not count towards the
 * member's first purchase, day cap or a campaign budget.
 */
static void
AccrualDuplicates(AccrualBatch *b)
{
	uint32		size = 16;
	uint32	   *hashes;
	int		   *slots;

	if (b->posted_refs != NULL)
		AccrualEarlierChunks(b);
	if (b->nrows < 2)
		return;

	/*
	 * The first row of each ref, in an open-addressing table of row numbers
	 * (-1: empty) at least twice the rows' size: one probe or two per row,
	 * where sorting the rows' hashes cost 550 instructions a row.
	 */
	while (size < (uint32) b->nrows * 2)
		size <<= 1;
	slots = palloc(sizeof(int) * size);
	hashes = palloc(sizeof(uint32) * size);
	memset(slots, -1, sizeof(int) * size);
	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];
		uint32		h;
		uint32		k;

		if (r->problem != NULL || r->existing)
			continue;
		h = hash_bytes((const unsigned char *) r->ref, strlen(r->ref));
		for (k = h & (size - 1); slots[k] >= 0; k = (k + 1) & (size - 1))
			if (hashes[k] == h && strcmp(b->rows[slots[k]].ref, r->ref) == 0)
				break;
		if (slots[k] >= 0)
			AccrualRepeat(r, 0, AccrualSameRow(&b->rows[slots[k]], r), false);
		else
		{
			slots[k] = i;
			hashes[k] = h;
		}
	}
	pfree(slots);
	pfree(hashes);
}

/*
 * Compute the points of one good row, on top of what the rows before it in
 * the statement added to the batch's state (first purchases, day totals,
 * campaign budgets), and add its own.
 */
static void
AccrualComputeRow(AccrualBatch *b, AccrualRow *r, StringInfo buf)
{
	AccrualInput in;
	AccrualDayEntry *e;
	int			month;

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
	r->first_marked = in.first_purchase;
	r->budget_before = NULL;
	if (b->state.nbudgets > 0)
	{
		r->budget_before = palloc(sizeof(int64) * b->state.nbudgets);
		for (int i = 0; i < b->state.nbudgets; i++)
			r->budget_before[i] = b->state.budgets[i].added;
	}
	e = b->rules->uses_day_cap ? AccrualGet(b->days, r->account_id, in.day) : NULL;
	b->state.day_used = e ? e->used : 0;
	if (AccrualRebuilt(r->rules, &in))
	{
		r->points = AccrualEvaluate(r->rules, &in, &b->state, NULL);
		r->breakdown = NULL;
	}
	else
	{
		resetStringInfo(buf);
		r->points = AccrualEvaluate(r->rules, &in, &b->state, buf);
		r->breakdown = pstrdup(buf->data);
	}
	if (b->rules->uses_day_cap)
		AccrualPut(b->days, r->account_id, in.day, r->points);
	r->vests_at = r->occurred_at + (int64) r->rules->pending_days * USECS_PER_DAY;
}

/* Compute the points of every good row, in the order of the statement. */
static void
AccrualCompute(AccrualBatch *b)
{
	StringInfoData buf;
	MemoryContext old = AccrualChunkMemory(b);

	AccrualDuplicates(b);
	initStringInfo(&buf);
	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];

		if (r->problem != NULL || r->existing)
			continue;
		AccrualComputeRow(b, r, &buf);
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

/*
 * When the lot of each good row listed (rows; NULL: rows 0..nrows-1)
 * expires, for rows whose program or rule version dates lots (one query;
 * NULL for the others).
 */
static void
AccrualDate(AccrualBatch *b, const int *rows, int nrows)
{
	static const Oid argtypes[] = {INT8OID, INT4ARRAYOID, TIMESTAMPTZARRAYOID};
	Datum	   *versions;
	Datum	   *times;
	int		   *which;
	int			n = 0;
	Datum		args[3];
	MemoryContext old = AccrualChunkMemory(b);

	versions = palloc(sizeof(Datum) * Max(nrows, 1));
	times = palloc(sizeof(Datum) * Max(nrows, 1));
	which = palloc(sizeof(int) * Max(nrows, 1));
	for (int k = 0; k < nrows; k++)
	{
		int			i = rows == NULL ? k : rows[k];
		AccrualRow *r = &b->rows[i];

		r->expires_null = true;
		if (r->problem != NULL || r->existing || r->points <= 0)
			continue;
		if (!b->program_expires && !r->rules->has_expiry)
			continue;
		versions[n] = Int32GetDatum(r->rules->version);
		times[n] = TimestampTzGetDatum(r->occurred_at);
		which[n++] = i;
	}
	if (n == 0)
	{
		MemoryContextSwitchTo(old);
		return;
	}
	args[0] = Int64GetDatum(b->program_id);
	args[1] = PointerGetDatum(construct_array(versions, n, INT4OID, 4, true, TYPALIGN_INT));
	args[2] = PointerGetDatum(construct_array(times, n, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE));
	MemoryContextSwitchTo(old);
	AccrualPrepare(&plan_expiry, 0,
				   "SELECT loyalty._lot_expiry(coalesce(r.rules -> 'expiry', p.options -> 'expiry'),"
				   "                           p.time_zone, s.at)"
				   "  FROM unnest($2, $3) WITH ORDINALITY AS s(version, at, i)"
				   "  JOIN loyalty.program p ON p.id = $1"
				   "  JOIN loyalty.earning_rule r ON r.program_id = $1 AND r.version = s.version"
				   " ORDER BY s.i",
				   3, argtypes);
	LedgerExpect(SPI_execute_plan(plan_expiry, args, NULL, true, 0), SPI_OK_SELECT, "dating lots");
	if (SPI_processed != (uint64) n)
		elog(ERROR, "dating lots returned %llu rows for %d", (unsigned long long) SPI_processed, n);
	for (int k = 0; k < n; k++)
	{
		AccrualRow *r = &b->rows[which[k]];
		Datum		d = SPI_getbinval(SPI_tuptable->vals[k], SPI_tuptable->tupdesc, 1, &r->expires_null);

		if (!r->expires_null)
			r->expires_at = DatumGetTimestampTz(d);
	}
	SPI_freetuptable(SPI_tuptable);
}

/* The expiry dates of the lots of every row that earns. */
static void
AccrualExpiries(AccrualBatch *b)
{
	AccrualDate(b, NULL, b->nrows);
}

static const char *const accrual_cols[] = {"id", "program_id", "ref", "member_id", "account_id",
	"amount", "occurred_at", "day", "category", "channel", "store", "attrs", "rule_version", "points",
"vests_at", "expires_at", "breakdown", "refunded_amount", "refunded_points", "posted_at", "transfer_id",
"actor", "prev_ref", "day_capped"};

static Datum
AccrualTextOrNull(const char *s, bool *isnull)
{
	*isnull = s == NULL;
	return s ? CStringGetTextDatum(s) : (Datum) 0;
}

static const char *const transfer_cols[] = {"id", "program_id", "debit_account_id", "credit_account_id",
	"amount", "kind", "ref", "occurred_at", "posted_at", "rule_version", "actor", "reason",
"debit_prev_hash", "credit_prev_hash", "hash"};
static const char *const lot_cols[] = {"id", "account_id", "transfer_id", "amount", "remaining",
"occurred_at", "vests_at", "expires_at", "pending"};

/*
 * The writer of purchases' journal lines: ids are the purchases' own, and
 * every line is of kind accrual, so the journal's indexes that leave
 * accruals out are not even opened.
 */
static LedgerWriter *
AccrualTransferWriter(bool bulk)
{
	LedgerWriter *tw = LedgerWriterOpen("transfer", transfer_cols, lengthof(transfer_cols), NULL, bulk, NULL);

	LedgerWriterConstant(tw, "kind");
	return tw;
}

/*
 * The writer of the lots of the purchases at which[0..n) that earn. When
 * none of them expires, lot_expiry_idx (expires_at IS NOT NULL) can take
 * none of their lots; when all are pending or all are not, lot_pending_idx
 * (WHERE pending) takes all or none: such columns are declared the same in
 * every row, and an index that can never take one is not opened
 * (LedgerWriterConstant). A program without expiry and without a return
 * window writes two index entries per lot instead of four.
 */
static LedgerWriter *
AccrualLotWriter(AccrualBatch *b, const int *which, int n, bool bulk)
{
	LedgerWriter *lw = LedgerWriterOpen("lot", lot_cols, lengthof(lot_cols), NULL, bulk, NULL);
	bool		expires = false;
	int			pending = -1;	/* -1: none seen yet, 2: both */

	for (int k = 0; k < n; k++)
	{
		AccrualRow *r = &b->rows[which[k]];
		int			p = r->vests_at > r->occurred_at;

		if (r->accrual_id == 0 || r->points <= 0 || r->deferred)
			continue;
		expires |= !r->expires_null;
		pending = pending == -1 || pending == p ? p : 2;
	}
	if (!expires)
		LedgerWriterConstant(lw, "expires_at");
	if (pending != 2)
		LedgerWriterConstant(lw, "pending");
	return lw;
}

/*
 * A purchase whose ref a concurrent transaction (or this statement) posted
 * first: the row at tid, which its insert found.
 */
static void
AccrualLostRace(AccrualRow *r, LedgerWriter *w, ItemPointer tid)
{
	r->accrual_id = 0;
	AccrualPostedBefore(r, w->rel, LedgerWriterRow(w, tid));
}

/* Take back what computing row r added to the batch's day totals and first purchases. */
static void
AccrualUncount(AccrualBatch *b, AccrualRow *r)
{
	if (b->rules->uses_day_cap)
		AccrualPut(b->days, r->account_id, r->day, -r->points);
	if (r->first_marked)
		AccrualForget(b->days, r->account_id, PG_INT32_MIN);
}

/*
 * Row which[k] lost its ref to a concurrent transaction when written. It
 * counted towards its member's first purchase, that day's total and the
 * campaign budgets, and so did every row computed after it, on top of it.
 * Take back what rows which[k..n-1] added to that state (the budgets as
 * they were before row k) and return true: the caller computes each later
 * row again just before writing it, so that it counts only the rows
 * actually written. The rows before k never counted it and are written as
 * they stand, and the budgets saved after the write lose its grant.
 * redo: this already happened for an earlier row of the chunk, and rows
 * after that one were computed again as they came, so only row k's own
 * share is taken back. False when the rules keep no such state.
 */
static bool
AccrualUncountFrom(AccrualBatch *b, int *which, int k, int n, bool redo)
{
	AccrualRow *lost = &b->rows[which[k]];

	if (!(b->rules->uses_first || b->rules->uses_day_cap || b->state.nbudgets > 0))
		return false;
	for (int j = redo ? k : n - 1; j >= k; j--)
		AccrualUncount(b, &b->rows[which[j]]);
	for (int i = 0; i < b->state.nbudgets; i++)
		b->state.budgets[i].added = lost->budget_before[i];
	return true;
}

static int64 AccrualAddPoints(int64 a, int64 b);

/*
 * Whether purchase r's journal line and lot are deferred (written later by
 * loyalty._materialize, docs/accrual.md "Deferred journal lines"): when it
 * earns, its program's expiry is not rolling (a rolling lapse reads the
 * account's lines as they are written), and it is still pending, or its
 * account already has deferred purchases: lines are chained in id order,
 * so none may be written while an earlier one of the account waits.
 */
static AccrualHead *
AccrualDecideDeferral(AccrualBatch *b, AccrualRow *r)
{
	AccrualHead *h = r->head != NULL ? r->head : hash_search(b->heads, &r->account_id, HASH_FIND, NULL);

	if (h == NULL)
		elog(ERROR, "account %lld was not locked", (long long) r->account_id);
	r->deferred = b->defers && r->points > 0 && (r->vests_at > r->occurred_at || h->deferring);
	return h;
}

/* Count deferred purchase r, inserted, in its account's head h. */
static void
AccrualDeferred(AccrualHead *h, AccrualRow *r)
{
	TimestampTz due = (r->expires_null || r->vests_at < r->expires_at) ? r->vests_at : r->expires_at;

	if (!h->deferring || r->day < h->deferred_day)
		h->deferred_day = r->day;
	if (!h->new_deferred || due < h->deferred_due)
		h->deferred_due = due;
	h->deferred_n = h->new_deferred ? h->deferred_n + 1 : 1;
	h->deferring = true;
	h->new_deferred = true;
	h->touched = true;
	if (r->vests_at > r->occurred_at)
		h->pending = AccrualAddPoints(h->pending, r->points);
	else
		h->available = AccrualAddPoints(h->available, r->points);
}

/* What every purchase row of a chunk shares. */
typedef struct AccrualRowCommon
{
	Datum		program;
	Datum		posted;
	Datum		empty;			/* attrs '{}' */
	Datum		zero;			/* refunded_amount 0 */
	Datum		actor;			/* of the deferred rows, when there is one */
	LedgerWriter **tw;
	bool		bulk;
} AccrualRowCommon;

/*
 * Purchase r's row, in w's values (its id drawn from the journal's
 * sequence); returns its account's head.
 */
static AccrualHead *
AccrualPurchaseRow(AccrualBatch *b, AccrualRow *r, LedgerWriter *w, AccrualRowCommon *c)
{
	AccrualHead *h;

	r->accrual_id = LedgerWriterNextId(w);
	memset(w->nulls, 0, sizeof(w->nulls));
	w->values[0] = Int64GetDatum(r->accrual_id);
	w->values[1] = c->program;
	w->values[2] = CStringGetTextDatum(r->ref);
	w->values[3] = Int64GetDatum(r->member_id);
	w->values[4] = Int64GetDatum(r->account_id);
	w->values[5] = r->amount;
	w->values[6] = TimestampTzGetDatum(r->occurred_at);
	w->values[7] = DateADTGetDatum(r->day);
	w->values[8] = AccrualTextOrNull(r->category, &w->nulls[8]);
	w->values[9] = AccrualTextOrNull(r->channel, &w->nulls[9]);
	w->values[10] = AccrualTextOrNull(r->store, &w->nulls[10]);
	w->values[11] = r->attrs_null ? c->empty : r->attrs;
	w->values[12] = Int32GetDatum(r->rules->version);
	w->values[13] = Int64GetDatum(r->points);
	w->values[14] = TimestampTzGetDatum(r->vests_at);
	w->nulls[15] = r->expires_null;
	w->values[15] = TimestampTzGetDatum(r->expires_at);
	w->values[16] = AccrualTextOrNull(r->breakdown, &w->nulls[16]);
	w->values[17] = c->zero;
	w->values[18] = Int64GetDatum(0);
	w->values[19] = c->posted;
	h = r->head = AccrualDecideDeferral(b, r);
	if (r->points > 0 && !r->deferred && *c->tw == NULL)
		*c->tw = AccrualTransferWriter(c->bulk);
	r->transfer_id = r->points > 0 ? r->accrual_id : 0;
	w->nulls[20] = r->transfer_id == 0 || r->deferred;
	w->values[20] = Int64GetDatum(r->transfer_id);
	if (r->deferred && c->actor == (Datum) 0)
		c->actor = CStringGetTextDatum(LedgerActor());
	w->nulls[21] = !r->deferred;
	w->values[21] = c->actor;
	/* the member's list of purchases: this one names the one before */
	w->nulls[22] = h->last_ref == NULL;
	w->values[22] = h->last_ref == NULL ? (Datum) 0 : CStringGetTextDatum(h->last_ref);
	w->values[23] = BoolGetDatum(b->rules->uses_day_cap);
	return h;
}

/* Purchase r, inserted: the latest of its account's head h. */
static void
AccrualPurchaseInserted(AccrualHead *h, AccrualRow *r)
{
	AccrualSetLastRef(h, r->ref);
	h->new_last = true;
	h->touched = true;
	if (r->deferred)
		AccrualDeferred(h, r);
}

/* An account's head as it was before an optimistic write of its chunk. */
typedef struct AccrualSavedHead
{
	AccrualHead *head;
	AccrualHead was;
	char	   *last_ref;		/* a copy of was.last_ref's string */
} AccrualSavedHead;

/* Put a head back as it was saved; its last_ref buffer is its own, kept. */
static void
AccrualRestoreHead(const AccrualSavedHead *sh)
{
	AccrualHead *h = sh->head;
	char	   *buf = h->last_ref;
	int			size = h->last_ref_size;

	*h = sh->was;
	h->last_ref = buf;
	h->last_ref_size = size;
	if (sh->last_ref != NULL)
		AccrualSetLastRef(h, sh->last_ref);
	else if (buf != NULL)
	{
		pfree(buf);
		h->last_ref = NULL;
		h->last_ref_size = 0;
	}
}

/*
 * Write the purchases optimistically (LedgerWriterBeginNew): all in one
 * subtransaction, as a plain bulk appender writes rows. True when all were
 * inserted; false when the ref index met one of them, and then nothing was
 * written and every head is as it was.
 */
static bool
AccrualInsertAllNew(AccrualBatch *b, int *which, int n, LedgerWriter *w, AccrualRowCommon *c)
{
	static uint64 attempts = 0;
	uint64		attempt = ++attempts;
	AccrualSavedHead *volatile saved = palloc(sizeof(AccrualSavedHead) * 256);
	volatile int nsaved = 0;
	volatile int capacity = 256;
	volatile bool kept = false;
	MemoryContext cxt = CurrentMemoryContext;

	LedgerWriterBeginNew(w);
	PG_TRY();
	{
		for (int k = 0; k < n; k++)
		{
			AccrualRow *r = &b->rows[which[k]];
			AccrualHead *h = AccrualPurchaseRow(b, r, w, c);

			if (h->saved_in != attempt)
			{
				AccrualSavedHead *sh;

				if (nsaved == capacity)
				{
					capacity *= 2;
					saved = repalloc(saved, sizeof(AccrualSavedHead) * capacity);
				}
				sh = &saved[nsaved++];
				sh->head = h;
				sh->was = *h;
				sh->last_ref = h->last_ref == NULL ? NULL : pstrdup(h->last_ref);
				h->saved_in = attempt;
			}
			LedgerWriterInsert(w);
			AccrualPurchaseInserted(h, r);
		}
		kept = LedgerWriterEndNew(w);
	}
	PG_CATCH();
	{
		/* as PL/pgSQL leaves a block's subtransaction: the error saved first */
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		LedgerWriterAbortNew(w);
		ReThrowError(edata);
	}
	PG_END_TRY();
	if (!kept)
		for (int i = 0; i < nsaved; i++)
			AccrualRestoreHead(&saved[i]);
	return kept;
}

/*
 * The purchases of the chunk (rows listed in which[]); returns how many
 * were inserted and leaves ->accrual_id 0 on the rows a concurrent
 * transaction posted first (ON CONFLICT DO NOTHING on the ref: the one race
 * the member lock does not cover, the same ref for two members). Each
 * purchase takes one id from the journal's sequence, which its transfer and
 * lot share when it earns (one nextval per sale, not three):
 * accrual.transfer_id is how its journal line is found, since accrual
 * transfers have no entry in the journal's ref index.
 *
 * Many purchases are first written all at once (AccrualInsertAllNew): the
 * statement's refs were looked up before computing, so a ref another
 * transaction holds is rare. When one does, that write is rolled back and
 * every purchase is written again, one by one, each as ON CONFLICT DO
 * NOTHING writes it (those written before the lost one counting as before).
 */
static int64
AccrualInsertPurchases(AccrualBatch *b, int *which, int n, LedgerWriter **tw, bool bulk)
{
	LedgerWriter *w = LedgerWriterOpen("accrual", accrual_cols, lengthof(accrual_cols), "transfer_id_seq",
									   n > ACCRUAL_SMALL, "accrual_pkey");
	AccrualRowCommon c;
	int64		inserted = 0;
	ItemPointerData conflict;
	bool		redo = false;
	StringInfoData buf;
	MemoryContext old = AccrualChunkMemory(b);

	c.program = Int64GetDatum(b->program_id);
	c.posted = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	c.empty = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
	c.zero = DirectFunctionCall3(numeric_in, CStringGetDatum("0"), ObjectIdGetDatum(InvalidOid),
								 Int32GetDatum(-1));
	c.actor = (Datum) 0;
	c.tw = tw;
	c.bulk = bulk;
	if (n >= ACCRUAL_OPTIMISTIC && LedgerWriterMayBeginNew(w))
	{
		if (AccrualInsertAllNew(b, which, n, w, &c))
		{
			MemoryContextSwitchTo(old);
			LedgerWriterClose(w);
			return n;
		}
		/* every row is computed again as it is written, as after a lost race */
		redo = AccrualUncountFrom(b, which, 0, n, false);
	}
	initStringInfo(&buf);
	for (int k = 0; k < n; k++)
	{
		AccrualRow *r = &b->rows[which[k]];
		AccrualHead *h;

		if (redo)
		{
			/* a lost race before it: count only the rows written (see AccrualUncountFrom) */
			bool		earned = r->points > 0;

			AccrualComputeRow(b, r, &buf);
			if (r->points > 0 && !earned)
				AccrualDate(b, &which[k], 1);
		}
		h = AccrualPurchaseRow(b, r, w, &c);
		if (LedgerWriterInsertIfNew(w, &conflict))
		{
			inserted++;
			AccrualPurchaseInserted(h, r);
		}
		else
		{
			redo = AccrualUncountFrom(b, which, k, n, redo) || redo;
			AccrualLostRace(r, w, &conflict);
		}
	}
	MemoryContextSwitchTo(old);
	LedgerWriterClose(w);
	return inserted;
}

/*
 * The transfer and the lot of one inserted purchase that earned points,
 * chained onto its account's head; exactly what LedgerPost would write.
 */
static void
AccrualWriteTransfer(AccrualBatch *b, AccrualRow *r, LedgerWriter *tw, LedgerWriter *lw,
					 TimestampTz posted_at, const char *actor, Datum actor_d)
{
	AccrualHead *h = r->head;
	ChainContent c;
	uint8		hash[CHAIN_HASH_LEN];
	int64		tid = r->transfer_id;
	bool		pending = r->vests_at > r->occurred_at;
	Datum		ref = CStringGetTextDatum(r->ref);

	memset(&c, 0, sizeof(c));
	c.program_id = b->program_id;
	c.debit_account = b->issuance;
	c.credit_account = r->account_id;
	c.amount = r->points;
	c.kind = "accrual";
	c.ref = r->ref;
	c.occurred_at = r->occurred_at;
	c.posted_at = posted_at;
	c.has_rule_version = true;
	c.rule_version = r->rules->version;
	c.actor = actor;
	if (h->has_hash)
	{
		c.credit_prev = h->hash;
		c.credit_prev_len = CHAIN_HASH_LEN;
	}
	ChainHash(&c, hash);

	memset(tw->nulls, 0, sizeof(tw->nulls));
	tw->values[0] = Int64GetDatum(tid);
	tw->values[1] = Int64GetDatum(b->program_id);
	tw->values[2] = Int64GetDatum(b->issuance);
	tw->values[3] = Int64GetDatum(r->account_id);
	tw->values[4] = PointsGetDatum(r->points);
	tw->values[5] = CStringGetTextDatum("accrual");
	tw->values[6] = ref;
	tw->values[7] = TimestampTzGetDatum(r->occurred_at);
	tw->values[8] = TimestampTzGetDatum(posted_at);
	tw->values[9] = Int32GetDatum(r->rules->version);
	tw->values[10] = actor_d;
	tw->nulls[11] = true;		/* reason */
	tw->nulls[12] = true;		/* debit_prev_hash: the issuance account has no chain */
	tw->nulls[13] = !h->has_hash;
	tw->values[13] = h->has_hash ? ChainHashBytea(h->hash) : (Datum) 0;
	tw->values[14] = ChainHashBytea(hash);
	LedgerWriterInsert(tw);

	memset(lw->nulls, 0, sizeof(lw->nulls));
	lw->values[0] = Int64GetDatum(tid);	/* the purchase's id, as its transfer's */
	lw->values[1] = Int64GetDatum(r->account_id);
	lw->values[2] = Int64GetDatum(tid);
	lw->values[3] = PointsGetDatum(r->points);
	lw->values[4] = PointsGetDatum(r->points);
	lw->values[5] = TimestampTzGetDatum(r->occurred_at);
	lw->values[6] = TimestampTzGetDatum(r->vests_at);
	lw->nulls[7] = r->expires_null;
	lw->values[7] = TimestampTzGetDatum(r->expires_at);
	lw->values[8] = BoolGetDatum(pending);
	LedgerWriterInsert(lw);

	memcpy(h->hash, hash, CHAIN_HASH_LEN);
	h->has_hash = true;
	h->touched = true;
	h->chained = true;
	h->last_transfer = tid;
	if (pending)
		h->pending += r->points;
	else
		h->available += r->points;
}

static const char *const account_cols[] = {"id", "program_id", "kind", "member_id", "name",
"available", "pending", "held", "last_transfer_id", "last_hash", "owes", "deferred_day", "deferred_due",
"last_purchase_ref", "deferred_count"};

static int64
AccrualAddPoints(int64 a, int64 b)
{
	int64		sum;

	if (pg_add_s64_overflow(a, b, &sum))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("points out of range")));
	return sum;
}

/*
 * The member accounts the chunk credited: balances and chain heads, each
 * row rewritten in place (it is locked; its balance columns are in no
 * index, so the new version is usually heap-only).
 */
static void
AccrualWriteAccounts(AccrualBatch *b)
{
	HASH_SEQ_STATUS seq;
	AccrualHead *h;
	LedgerWriter *w;
	bool		any = false;

	hash_seq_init(&seq, b->heads);
	while ((h = hash_seq_search(&seq)) != NULL)
		any |= h->touched;
	if (!any)
		return;
	/* the rows may have been written by this command: see them */
	CommandCounterIncrement();
	w = LedgerWriterOpen("account", account_cols, lengthof(account_cols), NULL, false, NULL);
	hash_seq_init(&seq, b->heads);
	while ((h = hash_seq_search(&seq)) != NULL)
	{
		if (!h->touched)
			continue;
		LedgerWriterFetch(w, &h->tid);
		if (DatumGetInt64(w->values[0]) != h->account_id)
			elog(ERROR, "row (%u,%u) is not account %lld", ItemPointerGetBlockNumber(&h->tid),
				 ItemPointerGetOffsetNumber(&h->tid), (long long) h->account_id);
		w->values[5] = PointsGetDatum(AccrualAddPoints(DatumGetPoints(w->values[5]), h->available));
		w->values[6] = PointsGetDatum(AccrualAddPoints(DatumGetPoints(w->values[6]), h->pending));
		if (h->chained)
		{
			w->values[8] = Int64GetDatum(h->last_transfer);
			w->nulls[8] = false;
			w->values[9] = ChainHashBytea(h->hash);
			w->nulls[9] = false;
		}
		if (h->new_last)
		{
			w->values[13] = CStringGetTextDatum(h->last_ref);
			w->nulls[13] = false;
		}
		if (h->new_deferred)
		{
			/* the row's own may be earlier: a purchase of an older day, deferred before */
			if (w->nulls[11] || h->deferred_day < DatumGetDateADT(w->values[11]))
				w->values[11] = DateADTGetDatum(h->deferred_day);
			w->nulls[11] = false;
			/* and its list for the jobs (account_deferred_idx) */
			if (w->nulls[12] || h->deferred_due < DatumGetTimestampTz(w->values[12]))
				w->values[12] = TimestampTzGetDatum(h->deferred_due);
			w->nulls[12] = false;
			w->values[14] = Int64GetDatum((w->nulls[14] ? 0 : DatumGetInt64(w->values[14])) + h->deferred_n);
			w->nulls[14] = false;
		}
		LedgerWriterUpdate(w, &h->tid);
		h->touched = false;
		h->chained = false;
		h->new_deferred = false;
		h->new_last = false;
		h->available = h->pending = 0;
	}
	LedgerWriterClose(w);
}

/*
 * Write the good rows: the purchases (one statement, idempotent on the
 * ref), then for those that earned, transfers and lots appended directly
 * (LedgerWriter) with their hashes chained in memory from the heads read
 * under the lock, then the balances (one statement).
 */
static void
AccrualWrite(AccrualBatch *b)
{
	int		   *which = palloc(sizeof(int) * Max(b->nrows, 1));
	int			n = 0;
	int			earning = 0;
	bool		bulk;
	LedgerWriter *tw;

	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];

		r->accrual_id = 0;
		if (r->problem != NULL || r->existing)
			continue;
		which[n++] = i;
	}
	b->nposted = n;
	b->nposted_total += n;
	b->ninserted = 0;
	if (n == 0)
		return;

	AccrualExpiries(b);
	for (int k = 0; k < n; k++)
	{
		AccrualRow *r = &b->rows[which[k]];

		/* rows that may be chained now: deferral decides at the insert */
		if (r->points > 0 && !(b->defers && r->vests_at > r->occurred_at))
			earning++;
	}
	bulk = earning > ACCRUAL_SMALL;
	tw = earning == 0 ? NULL : AccrualTransferWriter(bulk);
	b->ninserted = AccrualInsertPurchases(b, which, n, &tw, bulk);
	/* tw is open when some row is chained (one may start to after a lost race) */
	if (tw != NULL && b->ninserted > 0)
	{
		LedgerWriter *lw = AccrualLotWriter(b, which, n, bulk);
		TimestampTz posted_at = GetCurrentTransactionStartTimestamp();
		const char *actor = LedgerActor();
		Datum		actor_d = CStringGetTextDatum(actor);
		MemoryContext old = AccrualChunkMemory(b);

		for (int k = 0; k < n; k++)
		{
			AccrualRow *r = &b->rows[which[k]];

			if (r->accrual_id != 0 && r->points > 0 && !r->deferred)
				AccrualWriteTransfer(b, r, tw, lw, posted_at, actor, actor_d);
		}
		MemoryContextSwitchTo(old);
		LedgerWriterClose(lw);
	}
	if (b->ninserted > 0 && !b->defer_accounts)
		AccrualWriteAccounts(b);
	if (tw != NULL)
		LedgerWriterClose(tw);
}

/*
 * The read query of a transition table starts: the rows it numbers with
 * loyalty._ordinal() from here are the table's in order, the first 1 past
 * the number _ordinal() gave last (AccrualReadRows checks each).
 */
void
AccrualReadStarts(AccrualBatch *b)
{
	b->ord_base = AccrualOrdinalNow();
	b->ord_ok = b->trans != NULL;
}

static int
AccrualCmpRowOrd(const void *a, const void *b)
{
	int64		x = (*(AccrualRow *const *) a)->ord,
				y = (*(AccrualRow *const *) b)->ord;

	return x < y ? -1 : x > y ? 1 : 0;
}


/*
 * The whole rows of the refused purchases, read from the transition table
 * at their places (their ord past ord_base), with a read pointer of our
 * own: rows come in the table's order, chunk after chunk, so the pointer
 * only goes back to the start for a row before the last one it read.
 * False when a row's place is not known (the caller reads by content).
 */
static bool
AccrualWholeRowsAt(AccrualBatch *b)
{
	AccrualRow **want;
	int			n = 0;

	if (b->trans == NULL || !b->ord_ok)
		return false;
	want = palloc(sizeof(AccrualRow *) * Max(b->nrows, 1));
	for (int i = 0; i < b->nrows; i++)
		if (b->rows[i].problem != NULL && b->rows[i].whole_null)
			want[n++] = &b->rows[i];
	if (n == 0)
		return true;
	qsort(want, n, sizeof(AccrualRow *), AccrualCmpRowOrd);
	if (b->trans_slot == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(b->stmt_cxt != NULL ? b->stmt_cxt : CurrentMemoryContext);

		/* on a copy of the relation's descriptor, which the slot would pin */
		b->trans_slot = MakeSingleTupleTableSlot(CreateTupleDescCopy(b->trans_desc), &TTSOpsMinimalTuple);
		b->trans_ptr = tuplestore_alloc_read_pointer(b->trans, EXEC_FLAG_REWIND);
		fmgr_info(F_TO_JSONB, &b->trans_to_jsonb);
		/* to_jsonb() takes anyelement: it reads the argument's type from here */
		b->trans_to_jsonb.fn_expr = (Node *)
			makeFuncExpr(F_TO_JSONB, JSONBOID, list_make1(makeNullConst(b->trans_desc->tdtypeid, -1, InvalidOid)),
						 InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL);
		b->trans_pos = -1;
		MemoryContextSwitchTo(old);
	}
	tuplestore_select_read_pointer(b->trans, b->trans_ptr);
	for (int k = 0; k < n; k++)
	{
		int64		pos = want[k]->ord - b->ord_base;

		if (b->trans_pos < 0 || pos <= b->trans_pos)
		{
			tuplestore_rescan(b->trans);
			b->trans_pos = 0;
		}
		for (; b->trans_pos < pos - 1; b->trans_pos++)
			if (!tuplestore_advance(b->trans, true))
				elog(ERROR, "the transition table has no row %lld", (long long) pos);
		if (!tuplestore_gettupleslot(b->trans, true, false, b->trans_slot))
			elog(ERROR, "the transition table has no row %lld", (long long) pos);
		b->trans_pos = pos;
		want[k]->whole = FunctionCall1(&b->trans_to_jsonb, ExecFetchSlotHeapTupleDatum(b->trans_slot));
		want[k]->whole_null = false;
	}
	return true;
}

/*
 * The application's rows of the purchases refused (a bad row, an unknown
 * or inactive member, a ref posted before or meanwhile by another
 * transaction, or twice in one statement; an amount whose points could not
 * be counted), for the quarantine to keep them: by their places in the
 * transition table, or, should those not be known, read again from it,
 * all in one join by content.
 */
static void
AccrualWholeRows(AccrualBatch *b)
{
	static const Oid types[] = {INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID, INT4ARRAYOID, TEXTARRAYOID,
		TEXTARRAYOID, NUMERICARRAYOID, TIMESTAMPTZARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
	TEXTARRAYOID};
	static const Oid coltypes[] = {INT4OID, TEXTOID, TEXTOID, NUMERICOID, TIMESTAMPTZOID, TEXTOID,
	TEXTOID, TEXTOID};
	Datum		args[11];
	char		nulls[11];
	Datum	   *cols[8];
	bool	   *colnulls[8];
	int			n = 0;
	char	   *sql;

	if (b->source_sql == NULL || AccrualWholeRowsAt(b))
		return;
	for (int c = 0; c < 8; c++)
	{
		cols[c] = palloc(sizeof(Datum) * Max(b->nrows, 1));
		colnulls[c] = palloc0(sizeof(bool) * Max(b->nrows, 1));
	}
	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];

		if (r->problem == NULL || !r->whole_null)
			continue;
		cols[0][n] = Int32GetDatum(i);
		cols[1][n] = CStringGetTextDatum(r->ref);
		cols[2][n] = CStringGetTextDatum(r->member_ref);
		cols[3][n] = r->amount;
		cols[4][n] = TimestampTzGetDatum(r->occurred_at);
		cols[5][n] = AccrualTextOrNull(r->category, &colnulls[5][n]);
		cols[6][n] = AccrualTextOrNull(r->channel, &colnulls[6][n]);
		cols[7][n] = AccrualTextOrNull(r->store, &colnulls[7][n]);
		n++;
	}
	if (n == 0)
		return;
	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int64GetDatum(b->program_id);
	args[1] = TimestampTzGetDatum(b->earliest);
	args[2] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	for (int c = 0; c < 8; c++)
		args[3 + c] = AccrualArray(cols[c], colnulls[c], n, coltypes[c]);
	sql = psprintf("SELECT DISTINCT ON (q.i) q.i, to_jsonb(n.whole)"
				   "  FROM unnest($4, $5, $6, $7, $8, $9, $10, $11)"
				   "       AS q(i, ref, member_ref, amount, occurred_at, category, channel, store)"
				   "  JOIN (%s) n ON n.ref = q.ref AND n.member_ref = q.member_ref AND n.amount = q.amount"
				   "   AND n.occurred_at = q.occurred_at AND n.category IS NOT DISTINCT FROM q.category"
				   "   AND n.channel IS NOT DISTINCT FROM q.channel AND n.store IS NOT DISTINCT FROM q.store"
				   " ORDER BY q.i",
				   b->source_sql);
	LedgerExpect(SPI_execute_with_args(sql, 11, (Oid *) types, args, nulls, true, 0), SPI_OK_SELECT,
				 "reading refused purchases");
	for (uint64 k = 0; k < SPI_processed; k++)
	{
		HeapTuple	tup = SPI_tuptable->vals[k];
		bool		isnull;
		AccrualRow *r = &b->rows[DatumGetInt32(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull))];
		Datum		d = SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &r->whole_null);

		if (!r->whole_null)
			r->whole = datumCopy(d, false, -1);
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Keep the ref of a row that repeats a posted purchase, for the trigger to
 * undo a DELETE's refund of it once the statement is posted (an INSERT of
 * an order the application deleted before: loyalty._restore_deleted).
 * to_amount: the row is that order with another amount (lowered before
 * the DELETE, say), and the purchase is refunded down to it after.
 */
static void
AccrualNoteReinsert(AccrualBatch *b, AccrualRow *r, bool to_amount)
{
	MemoryContext old = MemoryContextSwitchTo(b->stmt_cxt);
	AccrualReinsert *x = palloc(sizeof(AccrualReinsert));

	x->ref = pstrdup(r->ref);
	x->same = !to_amount;
	x->to_amount = to_amount ? datumCopy(r->amount, false, -1) : (Datum) 0;
	b->reinserted = lappend(b->reinserted, x);
	MemoryContextSwitchTo(old);
}

void
AccrualNoteReinserted(AccrualBatch *b, AccrualRow *r)
{
	if (r->repeats_posted && r->problem == NULL && b->stmt_cxt != NULL)
		AccrualNoteReinsert(b, r, false);
}

/*
 * Rows refused because their ref was posted for a different purchase
 * (23505) that are a deleted order coming back with another amount: the
 * same member, time, category, channel and store, and a DELETE's refund
 * not yet undone (loyalty._reinserted_changed, one query for the chunk).
 * They are not quarantined: the trigger undoes the refund and refunds
 * down to the new amount.
 */
static void
AccrualChangedReinserts(AccrualBatch *b)
{
	static const Oid argtypes[] = {INT8OID, INT4ARRAYOID, TEXTARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID,
	BOOLARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID};
	static const Oid types[] = {INT4OID, TEXTOID, INT8OID, TIMESTAMPTZOID, BOOLOID, TEXTOID, TEXTOID, TEXTOID};
	static SPIPlanPtr plan_changed;
	Datum	   *cols[8];
	bool	   *nulls[8];
	Datum		args[9];
	int			n = 0;

	if (b->stmt_cxt == NULL)
		return;
	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];

		if (!r->repeats_posted || r->problem == NULL || r->amount_null)
			continue;
		if (n == 0)
			for (int c = 0; c < 8; c++)
			{
				cols[c] = palloc(sizeof(Datum) * b->nrows);
				nulls[c] = palloc0(sizeof(bool) * b->nrows);
			}
		cols[0][n] = Int32GetDatum(i);
		cols[1][n] = CStringGetTextDatum(r->ref);
		cols[2][n] = Int64GetDatum(r->member_id);
		cols[3][n] = TimestampTzGetDatum(r->occurred_at);
		cols[4][n] = BoolGetDatum(r->occurred_unset);
		cols[5][n] = AccrualTextOrNull(r->category, &nulls[5][n]);
		cols[6][n] = AccrualTextOrNull(r->channel, &nulls[6][n]);
		cols[7][n] = AccrualTextOrNull(r->store, &nulls[7][n]);
		n++;
	}
	if (n == 0)
		return;
	args[0] = Int64GetDatum(b->program_id);
	for (int c = 0; c < 8; c++)
		args[1 + c] = AccrualArray(cols[c], nulls[c], n, types[c]);
	LedgerPrepare(&plan_changed,
				  "SELECT q.i FROM unnest($2, $3, $4, $5, $6, $7, $8, $9)"
				  "       AS q(i, ref, member_id, occurred_at, occurred_unset, category, channel, store)"
				  " WHERE loyalty._reinserted_changed($1, q.ref, q.member_id, q.occurred_at, q.occurred_unset,"
				  "                                   q.category, q.channel, q.store)",
				  9, argtypes);
	LedgerExpect(SPI_execute_plan(plan_changed, args, NULL, false, 0), SPI_OK_SELECT,
				 "reading deleted purchases");
	for (uint64 k = 0; k < SPI_processed; k++)
	{
		AccrualRow *r = &b->rows[DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[k], SPI_tuptable->tupdesc, 1,
															   &(bool){0}))];

		r->problem = NULL;
		AccrualNoteReinsert(b, r, true);
	}
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

	AccrualChangedReinserts(b);
	AccrualWholeRows(b);
	for (int c = 0; c < 5; c++)
	{
		cols[c] = palloc(sizeof(Datum) * Max(b->nrows, 1));
		nulls[c] = palloc0(sizeof(bool) * Max(b->nrows, 1));
	}
	for (int i = 0; i < b->nrows; i++)
	{
		AccrualRow *r = &b->rows[i];

		AccrualNoteReinserted(b, r);
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
				  "INSERT INTO loyalty.accrual_quarantine (program_id, source, ref, member_ref, row_data, columns,"
				  "       time_zone, reason, sqlstate)"
				  " SELECT $1, $2, q.ref, q.member_ref, coalesce(q.row_data, '{}'),"
				  "        (SELECT jsonb_strip_nulls(jsonb_build_object('member', s.member_column,"
				  "                 'amount', s.amount_column, 'ref', s.ref_column,"
				  "                 'occurred_at', s.occurred_at_column, 'category', s.category_column,"
				  "                 'channel', s.channel_column, 'store', s.store_column))"
				  "           FROM loyalty.accrual_source s WHERE s.source = $2),"
				  "        current_setting('TimeZone'), q.reason, q.sqlstate"
				  "   FROM unnest($3, $4, $5, $6, $7) AS q(ref, member_ref, row_data, reason, sqlstate)",
				  7, argtypes);
	LedgerExpect(SPI_execute_plan(plan_quarantine, args, NULL, false, 0), SPI_OK_INSERT,
				  "quarantining purchases");
}

/*
 * Recover outstanding refund debts of the batch's members from what they
 * just earned. The trigger does it last (defer_recovery), once the orders
 * inserted again have had their DELETE's refunds undone: a debt such a
 * refund recorded is cancelled, not paid from the statement's new sales.
 */
void
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
	AccrualPostLocked(b);
	if (quarantine)
		AccrualQuarantine(b);
}

/* Post a batch of good rows whose member accounts are locked and heads read. */
void
AccrualPostLocked(AccrualBatch *b)
{
	AccrualReadHistory(b);
	AccrualReadBudgets(b);
	AccrualCompute(b);
	AccrualWrite(b);
	AccrualSaveBudgets(b);
	if (!b->defer_recovery)
		AccrualRecoverDebts(b);
}

/*
 * The query locking the member accounts a source names, all of them, in id
 * order. members yields the source's member_ref column, each distinct value
 * once: the members and accounts are joined per member, not per row (a
 * million purchases of 10,000 members: 150 ms, against 820 ms joining each
 * row).
 */
char *
AccrualLockSql(const char *members, int probes, bool birthday)
{
	/* the heads' columns (AccrualReadHeads), then the members' (AccrualReadMembers) */
	return psprintf("SELECT a.id, a.last_hash, a.ctid, a.deferred_day, a.last_purchase_ref,"
					"       mm.member_ref, mm.id, mm.status, mm.tier, %s"
					"  FROM loyalty.account a JOIN loyalty.member mm ON mm.id = a.member_id"
					"  %s"
					" WHERE a.id IN (SELECT a2.id FROM (%s) n"
					"                %s"
					"                JOIN loyalty.account a2 ON a2.member_id = m.id)"
					" ORDER BY a.id FOR UPDATE OF a",
					birthday ? "extract(month FROM c.birthday)::int" : "NULL::int",
					birthday ? "LEFT JOIN loyalty.member_contact c ON c.member_id = mm.id" : "",
					members, AccrualMemberJoin(probes));
}

static uint32
AccrualMemberHash(const void *key, Size keysize)
{
	const char *ref = *(const char *const *) key;

	return hash_bytes((const unsigned char *) ref, strlen(ref));
}

static int
AccrualMemberMatch(const void *a, const void *b, Size keysize)
{
	return strcmp(*(const char *const *) a, *(const char *const *) b);
}

/*
 * The members of the locked accounts, by member_ref, from the lock query's
 * result: the read query of a chunked statement then does not join the
 * members and accounts of every row again (AccrualReadSql, members_known).
 * A row whose member is not among them was unknown when the accounts were
 * locked, and is quarantined as unknown (LY003): never posted to an
 * account this statement did not lock.
 */
static void
AccrualReadMembers(AccrualBatch *b)
{
	TupleDesc	d = SPI_tuptable->tupdesc;
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(char *);
	ctl.entrysize = sizeof(AccrualMember);
	ctl.hash = AccrualMemberHash;
	ctl.match = AccrualMemberMatch;
	ctl.hcxt = CurrentMemoryContext;
	b->members = hash_create("loyalty accrual members", Max(SPI_processed, 16), &ctl,
							 HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		char	   *ref = SPI_getvalue(t, d, 6);
		AccrualMember *m = hash_search(b->members, &ref, HASH_ENTER, NULL);
		bool		isnull;
		Datum		v;

		m->account_id = DatumGetInt64(SPI_getbinval(t, d, 1, &isnull));
		/* its head, which the rows then need not look up (entries stay put) */
		m->head = hash_search(b->heads, &m->account_id, HASH_FIND, NULL);
		m->member_id = DatumGetInt64(SPI_getbinval(t, d, 7, &isnull));
		m->status = SPI_getvalue(t, d, 8);
		m->tier = SPI_getvalue(t, d, 9);
		v = SPI_getbinval(t, d, 10, &isnull);
		m->birth_month = isnull ? 0 : DatumGetInt32(v);
	}
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
	AccrualReadHeads(b);
	AccrualReadMembers(b);
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
	int			chunk = loyalty_accrual_chunk;
	Size		keep;

	AccrualLockSource(b, lock, args, nulls);
	AccrualReadHistory(b);
	AccrualReadBudgets(b);
	/*
	 * A chunk's memory is kept from one chunk to the next, not given back
	 * to the system and taken again: its rows, zeroed after each chunk, and
	 * a first block that holds what a chunk of short purchases allocates
	 * besides (some 460 bytes a row). Given back and taken again, it was
	 * page-faulted in again at every chunk: 38,000 of a million-row insert's
	 * 176,000 page faults.
	 */
	keep = MAXALIGN(Max(Min((Size) chunk * 512, (Size) 64 * 1024 * 1024), ALLOCSET_DEFAULT_INITSIZE));
	b->chunk_rows = AccrualAllocRows(chunk);
	b->chunk_cxt = AllocSetContextCreate(CurrentMemoryContext, "loyalty accrual chunk",
										 keep, ALLOCSET_DEFAULT_INITSIZE, Max(keep, ALLOCSET_DEFAULT_MAXSIZE));
	/*
	 * Balances are written once, after the last chunk: a row rewritten per
	 * chunk would leave a chain of versions of one transaction that every
	 * later chunk's lookups of the account walk through.
	 */
	b->defer_accounts = true;
	b->posted_refs = bloom_create(Max(b->statement_rows, chunk), 4096, 0);
	AccrualReadStarts(b);
	cursor = SPI_cursor_open(NULL, read, args, nulls, false);
	while (AccrualFetchRows(b, cursor, chunk) > 0)
	{
		AccrualCompute(b);
		AccrualWrite(b);
		AccrualRememberRefs(b);
		AccrualQuarantine(b);
		MemoryContextReset(b->chunk_cxt);
		memset(b->chunk_rows, 0, sizeof(AccrualRow) * b->nrows);
		b->rows = NULL;
		b->nrows = 0;
	}
	SPI_cursor_close(cursor);
	pfree(b->chunk_rows);
	b->chunk_rows = NULL;
	bloom_free(b->posted_refs);
	b->posted_refs = NULL;
	AccrualWriteAccounts(b);
	AccrualSaveBudgets(b);
	if (!b->defer_recovery)
		AccrualRecoverDebts(b);
}

/*
 * Enrol the unknown members of a source, when the program says so. A
 * member_ref enroll() would refuse (blank, longer than 200 characters) is
 * left out: its rows are quarantined by the row checks (22023) instead of
 * failing the statement.
 */
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
				   " WHERE p.id = $1 AND btrim(s.member_ref) <> '' AND length(s.member_ref) <= 200",
				   source);
	rc = SPI_execute_with_args(sql, nargs, argtypes, args, nulls, false, 0);
	LedgerExpect(rc, SPI_OK_SELECT, "enrolling members");
}

/* ---- the function API ---- */

#define ACCRUE_SOURCE \
	"SELECT $3::text AS ref, $4::text AS member_ref, $5::numeric AS amount," \
	"       coalesce($6::timestamptz, now()) AS occurred_at, $7::text AS category, $8::text AS channel," \
	"       $9::text AS store, $10::jsonb AS attrs, $6::timestamptz IS NULL AS occurred_unset," \
	"       NULL::jsonb AS whole, 1::bigint AS ord"

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
static Datum
AccrualAccrue(FunctionCallInfo fcinfo)
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
	AccrualCheckFirstCap(&b);

	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int64GetDatum(b.program_id);
	args[1] = TimestampTzGetDatum(b.earliest);
	args[2] = PG_GETARG_DATUM(3);
	args[3] = PG_GETARG_DATUM(1);
	args[4] = PG_GETARG_DATUM(2);
	args[5] = PG_ARGISNULL(4) ? (Datum) 0 : PG_GETARG_DATUM(4);
	nulls[5] = PG_ARGISNULL(4) ? 'n' : ' ';
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

	/* an ordinary purchase: the one-row path, no query planned or run */
	r = palloc0(sizeof(AccrualRow));
	r->ref = TextDatumGetCString(args[2]);
	r->member_ref = TextDatumGetCString(args[3]);
	r->amount = args[4];
	r->occurred_unset = PG_ARGISNULL(4);
	r->occurred_at = r->occurred_unset ? GetCurrentTransactionStartTimestamp() : DatumGetTimestampTz(args[5]);
	r->category = PG_ARGISNULL(5) ? NULL : TextDatumGetCString(args[6]);
	r->channel = PG_ARGISNULL(6) ? NULL : TextDatumGetCString(args[7]);
	r->store = PG_ARGISNULL(7) ? NULL : TextDatumGetCString(args[8]);
	r->attrs = args[9];
	if (AccrualFastPost(&b, r))
	{
		points = r->points;
		SPI_finish();
		PG_RETURN_INT64(points);
	}

	/* anything else (an unknown member, a replay, ...): read through SQL */
	AccrualEnrollUnknown(&b, ACCRUE_SOURCE, args, nulls, 10, (Oid *) argtypes);
	AccrualPrepare(&plan_accrue_read, 0, AccrualReadSql(ACCRUE_SOURCE, true, ACCRUAL_PROBE_HISTORY | ACCRUAL_PROBE_MEMBERS, false),
				   10, argtypes);
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

		/*
		 * Under REPEATABLE READ or SERIALIZABLE the purchase committed
		 * meanwhile is not in this transaction's snapshot: whether it is
		 * this one again cannot be told, and this one was not posted.
		 */
		if (!r->existing)
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not serialize access due to a concurrent purchase with ref \"%s\"", r->ref),
					 errhint("Retry the transaction.")));
		points = r->existing_points;
	}
	SPI_finish();
	PG_RETURN_INT64(points);
}

/* accrue() runs under its own search path (LedgerPushSearchPath) */
Datum
loyalty_accrue(PG_FUNCTION_ARGS)
{
	Datum		d;

	LedgerPushSearchPath();
	d = AccrualAccrue(fcinfo);
	PopOverrideSearchPath();
	return d;
}
