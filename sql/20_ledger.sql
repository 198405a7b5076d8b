-- The ledger: programs, members, accounts, the append-only journal and lots.
--
-- Keys compared on every posting (member_ref, kind, ref) use the "C"
-- collation: equality is the same under every deterministic collation, and
-- their unique indexes then compare bytes instead of calling strcoll().
--
-- Integrity on the journal tables (transfer, lot, lot_use) is kept by the C
-- posting routine, which locks the member accounts it touches, and checked by
-- verify_chain(); they carry no foreign keys, whose per-row checks would cost
-- more than the posting itself in bulk (see docs/ledger.md).

CREATE SEQUENCE loyalty.program_id_seq;
CREATE TABLE loyalty.program (
    id          bigint PRIMARY KEY DEFAULT nextval('loyalty.program_id_seq'),
    code        text NOT NULL UNIQUE,
    name        text NOT NULL,
    time_zone   text NOT NULL DEFAULT 'UTC',
    options     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE loyalty.program_id_seq OWNED BY loyalty.program.id;
COMMENT ON TABLE loyalty.program IS 'A loyalty program: code, name, time zone and options (point value, expiry policy, ...)';

-- Every options document a program has had, with the note that explains
-- the change (create_program writes version 1, update_program the next).
CREATE TABLE loyalty.program_version (
    program_id  bigint NOT NULL REFERENCES loyalty.program,
    version     integer NOT NULL CHECK (version > 0),
    options     jsonb NOT NULL,
    note        text NOT NULL,
    changed_by  text NOT NULL DEFAULT session_user,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (program_id, version)
);
COMMENT ON TABLE loyalty.program_version IS 'Every options document of each program, with the note, author and time of the change; append-only';

CREATE SEQUENCE loyalty.member_id_seq;
CREATE TABLE loyalty.member (
    id          bigint PRIMARY KEY DEFAULT nextval('loyalty.member_id_seq'),
    program_id  bigint NOT NULL REFERENCES loyalty.program,
    member_ref  text COLLATE "C" NOT NULL,
    status      text NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'suspended', 'closed', 'merged', 'forgotten')),
    enrolled_at timestamptz NOT NULL,
    tier        text,
    country     text CHECK (country ~ '^[A-Z]{2}$'),
    language    text,
    time_zone   text,
    attrs       jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (program_id, member_ref)
);
ALTER SEQUENCE loyalty.member_id_seq OWNED BY loyalty.member.id;
COMMENT ON TABLE loyalty.member IS 'One member of one program, keyed by the application''s customer key (member_ref)';

CREATE TABLE loyalty.member_contact (
    member_id       bigint PRIMARY KEY REFERENCES loyalty.member,
    email           text,
    email_valid     boolean,
    phone           text,
    phone_valid     boolean,
    birthday        date,
    birthday_valid  boolean,
    address         jsonb,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE loyalty.member_contact IS 'Private contact data of a member, apart from everything else, with a validity flag per field';

CREATE SEQUENCE loyalty.account_id_seq;
CREATE TABLE loyalty.account (
    id               bigint PRIMARY KEY DEFAULT nextval('loyalty.account_id_seq'),
    program_id       bigint NOT NULL REFERENCES loyalty.program,
    kind             text NOT NULL
                     CHECK (kind IN ('member', 'issuance', 'breakage', 'redemption', 'adjustment', 'donation')),
    member_id        bigint UNIQUE REFERENCES loyalty.member,
    name             text NOT NULL DEFAULT '',
    available        loyalty.points NOT NULL DEFAULT 0,
    pending          loyalty.points NOT NULL DEFAULT 0,
    held             loyalty.points NOT NULL DEFAULT 0,
    last_transfer_id bigint,
    last_hash        bytea,
    owes             boolean NOT NULL DEFAULT false,
    deferred_day     date,
    deferred_due     timestamptz,
    deferred_count   bigint,
    last_purchase_ref text COLLATE "C",
    CHECK ((kind = 'member') = (member_id IS NOT NULL))
) WITH (fillfactor = 70);
-- Every sale rewrites its member's row (balances, chain head): with room
-- left on each page the new version stays on it (a heap-only update, no
-- index entry) and pruning a page moves fewer rows; a full page sent the
-- first update of each account to another page with two index entries.
-- 276,774 instructions a one-row sale adds against 293,531 at 100
-- (docs/performance.md).
ALTER SEQUENCE loyalty.account_id_seq OWNED BY loyalty.account.id;
CREATE UNIQUE INDEX account_system_key ON loyalty.account (program_id, kind, name) WHERE kind <> 'member';
-- The accounts with deferred purchases, by when the first of them vests or
-- expires: the vest and expire jobs' list (loyalty._deferred_due). One
-- entry per account, not per purchase: a sale that sets deferred_due where
-- it was NULL (the member's first deferred purchase since their lines were
-- last written) is not a heap-only update; the sales after it, whose
-- purchases fall due later, leave the column as it is and stay heap-only.
CREATE INDEX account_deferred_idx ON loyalty.account (deferred_due, id) WHERE deferred_due IS NOT NULL;
COMMENT ON TABLE loyalty.account IS 'One account per member and one per program system account; member rows hold the posted balances and the head of the member''s hash chain';
COMMENT ON COLUMN loyalty.account.available IS 'Posted, vested points not yet spent or swept by the expire job (balance() is the truth at a given moment)';
COMMENT ON COLUMN loyalty.account.pending IS 'Posted points still in their return window, not yet swept by the vest job';
COMMENT ON COLUMN loyalty.account.deferred_day IS 'The earliest day of the member''s purchases whose journal line and lot are not written yet (deferred, docs/accrual.md); NULL when there is none';
COMMENT ON COLUMN loyalty.account.deferred_due IS 'When the first of the member''s deferred purchases vests or expires (the earliest of their vests_at and expires_at): when the vest or expire job writes the account''s deferred lines; NULL when there is none';
COMMENT ON COLUMN loyalty.account.deferred_count IS 'How many of the member''s purchases have their journal line and lot deferred: what the vest and expire jobs size their batches by; NULL when there is none';
COMMENT ON COLUMN loyalty.account.last_purchase_ref IS 'The ref of the member''s latest purchase (loyalty.accrual): the head of the list of their purchases, each of which names the one before it (accrual.prev_ref); NULL before the first';
COMMENT ON COLUMN loyalty.account.owes IS 'Set when a refund records a debt for the member (loyalty.accrual_debt), never cleared: a sale of a member that never owed does not look for debts to recover';

CREATE SEQUENCE loyalty.transfer_id_seq;
CREATE TABLE loyalty.transfer (
    id                 bigint PRIMARY KEY DEFAULT nextval('loyalty.transfer_id_seq'),
    program_id         bigint NOT NULL,
    debit_account_id   bigint NOT NULL,
    credit_account_id  bigint NOT NULL,
    amount             loyalty.points NOT NULL CHECK (amount > 0),
    kind               text COLLATE "C" NOT NULL,
    ref                text COLLATE "C" NOT NULL,
    occurred_at        timestamptz NOT NULL,
    posted_at          timestamptz NOT NULL,
    rule_version       integer,
    actor              text NOT NULL,
    reason             text,
    debit_prev_hash    bytea,
    credit_prev_hash   bytea,
    hash               bytea NOT NULL,
    CHECK (debit_account_id <> credit_account_id)
);
ALTER SEQUENCE loyalty.transfer_id_seq OWNED BY loyalty.transfer.id;
-- An accrual always debits the program's issuance account, a system account
-- whose lines are only ever summed, never looked up by account: leaving
-- accruals out of the debit index saves an entry on every purchase (the hot
-- path). A read of a member's debits says kind <> 'accrual' (a member is
-- never an accrual's debit side), so that the planner can use this index:
-- loyalty._account_transfers() reads a member's lines so, and verify_chain's
-- heads ask for the last debit the same way.
CREATE INDEX transfer_debit_idx ON loyalty.transfer (debit_account_id, id) WHERE kind <> 'accrual';
-- Idempotency of every posting kind but accrual: a purchase's ref is already
-- the primary key of loyalty.accrual, which holds at most one transfer per
-- purchase (accrual.transfer_id), so a second unique entry per purchase
-- would guard nothing and cost the hot path an index insertion. Writers of
-- other kinds name it in ON CONFLICT with the same WHERE.
CREATE UNIQUE INDEX transfer_ref_key ON loyalty.transfer (program_id, kind, ref) WHERE kind <> 'accrual';
-- A member's credits, purchases' lines with them: this is how a member's
-- purchase lines are found (loyalty._account_transfers), and the only
-- per-account index entry a purchase ever takes. A purchase in its return
-- window defers its line (docs/accrual.md), so the entry is taken by the
-- vest job, or by whatever first needs the account's lines, not by the sale.
CREATE INDEX transfer_credit_idx ON loyalty.transfer (credit_account_id, id);
COMMENT ON TABLE loyalty.transfer IS 'The journal: each row moves amount points from the debit account to the credit account; append-only, idempotent on (program, kind, ref), hash-chained per member account';

-- Every purchase posted by accrual (docs/accrual.md). Created with the
-- journal because the journal's account indexes leave accruals out: a
-- member's purchase lines are found from here (loyalty._account_transfers).
-- A purchase's id comes from the journal's sequence, and its journal line
-- and lot, when it earns, take the same id: one nextval per sale, not
-- three (and two sequence locks less). Ids of the three tables still grow
-- in the order rows are created, which is all anything orders them by.
-- The columns are in the order that packs a row tightest: the fixed-width
-- ones first, widest first, then the variable-width ones, which take no
-- alignment padding when short. In the order of the purchase's story, a
-- purchase's row held some 14 bytes of padding (8 % of it).
CREATE TABLE loyalty.accrual (
    id              bigint NOT NULL DEFAULT nextval('loyalty.transfer_id_seq'),
    program_id      bigint NOT NULL,
    member_id       bigint NOT NULL,
    account_id      bigint NOT NULL,
    occurred_at     timestamptz NOT NULL,
    points          bigint NOT NULL,
    vests_at        timestamptz NOT NULL,
    expires_at      timestamptz,
    posted_at       timestamptz NOT NULL DEFAULT now(),
    -- The journal line that credited its points (NULL when it earned none):
    -- accrual transfers are found through here, not through the journal's
    -- ref index, which leaves them out (transfer_ref_key, above).
    transfer_id     bigint,
    refunded_points bigint NOT NULL DEFAULT 0,
    day             date NOT NULL,
    rule_version    integer NOT NULL,
    -- Whether the program had a daily cap when the purchase was posted (or
    -- got one since): such purchases are indexed by account and day
    -- (accrual_day_cap_idx) for the cap; others are not.
    day_capped      boolean NOT NULL DEFAULT false,
    ref             text COLLATE "C" NOT NULL,
    amount          numeric NOT NULL,
    category        text,
    channel         text,
    store           text,
    attrs           jsonb NOT NULL DEFAULT '{}',
    -- How the rules gave its points, in the short form AccrualEvaluate
    -- writes; NULL when the row alone gives it back: a version without a
    -- daily cap or campaign budget, and a member with no tier, not on a
    -- first purchase nor in their birthday month. Most purchases of most
    -- programs are such, and leave out some 100 bytes of their row.
    -- loyalty._accrual_breakdown() reads either.
    breakdown       json,
    refunded_amount numeric NOT NULL DEFAULT 0,
    -- Who posted it, kept only while its journal line is deferred (the
    -- line, written later, is hashed with it); NULL once the line exists.
    actor           text,
    -- The member's purchase posted before this one (NULL: their first). A
    -- member's purchases form a list from account.last_purchase_ref, newest
    -- first, in id order: no index by member is written per purchase. The
    -- deferred ones are the list's head, down to the account's last written
    -- line (loyalty._deferred_purchases).
    prev_ref        text COLLATE "C",
    -- A purchase is known by its ref: this key decides replays. id only
    -- orders purchases (nothing looks one up by it), so it has no index of
    -- its own, which saves an index entry on every purchase.
    PRIMARY KEY (program_id, ref)
);
-- A member's purchases of a day, for the daily cap (per_member_per_day),
-- in programs that have one: a program without writes no entry here.
CREATE INDEX accrual_day_cap_idx ON loyalty.accrual (account_id, day) WHERE day_capped;
-- simulate_accrual's time window. Purchases arrive roughly in time order,
-- so a BRIN index finds a window's block ranges. A sale's row goes to the
-- table's last block range, which no VACUUM summarizes until it is full, so
-- its index entry is a look-up in the range map (about 5,600 instructions
-- per sale, measured); only the first 128 pages pay more, whose summary the
-- index's creation on the empty table made, and every sale there widens it.
-- A btree would cost a random insert per sale.
CREATE INDEX accrual_time_brin ON loyalty.accrual USING brin (occurred_at);
COMMENT ON TABLE loyalty.accrual IS 'Every purchase posted by accrual: what it was, the rule version, points and their breakdown, and how much of it was refunded';

-- A lot has the id of the transfer that credited it (a posting credits at
-- most one lot), and the default draws from the journal's sequence for any
-- other writer, so ids never collide (see loyalty.accrual).
CREATE TABLE loyalty.lot (
    id           bigint PRIMARY KEY DEFAULT nextval('loyalty.transfer_id_seq'),
    account_id   bigint NOT NULL,
    transfer_id  bigint NOT NULL,
    amount       loyalty.points NOT NULL CHECK (amount > 0),
    remaining    loyalty.points NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    occurred_at  timestamptz NOT NULL,
    vests_at     timestamptz NOT NULL,
    expires_at   timestamptz,
    pending      boolean NOT NULL DEFAULT false
);
-- Every read of an account's lots asks for the ones with something left
-- (spending, balances, refunds, _lots_as_of), so this one index serves them
-- all; a second index on (account_id, occurred_at) cost a tenth of a bulk
-- accrual and no plan used it (docs/performance.md). Queries must spell the
-- predicate as the index does, remaining OPERATOR(loyalty.>) 0, for the
-- planner to prove it: remaining::bigint > 0 does not match.
CREATE INDEX lot_open_idx ON loyalty.lot (account_id, expires_at) WHERE remaining > 0;
COMMENT ON TABLE loyalty.lot IS 'Points credited to a member and not yet all spent: original amount, remaining, when they vest and when they expire';
COMMENT ON COLUMN loyalty.lot.pending IS 'Counted in account.pending (not yet swept by the vest job) rather than account.available';

CREATE TABLE loyalty.lot_use (
    transfer_id  bigint NOT NULL,
    lot_id       bigint NOT NULL,
    account_id   bigint NOT NULL,
    amount       loyalty.points NOT NULL CHECK (amount <> 0),
    occurred_at  timestamptz NOT NULL,
    PRIMARY KEY (transfer_id, lot_id)
);
CREATE INDEX lot_use_lot_idx ON loyalty.lot_use (lot_id);
CREATE INDEX lot_use_account_idx ON loyalty.lot_use (account_id, occurred_at);
COMMENT ON TABLE loyalty.lot_use IS 'Which lots each debit consumed (positive amount) or a reversal restored (negative amount); append-only';

SELECT pg_catalog.pg_extension_config_dump('loyalty.program', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.program_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.program_version', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.member', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.member_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.member_contact', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.account', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.account_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.transfer', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.transfer_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.lot', '');
SELECT pg_catalog.pg_extension_config_dump('loyalty.lot_use', '');

-- The journal is append-only, for the table owner too: the triggers are
-- ENABLE ALWAYS so that session_replication_role = replica does not skip them.
CREATE FUNCTION loyalty.refuse_change() RETURNS trigger
    AS 'MODULE_PATHNAME', 'ledger_refuse_change' LANGUAGE C;
COMMENT ON FUNCTION loyalty.refuse_change() IS 'Trigger: refuses UPDATE, DELETE and TRUNCATE on the append-only journal tables';

CREATE TRIGGER transfer_append_only BEFORE UPDATE OR DELETE ON loyalty.transfer
    FOR EACH ROW EXECUTE FUNCTION loyalty.refuse_change();
CREATE TRIGGER transfer_no_truncate BEFORE TRUNCATE ON loyalty.transfer
    FOR EACH STATEMENT EXECUTE FUNCTION loyalty.refuse_change();
CREATE TRIGGER lot_use_append_only BEFORE UPDATE OR DELETE ON loyalty.lot_use
    FOR EACH ROW EXECUTE FUNCTION loyalty.refuse_change();
CREATE TRIGGER lot_use_no_truncate BEFORE TRUNCATE ON loyalty.lot_use
    FOR EACH STATEMENT EXECUTE FUNCTION loyalty.refuse_change();
ALTER TABLE loyalty.transfer ENABLE ALWAYS TRIGGER transfer_append_only;
ALTER TABLE loyalty.transfer ENABLE ALWAYS TRIGGER transfer_no_truncate;
ALTER TABLE loyalty.lot_use ENABLE ALWAYS TRIGGER lot_use_append_only;
ALTER TABLE loyalty.lot_use ENABLE ALWAYS TRIGGER lot_use_no_truncate;
CREATE TRIGGER lot_no_delete BEFORE DELETE ON loyalty.lot
    FOR EACH ROW EXECUTE FUNCTION loyalty.refuse_change();
CREATE TRIGGER lot_no_truncate BEFORE TRUNCATE ON loyalty.lot
    FOR EACH STATEMENT EXECUTE FUNCTION loyalty.refuse_change();
ALTER TABLE loyalty.lot ENABLE ALWAYS TRIGGER lot_no_delete;
ALTER TABLE loyalty.lot ENABLE ALWAYS TRIGGER lot_no_truncate;
CREATE TRIGGER program_version_append_only BEFORE UPDATE OR DELETE ON loyalty.program_version
    FOR EACH ROW EXECUTE FUNCTION loyalty.refuse_change();
CREATE TRIGGER program_version_no_truncate BEFORE TRUNCATE ON loyalty.program_version
    FOR EACH STATEMENT EXECUTE FUNCTION loyalty.refuse_change();
ALTER TABLE loyalty.program_version ENABLE ALWAYS TRIGGER program_version_append_only;
ALTER TABLE loyalty.program_version ENABLE ALWAYS TRIGGER program_version_no_truncate;

REVOKE ALL ON ALL TABLES IN SCHEMA loyalty FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA loyalty FROM PUBLIC;
