/*
 * jobs.c: the C half of the jobs (sql/40_jobs.sql): posting the expiry of a
 * lot through the posting routine
 */
#include "postgres.h"

#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "jobs.h"
#include "ledger.h"

PG_FUNCTION_INFO_V1(loyalty_post_expire);

/*
 * Expire points of one lot: a transfer of kind expire from the member to the
 * program's breakage account that names the lot it consumes.
 */
int64
JobsPostExpire(int64 program_id, int64 account, int64 breakage, int64 lot,
			   int64 points, const char *ref, TimestampTz occurred_at)
{
	LedgerPosting p;
	int64		id;

	memset(&p, 0, sizeof(p));
	p.program_id = program_id;
	p.kind = "expire";
	p.ref = ref;
	p.debit_account = account;
	p.debit_is_member = true;
	p.debit_label = "member";
	p.credit_account = breakage;
	p.credit_label = "breakage account";
	p.amount = points;
	p.occurred_at = occurred_at;
	p.vests_at = occurred_at;
	p.nuses = 1;
	p.use_lots = &lot;
	p.use_amounts = &points;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	id = LedgerPost(&p, NULL);
	SPI_finish();
	return id;
}

/* _post_expire(program_id, account_id, breakage_id, lot_id, points, ref, occurred_at) */
Datum
loyalty_post_expire(PG_FUNCTION_ARGS)
{
	int64		points = PG_GETARG_INT64(4);

	if (points <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("points to expire must be positive")));
	PG_RETURN_INT64(JobsPostExpire(PG_GETARG_INT64(0), PG_GETARG_INT64(1), PG_GETARG_INT64(2),
								   PG_GETARG_INT64(3), points,
								   text_to_cstring(PG_GETARG_TEXT_PP(5)),
								   PG_GETARG_TIMESTAMPTZ(6)));
}
