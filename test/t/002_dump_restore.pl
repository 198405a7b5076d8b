# User data survives pg_dump: a dump restored into a new database gives the
# same balances, and every chain still verifies.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('dump');
$node->init;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'loyalty'");
$node->start;

$node->safe_psql('postgres', q{
    CREATE EXTENSION loyalty;
    SELECT loyalty.create_program('shop', 'Shop', 'Europe/Paris',
           '{"expiry": {"policy": "fixed", "after": "12 months"}, "welcome": {"points": 10}}');
    SELECT loyalty.enroll('shop', 'c' || i, email => 'c' || i || '@example.com',
                          occurred_at => '2026-01-01') FROM generate_series(1, 5) i;
    SELECT loyalty.earn('shop', 'c' || (i % 5 + 1), i * 10, 'o-' || i, NULL, '2026-02-01'::timestamptz + i * interval '1 day')
      FROM generate_series(1, 40) i;
    SELECT loyalty.adjust('shop', 'c1', -25, 'fix-1', 'test', '2026-04-01');
    -- an application table with accrual attached: pg_restore adds its
    -- constraints (ALTER TABLE) before it creates its triggers
    SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1}}', '2020-01-01');
    CREATE TABLE orders (id serial PRIMARY KEY, member text NOT NULL, amount numeric NOT NULL,
                         ref text UNIQUE, at timestamptz);
    SELECT loyalty.attach_accrual('orders', 'shop', 'member', 'amount', 'ref', 'at');
    INSERT INTO orders (member, amount, ref, at) VALUES ('c3', 70, 'ord-1', '2026-03-01');
});

my $query = q{
    SELECT string_agg(m.member_ref || ':' || loyalty.balance('shop', m.member_ref, '2026-06-01'), ',' ORDER BY m.id)
           || ' transfers=' || (SELECT count(*) FROM loyalty.transfer)
           || ' lots=' || (SELECT count(*) FROM loyalty.lot)
           || ' contacts=' || (SELECT count(*) FROM loyalty.member_contact)
    FROM loyalty.member m};
my $before = $node->safe_psql('postgres', $query);

my $dump = PostgreSQL::Test::Utils::tempdir . '/loyalty.dump';
command_ok([ 'pg_dump', '-h', $node->host, '-p', $node->port, '-Fc', '-f', $dump, 'postgres' ], 'pg_dump');
$node->safe_psql('postgres', 'CREATE DATABASE restored');
command_ok([ 'pg_restore', '-h', $node->host, '-p', $node->port, '-d', 'restored', '--exit-on-error', $dump ],
           'pg_restore');

is($node->safe_psql('restored', $query), $before, "same balances, transfers, lots and contacts ($before)");
is($node->safe_psql('restored', q{SELECT count(*) FROM loyalty.verify_chain('shop')}), '0',
   'every chain verifies after the restore');

# the restored sequences continue where the original stopped
$node->safe_psql('restored', q{SELECT loyalty.earn('shop', 'c2', 5, 'after-restore', NULL, '2026-05-01')});
is($node->safe_psql('restored', q{SELECT count(*) FROM loyalty.verify_chain('shop')}), '0',
   'a posting after the restore chains on');
is($node->safe_psql('restored', q{SELECT loyalty.enroll('shop', 'c6')}),
   $node->safe_psql('postgres', q{SELECT max(id) + 1 FROM loyalty.member}),
   'member ids continue after the restore');

# the attachment comes back whole: its row, its three triggers, and a sale
# into the restored table earns
is($node->safe_psql('restored', q{
    SELECT (SELECT count(*) FROM loyalty.accrual_source WHERE source = 'orders'::regclass)
           || ' ' || (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass
                                                       AND tgname LIKE 'loyalty_accrual_%')}),
   '1 3', 'the attachment and its triggers are restored');
$node->safe_psql('restored', q{INSERT INTO orders (member, amount, ref, at) VALUES ('c3', 30, 'ord-2', '2026-05-02')});
is($node->safe_psql('restored', q{SELECT loyalty.explain_accrual('shop', 'ord-2') ->> 'posted_points'}), '30',
   'a sale into the restored table earns');

$node->stop;
done_testing();
