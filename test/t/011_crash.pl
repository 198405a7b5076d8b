# kill -9 in the middle of an expiry of many lots, of a backend running
# run_job() and then of the worker: after the restart the ledger is as if the
# job had run once (balances, lots, lot uses, chains verify).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use IPC::Run;
use Time::HiRes qw(usleep);
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('crash');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'loyalty'
loyalty.databases = 'postgres'
loyalty.naptime = 1
loyalty.enabled = off
restart_after_crash = on
});
$node->start;

my $lots = 40000;
$node->safe_psql('postgres', qq{
CREATE EXTENSION loyalty;
SELECT loyalty.create_program('p', 'P', 'UTC', '{"expiry": {"policy": "fixed", "after": "1 day"}}');
SELECT loyalty.enroll('p', 'm' || i, occurred_at => '2020-01-01') FROM generate_series(1, 400) i;
SELECT loyalty.earn('p', 'm' || (i % 400 + 1), 1 + i % 7, 'e' || i, occurred_at => '2020-01-02')
  FROM generate_series(1, $lots) i;
-- some points spent, some not yet due
SELECT loyalty.earn('p', 'm' || i, 100, 'later' || i, occurred_at => now()) FROM generate_series(1, 10) i;
SELECT loyalty.set_job('expire', batch_size => 200);
SELECT loyalty.set_job('release_holds', enabled => false);
SELECT loyalty.set_job('vest', enabled => false);
});
my $total = $node->safe_psql('postgres',
	"SELECT sum(remaining::bigint) FROM loyalty.lot WHERE expires_at < now()");

# what the ledger must look like after the job, as if it ran once
my $check = q{
SELECT (SELECT count(*) FROM loyalty.transfer WHERE kind = 'expire'),
       (SELECT sum(amount::bigint) FROM loyalty.transfer WHERE kind = 'expire'),
       (SELECT count(*) FROM (SELECT lot_id FROM loyalty.lot_use GROUP BY lot_id HAVING count(*) > 1) x),
       (SELECT sum(remaining::bigint) FROM loyalty.lot),
       (SELECT sum(available::bigint) FROM loyalty.account WHERE kind = 'member'),
       (SELECT count(*) FROM loyalty.account a WHERE a.kind = 'member'
           AND a.available::bigint <> (SELECT coalesce(sum(l.remaining::bigint), 0) FROM loyalty.lot l
                                        WHERE l.account_id = a.id AND NOT l.pending)),
       (SELECT count(*) FROM loyalty.member m WHERE m.id % 20 = 0
           AND loyalty.balance('p', m.member_ref, now() + interval '1 hour')::bigint <> 0),
       (SELECT count(*) FROM loyalty.verify_chain('p'))
};
my $expected = "$lots|$total|0|1000|1000|0|0|0";

# 1. a backend running run_job() is killed: its one transaction is lost whole
my ($out, $err) = ('', '');
my $h = IPC::Run::start(
	[ 'psql', '-X', '-d', $node->connstr('postgres'), '-c',
	  "SET application_name = 'runner'; SELECT * FROM loyalty.run_job('expire')" ],
	'>', \$out, '2>', \$err);
ok($node->poll_query_until('postgres', q{
	SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name = 'runner' AND state = 'active'
	               AND query LIKE '%run_job%')}), 'run_job() is running');
usleep(300_000);
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE application_name = 'runner' AND state = 'active'");
ok($pid ne '', 'run_job() is still running');
kill 'KILL', $pid;
$h->finish;
ok($node->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()'), 'the server is back');
is($node->safe_psql('postgres', "SELECT count(*) FROM loyalty.transfer WHERE kind = 'expire'"), '0',
	'the killed run_job() left nothing');

# 2. the worker is killed after some batches committed
$node->append_conf('postgresql.conf', "loyalty.enabled = on\n");
$node->reload;
ok($node->poll_query_until('postgres',
	"SELECT coalesce(sum(batches), 0) >= 5 FROM loyalty.job_run WHERE job = 'expire'"),
	'the worker committed some batches');
$pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'loyalty worker'");
kill 'KILL', $pid;
ok($node->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()'), 'the server is back again');
my $mid = $node->safe_psql('postgres', "SELECT count(*) FROM loyalty.transfer WHERE kind = 'expire'");
note("expired before the kill: $mid");
ok($mid > 0 && $mid < $lots, 'the worker was killed mid-way');
like(slurp_file($node->logfile), qr/was terminated by signal 9/, 'the crash was seen by the postmaster');

# the restarted worker finishes the job (the interrupted run stays unfinished)
ok($node->poll_query_until('postgres',
	"SELECT EXISTS (SELECT FROM loyalty.job_run WHERE job = 'expire' AND finished_at IS NOT NULL)"),
	'the restarted worker finished the job');
is($node->safe_psql('postgres', $check), $expected, 'the ledger is as if the job ran once');
is($node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE finished_at IS NULL), sum(rows) FROM loyalty.job_run WHERE job = 'expire'}),
	"1|$lots", 'the interrupted run is recorded unfinished; the runs add up');

# and running it again changes nothing
$node->safe_psql('postgres', "SELECT * FROM loyalty.run_job('expire')");
is($node->safe_psql('postgres', $check), $expected, 'a rerun changes nothing');
$node->stop('fast');
done_testing();
