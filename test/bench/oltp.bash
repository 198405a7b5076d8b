# Shared by the one-row sale benches (sourced, not run: scripts/bench runs
# only *.sh): the program, members, rules and the two orders tables, so that
# accrual_oltp's throughput and accrual_cpu's instructions measure one sale.
#
#   oltp_setup M    SQL creating program "shop" with M members, its rules,
#                   orders_bare and orders_acc (accrual attached)

oltp_setup() {
    cat <<SQL
SELECT loyalty.create_program('shop', 'Shop', 'UTC');
SELECT count(loyalty.enroll('shop', 'm' || i, occurred_at => '2025-01-01')) FROM generate_series(1, $1) i;
SELECT loyalty.set_earning_rules('shop', '{"base": {"per": 1, "points": 1, "rounding": "floor"},
  "exclude": {"category": ["gift_card"]},
  "multipliers": [{"when": {"category": ["electronics"]}, "factor": 2},
                  {"when": {"weekday": [6, 7]}, "factor": 2}],
  "caps": {"per_purchase": 10000}, "pending_days": 30, "min_amount": 1}', '2025-01-01', 'bench');
CREATE TABLE orders_bare (id text PRIMARY KEY, customer text, total numeric(12,2),
                          placed_at timestamptz, category text);
CREATE TABLE orders_acc (LIKE orders_bare INCLUDING ALL);
SELECT loyalty.attach_accrual('orders_acc', 'shop', 'customer', 'total', 'id', 'placed_at', 'category');
VACUUM ANALYZE;
SQL
}
