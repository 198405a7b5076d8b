/*
 * ledger_write.c: appending rows to a journal table without the executor
 *
 * The accrual paths write three rows per purchase. Through SQL, each
 * statement pays for parse analysis or plan-cache checks, executor start-up
 * and a projection per row; for a single purchase that dominates the cost
 * of the insert itself. A writer opens the table once per batch and appends
 * rows the way COPY does: the table access method's insert, then every
 * index (unique ones checked as usual, partial predicates evaluated), with
 * the table's NOT NULL constraints enforced. CHECK constraints are not
 * evaluated (building their expressions cost more than a one-row posting):
 * the callers write values valid by construction (docs/accrual.md, "How
 * accrual writes").
 *
 * A writer fires no triggers and applies no column defaults: every column is
 * given (LedgerWriterOpen refuses a table with a column it was not told
 * about, so a new column cannot silently stay NULL), and the journal tables
 * have no INSERT triggers. Callers hold the locks the posting protocol
 * requires (member accounts, in id order) before they write.
 */
#include "postgres.h"

#include "access/brin.h"
#include "access/brin_revmap.h"
#include "access/genam.h"
#include "access/heapam.h"
#include "access/relation.h"
#include "access/relscan.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/namespace.h"
#include "catalog/pg_am_d.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "executor/executor.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "storage/bufmgr.h"
#include "storage/lmgr.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "ledger_write.h"

/*
 * The loyalty tables a backend has opened, by name: a sale opens half a
 * dozen, and looking each name up in the catalog was a visible part of its
 * cost. An entry is only a guess, checked on every use (the relation with
 * that Oid is still a table of that name in the same schema), so a dropped
 * and re-created extension is simply looked up again.
 */
#define LEDGER_TABLES 16

typedef struct LedgerTableOid
{
	const char *name;			/* a string constant of our code */
	Oid			relid;
	Oid			nsp;
} LedgerTableOid;

static LedgerTableOid ledger_tables[LEDGER_TABLES];

static LedgerTableOid *
LedgerTableEntry(const char *table)
{
	for (int i = 0; i < LEDGER_TABLES; i++)
		if (ledger_tables[i].name == NULL || strcmp(ledger_tables[i].name, table) == 0)
			return &ledger_tables[i];
	return NULL;
}

/* Open loyalty.<table> with the lock given. */
Relation
LedgerOpenTable(const char *table, LOCKMODE mode)
{
	LedgerTableOid *e = LedgerTableEntry(table);
	Relation	rel;
	Oid			relid;

	if (e != NULL && e->name != NULL && (rel = try_relation_open(e->relid, mode)) != NULL)
	{
		if (rel->rd_rel->relkind == RELKIND_RELATION && RelationGetNamespace(rel) == e->nsp &&
			strcmp(RelationGetRelationName(rel), table) == 0)
			return rel;
		relation_close(rel, mode);
	}
	relid = RangeVarGetRelid(makeRangeVar("loyalty", (char *) table, -1), mode, false);
	rel = table_open(relid, NoLock);
	if (e != NULL)
	{
		e->name = table;
		e->relid = relid;
		e->nsp = RelationGetNamespace(rel);
	}
	return rel;
}

/*
 * The Oids of the indexes and sequences of loyalty tables a backend has
 * looked up by name (two catalog look-ups each, a dozen per sale). Every
 * change to pg_class this backend takes in empties the list, and a name is
 * only looked up once its table is locked: a relation dropped or renamed
 * before that lock is seen (the lock takes in the invalidations), and none
 * can be after it while the table is locked.
 */
#define LEDGER_NAMES 64

typedef struct LedgerNameOid
{
	char		name[NAMEDATALEN];
	Oid			nsp;
	Oid			relid;
} LedgerNameOid;

static LedgerNameOid ledger_names[LEDGER_NAMES];
static int	ledger_nnames = 0;

static void
LedgerNamesReset(Datum arg, int cacheid, uint32 hashvalue)
{
	ledger_nnames = 0;
}

/* The Oid of a relation in a table's schema by name (InvalidOid: none). */
static Oid
LedgerRelid(Relation table, const char *name)
{
	static bool registered = false;
	Oid			nsp = RelationGetNamespace(table);
	Oid			relid;

	if (!registered)
	{
		CacheRegisterSyscacheCallback(RELOID, LedgerNamesReset, (Datum) 0);
		registered = true;
	}
	for (int i = 0; i < ledger_nnames; i++)
		if (ledger_names[i].nsp == nsp && strcmp(ledger_names[i].name, name) == 0)
			return ledger_names[i].relid;
	relid = get_relname_relid(name, nsp);
	if (OidIsValid(relid) && ledger_nnames < LEDGER_NAMES && strlen(name) < NAMEDATALEN)
	{
		strlcpy(ledger_names[ledger_nnames].name, name, NAMEDATALEN);
		ledger_names[ledger_nnames].nsp = nsp;
		ledger_names[ledger_nnames].relid = relid;
		ledger_nnames++;
	}
	return relid;
}

/* The Oid of an index of a loyalty table, by name; an error if there is none. */
Oid
LedgerIndexOid(Relation rel, const char *index)
{
	Oid			idx = LedgerRelid(rel, index);

	if (!OidIsValid(idx))
		elog(ERROR, "index loyalty.%s does not exist", index);
	return idx;
}

/*
 * The number of a column of a loyalty table, from the relation's descriptor
 * (no catalog look-up on the posting path); an error if there is none.
 */
AttrNumber
LedgerAttnum(Relation rel, const char *name)
{
	TupleDesc	desc = RelationGetDescr(rel);

	for (int i = 0; i < desc->natts; i++)
		if (!TupleDescAttr(desc, i)->attisdropped &&
			strcmp(NameStr(TupleDescAttr(desc, i)->attname), name) == 0)
			return i + 1;
	elog(ERROR, "%s.%s has no column \"%s\"", get_namespace_name(RelationGetNamespace(rel)),
		 RelationGetRelationName(rel), name);
	return InvalidAttrNumber;	/* keep the compiler quiet */
}

/*
 * The attribute numbers of a writer's columns, by table and column list (a
 * static array of the caller's): a sale opens four writers of 9 to 21
 * columns, and finding each by name was a tenth of opening them. Like the
 * table Oids, an entry is a guess checked on every use (the attribute at
 * that number is a live column of that name), so a table altered since is
 * simply looked up again.
 */
#define LEDGER_COLUMN_SETS 16

typedef struct LedgerColumnSet
{
	Oid			relid;
	const char *const *columns;
	AttrNumber	attno[LEDGER_WRITER_MAX_COLS];
} LedgerColumnSet;

static LedgerColumnSet ledger_column_sets[LEDGER_COLUMN_SETS];

static void
LedgerWriterColumns(LedgerWriter *w, const char *const *columns)
{
	TupleDesc	desc = RelationGetDescr(w->rel);
	LedgerColumnSet *set = NULL;
	int			c;

	for (int i = 0; i < LEDGER_COLUMN_SETS; i++)
	{
		LedgerColumnSet *e = &ledger_column_sets[i];

		if (e->columns == columns && e->relid == RelationGetRelid(w->rel))
		{
			set = e;
			break;
		}
		if (e->columns == NULL && set == NULL)
			set = e;
	}
	for (c = 0; set != NULL && set->columns == columns && c < w->ncols; c++)
	{
		AttrNumber	a = set->attno[c];

		if (a < 1 || a > desc->natts || TupleDescAttr(desc, a - 1)->attisdropped ||
			strcmp(NameStr(TupleDescAttr(desc, a - 1)->attname), columns[c]) != 0)
			break;
		w->attno[c] = a;
	}
	if (set != NULL && set->columns == columns && c == w->ncols)
		return;
	for (c = 0; c < w->ncols; c++)
		w->attno[c] = LedgerAttnum(w->rel, columns[c]);
	if (set == NULL)
		set = &ledger_column_sets[(uintptr_t) columns % LEDGER_COLUMN_SETS];
	set->relid = RelationGetRelid(w->rel);
	set->columns = columns;
	memcpy(set->attno, w->attno, sizeof(AttrNumber) * w->ncols);
}

/* One of the ANDed conditions of a partial index's predicate, ready to test. */
typedef struct LedgerConjunct
{
	Bitmapset  *attrs;			/* the columns it reads (NULL: none) */
	ExprState  *state;
} LedgerConjunct;

/*
 * What ExecOpenIndices builds for a table's indexes (IndexInfo, with the
 * partial indexes' predicates ready to evaluate), kept per backend: a sale
 * opens the same four tables every time, and building their IndexInfo and
 * planning and compiling the predicates of the journal's partial indexes
 * (kind <> 'accrual', remaining > 0) cost more than inserting the entries.
 * The indexes themselves are still opened and locked by every writer but
 * for one case: a partial index one of whose ANDed conditions reads only
 * columns the writer has declared the same in every row
 * (LedgerWriterConstant), and is not true for them, can never take one of
 * its rows, so it is left alone (the journal's three indexes WHERE kind <>
 * 'accrual', for a purchase's transfer; lot_expiry_idx and lot_pending_idx
 * for lots that never expire or never wait: a lock, an open and a
 * predicate test less per index and sale). An
 * entry is used only while the table has the same indexes with the same
 * pg_index rows (Oid and xmin), and each writer takes a copy of its own
 * IndexInfo (the index AM's per-statement cache, the ready flag).
 */
typedef struct LedgerIndexSet
{
	Oid			relid;			/* the hash key */
	int			n;
	Oid		   *oids;
	TransactionId *xmins;
	IndexInfo **infos;			/* templates, with predicate and expression states */
	List	  **conjuncts;		/* each predicate's LedgerConjuncts (NIL: none) */
	MemoryContext cxt;
} LedgerIndexSet;

static HTAB *ledger_index_sets = NULL;
/* writers open now (their IndexInfo copies point into the sets), and sets they outlived */
static int	ledger_writers_open = 0;
static List *ledger_retired = NIL;

static void
LedgerIndexSetsAtEOXact(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_PREPARE)
		ledger_writers_open = 0;
}

/* The xmin of an index's pg_index row (InvalidTransactionId: no such index). */
static TransactionId
LedgerIndexXmin(Oid index)
{
	HeapTuple	tup = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(index));
	TransactionId xmin;

	if (!HeapTupleIsValid(tup))
		return InvalidTransactionId;
	xmin = HeapTupleHeaderGetXmin(tup->t_data);
	ReleaseSysCache(tup);
	return xmin;
}

/*
 * Whether set still describes the table's indexes: oids[] in the order of
 * its index list, descs[i] each opened, or NULL for one left alone (then
 * its pg_index row is checked through the catalog cache).
 */
static bool
LedgerIndexSetValid(const LedgerIndexSet *set, const Oid *oids, Relation *descs, int n)
{
	if (set->n != n)
		return false;
	for (int i = 0; i < n; i++)
		if (set->oids[i] != oids[i] ||
			set->xmins[i] != (descs[i] != NULL ? HeapTupleHeaderGetXmin(descs[i]->rd_indextuple->t_data)
							  : LedgerIndexXmin(oids[i])))
			return false;
	return true;
}

/* Build the templates of set from the indexes opened. */
static void
LedgerIndexSetBuild(LedgerIndexSet *set, Relation *descs, int n)
{
	MemoryContext old;

	set->cxt = AllocSetContextCreate(TopMemoryContext, "loyalty index set", ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(set->cxt);
	set->n = n;
	set->oids = palloc(sizeof(Oid) * Max(n, 1));
	set->xmins = palloc(sizeof(TransactionId) * Max(n, 1));
	set->infos = palloc(sizeof(IndexInfo *) * Max(n, 1));
	set->conjuncts = palloc0(sizeof(List *) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		IndexInfo  *ii = BuildIndexInfo(descs[i]);
		ListCell   *lc;

		/* ii_Predicate is an implicit-AND list, as RelationGetIndexPredicate makes it */
		foreach(lc, ii->ii_Predicate)
		{
			LedgerConjunct *c = palloc0(sizeof(LedgerConjunct));

			pull_varattnos(lfirst(lc), 1, &c->attrs);
			c->state = ExecInitQual(list_make1(expression_planner(lfirst(lc))), NULL);
			set->conjuncts[i] = lappend(set->conjuncts[i], c);
		}
		if (ii->ii_Unique)
			BuildSpeculativeIndexInfo(descs[i], ii);
		/* as ExecInsertIndexTuples and FormIndexDatum would, per statement */
		if (ii->ii_Predicate != NIL)
			ii->ii_PredicateState = ExecInitQual((List *) expression_planner((Expr *) ii->ii_Predicate), NULL);
		if (ii->ii_Expressions != NIL)
		{
			ListCell   *lc;

			foreach(lc, ii->ii_Expressions)
				ii->ii_ExpressionsState = lappend(ii->ii_ExpressionsState,
												  ExecInitExpr(expression_planner(lfirst(lc)), NULL));
		}
		set->oids[i] = RelationGetRelid(descs[i]);
		set->xmins[i] = HeapTupleHeaderGetXmin(descs[i]->rd_indextuple->t_data);
		set->infos[i] = ii;
	}
	MemoryContextSwitchTo(old);
}

/*
 * Whether the index at position i of set can be left alone by writer w:
 * one of the conditions its predicate ANDs reads only columns w declared
 * the same in every row and is not true for them (first: the writer's
 * first row), so the predicate is never true for w's rows (the journal's
 * kind <> 'accrual' for a purchase's line; lot_expiry_idx's expires_at IS
 * NOT NULL for lots that never expire).
 */
static bool
LedgerIndexNeverTakes(LedgerWriter *w, LedgerIndexSet *set, int i, TupleTableSlot *first)
{
	ExprContext *econtext;
	bool		never = false;
	ListCell   *lc;

	if (set->conjuncts[i] == NIL || w->constattrs == NULL)
		return false;
	econtext = GetPerTupleExprContext(w->estate);
	econtext->ecxt_scantuple = first;
	foreach(lc, set->conjuncts[i])
	{
		LedgerConjunct *c = lfirst(lc);

		if (c->attrs != NULL && bms_is_subset(c->attrs, w->constattrs) && !ExecQual(c->state, econtext))
		{
			never = true;
			break;
		}
	}
	ResetPerTupleExprContext(w->estate);
	return never;
}

/*
 * ExecOpenIndices for a writer, from the backend's index set of its table:
 * the same arrays in rri, each IndexInfo a copy of the template, less the
 * partial indexes that can never take the writer's rows (first: the row
 * about to be indexed, whose constant columns decide that).
 */
static void
LedgerOpenIndices(LedgerWriter *w, TupleTableSlot *first)
{
	Relation	rel = w->rel;
	List	   *list;
	int			n;
	int			k = 0;
	ListCell   *lc;
	Oid		   *oids;
	Relation   *descs;
	bool	   *skip;
	IndexInfo **infos;
	LedgerIndexSet *set = NULL;
	bool		found = false;

	w->rri->ri_NumIndices = 0;
	if (!RelationGetForm(rel)->relhasindex)
		return;
	list = RelationGetIndexList(rel);
	n = list_length(list);
	if (n == 0)
		return;
	oids = palloc(sizeof(Oid) * n);
	descs = palloc0(sizeof(Relation) * n);
	skip = palloc0(sizeof(bool) * n);
	infos = palloc(sizeof(IndexInfo *) * n);
	foreach(lc, list)
		oids[k++] = lfirst_oid(lc);
	list_free(list);

	if (ledger_index_sets == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(LedgerIndexSet);
		ledger_index_sets = hash_create("loyalty index sets", 16, &ctl, HASH_ELEM | HASH_BLOBS);
		RegisterXactCallback(LedgerIndexSetsAtEOXact, NULL);
	}
	if (ledger_writers_open == 0 && ledger_retired != NIL)
	{
		foreach(lc, ledger_retired)
			MemoryContextDelete(lfirst(lc));
		list_free(ledger_retired);
		ledger_retired = NIL;
	}
	/* which indexes to leave alone: only from a set of these very indexes */
	if (first != NULL && w->constattrs != NULL)
	{
		set = hash_search(ledger_index_sets, &rel->rd_id, HASH_FIND, NULL);
		for (int i = 0; set != NULL && i < n; i++)
			if (i >= set->n || set->oids[i] != oids[i])
				set = NULL;
		for (int i = 0; set != NULL && i < n; i++)
			skip[i] = LedgerIndexNeverTakes(w, set, i, first);
	}
	for (int i = 0; i < n; i++)
		if (!skip[i])
			descs[i] = index_open(oids[i], RowExclusiveLock);

	set = hash_search(ledger_index_sets, &rel->rd_id, HASH_ENTER, &found);
	if (found && !LedgerIndexSetValid(set, oids, descs, n))
	{
		/* a writer still open may use it: free it once none is */
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		ledger_retired = lappend(ledger_retired, set->cxt);
		MemoryContextSwitchTo(old);
		found = false;
	}
	if (!found)
	{
		/* built from every index: none is left alone on a set not checked */
		for (int i = 0; i < n; i++)
			if (skip[i])
			{
				descs[i] = index_open(oids[i], RowExclusiveLock);
				skip[i] = false;
			}
		set->cxt = NULL;
		PG_TRY();
		{
			LedgerIndexSetBuild(set, descs, n);
		}
		PG_CATCH();
		{
			if (set->cxt != NULL)
				MemoryContextDelete(set->cxt);
			hash_search(ledger_index_sets, &rel->rd_id, HASH_REMOVE, NULL);
			PG_RE_THROW();
		}
		PG_END_TRY();
	}
	k = 0;
	for (int i = 0; i < n; i++)
	{
		IndexInfo  *ii;

		if (skip[i])
			continue;
		ii = palloc(sizeof(IndexInfo));
		memcpy(ii, set->infos[i], sizeof(IndexInfo));
		ii->ii_ReadyForInserts = descs[i]->rd_index->indisready;
		ii->ii_AmCache = NULL;
		ii->ii_Context = CurrentMemoryContext;
		descs[k] = descs[i];
		infos[k++] = ii;
	}
	pfree(oids);
	pfree(skip);

	/*
	 * The BRIN indexes a flush can leave alone (LedgerWriterFlushBrin) go
	 * last: a flush indexes the others through rri_flush, which stops
	 * before them.
	 */
	w->nbrin = 0;
	for (int i = k - 1; i >= 0; i--)
		if (descs[i]->rd_rel->relam == BRIN_AM_OID && infos[i]->ii_Predicate == NIL &&
			!BrinGetAutoSummarize(descs[i]))
		{
			int			last = k - 1 - w->nbrin++;
			Relation	d = descs[i];
			IndexInfo  *ii = infos[i];

			memmove(&descs[i], &descs[i + 1], sizeof(Relation) * (last - i));
			memmove(&infos[i], &infos[i + 1], sizeof(IndexInfo *) * (last - i));
			descs[last] = d;
			infos[last] = ii;
		}
	w->rri->ri_NumIndices = k;
	w->rri->ri_IndexRelationDescs = descs;
	w->rri->ri_IndexRelationInfo = infos;
	w->rri_flush = *w->rri;
	w->rri_flush.ri_NumIndices = k - w->nbrin;
}

/*
 * Rows a bulk appender keeps before writing them together, as COPY does:
 * one table_multi_insert (a WAL record and a buffer lock per page, not per
 * row), then their index entries row by row.
 */
#define LEDGER_BUFFERED_ROWS 1000

/*
 * Open loyalty.<table> for appending rows whose columns are named, in the
 * order the caller sets them. sequence, when given, is the sequence of the
 * first column (LedgerWriterNextId). bulk: many rows will follow (a bulk
 * insert state keeps the target page pinned between them, and a plain
 * appender, without an arbiter, writes its rows in batches: they are in
 * the table only once LedgerWriterClose has returned).
 */
LedgerWriter *
LedgerWriterOpen(const char *table, const char *const *columns, int ncols, const char *sequence,
				 bool bulk, const char *arbiter)
{
	LedgerWriter *w = palloc0(sizeof(LedgerWriter));
	TupleDesc	desc;
	int			given = 0;

	Assert(ncols <= LEDGER_WRITER_MAX_COLS);
	w->rel = LedgerOpenTable(table, RowExclusiveLock);
	desc = RelationGetDescr(w->rel);
	w->ncols = ncols;
	LedgerWriterColumns(w, columns);
	for (int i = 0; i < desc->natts; i++)
		if (!TupleDescAttr(desc, i)->attisdropped)
			given++;
	if (given != ncols)
		elog(ERROR, "loyalty.%s has %d columns, the writer knows %d", table, given, ncols);

	w->estate = CreateExecutorState();
	/*
	 * Only what the index routines read: the table and (LedgerOpenIndices)
	 * its indexes. InitResultRelInfo would also copy the table's triggers,
	 * which a writer never fires.
	 */
	w->rri = makeNode(ResultRelInfo);
	w->rri->ri_RelationDesc = w->rel;
	ledger_writers_open++;
	if (arbiter != NULL)
	{
		LedgerOpenIndices(w, NULL);
		w->indices_open = true;
		w->arbiters = list_make1_oid(LedgerIndexOid(w->rel, arbiter));
	}
	w->slot = table_slot_create(w->rel, NULL);
	/* update_slot and fetch_slot when first needed: most writers only append */
	w->bistate = bulk ? GetBulkInsertState() : NULL;
	if (bulk && arbiter == NULL)
		w->buffered = palloc0(sizeof(TupleTableSlot *) * LEDGER_BUFFERED_ROWS);
	w->cid = GetCurrentCommandId(true);
	if (sequence != NULL)
	{
		w->seq = LedgerRelid(w->rel, sequence);
		if (!OidIsValid(w->seq))
			elog(ERROR, "sequence loyalty.%s does not exist", sequence);
	}
	return w;
}

/*
 * Declare that column (one of the writer's) has the same value in every row
 * it writes, as its first row has: partial indexes whose predicate reads
 * only such columns and is false for them are then left alone (see
 * LedgerIndexSet). A row with another value is an error, not a missed index
 * entry. Before the first row.
 */
void
LedgerWriterConstant(LedgerWriter *w, const char *column)
{
	AttrNumber	a = LedgerAttnum(w->rel, column);

	Assert(!w->indices_open && !w->const_seen);
	for (int c = 0; c < w->ncols; c++)
		if (w->attno[c] == a)
		{
			w->constcol[w->nconst++] = c;
			w->constattrs = bms_add_member(w->constattrs, a - FirstLowInvalidHeapAttributeNumber);
			return;
		}
	elog(ERROR, "the writer of loyalty.%s has no column \"%s\"", RelationGetRelationName(w->rel), column);
}

/* Check the row in w->values against the writer's constant columns (the first row sets them). */
static void
LedgerWriterCheckConstants(LedgerWriter *w)
{
	TupleDesc	desc = RelationGetDescr(w->rel);

	for (int i = 0; i < w->nconst; i++)
	{
		int			c = w->constcol[i];
		Form_pg_attribute att = TupleDescAttr(desc, w->attno[c] - 1);

		if (!w->const_seen)
		{
			MemoryContext old = MemoryContextSwitchTo(w->estate->es_query_cxt);

			w->constnull[i] = w->nulls[c];
			w->constval[i] = w->nulls[c] ? (Datum) 0 : datumCopy(w->values[c], att->attbyval, att->attlen);
			MemoryContextSwitchTo(old);
		}
		else if (w->nulls[c] != w->constnull[i] ||
				 (!w->nulls[c] && !datumIsEqual(w->values[c], w->constval[i], att->attbyval, att->attlen)))
			elog(ERROR, "column \"%s\" of a row written to loyalty.%s differs from the writer's first row",
				 NameStr(att->attname), RelationGetRelationName(w->rel));
	}
	w->const_seen = true;
}

/* The next value of the writer's sequence. */
int64
LedgerWriterNextId(LedgerWriter *w)
{
	Assert(OidIsValid(w->seq));
	return nextval_internal(w->seq, false);
}

/*
 * The table's indexes, opened when first needed (slot: the first row to
 * index): a writer that only rewrites rows in place (heap-only updates)
 * never opens them.
 */
static void
LedgerWriterIndices(LedgerWriter *w, TupleTableSlot *slot)
{
	if (!w->indices_open)
	{
		LedgerOpenIndices(w, slot);
		w->indices_open = true;
	}
}

/* The row in w->values/w->nulls, in slot, NOT NULL checked. */
static TupleTableSlot *
LedgerWriterFill(LedgerWriter *w, TupleTableSlot *slot)
{
	TupleDesc	desc = RelationGetDescr(w->rel);

	if (w->nconst > 0)
		LedgerWriterCheckConstants(w);
	ExecClearTuple(slot);
	for (int c = 0; c < w->ncols; c++)
	{
		AttrNumber	a = w->attno[c];

		if (w->nulls[c] && TupleDescAttr(desc, a - 1)->attnotnull)
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("null value in column \"%s\" of relation \"%s\" violates not-null constraint",
							NameStr(TupleDescAttr(desc, a - 1)->attname), RelationGetRelationName(w->rel))));
		slot->tts_values[a - 1] = w->values[c];
		slot->tts_isnull[a - 1] = w->nulls[c];
	}
	return ExecStoreVirtualTuple(slot);
}

/* The row in w->values/w->nulls, in the writer's slot. */
static TupleTableSlot *
LedgerWriterSlot(LedgerWriter *w)
{
	return LedgerWriterFill(w, w->slot);
}

/* The index entries of a row just written to the table (update: a new version). */
static void
LedgerWriterIndexRow(LedgerWriter *w, TupleTableSlot *slot, bool update)
{
	LedgerWriterIndices(w, slot);
	if (w->rri->ri_NumIndices > 0)
		list_free(ExecInsertIndexTuples(w->rri, slot, w->estate, update, false, NULL, NIL));
}

/*
 * The BRIN entries of a flush's rows, already in the table. A BRIN index
 * takes a row only into the summary of its block range, and a range that
 * is not summarized yet (the table's last one, where appended rows go, until
 * VACUUM or brin_summarize_new_values summarizes it) takes nothing:
 * brininsert looks the range up in the index's range map for each row, for
 * nothing, which was 3,000 instructions per purchase. Here each range the
 * rows fell in is looked up once, and only the rows of a summarized range
 * are inserted, as brininsert inserts them. The look-up comes after the rows
 * are in the table, as brininsert's does: a summarization that starts later
 * reads them from the table, and one in progress has put its placeholder
 * in the range map, which counts as summarized here. Indexes with a
 * predicate or autosummarize are not in this list (LedgerOpenIndices).
 */
static void
LedgerWriterFlushBrin(LedgerWriter *w)
{
	ExprContext *econtext = GetPerTupleExprContext(w->estate);

	for (int x = w->rri->ri_NumIndices - w->nbrin; x < w->rri->ri_NumIndices; x++)
	{
		Relation	idx = w->rri->ri_IndexRelationDescs[x];
		IndexInfo  *ii = w->rri->ri_IndexRelationInfo[x];
		BlockNumber per_range;
		BrinRevmap *revmap;
		BlockNumber range = InvalidBlockNumber;
		bool		summarized = false;

		if (!ii->ii_ReadyForInserts)
			continue;
		revmap = brinRevmapInitialize(idx, &per_range, NULL);
		for (int i = 0; i < w->nbuffered; i++)
		{
			TupleTableSlot *slot = w->buffered[i];
			BlockNumber blk = ItemPointerGetBlockNumber(&slot->tts_tid);
			Datum		values[INDEX_MAX_KEYS];
			bool		isnull[INDEX_MAX_KEYS];

			if (blk / per_range != range)
			{
				Buffer		buf = InvalidBuffer;
				OffsetNumber off;

				range = blk / per_range;
				summarized = brinGetTupleForHeapBlock(revmap, range * per_range, &buf, &off, NULL,
													  BUFFER_LOCK_SHARE, NULL) != NULL;
				if (summarized)
					LockBuffer(buf, BUFFER_LOCK_UNLOCK);
				if (BufferIsValid(buf))
					ReleaseBuffer(buf);
			}
			if (!summarized)
				continue;
			econtext->ecxt_scantuple = slot;
			FormIndexDatum(ii, slot, w->estate, values, isnull);
			index_insert(idx, values, isnull, &slot->tts_tid, w->rel, UNIQUE_CHECK_NO, false, ii);
			ResetPerTupleExprContext(w->estate);
		}
		brinRevmapTerminate(revmap);
	}
}

/* Forget the buffered rows (their slots are kept for the next ones). */
static void
LedgerWriterDropBuffered(LedgerWriter *w)
{
	for (int i = 0; i < w->nbuffered; i++)
		ExecClearTuple(w->buffered[i]);
	w->nbuffered = 0;
}

/*
 * Write a bulk appender's buffered rows: the table's in one call, then each
 * row's index entries. An optimistic writer's arbiter entries only note a
 * key that exists or is being inserted (w->lost), as a speculative
 * insertion's do: its caller rolls the rows back (LedgerWriterEndNew).
 */
static void
LedgerWriterFlush(LedgerWriter *w)
{
	/* an optimistic writer that met a key writes nothing more: it is all rolled back */
	if (w->nbuffered > 0 && !(w->optimistic && w->lost))
	{
		table_multi_insert(w->rel, w->buffered, w->nbuffered, w->cid, 0, w->bistate);
		LedgerWriterIndices(w, w->buffered[0]);
		for (int i = 0; i < w->nbuffered && w->rri_flush.ri_NumIndices > 0; i++)
		{
			bool		lost = false;

			/* an optimistic writer's arbiter: see LedgerWriterBeginNew */
			list_free(ExecInsertIndexTuples(&w->rri_flush, w->buffered[i], w->estate, false, w->optimistic,
											w->optimistic ? &lost : NULL, w->optimistic ? w->arbiters : NIL));
			w->lost |= lost;
			ResetPerTupleExprContext(w->estate);
		}
		if (w->nbrin > 0)
			LedgerWriterFlushBrin(w);
	}
	LedgerWriterDropBuffered(w);
}

/*
 * The speculative insertion token of LedgerWriterInsertIfNew. A backend
 * that finds one of our rows inserted but not yet confirmed waits on the
 * token; each row is confirmed right after its index entries, so the token
 * need not be released per row: it is taken once and kept until the writer
 * closes (a lock acquired and released per purchase was 4 % of a bulk
 * insert's time). A waiter then waits until the writer closes rather than
 * until the row is confirmed, and waits on our transaction next anyway.
 * The token is never held while waiting on another transaction
 * (LedgerWriterInsertIfNew releases it first). The backend has one token
 * at a time (lmgr.c keeps the last one acquired); the end of its
 * (sub)transaction releases it with the other locks, which the callbacks
 * below note.
 */
static bool ledger_token_held = false;
static uint32 ledger_token;
static SubTransactionId ledger_token_subxid;

static int	ledger_optimistic_used;

static void
LedgerTokenXact(XactEvent event, void *arg)
{
	ledger_token_held = false;
	ledger_optimistic_used = 0;
}

static void
LedgerTokenSubXact(SubXactEvent event, SubTransactionId mySubid, SubTransactionId parentSubid, void *arg)
{
	if (!ledger_token_held || ledger_token_subxid != mySubid)
		return;
	if (event == SUBXACT_EVENT_ABORT_SUB)
		ledger_token_held = false;
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		ledger_token_subxid = parentSubid;
}

static void
LedgerWriterReleaseToken(void)
{
	if (!ledger_token_held)
		return;
	SpeculativeInsertionLockRelease(GetCurrentTransactionId());
	ledger_token_held = false;
}

static void
LedgerWriterCallbacks(void)
{
	static bool registered = false;

	if (!registered)
	{
		RegisterXactCallback(LedgerTokenXact, NULL);
		RegisterSubXactCallback(LedgerTokenSubXact, NULL);
		registered = true;
	}
}

static uint32
LedgerWriterToken(void)
{
	LedgerWriterCallbacks();
	if (!ledger_token_held)
	{
		ledger_token = SpeculativeInsertionLockAcquire(GetCurrentTransactionId());
		ledger_token_subxid = GetCurrentSubTransactionId();
		ledger_token_held = true;
	}
	return ledger_token;
}

/*
 * Append the row unless a row with the same key in the arbiter index exists
 * or is being inserted (then, as ON CONFLICT DO NOTHING does, wait for its
 * transaction and skip if it committed): returns whether it was appended.
 * When it was not, *conflict (if given) is the row that holds the key.
 *
 * The first attempt skips the executor's pre-check (a descent of the
 * arbiter index): the keys written here are almost always new (the
 * accrual paths look a statement's refs up before computing, and a
 * repeated sale is rare). That is still exact: the index insertion itself
 * checks the key (UNIQUE_CHECK_PARTIAL) and reports one that exists or is
 * being inserted, and then the speculative row is killed and the
 * pre-check, which waits, runs as usual. A key that does exist costs a
 * dead row and dead index entries that way.
 */
bool
LedgerWriterInsertIfNew(LedgerWriter *w, ItemPointer conflict)
{
	TupleTableSlot *slot = LedgerWriterSlot(w);
	ItemPointerData found;
	bool		precheck = false;

	Assert(w->arbiters != NIL);
	for (;;)
	{
		bool		lost = false;
		List	   *recheck;
		uint32		token;

		if (precheck &&
			!ExecCheckIndexConstraints(w->rri, slot, w->estate, &found, w->arbiters))
		{
			if (conflict != NULL)
				*conflict = found;
			ResetPerTupleExprContext(w->estate);
			return false;
		}
		token = LedgerWriterToken();
		table_tuple_insert_speculative(w->rel, slot, w->cid, 0, w->bistate, token);
		recheck = ExecInsertIndexTuples(w->rri, slot, w->estate, false, true, &lost, w->arbiters);
		table_tuple_complete_speculative(w->rel, slot, token, !lost);
		list_free(recheck);
		ResetPerTupleExprContext(w->estate);
		if (!lost)
			return true;

		/*
		 * A concurrent insert won the race: check again, which waits for it,
		 * never while holding the token (its own may be waiting on ours).
		 */
		LedgerWriterReleaseToken();
		precheck = true;
	}
}

/*
 * Optimistic appending, for many rows whose keys in the arbiter index are
 * almost surely new (the accrual paths look a statement's refs up first):
 * LedgerWriterBeginNew opens a subtransaction, LedgerWriterInsert then
 * buffers rows and writes them as a plain bulk appender does (one WAL
 * record per page, no speculative insertion to confirm row by row, which
 * was a tenth of a bulk accrual's WAL), and LedgerWriterEndNew writes the
 * rest and keeps them all, or, when the arbiter index met any of their
 * keys (a concurrent transaction's row, committed or not), rolls the
 * subtransaction back: the rows are then dead to everyone at once, as a
 * killed speculative row is, so no transaction ever waits on them, and the
 * caller writes them again with LedgerWriterInsertIfNew, which waits as
 * ON CONFLICT does. Between the two calls the caller does nothing that a
 * rollback would undo but the writer's rows, and an error in between is
 * caught to call LedgerWriterAbortNew before it is thrown on.
 *
 * Each subtransaction keeps an xid in the backend's proc entry until the
 * transaction ends, and past 64 of them (PGPROC_MAX_CACHED_SUBXIDS) every
 * other backend's snapshot overflows and looks xids up in pg_subtrans: a
 * transaction gets at most LEDGER_OPTIMISTIC_MAX of them, and after that
 * its writers insert row by row (LedgerWriterMayBeginNew).
 */
#define LEDGER_OPTIMISTIC_MAX 32

bool
LedgerWriterMayBeginNew(LedgerWriter *w)
{
	return w->arbiters != NIL && w->bistate != NULL && !w->optimistic &&
		ledger_optimistic_used < LEDGER_OPTIMISTIC_MAX && !IsInParallelMode();
}

void
LedgerWriterBeginNew(LedgerWriter *w)
{
	MemoryContext cxt = CurrentMemoryContext;

	Assert(LedgerWriterMayBeginNew(w));
	LedgerWriterCallbacks();	/* the end of the transaction resets the count */
	if (w->buffered == NULL)
		w->buffered = MemoryContextAllocZero(GetMemoryChunkContext(w),
											 sizeof(TupleTableSlot *) * LEDGER_BUFFERED_ROWS);
	w->owner = CurrentResourceOwner;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);

	/*
	 * What the caller acquires meanwhile (the target page's pin, a table
	 * opened, its locks) is its own, past the subtransaction: only the rows
	 * (and the subtransaction's xid) are the subtransaction's.
	 */
	CurrentResourceOwner = w->owner;
	ledger_optimistic_used++;
	w->optimistic = true;
	w->lost = false;
}

/* Leave the subtransaction: commit it (keep) or roll it back. */
static void
LedgerWriterLeave(LedgerWriter *w, bool keep)
{
	MemoryContext cxt = CurrentMemoryContext;

	LedgerWriterDropBuffered(w);
	if (keep)
		ReleaseCurrentSubTransaction();
	else
		RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = w->owner;
	w->optimistic = false;
}

/* Write the buffered rows; keep them all and return true, or roll them all back and return false. */
bool
LedgerWriterEndNew(LedgerWriter *w)
{
	bool		kept;

	Assert(w->optimistic);
	LedgerWriterFlush(w);
	kept = !w->lost;
	LedgerWriterLeave(w, kept);
	return kept;
}

/* On an error between LedgerWriterBeginNew and LedgerWriterEndNew: roll the rows back. */
void
LedgerWriterAbortNew(LedgerWriter *w)
{
	if (w->optimistic)
		LedgerWriterLeave(w, false);
}

/*
 * Append the row in w->values/w->nulls, with its index entries (a bulk
 * appender keeps a copy, written with the next batch).
 */
void
LedgerWriterInsert(LedgerWriter *w)
{
	TupleTableSlot *slot;

	if (w->buffered != NULL && (w->arbiters == NIL || w->optimistic))
	{
		if (w->buffered[w->nbuffered] == NULL)
		{
			/* with the writer, whatever context the caller is in */
			MemoryContext old = MemoryContextSwitchTo(w->estate->es_query_cxt);

			w->buffered[w->nbuffered] = table_slot_create(w->rel, NULL);
			MemoryContextSwitchTo(old);
		}
		ExecMaterializeSlot(LedgerWriterFill(w, w->buffered[w->nbuffered]));
		if (++w->nbuffered == LEDGER_BUFFERED_ROWS)
			LedgerWriterFlush(w);
		return;
	}
	slot = LedgerWriterSlot(w);
	table_tuple_insert(w->rel, slot, w->cid, 0, w->bistate);
	LedgerWriterIndexRow(w, slot, false);
	ResetPerTupleExprContext(w->estate);
}

/*
 * Replace the row at *tid, which the caller has locked, with w->values: the
 * update of a posting (a member account's balances); index entries only
 * when the new version is not a heap-only tuple. *tid becomes the new
 * version's.
 */
void
LedgerWriterUpdate(LedgerWriter *w, ItemPointer tid)
{
	TupleTableSlot *slot = LedgerWriterSlot(w);
	HeapTuple	tuple = ExecFetchSlotHeapTuple(slot, true, NULL);

	simple_heap_update(w->rel, tid, tuple);
	*tid = tuple->t_self;
	if (!HeapTupleIsHeapOnly(tuple))
	{
		if (w->update_slot == NULL)
		{
			MemoryContext old = MemoryContextSwitchTo(GetMemoryChunkContext(w));

			w->update_slot = MakeSingleTupleTableSlot(RelationGetDescr(w->rel), &TTSOpsHeapTuple);
			MemoryContextSwitchTo(old);
		}
		LedgerWriterIndexRow(w, ExecStoreHeapTuple(tuple, w->update_slot, false), true);
	}
	ResetPerTupleExprContext(w->estate);
}

/* The row at tid (any version: the caller knows which it wants), in w->fetch_slot. */
TupleTableSlot *
LedgerWriterRow(LedgerWriter *w, ItemPointer tid)
{
	TupleTableSlot *slot;

	if (w->fetch_slot == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(GetMemoryChunkContext(w));

		w->fetch_slot = table_slot_create(w->rel, NULL);
		MemoryContextSwitchTo(old);
	}
	slot = w->fetch_slot;

	if (!table_tuple_fetch_row_version(w->rel, tid, SnapshotAny, slot))
		elog(ERROR, "row (%u,%u) of loyalty.%s is gone", ItemPointerGetBlockNumber(tid),
			 ItemPointerGetOffsetNumber(tid), RelationGetRelationName(w->rel));
	slot_getallattrs(slot);
	return slot;
}

/*
 * Read the row at tid (locked by the caller) into w->values/w->nulls, in
 * the writer's column order, to be changed and written back.
 */
void
LedgerWriterFetch(LedgerWriter *w, ItemPointer tid)
{
	TupleTableSlot *slot = LedgerWriterRow(w, tid);

	for (int c = 0; c < w->ncols; c++)
	{
		w->values[c] = slot->tts_values[w->attno[c] - 1];
		w->nulls[c] = slot->tts_isnull[w->attno[c] - 1];
	}
}

void
LedgerWriterClose(LedgerWriter *w)
{
	if (w->arbiters != NIL)
		LedgerWriterReleaseToken();
	if (w->buffered != NULL)
	{
		LedgerWriterFlush(w);
		for (int i = 0; i < LEDGER_BUFFERED_ROWS && w->buffered[i] != NULL; i++)
			ExecDropSingleTupleTableSlot(w->buffered[i]);
	}
	/* the indexes' locks are kept to the end of the transaction, as the table's */
	for (int i = 0; w->indices_open && i < w->rri->ri_NumIndices; i++)
		index_close(w->rri->ri_IndexRelationDescs[i], NoLock);
	if (w->bistate != NULL)
		FreeBulkInsertState(w->bistate);
	ExecDropSingleTupleTableSlot(w->slot);
	if (w->update_slot != NULL)
		ExecDropSingleTupleTableSlot(w->update_slot);
	if (w->fetch_slot != NULL)
		ExecDropSingleTupleTableSlot(w->fetch_slot);
	FreeExecutorState(w->estate);
	table_close(w->rel, NoLock);
	pfree(w);
	if (ledger_writers_open > 0)
		ledger_writers_open--;
}

/*
 * The row of rel whose unique index (named) has these keys, into slot; a
 * btree equality scan like a catalog lookup.
 */
bool
LedgerIndexFetch(Relation rel, const char *index, int nkeys, const Datum *keys, Snapshot snap,
				 TupleTableSlot *slot)
{
	Relation	idx = index_open(LedgerIndexOid(rel, index), AccessShareLock);
	ScanKeyData sk[INDEX_MAX_KEYS];
	IndexScanDesc scan;
	bool		found;

	for (int i = 0; i < nkeys; i++)
	{
		/* the keys of the indexes looked up here are bigint or text */
		Oid			type = idx->rd_opcintype[i];

		if (type != INT8OID && type != TEXTOID)
			elog(ERROR, "index loyalty.%s has a key of type %u", index, type);
		ScanKeyEntryInitialize(&sk[i], 0, i + 1, BTEqualStrategyNumber, type, idx->rd_indcollation[i],
							   type == INT8OID ? F_INT8EQ : F_TEXTEQ, keys[i]);
	}
	scan = index_beginscan(rel, idx, snap, nkeys, 0);
	index_rescan(scan, sk, nkeys, NULL, 0);
	found = index_getnext_slot(scan, ForwardScanDirection, slot);
	index_endscan(scan);
	index_close(idx, NoLock);
	return found;
}
