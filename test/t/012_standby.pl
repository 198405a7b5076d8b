# A hot standby built from a primary with the workers configured runs no job
# (the launcher waits for the end of recovery) but serves balances; after
# promotion it runs the due jobs itself.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1);
$primary->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'loyalty'
loyalty.databases = 'postgres'
loyalty.naptime = 1
loyalty.enabled = off
});
$primary->start;
$primary->safe_psql('postgres', q{
CREATE EXTENSION loyalty;
SELECT loyalty.create_program('p', 'P', 'UTC', '{"expiry": {"policy": "fixed", "after": "1 day"}}');
SELECT loyalty.enroll('p', 'm' || i, occurred_at => '2020-01-01') FROM generate_series(1, 5) i;
SELECT loyalty.earn('p', 'm' || (i % 5 + 1), 10, 'e' || i, occurred_at => '2020-01-02') FROM generate_series(1, 20) i;
SELECT loyalty.earn('p', 'm1', 7, 'now', occurred_at => now());
});
$primary->backup('b');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b', has_streaming => 1);
$standby->append_conf('postgresql.conf', "loyalty.enabled = on\n");
$standby->start;
$primary->wait_for_catchup($standby);

sleep 3;
is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'the standby is in recovery');
unlike(slurp_file($standby->logfile), qr/loyalty (launcher|worker) started/,
	'no launcher nor worker runs on the standby');
is($standby->safe_psql('postgres', 'SELECT count(*) FROM loyalty.job_run'), '0', 'no job ran');
is($standby->safe_psql('postgres', "SELECT count(*) FROM loyalty.transfer WHERE kind = 'expire'"), '0',
	'nothing expired');
is($standby->safe_psql('postgres', q{SELECT loyalty.balance('p', 'm1')}), '7',
	'the standby serves balances (expired lots do not count)');
is($standby->safe_psql('postgres', q{SELECT loyalty.balance('p', 'm1', '2020-01-02 12:00')}), '40',
	'and balances as of any moment');
is($standby->safe_psql('postgres', q{SELECT available FROM loyalty.account_summary('p', 'm2')}), '0',
	'and account summaries');

# promoted, it runs the due jobs on its own
$standby->promote;
ok($standby->poll_query_until('postgres',
	"SELECT EXISTS (SELECT FROM loyalty.job_run WHERE job = 'expire' AND finished_at IS NOT NULL)"),
	'once promoted, its worker runs the jobs');
is($standby->safe_psql('postgres', "SELECT count(*), sum(amount::bigint) FROM loyalty.transfer WHERE kind = 'expire'"),
	'20|200', 'and expires what was due');
is($standby->safe_psql('postgres', "SELECT count(*) FROM loyalty.verify_chain('p')"), '0', 'chains verify');
$standby->stop('fast');
$primary->stop('fast');
done_testing();
