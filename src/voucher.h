/*
 * voucher.h: voucher codes (random, unambiguous, with a check character)
 */
#ifndef LOYALTY_VOUCHER_H
#define LOYALTY_VOUCHER_H

#define VOUCHER_RANDOM_CHARS	15	/* 75 bits from pg_strong_random */
#define VOUCHER_CHARS			(VOUCHER_RANDOM_CHARS + 1)	/* and a check character */
#define VOUCHER_GROUP			4	/* shown as XXXX-XXXX-XXXX-XXXX */

extern char VoucherCheckChar(const char *digits, int n);

#endif
