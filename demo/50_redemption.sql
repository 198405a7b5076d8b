-- Redemption tour: the catalogue, redeeming, a checkout (hold -> capture),
-- vouchers, donations, transfers, cancellation and ratings.
-- Runs after demo/10_ledger.sql (program coffee; alice, bob, carol).

\echo
\echo '== Redemption: a few points for everyone to spend'
SELECT loyalty.earn('coffee', m, 1000, 'demo-redemption-' || m, 'demo credit') > 0 AS credited
FROM unnest(ARRAY['alice', 'bob', 'carol']) m;

\echo
\echo '== The catalogue: a mug (3 left), a voucher for a free latte, a donation'
SELECT loyalty.add_charity('coffee', 'Food Bank') > 0 AS charity_registered;
SELECT loyalty.add_reward('coffee', 'mug', 'Branded mug', 300, '{"stock": 3}') AS version;
SELECT loyalty.add_reward('coffee', 'latte', 'Free latte', 150,
       '{"kind": "voucher", "voucher_valid_for": "30 days", "limit": {"count": 2, "period": "1 month"}}') AS version;
SELECT loyalty.add_reward('coffee', 'meal', 'A meal for the food bank', 100,
       '{"kind": "donation", "charity": "Food Bank"}') AS version;
SELECT reward, name, kind, cost, version, stock_left FROM loyalty.catalogue WHERE program = 'coffee' ORDER BY reward;

\echo
\echo '== alice redeems a mug (one step); asking again with the same ref changes nothing'
SELECT * FROM loyalty.redeem('coffee', 'alice', 'mug', 'demo-order-1');
SELECT * FROM loyalty.redeem('coffee', 'alice', 'mug', 'demo-order-1');
SELECT loyalty.balance('coffee', 'alice') AS alice_balance;

\echo
\echo '== The latte is cheaper from today: version 2; alice''s mug recorded what she paid'
SELECT loyalty.add_reward('coffee', 'latte', 'Free latte', 120,
       '{"kind": "voucher", "voucher_valid_for": "30 days", "limit": {"count": 2, "period": "1 month"}}') AS version;
SELECT rw.code AS reward, r.reward_version, r.cost, r.points FROM loyalty.redemption r
JOIN loyalty.reward rw ON rw.id = r.reward_id WHERE r.ref = 'demo-order-1';

\echo
\echo '== bob takes two lattes: two voucher codes (random, with a check character)'
SELECT redemption_id, points, array_length(vouchers, 1) AS vouchers
FROM loyalty.redeem('coffee', 'bob', 'latte', 'demo-order-2', 2);
SELECT count(*) AS codes, bool_and(code ~ '^[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}$') AS well_formed
FROM loyalty.voucher v JOIN loyalty.redemption r ON r.id = v.redemption_id WHERE r.ref = 'demo-order-2';

\echo
\echo '== The till scans bob''s first voucher (typed in lower case: still fine), then again'
SELECT loyalty.use_voucher('coffee', lower((SELECT v.code FROM loyalty.voucher v JOIN loyalty.redemption r
       ON r.id = v.redemption_id WHERE r.ref = 'demo-order-2' ORDER BY v.id LIMIT 1)), 'demo-till-1') AS reward;
\set ON_ERROR_STOP off
\echo '-- a second use under another ref is refused (LY039):'
SELECT loyalty.use_voucher('coffee', (SELECT v.code FROM loyalty.voucher v JOIN loyalty.redemption r
       ON r.id = v.redemption_id WHERE r.ref = 'demo-order-2' ORDER BY v.id LIMIT 1), 'demo-till-2') AS reward;
\echo '-- a typo is caught by the check character before any lookup (LY041):'
SELECT loyalty.use_voucher('coffee', '7KQ2-M9XD-4RTB-HN6H', 'demo-till-3');
\set ON_ERROR_STOP on

\echo
\echo '== Checkout: carol''s basket reserves 500 points, the payment captures 420'
SELECT loyalty.hold('coffee', 'carol', 500, 'demo-basket-1', ttl => '15 minutes') > 0 AS held;
SELECT available, held FROM loyalty.account_summary('coffee', 'carol');
SELECT loyalty.capture('coffee', 'demo-basket-1', 420) > 0 AS captured;
SELECT available, held FROM loyalty.account_summary('coffee', 'carol');

\echo
\echo '== Another basket is abandoned: released, and its points are back'
SELECT loyalty.hold('coffee', 'carol', 200, 'demo-basket-2') > 0 AS held;
SELECT loyalty.release('coffee', 'demo-basket-2');
SELECT available, held FROM loyalty.account_summary('coffee', 'carol');

\echo
\echo '== The release_holds job handler: nothing past its TTL'
SELECT * FROM loyalty._job_release_holds(now(), 1000);

\echo
\echo '== Donations: carol gives 50 points to the food bank, bob buys a meal for it'
SELECT loyalty.donate('coffee', 'carol', 'Food Bank', 50, 'demo-gift-1') > 0 AS donated;
SELECT points FROM loyalty.redeem('coffee', 'bob', 'meal', 'demo-order-3');
SELECT a.name AS charity, loyalty.sum(t.amount) AS received FROM loyalty.transfer t
JOIN loyalty.account a ON a.id = t.credit_account_id
WHERE a.kind = 'donation' AND a.name = 'Food Bank' GROUP BY a.name;

\echo
\echo '== bob passes 100 points to alice (the lot keeps the expiry of bob''s points)'
SELECT loyalty.transfer_points('coffee', 'bob', 'alice', 100, 'demo-gift-2') > 0 AS transferred;
SELECT loyalty.balance('coffee', 'alice') AS alice, loyalty.balance('coffee', 'bob') AS bob;

\echo
\echo '== alice cancels her mug: the same lots come back, and the mug is in stock again'
SELECT loyalty.cancel_redemption('coffee', 'demo-order-1') > 0 AS cancelled;
SELECT loyalty.balance('coffee', 'alice') AS alice;
SELECT reward, stock_left FROM loyalty.catalogue WHERE program = 'coffee' AND reward = 'mug';

\echo
\echo '== bob rates his lattes'
SELECT loyalty.rate_reward('coffee', 'bob', 'latte', 5, 'Best latte in town');
SELECT reward, rating_avg, rating_count FROM loyalty.catalogue WHERE program = 'coffee' ORDER BY reward;

\echo
\echo '== The books still balance and every chain verifies'
SELECT count(*) AS broken_chains FROM loyalty.verify_chain('coffee');
SELECT m.member_ref, s.available, s.held, s.lifetime_redeemed FROM loyalty.member m
JOIN loyalty.program p ON p.id = m.program_id AND p.code = 'coffee',
LATERAL loyalty.account_summary('coffee', m.member_ref) s ORDER BY 1;
