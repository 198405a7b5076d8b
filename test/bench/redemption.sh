#!/usr/bin/env bash
# Redemption throughput under contention: 8 clients redeeming (one
# loyalty.redeem() per transaction) over 10,000 members, against pgbench's
# tpcb-like in the same run and database. Budget: at least 0.5 of tpcb-like.
#
# Run by scripts/bench (PGHOST, PGPORT, PGUSER, PGDATABASE with the extension
# created, BENCH_SCALE: 1.0 = 10,000 members and 30 s per run).
set -euo pipefail

scale=${BENCH_SCALE:-1.0}
members=$(awk -v s="$scale" 'BEGIN { n = int(10000 * s); print (n < 100 ? 100 : n) }')
seconds=$(awk -v s="$scale" 'BEGIN { n = int(30 * s); print (n < 5 ? 5 : n) }')
clients=8
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

psql -X -q -v ON_ERROR_STOP=1 <<SQL
SELECT loyalty.create_program('bench', 'Bench');
SELECT count(loyalty.enroll('bench', 'm' || m, occurred_at => '2025-01-01')) FROM generate_series(1, $members) m;
SELECT count(loyalty.earn('bench', 'm' || m, 100000000, 'start-' || m, occurred_at => '2025-01-01'))
FROM generate_series(1, $members) m;
SELECT loyalty.add_reward('bench', 'coffee', 'A coffee', 10);
CREATE SEQUENCE bench_ref CACHE 100;
VACUUM ANALYZE;
SQL
pgbench -q -i -s 10 >/dev/null 2>&1

cat > "$work/redeem.sql" <<SQL
\set m random(1, $members)
SELECT redemption_id FROM loyalty.redeem('bench', 'm' || :m, 'coffee', 'r' || nextval('bench_ref'));
SQL

# The two workloads alternate, four rounds of a quarter of the time each after
# a short warm-up of both, and each keeps its best round: the machine may be
# shared, and a burst of someone else's work should not decide the ratio.
tps() { sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p'; }
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a + 0 > b + 0) ? a : b }'; }
quarter=$(( (seconds + 3) / 4 ))
pgbench -n -c $clients -j 2 -T 3 -b tpcb-like >/dev/null 2>&1
pgbench -n -c $clients -j 2 -T 3 -f "$work/redeem.sql" >/dev/null 2>&1
base=0 redeem=0
for round in 1 2 3 4; do
    base=$(best "$base" "$(pgbench -n -c $clients -j 2 -T "$quarter" -b tpcb-like 2>/dev/null | tps)")
    redeem=$(best "$redeem" "$(pgbench -n -c $clients -j 2 -T "$quarter" -f "$work/redeem.sql" 2>/dev/null | tps)")
done
broken=$(psql -X -At -c "SELECT count(*) FROM loyalty.verify_chain('bench')")

awk -v r="$redeem" -v b="$base" -v m="$members" -v c="$clients" -v broken="$broken" 'BEGIN {
    ratio = r / b
    ok = (ratio >= 0.5 && broken == 0) ? "PASS" : "FAIL"
    printf "| redemption | redeem() per transaction, %d clients over %d members | %.0f tps | %.0f tps (pgbench tpcb-like) | %.2f | >= 0.5 | %s |\n", c, m, r, b, ratio, ok
}'
