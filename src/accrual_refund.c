/*
 * accrual_refund.c: refunds claw back a purchase's points in proportion to
 * the amount returned; what the member already spent becomes a debt,
 * recovered from later earnings (under the program option shortfall
 * "negative" the debt is also shown as a balance below zero: the debt row
 * records the mode in force at the refund, see sql/31_accrual_shortfall.sql)
 *
 * Points are taken from the purchase's own lot first (pending or not), then
 * from the member's other lots, those still pending first, then the
 * available ones, earliest expiry first. Lot order and account locking
 * follow the posting routine: the member account is locked before its lots.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "accrual.h"
#include "accrual_post.h"
#include "ledger.h"
#include "points.h"

PG_FUNCTION_INFO_V1(loyalty_refund);
PG_FUNCTION_INFO_V1(loyalty_refund_to);
PG_FUNCTION_INFO_V1(loyalty_recover_debt);
PG_FUNCTION_INFO_V1(loyalty_recover_refilled);
PG_FUNCTION_INFO_V1(loyalty_give_back_recovered);

static SPIPlanPtr plan_purchase;
static SPIPlanPtr plan_refund_find;
static SPIPlanPtr plan_account_lock;
static SPIPlanPtr plan_account_touch;
static SPIPlanPtr plan_purchase_account;
static SPIPlanPtr plan_take;
static SPIPlanPtr plan_refund_save;
static SPIPlanPtr plan_debt_list;
static SPIPlanPtr plan_debt_pay;
static SPIPlanPtr plan_existing;
static SPIPlanPtr plan_expired;
static SPIPlanPtr plan_owes;
static SPIPlanPtr plan_refilled;
static SPIPlanPtr plan_debt_pay_one;
static SPIPlanPtr plan_taken_elsewhere;
static SPIPlanPtr plan_returned;
static SPIPlanPtr plan_expire_refilled;
static SPIPlanPtr plan_repaid;
static SPIPlanPtr plan_recovered_from;
static SPIPlanPtr plan_given_back;
static SPIPlanPtr plan_account_member;

void
AccrualCheckRef(const char *ref)
{
	if (ref[0] == '\0' || LedgerLongerThan(ref, 200))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid ref \"%s\"", ref),
				 errdetail("A ref is the caller's key for the posting (an order id, a request id), 1 to 200 characters.")));
}

/* The DETAIL of an idempotency conflict: the first purchase and this one. */
char *
AccrualDescribeExisting(AccrualBatch *b, AccrualRow *r)
{
	static const Oid argtypes[] = {INT8OID, TEXTOID};
	Datum		args[2];
	char	   *first;

	LedgerPrepare(&plan_existing,
				  "SELECT format('member %s, amount %s, occurred_at ', m.member_ref, x.amount), x.occurred_at,"
				  "       format(', category %s, channel %s, store %s, attrs %s', coalesce(x.category, '-'),"
				  "              coalesce(x.channel, '-'), coalesce(x.store, '-'), x.attrs)"
				  "  FROM loyalty.accrual x JOIN loyalty.member m ON m.id = x.member_id"
				  " WHERE x.program_id = $1 AND x.ref = $2",
				  2, argtypes);
	args[0] = Int64GetDatum(b->program_id);
	args[1] = CStringGetTextDatum(r->ref);
	/* not read-only: under READ COMMITTED, a snapshot that sees a purchase committed meanwhile */
	LedgerExpect(SPI_execute_plan(plan_existing, args, NULL, false, 1), SPI_OK_SELECT, "reading a purchase");
	first = "posted by a transaction this one cannot see";
	if (SPI_processed == 1)
	{
		HeapTuple	t = SPI_tuptable->vals[0];
		TupleDesc	d = SPI_tuptable->tupdesc;

		first = psprintf("%s%s%s", SPI_getvalue(t, d, 1),
						 timestamptz_to_str(DatumGetTimestampTz(SPI_getbinval(t, d, 2, &(bool){0}))),
						 SPI_getvalue(t, d, 3));
	}
	return psprintf("The first purchase was: %s. This one is: member %s, amount %s, occurred_at %s, "
					"category %s, channel %s, store %s, attrs %s.",
					first, r->member_ref,
					DatumGetCString(DirectFunctionCall1(numeric_out, r->amount)),
					timestamptz_to_str(r->occurred_at),
					r->category ? r->category : "-", r->channel ? r->channel : "-",
					r->store ? r->store : "-",
					r->attrs_null ? "{}" : DatumGetCString(DirectFunctionCall1(jsonb_out, r->attrs)));
}

static void
AccrualLockAccount(int64 account)
{
	static const Oid argtypes[] = {INT8OID};
	Datum		arg = Int64GetDatum(account);

	LedgerPrepare(&plan_account_lock, "SELECT deferred_day IS NOT NULL FROM loyalty.account WHERE id = $1 FOR UPDATE",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_account_lock, &arg, NULL, false, 1), SPI_OK_SELECT, "locking an account");
	/* its lots are read next: its deferred ones written first */
	if (SPI_processed == 1 && DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &(bool){0})))
		LedgerMaterialize(account, true);
}

/*
 * Whether a member account's program has a rolling expiry policy, under
 * which a lot lapses by the account's inactivity (loyalty._rolling_lapse)
 * rather than at its expires_at.
 */
#define ACCRUAL_ROLLING(account) \
	"coalesce((SELECT p.options #>> '{expiry,policy}' = 'rolling' FROM loyalty.account a" \
	"          JOIN loyalty.program p ON p.id = a.program_id WHERE a.id = " account "), false)"

/*
 * Lock the member account of purchase ref, if there is such a purchase, and
 * write its deferred journal lines and lots (the purchase's own among them):
 * a refund reads the purchase's lot and journal line.
 */
static void
AccrualLockPurchaseAccount(AccrualBatch *b, const char *ref)
{
	static const Oid argtypes[] = {INT8OID, TEXTOID};
	Datum		args[2];

	LedgerPrepare(&plan_purchase_account,
				  "SELECT a.id, a.deferred_day IS NOT NULL FROM loyalty.account a"
				  " WHERE a.id = (SELECT x.account_id FROM loyalty.accrual x WHERE x.program_id = $1 AND x.ref = $2)"
				  " FOR UPDATE",
				  2, argtypes);
	args[0] = Int64GetDatum(b->program_id);
	args[1] = CStringGetTextDatum(ref);
	LedgerExpect(SPI_execute_plan(plan_purchase_account, args, NULL, false, 0), SPI_OK_SELECT,
				 "locking a purchase's account");
	if (SPI_processed == 1 && DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &(bool){0})))
		LedgerMaterialize(DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &(bool){0})),
						  true);
}

/*
 * Make a new version of a member account row, unchanged: a refund that
 * records a debt without taking any lot posts nothing that updates the
 * account, and a credit under REPEATABLE READ or SERIALIZABLE that took its
 * snapshot before the refund committed would lock the row without conflict
 * and never see the debt it should repay. A new version makes that lock
 * fail with 40001, as it does after any posting to the account.
 */
static void
AccrualTouchAccount(int64 account)
{
	static const Oid argtypes[] = {INT8OID};
	Datum		arg = Int64GetDatum(account);

	LedgerPrepare(&plan_account_touch, "UPDATE loyalty.account SET held = held WHERE id = $1", 1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_account_touch, &arg, NULL, false, 0), SPI_OK_UPDATE, "updating an account");
}

/*
 * Choose up to need points of an account's open lots: first_lot first, then
 * lots still pending at at, then the others, earliest expiry first. Returns
 * how many points the lots cover. Lots that expired or lapsed at at are not
 * the member's to give any more, whether or not the expire job has swept
 * them yet.
 *
 * Lots credited after at (a credit dated later in business time) are not
 * the member's yet at at, as spending sees it; a purchase's own lot is
 * taken back whenever the purchase is dated. And as a debit does
 * (LedgerChooseLots), a lot gives only what it held at every moment from
 * at on: points a reversal dated after at gives back (a cancel of a
 * redemption dated in the future) were not there yet at at.
 *
 * Points reserved by the member's active holds are left where they are: a
 * checkout holding them must still be able to capture them. A capture
 * spends vested points, so the vested lots give only what they hold beyond
 * the held sum; and since a hold placed at a later business time may have
 * counted on pending points vesting by then, all the lots together give at
 * most what they hold beyond it too. What the refund cannot take is a
 * shortfall, as if those points had been spent, and whatever credits the
 * member later, a released hold included, repays it. The caller holds the
 * account's lock, so the held sum read here stands.
 */
static int64
AccrualTakeLots(int64 account, int64 first_lot, int64 need, TimestampTz at,
				int64 **lots, int64 **amounts, int *n)
{
	static const Oid argtypes[] = {INT8OID, INT8OID, TIMESTAMPTZOID};
	Datum		args[3];
	int64		covered = 0;
	int64		total = 0;
	int64		vested = 0;
	int64		free_total;
	int64		free_vested;
	int64		held;

	LedgerPrepare(&plan_take,
				  LEDGER_LOT_DIP("$1", "$3")
				  "SELECT l.id, (l.remaining::bigint + coalesce(x.dip, 0))::bigint,"
				  "       (SELECT a.held::bigint FROM loyalty.account a WHERE a.id = $1),"
				  "       l.vests_at > $3"
				  "  FROM loyalty.lot l LEFT JOIN after x ON x.lot_id = l.id"
				  " WHERE l.account_id = $1 AND l.remaining OPERATOR(loyalty.>) 0"
				  "   AND l.remaining::bigint + coalesce(x.dip, 0) > 0"
				  "   AND (l.id = $2 OR l.occurred_at <= $3) AND (l.expires_at IS NULL OR l.expires_at > $3)"
				  "   AND (NOT " ACCRUAL_ROLLING("$1") " OR $3 < loyalty._rolling_lapse($1, l.occurred_at, $3))"
				  " ORDER BY l.id = $2 DESC, l.vests_at > $3 DESC, l.expires_at NULLS LAST, l.occurred_at, l.id"
				  " FOR UPDATE OF l",
				  3, argtypes);
	args[0] = Int64GetDatum(account);
	args[1] = Int64GetDatum(first_lot);
	args[2] = TimestampTzGetDatum(at);
	LedgerExpect(SPI_execute_plan(plan_take, args, NULL, false, 0), SPI_OK_SELECT, "reading lots");
	*lots = palloc(sizeof(int64) * Max(SPI_processed, 1));
	*amounts = palloc(sizeof(int64) * Max(SPI_processed, 1));
	*n = 0;
	if (SPI_processed == 0)
		return 0;
	held = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &(bool){0}));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		int64		remaining = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2,
															&(bool){0}));

		total += remaining;
		if (!DatumGetBool(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 4, &(bool){0})))
			vested += remaining;
	}
	free_total = Max(total - held, 0);
	free_vested = Max(vested - held, 0);
	for (uint64 i = 0; i < SPI_processed && covered < need && free_total > 0; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		int64		remaining = DatumGetInt64(SPI_getbinval(t, SPI_tuptable->tupdesc, 2, &(bool){0}));
		bool		pending = DatumGetBool(SPI_getbinval(t, SPI_tuptable->tupdesc, 4, &(bool){0}));
		int64		take = Min(Min(remaining, need - covered), free_total);

		if (!pending)
			take = Min(take, free_vested);
		if (take == 0)
			continue;
		free_total -= take;
		if (!pending)
			free_vested -= take;
		(*lots)[*n] = DatumGetInt64(SPI_getbinval(t, SPI_tuptable->tupdesc, 1, &(bool){0}));
		(*amounts)[*n] = take;
		(*n)++;
		covered += take;
	}
	return covered;
}

/* Post a member-to-issuance transfer consuming the lots named. */
static void
AccrualPostBack(AccrualBatch *b, int64 account, const char *member_ref, const char *kind,
				const char *ref, int64 amount, int n, int64 *lots, int64 *amounts, TimestampTz at)
{
	LedgerPosting p;

	memset(&p, 0, sizeof(p));
	p.program_id = b->program_id;
	p.kind = kind;
	p.ref = ref;
	p.debit_account = account;
	p.debit_is_member = true;
	p.debit_label = psprintf("member \"%s\"", member_ref);
	p.credit_account = b->issuance;
	p.credit_label = "issuance account";
	p.amount = amount;
	p.occurred_at = at;
	p.nuses = n;
	p.use_lots = lots;
	p.use_amounts = amounts;
	LedgerPost(&p, NULL);
}

/* Take an account's outstanding refund debt from its lots, as far as they go. */
void
AccrualRecover(AccrualBatch *b, int64 account)
{
	static const Oid argtypes[] = {INT8OID};
	static const Oid payargs[] = {INT8OID, INT8OID};
	Datum		arg = Int64GetDatum(account);
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	TimestampTz at;
	int64		debt = 0;
	int64		covered;
	int64	   *lots,
			   *amounts;
	int			n;
	char	   *member_ref;
	char	   *ref;

	/* the debt is taken from its lots: its deferred ones written first */
	LedgerMaterialize(account, false);
	LedgerPrepare(&plan_debt_list,
				  "SELECT sum(d.outstanding)::bigint, min(m.member_ref),"
				  "       'recovery ' || min(d.id) || ' after transfer ' || min(a.last_transfer_id),"
				  "       max(d.created_at)"
				  "  FROM loyalty.accrual_debt d JOIN loyalty.account a ON a.id = d.account_id"
				  "  JOIN loyalty.member m ON m.id = a.member_id"
				  " WHERE d.account_id = $1 AND d.outstanding > 0",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_debt_list, &arg, NULL, false, 1), SPI_OK_SELECT, "reading a debt");
	if (SPI_processed == 0)
		return;
	debt = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &(bool){0}));
	member_ref = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	ref = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
	/*
	 * Not before the debt exists: a refund of a purchase dated in the
	 * future records its debt at that time, and a recovery dated now would
	 * take the points back before the refund that owes them.
	 */
	at = Max(now, DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4,
													&(bool){0})));
	covered = AccrualTakeLots(account, 0, debt, at, &lots, &amounts, &n);
	if (covered == 0)
		return;
	AccrualPostBack(b, account, member_ref, "recover", ref, covered, n, lots, amounts, at);
	LedgerPrepare(&plan_debt_pay,
				  "WITH d AS (SELECT id, outstanding,"
				  "                  sum(outstanding) OVER (ORDER BY id) - outstanding AS before"
				  "             FROM loyalty.accrual_debt WHERE account_id = $1 AND outstanding > 0)"
				  " UPDATE loyalty.accrual_debt x SET outstanding = x.outstanding - least(d.outstanding, $2 - d.before)"
				  "   FROM d WHERE x.id = d.id AND d.before < $2",
				  2, payargs);
	{
		Datum		args[2] = {Int64GetDatum(account), Int64GetDatum(covered)};

		LedgerExpect(SPI_execute_plan(plan_debt_pay, args, NULL, false, 0), SPI_OK_UPDATE, "paying a debt");
	}
}

/*
 * Recover a member account's outstanding refund debt from its lots, if it
 * owes any, after something other than a purchase gave it points: a
 * posting credited it (LedgerPost), or a hold gave back what it reserved
 * (release, a partial capture, the release_holds job). The caller holds the
 * account's lock and is connected to SPI.
 *
 * Whether it owes is a query of its own, after the lock, rather than a
 * column of the lock's: under READ COMMITTED a posting that waited for the
 * lock behind a refund must see the debt that refund recorded, which a
 * query whose snapshot was taken before the wait does not. One probe of a
 * partial index that is empty for a member who owes nothing.
 */
void
AccrualRecoverIfOwed(int64 account)
{
	static const Oid argtypes[] = {INT8OID};
	Datum		arg = Int64GetDatum(account);
	AccrualBatch b;
	int64		program_id;

	LedgerPrepare(&plan_owes,
				  "SELECT a.program_id FROM loyalty.account a"
				  " WHERE a.id = $1 AND EXISTS (SELECT FROM loyalty.accrual_debt d"
				  "                             WHERE d.account_id = $1 AND d.outstanding > 0)",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_owes, &arg, NULL, false, 1), SPI_OK_SELECT, "reading refund debt");
	if (SPI_processed == 0)
		return;
	program_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &(bool){0}));
	memset(&b, 0, sizeof(b));
	AccrualLoadProgram(&b, program_id, NULL);
	AccrualRecover(&b, account);
}

/* _recover_debt(account): AccrualRecoverIfOwed for the redemption functions. */
Datum
loyalty_recover_debt(PG_FUNCTION_ARGS)
{
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	AccrualRecoverIfOwed(PG_GETARG_INT64(0));
	SPI_finish();
	PG_RETURN_VOID();
}

/* Add amount to lot's entry of lots/amounts, the last one when it is that lot's (rows come by lot). */
static void
AccrualAddByLot(int64 *lots, int64 *amounts, int *n, int64 lot, int64 amount)
{
	if (*n > 0 && lots[*n - 1] == lot)
		amounts[*n - 1] += amount;
	else
	{
		lots[*n] = lot;
		amounts[(*n)++] = amount;
	}
}

/*
 * Give points back to a member's lots (kind, issuance to member, restoring
 * exactly the lots named: amounts negative, as lot_use counts them), then
 * expire at once what came back to a lot past its expiry.
 */
static void
AccrualGiveBack(AccrualBatch *b, int64 account, const char *member_ref, const char *kind, char *ref,
				int64 amount, TimestampTz at, int n, int64 *lots, int64 *amounts)
{
	static const Oid argtypes[] = {INT8OID};
	LedgerPosting p;
	Datum		arg;

	memset(&p, 0, sizeof(p));
	p.program_id = b->program_id;
	p.kind = kind;
	p.ref = ref;
	p.debit_account = b->issuance;
	p.debit_label = "issuance account";
	p.credit_account = account;
	p.credit_is_member = true;
	p.credit_label = psprintf("member \"%s\"", member_ref);
	p.amount = amount;
	p.occurred_at = at;
	p.vests_at = at;
	p.nuses = n;
	p.use_lots = lots;
	p.use_amounts = amounts;
	arg = Int64GetDatum(LedgerPost(&p, NULL));
	LedgerPrepare(&plan_expire_refilled, "SELECT loyalty._expire_refilled($1)", 1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_expire_refilled, &arg, NULL, false, 0), SPI_OK_SELECT,
				 "expiring what came back expired");
}

/* Keep the first total of amounts, in order: later entries get what is left, or 0. */
static void
AccrualCapAt(int64 *amounts, int n, int64 total)
{
	for (int i = 0; i < n; i++)
	{
		amounts[i] = Min(amounts[i], total);
		total -= amounts[i];
	}
}

/* Drop the entries whose amount is 0 (lot_use has no zero rows); returns how many are left. */
static int
AccrualDropZeros(int64 *lots, int64 *amounts, int n)
{
	int			j = 0;

	for (int i = 0; i < n; i++)
		if (amounts[i] != 0)
		{
			lots[j] = lots[i];
			amounts[j++] = amounts[i];
		}
	return j;
}

/*
 * Points a reversal (transfer reversal) gave back to the lots of a refunded
 * purchase, exchanged for points the member lost elsewhere because of its
 * refund: they settle the refund (refund_settle, from the refilled lots in
 * settle) and the lots in back get as much back (kind, restoring them;
 * AccrualGiveBack). label tells the exchanges of one reversal apart in
 * their refs ("" for what the refund took, "recovery " for what credits
 * repaid of its debt).
 */
static void
AccrualExchange(int64 program_id, int64 account, const char *member_ref, const char *purchase, int64 reversal,
				const char *label, const char *kind, int64 total, TimestampTz at,
				int nsettle, int64 *settle_lots, int64 *settle_amounts,
				int nback, int64 *back_lots, int64 *back_amounts)
{
	AccrualBatch b;

	memset(&b, 0, sizeof(b));
	AccrualLoadProgram(&b, program_id, NULL);
	AccrualPostBack(&b, account, member_ref, "refund_settle",
					psprintf("%s, %ssettled by transfer %lld", purchase, label, (long long) reversal),
					total, AccrualDropZeros(settle_lots, settle_amounts, nsettle), settle_lots, settle_amounts, at);
	AccrualGiveBack(&b, account, member_ref, kind,
					psprintf("%s, %sgiven back by transfer %lld", purchase, label, (long long) reversal),
					total, at, AccrualDropZeros(back_lots, back_amounts, nback), back_lots, back_amounts);
}

/*
 * The lots a reversal (transfer $1) refilled that are the lots of refunded
 * purchases, one row per refund of such a purchase: u (the refill), l (the
 * lot), e (the purchase's journal line), r (the refund), m (the member).
 */
#define ACCRUAL_REFILLED_REFUNDED \
	"  FROM loyalty.transfer t" \
	"  JOIN loyalty.lot_use u ON u.transfer_id = t.id AND u.amount::bigint < 0" \
	"  JOIN loyalty.lot l ON l.id = u.lot_id" \
	"  JOIN loyalty.transfer e ON e.id = l.transfer_id AND e.kind = 'accrual'" \
	"  JOIN loyalty.accrual_refund r ON r.program_id = e.program_id AND r.purchase_ref = e.ref" \
	"       AND r.restored_at IS NULL" \
	"  JOIN loyalty.account a ON a.id = l.account_id" \
	"  JOIN loyalty.member m ON m.id = a.member_id"

/*
 * The second half of _recover_refilled: what is left of a purchase's
 * refilled points once its refund's debt is repaid goes back in exchange
 * for what its refunds took from the member's other lots in place of the
 * spent points. The refilled points settle the refund (refund_settle,
 * member to issuance, from the purchase's own lot) and the other lots get
 * back as much (refund_return, issuance to member, restoring exactly those
 * lots, as far as each can hold it); accrual_refund.returned counts what
 * was given back, so a second cancel never gives it twice. Points given
 * back to a lot past its expiry expire at once, as a cancel's do.
 * own/own_used: the refilled lots and what the debts took of each.
 */
static int64
AccrualSwapRefilled(int64 reversal, int64 *own, int64 *own_used, int nown)
{
	static const Oid argtypes[] = {INT8OID};
	static const Oid retargs[] = {INT8OID, TEXTOID, INT8OID};
	Datum		arg = Int64GetDatum(reversal);
	int64	   *settle_lots,
			   *settle_amounts,
			   *back_lots,
			   *back_amounts;
	char	  **refunds;
	int64	   *refund_back;
	int			nsettle = 0,
				nback = 0,
				nrefunds = 0;
	int64		total = 0;
	int64		lot = 0,
				left = 0;
	char	   *refund = NULL;
	int64		skip = 0;
	int64		account = 0,
				program_id = 0;
	TimestampTz at = 0;
	char	   *member_ref = NULL;
	char	   *purchase = NULL;
	uint64		nrows;
	SPITupleTable *tab;

	LedgerPrepare(&plan_taken_elsewhere,
				  "SELECT u.lot_id, -u.amount::bigint, l.remaining::bigint, r.refund_ref, r.returned,"
				  "       tu.lot_id, tu.amount::bigint, (o.amount::bigint - o.remaining::bigint),"
				  "       greatest(t.occurred_at, r.occurred_at), t.program_id, l.account_id, m.member_ref, e.ref"
				  ACCRUAL_REFILLED_REFUNDED
				  "  JOIN loyalty.transfer rt ON rt.program_id = r.program_id AND rt.kind = 'refund'"
				  "       AND rt.ref = r.refund_ref"
				  "  JOIN loyalty.lot_use tu ON tu.transfer_id = rt.id AND tu.lot_id <> l.id AND tu.amount::bigint > 0"
				  "  JOIN loyalty.lot o ON o.id = tu.lot_id"
				  " WHERE t.id = $1 AND r.taken > r.returned"
				  " ORDER BY u.lot_id, r.refund_ref, tu.lot_id"
				  " FOR UPDATE OF o",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_taken_elsewhere, &arg, NULL, false, 0), SPI_OK_SELECT,
				 "reading what refunds took");
	nrows = SPI_processed;
	tab = SPI_tuptable;
	if (nrows == 0)
		return 0;
	settle_lots = palloc(sizeof(int64) * nrows);
	settle_amounts = palloc(sizeof(int64) * nrows);
	back_lots = palloc(sizeof(int64) * nrows);
	back_amounts = palloc(sizeof(int64) * nrows);
	refunds = palloc(sizeof(char *) * nrows);
	refund_back = palloc(sizeof(int64) * nrows);
	for (uint64 i = 0; i < nrows; i++)
	{
		HeapTuple	t = tab->vals[i];
		TupleDesc	d = tab->tupdesc;
		int64		this_lot = DatumGetInt64(SPI_getbinval(t, d, 1, &(bool){0}));
		char	   *this_refund = SPI_getvalue(t, d, 4);
		int64		other = DatumGetInt64(SPI_getbinval(t, d, 6, &(bool){0}));
		int64		took = DatumGetInt64(SPI_getbinval(t, d, 7, &(bool){0}));
		int64		room = DatumGetInt64(SPI_getbinval(t, d, 8, &(bool){0}));
		int64		give;
		int			k;

		if (this_lot != lot)
		{
			/* what came back and the debts left, as far as the lot (read after them) holds it */
			lot = this_lot;
			left = DatumGetInt64(SPI_getbinval(t, d, 2, &(bool){0}));
			for (int j = 0; j < nown; j++)
				if (own[j] == lot)
					left -= own_used[j];
			left = Min(left, DatumGetInt64(SPI_getbinval(t, d, 3, &(bool){0})));
			refund = NULL;
		}
		if (refund == NULL || strcmp(refund, this_refund) != 0)
		{
			/* what this refund gave back before comes first in lot order */
			refund = this_refund;
			skip = DatumGetInt64(SPI_getbinval(t, d, 5, &(bool){0}));
		}
		if (skip >= took)
		{
			skip -= took;
			continue;
		}
		took -= skip;
		skip = 0;
		/* one restore per lot (the lot_use key), no more than the lot lacks */
		for (k = 0; k < nback && back_lots[k] != other; k++)
			;
		if (k == nback)
		{
			back_lots[nback] = other;
			back_amounts[nback++] = 0;
		}
		give = Min(Min(took, room + back_amounts[k]), left);
		if (give <= 0)
			continue;
		back_amounts[k] -= give;
		left -= give;
		total += give;
		AccrualAddByLot(settle_lots, settle_amounts, &nsettle, lot, give);
		if (nrefunds > 0 && strcmp(refunds[nrefunds - 1], refund) == 0)
			refund_back[nrefunds - 1] += give;
		else
		{
			refunds[nrefunds] = refund;
			refund_back[nrefunds++] = give;
		}
		at = Max(at, DatumGetTimestampTz(SPI_getbinval(t, d, 9, &(bool){0})));
		program_id = DatumGetInt64(SPI_getbinval(t, d, 10, &(bool){0}));
		account = DatumGetInt64(SPI_getbinval(t, d, 11, &(bool){0}));
		member_ref = SPI_getvalue(t, d, 12);
		purchase = SPI_getvalue(t, d, 13);
	}
	if (total > 0)
	{
		AccrualExchange(program_id, account, member_ref, purchase, reversal, "", "refund_return", total, at,
						nsettle, settle_lots, settle_amounts, nback, back_lots, back_amounts);
		LedgerPrepare(&plan_returned,
					  "UPDATE loyalty.accrual_refund SET returned = returned + $3"
					  " WHERE program_id = $1 AND refund_ref = $2",
					  3, retargs);
		for (int i = 0; i < nrefunds; i++)
		{
			Datum		args[3] = {Int64GetDatum(program_id), CStringGetTextDatum(refunds[i]),
			Int64GetDatum(refund_back[i])};

			LedgerExpect(SPI_execute_plan(plan_returned, args, NULL, false, 0), SPI_OK_UPDATE,
						 "recording what a refund gave back");
		}
	}
	return total;
}

/*
 * Where up to want points that credits repaid of an account's refund debts
 * go back: the lots the account's recoveries (dated from since on) took
 * from, oldest lot first, of recoveries that could have paid debt (one
 * pays the oldest debts first, from the one its ref names: that one is
 * not a later debt), each no more than its recoveries took net of what
 * came back to it before, nor than it lacks; not the lots in exclude.
 * lots and amounts get them (amounts negative, restores, as lot_use counts
 * them); returns the points placed.
 */
static int64
AccrualRecoveredLots(int64 account, int64 debt, TimestampTz since, int64 *exclude, int nexclude, int64 want,
					 int64 **lots, int64 **amounts, int *n)
{
	static const Oid fromargs[] = {INT8OID, INT8ARRAYOID, TIMESTAMPTZOID, INT8OID};
	Datum		args[4] = {Int64GetDatum(account), AccrualInt64Array(exclude, nexclude),
	TimestampTzGetDatum(since), Int64GetDatum(debt)};
	int64		placed = 0;

	LedgerPrepare(&plan_recovered_from,
				  "SELECT x.lot_id, sum(x.amount::bigint)::bigint, min(l.amount::bigint - l.remaining::bigint)"
				  "  FROM loyalty.transfer rt"
				  "  JOIN loyalty.lot_use x ON x.transfer_id = rt.id"
				  "  JOIN loyalty.lot l ON l.id = x.lot_id"
				  " WHERE ((rt.kind = 'recover' AND rt.debit_account_id = $1"
				  "         AND CASE WHEN rt.ref LIKE 'recovery % after transfer %'"
				  "                  THEN split_part(rt.ref, ' ', 2)::bigint <= $4 END)"
				  "        OR (rt.kind = 'recover_return' AND rt.credit_account_id = $1))"
				  "   AND rt.occurred_at >= $3 AND x.lot_id <> ALL ($2)"
				  " GROUP BY x.lot_id HAVING sum(x.amount::bigint) > 0"
				  " ORDER BY x.lot_id",
				  4, fromargs);
	LedgerExpect(SPI_execute_plan(plan_recovered_from, args, NULL, false, 0), SPI_OK_SELECT,
				 "reading what recoveries took");
	*lots = palloc(sizeof(int64) * Max(SPI_processed, 1));
	*amounts = palloc(sizeof(int64) * Max(SPI_processed, 1));
	*n = 0;
	for (uint64 i = 0; i < SPI_processed && placed < want; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		int64		give = Min(want - placed, Min(DatumGetInt64(SPI_getbinval(t, d, 2, &(bool){0})),
												  DatumGetInt64(SPI_getbinval(t, d, 3, &(bool){0}))));

		if (give <= 0)
			continue;
		(*lots)[*n] = DatumGetInt64(SPI_getbinval(t, d, 1, &(bool){0}));
		(*amounts)[(*n)++] = -give;
		placed += give;
	}
	return placed;
}

/*
 * _give_back_recovered(account, points, debt, since, ref, at): undoing a
 * DELETE's refund (loyalty._restore_deleted), what later credits repaid of
 * its debt goes back to the lots those recoveries took
 * (AccrualRecoveredLots), from the issuance account (recover_return, ref);
 * what came back to a lot past its expiry expires at once. The caller
 * holds the member account's lock. Returns the points given back, which
 * is less than asked only when those lots cannot take them all.
 */
Datum
loyalty_give_back_recovered(PG_FUNCTION_ARGS)
{
	static const Oid argtypes[] = {INT8OID};
	int64		account = PG_GETARG_INT64(0);
	int64		want = PG_GETARG_INT64(1);
	int64	   *lots;
	int64	   *amounts;
	int			n;
	int64		placed;
	Datum		arg = Int64GetDatum(account);
	AccrualBatch b;
	int64		program_id;
	char	   *member_ref;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	LedgerPrepare(&plan_account_member,
				  "SELECT a.program_id, m.member_ref FROM loyalty.account a"
				  "  JOIN loyalty.member m ON m.id = a.member_id WHERE a.id = $1",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_account_member, &arg, NULL, false, 1), SPI_OK_SELECT,
				 "reading a member account");
	if (SPI_processed != 1)
		elog(ERROR, "member account %lld does not exist", (long long) account);
	/* both read before loading the program, whose queries replace SPI_tuptable */
	program_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &(bool){0}));
	member_ref = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	memset(&b, 0, sizeof(b));
	AccrualLoadProgram(&b, program_id, NULL);
	placed = AccrualRecoveredLots(account, PG_GETARG_INT64(2), PG_GETARG_TIMESTAMPTZ(3), NULL, 0, want,
								  &lots, &amounts, &n);
	if (placed > 0)
		AccrualGiveBack(&b, account, member_ref, "recover_return", text_to_cstring(PG_GETARG_TEXT_PP(4)),
						placed, PG_GETARG_TIMESTAMPTZ(5), n, lots, amounts);
	SPI_finish();
	PG_RETURN_INT64(placed);
}

/*
 * The third part of _recover_refilled: what is left of a purchase's
 * refilled points once its refund's debt is repaid and the refund settled
 * (AccrualSwapRefilled) replaces what later credits already repaid of that
 * debt (a recover line after an earn, a purchase, ...). Had the reversal
 * come before the refund, the refund would have owed nothing and those
 * credits would still be the member's. The refilled points settle the
 * refund (refund_settle, from the purchase's lot) and the lots the member's
 * recoveries took get as much back (recover_return, issuance to member,
 * restoring them, oldest lot first, each no more than its recoveries took
 * net of what came back before, nor than it lacks);
 * accrual_debt.given_back counts it, so nothing is given back twice, and
 * accrual_debt.refilled (what refilled lots repaid) is never given back.
 * Points given back to a lot past its expiry expire at once.
 */
static int64
AccrualReturnRecovered(int64 reversal)
{
	static const Oid argtypes[] = {INT8OID};
	static const Oid giveargs[] = {INT8OID, INT8OID};
	Datum		arg = Int64GetDatum(reversal);
	SPITupleTable *tab;
	uint64		nrows;
	int64	   *settle_lots,
			   *settle_amounts,
			   *debts,
			   *debt_give,
			   *back_lots,
			   *back_amounts;
	int			nsettle = 0,
				ndebts = 0,
				nback = 0;
	int64		lot = 0,
				left = 0,
				want = 0,
				placed = 0;
	int64		account = 0,
				program_id = 0;
	TimestampTz at = 0,
				since = DT_NOEND;
	int64		last_debt = 0;
	char	   *member_ref = NULL;
	char	   *purchase = NULL;

	LedgerPrepare(&plan_repaid,
				  "SELECT u.lot_id,"
				  "       least(l.remaining::bigint, -u.amount::bigint"
				  "             - coalesce((SELECT sum(x.amount::bigint) FROM loyalty.lot_use x"
				  "                         JOIN loyalty.transfer xt ON xt.id = x.transfer_id"
				  "                         WHERE x.lot_id = u.lot_id AND xt.id > t.id"
				  "                           AND xt.kind IN ('recover', 'refund_settle'))::bigint, 0)),"
				  "       d.id, d.amount - d.outstanding - d.refilled - d.given_back,"
				  "       greatest(t.occurred_at, r.occurred_at), t.program_id, l.account_id, m.member_ref, e.ref,"
				  "       d.created_at"
				  ACCRUAL_REFILLED_REFUNDED
				  "  JOIN loyalty.accrual_debt d ON d.program_id = r.program_id AND d.refund_ref = r.refund_ref"
				  "       AND d.account_id = l.account_id AND d.cancelled_at IS NULL"
				  " WHERE t.id = $1 AND d.amount - d.outstanding - d.refilled - d.given_back > 0"
				  " ORDER BY u.lot_id, d.id",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_repaid, &arg, NULL, false, 0), SPI_OK_SELECT,
				 "reading what credits repaid");
	nrows = SPI_processed;
	tab = SPI_tuptable;
	if (nrows == 0)
		return 0;
	settle_lots = palloc(sizeof(int64) * nrows);
	settle_amounts = palloc(sizeof(int64) * nrows);
	debts = palloc(sizeof(int64) * nrows);
	debt_give = palloc(sizeof(int64) * nrows);
	for (uint64 i = 0; i < nrows; i++)
	{
		HeapTuple	t = tab->vals[i];
		TupleDesc	d = tab->tupdesc;
		int64		this_lot = DatumGetInt64(SPI_getbinval(t, d, 1, &(bool){0}));
		int64		give;

		if (this_lot != lot)
		{
			lot = this_lot;
			left = DatumGetInt64(SPI_getbinval(t, d, 2, &(bool){0}));
		}
		give = Min(left, DatumGetInt64(SPI_getbinval(t, d, 4, &(bool){0})));
		if (give <= 0)
			continue;
		left -= give;
		want += give;
		AccrualAddByLot(settle_lots, settle_amounts, &nsettle, lot, give);
		debts[ndebts] = DatumGetInt64(SPI_getbinval(t, d, 3, &(bool){0}));
		last_debt = Max(last_debt, debts[ndebts]);
		debt_give[ndebts++] = give;
		at = Max(at, DatumGetTimestampTz(SPI_getbinval(t, d, 5, &(bool){0})));
		since = Min(since, DatumGetTimestampTz(SPI_getbinval(t, d, 10, &(bool){0})));
		program_id = DatumGetInt64(SPI_getbinval(t, d, 6, &(bool){0}));
		account = DatumGetInt64(SPI_getbinval(t, d, 7, &(bool){0}));
		member_ref = SPI_getvalue(t, d, 8);
		purchase = SPI_getvalue(t, d, 9);
	}
	if (want == 0)
		return 0;

	placed = AccrualRecoveredLots(account, last_debt, since, settle_lots, nsettle, want, &back_lots, &back_amounts,
								  &nback);
	if (placed == 0)
		return 0;

	/* as much as the lots could take: the refilled lots and the debts in order give that */
	AccrualCapAt(settle_amounts, nsettle, placed);
	AccrualCapAt(debt_give, ndebts, placed);
	AccrualExchange(program_id, account, member_ref, purchase, reversal, "recovery ", "recover_return", placed, at,
					nsettle, settle_lots, settle_amounts, nback, back_lots, back_amounts);
	LedgerPrepare(&plan_given_back,
				  "UPDATE loyalty.accrual_debt SET given_back = given_back + $2 WHERE id = $1",
				  2, giveargs);
	for (int i = 0; i < ndebts; i++)
	{
		Datum		args[2] = {Int64GetDatum(debts[i]), Int64GetDatum(debt_give[i])};

		if (debt_give[i] > 0)
			LedgerExpect(SPI_execute_plan(plan_given_back, args, NULL, false, 0), SPI_OK_UPDATE,
						 "recording what a debt gave back");
	}
	return placed;
}

/*
 * _recover_refilled(reversal): a reversal (a cancelled redemption or
 * capture) gave points back to the lot of a purchase whose refund had
 * recorded them as owed, because they had been spent by what the reversal
 * undoes. Those are the very points the refund could not take: they repay
 * that refund's debt at once, from that lot, whether or not the lot has
 * expired since. Left there, they would expire (or be spent) while the
 * debt stayed, and the member would give the same points back twice;
 * cancelled before the refund, the refund would have taken them (or
 * forgiven them as expired) instead. Points a lot of another purchase gets
 * back are not the refund's: they repay a debt only as any credit does
 * (AccrualRecoverIfOwed), from lots not expired.
 *
 * What is left of them then settles the refund in place of the member's
 * other points it took (AccrualSwapRefilled), so that a cancel after a
 * refund ends where a cancel before it does.
 *
 * The recovery is dated at the reversal, or at the debt if that is later
 * (a refund dated in the future owes from its date). Called right after the
 * reversal, which holds the member account's lock; returns the points
 * repaid and settled. loyalty._expire_refilled expires only what is left
 * of them.
 */
Datum
loyalty_recover_refilled(PG_FUNCTION_ARGS)
{
	static const Oid argtypes[] = {INT8OID};
	static const Oid payargs[] = {INT8OID, INT8OID};
	int64		reversal = PG_GETARG_INT64(0);
	Datum		arg = Int64GetDatum(reversal);
	int64	   *lots;
	int64	   *amounts;
	int64	   *debts;
	int64	   *pays;
	int			nlots = 0;
	int			ndebts = 0;
	int64		total = 0;
	int64		lot = 0;
	int64		left = 0;
	int64		account = 0;
	int64		program_id = 0;
	TimestampTz at = 0;
	char	   *member_ref = NULL;
	AccrualBatch b;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	LedgerPrepare(&plan_refilled,
				  "SELECT u.lot_id, -u.amount::bigint, l.remaining::bigint, d.id, d.outstanding,"
				  "       greatest(t.occurred_at, d.created_at), t.program_id, l.account_id, m.member_ref"
				  ACCRUAL_REFILLED_REFUNDED
				  "  JOIN loyalty.accrual_debt d ON d.program_id = r.program_id AND d.refund_ref = r.refund_ref"
				  "       AND d.account_id = l.account_id AND d.outstanding > 0"
				  " WHERE t.id = $1"
				  " ORDER BY u.lot_id, d.id",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_refilled, &arg, NULL, false, 0), SPI_OK_SELECT, "reading refilled lots");
	lots = palloc(sizeof(int64) * Max(SPI_processed, 1));
	amounts = palloc(sizeof(int64) * Max(SPI_processed, 1));
	debts = palloc(sizeof(int64) * Max(SPI_processed, 1));
	pays = palloc(sizeof(int64) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		int64		this_lot = DatumGetInt64(SPI_getbinval(t, d, 1, &(bool){0}));
		int64		outstanding = DatumGetInt64(SPI_getbinval(t, d, 5, &(bool){0}));
		int64		pay;

		if (this_lot != lot)
		{
			/* what the reversal gave back, as far as the lot still holds it */
			lot = this_lot;
			left = Min(DatumGetInt64(SPI_getbinval(t, d, 2, &(bool){0})),
					   DatumGetInt64(SPI_getbinval(t, d, 3, &(bool){0})));
		}
		pay = Min(outstanding, left);
		if (pay <= 0)
			continue;
		left -= pay;
		AccrualAddByLot(lots, amounts, &nlots, lot, pay);
		debts[ndebts] = DatumGetInt64(SPI_getbinval(t, d, 4, &(bool){0}));
		pays[ndebts++] = pay;
		total += pay;
		at = Max(at, DatumGetTimestampTz(SPI_getbinval(t, d, 6, &(bool){0})));
		program_id = DatumGetInt64(SPI_getbinval(t, d, 7, &(bool){0}));
		account = DatumGetInt64(SPI_getbinval(t, d, 8, &(bool){0}));
		member_ref = SPI_getvalue(t, d, 9);
	}
	if (total > 0)
	{
		memset(&b, 0, sizeof(b));
		AccrualLoadProgram(&b, program_id, NULL);
		AccrualPostBack(&b, account, member_ref, "recover",
						psprintf("recovery %lld from the lots refilled by transfer %lld",
								 (long long) debts[0], (long long) reversal),
						total, nlots, lots, amounts, at);
		LedgerPrepare(&plan_debt_pay_one,
					  "UPDATE loyalty.accrual_debt SET outstanding = outstanding - $2, refilled = refilled + $2"
					  " WHERE id = $1",
					  2, payargs);
		for (int i = 0; i < ndebts; i++)
		{
			Datum		args[2] = {Int64GetDatum(debts[i]), Int64GetDatum(pays[i])};

			LedgerExpect(SPI_execute_plan(plan_debt_pay_one, args, NULL, false, 0), SPI_OK_UPDATE,
						 "paying a debt");
		}
	}
	total += AccrualSwapRefilled(reversal, lots, amounts, nlots);
	total += AccrualReturnRecovered(reversal);
	SPI_finish();
	PG_RETURN_INT64(total);
}

/*
 * The points of a purchase's lot that expired unused and that no earlier
 * refund of the purchase forgave: those the expire job swept, plus what the
 * lot still holds if it has expired (or lapsed, under a rolling policy) at
 * at and the job has not swept it yet; the job sweeps those later, and
 * they are counted then instead. Read after the account's lock, with a
 * snapshot of its own: an expire job that held the lock, or a refund of
 * the same purchase that held its row, has committed by then, and under
 * READ COMMITTED the purchase's read query, whose snapshot predates the
 * wait, would not see what they wrote.
 */
static int64
AccrualExpiredUnforgiven(AccrualBatch *b, const char *ref, int64 account, int64 transfer, TimestampTz at)
{
	static const Oid argtypes[] = {INT8OID, INT8OID, INT8OID, TEXTOID, TIMESTAMPTZOID};
	Datum		args[5];

	LedgerPrepare(&plan_expired,
				  "SELECT greatest(coalesce((SELECT sum(u.amount::bigint) FROM loyalty.lot_use u"
				  "                            JOIN loyalty.lot l ON l.id = u.lot_id"
				  "                            JOIN loyalty.transfer t ON t.id = u.transfer_id"
				  "                           WHERE u.account_id = $1 AND l.transfer_id = $2"
				  "                             AND t.kind = 'expire'), 0)"
				  "                + coalesce((SELECT sum(l.remaining::bigint) FROM loyalty.lot l"
				  "                             WHERE l.account_id = $1 AND l.transfer_id = $2"
				  "                               AND l.remaining OPERATOR(loyalty.>) 0"
				  "                               AND (l.expires_at <= $5"
				  "                                    OR (" ACCRUAL_ROLLING("$1")
				  "                                        AND $5 >= loyalty._rolling_lapse($1, l.occurred_at, $5)))), 0)"
				  "                - coalesce((SELECT sum(f.forgiven) FROM loyalty.accrual_refund f"
				  "                             WHERE f.program_id = $3 AND f.purchase_ref = $4"
				  "                               AND f.restored_at IS NULL), 0), 0)::bigint",
				  5, argtypes);
	args[0] = Int64GetDatum(account);
	args[1] = Int64GetDatum(transfer);
	args[2] = Int64GetDatum(b->program_id);
	args[3] = CStringGetTextDatum(ref);
	args[4] = TimestampTzGetDatum(at);
	LedgerExpect(SPI_execute_plan(plan_expired, args, NULL, false, 1), SPI_OK_SELECT, "reading expired points");
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &(bool){0}));
}

/* The refund already recorded under refund_ref: the same one returns its points. */
static bool
AccrualFindRefund(AccrualBatch *b, const char *ref, Datum amount, bool amount_null, const char *refund_ref,
				  int64 *points)
{
	static const Oid argtypes[] = {INT8OID, TEXTOID, TEXTOID, NUMERICOID};
	Datum		args[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	HeapTuple	t;
	TupleDesc	d;

	LedgerPrepare(&plan_refund_find,
				  "SELECT points - forgiven, purchase_ref = $3 AND ($4 IS NULL OR amount = $4),"
				  "       format('purchase %s, amount %s', purchase_ref, amount)"
				  "  FROM loyalty.accrual_refund WHERE program_id = $1 AND refund_ref = $2",
				  4, argtypes);
	args[0] = Int64GetDatum(b->program_id);
	args[1] = CStringGetTextDatum(refund_ref);
	args[2] = CStringGetTextDatum(ref);
	args[3] = amount;
	nulls[3] = amount_null ? 'n' : ' ';
	LedgerExpect(SPI_execute_plan(plan_refund_find, args, nulls, false, 1), SPI_OK_SELECT, "reading a refund");
	if (SPI_processed == 0)
		return false;
	t = SPI_tuptable->vals[0];
	d = SPI_tuptable->tupdesc;
	if (!DatumGetBool(SPI_getbinval(t, d, 2, &(bool){0})))
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("refund_ref \"%s\" was already used for a different refund", refund_ref),
				 errdetail("The first refund was: %s. This one is: purchase %s, amount %s.",
						   SPI_getvalue(t, d, 3), ref,
						   amount_null ? "(all that is left)" :
						   DatumGetCString(DirectFunctionCall1(numeric_out, amount))),
				 errhint("Give each partial refund its own refund_ref.")));
	*points = DatumGetInt64(SPI_getbinval(t, d, 1, &(bool){0}));
	return true;
}

/*
 * Refund amount (NULL: all that is not yet refunded) of purchase ref under
 * refund_ref. Returns the points clawed back (taken from lots plus debt).
 *
 * to_amount: amount is what the purchase now amounts to (an UPDATE of an
 * attached table lowered it), and the refund is what is left unrefunded
 * beyond it, computed under the purchase's lock; nothing when the purchase
 * is already refunded down to it (a raise earns nothing, so lowering the
 * amount again after a raise only refunds below what was refunded before).
 *
 * Points of the purchase that expired unused are forgiven first: they went
 * to breakage and the member never had the use of them, so taking them
 * again from its other lots, or recording them as debt, would make it pay
 * twice. A lot expires whole, so a purchase's lot either still has points
 * (taken first, from the lot) or expired with what it had left.
 */
int64
AccrualRefundPurchase(AccrualBatch *b, const char *ref, Datum amount, bool amount_null, const char *refund_ref,
					  bool to_amount)
{
	static const Oid argtypes[] = {INT8OID, TEXTOID, NUMERICOID, BOOLOID};
	static const Oid saveargs[] = {INT8OID, TEXTOID, TEXTOID, NUMERICOID, INT8OID, INT8OID, INT8OID,
	TIMESTAMPTZOID, INT8OID, INT8OID};
	Datum		args[10];
	char		nulls[10];
	HeapTuple	t;
	TupleDesc	d;
	bool		isnull;
	int64		account,
				lot,
				claw,
				transfer,
				forgiven = 0,
				covered = 0,
				points;
	Datum		refund_amount;
	char	   *member_ref;
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	TimestampTz at;
	int64	   *lots = NULL,
			   *amounts = NULL;
	int			n = 0;

	if (to_amount && !amount_null &&
		(numeric_is_nan(DatumGetNumeric(amount)) || numeric_is_inf(DatumGetNumeric(amount)) ||
		 DatumGetInt32(DirectFunctionCall2(numeric_cmp, amount,
										   DirectFunctionCall1(int4_numeric, Int32GetDatum(0)))) < 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the new amount %s of purchase \"%s\" is not a finite amount of zero or more",
						DatumGetCString(DirectFunctionCall1(numeric_out, amount)), ref)));
	/*
	 * The member account first, then the purchase: every posting locks
	 * member accounts before anything else, in id order (an attached table's
	 * UPDATE or DELETE locks all of its purchases' accounts so before its
	 * refunds), and a refund that took the purchase's row first deadlocked
	 * with them. A purchase never changes account, so reading which one
	 * before the lock is safe.
	 */
	AccrualLockPurchaseAccount(b, ref);
	LedgerPrepare(&plan_purchase,
				  "WITH x AS (SELECT x.* FROM loyalty.accrual x WHERE x.program_id = $1 AND x.ref = $2 FOR UPDATE),"
				  " a AS (SELECT x.*, CASE WHEN $4 THEN x.amount - x.refunded_amount - $3"
				  "                        ELSE coalesce($3, x.amount - x.refunded_amount) END AS amt FROM x)"
				  " SELECT a.account_id, m.member_ref, a.amt,"
				  "        a.refunded_amount + a.amt > a.amount,"
				  "        CASE WHEN a.refunded_amount + a.amt >= a.amount"
				  "             THEN a.points"
				  "             ELSE round(a.points * (a.refunded_amount + a.amt) / a.amount)::bigint"
				  "        END - a.refunded_points,"
				  "        coalesce((SELECT l.id FROM loyalty.lot l WHERE l.transfer_id = a.transfer_id"
				  "                   AND l.account_id = a.account_id AND l.remaining OPERATOR(loyalty.>) 0), 0),"
				  "        format('%s of %s already refunded', a.refunded_amount, a.amount),"
				  "        coalesce(a.transfer_id, 0), a.occurred_at"
				  "   FROM a JOIN loyalty.member m ON m.id = a.member_id",
				  4, argtypes);
	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int64GetDatum(b->program_id);
	args[1] = CStringGetTextDatum(ref);
	args[2] = amount;
	nulls[2] = amount_null ? 'n' : ' ';
	args[3] = BoolGetDatum(to_amount);
	LedgerExpect(SPI_execute_plan(plan_purchase, args, nulls, false, 1), SPI_OK_SELECT, "reading a purchase");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_UNKNOWN_PURCHASE),
				 errmsg("purchase \"%s\" does not exist in program \"%s\"", ref, b->code),
				 errhint("Purchases are posted by loyalty.accrue() or an attached table.")));
	t = SPI_tuptable->vals[0];
	d = SPI_tuptable->tupdesc;
	account = DatumGetInt64(SPI_getbinval(t, d, 1, &(bool){0}));
	member_ref = SPI_getvalue(t, d, 2);
	refund_amount = SPI_getbinval(t, d, 3, &isnull);
	/* refunded down to the new amount already (or a NULL new amount) */
	if (to_amount &&
		(isnull || DatumGetInt32(DirectFunctionCall2(numeric_cmp, refund_amount,
													  DirectFunctionCall1(int4_numeric, Int32GetDatum(0)))) <= 0))
		return 0;
	refund_amount = datumCopy(refund_amount, false, -1);
	claw = DatumGetInt64(SPI_getbinval(t, d, 5, &(bool){0}));
	lot = DatumGetInt64(SPI_getbinval(t, d, 6, &(bool){0}));
	transfer = DatumGetInt64(SPI_getbinval(t, d, 8, &(bool){0}));
	/*
	 * A purchase dated in the future is refunded at its own time: its lot
	 * does not exist before then, and a refund dated now would show on the
	 * statement as a debit before the credit it takes back.
	 */
	at = Max(now, DatumGetTimestampTz(SPI_getbinval(t, d, 9, &(bool){0})));
	if (DatumGetBool(SPI_getbinval(t, d, 4, &(bool){0})))
	{
		char	   *already = SPI_getvalue(t, d, 7);

		/* a repeat of a recorded refund is not an excess */
		if (AccrualFindRefund(b, ref, amount, amount_null, refund_ref, &points))
			return points;
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_REFUND_EXCEEDS),
				 errmsg("refund of %s exceeds what is left of purchase \"%s\"",
						DatumGetCString(DirectFunctionCall1(numeric_out, refund_amount)), ref),
				 errdetail("%s.", already)));
	}
	if (AccrualFindRefund(b, ref, amount, amount_null, refund_ref, &points))
		return points;

	/*
	 * Locked already by AccrualLockPurchaseAccount, unless the purchase was
	 * committed between that query and the purchase's: lock it in any case
	 * before reading the held sum and the lots.
	 */
	AccrualLockAccount(account);
	if (claw > 0 && transfer != 0)
		forgiven = Min(claw, AccrualExpiredUnforgiven(b, ref, account, transfer, at));
	if (claw - forgiven > 0)
		covered = AccrualTakeLots(account, lot, claw - forgiven, at, &lots, &amounts, &n);
	if (covered > 0)
		AccrualPostBack(b, account, member_ref, "refund", refund_ref, covered, n, lots, amounts, at);
	else if (claw - forgiven > 0)
		AccrualTouchAccount(account);

	LedgerPrepare(&plan_refund_save,
				  "WITH r AS (INSERT INTO loyalty.accrual_refund (program_id, refund_ref, purchase_ref, amount,"
				  "                  points, taken, shortfall, forgiven, occurred_at)"
				  "           VALUES ($1, $2, $3, $4, $5, $6, $7, $10, $8)),"
				  " a AS (UPDATE loyalty.accrual SET refunded_amount = refunded_amount + $4,"
				  "              refunded_points = refunded_points + $5"
				  "        WHERE program_id = $1 AND ref = $3),"
				  /* the member's sales look for debts to recover from now on */
				  " o AS (UPDATE loyalty.account SET owes = true WHERE id = $9 AND $7 > 0 AND NOT owes)"
				  " INSERT INTO loyalty.accrual_debt (program_id, account_id, refund_ref, amount, outstanding,"
				  "        created_at, shown_as_negative)"
				  " SELECT $1, $9, $2, $7, $7, $8, coalesce(p.options ->> 'shortfall' = 'negative', false)"
				  "   FROM loyalty.program p WHERE p.id = $1 AND $7 > 0",
				  10, saveargs);
	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int64GetDatum(b->program_id);
	args[1] = CStringGetTextDatum(refund_ref);
	args[2] = CStringGetTextDatum(ref);
	args[3] = refund_amount;
	args[4] = Int64GetDatum(Max(claw, 0));
	args[5] = Int64GetDatum(covered);
	args[6] = Int64GetDatum(Max(claw, 0) - forgiven - covered);
	args[7] = TimestampTzGetDatum(at);
	args[8] = Int64GetDatum(account);
	args[9] = Int64GetDatum(forgiven);
	LedgerExpect(SPI_execute_plan(plan_refund_save, args, nulls, false, 0), SPI_OK_INSERT, "recording a refund");
	return Max(claw, 0) - forgiven;
}

/* refund(program, ref, amount, refund_ref), and _refund_to(...) (to_amount) */
static Datum
AccrualRefundCall(FunctionCallInfo fcinfo, bool to_amount)
{
	char	   *program;
	char	   *ref;
	char	   *refund_ref;
	AccrualBatch b;
	int64		points;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("program and ref must not be null")));
	program = text_to_cstring(PG_GETARG_TEXT_PP(0));
	ref = text_to_cstring(PG_GETARG_TEXT_PP(1));
	refund_ref = PG_ARGISNULL(3) ? ref : text_to_cstring(PG_GETARG_TEXT_PP(3));
	AccrualCheckRef(refund_ref);
	if (to_amount && PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the new amount must not be null")));
	if (!PG_ARGISNULL(2) &&
		(numeric_is_nan(PG_GETARG_NUMERIC(2)) || numeric_is_inf(PG_GETARG_NUMERIC(2))))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a refund amount must be a finite number"),
				 errdetail("Got %s.", DatumGetCString(DirectFunctionCall1(numeric_out, PG_GETARG_DATUM(2))))));
	if (!to_amount && !PG_ARGISNULL(2) &&
		DatumGetInt32(DirectFunctionCall2(numeric_cmp, PG_GETARG_DATUM(2),
										  DirectFunctionCall1(int4_numeric, Int32GetDatum(0)))) <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a refund amount must be positive"),
				 errdetail("Got %s.", DatumGetCString(DirectFunctionCall1(numeric_out, PG_GETARG_DATUM(2)))),
				 errhint("Leave the amount NULL to refund all that is left of the purchase.")));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	memset(&b, 0, sizeof(b));
	AccrualLoadProgram(&b, 0, program);
	points = AccrualRefundPurchase(&b, ref, PG_ARGISNULL(2) ? (Datum) 0 : PG_GETARG_DATUM(2),
								   PG_ARGISNULL(2), refund_ref, to_amount);
	SPI_finish();
	PG_RETURN_INT64(points);
}

Datum
loyalty_refund(PG_FUNCTION_ARGS)
{
	return AccrualRefundCall(fcinfo, false);
}

/*
 * _refund_to(program, ref, new_amount, refund_ref): refund a purchase down
 * to what it now amounts to, as an attached table's UPDATE does; how
 * replay_quarantine retries such a refund.
 */
Datum
loyalty_refund_to(PG_FUNCTION_ARGS)
{
	return AccrualRefundCall(fcinfo, true);
}
