#!/usr/bin/env bash
# CPU per sale, without the noise of a shared machine: the instructions
# (callgrind) a single-user backend executes for 3,000 one-row INSERTs,
# each its own transaction, into the bench's orders table with accrual
# attached vs the same table bare (cpu.bash). Informational: the budget is
# accrual_oltp's; this row's "ratio" is the trigger's instructions per
# sale over the bare insert's.
set -euo pipefail
. "$(dirname "$0")/oltp.bash"
. "$(dirname "$0")/cpu.bash"
n=3000

# A history of 20,000 purchases in both tables first (through the trigger
# for the attached one), then VACUUM ANALYZE: the measured sales go where a
# running program's do, into btrees of some depth and a block range of
# accrual_time_brin that no VACUUM has summarized yet. Into empty tables
# they land in the first block range, whose summary the index's creation
# made, and each widens it: the index cost 14,500 instructions per sale
# there, against 5,600 with the history (measured when the history was
# added; without the index: 224,450 and 221,393 per sale).
cpu_cluster
{ echo "CREATE EXTENSION loyalty;"; oltp_setup 10000
  for t in bare acc; do
      echo "INSERT INTO orders_$t SELECT 'h' || i, 'm' || (i % 10000 + 1), (i % 200 + 1) + 0.5,"
      echo "       now() - interval '20 days' + i * interval '1 minute', 'books' FROM generate_series(1, 20000) i;"
  done
  echo "VACUUM ANALYZE;"; } | cpu_psql
cpu_stop
for t in bare acc; do
    for i in $(seq 1 $n); do
        echo "INSERT INTO orders_$t VALUES ('o$i', 'm$(( (i * 7919) % 10000 + 1 ))', $(( i % 200 + 1 )).50, now(), 'books');"
    done > "$cpu_work/$t.sql"
done

empty=$(cpu_empty)
bare=$(cpu_ir "$cpu_work/bare.sql")
acc=$(cpu_ir "$cpu_work/acc.sql")
echo "start-up and shut-down: $empty instructions; bare: $bare; attached: $acc" >&2
per_bare=$(( (bare - empty) / n ))
per_trigger=$(( (acc - bare) / n ))
r=$(awk -v a="$per_trigger" -v b="$per_bare" 'BEGIN { printf "%.2f", a / b }')
echo "| accrual_cpu | instructions per one-row sale: what accrual adds vs the bare insert's (callgrind, single-user) | ${per_trigger} | ${per_bare} | ${r} | (informational) | INFO |"
