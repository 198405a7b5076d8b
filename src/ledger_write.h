/*
 * ledger_write.h: appending rows to a journal table without the executor
 */
#ifndef LOYALTY_LEDGER_WRITE_H
#define LOYALTY_LEDGER_WRITE_H

#include "access/heapam.h"
#include "executor/executor.h"

#define LEDGER_WRITER_MAX_COLS 32

/*
 * An open journal table: the relation, its indexes and constraints, and the
 * values of the row being built, set by column (the order of the names given
 * to LedgerWriterOpen).
 */
typedef struct LedgerWriter
{
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	ResultRelInfo rri_flush;	/* the same, but for the BRIN indexes that a flush handles itself */
	int			nbrin;			/* those, last in rri's arrays */
	TupleTableSlot *slot;
	TupleTableSlot *update_slot;	/* a heap tuple slot: LedgerWriterUpdate */
	TupleTableSlot *fetch_slot; /* the table's own slot: LedgerWriterFetch */
	List	   *arbiters;		/* LedgerWriterInsertIfNew's unique index */
	bool		indices_open;	/* ExecOpenIndices done (when first needed) */
	BulkInsertState bistate;
	TupleTableSlot **buffered;	/* a bulk appender's rows not yet written */
	int			nbuffered;
	bool		optimistic;		/* between LedgerWriterBeginNew and LedgerWriterEndNew */
	bool		lost;			/* then, a key the arbiter index already had */
	ResourceOwner owner;		/* the caller's, outside that subtransaction */
	CommandId	cid;
	int			ncols;
	AttrNumber	attno[LEDGER_WRITER_MAX_COLS];
	Datum		values[LEDGER_WRITER_MAX_COLS];
	bool		nulls[LEDGER_WRITER_MAX_COLS];
	Oid			seq;			/* the sequence of the first column, or InvalidOid */
	/* columns whose value is the same in every row (LedgerWriterConstant) */
	int			nconst;
	int			constcol[LEDGER_WRITER_MAX_COLS];	/* positions in values[] */
	Datum		constval[LEDGER_WRITER_MAX_COLS];	/* the first row's */
	bool		constnull[LEDGER_WRITER_MAX_COLS];
	bool		const_seen;
	Bitmapset  *constattrs;		/* their attnos, offset as pull_varattnos does */
} LedgerWriter;

extern Relation LedgerOpenTable(const char *table, LOCKMODE mode);
extern Oid	LedgerIndexOid(Relation rel, const char *index);
extern AttrNumber LedgerAttnum(Relation rel, const char *name);
extern LedgerWriter *LedgerWriterOpen(const char *table, const char *const *columns, int ncols,
									  const char *sequence, bool bulk, const char *arbiter);
extern void LedgerWriterConstant(LedgerWriter *w, const char *column);
extern int64 LedgerWriterNextId(LedgerWriter *w);
extern void LedgerWriterInsert(LedgerWriter *w);
extern bool LedgerWriterInsertIfNew(LedgerWriter *w, ItemPointer conflict);
extern bool LedgerWriterMayBeginNew(LedgerWriter *w);
extern void LedgerWriterBeginNew(LedgerWriter *w);
extern bool LedgerWriterEndNew(LedgerWriter *w);
extern void LedgerWriterAbortNew(LedgerWriter *w);
extern TupleTableSlot *LedgerWriterRow(LedgerWriter *w, ItemPointer tid);
extern void LedgerWriterFetch(LedgerWriter *w, ItemPointer tid);
extern void LedgerWriterUpdate(LedgerWriter *w, ItemPointer tid);
extern void LedgerWriterClose(LedgerWriter *w);
extern bool LedgerIndexFetch(Relation rel, const char *index, int nkeys, const Datum *keys,
							 Snapshot snap, TupleTableSlot *slot);

#endif
