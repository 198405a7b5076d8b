#!/usr/bin/env bash
# OLTP accrual: single-purchase INSERTs from 8 pgbench clients into a table
# with accrual attached vs the same table bare, and vs pgbench's tpcb-like
# in the same database, the three taking turns. Budgets (DESIGN.md): >= 0.6 of bare, >= 1.5x
# tpcb-like.
set -euo pipefail
. "$(dirname "$0")/oltp.bash"
secs=$(awk -v s="$BENCH_SCALE" 'BEGIN { v = int(60 * s); if (v < 10) v = 10; printf "%d", v }')
m=10000
q() { psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "set-up: $m members, ${secs} s per run" >&2
{ oltp_setup "$m"; echo "CREATE SEQUENCE order_id;"; } | q >/dev/null
for t in bare acc; do
    cat > "$work/$t.sql" <<SQL
\set m random(1, $m)
\set c random(100, 20000)
INSERT INTO orders_$t VALUES (nextval('order_id')::text, 'm' || :m, :c / 100.0, now(), 'books');
SQL
done
chmod -R a+rX "$work"

run() {         # run bare|acc|tpcb SECONDS: tps of 8 clients
    local script=(-f "$work/$1.sql")
    [ "$1" = tpcb ] && script=(-b tpcb-like)
    q -c "CHECKPOINT" >/dev/null
    pgbench -n -c 8 -j 2 -T "$2" "${script[@]}" 2>&1 | tee -a "$work/$1.log" \
        | sed -n 's/^tps = \([0-9.]*\) .*/\1/p'
}
# pgbench's tables for tpcb-like, in the same database; a short warm-up
# of each; then the measured runs: the bare table, the attached table and
# tpcb-like take turns, five runs each of a fifth of the time (each turn
# starting with the next one), and each figure is its mean tps over its
# runs. On a shared 2-core VM throughput drifts over minutes: one run of
# each, a minute apart, put the drift into the ratio (0.48 to 0.63 for one
# build), and tpcb-like run after the turns once judged the attached table
# at 1.15x of it (its turns had run at half the speed of the rest).
pgbench -q -i -s 10 >/dev/null 2>&1
pgbench -n -c 8 -j 2 -T 3 -f "$work/bare.sql" >/dev/null 2>&1
pgbench -n -c 8 -j 2 -T 3 -f "$work/acc.sql" >/dev/null 2>&1
pgbench -n -c 8 -j 2 -T 3 -b tpcb-like >/dev/null 2>&1
turns=5
each=$(( secs / turns )); [ "$each" -lt 5 ] && each=5
bare_runs=(); acc_runs=(); tpcb_runs=()
for i in $(seq 1 $turns); do
    # the three take turns, each turn starting with the next one
    for k in 0 1 2; do
        case $(( (i + k) % 3 )) in
            0) b=$(run bare "$each") ;;
            1) a=$(run acc "$each") ;;
            2) t=$(run tpcb "$each") ;;
        esac
    done
    bare_runs+=("$b"); acc_runs+=("$a"); tpcb_runs+=("$t")
    echo "turn $i: bare $b tps, accrual attached $a tps ($(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", a / b }')), tpcb-like $t tps" >&2
done
mean() { printf '%s\n' "$@" | awk '{ s += $1 } END { printf "%.0f", s / NR }'; }
bare=$(mean "${bare_runs[@]}"); echo "bare: $bare tps ($turns runs of $each s)" >&2
acc=$(mean "${acc_runs[@]}");   echo "accrual attached: $acc tps ($turns runs of $each s)" >&2
tpcb=$(mean "${tpcb_runs[@]}"); echo "tpcb-like: $tpcb tps ($turns runs of $each s)" >&2
grep -E "failed|aborted" "$work/acc.log" >&2 || true
# The sales deferred their journal lines and lots (docs/accrual.md): the
# vest job writes them, and the chains must verify with them written.
q -c "SELECT 'purchases posted: ' || count(*) || ', deferred: ' || count(*) FILTER (WHERE transfer_id IS NULL AND points > 0) FROM loyalty.accrual" >&2
s=$(date +%s.%N)
q -c "SELECT 'vest job: ' || rows || ' lots, ' || batches || ' batches' FROM loyalty.run_job('vest', now() + interval '400 days')" >&2
e=$(date +%s.%N)
echo "vest job took $(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.2f", e - s }') s" >&2
q -c "SELECT 'still deferred: ' || count(*) FILTER (WHERE transfer_id IS NULL AND points > 0) || ', chain problems: ' || (SELECT count(*) FROM loyalty.verify_chain('shop')) FROM loyalty.accrual" >&2

# verdicts on the ratio itself, not on its rounding (0.596 is not 0.6)
r=$(awk -v a="$acc" -v b="$bare" 'BEGIN { printf "%.3f", a / b }')
v=$(awk -v a="$acc" -v b="$bare" 'BEGIN { print (a / b >= 0.6) ? "PASS" : "FAIL" }')
echo "| accrual_oltp | single-purchase INSERT, 8 clients, accrual attached vs bare | ${acc} tps | ${bare} tps | ${r} | >= 0.6 | $v |"
r2=$(awk -v a="$acc" -v b="$tpcb" 'BEGIN { printf "%.2f", a / b }')
v2=$(awk -v a="$acc" -v b="$tpcb" 'BEGIN { print (a / b >= 1.5) ? "PASS" : "FAIL" }')
echo "| accrual_oltp | same, accrual attached vs pgbench tpcb-like | ${acc} tps | ${tpcb} tps | ${r2} | >= 1.5 | $v2 |"
