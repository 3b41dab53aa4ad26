-- The unknown outcomes' queries on PostgreSQL. Every value is a bound parameter
-- (%(name)s); a filter left out is a NULL parameter that matches everything.

-- name: record_found
-- The 'unknown' payment and refund messages the sync service holds that are not yet
-- outcomes, recorded open (one per device and key, however often it was reported).
INSERT INTO unknown_outcomes (outcome_id, device_id, op_key, operation, run_id,
                              amount_minor, currency, stream, message_seq, reported_at,
                              found_at)
SELECT 'out_' || md5(m.device_id || ':' || m.key), m.device_id, m.key, m.operation,
       m.run_id, m.amount_minor, m.currency, m.stream, m.seq, m.created_at, %(now)s
FROM (
    SELECT DISTINCT ON (s.device_id, k.key)
           s.device_id, k.key,
           CASE s.topic WHEN 'payment' THEN 'authorization' ELSE 'refund' END AS operation,
           coalesce(s.run_id, s.payload->>'run_id') AS run_id,
           (s.payload->>'amount_minor')::bigint AS amount_minor,
           s.payload->>'currency' AS currency,
           s.stream, s.seq, s.created_at
    FROM sync_messages s
    CROSS JOIN LATERAL (
        SELECT CASE s.topic WHEN 'payment' THEN s.payload->>'auth_key'
                            ELSE s.payload->>'refund_key' END AS key
    ) k
    WHERE s.topic IN ('payment', 'refund')
      AND s.payload->>'decision' = 'unknown'
      AND k.key IS NOT NULL
      AND coalesce(s.run_id, s.payload->>'run_id') IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM unknown_outcomes o
                      WHERE o.device_id = s.device_id AND o.op_key = k.key)
    ORDER BY s.device_id, k.key, s.received_at
    LIMIT %(limit)s
) m
ON CONFLICT (device_id, op_key) DO NOTHING;

-- name: unstarted
-- Open outcomes no resolve_outcome run was noted for yet (new, or whose start was lost).
SELECT outcome_id, device_id, op_key, operation, run_id, amount_minor, currency
FROM unknown_outcomes
WHERE state = 'open' AND resolve_run_id IS NULL
ORDER BY outcome_no
LIMIT %(limit)s;

-- name: note_run
-- The resolve_outcome run started for an outcome.
UPDATE unknown_outcomes SET resolve_run_id = %(run_id)s
WHERE outcome_id = %(outcome_id)s AND resolve_run_id IS NULL;

-- name: outcome_for_update
-- One outcome, locked while its truth is recorded.
SELECT outcome_id, device_id, op_key, operation, run_id, state, status, command_id
FROM unknown_outcomes WHERE outcome_id = %(outcome_id)s
FOR UPDATE;

-- name: resolve
-- Record the truth of an open outcome and the command that tells the terminal.
UPDATE unknown_outcomes
SET state = 'resolved', status = %(status)s, acquirer_ref = %(acquirer_ref)s,
    lookup = %(lookup)s, resolved_at = %(at)s, command_id = %(command_id)s,
    command_note = %(command_note)s
WHERE outcome_id = %(outcome_id)s AND state = 'open';

-- name: outcomes
-- Outcomes in the order they were found, after a cursor, filtered by state and device,
-- with the state of the command that told the terminal.
SELECT o.outcome_no, o.outcome_id, o.device_id, o.op_key, o.operation, o.run_id,
       o.amount_minor, o.currency, o.reported_at, o.found_at, o.state, o.resolve_run_id,
       o.status, o.acquirer_ref, o.resolved_at, o.command_id, o.command_note,
       c.status AS command_status, c.reason AS command_reason
FROM unknown_outcomes o
LEFT JOIN commands c ON c.command_id = o.command_id
WHERE (%(state)s::text IS NULL OR o.state = %(state)s::text)
  AND (%(device_id)s::text IS NULL OR o.device_id = %(device_id)s::text)
  AND (%(after)s::bigint IS NULL OR o.outcome_no > %(after)s::bigint)
ORDER BY o.outcome_no
LIMIT %(limit)s;

-- name: outcome
-- One outcome by id, as the list shows it, with the acquirer's answer.
SELECT o.outcome_no, o.outcome_id, o.device_id, o.op_key, o.operation, o.run_id,
       o.amount_minor, o.currency, o.reported_at, o.found_at, o.state, o.resolve_run_id,
       o.status, o.acquirer_ref, o.resolved_at, o.command_id, o.command_note,
       c.status AS command_status, c.reason AS command_reason, o.lookup
FROM unknown_outcomes o
LEFT JOIN commands c ON c.command_id = o.command_id
WHERE o.outcome_id = %(outcome_id)s;
