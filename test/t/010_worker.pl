# The worker runs due jobs on its own in a preloaded server; SIGHUP turns
# it on and changes its schedule; an error in one job (a registered job whose
# handler is not installed) is logged once with context, recorded in job_run,
# and does not stop the other jobs; SIGTERM (server stop) ends it cleanly.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('worker');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'loyalty'
loyalty.databases = 'postgres, other'
loyalty.naptime = 1
loyalty.enabled = off
});
$node->start;

# the extension is not installed yet: the worker stays idle
sleep 2;
ok($node->safe_psql('postgres',
	"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'loyalty worker'") >= 1,
	'a worker runs for the listed database that exists');
like(slurp_file($node->logfile), qr/loyalty launcher started/, 'the launcher runs');

$node->safe_psql('postgres', q{
CREATE EXTENSION loyalty;
SET TIME ZONE 'UTC';
SELECT loyalty.create_program('p', 'P', 'UTC', '{"expiry": {"policy": "fixed", "after": "1 day"}}');
SELECT loyalty.enroll('p', 'm' || i, occurred_at => '2020-01-01') FROM generate_series(1, 20) i;
SELECT loyalty.earn('p', 'm' || (i % 20 + 1), i, 'e' || i, occurred_at => '2020-01-02') FROM generate_series(1, 100) i;
SELECT loyalty.earn('p', 'm1', 5, 'future', occurred_at => now() + interval '1 hour');
SELECT loyalty.set_job('vest', enabled => false);
INSERT INTO loyalty.job (name, handler, schedule) VALUES ('ghost', 'loyalty._job_ghost', '1 hour');
});
sleep 2;
is($node->safe_psql('postgres', 'SELECT count(*) FROM loyalty.job_run'), '0',
	'with loyalty.enabled off nothing runs');

# SIGHUP: on
$node->append_conf('postgresql.conf', "loyalty.enabled = on\n");
$node->reload;
ok($node->poll_query_until('postgres',
	"SELECT EXISTS (SELECT FROM loyalty.job_run WHERE job = 'expire' AND finished_at IS NOT NULL)"),
	'after a reload the worker ran the expire job');
is($node->safe_psql('postgres', q{
	SELECT count(*), sum(amount::bigint) FROM loyalty.transfer WHERE kind = 'expire'}),
	'100|5050', 'it expired every due lot once');
is($node->safe_psql('postgres', q{SELECT loyalty.balance('p', 'm1', now() + interval '2 hours')}),
	'5', 'the lot not yet due is left');
is($node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.verify_chain('p')}), '0',
	'chains verify');
is($node->safe_psql('postgres', q{
	SELECT by_worker, batches > 0, rows, points, error IS NULL FROM loyalty.job_run WHERE job = 'expire'}),
	't|t|100|5050|t', 'the run is recorded');
is($node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.job_run WHERE job = 'vest'}), '0',
	'a disabled job does not run');

# the job without a handler failed cleanly and was recorded; the jobs after
# it in name order (release_holds, from the redemption capability) ran
ok($node->poll_query_until('postgres',
	"SELECT EXISTS (SELECT FROM loyalty.job_run WHERE job = 'ghost')"),
	'the job without a handler was attempted');
is($node->safe_psql('postgres', q{
	SELECT sqlstate, error, finished_at IS NOT NULL FROM loyalty.job_run WHERE job = 'ghost'}),
	'LY021|handler of job "ghost" does not exist|t', 'its error is recorded in job_run');
ok($node->poll_query_until('postgres',
	"SELECT EXISTS (SELECT FROM loyalty.job_run WHERE job = 'release_holds' AND finished_at IS NOT NULL AND error IS NULL)"),
	'the next job ran');
my $log = slurp_file($node->logfile);
my @errors = ($log =~ /ERROR:  handler of job "ghost" does not exist/g);
is(scalar(@errors), 1, 'the error is logged once');
like($log, qr/CONTEXT:  [^\n]*(\n\t[^\n]*)*\n\tloyalty job "ghost" in database "postgres"\n/,
	'with the job and database as context');

# a listed database that does not exist: its worker is retried once a
# minute, not at every naptime, and the other database's worker carries on
my @missing = ($log =~ /FATAL:  database "other" does not exist/g);
is(scalar(@missing), 1, 'a missing database is logged once a minute');

# the schedule: expire ran once per its 1 hour; a 1 second schedule (SQL)
# and a reload make it run again and again
is($node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.job_run WHERE job = 'expire'}), '1',
	'expire runs on its hourly schedule, once so far');
$node->safe_psql('postgres', q{SELECT loyalty.set_job('expire', schedule => '1 second')});
ok($node->poll_query_until('postgres',
	"SELECT count(*) >= 3 FROM loyalty.job_run WHERE job = 'expire'"),
	'a shorter schedule runs the job more often');
is($node->safe_psql('postgres', q{SELECT sum(rows) FROM loyalty.job_run WHERE job = 'expire'}), '100',
	'later runs find nothing new');

# SIGHUP: naptime 3600 s: the worker sleeps
$node->append_conf('postgresql.conf', "loyalty.naptime = 3600\n");
$node->reload;
sleep 2;
my $n = $node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.job_run WHERE job = 'expire'});
sleep 3;
is($node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.job_run WHERE job = 'expire'}), $n,
	'after a reload with a long naptime the worker waits');

# SIGTERM: a clean stop
$node->stop('fast');
$log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|exited with exit code [^01]/, 'workers exit cleanly');
done_testing();
