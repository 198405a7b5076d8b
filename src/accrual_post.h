/*
 * accrual_post.h: a batch of purchases on its way into the ledger, and the
 * refunds that take their points back
 */
#ifndef LOYALTY_ACCRUAL_POST_H
#define LOYALTY_ACCRUAL_POST_H

#include "commands/trigger.h"
#include "executor/spi.h"
#include "utils/date.h"
#include "utils/hsearch.h"

#include "accrual.h"

typedef struct AccrualRow
{
	char	   *ref;
	char	   *member_ref;
	Datum		amount;			/* numeric */
	bool		amount_null;
	double		amount_d;
	TimestampTz occurred_at;
	bool		occurred_unset; /* not given: the transaction's start, not part of its identity */
	int64		ord;			/* its place in the statement */
	char	   *category;
	char	   *channel;
	char	   *store;
	Datum		attrs;			/* jsonb */
	bool		attrs_null;
	int64		member_id;
	int64		account_id;		/* 0: unknown member */
	char	   *tier;
	int			birth_month;	/* 0: unknown */
	Datum		whole;			/* the application's row as jsonb, for the quarantine */
	bool		whole_null;
	bool		existing;		/* the same purchase was posted before */
	bool		repeats_posted; /* its ref is a posted purchase's (the same content, or 23505) */
	int64		existing_points;
	const char *problem;		/* why it cannot earn; NULL: it can */
	const char *sqlstate;
	AccrualRules *rules;
	DateADT		day;
	int64		points;
	TimestampTz vests_at;
	TimestampTz expires_at;
	bool		expires_null;
	char	   *breakdown;		/* NULL: computed again from the row (AccrualRebuilt) */
	int64		accrual_id;		/* assigned before the write */
	int64		transfer_id;	/* likewise, when it earns points */
	bool		deferred;		/* its journal line and lot are deferred */
	struct AccrualHead *head;	/* its account's, found when it is inserted */
	bool		first_marked;	/* computing it marked its account's first purchase */
	int64	   *budget_before;	/* the campaign budgets' use before it (uses_campaign) */
} AccrualRow;

/* A locked member account: the head of its chain and what a chunk adds. */
typedef struct AccrualHead
{
	int64		account_id;		/* hash key */
	bool		has_hash;
	uint8		hash[32];
	ItemPointerData tid;		/* the locked version of the account row */
	bool		touched;		/* by the chunk being written */
	int64		available;
	int64		pending;
	int64		last_transfer;
	bool		chained;		/* a line was chained onto it since it was last written */
	bool		deferring;		/* it has deferred purchases (stored, or of this statement) */
	DateADT		deferred_day;	/* then the earliest day of them */
	bool		new_deferred;	/* deferred_day and deferred_due to be written */
	TimestampTz deferred_due;	/* then when the first of those written since falls due */
	int64		deferred_n;		/* and how many they are */
	char	   *last_ref;		/* the ref of its latest purchase (NULL: none yet) */
	int			last_ref_size;	/* bytes allocated for it, in cxt */
	bool		new_last;		/* last_ref to be written (account.last_purchase_ref) */
	MemoryContext cxt;			/* the table's */
	uint64		saved_in;		/* the optimistic write that saved it (AccrualInsertAllNew) */
} AccrualHead;

/* A posted purchase's order inserted again: its ref, and the amount it now has if that differs. */
typedef struct AccrualReinsert
{
	char	   *ref;
	Datum		to_amount;		/* numeric */
	bool		same;			/* the same row: no to_amount */
} AccrualReinsert;

/* A member of a chunked statement, as the lock query read it (AccrualReadMembers). */
typedef struct AccrualMember
{
	char	   *member_ref;		/* hash key (the pointer; hashed and compared as a string) */
	int64		member_id;
	int64		account_id;
	char	   *status;
	char	   *tier;
	int			birth_month;
	struct AccrualHead *head;	/* its account's, in the batch's heads */
} AccrualMember;

typedef struct AccrualBatch
{
	int64		program_id;
	char	   *code;
	pg_tz	   *tz;
	bool		enroll_unknown;
	bool		has_debts;		/* the locked accounts may owe refund debt */
	int64		issuance;
	Oid			source;			/* the application's table; InvalidOid for the function API */
	const char *source_sql;		/* the trigger's query over its transition table, or NULL */
	/*
	 * That transition table, and its rows' places in it: a row the read
	 * query numbered ord (loyalty._ordinal()) is the (ord - ord_base)th,
	 * which is how a refused row's whole application row is found again
	 * for the quarantine (AccrualWholeRows) without the read query carrying
	 * every row whole. ord_ok: every row read so far fits.
	 */
	Tuplestorestate *trans;
	TupleDesc	trans_desc;
	int64		ord_base;
	bool		ord_ok;
	int			trans_ptr;		/* our read pointer on it (-1: none yet) */
	int64		trans_pos;		/* the place of the last row it read */
	TupleTableSlot *trans_slot;
	FmgrInfo	trans_to_jsonb; /* to_jsonb() of its row type */
	int64		statement_rows; /* rows in that transition table, when known */
	struct bloom_filter *posted_refs;	/* refs posted by earlier chunks of the statement */
	AccrualProgramRules *rules;
	TimestampTz earliest;		/* when the first rule version starts */
	int			nrows;
	AccrualRow *rows;
	int64	   *accounts;		/* locked, in id order */
	int			naccounts;
	HTAB	   *heads;			/* AccrualHead of each locked account */
	HTAB	   *members;		/* AccrualMember by member_ref, when the lock query read them */
	bool		defer_accounts; /* write balances once, after the last chunk */
	bool		program_expires;	/* the program's expiry policy dates lots */
	bool		defers;			/* pending purchases' journal lines are deferred */
	HTAB	   *days;
	AccrualState state;
	int			nposted;		/* in the last chunk */
	int64		nposted_total;
	int64		ninserted;
	MemoryContext chunk_cxt;	/* per-chunk allocations; NULL: the caller's */
	AccrualRow *chunk_rows;		/* a chunked statement's rows, reused by every chunk */
	int			nquarantined;
	bool		defer_recovery; /* the caller recovers debts (AccrualRecoverDebts) once done */
	List	   *reinserted;		/* AccrualReinsert of posted purchases inserted again (trigger) */
	MemoryContext stmt_cxt;		/* where they are kept: the trigger's */
} AccrualBatch;

/* Batches of at most this many rows use generic plans. */
#define ACCRUAL_SMALL 16
/* Purchases of a chunk first written all at once, optimistically (AccrualInsertPurchases). */
#define ACCRUAL_OPTIMISTIC 1000

extern SPIPlanPtr AccrualPrepare(SPIPlanPtr *slot, int options, const char *sql, int nargs,
								 const Oid *argtypes);
/* AccrualProbes: which keys the read and lock queries probe rather than hash */
#define ACCRUAL_PROBE_HISTORY	0x01
#define ACCRUAL_PROBE_MEMBERS	0x02
extern char *AccrualReadSql(const char *source, bool birthday, int probes, bool members_known);
extern int	AccrualProbes(int64 nrows);
extern void AccrualLoadProgram(AccrualBatch *b, int64 program_id, const char *code);
extern void AccrualCheckFirstCap(AccrualBatch *b);
extern void AccrualReadRows(AccrualBatch *b);
extern void AccrualPostBatch(AccrualBatch *b, bool quarantine);
extern void AccrualPostLocked(AccrualBatch *b);
extern HTAB *AccrualHeadTable(long n);
extern Datum AccrualInt64Array(int64 *v, int n);
extern AccrualHead *AccrualAddHead(AccrualBatch *b, int64 account, Datum last_hash, bool isnull,
								   ItemPointer tid, Datum deferred_day, bool deferred_null,
								   Datum last_ref, bool last_ref_null);
extern bool AccrualFastInsert(AccrualBatch *b, struct TriggerData *trig, const char *const *cols);
extern bool AccrualFastPost(AccrualBatch *b, AccrualRow *r);
extern char *AccrualLockSql(const char *members, int probes, bool birthday);
extern int64 AccrualOrdinalNow(void);
extern void AccrualReadStarts(AccrualBatch *b);
extern void AccrualPostSource(AccrualBatch *b, SPIPlanPtr lock, SPIPlanPtr read, Datum *args,
							  char *nulls);
extern void AccrualEnrollUnknown(AccrualBatch *b, const char *source, Datum *args, char *nulls,
								 int nargs, Oid *argtypes);
extern void AccrualNoteReinserted(AccrualBatch *b, AccrualRow *r);
extern void AccrualRecoverDebts(AccrualBatch *b);
extern void AccrualCheckRef(const char *ref);
extern char *AccrualDescribeExisting(AccrualBatch *b, AccrualRow *r);
extern void AccrualRecover(AccrualBatch *b, int64 account);
extern bool AccrualDebtsRecorded(void);
extern void AccrualRecoverIfOwed(int64 account);
extern int64 AccrualRefundPurchase(AccrualBatch *b, const char *ref, Datum amount, bool amount_null,
								   const char *refund_ref, bool to_amount);

#endif
