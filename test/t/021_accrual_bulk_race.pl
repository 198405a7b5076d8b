# Bulk inserts racing each other over the same refs. A chunk of 1,000
# purchases or more is first written all at once, in a subtransaction, and
# written again one by one when the ref index meets a ref another
# transaction holds (docs/accrual.md, "Writing many purchases at once").
# Here 4 clients insert batches of 1,200 orders into two attached tables of
# one program, the same refs in both, for different members (so that no
# member lock orders them): a batch meets refs of a batch in progress in the
# other table, rolls its write back and writes again, waiting for the other
# where it must. Single-row sales of the same refs race them too. No
# statement may fail or deadlock; every ref is posted once and the other
# table's row is quarantined as a different purchase; the daily cap, the
# deferred lines, each member's list of purchases and the chains hold.
use strict;
use warnings;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib $FindBin::Bin;
use LoyaltyBooks;

my $node = shop_node('bulk_race', 300);

$node->safe_psql('postgres', q{
    SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1.00, "points": 1, "rounding": "floor"},
                                               "caps": {"per_member_per_day": 600}, "pending_days": 30}',
                                     '2020-01-01', 'bulk race');
    CREATE TABLE orders_a (order_no text PRIMARY KEY, customer text, total numeric(10,2), sold_at timestamptz);
    CREATE TABLE orders_b (LIKE orders_a INCLUDING ALL);
    SELECT loyalty.attach_accrual(t, 'shop', 'customer', 'total', 'order_no', occurred_at_column => 'sold_at')
    FROM unnest(ARRAY['orders_a', 'orders_b']::regclass[]) t;
});

# a batch: 1,200 orders of 100 members (m1-m100 in orders_a, m101-m200 in
# orders_b) over two days, refs b<batch>-<i>, the batch being the quarter
# of a second the statement started in: the statements of both tables that
# run at once share their refs
my $batch = sub {
    my ($table, $first) = @_;
    return qq{INSERT INTO $table
SELECT 'b' || w.b || '-' || i, 'm' || ($first + (i + w.b) % 100), 10.00 + i % 7,
       timestamptz '2025-03-01' + (i % 2) * interval '1 day' + i * interval '1 second'
FROM (SELECT (extract(epoch FROM statement_timestamp()) * 4)::bigint AS b) w, generate_series(1, 1200) i
ON CONFLICT DO NOTHING;
};
};
my %scripts = (
    'bulk_a.sql' => $batch->('orders_a', 1),
    'bulk_b.sql' => $batch->('orders_b', 101),
    # one sale of a batch's ref, for a member of neither table's batches
    'sale.sql' => q{\set i random(1, 1200)
\set m random(201, 300)
INSERT INTO orders_a
VALUES ('b' || (extract(epoch FROM statement_timestamp()) * 4)::bigint || '-' || :i, 'm' || :m, 25.00, '2025-03-01')
ON CONFLICT DO NOTHING;
});
my ($out, $err) = run_scripts($node, \%scripts, 4, 12, 'bulk_a.sql@4', 'bulk_b.sql@4', 'sale.sql@2');
my ($tx) = $out =~ /number of transactions actually processed: (\d+)/;
$tx //= 0;
ok($out =~ /number of failed transactions: 0 / && $err !~ /aborted|error|deadlock/i,
   'no insert failed or deadlocked') or diag($out, $err);
cmp_ok($tx, '>', 40, "pgbench ran ($tx transactions)");

my $q = sub { $node->safe_psql('postgres', shift) };

my ($both, $quarantined) = split /\|/, $q->(q{
    SELECT (SELECT count(*) FROM orders_a JOIN orders_b USING (order_no)),
           (SELECT count(*) FROM loyalty.accrual_quarantine WHERE sqlstate = '23505')});
cmp_ok($both, '>', 10000, "the two tables share refs ($both)");
is($quarantined, $both, 'each shared ref is posted once and quarantined once, as a different purchase');
is($q->(q{
    SELECT count(*) FROM (SELECT order_no FROM orders_a UNION SELECT order_no FROM orders_b) o
    FULL JOIN (SELECT ref, count(*) AS n FROM loyalty.accrual GROUP BY ref) x ON x.ref = o.order_no
    WHERE x.n IS DISTINCT FROM 1 OR o.order_no IS NULL}),
   '0', 'every ref is posted exactly once, and nothing else');
is($q->(q{
    SELECT count(*) FROM loyalty.accrual x JOIN loyalty.member m ON m.id = x.member_id
    WHERE NOT EXISTS (SELECT FROM orders_a o WHERE o.order_no = x.ref AND o.customer = m.member_ref)
      AND NOT EXISTS (SELECT FROM orders_b o WHERE o.order_no = x.ref AND o.customer = m.member_ref)}),
   '0', 'every purchase is an order of its member');
is($q->(q{
    SELECT count(*) FROM (SELECT account_id, day FROM loyalty.accrual GROUP BY 1, 2 HAVING sum(points) > 600) z}),
   '0', 'no member earned past the daily cap');
cmp_ok($q->(q{SELECT count(*) FROM (SELECT account_id, day FROM loyalty.accrual
                                    GROUP BY 1, 2 HAVING sum(points) = 600) z}),
       '>', 0, 'the daily cap was reached');

is($q->($books), '0', 'each member account holds its lots and its deferred purchases');
is($q->($lists), '0', "each member's list of purchases holds exactly their purchases");
is($q->($deferred_counts),
   '0', 'each account counts its deferred purchases');
is($q->(q{SELECT count(*) FROM loyalty.verify_chain('shop')}), '0', 'the chains verify');

$q->(q{SELECT loyalty.run_job('vest', now() + interval '31 days')});
is($q->(q{SELECT count(*) FROM loyalty.accrual WHERE transfer_id IS NULL AND points > 0}), '0',
   'the vest job wrote every deferred line');
is($q->($books), '0', 'each member account holds the sum of its lots');
is($q->(q{SELECT count(*) FROM loyalty.verify_chain('shop')}), '0', 'the chains still verify');

done_testing();
