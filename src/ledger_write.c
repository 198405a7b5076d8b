/*
 * ledger_write.c: appending rows to a journal table without the executor
 *
 * The accrual paths write three rows per purchase. Through SQL, each
 * statement pays for parse analysis or plan-cache checks, executor start-up
 * and a projection per row; for a single purchase that dominates the cost
 * of the insert itself. A writer opens the table once per batch and appends
 * rows the way COPY does: the table access method's insert, then every
 * index (unique ones checked as usual, partial predicates evaluated), with
 * the table's NOT NULL and CHECK constraints enforced.
 *
 * A writer fires no triggers and applies no column defaults: every column is
 * given (LedgerWriterOpen refuses a table with a column it was not told
 * about, so a new column cannot silently stay NULL), and the journal tables
 * have no INSERT triggers. Callers hold the locks the posting protocol
 * requires (member accounts, in id order) before they write.
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/sequence.h"
#include "executor/executor.h"
#include "nodes/makefuncs.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "ledger_write.h"

/*
 * Open loyalty.<table> for appending rows whose columns are named, in the
 * order the caller sets them. sequence, when given, is the sequence of the
 * first column (LedgerWriterNextId). bulk: many rows will follow (a bulk
 * insert state keeps the target page pinned between them).
 */
LedgerWriter *
LedgerWriterOpen(const char *table, const char *const *columns, int ncols, const char *sequence,
				 bool bulk)
{
	LedgerWriter *w = palloc0(sizeof(LedgerWriter));
	Oid			relid;
	TupleDesc	desc;
	int			given = 0;

	Assert(ncols <= LEDGER_WRITER_MAX_COLS);
	relid = RangeVarGetRelid(makeRangeVar("loyalty", (char *) table, -1), RowExclusiveLock, false);
	w->rel = table_open(relid, NoLock);
	desc = RelationGetDescr(w->rel);
	w->ncols = ncols;
	for (int c = 0; c < ncols; c++)
	{
		w->attno[c] = get_attnum(relid, columns[c]);
		if (w->attno[c] == InvalidAttrNumber)
			elog(ERROR, "loyalty.%s has no column \"%s\"", table, columns[c]);
	}
	for (int i = 0; i < desc->natts; i++)
		if (!TupleDescAttr(desc, i)->attisdropped)
			given++;
	if (given != ncols)
		elog(ERROR, "loyalty.%s has %d columns, the writer knows %d", table, given, ncols);

	w->estate = CreateExecutorState();
	w->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(w->rri, w->rel, 0, NULL, 0);
	ExecOpenIndices(w->rri, false);
	w->slot = table_slot_create(w->rel, NULL);
	w->bistate = bulk ? GetBulkInsertState() : NULL;
	w->cid = GetCurrentCommandId(true);
	if (sequence != NULL)
		w->seq = RangeVarGetRelid(makeRangeVar("loyalty", (char *) sequence, -1), NoLock, false);
	return w;
}

/* The next value of the writer's sequence. */
int64
LedgerWriterNextId(LedgerWriter *w)
{
	Assert(OidIsValid(w->seq));
	return nextval_internal(w->seq, false);
}

/* Append the row in w->values/w->nulls, with its index entries. */
void
LedgerWriterInsert(LedgerWriter *w)
{
	TupleTableSlot *slot = w->slot;
	List	   *recheck;

	ExecClearTuple(slot);
	for (int c = 0; c < w->ncols; c++)
	{
		slot->tts_values[w->attno[c] - 1] = w->values[c];
		slot->tts_isnull[w->attno[c] - 1] = w->nulls[c];
	}
	ExecStoreVirtualTuple(slot);
	if (RelationGetDescr(w->rel)->constr != NULL)
		ExecConstraints(w->rri, slot, w->estate);
	table_tuple_insert(w->rel, slot, w->cid, 0, w->bistate);
	if (w->rri->ri_NumIndices > 0)
	{
		recheck = ExecInsertIndexTuples(w->rri, slot, w->estate, false, false, NULL, NIL);
		list_free(recheck);
	}
	ResetPerTupleExprContext(w->estate);
}

void
LedgerWriterClose(LedgerWriter *w)
{
	ExecCloseIndices(w->rri);
	if (w->bistate != NULL)
		FreeBulkInsertState(w->bistate);
	ExecDropSingleTupleTableSlot(w->slot);
	FreeExecutorState(w->estate);
	table_close(w->rel, NoLock);
	pfree(w);
}
