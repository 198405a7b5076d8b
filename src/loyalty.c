/*
 * loyalty.c: module entry point
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/guc.h"

#include "accrual.h"
#include "ledger.h"
#include "worker.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

void
_PG_init(void)
{
	LedgerInit();
	AccrualInit();
	WorkerInit();
	MarkGUCPrefixReserved("loyalty");
}
