/*
 * chain.h: the per-account hash chain of the journal
 */
#ifndef LOYALTY_CHAIN_H
#define LOYALTY_CHAIN_H

#include "datatype/timestamp.h"

#define CHAIN_HASH_LEN 32		/* SHA-256 */

/* The canonical content of a transfer, as hashed. */
typedef struct ChainContent
{
	int64		program_id;
	int64		debit_account;
	int64		credit_account;
	int64		amount;
	const char *kind;
	const char *ref;
	TimestampTz occurred_at;
	TimestampTz posted_at;
	bool		has_rule_version;
	int32		rule_version;
	const char *actor;
	const char *reason;			/* NULL for none */
	const uint8 *debit_prev;	/* NULL when the debit side is not a member or has no transfer yet */
	int			debit_prev_len;
	const uint8 *credit_prev;
	int			credit_prev_len;
} ChainContent;

extern void ChainHash(const ChainContent *content, uint8 *out);
extern Datum ChainHashBytea(const uint8 *hash);

#endif
