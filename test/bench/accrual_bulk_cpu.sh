#!/usr/bin/env bash
# CPU per purchase of a bulk insert, without the noise of a shared machine:
# the instructions (callgrind, cpu.bash) a single-user backend executes for
# one INSERT ... SELECT of 50,000 of accrual_bulk's purchases (bulk.bash's
# src, 10,000 members) into accrual_oltp's tables, with accrual attached vs
# bare. Informational: the budget is accrual_bulk's (at most 3x the bare
# insert's time), and this row's ratio is the attached insert's
# instructions over the bare one's, the same measure counted rather than
# timed. Each insert runs on a fresh copy of the set-up's cluster.
set -euo pipefail
. "$(dirname "$0")/oltp.bash"
. "$(dirname "$0")/cpu.bash"
BENCH_SCALE=0.05 . "$(dirname "$0")/bulk.bash"     # n = 50,000 purchases
m=10000         # bulk_purchases spreads them over oltp_setup's 10,000 members
cpu_cluster
{ echo "CREATE EXTENSION loyalty;"; oltp_setup "$m"
  bulk_purchases
  echo "VACUUM ANALYZE;"; } | cpu_psql
cpu_stop
cpu_as_pg cp -a "$cpu_work/data" "$cpu_work/template"
echo "INSERT INTO orders_bare SELECT * FROM src;" > "$cpu_work/bare.sql"
echo "INSERT INTO orders_acc SELECT * FROM src;" > "$cpu_work/acc.sql"

fresh() { rm -rf "$cpu_work/data"; cpu_as_pg cp -a "$cpu_work/template" "$cpu_work/data"; }
empty=$(cpu_empty)
fresh; bare=$(cpu_ir "$cpu_work/bare.sql")
fresh; acc=$(cpu_ir "$cpu_work/acc.sql")
echo "start-up and shut-down: $empty instructions; bare: $bare; attached: $acc ($n purchases)" >&2
per_bare=$(( (bare - empty) / n ))
per_acc=$(( (acc - empty) / n ))
r=$(awk -v a="$per_acc" -v b="$per_bare" 'BEGIN { printf "%.2f", a / b }')
echo "| accrual_bulk_cpu | instructions per purchase of INSERT ... SELECT of $n purchases, accrual attached vs bare (callgrind, single-user) | ${per_acc} | ${per_bare} | ${r} | (informational) | INFO |"
