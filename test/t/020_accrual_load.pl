# The shop's own orders table with accrual attached, under 8 clients that
# insert orders (some for unknown customers), delete orders and lower their
# totals for some seconds. No sale may fail; every order of a member earns
# exactly once; refunds match what was returned; the books and the chains
# hold. A second program with a return window runs beside it: its sales
# defer their journal lines and lots (docs/accrual.md), which debits, refunds
# and vest jobs racing them write; its books hold with the lines deferred and
# once the last vest job has written them all.
use strict;
use warnings;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib $FindBin::Bin;
use LoyaltyBooks;

my $node = shop_node('accrual', 200);

$node->safe_psql('postgres', q{
    SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1.00, "points": 1, "rounding": "floor"}}',
                                     '2020-01-01', 'load test');
    CREATE TABLE orders (seq_no bigserial, order_no text PRIMARY KEY, customer text,
                         total numeric(10,2), sold_at timestamptz DEFAULT now());
    SELECT loyalty.attach_accrual('orders', 'shop', 'customer', 'total', 'order_no',
                                  occurred_at_column => 'sold_at');
    SELECT loyalty.create_program('ret', 'Returns');
    SELECT loyalty.enroll('ret', 'm' || i, occurred_at => '2020-01-01') FROM generate_series(1, 200) i;
    SELECT loyalty.set_earning_rules('ret', '{"base": {"per": 1.00, "points": 1}, "pending_days": 30}',
                                     '2020-01-01', 'load test, with a return window');
    -- sold 40 days ago: past their return window, so that debits dated now
    -- can spend them (a debit reads lots by business time)
    CREATE TABLE orders_ret (LIKE orders INCLUDING ALL);
    ALTER TABLE orders_ret ALTER sold_at SET DEFAULT now() - interval '40 days';
    SELECT loyalty.attach_accrual('orders_ret', 'ret', 'customer', 'total', 'order_no',
                                  occurred_at_column => 'sold_at');
    -- a debit of one point, when the member has one (LY001 otherwise)
    CREATE FUNCTION debit(m text) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM loyalty.adjust('ret', m, -1, 'd-' || random(), 'load');
    EXCEPTION WHEN SQLSTATE 'LY001' THEN NULL;
    END $$;
});

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
},
    'insert_ret.sql' => q{\set m random(1, 200)
\set cents random(100, 50000)
INSERT INTO orders_ret (order_no, customer, total) VALUES ('r-' || :client_id || '-' || :m || '-' || :cents || '-' || random(), 'm' || :m, :cents / 100.0);
},
    'delete_ret.sql' => q{\set r random(1, 30000)
DELETE FROM orders_ret WHERE seq_no = :r;
},
    'debit_ret.sql' => q{\set m random(1, 200)
SELECT debit('m' || :m);
},
    'vest.sql' => q{SELECT loyalty.run_job('vest', now() + interval '31 days');
});
my ($out, $err) = run_scripts($node, \%scripts, 8, 15,
    'insert.sql@6', 'delete.sql@2', 'lower.sql@2', 'insert_ret.sql@6', 'delete_ret.sql@1',
    'debit_ret.sql@2', 'vest.sql@1');
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
    SELECT count(*) FROM (SELECT order_no, customer FROM orders UNION ALL SELECT order_no, customer FROM orders_ret) o
    WHERE substr(o.customer, 2)::int <= 200
      AND (SELECT count(*) FROM loyalty.accrual a WHERE a.ref = o.order_no) <> 1}),
   '0', 'every order of a member earned exactly once');

is($q->(q{
    SELECT count(*) FROM orders o
    WHERE substr(o.customer, 2)::int > 200
      AND NOT EXISTS (SELECT FROM loyalty.accrual_quarantine q WHERE q.ref = o.order_no)}),
   '0', 'every order of an unknown customer is in the quarantine');

is($q->(q{
    SELECT count(*) FROM loyalty.accrual a
    LEFT JOIN (SELECT order_no, total FROM orders UNION ALL SELECT order_no, total FROM orders_ret) o
           ON o.order_no = a.ref
    WHERE a.amount - a.refunded_amount IS DISTINCT FROM coalesce(o.total, 0)}),
   '0', 'what is refunded is what was returned (deleted orders wholly, lowered ones by the difference)');

is($q->(q{
    SELECT count(*) FROM loyalty.accrual a
    WHERE a.refunded_points > a.points OR a.refunded_points < 0}),
   '0', 'no purchase gave back more than it earned');

is($q->(q{SELECT count(*) FROM loyalty.account WHERE available::bigint < 0 OR pending::bigint < 0}),
   '0', 'no negative balance');

is($q->(q{
    SELECT (SELECT sum(x.points - x.refunded_points) FROM loyalty.accrual x
             JOIN loyalty.program p ON p.id = x.program_id WHERE p.code = 'shop')
         = (SELECT sum(a.available::bigint + a.pending::bigint) FROM loyalty.account a
             JOIN loyalty.program p ON p.id = a.program_id WHERE p.code = 'shop' AND a.kind = 'member')}),
   't', 'the members hold exactly what their purchases earned less what refunds took');

# with the return window: the lines deferred, and written by debits,
# refunds and the vest jobs that ran among the sales; one statement more
# leaves every member some deferred
$q->(q{INSERT INTO orders_ret (order_no, customer, total)
       SELECT 'last-' || i, 'm' || i, 12.50 FROM generate_series(1, 200) i});
my ($deferred, $written, $debits) = split /\|/, $q->(q{
    SELECT count(*) FILTER (WHERE x.transfer_id IS NULL AND x.points > 0),
           count(*) FILTER (WHERE x.transfer_id IS NOT NULL),
           (SELECT count(*) FROM loyalty.transfer t WHERE t.kind = 'adjust')
    FROM loyalty.accrual x JOIN loyalty.program p ON p.id = x.program_id WHERE p.code = 'ret'});
cmp_ok($written, '>', 50, "deferred lines were written among the sales ($written)");
cmp_ok($debits, '>', 50, "debits were posted ($debits)");
cmp_ok($deferred, '>=', 200, "purchases are deferred at the check ($deferred)");

my $statements = q{
    SELECT count(*) FROM loyalty.account a JOIN loyalty.member m ON m.id = a.member_id
    WHERE m.program_id = (SELECT id FROM loyalty.program WHERE code = 'ret')
      AND (a.available::bigint + a.pending::bigint)
          IS DISTINCT FROM (SELECT coalesce(sum(s.points), 0) FROM loyalty.statement('ret', m.member_ref) s)};
is($q->($books), '0', "each member account holds its lots and its deferred purchases ($deferred deferred)");
is($q->($lists), '0', "each member's list of purchases holds exactly their purchases");
is($q->($deferred_counts),
   '0', 'each account counts its deferred purchases');
# the walk every reader and writer finds deferred purchases by (from the
# list's head down to the account's last written line) finds them all
is($q->(q{SELECT count(*) FROM (
            (SELECT d.ref FROM loyalty._deferred_purchases(ARRAY(SELECT id FROM loyalty.account WHERE kind = 'member')) d
             EXCEPT ALL
             SELECT x.ref FROM loyalty.accrual x WHERE x.transfer_id IS NULL AND x.points > 0)
            UNION ALL
            (SELECT x.ref FROM loyalty.accrual x WHERE x.transfer_id IS NULL AND x.points > 0
             EXCEPT ALL
             SELECT d.ref FROM loyalty._deferred_purchases(ARRAY(SELECT id FROM loyalty.account WHERE kind = 'member')) d)) z}),
   '0', 'walking the lists finds every deferred purchase and nothing else');
is($q->($statements), '0', 'each statement of the return-window program adds up to the balance');
is($q->(q{SELECT count(*) FROM loyalty.verify_chain('shop')}) + $q->(q{SELECT count(*) FROM loyalty.verify_chain('ret')}),
   0, 'every chain verifies');

# the last vest job writes every deferred line; the books and chains hold
$q->(q{SELECT loyalty.run_job('vest', now() + interval '31 days')});
is($q->(q{SELECT count(*) FROM loyalty.accrual WHERE transfer_id IS NULL AND points > 0}), '0',
   'the vest job wrote every deferred line');
is($q->($books), '0', 'each member account holds the sum of its lots');
is($q->($statements), '0', 'each statement still adds up to the balance');
is($q->(q{SELECT count(*) FROM loyalty.verify_chain('ret')}), '0', 'every chain verifies with them written');

$node->stop;
done_testing();
