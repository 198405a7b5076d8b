/*
 * accrual_trigger.c: the statement-level trigger attach_accrual() puts on
 * an application's purchase table
 *
 * INSERT: the whole transition table is read by one query, computed in C
 * and posted set-based (accrual_post.c); rows that cannot earn go to the
 * quarantine, so the application's statement never fails because of a bad
 * purchase. UPDATE lowering an amount and DELETE refund, row by row, each in
 * a subtransaction: a refund that cannot be made is quarantined too.
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "common/hashfn.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/queryenvironment.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "accrual.h"
#include "accrual_post.h"
#include "ledger.h"
#include "ledger_write.h"

PG_FUNCTION_INFO_V1(accrual_trigger);

static SPIPlanPtr plan_source;

/* The attachment of a table: which columns hold the purchase. */
typedef struct AccrualSource
{
	Oid			relid;			/* hash key */
	bool		attached;
	int64		program_id;
	char	   *member;
	char	   *amount;
	char	   *ref;
	char	   *occurred_at;
	char	   *category;
	char	   *channel;
	char	   *store;
} AccrualSource;

/* A small cache of prepared read plans, by their SQL. */
#define PLAN_SLOTS 16
static char *plan_sql[PLAN_SLOTS];
static bool plan_custom[PLAN_SLOTS];
static SPIPlanPtr plan_read[PLAN_SLOTS];
static uint64 plan_used[PLAN_SLOTS];	/* when each was last handed out */
static uint64 plan_clock;

/*
 * The attachment of an application table (kept with the compiled rules,
 * dropped when loyalty.accrual_source changes); false when there is none.
 */
static bool
AccrualLoadSource(Oid relid, AccrualSource *s)
{
	static const Oid argtypes[] = {OIDOID};
	Datum		arg = ObjectIdGetDatum(relid);
	HeapTuple	t;
	TupleDesc	d;
	HTAB	   *cache = AccrualSourceCache(sizeof(AccrualSource));
	AccrualSource *c = hash_search(cache, &relid, HASH_FIND, NULL);
	MemoryContext old;

	if (c != NULL)
	{
		*s = *c;
		return s->attached;
	}
	AccrualCacheLoading();
	LedgerPrepare(&plan_source,
				  "SELECT program_id, member_column, amount_column, ref_column, occurred_at_column,"
				  "       category_column, channel_column, store_column, x::text"
				  "  FROM loyalty.accrual_source x WHERE source = $1",
				  1, argtypes);
	if (IsolationUsesXactSnapshot())
	{
		char	   *latest = NULL;

		/*
		 * The triggers are catalog rows, always read fresh, but the
		 * attachment is read with the transaction's snapshot: a table
		 * attached after it would post nothing, and one attached again to
		 * another program would post to the old one. Either is a
		 * serialization failure, as a row changed after the snapshot is.
		 */
		LedgerExpect(SPI_execute_snapshot(plan_source, &arg, NULL, GetLatestSnapshot(), InvalidSnapshot,
										  true, false, 1),
					 SPI_OK_SELECT, "reading an attachment");
		if (SPI_processed > 0)
			latest = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 9);
		LedgerExpect(SPI_execute_plan(plan_source, &arg, NULL, true, 1), SPI_OK_SELECT, "reading an attachment");
		if ((SPI_processed > 0) != (latest != NULL) ||
			(latest != NULL && strcmp(latest, SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 9)) != 0))
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not serialize access due to a concurrent change of the accrual attachment of \"%s\"",
							get_rel_name(relid)),
					 errdetail("The table was attached or detached after this transaction's snapshot was taken."),
					 errhint("The transaction might succeed if retried.")));
	}
	else
		LedgerExpect(SPI_execute_plan(plan_source, &arg, NULL, true, 1), SPI_OK_SELECT, "reading an attachment");
	c = hash_search(cache, &relid, HASH_ENTER, NULL);
	c->attached = false;
	if (SPI_processed == 0)
	{
		*s = *c;
		return false;
	}
	t = SPI_tuptable->vals[0];
	d = SPI_tuptable->tupdesc;
	old = MemoryContextSwitchTo(AccrualCacheMemory());
	c->program_id = DatumGetInt64(SPI_getbinval(t, d, 1, &(bool){0}));
	c->member = SPI_getvalue(t, d, 2);
	c->amount = SPI_getvalue(t, d, 3);
	c->ref = SPI_getvalue(t, d, 4);
	c->occurred_at = SPI_getvalue(t, d, 5);
	c->category = SPI_getvalue(t, d, 6);
	c->channel = SPI_getvalue(t, d, 7);
	c->store = SPI_getvalue(t, d, 8);
	MemoryContextSwitchTo(old);
	c->attached = true;
	*s = *c;
	return true;
}

static char *
AccrualCol(const char *col, const char *type)
{
	if (col == NULL)
		return psprintf("NULL::%s", type);
	return psprintf("(t.%s)::%s", quote_identifier(col), type);
}

/* The source query over a transition table, in the shape AccrualReadSql wants. */
static char *
AccrualSourceSql(const AccrualSource *s, const char *table)
{
	return psprintf("SELECT %s AS ref, %s AS member_ref, %s AS amount,"
					" coalesce(%s, $3) AS occurred_at, %s AS category, %s AS channel, %s AS store,"
					" NULL::jsonb AS attrs, %s IS NULL AS occurred_unset, t AS whole,"
					" loyalty._ordinal() AS ord FROM %s t",
					AccrualCol(s->ref, "text"), AccrualCol(s->member, "text"),
					AccrualCol(s->amount, "numeric"), AccrualCol(s->occurred_at, "timestamptz"),
					AccrualCol(s->category, "text"), AccrualCol(s->channel, "text"),
					AccrualCol(s->store, "text"), AccrualCol(s->occurred_at, "timestamptz"), table);
}

/*
 * A prepared plan over the transition table, by its SQL and the table's row
 * type. A statement of one chunk or less leaves the choice of custom or
 * generic plans to the plan cache; a chunked statement's queries are always
 * planned with the real size of the transition table (custom).
 *
 * The transition table is always called loyalty_new, so two attached
 * tables whose mapped columns have the same names give the same SQL; the
 * plan was analysed against one table's columns, in its order and with its
 * types, and must not read the other's rows. The key names the table and
 * the type of every attribute (a table altered since gets a plan of its
 * own too).
 */
static SPIPlanPtr
AccrualSourcePlan(const char *sql, Relation rel, bool custom, int nargs, const Oid *argtypes)
{
	int			free_slot = -1;
	TupleDesc	desc = RelationGetDescr(rel);
	StringInfoData key;

	initStringInfo(&key);
	appendStringInfo(&key, "%u:", RelationGetRelid(rel));
	for (int i = 0; i < desc->natts; i++)
		appendStringInfo(&key, "%u%s,", TupleDescAttr(desc, i)->atttypid,
						 TupleDescAttr(desc, i)->attisdropped ? "x" : "");
	appendStringInfo(&key, "\n%s", sql);
	for (int i = 0; i < PLAN_SLOTS; i++)
	{
		if (plan_sql[i] != NULL && plan_custom[i] == custom && strcmp(plan_sql[i], key.data) == 0)
		{
			plan_used[i] = ++plan_clock;
			return plan_read[i];
		}
		if (plan_sql[i] == NULL && free_slot < 0)
			free_slot = i;
	}
	if (free_slot < 0)
	{
		/*
		 * The least recently used goes: never the plan handed out just
		 * before, which a chunked statement asks for with this one (its lock
		 * and read queries) and uses after it.
		 */
		free_slot = 0;
		for (int i = 1; i < PLAN_SLOTS; i++)
			if (plan_used[i] < plan_used[free_slot])
				free_slot = i;
		SPI_freeplan(plan_read[free_slot]);
		pfree(plan_sql[free_slot]);
		plan_sql[free_slot] = NULL;
	}
	plan_used[free_slot] = ++plan_clock;
	plan_read[free_slot] = NULL;
	AccrualPrepare(&plan_read[free_slot], custom ? CURSOR_OPT_CUSTOM_PLAN : 0, sql, nargs, argtypes);
	plan_sql[free_slot] = MemoryContextStrdup(TopMemoryContext, key.data);
	plan_custom[free_slot] = custom;
	return plan_read[free_slot];
}

/*
 * A set of byte strings (simplehash): the distinct member_refs of a
 * statement's rows.
 */
typedef struct AccrualBytes
{
	const char *data;
	int			len;
} AccrualBytes;

typedef struct AccrualBytesEntry
{
	AccrualBytes key;
	uint32		hash;
	char		status;
} AccrualBytesEntry;

#define SH_PREFIX accrual_bytes
#define SH_ELEMENT_TYPE AccrualBytesEntry
#define SH_KEY_TYPE AccrualBytes
#define SH_KEY key
#define SH_HASH_KEY(tb, k) hash_bytes((const unsigned char *) (k).data, (k).len)
#define SH_EQUAL(tb, a, b) ((a).len == (b).len && memcmp((a).data, (b).data, (a).len) == 0)
#define SH_STORE_HASH
#define SH_GET_HASH(tb, a) ((a)->hash)
#define SH_SCOPE static inline
#define SH_DECLARE
#define SH_DEFINE
#include "lib/simplehash.h"

/*
 * The distinct values of the rows' member column (attnum, of type text or
 * varchar, whose cast to text changes nothing), NULLs left out, as a text[]
 * for the lock query (AccrualLockSql). Read here, once, from the
 * transition table: SELECT DISTINCT over it hashed every row through the
 * executor, some 190 ms of a million-row insert's 5.5 s.
 */
static Datum
AccrualDistinctMembers(Tuplestorestate *rows, TupleDesc desc, AttrNumber attnum)
{
	TupleTableSlot *slot = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
	accrual_bytes_hash *seen = accrual_bytes_create(CurrentMemoryContext, 1024, NULL);
	ArrayBuildState *members = initArrayResult(TEXTOID, CurrentMemoryContext, false);

	tuplestore_select_read_pointer(rows, tuplestore_alloc_read_pointer(rows, EXEC_FLAG_REWIND));
	tuplestore_rescan(rows);
	while (tuplestore_gettupleslot(rows, true, false, slot))
	{
		bool		isnull;
		Datum		v = slot_getattr(slot, attnum, &isnull);
		text	   *t;
		AccrualBytes k;
		AccrualBytesEntry *e;
		bool		found;

		if (isnull)
			continue;
		t = DatumGetTextPP(v);
		k.data = VARDATA_ANY(t);
		k.len = VARSIZE_ANY_EXHDR(t);
		e = accrual_bytes_insert(seen, k, &found);
		if (!found)
		{
			/* the set keeps the array's copy, the slot's value going with the row */
			accumArrayResult(members, PointerGetDatum(t), false, TEXTOID, CurrentMemoryContext);
			e->key.data = VARDATA_ANY(DatumGetPointer(members->dvalues[members->nelems - 1]));
		}
		if ((Pointer) t != DatumGetPointer(v))
			pfree(t);
	}
	ExecDropSingleTupleTableSlot(slot);
	accrual_bytes_destroy(seen);
	return makeArrayResult(members, CurrentMemoryContext);
}

/* INSERT: post the new rows (of table, the transition table's name). */
static void
AccrualOnInsert(AccrualBatch *b, const AccrualSource *s, TriggerData *trig, const char *table,
				Tuplestorestate *rows, int64 nrows)
{
	static const Oid argtypes[] = {INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID, TEXTARRAYOID};
	char	   *source;
	char	   *members;
	Datum		args[4];
	char		nulls[4] = {' ', ' ', ' ', 'n'};
	int			probes;
	TupleDesc	desc = RelationGetDescr(trig->tg_relation);
	AttrNumber	member_att;
	Oid			member_type;

	b->statement_rows = nrows;
	if (nrows == 1 && strcmp(table, "loyalty_new") == 0)
	{
		const char *const cols[7] = {s->ref, s->member, s->amount, s->occurred_at, s->category,
		s->channel, s->store};

		/* before any SQL is built: a sale that posts here needs none */
		if (AccrualFastInsert(b, trig, cols))
			return;
	}
	source = AccrualSourceSql(s, table);
	args[0] = Int64GetDatum(b->program_id);
	args[1] = TimestampTzGetDatum(b->earliest);
	args[2] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	b->source_sql = source;
	b->trans = rows;
	b->trans_desc = RelationGetDescr(trig->tg_relation);
	AccrualEnrollUnknown(b, source, args, nulls, 3, (Oid *) argtypes);
	probes = AccrualProbes(nrows);
	if (nrows <= loyalty_accrual_chunk)
	{
		/* one chunk: read it all, lock the accounts it names, post */
		AccrualReadStarts(b);
		LedgerExpect(SPI_execute_plan(AccrualSourcePlan(AccrualReadSql(source, b->rules->uses_birthday, probes, false),
														trig->tg_relation, false, 3, argtypes),
									   args, nulls, false, 0), SPI_OK_SELECT, "reading new purchases");
		AccrualReadRows(b);
		AccrualPostBatch(b, true);
		return;
	}
	/* the lock query's members: read in C when the column is text already */
	member_att = s->member == NULL ? InvalidAttrNumber : SPI_fnumber(desc, s->member);
	member_type = member_att > 0 ? TupleDescAttr(desc, member_att - 1)->atttypid : InvalidOid;
	if (member_type == TEXTOID || member_type == VARCHAROID)
	{
		args[3] = AccrualDistinctMembers(rows, desc, member_att);
		nulls[3] = ' ';
		members = "SELECT u.member_ref FROM unnest($4) u (member_ref)";
	}
	else
		members = psprintf("SELECT DISTINCT %s AS member_ref FROM %s t", AccrualCol(s->member, "text"), table);
	AccrualPostSource(b, AccrualSourcePlan(AccrualLockSql(members, probes, b->rules->uses_birthday),
										   trig->tg_relation, true, 4, argtypes),
					  AccrualSourcePlan(AccrualReadSql(source, b->rules->uses_birthday, probes, true),
										trig->tg_relation, true, 3, argtypes), args, nulls);
}

/*
 * Quarantine one refund, or the undoing of a DELETE's refund, that failed:
 * kind refund (by amount), refund_to (down to a new amount) or restore
 * (row_data {"restore_of", "to_amount"}), for replay_quarantine to retry.
 */
static void
AccrualQuarantineStep(AccrualBatch *b, const char *kind, const char *ref, Datum amount, bool amount_null,
					  const char *refund_ref, const ErrorData *e)
{
	static const Oid argtypes[] = {INT8OID, OIDOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, NUMERICOID, TEXTOID};
	static SPIPlanPtr plan_quarantine_step;
	Datum		args[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};

	LedgerPrepare(&plan_quarantine_step,
				  "INSERT INTO loyalty.accrual_quarantine (program_id, source, kind, ref, row_data, reason, sqlstate)"
				  " VALUES ($1, $2, $3, $4,"
				  "         CASE $3 WHEN 'restore' THEN jsonb_strip_nulls(jsonb_build_object('restore_of', $4, 'to_amount', $7))"
				  "                 WHEN 'refund_to' THEN jsonb_build_object('refund_of', $4, 'to_amount', $7, 'refund_ref', $8)"
				  "                 ELSE jsonb_build_object('refund_of', $4, 'amount', $7, 'refund_ref', $8) END,"
				  "         $5, $6)",
				  8, argtypes);
	args[0] = Int64GetDatum(b->program_id);
	args[1] = ObjectIdGetDatum(b->source);
	args[2] = CStringGetTextDatum(kind);
	args[3] = CStringGetTextDatum(ref);
	args[4] = CStringGetTextDatum(e->message);
	args[5] = CStringGetTextDatum(unpack_sql_state(e->sqlerrcode));
	args[6] = amount;
	nulls[6] = amount_null ? 'n' : ' ';
	args[7] = refund_ref ? CStringGetTextDatum(refund_ref) : (Datum) 0;
	nulls[7] = refund_ref ? ' ' : 'n';
	LedgerExpect(SPI_execute_plan(plan_quarantine_step, args, nulls, false, 0), SPI_OK_INSERT,
				 "quarantining a refund");
}

/* What a step run in a subtransaction is given (AccrualSubtransaction). */
typedef struct AccrualStepArgs
{
	AccrualBatch *b;
	const char *ref;
	Datum		amount;
	bool		amount_null;
	const char *refund_ref;
	bool		to_amount;
} AccrualStepArgs;

/*
 * Whether an error is about the moment rather than the purchase: the
 * statement was cancelled (statement_timeout, pg_cancel_backend()), the
 * transaction has to be retried (a serialization failure under REPEATABLE
 * READ, a deadlock), a lock wait ran out (lock_timeout), or the server ran
 * short of a resource or failed an I/O. Quarantining the refund would
 * swallow the cancel (the statement would go on past its timeout) and hide
 * the retry the application must make, leaving an administrator a refund
 * that the retry posts by itself: such errors are raised as they came, and
 * the application's statement fails with them.
 */
static bool
AccrualTransientError(const ErrorData *e)
{
	int			category = ERRCODE_TO_CATEGORY(e->sqlerrcode);

	return category == ERRCODE_TRANSACTION_ROLLBACK || category == ERRCODE_INSUFFICIENT_RESOURCES ||
		category == ERRCODE_SYSTEM_ERROR || e->sqlerrcode == ERRCODE_QUERY_CANCELED ||
		e->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE;
}

/*
 * Run step in a subtransaction of its own: returns NULL when it succeeded,
 * or the error it raised, with everything it did rolled back. A transient
 * error (AccrualTransientError) is raised again instead.
 */
static ErrorData *
AccrualSubtransaction(void (*step) (const AccrualStepArgs *), const AccrualStepArgs *a)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	ErrorData  *e = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		step(a);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		e = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_END_TRY();
	if (e != NULL && AccrualTransientError(e))
		ReThrowError(e);
	return e;
}

static void
AccrualRefundStep(const AccrualStepArgs *a)
{
	AccrualRefundPurchase(a->b, a->ref, a->amount, a->amount_null, a->refund_ref, a->to_amount);
}

/* One refund in a subtransaction; a failure is quarantined. */
static void
AccrualTryRefund(AccrualBatch *b, const char *ref, Datum amount, bool amount_null, const char *refund_ref,
				 bool to_amount)
{
	AccrualStepArgs a = {b, ref, amount, amount_null, refund_ref, to_amount};
	ErrorData  *e = AccrualSubtransaction(AccrualRefundStep, &a);

	if (e != NULL)
		AccrualQuarantineStep(b, to_amount ? "refund_to" : "refund", ref, amount, amount_null, refund_ref, e);
}

/* loyalty._restore_deleted(program, ref, to_amount) */
static void
AccrualRestoreStep(const AccrualStepArgs *a)
{
	static const Oid argtypes[] = {TEXTOID, TEXTOID, NUMERICOID};
	static SPIPlanPtr plan_restore;
	Datum		args[3] = {CStringGetTextDatum(a->b->code), CStringGetTextDatum(a->ref), a->amount};
	char		nulls[3] = {' ', ' ', a->amount_null ? 'n' : ' '};

	LedgerPrepare(&plan_restore, "SELECT loyalty._restore_deleted($1, $2, $3)", 3, argtypes);
	LedgerExpect(SPI_execute_plan(plan_restore, args, nulls, false, 1), SPI_OK_SELECT, "undoing a refund");
}

/*
 * INSERT of orders posted before (AccrualNoteReinserted): an order the
 * application deleted and inserts again gets back what the DELETE's refund
 * took (and, inserted with another amount, is refunded down to it), each
 * in a subtransaction; one that cannot be undone is quarantined (kind
 * restore), as a failed refund is. A repeat whose purchase has no such
 * refund (a retried import) costs a probe and changes nothing.
 */
static void
AccrualRestoreReinserted(AccrualBatch *b)
{
	ListCell   *lc;

	foreach(lc, b->reinserted)
	{
		AccrualReinsert *x = lfirst(lc);
		AccrualStepArgs a = {b, x->ref, x->to_amount, x->same};
		ErrorData  *e = AccrualSubtransaction(AccrualRestoreStep, &a);

		if (e != NULL)
			AccrualQuarantineStep(b, "restore", x->ref, a.amount, a.amount_null, NULL, e);
	}
}

/*
 * UPDATE and DELETE of rows that wait in the quarantine (purchases that
 * could not earn, by source): a replay must post the order as it is when
 * replayed, not as it was when it was refused. An UPDATE replaces the
 * waiting row's row_data (and ref and member) with the new row; a DELETE
 * withdraws it, so that a replay does not earn for an order the application
 * deleted. One probe of a small partial index when nothing waits.
 */
#define ACCRUAL_WAITING_KIND(kinds) \
	"q.program_id = $1 AND q.source = $2 AND q.kind IN (" kinds ")" \
	" AND q.replayed_at IS NULL AND q.withdrawn_at IS NULL"
#define ACCRUAL_WAITING ACCRUAL_WAITING_KIND("'purchase'")
/* a DELETE also withdraws the undoing of a DELETE's refund that waits */
#define ACCRUAL_WAITING_DELETE ACCRUAL_WAITING_KIND("'purchase', 'restore'")

static void
AccrualChangeQuarantined(AccrualBatch *b, const AccrualSource *s, bool update)
{
	static const Oid argtypes[] = {INT8OID, OIDOID};
	static SPIPlanPtr plan_waiting;
	static SPIPlanPtr plan_waiting_delete;
	Datum		args[2] = {Int64GetDatum(b->program_id), ObjectIdGetDatum(b->source)};
	char	   *sql;

	LedgerPrepare(&plan_waiting,
				  "SELECT FROM loyalty.accrual_quarantine q WHERE " ACCRUAL_WAITING " LIMIT 1",
				  2, argtypes);
	LedgerPrepare(&plan_waiting_delete,
				  "SELECT FROM loyalty.accrual_quarantine q WHERE " ACCRUAL_WAITING_DELETE " LIMIT 1",
				  2, argtypes);
	LedgerExpect(SPI_execute_plan(update ? plan_waiting : plan_waiting_delete, args, NULL, false, 1),
				 SPI_OK_SELECT, "reading the quarantine");
	if (SPI_processed == 0)
		return;
	/*
	 * A waiting row is the application's row as it was quarantined (or last
	 * updated): it is matched by that whole row, so that a row whose ref was
	 * NULL, or is the very thing the UPDATE corrects, is followed too; and
	 * by ref, as before, for a row changed while the table was detached. An
	 * UPDATE's transition tables hold each row's old and new versions at the
	 * same position (the executor adds both to them for each row it
	 * updates), which pairs them without a key; the quarantined row takes
	 * the new version's ref and member.
	 */
	if (update)
		sql = psprintf("UPDATE loyalty.accrual_quarantine q"
					   "   SET row_data = c.whole, member_ref = c.member, ref = c.ref"
					   "  FROM (SELECT o.ref AS old_ref, o.whole AS old_whole, n.ref, n.member, n.whole"
					   "          FROM (SELECT row_number() OVER () AS i, %s AS ref, to_jsonb(t) AS whole"
					   "                  FROM loyalty_old t) o"
					   "          JOIN (SELECT row_number() OVER () AS i, %s AS ref, %s AS member, to_jsonb(t) AS whole"
					   "                  FROM loyalty_new t) n ON n.i = o.i) c"
					   " WHERE (q.row_data = c.old_whole OR q.ref = c.old_ref) AND " ACCRUAL_WAITING,
					   AccrualCol(s->ref, "text"), AccrualCol(s->ref, "text"), AccrualCol(s->member, "text"));
	else
		sql = psprintf("UPDATE loyalty.accrual_quarantine q SET withdrawn_at = clock_timestamp()"
					   "  FROM (SELECT %s AS ref, to_jsonb(t) AS whole FROM loyalty_old t) o"
					   " WHERE (q.ref = o.ref OR q.kind = 'purchase' AND q.row_data = o.whole)"
					   "   AND " ACCRUAL_WAITING_DELETE,
					   AccrualCol(s->ref, "text"));
	LedgerExpect(SPI_execute_with_args(sql, 2, (Oid *) argtypes, args, NULL, false, 0), SPI_OK_UPDATE,
				 "updating the quarantine");
}

/*
 * UPDATE and DELETE: refund the purchases whose amount went down (matched
 * by ref) or whose row went away. Rows that never earned are left alone.
 * An UPDATE refunds the purchase down to its new amount, from what is left
 * unrefunded (not by the difference between the old and new rows: after a
 * raise, which earns nothing, that would refund twice).
 */
static void
AccrualRefundChanged(AccrualBatch *b, const AccrualSource *s, bool update, const char *old_table)
{
	static const Oid argtypes[] = {INT8OID};
	Datum		arg = Int64GetDatum(b->program_id);
	char	   *sql;
	SPITupleTable *tab;
	uint64		n;

	if (update)
		sql = psprintf("SELECT o.ref, n.amount, o.ref || ':amount:' || n.amount, x.account_id"
					   "  FROM (SELECT %s AS ref, %s AS amount FROM %s t) o"
					   "  JOIN (SELECT %s AS ref, %s AS amount FROM loyalty_new t) n ON n.ref = o.ref"
					   "  JOIN loyalty.accrual x ON x.program_id = $1 AND x.ref = o.ref"
					   " WHERE n.amount < o.amount ORDER BY o.ref",
					   AccrualCol(s->ref, "text"), AccrualCol(s->amount, "numeric"), old_table,
					   AccrualCol(s->ref, "text"), AccrualCol(s->amount, "numeric"));
	else
		sql = psprintf("SELECT o.ref, NULL::numeric, o.ref || ':deleted' || coalesce(':' || nullif("
					   "         (SELECT count(*) + 1 FROM loyalty.accrual_refund r WHERE r.program_id = $1"
					   "             AND r.purchase_ref = o.ref AND r.restored_at IS NOT NULL), 1), ''),"
					   "       x.account_id"
					   "  FROM (SELECT %s AS ref FROM %s t) o"
					   "  JOIN loyalty.accrual x ON x.program_id = $1 AND x.ref = o.ref"
					   " ORDER BY o.ref",
					   AccrualCol(s->ref, "text"), old_table);
	LedgerExpect(SPI_execute_with_args(sql, 1, (Oid *) argtypes, &arg, NULL, false, 0), SPI_OK_SELECT,
				  "reading changed purchases");
	tab = SPI_tuptable;
	n = SPI_processed;

	/*
	 * The member accounts of all the purchases first, in id order, as every
	 * posting locks them: the refunds below, in ref order, would otherwise
	 * take them in an order of their own and deadlock with a statement
	 * posting for the same members.
	 */
	if (n > 0)
	{
		static const Oid lockargs[] = {INT8ARRAYOID};
		Datum	   *ids = palloc(sizeof(Datum) * n);
		Datum		lockarg;

		for (uint64 i = 0; i < n; i++)
			ids[i] = SPI_getbinval(tab->vals[i], tab->tupdesc, 4, &(bool){0});
		lockarg = PointerGetDatum(construct_array(ids, (int) n, INT8OID, 8, true, TYPALIGN_DOUBLE));
		LedgerExpect(SPI_execute_with_args("SELECT 1 FROM loyalty.account a WHERE a.id = ANY ($1)"
										   " ORDER BY a.id FOR UPDATE",
										   1, (Oid *) lockargs, &lockarg, NULL, false, 0),
					 SPI_OK_SELECT, "locking accounts");
	}
	for (uint64 i = 0; i < n; i++)
	{
		bool		amount_null;
		Datum		amount = SPI_getbinval(tab->vals[i], tab->tupdesc, 2, &amount_null);

		AccrualTryRefund(b, SPI_getvalue(tab->vals[i], tab->tupdesc, 1), amount, amount_null,
						 SPI_getvalue(tab->vals[i], tab->tupdesc, 3), update);
	}
}

/*
 * A column's value as text, as the trigger's cast to text reads it (the
 * type's output; character(n) without its padding), or NULL.
 */
static char *
AccrualSlotText(TupleTableSlot *slot, AttrNumber attno, Oid typoutput, bool bpchar)
{
	bool		isnull;
	Datum		d = slot_getattr(slot, attno, &isnull);
	char	   *v;
	size_t		len;

	if (isnull)
		return NULL;
	v = OidOutputFunctionCall(typoutput, d);
	len = strlen(v);
	while (bpchar && len > 0 && v[len - 1] == ' ')
		v[--len] = '\0';
	return v;
}

static void
AccrualRegister(const char *name, Relation rel, Tuplestorestate *store)
{
	EphemeralNamedRelation enr = palloc0(sizeof(EphemeralNamedRelationData));

	enr->md.name = (char *) name;
	enr->md.reliddesc = RelationGetRelid(rel);
	enr->md.tupdesc = NULL;
	enr->md.enrtype = ENR_NAMED_TUPLESTORE;
	enr->md.enrtuples = tuplestore_tuple_count(store);
	enr->reldata = store;
	if (SPI_register_relation(enr) != SPI_OK_REL_REGISTER)
		elog(ERROR, "could not register the transition table %s", name);
}

/* A batch of the attached table's program. */
static void
AccrualStartBatch(AccrualBatch *b, Relation rel, const AccrualSource *s)
{
	memset(b, 0, sizeof(*b));
	b->source = RelationGetRelid(rel);
	AccrualLoadProgram(b, s->program_id, NULL);
}

/*
 * Post a statement's new rows (of table, a transition table): earn, undo
 * the DELETE of orders back in the table, then recover debts from what
 * the statement earned, after the undoing.
 */
static void
AccrualPostNew(AccrualBatch *b, const AccrualSource *s, TriggerData *trig, const char *table,
			   Tuplestorestate *rows)
{
	b->stmt_cxt = CurrentMemoryContext;
	b->defer_recovery = true;
	AccrualCheckFirstCap(b);
	AccrualOnInsert(b, s, trig, table, rows, tuplestore_tuple_count(rows));
	if (b->reinserted != NIL)
		AccrualRestoreReinserted(b);
	AccrualRecoverDebts(b);
}

/*
 * UPDATE changing the ref of orders that earned: the order under the old
 * ref is gone from the table and one under the new ref is there, so the
 * old purchase is refunded as a DELETE refunds it (ref:deleted, which its
 * return undoes) and the new row posts as an INSERT posts it (earning,
 * quarantined, or bringing back a deleted order). Without this, the points
 * stayed with a ref no row had any more, and deleting or lowering the
 * row later refunded nothing. A row whose old version never earned is
 * left to the quarantine (AccrualChangeQuarantined): an UPDATE that is
 * not a change of ref never earns.
 *
 * The old and new versions of a row are at the same position in the two
 * transition tables (the executor adds both for each row it updates);
 * refs are compared as the trigger reads them, as text.
 */
static void
AccrualOnMoved(const AccrualSource *s, TriggerData *trig)
{
	Relation	rel = trig->tg_relation;
	TupleDesc	desc = RelationGetDescr(rel);
	Tuplestorestate *olds = trig->tg_oldtable;
	Tuplestorestate *news = trig->tg_newtable;
	Tuplestorestate *moved_old;
	Tuplestorestate *moved_new;
	TupleTableSlot *os;
	TupleTableSlot *ns;
	TupleTableSlot *xs;
	Relation	accrual;
	Snapshot	snap;
	AttrNumber	attno;
	Oid			typoutput;
	bool		varlena;
	bool		bpchar;
	int64		nmoved = 0;
	AccrualBatch b;

	if (olds == NULL || news == NULL || tuplestore_tuple_count(olds) != tuplestore_tuple_count(news))
		return;
	attno = LedgerAttnum(rel, s->ref);
	getTypeOutputInfo(TupleDescAttr(desc, attno - 1)->atttypid, &typoutput, &varlena);
	bpchar = getBaseType(TupleDescAttr(desc, attno - 1)->atttypid) == BPCHAROID;

	moved_old = tuplestore_begin_heap(false, false, work_mem);
	moved_new = tuplestore_begin_heap(false, false, work_mem);
	os = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
	ns = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
	accrual = LedgerOpenTable("accrual", AccessShareLock);
	xs = table_slot_create(accrual, NULL);
	/* the snapshot the queries below read the purchases with */
	snap = RegisterSnapshot(GetTransactionSnapshot());
	/* read pointers of our own, as scans of the transition tables take */
	tuplestore_select_read_pointer(olds, tuplestore_alloc_read_pointer(olds, EXEC_FLAG_REWIND));
	tuplestore_rescan(olds);
	tuplestore_select_read_pointer(news, tuplestore_alloc_read_pointer(news, EXEC_FLAG_REWIND));
	tuplestore_rescan(news);
	while (tuplestore_gettupleslot(olds, true, false, os) && tuplestore_gettupleslot(news, true, false, ns))
	{
		Form_pg_attribute att = TupleDescAttr(desc, attno - 1);
		bool		old_null;
		bool		new_null;
		Datum		old_d = slot_getattr(os, attno, &old_null);
		Datum		new_d = slot_getattr(ns, attno, &new_null);
		char	   *old_ref;
		char	   *new_ref;
		Datum		keys[2];

		/* most UPDATEs leave the ref alone: no text for the same bytes */
		if (old_null || (!new_null && datumIsEqual(old_d, new_d, att->attbyval, att->attlen)))
			continue;
		old_ref = AccrualSlotText(os, attno, typoutput, bpchar);
		new_ref = AccrualSlotText(ns, attno, typoutput, bpchar);
		if (new_ref != NULL && strcmp(old_ref, new_ref) == 0)
			continue;
		keys[0] = Int64GetDatum(s->program_id);
		keys[1] = CStringGetTextDatum(old_ref);
		if (!LedgerIndexFetch(accrual, "accrual_pkey", 2, keys, snap, xs))
			continue;
		tuplestore_puttupleslot(moved_old, os);
		tuplestore_puttupleslot(moved_new, ns);
		nmoved++;
	}
	UnregisterSnapshot(snap);
	ExecDropSingleTupleTableSlot(os);
	ExecDropSingleTupleTableSlot(ns);
	ExecDropSingleTupleTableSlot(xs);
	table_close(accrual, NoLock);
	if (nmoved == 0)
		return;

	AccrualRegister("loyalty_moved_old", rel, moved_old);
	AccrualRegister("loyalty_moved_new", rel, moved_new);

	/*
	 * The accounts of both steps first, in id order, as every posting locks
	 * them: the old purchases' members and the new rows' (a member enrolled
	 * by the posting has a new account no one else can be waiting for).
	 * Each step then takes locks it already holds.
	 */
	{
		static const Oid argtypes[] = {INT8OID};
		Datum		arg = Int64GetDatum(s->program_id);
		char	   *sql = psprintf("SELECT 1 FROM loyalty.account a WHERE a.id IN ("
								   "  SELECT x.account_id FROM loyalty_moved_old t"
								   "    JOIN loyalty.accrual x ON x.program_id = $1 AND x.ref = %s"
								   "  UNION"
								   "  SELECT c.id FROM loyalty_moved_new t"
								   "    JOIN loyalty.member m ON m.program_id = $1 AND m.member_ref = %s"
								   "    JOIN loyalty.account c ON c.member_id = m.id)"
								   " ORDER BY a.id FOR UPDATE",
								   AccrualCol(s->ref, "text"), AccrualCol(s->member, "text"));

		LedgerExpect(SPI_execute_with_args(sql, 1, (Oid *) argtypes, &arg, NULL, false, 0),
					 SPI_OK_SELECT, "locking accounts");
	}
	AccrualStartBatch(&b, rel, s);
	AccrualRefundChanged(&b, s, false, "loyalty_moved_old");
	AccrualStartBatch(&b, rel, s);
	AccrualPostNew(&b, s, trig, "loyalty_moved_new", moved_new);
}

/* UPDATE and DELETE: refunds, the quarantine, and refs changed. */
static void
AccrualOnChange(AccrualBatch *b, const AccrualSource *s, TriggerData *trig, bool update)
{
	AccrualRefundChanged(b, s, update, "loyalty_old");
	AccrualChangeQuarantined(b, s, update);
	if (update && s->ref != NULL)
		AccrualOnMoved(s, trig);
}

/*
 * _ordinal(): a number that grows with every call in this backend. The
 * source query over a transition table numbers its rows with it as the
 * scan yields them, in the statement's order (a volatile function keeps the
 * subquery from being pulled up into the join), so that the rows can be put
 * back in that order after a join. row_number() OVER () did the same but
 * copied every row, whole, into the window's buffer: a tenth of a bulk
 * insert.
 */
PG_FUNCTION_INFO_V1(accrual_ordinal);

static int64 ordinal = 0;

Datum
accrual_ordinal(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(++ordinal);
}

/* The last number _ordinal() gave. */
int64
AccrualOrdinalNow(void)
{
	return ordinal;
}

Datum
accrual_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trig = (TriggerData *) fcinfo->context;
	AccrualSource s;
	AccrualBatch b;
	Oid			relid;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_STATEMENT(trig->tg_event) ||
		!TRIGGER_FIRED_AFTER(trig->tg_event))
		elog(ERROR, "_accrual_trigger() must be an AFTER ... FOR EACH STATEMENT trigger");
	relid = RelationGetRelid(trig->tg_relation);
	LedgerPushSearchPath();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_register_trigger_data(trig) != SPI_OK_TD_REGISTER)
		elog(ERROR, "SPI_register_trigger_data failed");
	if (!AccrualLoadSource(relid, &s))
	{
		/* detached in this transaction while the triggers stay: nothing to do */
		SPI_finish();
		PopOverrideSearchPath();
		return PointerGetDatum(NULL);
	}
	AccrualStartBatch(&b, trig->tg_relation, &s);
	if (TRIGGER_FIRED_BY_INSERT(trig->tg_event))
		AccrualPostNew(&b, &s, trig, "loyalty_new", trig->tg_newtable);
	else
		AccrualOnChange(&b, &s, trig, TRIGGER_FIRED_BY_UPDATE(trig->tg_event));
	SPI_finish();
	PopOverrideSearchPath();
	return PointerGetDatum(NULL);
}
