/*
 * ledger.c: the posting routine, and the SQL functions that post for one
 * member (earn, adjust)
 *
 * One posting is one row of loyalty.transfer moving points from a debit to a
 * credit account. Only member accounts are locked and updated; the program's
 * system accounts (issuance, breakage, ...) are never touched on this path,
 * so two postings for two members never wait on each other. A posting that
 * touches two member accounts locks them in account-id order.
 *
 * All statements go through saved SPI plans; the whole write (the transfer,
 * the lots it consumes or creates, the member balances and chain heads) is
 * one statement, so a posting is three or four round trips into the
 * executor whatever its shape.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "accrual_post.h"
#include "chain.h"
#include "ledger.h"
#include "points.h"

PG_FUNCTION_INFO_V1(loyalty_earn);
PG_FUNCTION_INFO_V1(loyalty_adjust);
PG_FUNCTION_INFO_V1(loyalty_post_member);
PG_FUNCTION_INFO_V1(ledger_refuse_change);

char	   *loyalty_actor = NULL;

static SPIPlanPtr plan_resolve;
static SPIPlanPtr plan_lock;
static SPIPlanPtr plan_find;
static SPIPlanPtr plan_open_lots;
static SPIPlanPtr plan_post;
static SPIPlanPtr plan_label;
static SPIPlanPtr plan_named_lots;

/* The member side of a posting, as locked. */
typedef struct LedgerSide
{
	bool		has_prev;
	uint8		prev[CHAIN_HASH_LEN];
	int64		held;			/* points reserved by active holds */
	bool		rolling;		/* the program's expiry policy is rolling */
} LedgerSide;

/* The lots a posting consumes or restores, and what that does to balances. */
typedef struct LedgerUse
{
	int			n;
	Datum	   *lots;
	Datum	   *amounts;
	int64		account;		/* whose lots */
	int64		from_available; /* taken from (or given back to) available */
	int64		from_pending;
} LedgerUse;

void
LedgerInit(void)
{
	DefineCustomStringVariable("loyalty.actor",
							   "Who is posting, recorded on every transfer.",
							   "Applications that connect through one role can set it per "
							   "session or transaction (SET LOCAL loyalty.actor = 'cashier-12'); "
							   "when empty, the session user is recorded.",
							   &loyalty_actor,
							   "",
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);
}

SPIPlanPtr
LedgerPrepare(SPIPlanPtr *slot, const char *sql, int nargs, const Oid *argtypes)
{
	if (*slot == NULL)
	{
		/*
		 * A generic plan: these statements are short and their best plan
		 * does not depend on the values, so replanning each call (what the
		 * plan cache does when a custom plan looks cheaper) is pure cost.
		 */
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, (Oid *) argtypes,
											  CURSOR_OPT_GENERIC_PLAN);

		if (plan == NULL)
			elog(ERROR, "could not prepare \"%s\": %s", sql,
				 SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "could not keep the plan of \"%s\"", sql);
		*slot = plan;
	}
	return *slot;
}

/*
 * The search path of a C entry point that runs for every sale (the accrual
 * trigger, accrue()): loyalty, then pg_catalog, as every other SECURITY
 * DEFINER function of the extension pins with SET search_path, but without
 * the caller's temporary schema at all. Those two are SECURITY DEFINER
 * without the SET clause: fmgr applying it at every call, and the
 * application's next statement then recomputing its own path, cost a
 * one-row sale about 10,000 instructions, 4 % of what accrual adds
 * (callgrind, accrual_cpu). An override is pushed before anything runs,
 * so no name their SQL, casts or PL/pgSQL calls look up resolves in the
 * caller's path or temporary schema. The caller pops it
 * (PopOverrideSearchPath) on return; an error leaves it to the
 * (sub)transaction's abort, which drops overrides pushed at its level.
 */
static Oid	ledger_nsp = InvalidOid;	/* loyalty's, until a schema changes */

static void
LedgerNamespaceReset(Datum arg, int cacheid, uint32 hashvalue)
{
	ledger_nsp = InvalidOid;
}

void
LedgerPushSearchPath(void)
{
	static bool registered = false;
	OverrideSearchPath path;

	if (!registered)
	{
		CacheRegisterSyscacheCallback(NAMESPACEOID, LedgerNamespaceReset, (Datum) 0);
		registered = true;
	}
	if (!OidIsValid(ledger_nsp))
		ledger_nsp = get_namespace_oid("loyalty", false);
	memset(&path, 0, sizeof(path));
	path.schemas = list_make2_oid(ledger_nsp, PG_CATALOG_NAMESPACE);
	PushOverrideSearchPath(&path);
	list_free(path.schemas);
}

void
LedgerExpect(int got, int expected, const char *what)
{
	if (got != expected)
		elog(ERROR, "%s failed: %s", what, SPI_result_code_string(got));
}

static Datum
LedgerGet(int row, int col, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, isnull);
}

static int64
LedgerGetInt64(int row, int col)
{
	bool		isnull;
	Datum		d = LedgerGet(row, col, &isnull);

	return isnull ? 0 : DatumGetInt64(d);
}

/*
 * Resolve a program code and member_ref into the accounts a posting needs,
 * and when a lot credited at occurred_at would expire. Raises the precise
 * error for an unknown program, an unknown member or an inactive member.
 */
void
LedgerResolve(const char *program, const char *member_ref, const char *system_kind,
			  TimestampTz occurred_at, LedgerTarget *target)
{
	static const Oid argtypes[] = {TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID};
	Datum		args[4];
	bool		isnull;
	Datum		d;
	char	   *status;

	LedgerPrepare(&plan_resolve,
				  "SELECT p.id, m.id, m.status, a.id, s.id,"
				  "       loyalty._lot_expiry(p.options -> 'expiry', p.time_zone, $4)"
				  "  FROM loyalty.program p"
				  "  LEFT JOIN loyalty.member m ON m.program_id = p.id AND m.member_ref = $2"
				  "  LEFT JOIN loyalty.account a ON a.member_id = m.id"
				  "  LEFT JOIN loyalty.account s ON s.program_id = p.id AND s.kind <> 'member'"
				  "                             AND s.kind = $3 AND s.name = ''"
				  " WHERE p.code = $1",
				  4, argtypes);
	args[0] = CStringGetTextDatum(program);
	args[1] = CStringGetTextDatum(member_ref);
	args[2] = CStringGetTextDatum(system_kind);
	args[3] = TimestampTzGetDatum(occurred_at);
	LedgerExpect(SPI_execute_plan(plan_resolve, args, NULL, false, 1), SPI_OK_SELECT,
				 "resolving a member");

	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_UNKNOWN_PROGRAM),
				 errmsg("program \"%s\" does not exist", program),
				 errhint("Create it with loyalty.create_program().")));
	LedgerGet(0, 2, &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_UNKNOWN_MEMBER),
				 errmsg("member \"%s\" does not exist in program \"%s\"", member_ref, program),
				 errhint("Enrol the member with loyalty.enroll().")));
	status = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
	if (strcmp(status, "active") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_MEMBER_NOT_ACTIVE),
				 errmsg("member \"%s\" of program \"%s\" is %s", member_ref, program, status),
				 errdetail("Only active members' points can change.")));
	LedgerGet(0, 5, &isnull);
	if (isnull)
		elog(ERROR, "program \"%s\" has no %s account", program, system_kind);

	target->program_id = LedgerGetInt64(0, 1);
	target->member_account = LedgerGetInt64(0, 4);
	target->system_account = LedgerGetInt64(0, 5);
	d = LedgerGet(0, 6, &isnull);
	target->expires = !isnull;
	target->expires_at = isnull ? 0 : DatumGetTimestampTz(d);
}

/*
 * Write the deferred journal lines and lots of a member account, which the
 * caller has locked (loyalty._materialize, docs/accrual.md "Deferred
 * journal lines"). deferred: the caller's lock query saw the account's
 * deferred_day set; false asks the account.
 */
void
LedgerMaterialize(int64 account, bool deferred)
{
	static SPIPlanPtr plan_materialize;
	static SPIPlanPtr plan_materialize_if;
	static const Oid argtypes[] = {INT8OID};
	Datum		arg = Int64GetDatum(account);

	if (deferred)
	{
		LedgerPrepare(&plan_materialize, "SELECT loyalty._materialize(ARRAY[$1])", 1, argtypes);
		LedgerExpect(SPI_execute_plan(plan_materialize, &arg, NULL, false, 1), SPI_OK_SELECT,
					 "writing deferred journal lines");
		return;
	}
	LedgerPrepare(&plan_materialize_if,
				  "SELECT loyalty._materialize(ARRAY[a.id]) FROM loyalty.account a"
				  " WHERE a.id = $1 AND a.deferred_day IS NOT NULL",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_materialize_if, &arg, NULL, false, 1), SPI_OK_SELECT,
				 "writing deferred journal lines");
}

/*
 * Lock a member account and read the head of its chain, its held points and
 * whether its program's expiry is rolling (which the debit path needs).
 * Its deferred journal lines are written first: what follows chains onto
 * them, and a debit reads its lots.
 */
static void
LedgerLock(int64 account, LedgerSide *side)
{
	static const Oid argtypes[] = {INT8OID};
	Datum		arg = Int64GetDatum(account);
	bool		isnull;
	Datum		d;

	LedgerPrepare(&plan_lock,
				  "SELECT a.last_hash, a.held::bigint,"
				  "       p.options #>> '{expiry,policy}' IS NOT DISTINCT FROM 'rolling',"
				  "       a.deferred_day IS NOT NULL"
				  "  FROM loyalty.account a JOIN loyalty.program p ON p.id = a.program_id"
				  " WHERE a.id = $1 FOR UPDATE OF a",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_lock, &arg, NULL, false, 1), SPI_OK_SELECT,
				 "locking an account");
	if (SPI_processed != 1)
		elog(ERROR, "account " INT64_FORMAT " does not exist", account);
	if (DatumGetBool(LedgerGet(0, 4, &isnull)))
	{
		LedgerMaterialize(account, true);
		LedgerExpect(SPI_execute_plan(plan_lock, &arg, NULL, false, 1), SPI_OK_SELECT,
					 "locking an account");
		if (SPI_processed != 1 || DatumGetBool(LedgerGet(0, 4, &isnull)))
			elog(ERROR, "account " INT64_FORMAT " still has deferred journal lines", account);
	}
	d = LedgerGet(0, 1, &isnull);
	side->has_prev = !isnull;
	if (!isnull)
	{
		bytea	   *prev = DatumGetByteaPP(d);

		if (VARSIZE_ANY_EXHDR(prev) != CHAIN_HASH_LEN)
			elog(ERROR, "account " INT64_FORMAT " has a malformed last hash", account);
		memcpy(side->prev, VARDATA_ANY(prev), CHAIN_HASH_LEN);
	}
	side->held = LedgerGetInt64(0, 2);
	side->rolling = DatumGetBool(LedgerGet(0, 3, &isnull));
}

/* How an account is named in messages: the member_ref or the account kind. */
static char *
LedgerLabel(int64 account)
{
	static const Oid argtypes[] = {INT8OID};
	Datum		arg = Int64GetDatum(account);

	LedgerPrepare(&plan_label,
				  "SELECT coalesce('member \"' || m.member_ref || '\"',"
				  "                a.kind || ' account' || coalesce(' ' || nullif(a.name, ''), ''))"
				  "  FROM loyalty.account a LEFT JOIN loyalty.member m ON m.id = a.member_id"
				  " WHERE a.id = $1",
				  1, argtypes);
	LedgerExpect(SPI_execute_plan(plan_label, &arg, NULL, true, 1), SPI_OK_SELECT,
				 "naming an account");
	if (SPI_processed != 1)
		return psprintf("account " INT64_FORMAT, account);
	return SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
}

/*
 * The transfer already posted under the posting's (program, kind, ref), if
 * any. The same content returns its id; other content is a class-23 error
 * naming both.
 */
static bool
LedgerFindExisting(const LedgerPosting *p, int64 *id)
{
	static const Oid argtypes[] = {INT8OID, TEXTOID, TEXTOID};
	Datum		args[3];
	int64		debit,
				credit,
				amount;

	LedgerPrepare(&plan_find,
				  "SELECT id, debit_account_id, credit_account_id, amount::bigint"
				  "  FROM loyalty.transfer WHERE program_id = $1 AND kind = $2 AND ref = $3"
				  "   AND kind <> 'accrual'",	/* transfer_ref_key's predicate: the plan uses it */
				  3, argtypes);
	args[0] = Int64GetDatum(p->program_id);
	args[1] = CStringGetTextDatum(p->kind);
	args[2] = CStringGetTextDatum(p->ref);
	LedgerExpect(SPI_execute_plan(plan_find, args, NULL, false, 1), SPI_OK_SELECT,
				 "looking up a ref");
	if (SPI_processed == 0)
		return false;

	*id = LedgerGetInt64(0, 1);
	debit = LedgerGetInt64(0, 2);
	credit = LedgerGetInt64(0, 3);
	amount = LedgerGetInt64(0, 4);
	if (debit != p->debit_account || credit != p->credit_account || amount != p->amount)
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("ref \"%s\" was already used for a different %s", p->ref, p->kind),
				 errdetail("The first posting moved " INT64_FORMAT " points from %s to %s; "
						   "this one asks for " INT64_FORMAT " points from %s to %s.",
						   amount, LedgerLabel(debit), LedgerLabel(credit),
						   p->amount, LedgerLabel(p->debit_account), LedgerLabel(p->credit_account)),
				 errhint("Repeat a posting with exactly the same content, or give a new posting a new ref.")));
	return true;
}

/*
 * Choose the debit member's lots to consume, earliest expiry first, among
 * those available at the posting's business time. Refuses a debit beyond
 * what is available; nothing has been written yet when it does. Points
 * reserved by active holds (held) are not available.
 */
static void
LedgerChooseLots(const LedgerPosting *p, LedgerUse *use, const LedgerSide *debit)
{
	static const Oid argtypes[] = {INT8OID, TIMESTAMPTZOID, BOOLOID};
	Datum		args[3];
	int64		need = p->amount;
	int64		available = 0;
	uint64		i;

	/*
	 * A lot can give what it holds now, but a debit dated before a reversal
	 * that refilled it cannot spend the refilled points: at the debit's time
	 * they were not there yet. What the lot held at each moment from the
	 * debit's time on is its remaining plus the uses after that moment
	 * (reversals count negative); the lowest of those is what it can give.
	 * Only lots with a reversal after the debit's time can dip: for a debit
	 * dated now that is one probe of lot_use_account_idx finding nothing.
	 */
	LedgerPrepare(&plan_open_lots,
				  LEDGER_LOT_DIP("$1", "$2")
				  "SELECT l.id, (l.remaining::bigint + coalesce(a.dip, 0))::bigint, l.pending FROM loyalty.lot l"
				  "  LEFT JOIN after a ON a.lot_id = l.id"
				  " WHERE l.account_id = $1 AND l.remaining OPERATOR(loyalty.>) 0"
				  "   AND l.remaining::bigint + coalesce(a.dip, 0) > 0"
				  "   AND l.occurred_at <= $2 AND l.vests_at <= $2"
				  "   AND (l.expires_at IS NULL OR l.expires_at > $2)"
				  "   AND (NOT $3 OR $2 < loyalty._rolling_lapse($1, l.occurred_at, $2))"
				  " ORDER BY l.expires_at NULLS LAST, l.occurred_at, l.id"
				  " FOR UPDATE OF l",
				  3, argtypes);
	args[0] = Int64GetDatum(p->debit_account);
	args[1] = TimestampTzGetDatum(p->occurred_at);
	args[2] = BoolGetDatum(debit->rolling);
	LedgerExpect(SPI_execute_plan(plan_open_lots, args, NULL, false, 0), SPI_OK_SELECT,
				 "reading open lots");

	use->n = 0;
	use->account = p->debit_account;
	use->from_available = use->from_pending = 0;
	use->lots = palloc(sizeof(Datum) * Max(SPI_processed, 1));
	use->amounts = palloc(sizeof(Datum) * Max(SPI_processed, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		int64		remaining = LedgerGetInt64(i, 2);
		bool		isnull;
		bool		pending = DatumGetBool(LedgerGet(i, 3, &isnull));
		int64		take = Min(remaining, need);

		available = PointsAdd(available, remaining);
		if (take == 0)
			continue;
		use->lots[use->n] = Int64GetDatum(LedgerGetInt64(i, 1));
		use->amounts[use->n] = Int64GetDatum(take);
		use->n++;
		need -= take;
		if (pending)
			use->from_pending += take;
		else
			use->from_available += take;
	}
	if (need > 0 && debit->held == 0)
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_INSUFFICIENT_POINTS),
				 errmsg("insufficient points"),
				 errdetail("%s has " INT64_FORMAT " points available at %s; " INT64_FORMAT " are needed.",
						   p->debit_label, available, timestamptz_to_str(p->occurred_at), p->amount)));
	if (need > 0 || available - debit->held < p->amount)
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_INSUFFICIENT_POINTS),
				 errmsg("insufficient points"),
				 errdetail("%s has " INT64_FORMAT " points available at %s (" INT64_FORMAT " more are held); "
						   INT64_FORMAT " are needed.",
						   p->debit_label, Max(available - debit->held, 0), timestamptz_to_str(p->occurred_at),
						   debit->held, p->amount)));
}

/*
 * Explicit lots named by the caller: check each belongs to the right member
 * and can give (or take back) the amount, and tally the balance effects.
 */
static void
LedgerNamedLots(const LedgerPosting *p, LedgerUse *use)
{
	static const Oid argtypes[] = {INT8ARRAYOID};
	bool		restore = p->use_amounts[0] < 0;
	Datum	   *lots = palloc(sizeof(Datum) * p->nuses);
	Datum		arg;
	int64		total = 0;

	for (int i = 0; i < p->nuses; i++)
		lots[i] = Int64GetDatum(p->use_lots[i]);
	LedgerPrepare(&plan_named_lots,
				  "SELECT id, account_id, amount::bigint, remaining::bigint, pending"
				  "  FROM loyalty.lot WHERE id = ANY ($1) FOR UPDATE",
				  1, argtypes);
	arg = PointerGetDatum(construct_array(lots, p->nuses, INT8OID, 8, true, TYPALIGN_DOUBLE));
	LedgerExpect(SPI_execute_plan(plan_named_lots, &arg, NULL, false, 0), SPI_OK_SELECT,
				 "reading named lots");

	use->n = p->nuses;
	use->lots = lots;
	use->amounts = palloc(sizeof(Datum) * p->nuses);
	use->account = restore ? p->credit_account : p->debit_account;
	use->from_available = use->from_pending = 0;
	for (int i = 0; i < p->nuses; i++)
	{
		int64		take = p->use_amounts[i];
		bool		found = false;

		if ((take < 0) != restore || take == 0)
			elog(ERROR, "a posting cannot both consume and restore lots");
		for (uint64 r = 0; r < SPI_processed && !found; r++)
		{
			bool		isnull;

			if (LedgerGetInt64(r, 1) != p->use_lots[i])
				continue;
			found = true;
			if (LedgerGetInt64(r, 2) != use->account ||
				LedgerGetInt64(r, 4) < take ||
				LedgerGetInt64(r, 4) - take > LedgerGetInt64(r, 3))
				elog(ERROR, "lot " INT64_FORMAT " cannot give " INT64_FORMAT " points to transfer \"%s\"",
					 p->use_lots[i], take, p->ref);
			if (DatumGetBool(LedgerGet(r, 5, &isnull)))
				use->from_pending += take;
			else
				use->from_available += take;
		}
		if (!found)
			elog(ERROR, "lot " INT64_FORMAT " does not exist", p->use_lots[i]);
		use->amounts[i] = Int64GetDatum(take);
		total += take;
	}
	if (total != (restore ? -p->amount : p->amount))
		elog(ERROR, "the lots of transfer \"%s\" add up to " INT64_FORMAT ", not " INT64_FORMAT,
			 p->ref, total, p->amount);
}

/*
 * Who posts: the session user, and the person the application names in
 * loyalty.actor ("cashier-12 via app"), so that a shared login still says
 * who acted and the setting cannot hide which login did.
 */
const char *
LedgerActor(void)
{
	char	   *user = GetUserNameFromId(GetSessionUserId(), false);

	if (loyalty_actor != NULL && loyalty_actor[0] != '\0')
		return psprintf("%s via %s", loyalty_actor, user);
	return user;
}

/*
 * Post one transfer. Returns its id; *replayed (when not NULL) tells whether
 * an identical earlier posting was returned instead.
 */
int64
LedgerPost(const LedgerPosting *p, bool *replayed)
{
	static const Oid argtypes[] = {
		INT8OID, INT8OID, INT8OID, INT8OID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
		INT4OID, TEXTOID, TEXTOID, BYTEAOID, BYTEAOID, BYTEAOID, INT8ARRAYOID, INT8ARRAYOID,
		INT8OID, BOOLOID, TIMESTAMPTZOID, TIMESTAMPTZOID, INT8OID, INT8OID, INT8OID, INT8OID,
		BOOLOID, BOOLOID
	};
	Datum		args[lengthof(argtypes)];
	char		nulls[lengthof(argtypes)];
	LedgerSide	debit = {0},
				credit = {0};
	LedgerUse	use = {0};
	ChainContent c;
	uint8		hash[CHAIN_HASH_LEN];
	int64		id;
	bool		restore = p->nuses > 0 && p->use_amounts[0] < 0;
	bool		new_lot = p->credit_is_member && !restore;
	bool		credit_pending = new_lot && p->vests_at > p->occurred_at;
	int64		debit_avail = 0,
				debit_pend = 0,
				credit_avail = 0,
				credit_pend = 0;

	Assert(p->amount > 0);
	/* accrual transfers are idempotent through loyalty.accrual's key only */
	if (strcmp(p->kind, "accrual") == 0)
		elog(ERROR, "accrual transfers are posted by accrual, not by LedgerPost");
	if (replayed)
		*replayed = false;

	/* Lock the member sides, in account-id order. */
	if (p->debit_is_member && p->credit_is_member && p->credit_account < p->debit_account)
	{
		LedgerLock(p->credit_account, &credit);
		LedgerLock(p->debit_account, &debit);
	}
	else
	{
		if (p->debit_is_member)
			LedgerLock(p->debit_account, &debit);
		if (p->credit_is_member)
			LedgerLock(p->credit_account, &credit);
	}

	/* Under the lock, a repeat of a committed posting is seen. */
	if (LedgerFindExisting(p, &id))
	{
		if (replayed)
			*replayed = true;
		return id;
	}

	if (p->nuses > 0)
		LedgerNamedLots(p, &use);
	else if (p->debit_is_member)
		LedgerChooseLots(p, &use, &debit);

	if (restore)
	{
		credit_avail = -use.from_available;
		credit_pend = -use.from_pending;
	}
	else
	{
		debit_avail = -use.from_available;
		debit_pend = -use.from_pending;
		credit_avail = new_lot && !credit_pending ? p->amount : 0;
		credit_pend = credit_pending ? p->amount : 0;
	}

	memset(&c, 0, sizeof(c));
	c.program_id = p->program_id;
	c.debit_account = p->debit_account;
	c.credit_account = p->credit_account;
	c.amount = p->amount;
	c.kind = p->kind;
	c.ref = p->ref;
	c.occurred_at = p->occurred_at;
	c.posted_at = GetCurrentTransactionStartTimestamp();
	c.has_rule_version = p->rule_version != 0;
	c.rule_version = p->rule_version;
	c.actor = LedgerActor();
	c.reason = p->reason;
	if (debit.has_prev)
	{
		c.debit_prev = debit.prev;
		c.debit_prev_len = CHAIN_HASH_LEN;
	}
	if (credit.has_prev)
	{
		c.credit_prev = credit.prev;
		c.credit_prev_len = CHAIN_HASH_LEN;
	}
	ChainHash(&c, hash);

	LedgerPrepare(&plan_post,
				  "WITH t AS ("
				  "  INSERT INTO loyalty.transfer (program_id, debit_account_id, credit_account_id,"
				  "         amount, kind, ref, occurred_at, posted_at, rule_version, actor, reason,"
				  "         debit_prev_hash, credit_prev_hash, hash)"
				  "  VALUES ($1, $2, $3, $4::loyalty.points, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
				  "  ON CONFLICT (program_id, kind, ref) WHERE kind <> 'accrual' DO NOTHING"
				  "  RETURNING id),"
				  " u AS ("
				  "  INSERT INTO loyalty.lot_use (transfer_id, lot_id, account_id, amount, occurred_at)"
				  "  SELECT t.id, x.lot, $17, x.amt::loyalty.points, $7"
				  "    FROM t, unnest($15, $16) AS x(lot, amt)),"
				  " l AS ("
				  "  UPDATE loyalty.lot SET remaining = (lot.remaining::bigint - x.amt)::loyalty.points"
				  "    FROM t, unnest($15, $16) AS x(lot, amt) WHERE lot.id = x.lot),"
				  " n AS ("
				  "  INSERT INTO loyalty.lot (id, account_id, transfer_id, amount, remaining, occurred_at,"
				  "         vests_at, expires_at, pending)"
				  "  SELECT t.id, $3, t.id, $4::loyalty.points, $4::loyalty.points, $7, $19, $20, $19 > $7"
				  "    FROM t WHERE $18),"
				  " d AS ("
				  "  UPDATE loyalty.account a"
				  "     SET available = (a.available::bigint + $21)::loyalty.points,"
				  "         pending = (a.pending::bigint + $22)::loyalty.points,"
				  "         last_hash = $14, last_transfer_id = t.id"
				  "    FROM t WHERE a.id = $2 AND $25),"
				  " c AS ("
				  "  UPDATE loyalty.account a"
				  "     SET available = (a.available::bigint + $23)::loyalty.points,"
				  "         pending = (a.pending::bigint + $24)::loyalty.points,"
				  "         last_hash = $14, last_transfer_id = t.id"
				  "    FROM t WHERE a.id = $3 AND $26)"
				  "SELECT id FROM t",
				  lengthof(argtypes), argtypes);

	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int64GetDatum(p->program_id);
	args[1] = Int64GetDatum(p->debit_account);
	args[2] = Int64GetDatum(p->credit_account);
	args[3] = Int64GetDatum(p->amount);
	args[4] = CStringGetTextDatum(p->kind);
	args[5] = CStringGetTextDatum(p->ref);
	args[6] = TimestampTzGetDatum(p->occurred_at);
	args[7] = TimestampTzGetDatum(c.posted_at);
	args[8] = Int32GetDatum(p->rule_version);
	nulls[8] = p->rule_version != 0 ? ' ' : 'n';
	args[9] = CStringGetTextDatum(c.actor);
	args[10] = p->reason ? CStringGetTextDatum(p->reason) : (Datum) 0;
	nulls[10] = p->reason ? ' ' : 'n';
	args[11] = debit.has_prev ? ChainHashBytea(debit.prev) : (Datum) 0;
	nulls[11] = debit.has_prev ? ' ' : 'n';
	args[12] = credit.has_prev ? ChainHashBytea(credit.prev) : (Datum) 0;
	nulls[12] = credit.has_prev ? ' ' : 'n';
	args[13] = ChainHashBytea(hash);
	args[14] = PointerGetDatum(construct_array(use.lots, use.n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	args[15] = PointerGetDatum(construct_array(use.amounts, use.n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	args[16] = Int64GetDatum(use.n > 0 ? use.account : p->debit_account);
	args[17] = BoolGetDatum(new_lot);
	args[18] = TimestampTzGetDatum(p->credit_is_member ? p->vests_at : p->occurred_at);
	args[19] = TimestampTzGetDatum(p->expires_at);
	nulls[19] = p->credit_is_member && p->expires ? ' ' : 'n';
	args[20] = Int64GetDatum(debit_avail);
	args[21] = Int64GetDatum(debit_pend);
	args[22] = Int64GetDatum(credit_avail);
	args[23] = Int64GetDatum(credit_pend);
	args[24] = BoolGetDatum(p->debit_is_member);
	args[25] = BoolGetDatum(p->credit_is_member);

	LedgerExpect(SPI_execute_plan(plan_post, args, nulls, false, 0), SPI_OK_SELECT,
				 "posting a transfer");
	if (SPI_processed == 1)
	{
		id = LedgerGetInt64(0, 1);

		/*
		 * Points credited to a member who owes refund debt repay it at once,
		 * as a purchase's do (docs/accrual.md, "shortfall"): an earn, an
		 * upward adjust, points transferred in, a cancelled redemption.
		 */
		if (p->credit_is_member)
			AccrualRecoverIfOwed(p->credit_account);
		return id;
	}

	/*
	 * The same ref was committed concurrently by a posting that did not hold
	 * our lock (another member): compare with it. Nothing of ours was
	 * written, since every part of the statement hangs on the insert.
	 */
	if (!LedgerFindExisting(p, &id))
		elog(ERROR, "ref \"%s\" conflicted but no transfer holds it", p->ref);
	if (replayed)
		*replayed = true;
	return id;
}

/* ---- SQL-callable functions ---- */

/* A required text argument of a SQL-callable function, or 22004. */
char *
LedgerTextArg(FunctionCallInfo fcinfo, int n, const char *name)
{
	if (PG_ARGISNULL(n))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
	return text_to_cstring(PG_GETARG_TEXT_PP(n));
}

static int64
LedgerInt64Arg(FunctionCallInfo fcinfo, int n, const char *name)
{
	if (PG_ARGISNULL(n))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
	return PG_GETARG_INT64(n);	/* points are int64 too */
}

static TimestampTz
LedgerTimeArg(FunctionCallInfo fcinfo, int n)
{
	TimestampTz t;

	if (PG_ARGISNULL(n))
		return GetCurrentTransactionStartTimestamp();
	t = PG_GETARG_TIMESTAMPTZ(n);
	if (TIMESTAMP_NOT_FINITE(t))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("occurred_at must be a finite time")));
	return t;
}

static void
LedgerCheckRef(const char *ref)
{
	if (ref[0] == '\0' || LedgerLongerThan(ref, 200))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid ref \"%s\"", ref),
				 errdetail("A ref is the caller's key for the posting (an order id, a request id), 1 to 200 characters.")));
}

/*
 * Post delta points between a member and one of the program's system
 * accounts: a positive delta credits the member (a new lot under the
 * program's expiry policy), a negative one debits it.
 */
static int64
LedgerPostMember(const char *program, const char *member_ref, const char *system_kind,
				 int64 delta, const char *kind, const char *ref, const char *reason,
				 TimestampTz occurred_at, TimestampTz vests_at)
{
	LedgerTarget t;
	LedgerPosting p;
	char	   *member_label = psprintf("member \"%s\"", member_ref);
	char	   *system_label = psprintf("%s account", system_kind);
	int64		id;

	LedgerCheckRef(ref);
	if (delta == PG_INT64_MIN)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("points out of range")));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	LedgerResolve(program, member_ref, system_kind, occurred_at, &t);

	memset(&p, 0, sizeof(p));
	p.program_id = t.program_id;
	p.kind = kind;
	p.ref = ref;
	p.occurred_at = occurred_at;
	p.reason = reason;
	if (delta > 0)
	{
		p.debit_account = t.system_account;
		p.debit_label = system_label;
		p.credit_account = t.member_account;
		p.credit_label = member_label;
		p.credit_is_member = true;
		p.amount = delta;
		p.vests_at = Max(vests_at, occurred_at);
		p.expires = t.expires;
		p.expires_at = t.expires_at;
	}
	else
	{
		p.debit_account = t.member_account;
		p.debit_label = member_label;
		p.debit_is_member = true;
		p.credit_account = t.system_account;
		p.credit_label = system_label;
		p.amount = -delta;
	}
	id = LedgerPost(&p, NULL);
	SPI_finish();
	return id;
}

/* earn(program, member_ref, points, ref, reason, occurred_at) */
Datum
loyalty_earn(PG_FUNCTION_ARGS)
{
	char	   *program = LedgerTextArg(fcinfo, 0, "program");
	char	   *member_ref = LedgerTextArg(fcinfo, 1, "member_ref");
	int64		points = LedgerInt64Arg(fcinfo, 2, "points");
	char	   *ref = LedgerTextArg(fcinfo, 3, "ref");
	char	   *reason = PG_ARGISNULL(4) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(4));

	if (points <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("points to earn must be positive"),
				 errdetail("Got " INT64_FORMAT ".", points),
				 errhint("Take points back with loyalty.adjust().")));

	PG_RETURN_INT64(LedgerPostMember(program, member_ref, "issuance", points, "earn", ref,
									 reason, LedgerTimeArg(fcinfo, 5), 0));
}

/* adjust(program, member_ref, delta, ref, reason, occurred_at) */
Datum
loyalty_adjust(PG_FUNCTION_ARGS)
{
	char	   *program = LedgerTextArg(fcinfo, 0, "program");
	char	   *member_ref = LedgerTextArg(fcinfo, 1, "member_ref");
	int64		delta = LedgerInt64Arg(fcinfo, 2, "delta");
	char	   *ref = LedgerTextArg(fcinfo, 3, "ref");
	char	   *reason = PG_ARGISNULL(4) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(4));

	if (delta == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("an adjustment must change the balance"),
				 errdetail("Got a delta of 0.")));
	if (reason == NULL || reason[strspn(reason, " \t\r\n")] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("an adjustment needs a reason"),
				 errhint("Say why, for the member's statement and the audit: adjust(..., reason => 'missing receipt 1234').")));

	PG_RETURN_INT64(LedgerPostMember(program, member_ref, "adjustment", delta, "adjust", ref,
									 reason, LedgerTimeArg(fcinfo, 5), 0));
}

/* _post_member(program, member_ref, system_kind, delta, kind, ref, reason, occurred_at, vests_at) */
Datum
loyalty_post_member(PG_FUNCTION_ARGS)
{
	char	   *program = LedgerTextArg(fcinfo, 0, "program");
	char	   *member_ref = LedgerTextArg(fcinfo, 1, "member_ref");
	char	   *system_kind = LedgerTextArg(fcinfo, 2, "system_kind");
	int64		delta;
	char	   *kind = LedgerTextArg(fcinfo, 4, "kind");
	char	   *ref = LedgerTextArg(fcinfo, 5, "ref");
	char	   *reason = PG_ARGISNULL(6) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(6));

	if (PG_ARGISNULL(3) || PG_GETARG_INT64(3) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("delta must be a non-zero number of points")));
	delta = PG_GETARG_INT64(3);
	PG_RETURN_INT64(LedgerPostMember(program, member_ref, system_kind, delta, kind, ref, reason,
									 LedgerTimeArg(fcinfo, 7),
									 PG_ARGISNULL(8) ? 0 : PG_GETARG_TIMESTAMPTZ(8)));
}

/* Trigger: the journal is append-only, for its owner too. */
Datum
ledger_refuse_change(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	const char *what;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "refuse_change() must be called as a trigger");
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
		what = "UPDATE";
	else if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
		what = "DELETE";
	else
		what = "TRUNCATE";
	ereport(ERROR,
			(errcode(ERRCODE_LOYALTY_APPEND_ONLY),
			 errmsg("%s on %s is not allowed: the ledger is append-only", what,
					RelationGetRelationName(trigdata->tg_relation)),
			 errhint("Correct a posting with a new, reversing posting (loyalty.adjust()).")));
	PG_RETURN_NULL();
}
