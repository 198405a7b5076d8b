/*
 * ledger.h: the posting routine every capability posts through
 */
#ifndef LOYALTY_LEDGER_H
#define LOYALTY_LEDGER_H

#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"

/* SQLSTATEs of our own (class LY), listed in docs/errors.md */
#define ERRCODE_LOYALTY_INSUFFICIENT_POINTS	MAKE_SQLSTATE('L','Y','0','0','1')
#define ERRCODE_LOYALTY_UNKNOWN_PROGRAM		MAKE_SQLSTATE('L','Y','0','0','2')
#define ERRCODE_LOYALTY_UNKNOWN_MEMBER		MAKE_SQLSTATE('L','Y','0','0','3')
#define ERRCODE_LOYALTY_MEMBER_NOT_ACTIVE	MAKE_SQLSTATE('L','Y','0','0','4')
#define ERRCODE_LOYALTY_APPEND_ONLY			MAKE_SQLSTATE('L','Y','0','0','5')

/*
 * One transfer to post. The caller has resolved the accounts; the routine
 * locks the member sides, checks idempotency, consumes the debit member's
 * lots earliest expiry first, creates the credit member's lot (or restores
 * the lots given), chains the hashes and updates the member balances.
 */
typedef struct LedgerPosting
{
	int64		program_id;
	const char *kind;
	const char *ref;
	int64		debit_account;
	int64		credit_account;
	bool		debit_is_member;
	bool		credit_is_member;
	const char *debit_label;	/* for messages: member_ref or account kind */
	const char *credit_label;
	int64		amount;			/* > 0 */
	TimestampTz occurred_at;
	const char *reason;			/* NULL for none */
	int32		rule_version;	/* 0 for none */

	/* credit side, when it is a member: the lot to create */
	TimestampTz vests_at;
	bool		expires;
	TimestampTz expires_at;

	/*
	 * Explicit lots instead of the defaults: positive amounts consume those
	 * lots of the debit member (an expiry names the lots it expires);
	 * negative amounts restore those lots of the credit member, which then
	 * gets no new lot (a reversal gives back exactly what a debit took, with
	 * the original expiry). The amounts add up to amount (or -amount).
	 */
	int			nuses;
	const int64 *use_lots;
	const int64 *use_amounts;
} LedgerPosting;

/* A member and the program around it, resolved for a posting. */
typedef struct LedgerTarget
{
	int64		program_id;
	int64		member_account;
	int64		system_account;
	bool		expires;		/* a lot credited at the given time expires */
	TimestampTz expires_at;
} LedgerTarget;

/*
 * What a lot held at the lowest from a moment on, below what it holds now:
 * a CTE "after" of (lot_id, dip) over one account's lot_use rows dated
 * after at (reversals count negative), for lots that dipped. A lot can
 * give its remaining plus its dip (coalesce(dip, 0)), not more: points a
 * reversal dated later gave back were not there yet at at. account and at
 * are the query's parameter names, e.g. "$1" and "$2".
 */
#define LEDGER_LOT_DIP(account, at) \
	"WITH after AS (SELECT u.lot_id, min(u.left_after) AS dip" \
	"                 FROM (SELECT u.lot_id, sum(u.amount::bigint) OVER" \
	"                              (PARTITION BY u.lot_id ORDER BY u.occurred_at DESC) AS left_after" \
	"                         FROM loyalty.lot_use u WHERE u.account_id = " account " AND u.occurred_at > " at ") u" \
	"                GROUP BY u.lot_id HAVING min(u.left_after) < 0)"

extern char *loyalty_actor;

/*
 * Whether s has more than chars characters: a character takes a byte at
 * least, so they are counted only past that many bytes (refs are checked
 * for every purchase).
 */
static inline bool
LedgerLongerThan(const char *s, int chars)
{
	return strlen(s) > (size_t) chars && pg_mbstrlen(s) > chars;
}

extern void LedgerInit(void);
extern SPIPlanPtr LedgerPrepare(SPIPlanPtr *slot, const char *sql, int nargs, const Oid *argtypes);
extern void LedgerResolve(const char *program, const char *member_ref, const char *system_kind,
						  TimestampTz occurred_at, LedgerTarget *target);
extern int64 LedgerPost(const LedgerPosting *posting, bool *replayed);
extern char *LedgerTextArg(FunctionCallInfo fcinfo, int n, const char *name);
extern void LedgerExpect(int got, int expected, const char *what);
extern void LedgerPushSearchPath(void);
extern const char *LedgerActor(void);
extern void LedgerMaterialize(int64 account, bool deferred);

#endif
