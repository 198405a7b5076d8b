# The shop's own orders table with accrual attached, under 8 clients that
# insert orders (some for unknown customers), delete orders and lower their
# totals for some seconds. No sale may fail; every order of a member earns
# exactly once; refunds match what was returned; the books and the chains
# hold.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('accrual');
$node->init;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'loyalty'\nmax_connections = 40");
$node->start;

$node->safe_psql('postgres', q{
    CREATE EXTENSION loyalty;
    SELECT loyalty.create_program('shop', 'Shop');
    SELECT loyalty.enroll('shop', 'm' || i, occurred_at => '2020-01-01') FROM generate_series(1, 200) i;
    SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1.00, "points": 1, "rounding": "floor"}}',
                                     '2020-01-01', 'load test');
    CREATE TABLE orders (seq_no bigserial, order_no text PRIMARY KEY, customer text,
                         total numeric(10,2), sold_at timestamptz DEFAULT now());
    SELECT loyalty.attach_accrual('orders', 'shop', 'customer', 'total', 'order_no',
                                  occurred_at_column => 'sold_at');
});

my $dir = PostgreSQL::Test::Utils::tempdir;
my %scripts = (
    # customers 201-210 are not members: their sales go to the quarantine
    'insert.sql' => q{\set m random(1, 210)
\set cents random(100, 50000)
INSERT INTO orders (order_no, customer, total) VALUES ('o-' || :client_id || '-' || :m || '-' || :cents || '-' || random(), 'm' || :m, :cents / 100.0);
},
    'delete.sql' => q{\set r random(1, 30000)
DELETE FROM orders WHERE seq_no = :r;
},
    'lower.sql' => q{\set r random(1, 30000)
UPDATE orders SET total = round(total / 2, 2) WHERE seq_no = :r;
});
for my $name (keys %scripts)
{
    open my $fh, '>', "$dir/$name" or die;
    print $fh $scripts{$name};
    close $fh;
}

my ($out, $err) = run_command([
    'pgbench', '-n', '-h', $node->host, '-p', $node->port, '-c', '8', '-j', '2', '-T', '15',
    '-f', "$dir/insert.sql\@6", '-f', "$dir/delete.sql\@2", '-f', "$dir/lower.sql\@2", 'postgres' ]);
my ($tx) = $out =~ /number of transactions actually processed: (\d+)/;
$tx //= 0;
ok($out =~ /number of failed transactions: 0 / && $err !~ /aborted|error/i,
   'no sale failed, not even for unknown customers') or diag($out, $err);
cmp_ok($tx, '>', 500, "pgbench ran ($tx transactions)");

my $q = sub { $node->safe_psql('postgres', shift) };

# the run exercised every path it checks
my ($refunds, $quarantined) = split /\|/, $q->(q{
    SELECT (SELECT count(*) FROM loyalty.accrual_refund), (SELECT count(*) FROM loyalty.accrual_quarantine)});
cmp_ok($refunds, '>', 50, "refunds were posted ($refunds)");
cmp_ok($quarantined, '>', 50, "sales were quarantined ($quarantined)");

is($q->(q{
    SELECT count(*) FROM orders o
    WHERE substr(o.customer, 2)::int <= 200
      AND (SELECT count(*) FROM loyalty.accrual a WHERE a.ref = o.order_no) <> 1}),
   '0', 'every order of a member earned exactly once');

is($q->(q{
    SELECT count(*) FROM orders o
    WHERE substr(o.customer, 2)::int > 200
      AND NOT EXISTS (SELECT FROM loyalty.accrual_quarantine q WHERE q.ref = o.order_no)}),
   '0', 'every order of an unknown customer is in the quarantine');

is($q->(q{
    SELECT count(*) FROM loyalty.accrual a LEFT JOIN orders o ON o.order_no = a.ref
    WHERE a.amount - a.refunded_amount IS DISTINCT FROM coalesce(o.total, 0)}),
   '0', 'what is refunded is what was returned (deleted orders wholly, lowered ones by the difference)');

is($q->(q{
    SELECT count(*) FROM loyalty.accrual a
    WHERE a.refunded_points > a.points OR a.refunded_points < 0}),
   '0', 'no purchase gave back more than it earned');

is($q->(q{SELECT count(*) FROM loyalty.account WHERE available::bigint < 0 OR pending::bigint < 0}),
   '0', 'no negative balance');

is($q->(q{
    SELECT (SELECT sum(points - refunded_points) FROM loyalty.accrual)
         = (SELECT sum(available::bigint + pending::bigint) FROM loyalty.account WHERE kind = 'member')}),
   't', 'the members hold exactly what their purchases earned less what refunds took');

is($q->(q{
    SELECT count(*) FROM loyalty.account a
    WHERE a.kind = 'member'
      AND (a.available::bigint + a.pending::bigint) IS DISTINCT FROM
          (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l WHERE l.account_id = a.id)}),
   '0', 'each member account holds the sum of its lots');

is($q->(q{SELECT count(*) FROM loyalty.verify_chain('shop')}), '0', 'every chain verifies');

$node->stop;
done_testing();
