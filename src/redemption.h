/*
 * redemption.h: redemption postings (redeem, capture, donate, transfer,
 * cancel) through the ledger's posting routine
 */
#ifndef LOYALTY_REDEMPTION_H
#define LOYALTY_REDEMPTION_H

/* SQLSTATEs of redemption (LY030-LY049), listed in docs/redemption.md */
#define ERRCODE_LOYALTY_UNKNOWN_REWARD		MAKE_SQLSTATE('L','Y','0','3','0')
#define ERRCODE_LOYALTY_VOUCHER_UNKNOWN		MAKE_SQLSTATE('L','Y','0','3','8')
#define ERRCODE_LOYALTY_VOUCHER_MISTYPED	MAKE_SQLSTATE('L','Y','0','4','1')

#endif
