/*
 * chain.c: SHA-256 over a transfer's canonical content
 *
 * Each member account's transfers form a chain: a transfer records the hash
 * of the previous transfer of each member account it touches, and its own
 * hash covers its content and those previous hashes. The content is
 * serialised unambiguously: integers as 8 big-endian bytes, texts and hashes
 * as a 4-byte length (-1 for NULL) and their bytes.
 */
#include "postgres.h"

#include "common/cryptohash.h"
#include "fmgr.h"
#include "port/pg_bswap.h"
#include "utils/builtins.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "chain.h"
#include "points.h"

PG_FUNCTION_INFO_V1(transfer_hash);
PG_FUNCTION_INFO_V1(chain_step);

/*
 * The content is fed to SHA-256 through a buffer on the stack, flushed when
 * full: the same bytes in the same order as one update, without building
 * them in palloc'd memory first.
 */
typedef struct ChainFeed
{
	pg_cryptohash_ctx *ctx;
	int			len;
	uint8		data[256];
} ChainFeed;

static void
ChainFlush(ChainFeed *f)
{
	if (f->len > 0 && pg_cryptohash_update(f->ctx, f->data, f->len) < 0)
		elog(ERROR, "could not compute SHA-256: %s", pg_cryptohash_error(f->ctx));
	f->len = 0;
}

static void
ChainPut(ChainFeed *f, const void *data, size_t len)
{
	if (f->len + len > sizeof(f->data))
	{
		ChainFlush(f);
		if (len > sizeof(f->data))
		{
			if (pg_cryptohash_update(f->ctx, data, len) < 0)
				elog(ERROR, "could not compute SHA-256: %s", pg_cryptohash_error(f->ctx));
			return;
		}
	}
	memcpy(f->data + f->len, data, len);
	f->len += len;
}

static void
ChainPutInt64(ChainFeed *f, int64 value)
{
	uint64		n = pg_hton64((uint64) value);

	ChainPut(f, &n, sizeof(n));
}

static void
ChainPutBytes(ChainFeed *f, const void *data, int len)
{
	uint32		n = pg_hton32((uint32) (data == NULL ? -1 : len));

	ChainPut(f, &n, sizeof(n));
	if (data != NULL)
		ChainPut(f, data, len);
}

static void
ChainPutText(ChainFeed *f, const char *text)
{
	ChainPutBytes(f, text, text == NULL ? 0 : strlen(text));
}

/*
 * The backend's SHA-256 context, made once and initialised again for each
 * hash (a bulk statement hashes a million transfers). It belongs to a
 * resource owner of its own that lives as long as the backend, so that no
 * transaction's end frees it; an error between init and final leaves it to
 * the next init.
 */
static pg_cryptohash_ctx *
ChainContext(void)
{
	static pg_cryptohash_ctx *ctx = NULL;

	if (ctx == NULL)
	{
		static ResourceOwner owner = NULL;
		ResourceOwner saved = CurrentResourceOwner;

		if (owner == NULL)
			owner = ResourceOwnerCreate(NULL, "loyalty hash chain");
		CurrentResourceOwner = owner;
		PG_TRY();
		{
			ctx = pg_cryptohash_create(PG_SHA256);
		}
		PG_FINALLY();
		{
			CurrentResourceOwner = saved;
		}
		PG_END_TRY();
	}
	return ctx;
}

void
ChainHash(const ChainContent *c, uint8 *out)
{
	ChainFeed	f;

	f.ctx = ChainContext();
	f.len = 0;
	if (pg_cryptohash_init(f.ctx) < 0)
		elog(ERROR, "could not compute SHA-256: %s", pg_cryptohash_error(f.ctx));
	ChainPutInt64(&f, c->program_id);
	ChainPutInt64(&f, c->debit_account);
	ChainPutInt64(&f, c->credit_account);
	ChainPutInt64(&f, c->amount);
	ChainPutText(&f, c->kind);
	ChainPutText(&f, c->ref);
	ChainPutInt64(&f, c->occurred_at);
	ChainPutInt64(&f, c->posted_at);
	ChainPutInt64(&f, c->has_rule_version ? c->rule_version : PG_INT64_MIN);
	ChainPutText(&f, c->actor);
	ChainPutText(&f, c->reason);
	ChainPutBytes(&f, c->debit_prev, c->debit_prev_len);
	ChainPutBytes(&f, c->credit_prev, c->credit_prev_len);
	ChainFlush(&f);
	if (pg_cryptohash_final(f.ctx, out, CHAIN_HASH_LEN) < 0)
		elog(ERROR, "could not compute SHA-256: %s", pg_cryptohash_error(f.ctx));
}

static const char *
ChainTextArg(FunctionCallInfo fcinfo, int n)
{
	return PG_ARGISNULL(n) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(n));
}

static void
ChainReadContent(FunctionCallInfo fcinfo, int first, ChainContent *c)
{
	memset(c, 0, sizeof(*c));
	c->program_id = PG_GETARG_INT64(first + 0);
	c->debit_account = PG_GETARG_INT64(first + 1);
	c->credit_account = PG_GETARG_INT64(first + 2);
	c->amount = PG_GETARG_POINTS(first + 3);
	c->kind = ChainTextArg(fcinfo, first + 4);
	c->ref = ChainTextArg(fcinfo, first + 5);
	c->occurred_at = PG_GETARG_TIMESTAMPTZ(first + 6);
	c->posted_at = PG_GETARG_TIMESTAMPTZ(first + 7);
	c->has_rule_version = !PG_ARGISNULL(first + 8);
	c->rule_version = c->has_rule_version ? PG_GETARG_INT32(first + 8) : 0;
	c->actor = ChainTextArg(fcinfo, first + 9);
	c->reason = ChainTextArg(fcinfo, first + 10);
}

static bool
ChainRequiredNull(FunctionCallInfo fcinfo, int first)
{
	static const int required[] = {0, 1, 2, 3, 4, 5, 6, 7, 9};

	for (int i = 0; i < lengthof(required); i++)
		if (PG_ARGISNULL(first + required[i]))
			return true;
	return false;
}

/* A hash as the bytea the journal stores (transfer.hash, the prev hashes, account.last_hash). */
Datum
ChainHashBytea(const uint8 *hash)
{
	bytea	   *result = palloc(VARHDRSZ + CHAIN_HASH_LEN);

	SET_VARSIZE(result, VARHDRSZ + CHAIN_HASH_LEN);
	memcpy(VARDATA(result), hash, CHAIN_HASH_LEN);
	return PointerGetDatum(result);
}

static bytea *
ChainHashDatum(const ChainContent *c)
{
	bytea	   *result = palloc(VARHDRSZ + CHAIN_HASH_LEN);

	SET_VARSIZE(result, VARHDRSZ + CHAIN_HASH_LEN);
	ChainHash(c, (uint8 *) VARDATA(result));
	return result;
}

/*
 * chain_step(state, head, credit_side, program_id, debit, credit, amount,
 *            kind, ref, occurred_at, posted_at, rule_version, actor, reason)
 *
 * Transition function of the window aggregate loyalty.chain(...), with
 * which set-based postings compute a member account's chain in one pass:
 *
 *   loyalty.chain(a.last_hash, true, t.program_id, ...)
 *       OVER (PARTITION BY account ORDER BY t.id)
 *
 * is each transfer's hash; the first row chains onto head (the account's
 * last_hash), each later one onto the row before. credit_side says whether
 * the member is the credit (true) or the debit (false) side of every row.
 */
Datum
chain_step(PG_FUNCTION_ARGS)
{
	ChainContent c;
	bytea	   *prev = NULL;

	if (!AggCheckCallContext(fcinfo, NULL))
		elog(ERROR, "chain_step called in non-aggregate context");
	if (PG_ARGISNULL(2) || ChainRequiredNull(fcinfo, 3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("a transfer to chain has a null required field")));
	if (!PG_ARGISNULL(0))
		prev = PG_GETARG_BYTEA_PP(0);
	else if (!PG_ARGISNULL(1))
		prev = PG_GETARG_BYTEA_PP(1);

	ChainReadContent(fcinfo, 3, &c);
	if (prev != NULL && PG_GETARG_BOOL(2))
	{
		c.credit_prev = (uint8 *) VARDATA_ANY(prev);
		c.credit_prev_len = VARSIZE_ANY_EXHDR(prev);
	}
	else if (prev != NULL)
	{
		c.debit_prev = (uint8 *) VARDATA_ANY(prev);
		c.debit_prev_len = VARSIZE_ANY_EXHDR(prev);
	}
	PG_RETURN_BYTEA_P(ChainHashDatum(&c));
}

/*
 * transfer_hash(program_id, debit, credit, amount, kind, ref, occurred_at,
 *               posted_at, rule_version, actor, reason, debit_prev, credit_prev)
 *
 * The same hash as the posting routine computes, for verify_chain(). NULL
 * when a required part is NULL.
 */
Datum
transfer_hash(PG_FUNCTION_ARGS)
{
	ChainContent c;

	if (ChainRequiredNull(fcinfo, 0))
		PG_RETURN_NULL();
	ChainReadContent(fcinfo, 0, &c);
	if (!PG_ARGISNULL(11))
	{
		bytea	   *prev = PG_GETARG_BYTEA_PP(11);

		c.debit_prev = (uint8 *) VARDATA_ANY(prev);
		c.debit_prev_len = VARSIZE_ANY_EXHDR(prev);
	}
	if (!PG_ARGISNULL(12))
	{
		bytea	   *prev = PG_GETARG_BYTEA_PP(12);

		c.credit_prev = (uint8 *) VARDATA_ANY(prev);
		c.credit_prev_len = VARSIZE_ANY_EXHDR(prev);
	}

	PG_RETURN_BYTEA_P(ChainHashDatum(&c));
}
