-- The ledger: a program, members, points in and out, a statement, the chain.
\set ON_ERROR_STOP on
SET TIME ZONE 'Europe/Paris';
CREATE EXTENSION loyalty;

\echo
\echo '== A coffee-shop program: points expire 12 months after they are earned; 50 welcome points'
SELECT loyalty.create_program('coffee', 'Bean Counter Rewards', 'Europe/Paris',
       '{"currency": "EUR", "point_value": 0.01,
         "expiry": {"policy": "fixed", "after": "12 months", "notice": "30 days"},
         "welcome": {"points": 50}}') AS program_id;

\echo
\echo '== Three members enrol (enrolling twice changes nothing); a bad phone number is kept but flagged'
SELECT loyalty.enroll('coffee', 'alice', email => 'Alice@Example.com', phone => '+33 6 12 34 56 78',
                      country => 'fr', occurred_at => '2026-01-05 09:00') AS alice;
SELECT loyalty.enroll('coffee', 'alice') AS alice_again;
SELECT loyalty.enroll('coffee', 'bob', phone => '12-34', occurred_at => '2026-02-10 18:30') AS bob;
SELECT loyalty.enroll('coffee', 'carol', occurred_at => '2026-03-01 08:15') AS carol;
SELECT m.member_ref, c.email, c.email_valid, c.phone, c.phone_valid
  FROM loyalty.member m LEFT JOIN loyalty.member_contact c ON c.member_id = m.id ORDER BY m.id;

\echo
\echo '== Points in: a goodwill bonus, posted twice by a retrying client, counts once'
SELECT loyalty.earn('coffee', 'alice', 200, 'bonus-2026-001', 'survey answered', '2026-03-02 10:00');
SELECT loyalty.earn('coffee', 'alice', 200, 'bonus-2026-001', 'survey answered', '2026-03-02 10:00');
SELECT loyalty.balance('coffee', 'alice', '2026-03-03') AS alice_balance;

\echo
\echo '== The same ref with other content is refused, with both versions in the detail'
\set ON_ERROR_STOP off
SELECT loyalty.earn('coffee', 'alice', 500, 'bonus-2026-001', NULL, '2026-03-02 10:00');
\echo '== A debit beyond the balance is refused and leaves nothing behind'
SELECT loyalty.adjust('coffee', 'bob', -1000, 'fix-bob-1', 'double scan', '2026-03-05');
\set ON_ERROR_STOP on

\echo
\echo '== A staff correction takes 30 points back, oldest-expiring points first'
SELECT loyalty.adjust('coffee', 'alice', -30, 'fix-alice-1', 'coffee was free (machine broken)', '2026-03-05 16:00');

\echo
\echo '== Alice''s statement: every line explained, with a running balance'
SELECT occurred_at::date AS day, kind, ref, points, balance, explanation
  FROM loyalty.statement('coffee', 'alice');

\echo
\echo '== Her summary in mid-December (welcome points expire within the 30-day notice), and balances at other moments (points expire 12 months after earning)'
SELECT available, pending, expiring_soon, next_expiry_at::date, lifetime_earned, lifetime_adjusted
  FROM loyalty.account_summary('coffee', 'alice', '2026-12-15');
SELECT loyalty.balance('coffee', 'alice', '2026-03-01') AS before_bonus,
       loyalty.balance('coffee', 'alice', '2027-01-04') AS before_welcome_expires,
       loyalty.balance('coffee', 'alice', '2027-01-06') AS after_welcome_expires,
       loyalty.balance('coffee', 'alice', '2027-03-03') AS after_all_expired;

\echo
\echo '== The journal cannot be edited, even by its owner; every chain verifies'
\set ON_ERROR_STOP off
UPDATE loyalty.transfer SET amount = 1000000 WHERE ref = 'bonus-2026-001';
\set ON_ERROR_STOP on
SELECT count(*) AS broken_chains FROM loyalty.verify_chain('coffee');
