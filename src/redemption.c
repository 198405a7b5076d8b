/*
 * redemption.c: the one posting entry point of redemption
 *
 * The redemption functions (redeem, capture, donate, transfer_points,
 * cancel_redemption) decide what to post in SQL (sql/50_redemption.sql) and
 * post it here, through LedgerPost: it locks the member accounts in
 * account-id order, checks idempotency on (program, kind, ref), consumes
 * lots earliest expiry first (leaving the points of active holds alone) or
 * restores the lots named, and chains the hashes. A member below zero can
 * spend only what is left after what it owes (RedemptionCheckOwed).
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "ledger.h"
#include "redemption.h"

PG_FUNCTION_INFO_V1(loyalty_redemption_post);

/* Unpack a bigint[] argument into a palloc'd int64 array; returns its length. */
static int
RedemptionInt8Array(FunctionCallInfo fcinfo, int n, int64 **out)
{
	ArrayType  *a;
	Datum	   *elems;
	bool	   *nulls;
	int			count;

	*out = NULL;
	if (PG_ARGISNULL(n))
		return 0;
	a = PG_GETARG_ARRAYTYPE_P(n);
	deconstruct_array(a, INT8OID, 8, true, TYPALIGN_DOUBLE, &elems, &nulls, &count);
	*out = palloc(sizeof(int64) * Max(count, 1));
	for (int i = 0; i < count; i++)
	{
		if (nulls[i])
			elog(ERROR, "lot arrays must not contain nulls");
		(*out)[i] = DatumGetInt64(elems[i]);
	}
	return count;
}

/*
 * A member below zero (a refund's shortfall under the program option
 * shortfall "negative", docs/accrual.md) spends only what is left after the
 * debt. Every credit repays a debt at once, so such a member normally has
 * no lots it could spend; this check covers any left beside a debt (points
 * credited later in business time, which a recovery at the posting's time
 * does not take, become spendable later). Checked under the member
 * accounts' locks, taken here in id order as LedgerPost takes them; nothing
 * is locked for a member who owes nothing. A capture spends a hold, which
 * was checked when it was taken.
 */
static void
RedemptionCheckOwed(const LedgerPosting *p)
{
	static SPIPlanPtr plan_owes;
	static SPIPlanPtr plan_lock;
	static SPIPlanPtr plan_left;
	static const Oid argtypes[] = {INT8OID, TIMESTAMPTZOID};
	static const Oid lockargs[] = {INT8OID, INT8OID};
	static const Oid leftargs[] = {INT8OID, TIMESTAMPTZOID, INT8OID, TEXTOID, TEXTOID};
	Datum		args[5];
	bool		isnull;
	int64		owed;
	int64		left;

	if (!p->debit_is_member || p->nuses > 0 || strcmp(p->kind, "capture") == 0)
		return;
	/* the common case, no debt shown as negative, without a PL/pgSQL call */
	LedgerPrepare(&plan_owes,
				  "SELECT CASE WHEN EXISTS (SELECT FROM loyalty.accrual_debt n"
				  "                         WHERE n.account_id = $1 AND n.shown_as_negative)"
				  "            THEN loyalty._negative_shortfall($1, $2) ELSE 0 END",
				  2, argtypes);
	args[0] = Int64GetDatum(p->debit_account);
	args[1] = TimestampTzGetDatum(p->occurred_at);
	LedgerExpect(SPI_execute_plan(plan_owes, args, NULL, true, 1), SPI_OK_SELECT, "reading what is owed");
	if (DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) <= 0)
		return;

	/* lock, then read in a statement of its own, which sees what the lock waited for */
	LedgerPrepare(&plan_lock,
				  "SELECT id FROM loyalty.account WHERE id IN ($1, $2) AND kind = 'member' ORDER BY id FOR UPDATE",
				  2, lockargs);
	args[0] = Int64GetDatum(p->debit_account);
	args[1] = Int64GetDatum(p->credit_is_member ? p->credit_account : p->debit_account);
	LedgerExpect(SPI_execute_plan(plan_lock, args, NULL, false, 0), SPI_OK_SELECT, "locking accounts");
	/* what is left is read from the lots: deferred ones written first */
	LedgerMaterialize(p->debit_account, false);
	if (p->credit_is_member)
		LedgerMaterialize(p->credit_account, false);

	/* a repeat of a posted transfer is LedgerPost's to answer */
	LedgerPrepare(&plan_left,
				  "SELECT loyalty._negative_shortfall($1, $2), loyalty._available_for_hold($1, $2),"
				  "       EXISTS (SELECT FROM loyalty.transfer t WHERE t.program_id = $3 AND t.kind = $4 AND t.ref = $5"
				  "                 AND t.kind <> 'accrual')",	/* so that transfer_ref_key serves it */
				  5, leftargs);
	args[0] = Int64GetDatum(p->debit_account);
	args[1] = TimestampTzGetDatum(p->occurred_at);
	args[2] = Int64GetDatum(p->program_id);
	args[3] = CStringGetTextDatum(p->kind);
	args[4] = CStringGetTextDatum(p->ref);
	LedgerExpect(SPI_execute_plan(plan_left, args, NULL, false, 1), SPI_OK_SELECT, "reading what is owed");
	owed = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	left = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull)))
		return;
	if (owed > 0 && left < p->amount)
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_INSUFFICIENT_POINTS),
				 errmsg("insufficient points"),
				 errdetail("%s owes " INT64_FORMAT " points a refund could not take back, which leaves "
						   INT64_FORMAT " points available at %s; " INT64_FORMAT " are needed.",
						   p->debit_label, owed, left, timestamptz_to_str(p->occurred_at), p->amount),
				 errhint("Points the member earns next repay what is owed first.")));
}

/*
 * _redemption_post(program_id, kind, ref, debit, credit, debit_is_member,
 *                  credit_is_member, amount, occurred_at, reason, expires_at,
 *                  debit_label, lots, amounts) RETURNS bigint
 *
 * Internal: callers have validated everything a user can get wrong except
 * the balance, which LedgerPost checks under the lock (LY001).
 */
Datum
loyalty_redemption_post(PG_FUNCTION_ARGS)
{
	LedgerPosting p;
	int64	   *lots;
	int64	   *amounts;
	int			nlots;
	int64		id;

	for (int i = 0; i < 9; i++)
		if (PG_ARGISNULL(i))
			elog(ERROR, "_redemption_post: argument %d must not be null", i + 1);

	memset(&p, 0, sizeof(p));
	p.program_id = PG_GETARG_INT64(0);
	p.kind = text_to_cstring(PG_GETARG_TEXT_PP(1));
	p.ref = text_to_cstring(PG_GETARG_TEXT_PP(2));
	p.debit_account = PG_GETARG_INT64(3);
	p.credit_account = PG_GETARG_INT64(4);
	p.debit_is_member = PG_GETARG_BOOL(5);
	p.credit_is_member = PG_GETARG_BOOL(6);
	p.amount = PG_GETARG_INT64(7);
	p.occurred_at = PG_GETARG_TIMESTAMPTZ(8);
	p.reason = PG_ARGISNULL(9) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(9));
	p.vests_at = p.occurred_at;
	p.expires = !PG_ARGISNULL(10);
	p.expires_at = p.expires ? PG_GETARG_TIMESTAMPTZ(10) : 0;
	p.debit_label = PG_ARGISNULL(11) ? "the account" : text_to_cstring(PG_GETARG_TEXT_PP(11));
	p.credit_label = "the account";
	if (p.amount <= 0)
		elog(ERROR, "_redemption_post: amount must be positive");

	nlots = RedemptionInt8Array(fcinfo, 12, &lots);
	if (RedemptionInt8Array(fcinfo, 13, &amounts) != nlots)
		elog(ERROR, "_redemption_post: lots and amounts differ in length");
	p.nuses = nlots;
	p.use_lots = lots;
	p.use_amounts = amounts;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	RedemptionCheckOwed(&p);
	id = LedgerPost(&p, NULL);
	SPI_finish();
	PG_RETURN_INT64(id);
}
