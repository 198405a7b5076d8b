#!/usr/bin/env bash
# Floor of bulk accrual: what the rows accrual must write cost by themselves,
# written by plain INSERT ... SELECT into copies of the extension's own tables
# (LIKE ... INCLUDING ALL, so the copies carry the same columns, constraints
# and indexes as the schema in force), next to the bare insert and the real
# attached trigger in the same run. No rules, no hashing, no balances, no
# transition table: the least any code posting these rows can cost.
#
# These rows carry no budget (INFO): they say how far the accrual_bulk budget
# (<= 3x bare) is from what the data model itself costs. See
# docs/performance.md, "The floor of the data model".
set -euo pipefail
. "$(dirname "$0")/bulk.bash"

echo "set-up: $n purchases of $m members" >&2
q >/dev/null <<SQL
SELECT loyalty.create_program('acc', 'acc', 'UTC');
SELECT count(loyalty.enroll('acc', 'm' || i, occurred_at => '2025-01-01')) FROM generate_series(1, $m) i;
SELECT loyalty.set_earning_rules('acc', '{"base": {"per": 1, "points": 1, "rounding": "floor"},
  "caps": {"per_purchase": 10000}, "pending_days": 30, "min_amount": 1}', '2025-01-01', 'bench');
$(bulk_src)
CREATE TABLE orders_acc (LIKE orders_bare INCLUDING ALL);
SELECT loyalty.attach_accrual('orders_acc', 'acc', 'customer', 'total', 'id', 'placed_at', 'category');
-- The three rows a purchase posts, in copies of the real tables.
CREATE TABLE f_accrual (LIKE loyalty.accrual INCLUDING ALL);
CREATE TABLE f_transfer (LIKE loyalty.transfer INCLUDING ALL);
CREATE TABLE f_lot (LIKE loyalty.lot INCLUDING ALL);
-- The narrowest purchase record idempotency allows: the same columns, and
-- only the unique index on the ref.
CREATE TABLE f_slim (LIKE loyalty.accrual INCLUDING DEFAULTS);
ALTER TABLE f_slim ADD UNIQUE (program_id, ref);
-- A candidate layout (docs/performance.md, "A layout that fits the budget"):
-- a narrow purchase row holding its pending points until they vest, keyed
-- by its ref only; with and without an index by account.
CREATE TABLE f_narrow (program_id bigint NOT NULL, ref text COLLATE "C" NOT NULL,
                       account_id bigint NOT NULL, amount numeric NOT NULL,
                       occurred_at timestamptz NOT NULL, category text,
                       rule_version integer NOT NULL, points bigint NOT NULL,
                       vests_at timestamptz NOT NULL, PRIMARY KEY (program_id, ref));
CREATE TABLE f_narrow_acct (LIKE f_narrow INCLUDING ALL);
CREATE INDEX ON f_narrow_acct (account_id, occurred_at);
-- Every value computed beforehand (one point per unit, 30 days pending), so
-- that the timed statements only write rows. The breakdown has the shape and
-- size accrual stores for such a purchase (about 45 bytes).
CREATE TABLE f_src AS
SELECT s.id, s.total, s.placed_at, s.placed_at::date AS day, s.category, mb.id AS member_id,
       a.id AS account_id, floor(s.total)::bigint AS points, row_number() OVER () AS n,
       s.placed_at + interval '30 days' AS vests_at,
       json_build_object('context', json_build_object('weekday', extract(isodow FROM s.placed_at)::int),
                         'base', s.total) AS breakdown,
       sha256(s.id::bytea) AS prev_hash, sha256(('x' || s.id)::bytea) AS hash
FROM src s JOIN loyalty.member mb ON mb.member_ref = s.customer
JOIN loyalty.account a ON a.member_id = mb.id;
VACUUM ANALYZE;
SQL

purchase_cols="program_id, ref, member_id, account_id, amount, occurred_at, day, category, rule_version, points, vests_at, breakdown"
purchase_vals="1, id, member_id, account_id, total, placed_at, day, category, 1, points, vests_at, breakdown"

bare=$(timed "INSERT INTO orders_bare SELECT * FROM src")
echo "bare insert: ${bare} s" >&2
acc=$(timed "INSERT INTO orders_acc SELECT * FROM src")
echo "accrual attached: ${acc} s" >&2
accrual=$(timed "INSERT INTO f_accrual ($purchase_cols) SELECT $purchase_vals FROM f_src")
echo "purchase rows alone: ${accrual} s" >&2
transfer=$(timed "INSERT INTO f_transfer (program_id, debit_account_id, credit_account_id, amount, kind, ref,
                                          occurred_at, posted_at, rule_version, actor, credit_prev_hash, hash)
                  SELECT 1, 1, account_id, points, 'accrual', id, placed_at, now(), 1, 'bench', prev_hash, hash
                  FROM f_src WHERE points > 0")
echo "journal rows alone: ${transfer} s" >&2
lot=$(timed "INSERT INTO f_lot (account_id, transfer_id, amount, remaining, occurred_at, vests_at, pending)
             SELECT account_id, n, points, points, placed_at, vests_at, true
             FROM f_src WHERE points > 0")
echo "lot rows alone: ${lot} s" >&2
slim=$(timed "INSERT INTO f_slim ($purchase_cols) SELECT $purchase_vals FROM f_src")
echo "purchase rows, ref index only: ${slim} s" >&2
narrow_vals="1, id, account_id, total, placed_at, category, 1, points, vests_at"
narrow=$(timed "INSERT INTO f_narrow SELECT $narrow_vals FROM f_src")
echo "narrow purchase rows, ref key only: ${narrow} s" >&2
narrow_acct=$(timed "INSERT INTO f_narrow_acct SELECT $narrow_vals FROM f_src")
echo "narrow purchase rows, ref key and account index: ${narrow_acct} s" >&2

row() {         # row WHAT SECONDS: the bare insert plus SECONDS, against the bare insert
    local r
    r=$(awk -v a="$2" -v b="$bare" 'BEGIN { printf "%.2f", (a + b) / b }')
    echo "| accrual_floor | $1 | $(awk -v a="$2" -v b="$bare" 'BEGIN { printf "%.2f", a + b }') s | ${bare} s | ${r} | (none) | INFO |"
}
row "bare insert + the purchase rows alone (loyalty.accrual's indexes)" "$accrual"
row "bare insert + purchase, journal and lot rows (the data model's floor)" \
    "$(awk -v a="$accrual" -v t="$transfer" -v l="$lot" 'BEGIN { printf "%.2f", a + t + l }')"
row "bare insert + purchase rows with only the ref index (one-row floor)" "$slim"
row "bare insert + narrow purchase rows, ref key only (candidate layout)" "$narrow"
row "bare insert + narrow purchase rows, ref key and account index" "$narrow_acct"
r=$(awk -v a="$acc" -v f="$(awk -v b="$bare" -v a="$accrual" -v t="$transfer" -v l="$lot" 'BEGIN { print b + a + t + l }')" \
        'BEGIN { printf "%.2f", a / f }')
echo "| accrual_floor | accrual attached vs the data model's floor | ${acc} s | $(awk -v b="$bare" -v a="$accrual" -v t="$transfer" -v l="$lot" 'BEGIN { printf "%.2f", b + a + t + l }') s | ${r} | (none) | INFO |"
