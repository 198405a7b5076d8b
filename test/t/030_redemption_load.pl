# Redemption under load: 8 clients redeeming (with limited stock), holding
# and capturing or releasing, letting holds expire under the release_holds
# job, donating, transferring and earning over 2,000 members of two
# programs, for a bounded time. Then: conservation per program, no negative
# balance, held = active holds, each hold resolved once, stock conserved,
# every hash chain verifies.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $duration = $ENV{LOYALTY_LOAD_SECONDS} // 20;

my $node = PostgreSQL::Test::Cluster->new('redemption_load');
$node->init;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'loyalty'");
$node->append_conf('postgresql.conf', "max_connections = 30");
$node->start;

$node->safe_psql('postgres', q{
    CREATE EXTENSION loyalty;
    SELECT loyalty.create_program('load', 'Load');
    SELECT loyalty.create_program('other', 'Other');
    CREATE FUNCTION prog(m int) RETURNS text LANGUAGE sql IMMUTABLE
        AS $$ SELECT CASE WHEN m <= 1800 THEN 'load' ELSE 'other' END $$;
    SELECT count(loyalty.enroll(prog(m), 'm' || m)) FROM generate_series(1, 2000) m;
    SELECT count(loyalty.earn(prog(m), 'm' || m, 300, 'start-' || m)) FROM generate_series(1, 2000) m;
    SELECT loyalty.add_charity(p, 'Charity') FROM unnest(ARRAY['load', 'other']) p;
    SELECT loyalty.add_reward(p, 'pen', 'A pen', 10) FROM unnest(ARRAY['load', 'other']) p;
    SELECT loyalty.add_reward(p, 'mug', 'A mug', 100, '{"stock": 300, "limit": {"count": 2}}') FROM unnest(ARRAY['load', 'other']) p;
    SELECT loyalty.add_reward(p, 'v', 'A voucher', 50, '{"kind": "voucher"}') FROM unnest(ARRAY['load', 'other']) p;
    CREATE SEQUENCE refs;
    -- the expected refusals under load; anything else aborts the pgbench client
    CREATE FUNCTION try(p_sql text) RETURNS int LANGUAGE plpgsql AS $$
    BEGIN
        EXECUTE p_sql;
        RETURN 1;
    EXCEPTION WHEN SQLSTATE 'LY001' OR SQLSTATE 'LY032' OR SQLSTATE 'LY034'
                OR SQLSTATE 'LY036' OR SQLSTATE 'LY037' THEN
        RETURN 0;
    END $$;
    CREATE FUNCTION try_hold(m int) RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE
        n bigint := nextval('refs');
    BEGIN
        PERFORM loyalty.hold(prog(m), 'm' || m, 60, 'h' || n, ttl => '1 second');
        RETURN n;
    EXCEPTION WHEN SQLSTATE 'LY001' THEN
        RETURN 0;
    END $$;
    CREATE FUNCTION try_resolve(m int, n bigint, c int) RETURNS int LANGUAGE sql AS $$
        SELECT CASE WHEN n = 0 OR c = 0 THEN 0     -- left to the job
                    WHEN c = 1 THEN try(format('SELECT loyalty.release(%L, %L)', prog(m), 'h' || n))
                    WHEN c = 2 THEN try(format('SELECT loyalty.capture(%L, %L)', prog(m), 'h' || n))
                    ELSE try(format('SELECT loyalty.capture(%L, %L, 35)', prog(m), 'h' || n)) END
    $$;
});
pass('set up 2,000 members in two programs');

my %scripts = (
    'redeem@5' => q{
\set m random(1, 2000)
\set k random(1, 3)
SELECT try(format('SELECT loyalty.redeem(%L, %L, %L, %L)', prog(:m), 'm' || :m, (ARRAY['pen', 'mug', 'v'])[:k], 'r' || nextval('refs')));
},
    'checkout@3' => q{
\set m random(1, 2000)
\set c random(0, 3)
SELECT try_hold(:m) AS h \gset
SELECT try_resolve(:m, :h, :c);
},
    'earn@2' => q{
\set m random(1, 2000)
SELECT loyalty.earn(prog(:m), 'm' || :m, 40, 'e' || nextval('refs'));
},
    'donate@1' => q{
\set m random(1, 2000)
SELECT try(format('SELECT loyalty.donate(%L, %L, %L, 5, %L)', prog(:m), 'm' || :m, 'Charity', 'd' || nextval('refs')));
},
    'transfer@1' => q{
\set m random(1, 2000)
\set d random(1, 50)
SELECT try(format('SELECT loyalty.transfer_points(%L, %L, %L, 15, %L)', prog(:m), 'm' || :m,
       'm' || CASE WHEN :m <= 1800 THEN (:m + :d - 1) % 1800 + 1 ELSE 1800 + (:m - 1800 + :d - 1) % 200 + 1 END,
       't' || nextval('refs')));
},
    'job@1' => q{
SELECT * FROM loyalty._job_release_holds(now(), 50);
},
);

$node->pgbench("--no-vacuum --client=8 --jobs=2 --time=$duration --protocol=simple",
    0, [qr{processed: [1-9]}], [qr{^$}], 'pgbench: redemption under load, no client aborted',
    \%scripts);

my $work = $node->safe_psql('postgres', q{
    SELECT (SELECT count(*) FROM loyalty.redemption) || ' redemptions, '
        || (SELECT count(*) FROM loyalty.hold) || ' holds, '
        || (SELECT count(*) FROM loyalty.transfer) || ' transfers'});
note("done: $work");

# Conservation per program:
#   issued = available (less held) + pending + held + redeemed + expired + donated + transferred
# where "transferred" is the net of member-to-member moves (0 for a program).
my $conservation = q{
    WITH p AS (SELECT id, code FROM loyalty.program),
    sys AS (
        SELECT a.program_id, a.kind,
               coalesce((SELECT sum(t.amount::bigint) FROM loyalty.transfer t WHERE t.credit_account_id = a.id), 0)
             - coalesce((SELECT sum(t.amount::bigint) FROM loyalty.transfer t WHERE t.debit_account_id = a.id), 0) AS net
        FROM loyalty.account a WHERE a.kind <> 'member'
    ), mem AS (
        SELECT a.program_id, sum(a.available::bigint - a.held::bigint) AS available, sum(a.pending::bigint) AS pending,
               sum(a.held::bigint) AS held
        FROM loyalty.account a WHERE a.kind = 'member' GROUP BY 1
    ), moved AS (
        SELECT t.program_id, 0::bigint AS net FROM loyalty.transfer t WHERE t.kind = 'transfer' GROUP BY 1
    )
    SELECT p.code,
           -(SELECT sum(net) FROM sys WHERE sys.program_id = p.id AND kind IN ('issuance', 'adjustment')) AS issued,
           m.available + m.pending + m.held
           + (SELECT sum(net) FROM sys WHERE sys.program_id = p.id AND kind = 'redemption')
           + (SELECT sum(net) FROM sys WHERE sys.program_id = p.id AND kind = 'breakage')
           + (SELECT sum(net) FROM sys WHERE sys.program_id = p.id AND kind = 'donation')
           + coalesce((SELECT net FROM moved WHERE moved.program_id = p.id), 0) AS accounted
    FROM p JOIN mem m ON m.program_id = p.id ORDER BY 1
};

sub check_books
{
    my ($when) = @_;
    my $rows = $node->safe_psql('postgres', $conservation);
    my @lines = split /\n/, $rows;
    is(scalar(@lines), 2, "$when: both programs accounted");
    for my $line (@lines)
    {
        my ($code, $issued, $accounted) = split /\|/, $line;
        ok($issued > 0, "$when: program $code issued points");
        is($accounted, $issued, "$when: program $code conserves its points");
    }
    is($node->safe_psql('postgres', q{
        SELECT count(*) FROM loyalty.account a
        WHERE a.kind = 'member' AND (a.available::bigint < 0 OR a.pending::bigint < 0 OR a.held::bigint < 0
                                     OR a.held::bigint > a.available::bigint)}),
        '0', "$when: no negative balance, no more held than there is");
    is($node->safe_psql('postgres', q{
        SELECT count(*) FROM loyalty.account a
        WHERE a.kind = 'member'
          AND (a.available::bigint + a.pending::bigint) <>
              coalesce((SELECT sum(l.remaining::bigint) FROM loyalty.lot l WHERE l.account_id = a.id), 0)}),
        '0', "$when: every member's balance equals its lots");
    is($node->safe_psql('postgres', q{
        SELECT count(*) FROM loyalty.account a
        WHERE a.kind = 'member'
          AND a.held::bigint <> coalesce((SELECT sum(h.amount::bigint) FROM loyalty.hold h
                                          WHERE h.account_id = a.id AND h.state = 'active'), 0)}),
        '0', "$when: held equals the active holds of every member");
}

check_books('under way');

my $released = $node->safe_psql('postgres',
    q{SELECT sum(rows) FROM (SELECT (loyalty._job_release_holds(now() + interval '1 hour', 100000)).rows) x});
note("the job released $released leftover holds");
is($node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.hold WHERE state = 'active'}), '0',
    'the job released every hold past its TTL');
check_books('after the job');

is($node->safe_psql('postgres', q{
    SELECT count(*) FROM loyalty.hold h
    WHERE (h.state = 'captured') <> EXISTS (SELECT FROM loyalty.transfer t
                                            WHERE t.program_id = h.program_id AND t.kind = 'capture' AND t.ref = h.ref)}),
    '0', 'a hold is captured exactly when a capture was posted for it');
ok($node->safe_psql('postgres', q{SELECT count(DISTINCT state) FROM loyalty.hold}) >= 3,
    'holds were captured, released and expired');
is($node->safe_psql('postgres', q{
    SELECT count(*) FROM loyalty.reward rw
    WHERE rw.stock_left IS NOT NULL
      AND rw.stock_left + (SELECT coalesce(sum(r.quantity), 0) FROM loyalty.redemption r
                           WHERE r.reward_id = rw.id AND r.state = 'done') <> 300}),
    '0', 'stock left plus units redeemed is the stock');
is($node->safe_psql('postgres', q{
    SELECT count(*) FROM (SELECT r.member_id FROM loyalty.redemption r JOIN loyalty.reward rw ON rw.id = r.reward_id
                          WHERE rw.code = 'mug' GROUP BY 1 HAVING sum(r.quantity) > 2) x}),
    '0', 'no member beyond the per-member limit');
is($node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.voucher v JOIN loyalty.redemption r ON r.id = v.redemption_id
                                  JOIN loyalty.reward rw ON rw.id = r.reward_id WHERE rw.code <> 'v'}),
    '0', 'only voucher rewards issued vouchers');
is($node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.verify_chain('load')})
   + $node->safe_psql('postgres', q{SELECT count(*) FROM loyalty.verify_chain('other')}),
    0, 'every hash chain verifies');

$node->stop;
done_testing();
