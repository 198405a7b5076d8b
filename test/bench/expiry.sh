#!/usr/bin/env bash
# Expiry of 1,000,000 lots (times BENCH_SCALE): the expire job (run_job, and
# batches committed one by one as the worker does) against one set-based SQL
# statement doing the same writes (transfers chained with loyalty.chain(),
# lot_use, lots, member balances and chain heads). Budget: within 2x.
#
# Run by `make bench` (scripts/bench), which gives PGHOST, PGPORT, PGUSER,
# PGDATABASE (extension created) and BENCH_SCALE.
set -euo pipefail
scale=${BENCH_SCALE:-1.0}
lots=$(awk -v s="$scale" 'BEGIN { n = int(1000000 * s); print (n < 1000 ? 1000 : n) }')
per=10                                  # lots per member
members=$((lots / per))
psql=(psql -X -q -v ON_ERROR_STOP=1 -At)

# Three programs with the same members and lots, all past their expiry,
# written set-based as earn() would write them (so the chains verify).
setup() {   # setup PROGRAM
    "${psql[@]}" -v prog="$1" -v members="$members" -v per="$per" <<'SQL'
SET loyalty.actor = 'bench';
SET search_path = loyalty, public;
SELECT loyalty.create_program(:'prog', :'prog', 'UTC', '{"expiry": {"policy": "fixed", "after": "1 day"}}') > 0;
INSERT INTO loyalty.member (program_id, member_ref, enrolled_at)
SELECT loyalty._program_id(:'prog'), 'm' || i, '2020-01-01' FROM generate_series(1, :members) i;
INSERT INTO loyalty.account (program_id, kind, member_id)
SELECT m.program_id, 'member', m.id FROM loyalty.member m WHERE m.program_id = loyalty._program_id(:'prog') ORDER BY m.id;
CREATE TEMP TABLE src AS
WITH s AS (
    SELECT a.id AS account_id, a.program_id, i.id AS issuance, (1 + j % 7)::bigint AS amount,
           timestamptz '2020-01-02' + j * interval '1 minute' AS at
    FROM loyalty.account a
    JOIN loyalty.account i ON i.program_id = a.program_id AND i.kind = 'issuance'
    CROSS JOIN generate_series(1, :per) j
    WHERE a.program_id = loyalty._program_id(:'prog') AND a.kind = 'member'
    ORDER BY a.id, j
), n AS (
    SELECT s.*, nextval('loyalty.transfer_id_seq') AS tid FROM s
), h AS (
    SELECT n.*, 'e' || n.tid AS ref,
           loyalty.chain(NULL, true, n.program_id, n.issuance, n.account_id, n.amount::loyalty.points, 'earn',
                         'e' || n.tid, n.at, now(), NULL::integer, 'bench', NULL::text)
               OVER (PARTITION BY n.account_id ORDER BY n.tid) AS hash
    FROM n
)
SELECT h.*, lag(h.hash) OVER (PARTITION BY h.account_id ORDER BY h.tid) AS prev FROM h;
INSERT INTO loyalty.transfer (id, program_id, debit_account_id, credit_account_id, amount, kind, ref, occurred_at,
                              posted_at, rule_version, actor, reason, debit_prev_hash, credit_prev_hash, hash)
SELECT tid, program_id, issuance, account_id, amount, 'earn', ref, at, now(), NULL, 'bench', NULL, NULL, prev, hash
FROM src ORDER BY tid;
INSERT INTO loyalty.lot (account_id, transfer_id, amount, remaining, occurred_at, vests_at, expires_at)
SELECT account_id, tid, amount, amount, at, at, at + interval '1 day' FROM src ORDER BY tid;
UPDATE loyalty.account a SET available = s.total::loyalty.points, last_hash = s.hash, last_transfer_id = s.tid
FROM (SELECT DISTINCT ON (account_id) account_id, tid, hash,
             sum(amount) OVER (PARTITION BY account_id) AS total
      FROM src ORDER BY account_id, tid DESC) s
WHERE a.id = s.account_id;
SQL
}

for p in base job; do setup "$p"; done
"${psql[@]}" -c "VACUUM ANALYZE"

# The baseline: one statement, no batches, no locks, the same writes.
baseline_sql=$(cat <<'SQL'
SET loyalty.actor = 'bench';
SET search_path = loyalty, public;
\timing on
WITH due AS (
    SELECT d.*, nextval('loyalty.transfer_id_seq') AS tid
    FROM (SELECT l.id AS lot_id, l.account_id, a.program_id, b.id AS breakage_id, l.remaining, l.pending,
                 l.expires_at AS moment, 'lot:' || l.id AS ref, a.last_hash AS head
          FROM loyalty.lot l
          JOIN loyalty.account a ON a.id = l.account_id
          JOIN loyalty.account b ON b.program_id = a.program_id AND b.kind = 'breakage' AND b.name = ''
          WHERE a.program_id = loyalty._program_id('base') AND l.remaining > 0 AND l.expires_at <= now()
          ORDER BY l.account_id, l.expires_at, l.id) d
), hashed AS (
    SELECT d.*, loyalty.chain(d.head, false, d.program_id, d.account_id, d.breakage_id, d.remaining,
                              'expire', d.ref, d.moment, now(), NULL::integer, 'bench', NULL::text)
                    OVER (PARTITION BY d.account_id ORDER BY d.tid) AS hash
    FROM due d
), chained AS (
    SELECT h.*, coalesce(lag(h.hash) OVER w, h.head) AS prev,
           row_number() OVER (PARTITION BY h.account_id ORDER BY h.tid DESC) AS from_last
    FROM hashed h WINDOW w AS (PARTITION BY h.account_id ORDER BY h.tid)
), t AS (
    INSERT INTO loyalty.transfer (id, program_id, debit_account_id, credit_account_id, amount, kind, ref,
                                  occurred_at, posted_at, rule_version, actor, reason,
                                  debit_prev_hash, credit_prev_hash, hash)
    SELECT c.tid, c.program_id, c.account_id, c.breakage_id, c.remaining, 'expire', c.ref,
           c.moment, now(), NULL, 'bench', NULL, c.prev, NULL, c.hash FROM chained c
), u AS (
    INSERT INTO loyalty.lot_use (transfer_id, lot_id, account_id, amount, occurred_at)
    SELECT c.tid, c.lot_id, c.account_id, c.remaining, c.moment FROM chained c
), l AS (
    UPDATE loyalty.lot l SET remaining = 0 FROM chained c WHERE l.id = c.lot_id
), a AS (
    UPDATE loyalty.account a
       SET available = (a.available::bigint - s.avail)::loyalty.points,
           last_hash = s.last_hash, last_transfer_id = s.last_tid
      FROM (SELECT c.account_id, sum(c.remaining::bigint) AS avail,
                   (array_agg(c.hash) FILTER (WHERE c.from_last = 1))[1] AS last_hash, max(c.tid) AS last_tid
            FROM chained c GROUP BY c.account_id) s
     WHERE a.id = s.account_id
)
SELECT count(*) FROM chained;
SQL
)

ms() {      # ms: the last "Time: N ms" psql printed, from stdin
    sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1
}

base_ms=$(printf '%s\n' "$baseline_sql" | "${psql[@]}" | ms)
"${psql[@]}" -c "VACUUM ANALYZE"

# The job through run_job: one transaction, batches of the job's batch size.
job_ms=$(printf '%s\n' "SET loyalty.actor = 'bench';" '\timing on' \
         "SELECT * FROM loyalty.run_job('expire');" | "${psql[@]}" | ms)
setup step                              # only now, so that run_job did not see it
"${psql[@]}" -c "VACUUM ANALYZE"

# The job as the worker runs it: each batch its own transaction (a procedure
# that commits between batches, as the worker does between SPI calls).
"${psql[@]}" <<'SQL'
CREATE PROCEDURE public.bench_worker_run() LANGUAGE plpgsql AS $$
DECLARE
    v_run bigint;
BEGIN
    v_run := loyalty._job_start('expire', now(), true);
    COMMIT;
    WHILE loyalty._job_step(v_run) > 0 LOOP
        COMMIT;
    END LOOP;
    PERFORM loyalty._job_finish(v_run, 'expire', now());
    COMMIT;
END $$;
SQL
step_ms=$(printf '%s\n' "SET loyalty.actor = 'bench';" '\timing on' "CALL public.bench_worker_run();" | "${psql[@]}" | ms)

# The same writes: each program expired all its lots, once.
check=$("${psql[@]}" -c "
    SELECT string_agg(format('%s:%s:%s:%s', p.code, count, sum, left_), ' ' ORDER BY p.code)
    FROM loyalty.program p,
    LATERAL (SELECT count(*) AS count, sum(t.amount::bigint) AS sum FROM loyalty.transfer t
             WHERE t.program_id = p.id AND t.kind = 'expire') x,
    LATERAL (SELECT sum(l.remaining::bigint) AS left_ FROM loyalty.lot l
             JOIN loyalty.account a ON a.id = l.account_id WHERE a.program_id = p.id) y")
echo "# expired per program (code:transfers:points:left): $check" >&2
counts=$(printf '%s\n' $check | cut -d: -f2-4 | sort -u | wc -l)

row() {     # row WHAT VALUE_MS
    local ratio verdict
    ratio=$(awk -v a="$2" -v b="$base_ms" 'BEGIN { printf "%.2f", a / b }')
    verdict=$(awk -v a="$2" -v b="$base_ms" -v c="$counts" 'BEGIN { print (a / b <= 2 && c == 1) ? "PASS" : "FAIL" }')
    printf '| expiry | %s (%s lots) | %.0f ms | %.0f ms | %s | <= 2 | %s |\n' "$1" "$lots" "$2" "$base_ms" "$ratio" "$verdict"
}
row "run_job('expire') vs one set-based statement" "$job_ms"
row "worker-style batches, each committed, vs one set-based statement" "$step_ms"
