/*
 * jobs.h: the jobs' C half (sql/40_jobs.sql has the registry and handlers)
 */
#ifndef LOYALTY_JOBS_H
#define LOYALTY_JOBS_H

#include "datatype/timestamp.h"

/* Our SQLSTATEs (LY020-LY029), listed in docs/jobs.md */
#define ERRCODE_LOYALTY_UNKNOWN_JOB			MAKE_SQLSTATE('L','Y','0','2','0')
#define ERRCODE_LOYALTY_NO_JOB_HANDLER		MAKE_SQLSTATE('L','Y','0','2','1')

extern int64 JobsPostExpire(int64 program_id, int64 account, int64 breakage, int64 lot,
							int64 points, const char *ref, TimestampTz occurred_at);

#endif
