/*
 * worker.c: background workers that run the scheduled jobs
 *
 * With shared_preload_libraries = 'loyalty', a launcher (a static background
 * worker, restarted by the postmaster) starts one dynamic worker per database
 * listed in loyalty.databases and restarts any that died, at most once a
 * minute (a database that does not exist costs one line of log a minute). Each database worker wakes every loyalty.naptime seconds and, when
 * loyalty.enabled is on, the server is not in recovery and the extension is
 * installed, runs the due jobs of loyalty.job. A run is a series of
 * transactions through the same SQL functions run_job() uses: one to start
 * the run, one per batch, one to finish it; so a crash loses at most the
 * batch in flight, and the next run (the handlers being idempotent) finishes
 * the work. An error in one job is logged once, with the job and database as
 * context, recorded in job_run, and the worker goes on with the other jobs.
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

#include "worker.h"

#define WORKER_MAX_DATABASES 64

PGDLLEXPORT void loyalty_launcher_main(Datum arg);
PGDLLEXPORT void loyalty_worker_main(Datum arg);

static bool loyalty_enabled = true;
static int	loyalty_naptime = 60;
static char *loyalty_databases = NULL;

/* The launcher's view of its workers. */
typedef struct WorkerSlot
{
	char		dbname[NAMEDATALEN];
	BackgroundWorkerHandle *handle;
	TimestampTz started_at;		/* last start, to restart at most once a minute */
} WorkerSlot;

#define WORKER_RESTART_SECONDS 60

static WorkerSlot slots[WORKER_MAX_DATABASES];
static int	nslots = 0;

/* What the worker is doing, for the error context. */
static const char *worker_job = NULL;
static char worker_dbname[NAMEDATALEN];

void
WorkerInit(void)
{
	BackgroundWorker bgw;

	DefineCustomBoolVariable("loyalty.enabled",
							 "Whether the background workers run scheduled jobs.",
							 NULL, &loyalty_enabled, true, PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("loyalty.naptime",
							"Seconds between two looks at the job schedule.",
							NULL, &loyalty_naptime, 60, 1, 86400, PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomStringVariable("loyalty.databases",
							   "Comma-separated databases in which a worker runs the jobs.",
							   "Empty: no worker runs.",
							   &loyalty_databases, "", PGC_SIGHUP, GUC_LIST_INPUT,
							   NULL, NULL, NULL);

	if (!process_shared_preload_libraries_in_progress || IsBinaryUpgrade)
		return;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = 10;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "loyalty");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "loyalty_launcher_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "loyalty launcher");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "loyalty launcher");
	RegisterBackgroundWorker(&bgw);
}

/* ---- launcher ---- */

static bool
WorkerListed(List *names, const char *dbname)
{
	ListCell   *lc;

	foreach(lc, names)
		if (strcmp((char *) lfirst(lc), dbname) == 0)
			return true;
	return false;
}

static void
WorkerStart(WorkerSlot *slot)
{
	BackgroundWorker bgw;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "loyalty");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "loyalty_worker_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "loyalty worker %s", slot->dbname);
	snprintf(bgw.bgw_type, BGW_MAXLEN, "loyalty worker");
	strlcpy(bgw.bgw_extra, slot->dbname, BGW_EXTRALEN);
	bgw.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&bgw, &slot->handle))
	{
		slot->handle = NULL;
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start a loyalty worker for database \"%s\"", slot->dbname),
				 errhint("Raise max_worker_processes.")));
	}
}

/*
 * Bring the workers in line with loyalty.databases: stop those of databases
 * no longer listed, start those missing or dead.
 */
static void
WorkerReconcile(void)
{
	char	   *raw = pstrdup(loyalty_databases);
	List	   *names = NIL;
	ListCell   *lc;
	int			i;

	if (!SplitIdentifierString(raw, ',', &names))
	{
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid list syntax in loyalty.databases: \"%s\"", loyalty_databases)));
		names = NIL;
	}

	for (i = 0; i < nslots; i++)
	{
		if (!WorkerListed(names, slots[i].dbname) && slots[i].handle != NULL)
		{
			TerminateBackgroundWorker(slots[i].handle);
			slots[i].handle = NULL;
			slots[i].dbname[0] = '\0';
		}
	}
	foreach(lc, names)
	{
		const char *dbname = lfirst(lc);
		WorkerSlot *slot = NULL;
		pid_t		pid;

		for (i = 0; i < nslots && slot == NULL; i++)
			if (strcmp(slots[i].dbname, dbname) == 0)
				slot = &slots[i];
		for (i = 0; i < nslots && slot == NULL; i++)
			if (slots[i].dbname[0] == '\0')
				slot = &slots[i];
		if (slot == NULL && nslots < WORKER_MAX_DATABASES)
			slot = &slots[nslots++];
		if (slot == NULL)
			break;
		if (strcmp(slot->dbname, dbname) != 0)
		{
			strlcpy(slot->dbname, dbname, NAMEDATALEN);
			slot->handle = NULL;
			slot->started_at = 0;
		}
		if (slot->handle != NULL &&
			GetBackgroundWorkerPid(slot->handle, &pid) != BGWH_STOPPED)
			continue;
		if (slot->started_at != 0 &&
			!TimestampDifferenceExceeds(slot->started_at, GetCurrentTimestamp(),
										WORKER_RESTART_SECONDS * 1000))
			continue;
		slot->started_at = GetCurrentTimestamp();
		WorkerStart(slot);
	}
	pfree(raw);
	list_free(names);
}

void
loyalty_launcher_main(Datum arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	ereport(LOG, (errmsg("loyalty launcher started")));
	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		WorkerReconcile();
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 loyalty_naptime * 1000L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/* ---- database worker ---- */

static void
WorkerErrorContext(void *arg)
{
	if (worker_job != NULL)
		errcontext("loyalty job \"%s\" in database \"%s\"", worker_job, worker_dbname);
}

static void
WorkerBegin(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
}

static void
WorkerEnd(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* Run one statement returning one bigint (or none), in the open transaction. */
static int64
WorkerExec(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls)
{
	bool		isnull;
	Datum		d;
	int			rc;

	pgstat_report_activity(STATE_RUNNING, sql);
	rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "\"%s\" failed: %s", sql, SPI_result_code_string(rc));
	if (SPI_processed == 0)
		return 0;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetInt64(d);
}

/* The names of the due jobs, or NIL when there is nothing to do here. */
static List *
WorkerDueJobs(void)
{
	List	   *jobs = NIL;
	MemoryContext outer = CurrentMemoryContext;

	WorkerBegin();
	if (OidIsValid(get_extension_oid("loyalty", true)))
	{
		int			rc = SPI_execute("SELECT name FROM loyalty.job"
									 " WHERE enabled AND (last_run_at IS NULL"
									 "       OR last_run_at + schedule <= clock_timestamp())"
									 " ORDER BY name", true, 0);

		if (rc != SPI_OK_SELECT)
			elog(ERROR, "reading loyalty.job failed: %s", SPI_result_code_string(rc));
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			char	   *name = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
			MemoryContext old = MemoryContextSwitchTo(outer);

			jobs = lappend(jobs, pstrdup(name));
			MemoryContextSwitchTo(old);
		}
	}
	WorkerEnd();
	return jobs;
}

/* Record a failed run (run 0: it failed before it started). */
static void
WorkerRecordError(int64 run, const char *job, TimestampTz as_of, ErrorData *edata)
{
	Oid			types[5] = {INT8OID, TEXTOID, TIMESTAMPTZOID, TEXTOID, TEXTOID};
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};

	values[0] = Int64GetDatum(run);
	nulls[0] = run == 0 ? 'n' : ' ';
	values[1] = CStringGetTextDatum(job);
	values[2] = TimestampTzGetDatum(as_of);
	values[3] = CStringGetTextDatum(edata->message ? edata->message : "unknown error");
	values[4] = CStringGetTextDatum(unpack_sql_state(edata->sqlerrcode));
	WorkerBegin();
	WorkerExec("SELECT 0::bigint FROM loyalty._job_finish($1, $2, $3, $4, $5, true)",
			   5, types, values, nulls);
	WorkerEnd();
}

/*
 * One run of a job: start, batches until one does nothing, finish; each its
 * own transaction. Returns false if an error stopped it (logged and recorded).
 */
static bool
WorkerRunJob(const char *job)
{
	MemoryContext ctx = CurrentMemoryContext;
	TimestampTz as_of = GetCurrentTimestamp();
	volatile int64 run = 0;
	Oid			types[2] = {TEXTOID, TIMESTAMPTZOID};
	Datum		values[2];
	bool		ok = true;

	values[0] = CStringGetTextDatum(job);
	values[1] = TimestampTzGetDatum(as_of);
	worker_job = job;
	PG_TRY();
	{
		Oid			rtype = INT8OID;
		Datum		rvalue;
		int64		rows;
		Oid			finish_types[3] = {INT8OID, TEXTOID, TIMESTAMPTZOID};
		Datum		finish_values[3];

		WorkerBegin();
		run = WorkerExec("SELECT loyalty._job_start($1, $2, true)", 2, types, values, NULL);
		WorkerEnd();
		rvalue = Int64GetDatum(run);
		finish_values[0] = rvalue;
		finish_values[1] = values[0];
		finish_values[2] = values[1];
		do
		{
			CHECK_FOR_INTERRUPTS();
			WorkerBegin();
			rows = WorkerExec("SELECT loyalty._job_step($1)", 1, &rtype, &rvalue, NULL);
			WorkerEnd();
		} while (rows > 0);
		WorkerBegin();
		WorkerExec("SELECT 0::bigint FROM loyalty._job_finish($1, $2, $3, NULL, NULL, true)",
				   3, finish_types, finish_values, NULL);
		WorkerEnd();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		EmitErrorReport();		/* logged once, with the job as context */
		FlushErrorState();
		AbortCurrentTransaction();
		worker_job = NULL;
		WorkerRecordError(run, job, as_of, edata);
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	worker_job = NULL;
	return ok;
}

static void
WorkerRunDue(void)
{
	List	   *jobs = WorkerDueJobs();
	ListCell   *lc;

	foreach(lc, jobs)
	{
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending || !loyalty_enabled)
			break;
		WorkerRunJob((const char *) lfirst(lc));
	}
	list_free_deep(jobs);
}

void
loyalty_worker_main(Datum arg)
{
	char	   *dbname = worker_dbname;
	ErrorContextCallback errcallback;
	MemoryContext loop_ctx;

	strlcpy(dbname, MyBgworkerEntry->bgw_extra, NAMEDATALEN);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(dbname, NULL, 0);

	errcallback.callback = WorkerErrorContext;
	errcallback.arg = NULL;
	errcallback.previous = NULL;
	error_context_stack = &errcallback;
	loop_ctx = AllocSetContextCreate(TopMemoryContext, "loyalty worker",
									 ALLOCSET_DEFAULT_SIZES);

	ereport(LOG, (errmsg("loyalty worker started in database \"%s\"", dbname)));
	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (loyalty_enabled && !RecoveryInProgress())
		{
			MemoryContext old = MemoryContextSwitchTo(loop_ctx);

			WorkerRunDue();
			MemoryContextSwitchTo(old);
			MemoryContextReset(loop_ctx);
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 loyalty_naptime * 1000L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
