/*
 * voucher.c: voucher codes
 *
 * A code is 15 characters of Crockford's base32 alphabet (digits and upper
 * case letters without I, L, O and U, so nothing reads as something else)
 * drawn from pg_strong_random, 75 bits, and a check character computed with
 * the Luhn mod 32 algorithm, which catches every single mistyped character
 * and every swap of two adjacent different characters. It is shown in groups
 * of four: 7KQ2-M9XD-4RTB-HN6C. Input is forgiving the way Crockford
 * intends: case, spaces and dashes are ignored, I and L read as 1, O as 0.
 * A code that fails its check is rejected before any table is read.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"

#include "redemption.h"
#include "voucher.h"

PG_FUNCTION_INFO_V1(loyalty_voucher_code);
PG_FUNCTION_INFO_V1(loyalty_voucher_normalize);

static const char VoucherAlphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/* The value of one (already upper-cased) character, or -1. */
static int
VoucherValue(char c)
{
	const char *at;

	if (c == 'I' || c == 'L')
		c = '1';
	else if (c == 'O')
		c = '0';
	if (c == '\0')
		return -1;
	at = strchr(VoucherAlphabet, c);
	return at ? (int) (at - VoucherAlphabet) : -1;
}

/* Luhn mod 32 over n characters: the sum with the doubling pattern. */
static int
VoucherLuhnSum(const char *digits, int n, int factor)
{
	int			sum = 0;

	for (int i = n - 1; i >= 0; i--)
	{
		int			addend = factor * VoucherValue(digits[i]);

		factor = factor == 2 ? 1 : 2;
		sum += addend / 32 + addend % 32;
	}
	return sum;
}

/* The check character of n characters of the alphabet. */
char
VoucherCheckChar(const char *digits, int n)
{
	int			sum = VoucherLuhnSum(digits, n, 2);

	return VoucherAlphabet[(32 - sum % 32) % 32];
}

/* Group VOUCHER_CHARS characters as XXXX-XXXX-XXXX-XXXX. */
static text *
VoucherFormat(const char *chars)
{
	char		out[VOUCHER_CHARS + VOUCHER_CHARS / VOUCHER_GROUP + 1];
	int			o = 0;

	for (int i = 0; i < VOUCHER_CHARS; i++)
	{
		if (i > 0 && i % VOUCHER_GROUP == 0)
			out[o++] = '-';
		out[o++] = chars[i];
	}
	out[o] = '\0';
	return cstring_to_text(out);
}

/* _voucher_code() RETURNS text: a new random code with its check character */
Datum
loyalty_voucher_code(PG_FUNCTION_ARGS)
{
	uint8		bytes[VOUCHER_RANDOM_CHARS];
	char		chars[VOUCHER_CHARS];

	if (!pg_strong_random(bytes, sizeof(bytes)))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate a random voucher code")));
	/* 256 is a multiple of 32: taking 5 bits of each byte is unbiased */
	for (int i = 0; i < VOUCHER_RANDOM_CHARS; i++)
		chars[i] = VoucherAlphabet[bytes[i] & 31];
	chars[VOUCHER_RANDOM_CHARS] = VoucherCheckChar(chars, VOUCHER_RANDOM_CHARS);
	PG_RETURN_TEXT_P(VoucherFormat(chars));
}

/*
 * _voucher_normalize(code text) RETURNS text: the canonical form of a code
 * as typed, or 22P02 for what cannot be a code and LY041 for a code whose
 * check character does not match (a typo).
 */
Datum
loyalty_voucher_normalize(PG_FUNCTION_ARGS)
{
	char	   *in;
	char		chars[VOUCHER_CHARS];
	int			n = 0;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("voucher code must not be null")));
	in = text_to_cstring(PG_GETARG_TEXT_PP(0));
	for (const char *c = in; *c; c++)
	{
		char		u = pg_ascii_toupper((unsigned char) *c);
		int			v;

		if (u == '-' || u == ' ')
			continue;
		v = VoucherValue(u);
		if (v < 0 || n == VOUCHER_CHARS)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("invalid voucher code \"%s\"", in),
					 errdetail(v < 0 ? "A voucher code has only digits and the letters A-Z without I, L, O and U."
							   : "A voucher code has 16 characters."),
					 errhint("Codes look like 7KQ2-M9XD-4RTB-HN6C.")));
		chars[n++] = VoucherAlphabet[v];
	}
	if (n != VOUCHER_CHARS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid voucher code \"%s\"", in),
				 errdetail("A voucher code has 16 characters."),
				 errhint("Codes look like 7KQ2-M9XD-4RTB-HN6C.")));
	if (VoucherLuhnSum(chars, VOUCHER_CHARS, 1) % 32 != 0)
		ereport(ERROR,
				(errcode(ERRCODE_LOYALTY_VOUCHER_MISTYPED),
				 errmsg("voucher code \"%s\" is mistyped", in),
				 errdetail("Its check character does not match; no voucher was looked up."),
				 errhint("Check the code for a wrong or swapped character.")));
	PG_RETURN_TEXT_P(VoucherFormat(chars));
}
