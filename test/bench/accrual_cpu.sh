#!/usr/bin/env bash
# CPU per sale, without the noise of a shared machine: the instructions
# (callgrind) a single-user backend executes for 3,000 one-row INSERTs,
# each its own transaction, into the bench's orders table with accrual
# attached vs the same table bare. Throughput on a 2-core VM moves by a
# fifth between runs of the same build; instruction counts move by less
# than 0.1 %, so this is the figure that shows what a change to the sale's
# path saves. Informational: the budget is accrual_oltp's; this row's
# "ratio" is the trigger's instructions per sale over the bare insert's.
set -euo pipefail
. "$(dirname "$0")/oltp.bash"
command -v valgrind >/dev/null || { echo "accrual_cpu: valgrind is missing (scripts/setup bench)" >&2; exit 1; }
bindir=$(pg_config --bindir)
n=3000
work=$(mktemp -d /tmp/loyalty_cpu.XXXXXX)
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres: "$work"
stop() { as_pg "$bindir/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap stop EXIT

# a cluster of its own (single-user mode needs it stopped), set up as accrual_oltp's
as_pg "$bindir/initdb" -D "$work/data" -A trust -U postgres >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
shared_preload_libraries = 'loyalty'
listen_addresses = ''
unix_socket_directories = '$work'
shared_buffers = 256MB
synchronous_commit = off
CONF
as_pg "$bindir/pg_ctl" -D "$work/data" -l "$work/log" -w start >/dev/null
# A history of 20,000 purchases in both tables first (through the trigger
# for the attached one), then VACUUM ANALYZE: the measured sales go where a
# running program's do, into btrees of some depth and a block range of
# accrual_time_brin that no VACUUM has summarized yet. Into empty tables
# they land in the first block range, whose summary the index's creation
# made, and each widens it: the index cost 14,500 instructions per sale
# there, against 5,600 with the history (measured when the history was
# added; without the index: 224,450 and 221,393 per sale).
{ echo "CREATE EXTENSION loyalty;"; oltp_setup 10000
  for t in bare acc; do
      echo "INSERT INTO orders_$t SELECT 'h' || i, 'm' || (i % 10000 + 1), (i % 200 + 1) + 0.5,"
      echo "       now() - interval '20 days' + i * interval '1 minute', 'books' FROM generate_series(1, 20000) i;"
  done
  echo "VACUUM ANALYZE;"; } |
    as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$work" -d postgres >/dev/null
as_pg "$bindir/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null
for t in bare acc; do
    for i in $(seq 1 $n); do
        echo "INSERT INTO orders_$t VALUES ('o$i', 'm$(( (i * 7919) % 10000 + 1 ))', $(( i % 200 + 1 )).50, now(), 'books');"
    done > "$work/$t.sql"
done
chmod a+r "$work"/*.sql

ir() {          # ir TABLE: instructions of the backend running the inserts
    as_pg valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bindir/postgres" --single \
        -D "$work/data" postgres < "$work/$1.sql" 2>&1 >"$work/$1.out" | sed -n 's/.*refs: *//p' | tr -d ,
}
empty=$(as_pg valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bindir/postgres" --single \
        -D "$work/data" postgres < /dev/null 2>&1 | sed -n 's/.*refs: *//p' | tr -d ,)
bare=$(ir bare)
acc=$(ir acc)
grep -h ERROR "$work/bare.out" "$work/acc.out" >&2 && exit 1
echo "start-up and shut-down: $empty instructions; bare: $bare; attached: $acc" >&2
per_bare=$(( (bare - empty) / n ))
per_trigger=$(( (acc - bare) / n ))
r=$(awk -v a="$per_trigger" -v b="$per_bare" 'BEGIN { printf "%.2f", a / b }')
echo "| accrual_cpu | instructions per one-row sale: what accrual adds vs the bare insert's (callgrind, single-user) | ${per_trigger} | ${per_bare} | ${r} | (informational) | INFO |"
