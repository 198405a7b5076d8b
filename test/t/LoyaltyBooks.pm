# The books the accrual load tests (020, 021) check after their runs: each
# query counts what breaks them, so each must give 0.
package LoyaltyBooks;
use strict;
use warnings;
use Exporter 'import';
our @EXPORT = qw($books $lists $deferred_counts);

# each member account holds its lots and its deferred purchases
our $books = q{
    SELECT count(*) FROM loyalty.account a
    WHERE a.kind = 'member'
      AND (a.available::bigint + a.pending::bigint) IS DISTINCT FROM
          (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l WHERE l.account_id = a.id)
          + (SELECT coalesce(sum(x.points), 0) FROM loyalty.accrual x
              WHERE x.account_id = a.id AND x.transfer_id IS NULL AND x.points > 0)};

# each member's list of purchases (account.last_purchase_ref, then each
# purchase's prev_ref, in falling id order) holds exactly their purchases
our $lists = q{
    WITH RECURSIVE walk AS (
        SELECT a.id AS account_id, a.program_id, x.ref, x.prev_ref, x.id
        FROM loyalty.account a JOIN loyalty.accrual x ON x.program_id = a.program_id AND x.ref = a.last_purchase_ref
        UNION ALL
        SELECT w.account_id, w.program_id, x.ref, x.prev_ref, x.id
        FROM walk w JOIN loyalty.accrual x ON x.program_id = w.program_id AND x.ref = w.prev_ref AND x.id < w.id
    )
    SELECT count(*) FROM (
        (SELECT account_id, ref FROM walk EXCEPT ALL SELECT account_id, ref FROM loyalty.accrual)
        UNION ALL
        (SELECT account_id, ref FROM loyalty.accrual EXCEPT ALL SELECT account_id, ref FROM walk)
    ) d};

# each account counts its deferred purchases
our $deferred_counts = q{
    SELECT count(*) FROM loyalty.account a WHERE a.kind = 'member'
      AND coalesce(a.deferred_count, 0) <> (SELECT count(*) FROM loyalty.accrual x
                                            WHERE x.account_id = a.id AND x.transfer_id IS NULL AND x.points > 0)};

1;
