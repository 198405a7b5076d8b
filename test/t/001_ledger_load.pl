# Many clients post random credits and debits over a few members for some
# seconds; then nothing may be lost, doubled or negative, and every chain
# must verify.
use strict;
use warnings;
use Test::More;
use FindBin;
use lib $FindBin::Bin;
use LoyaltyBooks;

my $node = loyalty_node('load');

$node->safe_psql('postgres', q{
    SELECT loyalty.create_program('load', 'Load test');
    SELECT loyalty.enroll('load', 'm' || i) FROM generate_series(1, 10) i;
    -- a debit beyond the balance is an expected refusal here, not a failure
    CREATE FUNCTION try_debit(m text, pts bigint, r text) RETURNS boolean LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM loyalty.adjust('load', m, -pts, r, 'load test');
        RETURN true;
    EXCEPTION WHEN SQLSTATE 'LY001' THEN
        RETURN false;
    END $$;
});

# The ref encodes the content, and comes from a small range, so that many
# calls are exact repeats that must post nothing.
my ($out, $err) = run_scripts($node, {
    'credit.sql' => q{\set m random(1, 10)
\set pts random(1, 20)
\set r random(1, 300)
SELECT loyalty.earn('load', 'm' || :m, :pts, 'e-' || :m || '-' || :pts || '-' || :r);
},
    'debit.sql' => q{\set m random(1, 10)
\set pts random(1, 30)
\set r random(1, 300)
SELECT try_debit('m' || :m, :pts, 'd-' || :m || '-' || :pts || '-' || :r);
} }, 8, 15, 'credit.sql@3', 'debit.sql@2');
my ($tx) = $out =~ /number of transactions actually processed: (\d+)/;
$tx //= 0;
ok($out =~ /number of failed transactions: 0 / && $err !~ /aborted|error/i,
   'pgbench: no transaction failed, no client aborted') or diag($out, $err);
cmp_ok($tx, '>', 1000, "pgbench ran ($tx transactions)");

is($node->safe_psql('postgres', q{
    SELECT count(*) FROM loyalty.account WHERE available::bigint < 0 OR pending::bigint < 0
    UNION ALL SELECT count(*) FROM loyalty.lot WHERE remaining::bigint < 0}),
   "0\n0", 'no negative balance and no negative lot');

is($node->safe_psql('postgres', q{
    SELECT count(*) FROM loyalty.account a
    WHERE a.kind = 'member'
      AND (a.available::bigint + a.pending::bigint) IS DISTINCT FROM
          (SELECT coalesce(sum(CASE WHEN t.credit_account_id = a.id THEN t.amount::bigint
                                    ELSE -t.amount::bigint END), 0)
             FROM loyalty.transfer t WHERE a.id IN (t.debit_account_id, t.credit_account_id))}),
   '0', 'each member account holds the sum of its transfers');

is($node->safe_psql('postgres', q{
    SELECT count(*) FROM loyalty.account a
    WHERE a.kind = 'member'
      AND (a.available::bigint + a.pending::bigint) IS DISTINCT FROM
          (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l WHERE l.account_id = a.id)}),
   '0', 'each member account holds the sum of its lots');

is($node->safe_psql('postgres', q{
    SELECT count(*) FROM loyalty.member m JOIN loyalty.account a ON a.member_id = m.id
    WHERE loyalty.balance('load', m.member_ref)::bigint <> a.available::bigint}),
   '0', 'balance() agrees with every account row');

is($node->safe_psql('postgres', q{
    SELECT sum(CASE WHEN a.kind = 'member' THEN 1 ELSE -1 END
               * CASE WHEN t.credit_account_id = a.id THEN t.amount::bigint ELSE -t.amount::bigint END)
             = 2 * (SELECT sum(available::bigint + pending::bigint) FROM loyalty.account WHERE kind = 'member')
    FROM loyalty.transfer t JOIN loyalty.account a ON a.id IN (t.debit_account_id, t.credit_account_id)}),
   't', 'the system accounts mirror the member accounts');

is($node->safe_psql('postgres', q{
    SELECT count(*) FROM (SELECT kind, ref FROM loyalty.transfer GROUP BY 1, 2 HAVING count(*) > 1) d}),
   '0', 'no ref was posted twice');

is($node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.verify_chain('load')}),
   '0', 'every chain verifies');

my $posted = $node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.transfer});
cmp_ok($posted, '<', $tx, "repeats posted nothing ($posted transfers for $tx calls)");

$node->stop;
done_testing();
