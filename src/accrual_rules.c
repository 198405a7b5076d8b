/*
 * accrual_rules.c: earning rules, compiled from their jsonb document into a
 * C structure once per backend, and evaluated per purchase
 *
 * Compiling validates: every problem is 22023 with the JSON path of the
 * first problem in DETAIL. The compiled versions of each program are cached
 * in a long-lived memory context until a relcache invalidation of
 * loyalty.earning_rule (sent by set_earning_rules, and by DROP EXTENSION)
 * marks the cache stale; the next call reloads it.
 */
#include "postgres.h"

#include <math.h>

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/json.h"
#include "utils/jsonfuncs.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "accrual.h"
#include "ledger.h"
#include "points.h"

PG_FUNCTION_INFO_V1(accrual_check_rules);
PG_FUNCTION_INFO_V1(accrual_rules_changed);
PG_FUNCTION_INFO_V1(accrual_cache_trigger);
PG_FUNCTION_INFO_V1(accrual_rebuilt_breakdown);
PG_FUNCTION_INFO_V1(accrual_lock_rules);
PG_FUNCTION_INFO_V1(accrual_amount_double);

static MemoryContext AccrualCacheCxt = NULL;
static HTAB *AccrualCache = NULL;
static HTAB *AccrualSources = NULL;
static bool AccrualStale = true;

/*
 * The local transaction that loaded part of the cache with a transaction
 * snapshot (REPEATABLE READ or SERIALIZABLE), or invalid. Such a snapshot
 * may predate a rule version, program change or attachment that committed
 * before the load, whose invalidation was taken in already: what it loaded
 * is good for that transaction only, and the cache is dropped after it.
 */
static LocalTransactionId AccrualXactLoaded = InvalidLocalTransactionId;
static Oid	AccrualRulesRelid = InvalidOid;	/* loyalty.earning_rule, once known */
static SPIPlanPtr plan_versions;

typedef struct RulesPair
{
	char	   *key;
	JsonbValue	v;
} RulesPair;

static void RulesBad(const char *path, const char *problem) pg_attribute_noreturn();

static void
RulesBad(const char *path, const char *problem)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid earning rules"),
			 errdetail("At %s: %s.", path, problem),
			 errhint("See the rules document in docs/accrual.md.")));
}

static bool
RulesIsObject(const JsonbValue *v)
{
	return v->type == jbvBinary && JsonContainerIsObject(v->val.binary.data);
}

static bool
RulesIsArray(const JsonbValue *v)
{
	return v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data) &&
		!JsonContainerIsScalar(v->val.binary.data);
}

/* The key/value pairs of an object, nested containers left as binary. */
static int
RulesPairs(const JsonbValue *obj, const char *path, RulesPair **out)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			n = 0;
	int			cap = 8;

	if (!RulesIsObject(obj))
		RulesBad(path, "expected a JSON object");
	*out = palloc(sizeof(RulesPair) * cap);
	it = JsonbIteratorInit(obj->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			if (n == cap)
				*out = repalloc(*out, sizeof(RulesPair) * (cap *= 2));
			(*out)[n].key = pnstrdup(v.val.string.val, v.val.string.len);
		}
		else if (tok == WJB_VALUE)
			(*out)[n++].v = v;
	}
	return n;
}

/* The elements of an array, nested containers left as binary. */
static int
RulesElements(const JsonbValue *arr, const char *path, const char *what, JsonbValue **out)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			n = 0;

	if (!RulesIsArray(arr))
		RulesBad(path, psprintf("expected an array of %s", what));
	*out = palloc(sizeof(JsonbValue) * Max(1, JsonContainerSize(arr->val.binary.data)));
	it = JsonbIteratorInit(arr->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		if (tok == WJB_ELEM)
			(*out)[n++] = v;
	return n;
}

static void
RulesUnknown(const char *path, const char *key, const char *allowed)
{
	RulesBad(psprintf("%s.%s", path, key), psprintf("unknown key; expected one of %s", allowed));
}

static double
RulesNumber(const JsonbValue *v, const char *path, double min, const char *what)
{
	double		d;

	if (v->type != jbvNumeric)
		RulesBad(path, psprintf("expected %s", what));
	/* a number beyond double's range is refused like any other bad value */
	d = DatumGetFloat8(DirectFunctionCall1(numeric_float8_no_overflow, NumericGetDatum(v->val.numeric)));
	if (d < min || isnan(d) || isinf(d))
		RulesBad(path, psprintf("expected %s", what));
	return d;
}

static int64
RulesInteger(const JsonbValue *v, const char *path, int64 min, int64 max, const char *what)
{
	double		d = RulesNumber(v, path, (double) min, what);

	if (d > (double) max || d != floor(d))
		RulesBad(path, psprintf("expected %s", what));
	return (int64) d;
}

static bool
RulesBool(const JsonbValue *v, const char *path)
{
	if (v->type != jbvBool)
		RulesBad(path, "expected true or false");
	return v->val.boolean;
}

static DateADT
RulesDate(const JsonbValue *v, const char *path)
{
	char	   *s;
	int			y,
				m,
				d;
	char		extra;

	if (v->type != jbvString)
		RulesBad(path, "expected a date as a string, such as \"2027-06-01\"");
	s = pnstrdup(v->val.string.val, v->val.string.len);
	if (sscanf(s, "%4d-%2d-%2d%c", &y, &m, &d, &extra) != 3 || m < 1 || m > 12 || d < 1 ||
		d > day_tab[isleap(y)][m - 1] || y < 1)
		RulesBad(path, psprintf("\"%s\" is not a date such as \"2027-06-01\"", s));
	return date2j(y, m, d) - POSTGRES_EPOCH_JDATE;
}

static int
RulesStrings(const JsonbValue *v, const char *path, char ***out)
{
	JsonbValue *elems;
	int			n = RulesElements(v, path, "strings", &elems);

	*out = palloc(sizeof(char *) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		if (elems[i].type != jbvString)
			RulesBad(psprintf("%s[%d]", path, i), "expected a string");
		(*out)[i] = pnstrdup(elems[i].val.string.val, elems[i].val.string.len);
	}
	return n;
}

static void
RulesCond(const JsonbValue *obj, const char *path, AccrualCond *c, bool exclude)
{
	RulesPair  *pairs;
	int			n = RulesPairs(obj, path, &pairs);
	const char *allowed = exclude ? "category, channel, store, tier"
		: "category, channel, store, tier, weekday, first_purchase, birthday_month";

	memset(c, 0, sizeof(*c));
	c->first_purchase = c->birthday_month = -1;
	for (int i = 0; i < n; i++)
	{
		char	   *k = pairs[i].key;
		char	   *p = psprintf("%s.%s", path, k);

		if (strcmp(k, "category") == 0)
			c->ncategory = RulesStrings(&pairs[i].v, p, &c->category);
		else if (strcmp(k, "channel") == 0)
			c->nchannel = RulesStrings(&pairs[i].v, p, &c->channel);
		else if (strcmp(k, "store") == 0)
			c->nstore = RulesStrings(&pairs[i].v, p, &c->store);
		else if (strcmp(k, "tier") == 0)
			c->ntier = RulesStrings(&pairs[i].v, p, &c->tier);
		else if (!exclude && strcmp(k, "weekday") == 0)
		{
			JsonbValue *e;
			int			m = RulesElements(&pairs[i].v, p, "ISO weekdays (1 = Monday to 7 = Sunday)", &e);

			for (int j = 0; j < m; j++)
				c->weekdays |= 1 << RulesInteger(&e[j], psprintf("%s[%d]", p, j), 1, 7,
												 "an ISO weekday, 1 (Monday) to 7 (Sunday)");
		}
		else if (!exclude && strcmp(k, "first_purchase") == 0)
			c->first_purchase = RulesBool(&pairs[i].v, p);
		else if (!exclude && strcmp(k, "birthday_month") == 0)
			c->birthday_month = RulesBool(&pairs[i].v, p);
		else
			RulesUnknown(path, k, allowed);
	}
}

static void
RulesBase(const JsonbValue *obj, AccrualRules *r)
{
	RulesPair  *pairs;
	int			n = RulesPairs(obj, "$.base", &pairs);

	for (int i = 0; i < n; i++)
	{
		char	   *k = pairs[i].key;
		JsonbValue *v = &pairs[i].v;

		if (strcmp(k, "per") == 0)
		{
			r->per = RulesNumber(v, "$.base.per", 0, "a positive amount");
			if (r->per <= 0)
				RulesBad("$.base.per", "expected a positive amount");
		}
		else if (strcmp(k, "points") == 0)
			r->points = RulesNumber(v, "$.base.points", 0, "a number of points of at least 0");
		else if (strcmp(k, "rounding") == 0)
		{
			char	   *s = v->type == jbvString ? pnstrdup(v->val.string.val, v->val.string.len) : "";

			if (strcmp(s, "floor") == 0)
				r->rounding = 0;
			else if (strcmp(s, "round") == 0)
				r->rounding = 1;
			else if (strcmp(s, "ceil") == 0)
				r->rounding = 2;
			else
				RulesBad("$.base.rounding", "expected \"floor\", \"round\" or \"ceil\"");
		}
		else
			RulesUnknown("$.base", k, "per, points, rounding");
	}
}

static void
RulesMultiplier(const JsonbValue *obj, const char *path, AccrualItem *it)
{
	RulesPair  *pairs;
	int			n = RulesPairs(obj, path, &pairs);
	bool		has_factor = false;

	memset(it, 0, sizeof(*it));
	it->path = pstrdup(path + 2);
	it->budget = -1;
	it->when.first_purchase = it->when.birthday_month = -1;
	for (int i = 0; i < n; i++)
	{
		char	   *k = pairs[i].key;
		char	   *p = psprintf("%s.%s", path, k);

		if (strcmp(k, "when") == 0)
			RulesCond(&pairs[i].v, p, &it->when, false);
		else if (strcmp(k, "factor") == 0)
		{
			it->factor = RulesNumber(&pairs[i].v, p, 0, "a factor of at least 0");
			has_factor = true;
		}
		else
			RulesUnknown(path, k, "when, factor");
	}
	if (!has_factor)
		RulesBad(psprintf("%s.factor", path), "required");
	it->is_factor = true;
}

static void
RulesBonus(const JsonbValue *obj, const char *path, AccrualItem *it)
{
	RulesPair  *pairs;
	int			n = RulesPairs(obj, path, &pairs);
	bool		has_factor = false,
				has_points = false,
				has_from = false,
				has_to = false;

	memset(it, 0, sizeof(*it));
	it->path = pstrdup(path + 2);
	it->budget = -1;
	it->when.first_purchase = it->when.birthday_month = -1;
	for (int i = 0; i < n; i++)
	{
		char	   *k = pairs[i].key;
		JsonbValue *v = &pairs[i].v;
		char	   *p = psprintf("%s.%s", path, k);

		if (strcmp(k, "when") == 0)
			RulesCond(v, p, &it->when, false);
		else if (strcmp(k, "factor") == 0)
		{
			it->factor = RulesNumber(v, p, 0, "a factor of at least 0");
			has_factor = true;
		}
		else if (strcmp(k, "points") == 0)
		{
			it->points = RulesInteger(v, p, 0, PG_INT64_MAX / 4, "a whole number of points of at least 0");
			has_points = true;
		}
		else if (strcmp(k, "campaign") == 0)
		{
			if (v->type != jbvString || v->val.string.len == 0)
				RulesBad(p, "expected the campaign's name");
			it->campaign = pnstrdup(v->val.string.val, v->val.string.len);
		}
		else if (strcmp(k, "from") == 0)
		{
			it->from = RulesDate(v, p);
			has_from = true;
		}
		else if (strcmp(k, "to") == 0)
		{
			it->to = RulesDate(v, p);
			has_to = true;
		}
		else if (strcmp(k, "budget") == 0)
			it->budget = RulesInteger(v, p, 0, PG_INT64_MAX / 4, "a whole number of points of at least 0");
		else
			RulesUnknown(path, k, "when, factor, points, campaign, from, to, budget");
	}
	if (has_factor == has_points)
		RulesBad(path, "expected exactly one of factor and points");
	it->is_factor = has_factor;
	if (it->campaign != NULL && (!has_from || !has_to))
		RulesBad(psprintf("%s.%s", path, has_from ? "to" : "from"), "required by a campaign");
	if (it->campaign == NULL && (has_from || has_to || it->budget >= 0))
		RulesBad(psprintf("%s.%s", path, has_from ? "from" : has_to ? "to" : "budget"),
				 "only a campaign has from, to and budget");
	if (it->campaign != NULL && has_factor)
		RulesBad(psprintf("%s.factor", path), "a campaign gives points, not a factor");
	if (has_from && has_to && it->to < it->from)
		RulesBad(psprintf("%s.to", path), "the campaign ends before it starts");
}

static void
RulesCaps(const JsonbValue *obj, AccrualRules *r)
{
	RulesPair  *pairs;
	int			n = RulesPairs(obj, "$.caps", &pairs);

	for (int i = 0; i < n; i++)
	{
		char	   *k = pairs[i].key;
		char	   *p = psprintf("$.caps.%s", k);

		if (strcmp(k, "per_purchase") == 0)
			r->cap_purchase = RulesInteger(&pairs[i].v, p, 0, PG_INT64_MAX / 4, "a whole number of points of at least 0");
		else if (strcmp(k, "per_member_per_day") == 0)
			r->cap_day = RulesInteger(&pairs[i].v, p, 0, PG_INT64_MAX / 4, "a whole number of points of at least 0");
		else
			RulesUnknown("$.caps", k, "per_purchase, per_member_per_day");
	}
}

static void
RulesExpiry(const JsonbValue *obj)
{
	RulesPair  *pairs;
	int			n = RulesPairs(obj, "$.expiry", &pairs);

	for (int i = 0; i < n; i++)
		if (strcmp(pairs[i].key, "policy") == 0)
		{
			JsonbValue *v = &pairs[i].v;
			char	   *s = v->type == jbvString ? pnstrdup(v->val.string.val, v->val.string.len) : "";

			if (strcmp(s, "none") != 0 && strcmp(s, "fixed") != 0 && strcmp(s, "calendar") != 0)
				RulesBad("$.expiry.policy", "expected \"none\", \"fixed\" or \"calendar\" (a rule's expiry applies to the lots it earns)");
		}
	/* the rest of the shape is the program option's, checked in SQL */
}

static void
RulesItems(const JsonbValue *v, const char *name, bool bonus, int *n, AccrualItem **items)
{
	JsonbValue *e;
	char	   *path = psprintf("$.%s", name);

	*n = RulesElements(v, path, "objects", &e);
	*items = palloc(sizeof(AccrualItem) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
	{
		char	   *p = psprintf("$.%s[%d]", name, i);

		if (bonus)
			RulesBonus(&e[i], p, &(*items)[i]);
		else
			RulesMultiplier(&e[i], p, &(*items)[i]);
	}
}

/* Compile (and so validate) a rules document; allocates in cxt. */
AccrualRules *
AccrualCompile(Jsonb *doc, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	AccrualRules *r = palloc0(sizeof(AccrualRules));
	JsonbValue	root;
	RulesPair  *pairs;
	int			n;

	r->per = 1;
	r->points = 1;
	r->cap_purchase = r->cap_day = -1;
	root.type = jbvBinary;
	root.val.binary.data = &doc->root;
	root.val.binary.len = VARSIZE(doc) - VARHDRSZ;
	n = RulesPairs(&root, "$", &pairs);
	for (int i = 0; i < n; i++)
	{
		char	   *k = pairs[i].key;
		JsonbValue *v = &pairs[i].v;

		if (strcmp(k, "base") == 0)
			RulesBase(v, r);
		else if (strcmp(k, "exclude") == 0)
		{
			RulesCond(v, "$.exclude", &r->exclude, true);
			r->has_exclude = true;
		}
		else if (strcmp(k, "multipliers") == 0)
			RulesItems(v, "multipliers", false, &r->nmult, &r->mult);
		else if (strcmp(k, "bonuses") == 0)
			RulesItems(v, "bonuses", true, &r->nbonus, &r->bonus);
		else if (strcmp(k, "caps") == 0)
			RulesCaps(v, r);
		else if (strcmp(k, "pending_days") == 0)
			r->pending_days = RulesInteger(v, "$.pending_days", 0, 3650, "a whole number of days, 0 to 3650");
		else if (strcmp(k, "min_amount") == 0)
			r->min_amount = RulesNumber(v, "$.min_amount", 0, "an amount of at least 0");
		else if (strcmp(k, "expiry") == 0)
		{
			RulesExpiry(v);
			r->has_expiry = true;
		}
		else
			RulesUnknown("$", k, "base, exclude, multipliers, bonuses, caps, pending_days, min_amount, expiry");
	}

	/*
	 * Only a daily cap and a campaign's budget carry state from one purchase
	 * to the next: without them a purchase's breakdown can be computed again
	 * from its row (AccrualRebuilt).
	 */
	r->replayable = r->cap_day < 0;
	for (int i = 0; i < r->nbonus; i++)
		if (r->bonus[i].campaign != NULL && r->bonus[i].budget >= 0)
			r->replayable = false;
	MemoryContextSwitchTo(old);
	return r;
}

/* ---- the per-backend cache ---- */

static void AccrualResetCache(void);

/*
 * Called where the cache is filled from the tables: under a transaction
 * snapshot, what is loaded now must not outlive this transaction.
 */
void
AccrualCacheLoading(void)
{
	if (IsolationUsesXactSnapshot())
		AccrualXactLoaded = MyProc->lxid;
}

/* Take in invalidations; drop the cache if stale or loaded by an earlier transaction's snapshot. */
static void
AccrualCheckCache(void)
{
	AcceptInvalidationMessages();
	if (AccrualStale || AccrualCache == NULL ||
		(AccrualXactLoaded != InvalidLocalTransactionId && AccrualXactLoaded != MyProc->lxid))
		AccrualResetCache();
}

static void
AccrualRelcacheCallback(Datum arg, Oid relid)
{
	/* only mark: a batch in progress keeps using what it holds */
	if (relid == InvalidOid || relid == AccrualRulesRelid || AccrualRulesRelid == InvalidOid)
		AccrualStale = true;
}

int			loyalty_accrual_chunk = 50000;

void
AccrualInit(void)
{
	DefineCustomIntVariable("loyalty.accrual_chunk",
							"Rows of a statement the accrual trigger posts at a time.",
							"A bigger chunk means fewer, larger posting statements and more memory.",
							&loyalty_accrual_chunk,
							50000, 1, 10000000,
							PGC_USERSET, 0,
							NULL, NULL, NULL);
	CacheRegisterRelcacheCallback(AccrualRelcacheCallback, (Datum) 0);
}

static void
AccrualResetCache(void)
{
	HASHCTL		ctl;

	/*
	 * A statement in progress may hold rules, a program or an attachment of
	 * the cache dropped now (one that waited for the rules' lock, or ran a
	 * refund that read the program again, after another session's change):
	 * what was cached is freed at the end of the transaction, not now.
	 */
	if (AccrualCacheCxt != NULL && IsTransactionState())
	{
		MemoryContextSetParent(AccrualCacheCxt, TopTransactionContext);
		AccrualCacheCxt = NULL;
	}
	if (AccrualCacheCxt == NULL)
		AccrualCacheCxt = AllocSetContextCreate(CacheMemoryContext, "loyalty accrual rules",
												ALLOCSET_DEFAULT_SIZES);
	else
		MemoryContextReset(AccrualCacheCxt);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(AccrualProgramRules);
	ctl.hcxt = AccrualCacheCxt;
	AccrualCache = hash_create("loyalty accrual rules", 16, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	AccrualSources = NULL;		/* freed with the context */
	AccrualRulesRelid = get_relname_relid("earning_rule", get_namespace_oid("loyalty", false));
	AccrualStale = false;
	AccrualXactLoaded = InvalidLocalTransactionId;
}

static bool
AccrualCondUses(const AccrualCond *c, bool birthday)
{
	return birthday ? c->birthday_month >= 0 : c->first_purchase >= 0;
}

/* Whether a version's conditions use birthday_month (or, false, first_purchase). */
bool
AccrualVersionUses(const AccrualRules *r, bool birthday)
{
	for (int i = 0; i < r->nmult; i++)
		if (AccrualCondUses(&r->mult[i].when, birthday))
			return true;
	for (int i = 0; i < r->nbonus; i++)
		if (AccrualCondUses(&r->bonus[i].when, birthday))
			return true;
	return false;
}

static void
AccrualFlags(AccrualProgramRules *pr, AccrualRules *r)
{
	for (int i = 0; i < r->nmult; i++)
	{
		pr->uses_first |= AccrualCondUses(&r->mult[i].when, false);
		pr->uses_birthday |= AccrualCondUses(&r->mult[i].when, true);
	}
	for (int i = 0; i < r->nbonus; i++)
	{
		pr->uses_first |= AccrualCondUses(&r->bonus[i].when, false);
		pr->uses_birthday |= AccrualCondUses(&r->bonus[i].when, true);
		pr->uses_campaign |= r->bonus[i].campaign != NULL;
	}
	pr->uses_day_cap |= r->cap_day >= 0;
}

/*
 * A program already read by AccrualLoadProgram, by id or (id 0) by code;
 * NULL when it must be read.
 */
AccrualProgramRules *
AccrualFindProgram(int64 program_id, const char *code)
{
	HASH_SEQ_STATUS seq;
	AccrualProgramRules *pr;

	AccrualCheckCache();
	if (code == NULL)
	{
		pr = hash_search(AccrualCache, &program_id, HASH_FIND, NULL);
		return pr != NULL && pr->has_program ? pr : NULL;
	}
	hash_seq_init(&seq, AccrualCache);
	while ((pr = hash_seq_search(&seq)) != NULL)
		if (pr->has_program && strcmp(pr->code, code) == 0)
		{
			hash_seq_term(&seq);
			return pr;
		}
	return NULL;
}

/*
 * The cached attachments of application tables (entries of entrysize bytes
 * keyed by the table's Oid), dropped with the rules.
 */
HTAB *
AccrualSourceCache(Size entrysize)
{
	HASHCTL		ctl;

	AccrualCheckCache();
	if (AccrualSources != NULL)
		return AccrualSources;
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(Oid);
	ctl.entrysize = entrysize;
	ctl.hcxt = AccrualCacheCxt;
	AccrualSources = hash_create("loyalty accrual sources", 16, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	return AccrualSources;
}

/* Where cached programs keep what they hold. */
MemoryContext
AccrualCacheMemory(void)
{
	Assert(AccrualCacheCxt != NULL);
	return AccrualCacheCxt;
}

/* A program's compiled rule versions (the caller is connected to SPI). */
AccrualProgramRules *
AccrualProgram(int64 program_id)
{
	static const Oid argtypes[] = {INT8OID};
	Datum		arg = Int64GetDatum(program_id);
	AccrualProgramRules *pr;
	bool		found;

	/*
	 * A version committed since this transaction took its locks is visible to
	 * this statement (READ COMMITTED): take in pending invalidations now.
	 */
	AccrualCheckCache();
	pr = hash_search(AccrualCache, &program_id, HASH_ENTER, &found);
	if (found)
		return pr;
	AccrualCacheLoading();

	pr->nversions = 0;
	pr->versions = NULL;
	pr->uses_first = pr->uses_birthday = pr->uses_day_cap = pr->uses_campaign = false;
	pr->has_program = false;
	PG_TRY();
	{
		bool		latest = !IsolationUsesXactSnapshot();

		LedgerPrepare(&plan_versions,
					  "SELECT version, effective_from, rules FROM loyalty.earning_rule"
					  " WHERE program_id = $1 ORDER BY effective_from, version",
					  1, argtypes);

		/*
		 * Under READ COMMITTED, the versions committed by now, not those of
		 * the statement's snapshot: a posting that waited for
		 * set_earning_rules (AccrualLockRules) uses what it set.
		 */
		if (latest)
			PushActiveSnapshot(GetLatestSnapshot());
		if (SPI_execute_plan(plan_versions, &arg, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "reading earning rules failed");
		if (latest)
			PopActiveSnapshot();
		pr->versions = MemoryContextAlloc(AccrualCacheCxt, sizeof(AccrualRules) * Max(SPI_processed, 1));
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;
			AccrualRules *r = AccrualCompile(DatumGetJsonbP(SPI_getbinval(tup, desc, 3, &isnull)),
											 AccrualCacheCxt);

			r->version = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
			r->effective_from = DatumGetTimestampTz(SPI_getbinval(tup, desc, 2, &isnull));
			pr->versions[pr->nversions++] = *r;
			AccrualFlags(pr, r);
		}
	}
	PG_CATCH();
	{
		hash_search(AccrualCache, &program_id, HASH_REMOVE, NULL);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return pr;
}

/*
 * The lock on a program's rules: every posting holds it in ROW EXCLUSIVE
 * mode until its transaction ends, taken before it reads the rules (the
 * modes are the table locks', so postings do not wait for one another);
 * set_earning_rules takes it in SHARE mode when it must change purchases
 * already posted (the program's first daily cap marks them). So that change waits for the
 * postings in progress, which it then sees, and the postings that come
 * after it wait for its commit and read what it set. A lock tag of the
 * object kind, loyalty.earning_rule's and the program's: two programs
 * whose ids agree in their low 48 bits share it, which costs a wait, not
 * a mistake.
 */
void
AccrualLockRules(int64 program_id, LOCKMODE mode)
{
	AccrualCheckCache();		/* sets the table's Oid, found again if it was dropped */
	LockDatabaseObject(AccrualRulesRelid, (Oid) (uint32) program_id,
					   (int32) (uint16) ((uint64) program_id >> 32), mode);
}

/* _lock_rules(program_id): set_earning_rules' SHARE lock on the rules (AccrualLockRules) */
Datum
accrual_lock_rules(PG_FUNCTION_ARGS)
{
	AccrualLockRules(PG_GETARG_INT64(0), ShareLock);
	PG_RETURN_VOID();
}

/* The version in force at a moment, or NULL. */
AccrualRules *
AccrualRulesAt(AccrualProgramRules *pr, TimestampTz at)
{
	AccrualRules *found = NULL;

	for (int i = 0; i < pr->nversions && pr->versions[i].effective_from <= at; i++)
		found = &pr->versions[i];
	return found;
}

/* ---- evaluation ---- */

/*
 * An amount as the rules see it: the double nearest the numeric's exact
 * value, which is what numeric_float8_no_overflow() gives by printing the
 * numeric and reading the text back (1,200 instructions a purchase). A
 * numeric in the short on-disk format (numeric.c: a 16-bit header of sign,
 * display scale and weight, then base-10000 digits) whose digits make an
 * integer M of at most 2^53 is M * 10000^e: for e >= 0 an integer, exact
 * while below 2^53; for -5 <= e < 0, M divided by 10^(-4e) <= 10^20, both
 * exact doubles, and IEEE division rounds to the nearest, as strtod() does
 * (Clinger's fast path). Anything else takes the long way.
 * loyalty._amount_double() exposes it to the tests, which compare it with
 * numeric's own cast.
 */
double
AccrualAmount(Datum value)
{
	struct varlena *v = pg_detoast_datum_packed((struct varlena *) DatumGetPointer(value));
	const uint16 *p = (const uint16 *) VARDATA_ANY(v);
	int			ndigits = (int) (VARSIZE_ANY_EXHDR(v) / sizeof(uint16)) - 1;

	if (VARSIZE_ANY_EXHDR(v) >= sizeof(uint16) && (p[0] & 0xC000) == 0x8000 && ndigits <= 4)
	{
		uint16		header = p[0];
		int			weight = (header & 0x0040) ? (int) (header | ~0x003F) : (int) (header & 0x003F);
		int64		m = 0;
		int			e;
		double		d;

		for (int i = 1; i <= ndigits; i++)
			m = m * 10000 + p[i];
		e = weight - ndigits + 1;
		if (ndigits == 0)
			return 0;
		if (m <= (INT64CONST(1) << 53))
		{
			if (e >= 0)
			{
				/* an integer: exact while at most 2^53 */
				for (; e > 0 && m <= (INT64CONST(1) << 53) / 10000; e--)
					m *= 10000;
				if (e == 0)
					return (header & 0x2000) ? -(double) m : (double) m;
			}
			else if (e >= -5)
			{
				static const double pow10000[] = {1.0, 1e4, 1e8, 1e12, 1e16, 1e20};

				d = (double) m / pow10000[-e];
				return (header & 0x2000) ? -d : d;
			}
		}
	}
	return DatumGetFloat8(DirectFunctionCall1(numeric_float8_no_overflow, value));
}

/* _amount_double(numeric): AccrualAmount, for the tests */
Datum
accrual_amount_double(PG_FUNCTION_ARGS)
{
	PG_RETURN_FLOAT8(AccrualAmount(PG_GETARG_DATUM(0)));
}

/* The ISO weekday (1 = Monday) of a date. */
static int
AccrualIsoWeekday(DateADT day)
{
	int			weekday = j2day(day + POSTGRES_EPOCH_JDATE);

	return weekday == 0 ? 7 : weekday;
}

/* Whether two broken-down times fall on the same date. */
static bool
AccrualSameDate(const struct pg_tm *a, const struct pg_tm *b)
{
	return a->tm_mday == b->tm_mday && a->tm_mon == b->tm_mon && a->tm_year == b->tm_year;
}

static void
AccrualLocalDate(TimestampTz t, pg_tz *tz, struct pg_tm *tm, fsec_t *fsec)
{
	int			tzoff;

	if (timestamp2tm(t, &tzoff, tm, fsec, NULL, tz) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
}

/*
 * The local date of t in tz: its ISO weekday, the day, the month. Purchases
 * of a statement mostly fall on a few days: the last date is kept with a
 * span of time around t that lies within it (its local day less three hours
 * at either end, for the time zone's offset changes of the day, and checked
 * at both ends), and a time within that span takes it without converting.
 */
void
AccrualLocalTime(TimestampTz t, pg_tz *tz, int *weekday, DateADT *day, int *month)
{
	static pg_tz *last_tz = NULL;
	static TimestampTz last_lo = 0,
				last_hi = 0;
	static int	last_weekday,
				last_month;
	static DateADT last_day;
	struct pg_tm tm;
	fsec_t		fsec;

	if (tz != last_tz || t < last_lo || t >= last_hi)
	{
		TimestampTz start;
		TimestampTz lo;
		TimestampTz hi;
		struct pg_tm edge;
		fsec_t		efsec;

		AccrualLocalDate(t, tz, &tm, &fsec);
		last_day = date2j(tm.tm_year, tm.tm_mon, tm.tm_mday) - POSTGRES_EPOCH_JDATE;
		last_weekday = AccrualIsoWeekday(last_day);
		last_month = tm.tm_mon;
		last_tz = tz;
		start = t - (((int64) tm.tm_hour * 60 + tm.tm_min) * 60 + tm.tm_sec) * USECS_PER_SEC - fsec;
		lo = Min(t, start + 3 * USECS_PER_HOUR);
		hi = Max(t + 1, start + 21 * USECS_PER_HOUR);
		last_lo = last_hi = t;	/* nothing kept should a check below fail */
		AccrualLocalDate(lo, tz, &edge, &efsec);
		if (!AccrualSameDate(&edge, &tm))
			lo = t;
		AccrualLocalDate(hi - 1, tz, &edge, &efsec);
		if (!AccrualSameDate(&edge, &tm))
			hi = t + 1;
		last_lo = lo;
		last_hi = hi;
	}
	*weekday = last_weekday;
	*day = last_day;
	*month = last_month;
}

static bool
AccrualIn(const char *value, int n, char **list)
{
	if (value == NULL)
		return false;
	for (int i = 0; i < n; i++)
		if (strcmp(value, list[i]) == 0)
			return true;
	return false;
}

static bool
AccrualMatches(const AccrualCond *c, const AccrualInput *in)
{
	return (c->ncategory == 0 || AccrualIn(in->category, c->ncategory, c->category)) &&
		(c->nchannel == 0 || AccrualIn(in->channel, c->nchannel, c->channel)) &&
		(c->nstore == 0 || AccrualIn(in->store, c->nstore, c->store)) &&
		(c->ntier == 0 || AccrualIn(in->tier, c->ntier, c->tier)) &&
		(c->weekdays == 0 || (c->weekdays & (1 << in->weekday)) != 0) &&
		(c->first_purchase < 0 || c->first_purchase == (int) in->first_purchase) &&
		(c->birthday_month < 0 || c->birthday_month == (int) in->birthday_month);
}

static bool
AccrualExcluded(const AccrualCond *c, const AccrualInput *in)
{
	return AccrualIn(in->category, c->ncategory, c->category) ||
		AccrualIn(in->channel, c->nchannel, c->channel) ||
		AccrualIn(in->store, c->nstore, c->store) ||
		AccrualIn(in->tier, c->ntier, c->tier);
}

/*
 * A number as JSON: at most 6 decimals, no trailing zeros.  The breakdown is
 * stored as json text without being parsed again, so it must always be valid:
 * a non-finite value (never posted: rounding refuses it) is written as null.
 */
static void
AccrualNumber(StringInfo buf, double d)
{
	char		s[400];
	int			len;
	double		micro;

	if (buf == NULL)
		return;
	if (!isfinite(d))
	{
		appendStringInfoString(buf, "null");
		return;
	}

	/*
	 * What "%.6f" prints, without snprintf (2,700 instructions a number, 4 %
	 * of a bulk insert): the value in millionths, rounded, when the rounding
	 * cannot differ from the exact value's. No double is exactly halfway
	 * between two millionths, and below 1e12 millionths the product is
	 * within 2^-12 of the exact one, so any product further than 1e-3 from
	 * a half rounds the same way; the rest goes through snprintf. (Checked
	 * against snprintf over 20 million values when this was written.)
	 */
	micro = d * 1e6;
	if (fabs(d) < 1e6 && fabs(micro - floor(micro) - 0.5) > 1e-3)
	{
		int64		r = llround(micro);
		char	   *p = s;

		if (r < 0)
		{
			*p++ = '-';
			r = -r;
		}
		p += pg_lltoa(r / 1000000, p);
		if (r % 1000000 != 0)
		{
			int64		frac = r % 1000000;
			int			n = 6;

			*p++ = '.';
			for (int i = 5; i >= 0; i--, frac /= 10)
				p[i] = '0' + frac % 10;
			while (p[n - 1] == '0')
				n--;
			p += n;
		}
		*p = '\0';				/* a negative r is at least a millionth: never "-0" */
		appendStringInfoString(buf, s);
		return;
	}
	snprintf(s, sizeof(s), "%.6f", d);
	len = strlen(s);
	while (len > 0 && s[len - 1] == '0')
		len--;
	if (len > 0 && s[len - 1] == '.')
		len--;
	s[len] = '\0';
	if (strcmp(s, "-0") == 0)
		strcpy(s, "0");
	appendStringInfoString(buf, s);
}

static void
AccrualString(StringInfo buf, const char *s)
{
	if (s == NULL)
		appendStringInfoString(buf, "null");
	else
		escape_json(buf, s);
}

static int64
AccrualRound(double v, int rounding)
{
	/* snap to 6 decimals first, so 0.1 * 3 is 0.3 and floors to 0, not 0.29999 */
	v = round(v * 1e6) / 1e6;
	if (rounding == 0)
		v = floor(v);
	else if (rounding == 1)
		v = floor(v + 0.5);
	else
		v = ceil(v);
	if (v >= 9.2e18)
		PointsOutOfRange();
	return (int64) v;
}

static AccrualBudget *
AccrualFindBudget(AccrualState *st, const char *campaign)
{
	for (int i = 0; i < st->nbudgets; i++)
		if (strcmp(st->budgets[i].campaign, campaign) == 0)
			return &st->budgets[i];
	return NULL;
}

static void
AccrualContext(StringInfo b, const AccrualInput *in)
{
	if (b == NULL)
		return;
	appendStringInfo(b, "{\"context\": {\"weekday\": %d", in->weekday);
	if (in->tier != NULL)
	{
		appendStringInfoString(b, ", \"tier\": ");
		AccrualString(b, in->tier);
	}
	if (in->first_purchase)
		appendStringInfoString(b, ", \"first_purchase\": true");
	if (in->birthday_month)
		appendStringInfoString(b, ", \"birthday_month\": true");
	appendStringInfoChar(b, '}');
}

/*
 * The opening of a list of the breakdown (", \"key\": [") before its first
 * item, the separator before the others: an empty list is left out.
 */
static void
AccrualItemStart(StringInfo b, const char *key, bool *first)
{
	if (b == NULL)
		return;
	if (*first)
		appendStringInfo(b, ", \"%s\": [", key);
	else
		appendStringInfoString(b, ", ");
	*first = false;
}

static void
AccrualListEnd(StringInfo b, bool first)
{
	if (b != NULL && !first)
		appendStringInfoChar(b, ']');
}

static void
AccrualTraced(AccrualState *st, int i, int64 points)
{
	if (st->trace == NULL)
		return;
	st->trace->applied[i]++;
	st->trace->points[i] += points;
}

/* One applied factor in the breakdown's "multipliers" list. */
static void
AccrualFactorItem(StringInfo b, bool *first, const AccrualItem *it)
{
	if (b == NULL)
		return;
	AccrualItemStart(b, "multipliers", first);
	appendStringInfo(b, "{\"rule\": \"%s\", \"factor\": ", it->path);
	AccrualNumber(b, it->factor);
	appendStringInfoChar(b, '}');
}

/* Factors: multipliers, then factor bonuses; all multiply. */
static double
AccrualFactors(const AccrualRules *r, const AccrualInput *in, AccrualState *st, StringInfo b)
{
	double		factor = 1;
	bool		first = true;

	for (int i = 0; i < r->nmult; i++)
		if (AccrualMatches(&r->mult[i].when, in))
		{
			factor *= r->mult[i].factor;
			AccrualTraced(st, i, 0);
			AccrualFactorItem(b, &first, &r->mult[i]);
		}
	for (int i = 0; i < r->nbonus; i++)
		if (r->bonus[i].is_factor)
			if (AccrualMatches(&r->bonus[i].when, in))
			{
				factor *= r->bonus[i].factor;
				AccrualTraced(st, r->nmult + i, 0);
				AccrualFactorItem(b, &first, &r->bonus[i]);
			}
	AccrualListEnd(b, first);
	if (factor != 1 && b != NULL)
	{
		appendStringInfoString(b, ", \"factor\": ");
		AccrualNumber(b, factor);
	}
	return factor;
}

/* One points bonus or campaign in the breakdown's "bonuses" list. */
static void
AccrualBonusItem(StringInfo b, bool *first, const AccrualItem *it, int64 grant)
{
	if (b == NULL)
		return;
	AccrualItemStart(b, "bonuses", first);
	appendStringInfo(b, "{\"rule\": \"%s\", ", it->path);
	if (it->campaign != NULL)
	{
		appendStringInfoString(b, "\"campaign\": ");
		AccrualString(b, it->campaign);
		appendStringInfoString(b, ", ");
		if (grant < it->points)
			appendStringInfo(b, "\"budget_cut\": " INT64_FORMAT ", ", it->points - grant);
	}
	appendStringInfo(b, "\"points\": " INT64_FORMAT "}", grant);
}

/* Points bonuses and campaigns, added after rounding. */
static int64
AccrualBonuses(const AccrualRules *r, const AccrualInput *in, AccrualState *st, StringInfo b)
{
	int64		total = 0;
	bool		first = true;

	for (int i = 0; i < r->nbonus; i++)
	{
		const AccrualItem *it = &r->bonus[i];
		int64		grant = it->points;

		if (it->is_factor || !AccrualMatches(&it->when, in))
			continue;
		if (it->campaign != NULL)
		{
			AccrualBudget *bud = AccrualFindBudget(st, it->campaign);

			if (in->day < it->from || in->day > it->to)
				continue;
			if (it->budget >= 0 && bud != NULL)
				grant = Max(0, Min(grant, it->budget - bud->used - bud->added));
			if (bud != NULL)
				bud->added += grant;
		}
		AccrualBonusItem(b, &first, it, grant);
		total = PointsAdd(total, grant);
		/* a campaign whose budget is spent is listed (budget_cut), not applied */
		if (it->campaign == NULL || grant > 0)
			AccrualTraced(st, r->nmult + i, grant);
	}
	AccrualListEnd(b, first);
	return total;
}

static int64
AccrualCaps(const AccrualRules *r, int64 total, AccrualState *st, StringInfo b)
{
	bool		first = true;

	if (r->cap_purchase >= 0 && total > r->cap_purchase)
	{
		AccrualItemStart(b, "caps", &first);
		if (b != NULL)
			appendStringInfo(b, "{\"cap\": \"per_purchase\", \"limit\": " INT64_FORMAT ", \"cut\": " INT64_FORMAT "}",
							 r->cap_purchase, total - r->cap_purchase);
		AccrualTraced(st, TRACE_CAP_PURCHASE(r), total - r->cap_purchase);
		total = r->cap_purchase;
	}
	if (r->cap_day >= 0 && st->day_used + total > r->cap_day)
	{
		int64		allowed = Max(0, r->cap_day - st->day_used);

		AccrualItemStart(b, "caps", &first);
		if (b != NULL)
			appendStringInfo(b, "{\"cap\": \"per_member_per_day\", \"limit\": " INT64_FORMAT
							 ", \"earlier_that_day\": " INT64_FORMAT ", \"cut\": " INT64_FORMAT "}",
							 r->cap_day, st->day_used, total - allowed);
		AccrualTraced(st, TRACE_CAP_DAY(r), total - allowed);
		total = allowed;
	}
	AccrualListEnd(b, first);
	st->day_used += total;
	return total;
}

/*
 * The points one purchase earns, with the breakdown as a JSON object in b:
 * base = amount / per * points; every matching multiplier and factor bonus
 * multiplies it; the product is rounded once; points bonuses and campaigns
 * (within their budget) are added; then the per-purchase cap, then the
 * per-member-per-day cap.
 *
 * The breakdown (b NULL: none) is stored with a purchase only when it
 * cannot be computed again from the purchase's row (AccrualRebuilt), and
 * then holds only what the purchase's own columns, its rule version and
 * defaults cannot say: no rule version, points or pending_until (the row has
 * them), no rounding (the version has it), no rounded product (the points
 * less the bonuses plus what the caps cut), no empty list, no factor of 1,
 * no tier that is NULL and no flag that is false. loyalty._accrual_breakdown()
 * gives the whole document back (docs/accrual.md, "Posting").
 */
int64
AccrualEvaluate(const AccrualRules *r, const AccrualInput *in, AccrualState *st, StringInfo b)
{
	double		base;
	double		factor;
	int64		rounded;
	int64		total;

	AccrualContext(b, in);
	if (in->amount < r->min_amount)
	{
		if (b != NULL)
		{
			appendStringInfoString(b, ", \"below_min_amount\": ");
			AccrualNumber(b, r->min_amount);
			appendStringInfoChar(b, '}');
		}
		AccrualTraced(st, TRACE_NOTHING(r), 0);
		return 0;
	}
	if (r->has_exclude && AccrualExcluded(&r->exclude, in))
	{
		if (b != NULL)
			appendStringInfoString(b, ", \"excluded\": true}");
		AccrualTraced(st, TRACE_NOTHING(r), 0);
		return 0;
	}
	base = in->amount / r->per * r->points;
	if (b != NULL)
	{
		appendStringInfoString(b, ", \"base\": ");
		AccrualNumber(b, base);
	}
	factor = AccrualFactors(r, in, st, b);
	rounded = AccrualRound(base * factor, r->rounding);
	total = PointsAdd(rounded, AccrualBonuses(r, in, st, b));
	total = AccrualCaps(r, total, st, b);
	if (b != NULL)
		appendStringInfoChar(b, '}');
	return total;
}

/*
 * Whether a purchase's breakdown can be left out of its row: its version
 * carries no state across purchases (replayable), and the member's state
 * at the purchase is the default one, which a computation from the row
 * alone assumes: no tier, not a first purchase, not in the birthday month.
 */
bool
AccrualRebuilt(const AccrualRules *r, const AccrualInput *in)
{
	return r->replayable && in->tier == NULL && !in->first_purchase && !in->birthday_month;
}

/*
 * Whether the points a version gives for amount are bound to stay countable
 * however its conditions match: the base times every factor above 1, plus
 * every points bonus, well inside a 64-bit count. An amount beyond it is
 * not a purchase but bad data: it is refused (22003), and from an attached
 * table quarantined, before anything is computed or counted.
 */
bool
AccrualInRange(const AccrualRules *r, double amount)
{
	double		bound = amount / r->per * r->points;

	for (int i = 0; i < r->nmult; i++)
		bound *= Max(r->mult[i].factor, 1.0);
	for (int i = 0; i < r->nbonus; i++)
	{
		bound *= Max(r->bonus[i].factor, 1.0);
		bound += (double) r->bonus[i].points;
	}
	return isfinite(bound) && bound < 4.0e18;
}

/* ---- SQL-callable ---- */

/* _check_rules(rules jsonb) */
Datum
accrual_check_rules(PG_FUNCTION_ARGS)
{
	AccrualCompile(PG_GETARG_JSONB_P(0), CurrentMemoryContext);
	PG_RETURN_VOID();
}

/*
 * _rebuilt_breakdown(program_id, rule_version, amount, day, category,
 * channel, store, points): the breakdown of a purchase posted without one
 * (AccrualRebuilt), computed again from its row as it was at the posting.
 * The version's document never changes, the amount is the numeric the
 * rules saw, and the local day gives the weekday and the campaigns' dates,
 * whatever the time zone's rules say since. A result that does not give
 * the row's points means the row was changed by hand: an error, not a
 * wrong explanation.
 */
Datum
accrual_rebuilt_breakdown(PG_FUNCTION_ARGS)
{
	int64		program_id = PG_GETARG_INT64(0);
	int32		version = PG_GETARG_INT32(1);
	int64		points = PG_GETARG_INT64(7);
	AccrualProgramRules *pr;
	AccrualRules *r = NULL;
	AccrualInput in;
	AccrualState st;
	StringInfoData b;
	int64		total;

	memset(&in, 0, sizeof(in));
	in.amount = AccrualAmount(PG_GETARG_DATUM(2));
	in.day = PG_GETARG_DATEADT(3);
	in.weekday = AccrualIsoWeekday(in.day);
	in.category = PG_ARGISNULL(4) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(4));
	in.channel = PG_ARGISNULL(5) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(5));
	in.store = PG_ARGISNULL(6) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(6));

	SPI_connect();
	pr = AccrualProgram(program_id);
	for (int i = 0; i < pr->nversions; i++)
		if (pr->versions[i].version == version)
			r = &pr->versions[i];
	if (r == NULL || !r->replayable)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("the breakdown of a purchase under rule version %d of program %lld cannot be computed again",
						version, (long long) program_id),
				 errdetail(r == NULL ? "The program has no such version."
						   : "The version has a daily cap or a campaign budget, so its purchases keep their breakdown.")));
	memset(&st, 0, sizeof(st));
	initStringInfo(&b);
	total = AccrualEvaluate(r, &in, &st, &b);
	SPI_finish();
	if (total != points)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("the purchase's rule version gives " INT64_FORMAT " points, not the " INT64_FORMAT " it has",
						total, points),
				 errdetail("Its breakdown was left out at the posting because its row alone gives it; the row has been changed since.")));
	PG_RETURN_TEXT_P(cstring_to_text_with_len(b.data, b.len));
}

/*
 * _accrual_cache_trigger(): statement trigger on the tables the cache is
 * made of (program, accrual_source): every backend drops it.
 */
Datum
accrual_cache_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "_accrual_cache_trigger() must be called as a trigger");
	DirectFunctionCall1(accrual_rules_changed, (Datum) 0);
	return PointerGetDatum(NULL);
}

/* _rules_changed(): every backend drops its compiled rules at its next transaction */
Datum
accrual_rules_changed(PG_FUNCTION_ARGS)
{
	Oid			nsp = get_namespace_oid("loyalty", false);
	Oid			rel = get_relname_relid("earning_rule", nsp);

	if (!OidIsValid(rel))
		elog(ERROR, "loyalty.earning_rule does not exist");
	CacheInvalidateRelcacheByRelid(rel);
	PG_RETURN_VOID();
}
