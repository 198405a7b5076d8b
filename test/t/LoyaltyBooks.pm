# What the load tests (001, 020, 021) share: the cluster they start, the
# way they run pgbench over their scripts, and the books the accrual ones
# check after their runs (each query counts what breaks them, so each must
# give 0).
package LoyaltyBooks;
use strict;
use warnings;
use Exporter 'import';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
our @EXPORT = qw(loyalty_node shop_node run_scripts $books $lists $deferred_counts);

# A started cluster with the library preloaded, 40 connections, and the
# extension created.
sub loyalty_node
{
    my ($name) = @_;
    my $node = PostgreSQL::Test::Cluster->new($name);
    $node->init;
    $node->append_conf('postgresql.conf', "shared_preload_libraries = 'loyalty'\nmax_connections = 40");
    $node->start;
    $node->safe_psql('postgres', 'CREATE EXTENSION loyalty');
    return $node;
}

# loyalty_node's cluster, with program shop and members m1 .. m$members,
# enrolled on 2020-01-01.
sub shop_node
{
    my ($name, $members) = @_;
    my $node = loyalty_node($name);
    $node->safe_psql('postgres', qq{
        SELECT loyalty.create_program('shop', 'Shop');
        SELECT loyalty.enroll('shop', 'm' || i, occurred_at => '2020-01-01') FROM generate_series(1, $members) i;
    });
    return $node;
}

# pgbench on $node for $seconds with $clients clients (2 threads) over the
# scripts of %$scripts (name => text), each written to a folder of its own
# and run by the weight @weights gives it ("name@weight"). Returns
# pgbench's output and errors.
sub run_scripts
{
    my ($node, $scripts, $clients, $seconds, @weights) = @_;
    my $dir = PostgreSQL::Test::Utils::tempdir;
    for my $name (keys %$scripts)
    {
        open my $fh, '>', "$dir/$name" or die;
        print $fh $scripts->{$name};
        close $fh;
    }
    return run_command([
        'pgbench', '-n', '-h', $node->host, '-p', $node->port, '-c', $clients, '-j', '2', '-T', $seconds,
        (map { ('-f', "$dir/$_") } @weights), 'postgres' ]);
}

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
