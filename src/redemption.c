/*
 * redemption.c: the one posting entry point of redemption
 *
 * The redemption functions (redeem, capture, donate, transfer_points,
 * cancel_redemption) decide what to post in SQL (sql/50_redemption.sql) and
 * post it here, through LedgerPost: it locks the member accounts in
 * account-id order, checks idempotency on (program, kind, ref), consumes
 * lots earliest expiry first (leaving the points of active holds alone) or
 * restores the lots named, and chains the hashes.
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
	id = LedgerPost(&p, NULL);
	SPI_finish();
	PG_RETURN_INT64(id);
}
