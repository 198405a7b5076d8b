-- Accrual: the program option shortfall "negative" (docs/accrual.md, Refunds).
--
-- A refund takes from the member's lots what they hold; what they cannot
-- cover (the points already spent) is a debt in loyalty.accrual_debt, paid
-- back by the member's later purchases through transfers of kind recover,
-- oldest debt first. Under shortfall "negative" the debt row is marked
-- shown_as_negative (the mode in force at the refund, kept whatever the
-- option becomes later), and the reads show it as a balance below zero:
-- balance() and account_summary() subtract what is still owed at as_of,
-- statement() shows the refund line with its whole clawback and the recover
-- lines without the part that repays it. The journal, the lots and the
-- account rows are exactly those of "debt".
--
-- Clock: a debt counts from its refund's occurred_at (refunds have no
-- business time of their own: it is the refund's posting time, the
-- transaction's start, also the occurred_at of its transfer and lot uses),
-- and each recover transfer repays at its own occurred_at (the posting time
-- of the purchase that paid it back). Debts are repaid in id order, so what
-- recover transfers had repaid by a moment, R, settles them in that order:
-- a debt with `before` points of older debts ahead of it was repaid by
-- least(greatest(R - before, 0), amount) at that moment.

-- What the member owes at p_as_of on debts shown as negative. PL/pgSQL, so
-- that its plans are kept across calls: balance() calls it on every read,
-- and for a member without such debts it is one probe of a partial index.
CREATE OR REPLACE FUNCTION loyalty._negative_shortfall(p_account bigint, p_as_of timestamptz) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    v_owed bigint;
BEGIN
    IF NOT EXISTS (SELECT FROM loyalty.accrual_debt n WHERE n.account_id = p_account AND n.shown_as_negative) THEN
        RETURN 0;
    END IF;
    WITH d AS (
        SELECT d.amount, d.shown_as_negative, d.created_at,
               sum(d.amount) OVER (ORDER BY d.id) - d.amount AS before
        FROM loyalty.accrual_debt d
        WHERE d.account_id = p_account
    ), r AS (
        SELECT coalesce(sum(t.amount::bigint), 0) AS repaid
        FROM loyalty.transfer t
        WHERE t.debit_account_id = p_account AND t.kind = 'recover' AND t.occurred_at <= p_as_of
    )
    SELECT coalesce(sum(d.amount - least(greatest(r.repaid - d.before, 0), d.amount)), 0)::bigint INTO v_owed
    FROM d CROSS JOIN r
    WHERE d.shown_as_negative AND d.created_at <= p_as_of;
    RETURN v_owed;
END $$;
COMMENT ON FUNCTION loyalty._negative_shortfall(bigint, timestamptz) IS 'Internal: points a member still owes at a moment on refund shortfalls shown as negative (program option shortfall "negative"), which balance() and account_summary() subtract';

-- How statement() shows the lines a negative shortfall concerns: a refund
-- line with its whole clawback (taken from lots plus owed; a line without
-- transfer when the lots gave nothing), a recover line without the part
-- that repaid a negative shortfall (already counted in its refund line).
CREATE OR REPLACE FUNCTION loyalty._negative_lines(p_account bigint)
RETURNS TABLE (transfer_id bigint, occurred_at timestamptz, kind text, ref text, points bigint, note text)
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM loyalty.accrual_debt n WHERE n.account_id = p_account AND n.shown_as_negative) THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH d AS (
        SELECT d.program_id, d.refund_ref, d.amount, d.shown_as_negative,
               sum(d.amount) OVER (ORDER BY d.id) - d.amount AS before
        FROM loyalty.accrual_debt d
        WHERE d.account_id = p_account
    ), rec AS (
        SELECT t.id, t.amount::bigint AS amount, sum(t.amount::bigint) OVER (ORDER BY t.id) AS upto
        FROM loyalty.transfer t
        WHERE t.debit_account_id = p_account AND t.kind = 'recover'
    ), rec_neg AS (
        SELECT r.id, r.amount,
               sum(greatest(least(r.upto, d.before + d.amount) - greatest(r.upto - r.amount, d.before), 0))::bigint
                   AS negative
        FROM rec r JOIN d ON d.shown_as_negative
        GROUP BY r.id, r.amount
    )
    SELECT r.id, NULL::timestamptz, NULL::text, NULL::text, -(r.amount - r.negative),
           format('%s of the %s points repay a negative balance, counted in its refund line', r.negative, r.amount)
    FROM rec_neg r WHERE r.negative > 0
    UNION ALL
    SELECT t.id, f.occurred_at, 'refund'::text, f.refund_ref, -(f.taken + f.shortfall),
           format('%s of the %s points had been spent: owed below zero', d.amount, f.taken + f.shortfall)
    FROM d JOIN loyalty.accrual_refund f ON f.program_id = d.program_id AND f.refund_ref = d.refund_ref
    LEFT JOIN loyalty.transfer t ON t.program_id = d.program_id AND t.kind = 'refund' AND t.ref = d.refund_ref
    WHERE d.shown_as_negative;
END $$;
COMMENT ON FUNCTION loyalty._negative_lines(bigint) IS 'Internal: statement lines of refunds whose shortfall is shown as negative (whole clawback; transfer_id NULL when the refund took no lot) and recover lines less the part that repaid such a shortfall';
