/*
 * accrual_fast.c: one purchase posted without SQL (a one-row INSERT into an
 * attached table, or accrue())
 *
 * Most sales arrive one per transaction. The general path reads the
 * transition table (or accrue()'s arguments) with a query joined to members
 * and earlier purchases, then locks the member account with another; for
 * one row those two statements cost more than the sale's own insert. Here
 * the row is taken from the transition table directly (or from the
 * arguments), the member, its account and, when the rules need it, its
 * contact row are found through their unique indexes, and the account is
 * locked with the table AM (FOR UPDATE, following the update chain under
 * READ COMMITTED; a serialization failure under REPEATABLE READ, as a
 * locking query would raise). Then the same compute and write as every
 * batch (AccrualPostLocked).
 *
 * Anything unusual — a column type the path does not read, a missing or
 * inactive member, an empty or overlong ref, no rules in force, a NULL or
 * negative amount — returns false before anything is written or locked but
 * the account, and the general path takes the row (it quarantines, enrols
 * or replays exactly as for any statement). So does a ref posted before:
 * the purchase's own insert finds it (or a look-up before computing, when
 * a debt or a campaign budget is involved), and nothing is written.
 */
#include "postgres.h"

#include <math.h>

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/tuptable.h"
#include "mb/pg_wchar.h"
#include "storage/bufmgr.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/datum.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "accrual.h"
#include "accrual_post.h"
#include "ledger.h"
#include "ledger_write.h"

/* The value of a column of the application's row, if its type is one read here. */
static bool
FastColumn(TupleTableSlot *slot, const char *name, Oid want, Datum *value, bool *isnull)
{
	TupleDesc	desc = slot->tts_tupleDescriptor;

	*isnull = true;
	*value = (Datum) 0;
	if (name == NULL)
		return true;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		Oid			type;

		if (att->attisdropped || strcmp(NameStr(att->attname), name) != 0)
			continue;
		type = att->atttypid == VARCHAROID ? TEXTOID : att->atttypid;
		if (type != want)
			return false;
		*value = slot_getattr(slot, i + 1, isnull);
		return true;
	}
	return false;
}

static char *
FastText(Datum v, bool isnull)
{
	return isnull ? NULL : TextDatumGetCString(v);
}

/* A column of a loyalty table's row by name. */
static Datum
FastAttr(Relation rel, TupleTableSlot *slot, const char *name, bool *isnull)
{
	return slot_getattr(slot, LedgerAttnum(rel, name), isnull);
}

/* Lock the member account row FOR UPDATE; its latest version is left in slot. */
static void
FastLock(Relation rel, TupleTableSlot *slot, Snapshot snap)
{
	ItemPointerData tid = slot->tts_tid;
	TM_FailureData tmfd;
	TM_Result	res;
	bool		xact_snapshot = IsolationUsesXactSnapshot();

	res = table_tuple_lock(rel, &tid, snap, slot, GetCurrentCommandId(false), LockTupleExclusive,
						   LockWaitBlock, xact_snapshot ? 0 : TUPLE_LOCK_FLAG_FIND_LAST_VERSION, &tmfd);
	if (res == TM_Ok)
		return;
	if ((res == TM_Updated || res == TM_Deleted) && xact_snapshot)
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to concurrent update")));
	elog(ERROR, "could not lock member account: table AM result %d", (int) res);
}

/*
 * The month of the member's birthday (from its contact row, through the
 * primary key), or 0 when it is not known: only for rules that use
 * birthday_month, as the general path's read query joins the contact only
 * for them.
 */
static int
FastBirthMonth(int64 member_id, Snapshot snap)
{
	Relation	contact = LedgerOpenTable("member_contact", AccessShareLock);
	TupleTableSlot *cs = table_slot_create(contact, NULL);
	Datum		key = Int64GetDatum(member_id);
	int			month = 0;

	if (LedgerIndexFetch(contact, "member_contact_pkey", 1, &key, snap, cs))
	{
		bool		isnull;
		Datum		d = FastAttr(contact, cs, "birthday", &isnull);

		if (!isnull && !DATE_NOT_FINITE(DatumGetDateADT(d)))
		{
			int			y,
						m,
						day;

			j2date(DatumGetDateADT(d) + POSTGRES_EPOCH_JDATE, &y, &m, &day);
			month = m;
		}
	}
	ExecDropSingleTupleTableSlot(cs);
	table_close(contact, NoLock);
	return month;
}

/*
 * Post the one row of an INSERT statement's transition table, if nothing
 * about it needs the general path (see the top of this file). cols: the
 * attachment's ref, member, amount, occurred_at, category, channel and
 * store columns (NULL: none).
 */
bool
AccrualFastInsert(AccrualBatch *b, TriggerData *trig, const char *const *cols)
{
	static const Oid want[7] = {TEXTOID, TEXTOID, NUMERICOID, TIMESTAMPTZOID, TEXTOID, TEXTOID, TEXTOID};
	TupleTableSlot *in;
	Datum		v[7];
	bool		n[7];
	AccrualRow *r;
	bool		ok;

	if (tuplestore_tuple_count(trig->tg_newtable) != 1)
		return false;
	in = MakeSingleTupleTableSlot(RelationGetDescr(trig->tg_relation), &TTSOpsMinimalTuple);
	/* a read pointer of our own, as a scan of the transition table takes */
	tuplestore_select_read_pointer(trig->tg_newtable,
								   tuplestore_alloc_read_pointer(trig->tg_newtable, EXEC_FLAG_REWIND));
	tuplestore_rescan(trig->tg_newtable);
	ok = tuplestore_gettupleslot(trig->tg_newtable, true, true, in);
	for (int c = 0; c < 7 && ok; c++)
		ok = FastColumn(in, cols[c], want[c], &v[c], &n[c]);
	ok = ok && !n[0] && !n[1] && !n[2];
	r = palloc0(sizeof(AccrualRow));
	if (ok)
	{
		/* copies: the slot goes before anything else can fail */
		r->ref = TextDatumGetCString(v[0]);
		r->member_ref = TextDatumGetCString(v[1]);
		r->amount = datumCopy(v[2], false, -1);
		r->occurred_unset = n[3];
		r->occurred_at = n[3] ? GetCurrentTransactionStartTimestamp() : DatumGetTimestampTz(v[3]);
		r->category = FastText(v[4], n[4]);
		r->channel = FastText(v[5], n[5]);
		r->store = FastText(v[6], n[6]);
	}
	ExecDropSingleTupleTableSlot(in);
	if (!ok)
		return false;
	r->attrs_null = true;
	return AccrualFastPost(b, r);
}

/*
 * Post one purchase (r: ref, member_ref, amount, occurred_at, category,
 * channel, store and attrs set) if nothing about it needs the general path:
 * an INSERT of one row into an attached table, or accrue(). Returns whether
 * it was posted; when not, nothing was written and the caller's general
 * path takes it.
 */
bool
AccrualFastPost(AccrualBatch *b, AccrualRow *r)
{
	Relation	member;
	Relation	account;
	Relation	accrual;
	TupleTableSlot *ms;
	TupleTableSlot *as;
	TupleTableSlot *xs;
	Snapshot	snap;
	Datum		keys[2];
	Datum		d;
	bool		isnull;
	bool		ok = false;

	if (r->occurred_at < b->earliest)
		return false;
	r->amount_d = AccrualAmount(r->amount);
	r->whole_null = true;
	/* never raise for the application's row: an odd one is the general path's */
	if (r->amount_d < 0 || isnan(r->amount_d) || isinf(r->amount_d) || TIMESTAMP_NOT_FINITE(r->occurred_at) ||
		r->ref[0] == '\0' || LedgerLongerThan(r->ref, 200) ||
		(r->rules = AccrualRulesAt(b->rules, r->occurred_at)) == NULL ||
		!AccrualInRange(r->rules, r->amount_d))
		return false;

	/*
	 * Make what this transaction wrote so far visible to the look-ups and
	 * the lock below, and this posting's writes a command of their own: a
	 * statement calling accrue() for many rows (no SQL runs between the
	 * calls on this path) must see each call's balance update in the next.
	 */
	CommandCounterIncrement();
	snap = RegisterSnapshot(GetTransactionSnapshot());
	/*
	 * The locks the writers take next (one entry each in the lock table,
	 * rather than a weaker one first and a second when writing).
	 */
	member = LedgerOpenTable("member", AccessShareLock);
	account = LedgerOpenTable("account", RowExclusiveLock);
	accrual = LedgerOpenTable("accrual", RowExclusiveLock);
	ms = table_slot_create(member, NULL);
	as = table_slot_create(account, NULL);
	xs = table_slot_create(accrual, NULL);

	keys[0] = Int64GetDatum(b->program_id);
	keys[1] = CStringGetTextDatum(r->member_ref);
	if (LedgerIndexFetch(member, "member_program_id_member_ref_key", 2, keys, snap, ms) &&
		strcmp(TextDatumGetCString(FastAttr(member, ms, "status", &isnull)), "active") == 0)
	{
		r->member_id = DatumGetInt64(FastAttr(member, ms, "id", &isnull));
		d = FastAttr(member, ms, "tier", &isnull);
		r->tier = FastText(d, isnull);
		keys[0] = Int64GetDatum(r->member_id);
		ok = LedgerIndexFetch(account, "account_member_id_key", 1, keys, snap, as);
		if (ok && b->rules->uses_birthday)
			r->birth_month = FastBirthMonth(r->member_id, snap);
	}
	if (ok)
	{
		Datum		head;

		FastLock(account, as, snap);
		r->account_id = DatumGetInt64(FastAttr(account, as, "id", &isnull));
		b->nrows = 1;
		b->rows = r;
		b->naccounts = 1;
		b->accounts = palloc(sizeof(int64));
		b->accounts[0] = r->account_id;
		b->heads = AccrualHeadTable(1);
		{
			bool		dnull;
			Datum		day = FastAttr(account, as, "deferred_day", &dnull);
			bool		rnull;
			Datum		last_ref = FastAttr(account, as, "last_purchase_ref", &rnull);

			head = FastAttr(account, as, "last_hash", &isnull);
			AccrualAddHead(b, r->account_id, head, isnull, &as->tts_tid, day, dnull, last_ref, rnull);
		}
		keys[0] = Int64GetDatum(r->account_id);

		/*
		 * A member who never owed (account.owes, set with every debt a
		 * refund records, in the refund's transaction, which holds this
		 * row's lock until it ends: the version locked here has it) has no
		 * debt to recover, and the debt table is not touched.
		 */
		if (!DatumGetBool(FastAttr(account, as, "owes", &isnull)))
			b->has_debts = false;
		else
		{
			/*
			 * Under READ COMMITTED, probe with a snapshot taken after the
			 * lock: a refund the lock waited for may have recorded a debt
			 * since snap was taken, and this purchase must repay it. (The
			 * flag already says the table has a row: no size check.)
			 */
			Relation	debt = LedgerOpenTable("accrual_debt", AccessShareLock);
			TupleTableSlot *ds = table_slot_create(debt, NULL);
			Snapshot	after = IsolationUsesXactSnapshot() ? snap : RegisterSnapshot(GetLatestSnapshot());

			b->has_debts = LedgerIndexFetch(debt, "accrual_debt_open_idx", 1, keys, after, ds);
			if (after != snap)
				UnregisterSnapshot(after);
			ExecDropSingleTupleTableSlot(ds);
			table_close(debt, NoLock);
		}

		/*
		 * A ref posted before is the general path's (a replay, or 23505).
		 * The purchase's own insert finds it too, and hands the row back;
		 * looking first matters only where computing a replay leaves a
		 * trace: a debt it would start recovering, a campaign budget.
		 */
		if (b->has_debts || b->rules->uses_campaign)
		{
			keys[0] = Int64GetDatum(b->program_id);
			keys[1] = CStringGetTextDatum(r->ref);
			ok = !LedgerIndexFetch(accrual, "accrual_pkey", 2, keys, snap, xs);
		}
	}
	ExecDropSingleTupleTableSlot(ms);
	ExecDropSingleTupleTableSlot(as);
	ExecDropSingleTupleTableSlot(xs);
	table_close(member, NoLock);
	table_close(account, NoLock);
	table_close(accrual, NoLock);
	UnregisterSnapshot(snap);
	if (!ok)
		return false;
	AccrualPostLocked(b);

	/*
	 * A concurrent transaction posted the same ref meanwhile (for another
	 * member: this one's account was locked): nothing was written, and the
	 * general path tells a repeat from a different purchase (quarantined).
	 */
	return b->ninserted > 0;
}
