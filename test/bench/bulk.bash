# Shared by the bulk accrual benches (sourced, not run: scripts/bench runs
# only *.sh). One definition of the purchases they insert, so that their
# figures stay comparable, and of how a statement is timed.
#
#   n, m        purchases and members at BENCH_SCALE (1,000,000 and 10,000)
#   q           psql for the bench database
#   bulk_src    SQL creating src (the purchases) and orders_bare (the bare table):
#               bulk_purchases, then bulk_bare
#   timed SQL   seconds the statement takes, after a checkpoint (and, the first
#               time, 2 GB of WAL written untimed: see wal_warm)

n=$(awk -v s="$BENCH_SCALE" 'BEGIN { printf "%d", 1000000 * s }')
m=$(awk -v s="$BENCH_SCALE" 'BEGIN { v = int(10000 * s); if (v < 100) v = 100; printf "%d", v }')
q() { psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }

bulk_purchases() {
    cat <<SQL
CREATE TABLE src AS
SELECT 'o' || i AS id, 'm' || (i % $m + 1) AS customer,
       ((i::bigint * 7919) % 20000 / 100.0 + 0.5)::numeric(12,2) AS total,
       timestamptz '2025-03-01' + (i % 100000) * interval '1 minute' AS placed_at,
       (ARRAY['books', 'food', 'electronics', 'toys', 'gift_card'])[i % 5 + 1] AS category
FROM generate_series(1, $n) i;
SQL
}
bulk_bare() {
    cat <<SQL
CREATE TABLE orders_bare (id text PRIMARY KEY, customer text, total numeric(12,2),
                          placed_at timestamptz, category text);
SQL
}
bulk_src() { bulk_purchases; bulk_bare; }

# A fresh cluster has no WAL segment to recycle: the first statement that
# writes a lot of WAL creates and fills new segment files as it goes, which
# a running server never does (checkpoints recycle segments). Whichever of
# the timed statements writes the most WAL would pay that alone. So 2 GB of
# WAL (at BENCH_SCALE 1) is written once, untimed, before the first timed
# statement; scripts/bench's min_wal_size keeps its segments through the
# checkpoints that follow, to be recycled.
wal_warm() {
    # once per server: timed runs in a subshell ($(timed ...)), so the mark
    # is a file, in the server's socket directory (scripts/bench makes a new
    # one per run) or else named after its port
    local mark="${TMPDIR:-/tmp}/loyalty_bench_wal_warm.${PGPORT:-5432}"
    [ -d "${PGHOST:-}" ] && [ -w "${PGHOST:-}" ] && mark="$PGHOST/loyalty_bench_wal_warm"
    [ -e "$mark" ] && return
    q -c "CREATE TABLE wal_warm AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, greatest($n * 2, 100000))" \
      -c "DROP TABLE wal_warm" -c "CHECKPOINT" >/dev/null
    : > "$mark"
}

timed() {
    local s e
    wal_warm
    q -c "CHECKPOINT" >/dev/null
    s=$(date +%s.%N)
    q -c "$1" >/dev/null
    e=$(date +%s.%N)
    awk -v s="$s" -v e="$e" 'BEGIN { printf "%.2f", e - s }'
}
