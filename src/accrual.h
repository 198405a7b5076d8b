/*
 * accrual.h: earning rules (compile, cache, evaluate) and the posting of
 * purchases, one by one or a whole statement at a time
 */
#ifndef LOYALTY_ACCRUAL_H
#define LOYALTY_ACCRUAL_H

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "pgtime.h"
#include "storage/lockdefs.h"
#include "utils/date.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"

/* SQLSTATEs of accrual (LY010-LY019), listed in docs/accrual.md */
#define ERRCODE_LOYALTY_NO_RULES			MAKE_SQLSTATE('L','Y','0','1','0')
#define ERRCODE_LOYALTY_UNKNOWN_PURCHASE	MAKE_SQLSTATE('L','Y','0','1','1')
#define ERRCODE_LOYALTY_REFUND_EXCEEDS		MAKE_SQLSTATE('L','Y','0','1','2')
#define ERRCODE_LOYALTY_ATTACHMENT			MAKE_SQLSTATE('L','Y','0','1','3')

/* A condition: every key given must match; within a key, any value. */
typedef struct AccrualCond
{
	int			ncategory;
	char	  **category;
	int			nchannel;
	char	  **channel;
	int			nstore;
	char	  **store;
	int			ntier;
	char	  **tier;
	uint8		weekdays;		/* bit n set: ISO weekday n (1 = Monday); 0: any */
	int8		first_purchase; /* -1 any, 0 or 1 */
	int8		birthday_month;
} AccrualCond;

/* A multiplier, a bonus or a campaign. */
typedef struct AccrualItem
{
	char	   *path;			/* "multipliers[0]", "bonuses[2]" */
	AccrualCond when;
	bool		is_factor;		/* a factor bonus (or multiplier), not a points one */
	double		factor;
	int64		points;
	char	   *campaign;		/* NULL: not a campaign */
	DateADT		from;
	DateADT		to;
	int64		budget;			/* -1: none */
} AccrualItem;

typedef struct AccrualRules
{
	int32		version;
	TimestampTz effective_from;
	double		per;
	double		points;
	int			rounding;		/* 0 floor, 1 round, 2 ceil */
	bool		has_exclude;
	AccrualCond exclude;		/* any key matching excludes */
	int			nmult;
	AccrualItem *mult;
	int			nbonus;
	AccrualItem *bonus;
	int64		cap_purchase;	/* -1: none */
	int64		cap_day;
	int			pending_days;
	double		min_amount;
	bool		has_expiry;
	bool		replayable;		/* no daily cap, no campaign budget (AccrualRebuilt) */
} AccrualRules;

/* The rule versions of one program, oldest first. */
typedef struct AccrualProgramRules
{
	int64		program_id;		/* hash key */
	int			nversions;
	AccrualRules *versions;
	bool		uses_first;
	bool		uses_birthday;
	bool		uses_day_cap;
	bool		uses_campaign;
	/* the program itself, once AccrualLoadProgram has read it */
	bool		has_program;
	char	   *code;
	pg_tz	   *tz;
	bool		enroll_unknown;
	int64		issuance;
	bool		program_expires;	/* its expiry policy dates lots */
	bool		defers;			/* its purchases' journal lines may be deferred (not rolling) */
} AccrualProgramRules;

/* One purchase, as the rules see it. */
typedef struct AccrualInput
{
	double		amount;
	TimestampTz occurred_at;
	const char *category;
	const char *channel;
	const char *store;
	const char *tier;
	bool		first_purchase;
	bool		birthday_month;
	int			weekday;		/* ISO, in the program's time zone */
	DateADT		day;			/* local date */
} AccrualInput;

/* What the rules give, with state that carries across purchases. */
typedef struct AccrualBudget
{
	char	   *campaign;
	int64		used;			/* before this batch */
	int64		added;
} AccrualBudget;

/*
 * What each part of a version did over many purchases (simulate_accrual):
 * index i < nmult is multipliers[i], then bonuses[], then the per-purchase
 * cap, the per-day cap, and purchases that earned nothing (excluded or
 * below the minimum).
 */
typedef struct AccrualTrace
{
	int64	   *applied;		/* purchases it applied to */
	int64	   *points;			/* points it added (bonuses) or cut (caps) */
} AccrualTrace;

#define TRACE_CAP_PURCHASE(r)	((r)->nmult + (r)->nbonus)
#define TRACE_CAP_DAY(r)		((r)->nmult + (r)->nbonus + 1)
#define TRACE_NOTHING(r)		((r)->nmult + (r)->nbonus + 2)
#define TRACE_SIZE(r)			((r)->nmult + (r)->nbonus + 3)

typedef struct AccrualState
{
	int			nbudgets;
	AccrualBudget *budgets;
	int64		day_used;		/* points already earned that day by the member */
	AccrualTrace *trace;		/* NULL: none */
} AccrualState;

extern int	loyalty_accrual_chunk;

extern void AccrualInit(void);
extern AccrualProgramRules *AccrualProgram(int64 program_id);
extern AccrualProgramRules *AccrualFindProgram(int64 program_id, const char *code);
extern MemoryContext AccrualCacheMemory(void);
extern void AccrualCacheLoading(void);
extern HTAB *AccrualSourceCache(Size entrysize);
extern void AccrualLockRules(int64 program_id, LOCKMODE mode);
extern AccrualRules *AccrualRulesAt(AccrualProgramRules *pr, TimestampTz at);
extern AccrualRules *AccrualCompile(Jsonb *doc, MemoryContext cxt);
extern int64 AccrualEvaluate(const AccrualRules *r, const AccrualInput *in, AccrualState *st,
							 StringInfo breakdown);
extern double AccrualAmount(Datum value);
extern bool AccrualRebuilt(const AccrualRules *r, const AccrualInput *in);
extern bool AccrualInRange(const AccrualRules *r, double amount);
extern bool AccrualVersionUses(const AccrualRules *r, bool birthday);
extern void AccrualLocalTime(TimestampTz t, pg_tz *tz, int *weekday, DateADT *day, int *month);

#endif
