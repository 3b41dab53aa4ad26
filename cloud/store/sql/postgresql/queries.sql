-- Named queries of the PostgreSQL store: the same names as the SQLite store's (a test
-- checks the sets), in PostgreSQL's dialect and psycopg's %(name)s parameters.

-- name: create_migrations_table
-- Bookkeeping for applied migrations; created before the first one runs.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at double precision NOT NULL
);

-- name: has_migrations_table
-- Whether migrations were ever applied here (status must not create anything).
SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'schema_migrations';

-- name: schema_version
-- The highest applied migration.
SELECT coalesce(max(version), 0) FROM schema_migrations;

-- name: record_migration
-- Mark one migration applied.
INSERT INTO schema_migrations (version, name, applied_at) VALUES (%(version)s, %(name)s, %(at)s);

-- name: save_definition
-- Register a definition snapshot; the same content hash twice is a no-op.
INSERT INTO workflow_definitions (content_hash, workflow_type, version, snapshot, registered_at)
VALUES (%(content_hash)s, %(workflow_type)s, %(version)s, %(snapshot)s, %(at)s)
ON CONFLICT (content_hash) DO NOTHING;

-- name: load_definition
-- One snapshot by content hash.
SELECT snapshot FROM workflow_definitions WHERE content_hash = %(content_hash)s;

-- name: latest_definition
-- The newest snapshot registered for a workflow type.
SELECT snapshot FROM workflow_definitions WHERE workflow_type = %(workflow_type)s
ORDER BY registered_at DESC, registered_seq DESC LIMIT 1;

-- name: run_by_idempotency_key
-- The run started with an idempotency key, if any.
SELECT run_id FROM workflow_runs WHERE idempotency_key = %(idempotency_key)s;

-- name: insert_run
-- A new run row; an existing idempotency key inserts nothing (returns no row).
INSERT INTO workflow_runs (run_id, workflow_type, definition_hash, fingerprints, status, state,
    cursor, revision, idempotency_key, parent_run_id, parent_step, lease_owner,
    lease_expires_at, next_attempt_at, error, created_at, updated_at, commit_token)
VALUES (%(run_id)s, %(workflow_type)s, %(definition_hash)s, %(fingerprints)s, %(status)s,
    %(state)s, %(cursor)s, %(revision)s, %(idempotency_key)s, %(parent_run_id)s,
    %(parent_step)s, %(lease_owner)s, %(lease_expires_at)s, %(next_attempt_at)s, %(error)s,
    %(created_at)s, %(updated_at)s, %(commit_token)s)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING run_id;

-- name: insert_run_input
-- A new run's input, written once.
INSERT INTO workflow_run_inputs (run_id, input) VALUES (%(run_id)s, %(input)s);

-- name: update_run
-- Replace a run's mutable columns if nobody else changed it since we read it.
UPDATE workflow_runs SET status = %(status)s, state = %(state)s, cursor = %(cursor)s,
    revision = %(revision)s, lease_owner = %(lease_owner)s,
    lease_expires_at = %(lease_expires_at)s, next_attempt_at = %(next_attempt_at)s,
    error = %(error)s, fingerprints = %(fingerprints)s, updated_at = %(updated_at)s,
    commit_token = %(commit_token)s
WHERE run_id = %(run_id)s AND revision = %(expected_revision)s;

-- name: wake_run
-- A child finished: make its WAITING parent runnable now.
UPDATE workflow_runs SET status = 'RUNNING', next_attempt_at = %(at)s, lease_owner = NULL,
    lease_expires_at = NULL, revision = revision + 1, updated_at = %(at)s
WHERE run_id = %(run_id)s AND status = 'WAITING';

-- name: claim_run
-- Take the lease on a run whose revision is unchanged.
UPDATE workflow_runs SET lease_owner = %(owner)s, lease_expires_at = %(lease_expires_at)s,
    revision = revision + 1
WHERE run_id = %(run_id)s AND revision = %(expected_revision)s;

-- name: claim_due
-- Lease the oldest due runs nobody live holds; rows another worker is claiming are skipped.
WITH due AS (
    SELECT run_id FROM workflow_runs
    WHERE ((status IN ('RUNNING', 'COMPENSATING')
            AND (next_attempt_at IS NULL OR next_attempt_at <= %(now)s))
        OR (status = 'WAITING' AND next_attempt_at IS NOT NULL AND next_attempt_at <= %(now)s))
      AND (lease_owner IS NULL OR lease_expires_at <= %(now)s OR lease_owner = %(owner)s)
    ORDER BY created_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE workflow_runs r SET lease_owner = %(owner)s,
        lease_expires_at = %(lease_expires_at)s, revision = r.revision + 1
    FROM due WHERE r.run_id = due.run_id
    RETURNING r.*
)
SELECT c.*, i.input FROM claimed c LEFT JOIN workflow_run_inputs i USING (run_id)
ORDER BY c.created_at;

-- name: renew_lease
-- Extend a lease we still hold.
UPDATE workflow_runs SET lease_expires_at = %(lease_expires_at)s
WHERE run_id = %(run_id)s AND lease_owner = %(owner)s;

-- name: get_run
-- One run.
SELECT r.*, i.input FROM workflow_runs r LEFT JOIN workflow_run_inputs i USING (run_id)
WHERE r.run_id = %(run_id)s;

-- name: list_runs
-- Most recent runs first.
SELECT r.*, i.input FROM workflow_runs r LEFT JOIN workflow_run_inputs i USING (run_id)
ORDER BY r.created_at DESC, r.run_id DESC LIMIT %(limit)s;

-- name: list_runs_by_status
-- Most recent runs with one status first.
SELECT r.*, i.input FROM workflow_runs r LEFT JOIN workflow_run_inputs i USING (run_id)
WHERE r.status = %(status)s ORDER BY r.created_at DESC, r.run_id DESC LIMIT %(limit)s;

-- name: recoverable_runs
-- Runs a worker may need to pick up, oldest first.
SELECT r.*, i.input FROM workflow_runs r LEFT JOIN workflow_run_inputs i USING (run_id)
WHERE r.status IN ('RUNNING', 'COMPENSATING')
   OR (r.status = 'WAITING' AND r.next_attempt_at IS NOT NULL AND r.next_attempt_at <= %(now)s)
ORDER BY r.created_at, r.run_id LIMIT %(limit)s;

-- name: insert_step
-- One step outcome; returns its seq.
INSERT INTO workflow_steps (run_id, step, step_name, kind, status, attempt, started_at,
    finished_at, output, error, ref_seq, operation_key)
VALUES (%(run_id)s, %(step)s, %(step_name)s, %(kind)s, %(status)s, %(attempt)s,
    %(started_at)s, %(finished_at)s, %(output)s, %(error)s, %(ref_seq)s, %(operation_key)s)
RETURNING seq;

-- name: step_history
-- A run's step rows in order.
SELECT * FROM workflow_steps WHERE run_id = %(run_id)s ORDER BY seq;

-- name: ensure_audit_head
-- A stream's head row at genesis, if the stream has none yet (so it can be locked).
INSERT INTO audit_head (stream, seq, hash) VALUES (%(stream)s, 0, %(genesis)s)
ON CONFLICT (stream) DO NOTHING;

-- name: audit_head
-- A stream's last link, locked until the appending transaction ends.
SELECT seq, hash FROM audit_head WHERE stream = %(stream)s FOR UPDATE;

-- name: audit_heads
-- Every stream's last link, for the verifier.
SELECT stream, seq, hash FROM audit_head WHERE seq > 0 ORDER BY stream;

-- name: set_audit_head
-- Move a stream's last link.
UPDATE audit_head SET seq = %(seq)s, hash = %(hash)s WHERE stream = %(stream)s;

-- name: insert_audit
-- Append one audit row.
INSERT INTO workflow_audit_log (seq, run_id, event, step, detail, at, prev_hash, hash,
    stream, version)
VALUES (%(seq)s, %(run_id)s, %(event)s, %(step)s, %(detail)s, %(at)s, %(prev_hash)s, %(hash)s,
    %(stream)s, %(version)s);

-- name: audit_rows
-- Every stream's chain, in (stream, seq) order.
SELECT * FROM workflow_audit_log ORDER BY stream, seq;

-- name: audit_rows_for_run
-- One run's audit rows in order.
SELECT * FROM workflow_audit_log WHERE run_id = %(run_id)s ORDER BY stream, seq;

-- name: insert_outbox
-- Queue one message; returns its seq.
INSERT INTO outbox (message_id, run_id, step, topic, payload, created_at)
VALUES (%(message_id)s, %(run_id)s, %(step)s, %(topic)s, %(payload)s, %(created_at)s)
RETURNING seq;

-- name: outbox_after
-- Queued messages after a sequence number, in order.
SELECT * FROM outbox WHERE seq > %(after_seq)s ORDER BY seq LIMIT %(limit)s;

-- name: ensure_counter
-- Create a guarded counter at zero if it does not exist yet.
INSERT INTO counters (name, amount, count, updated_at) VALUES (%(name)s, 0, 0, %(at)s)
ON CONFLICT (name) DO NOTHING;

-- name: apply_counter
-- Change a counter only if it stays within its caps (and never below zero).
UPDATE counters SET amount = amount + %(amount)s, count = count + %(count)s, updated_at = %(at)s
WHERE name = %(name)s
  AND (%(max_amount)s::bigint IS NULL OR amount + %(amount)s <= %(max_amount)s::bigint)
  AND (%(max_count)s::bigint IS NULL OR count + %(count)s <= %(max_count)s::bigint)
  AND amount + %(amount)s >= 0 AND count + %(count)s >= 0;

-- name: counters
-- Every guarded counter.
SELECT name, amount, count FROM counters ORDER BY name;

-- name: outbox_stats
-- Depth, payload bytes and the oldest message's time of the outbox.
SELECT count(*) AS depth, coalesce(sum(octet_length(payload::text)), 0) AS bytes,
    min(created_at) AS oldest, coalesce(max(seq), 0) AS last_seq
FROM outbox;

-- name: ack_outbox
-- Drop what the cloud acknowledged, up to and including a seq; returns what went.
DELETE FROM outbox WHERE seq <= %(seq)s RETURNING seq, octet_length(payload::text) AS bytes;

-- name: audit_retention
-- A stream's retention base (the last compacted row) and how far the cloud acknowledged.
SELECT base_seq, base_hash, acked_seq FROM audit_retention WHERE stream = %(stream)s;

-- name: audit_retentions
-- Every stream's retention row.
SELECT stream, base_seq, base_hash, acked_seq FROM audit_retention ORDER BY stream;

-- name: ack_audit
-- The cloud holds a stream's audit log up to a seq (never moves back).
INSERT INTO audit_retention (stream, base_seq, base_hash, acked_seq)
VALUES (%(stream)s, 0, %(genesis)s, %(seq)s)
ON CONFLICT (stream) DO UPDATE
SET acked_seq = greatest(audit_retention.acked_seq, excluded.acked_seq);

-- name: audit_compact_point
-- A stream's newest acknowledged row written before a time: compaction removes up to here.
SELECT seq, hash FROM workflow_audit_log
WHERE stream = %(stream)s AND seq <= %(acked_seq)s AND at < %(before)s
ORDER BY seq DESC LIMIT 1;

-- name: set_audit_base
-- Move a stream's retention base forward (first, so the delete trigger lets the rows go).
UPDATE audit_retention SET base_seq = %(seq)s, base_hash = %(hash)s
WHERE stream = %(stream)s AND base_seq < %(seq)s;

-- name: delete_audit_through
-- Remove a stream's compacted audit rows, up to and including the base.
DELETE FROM workflow_audit_log WHERE stream = %(stream)s AND seq <= %(seq)s;

-- name: compactable_runs
-- Finished runs changed before a time, but not the ancestors of any run that stays.
WITH RECURSIVE kept_parent (run_id) AS (
    SELECT parent_run_id FROM workflow_runs
    WHERE parent_run_id IS NOT NULL
      AND NOT (status IN ('COMPLETED', 'FAILED', 'ROLLED_BACK', 'CANCELLED')
               AND updated_at < %(before)s)
    UNION
    SELECT r.parent_run_id FROM workflow_runs r JOIN kept_parent k ON r.run_id = k.run_id
    WHERE r.parent_run_id IS NOT NULL
)
SELECT run_id FROM workflow_runs
WHERE status IN ('COMPLETED', 'FAILED', 'ROLLED_BACK', 'CANCELLED')
  AND updated_at < %(before)s
  AND run_id NOT IN (SELECT run_id FROM kept_parent);

-- name: delete_steps_of_runs
-- Step rows of compacted runs (run ids as an array).
DELETE FROM workflow_steps WHERE run_id = ANY(%(run_ids)s);

-- name: delete_inputs_of_runs
-- Inputs of compacted runs (run ids as an array).
DELETE FROM workflow_run_inputs WHERE run_id = ANY(%(run_ids)s);

-- name: delete_runs
-- Compacted runs themselves (run ids as an array).
DELETE FROM workflow_runs WHERE run_id = ANY(%(run_ids)s);

-- name: delete_idle_counters
-- Counters under a name prefix nobody has changed since a time (ended windows).
DELETE FROM counters WHERE name LIKE %(prefix)s || '%%' AND updated_at < %(before)s;

-- name: database_id
-- The database's own id (the sync protocol's stream), drawn when it was created.
SELECT value FROM database_meta WHERE key = 'stream';

-- name: audit_after
-- A stream's audit rows after a seq, in order (what the sync client uploads).
SELECT * FROM workflow_audit_log WHERE stream = %(stream)s AND seq > %(after_seq)s
ORDER BY seq LIMIT %(limit)s;

-- name: lock_command_ledger
-- Serialise commands: a concurrent one waits here, then sees this one's seq.
SELECT value FROM database_meta WHERE key = 'stream' FOR UPDATE;

-- name: insert_command
-- A command's ledger row, only if its seq is above every seq recorded (compare-and-set).
INSERT INTO command_ledger (seq, command_id, action, status, reason, issued_at, at)
SELECT %(seq)s::bigint, %(command_id)s::text, %(action)s::text, %(status)s::text,
    %(reason)s::text, %(issued_at)s::double precision, %(at)s::double precision
WHERE %(seq)s::bigint > (SELECT coalesce(max(seq), 0) FROM command_ledger)
  AND NOT EXISTS (SELECT 1 FROM command_ledger WHERE command_id = %(command_id)s);

-- name: get_command
-- A command's ledger row by its id.
SELECT * FROM command_ledger WHERE command_id = %(command_id)s;

-- name: command_high_water
-- The highest command seq recorded (0 if none).
SELECT coalesce(max(seq), 0) AS seq FROM command_ledger;

-- name: trusted_time
-- The latest time the control plane signed a recorded command at.
SELECT max(issued_at) AS at FROM command_ledger;

-- name: insert_document
-- A document a command brought into force.
INSERT INTO documents (kind, version, content, command_seq, at)
VALUES (%(kind)s, %(version)s, %(content)s, %(seq)s, %(at)s);

-- name: active_document
-- The highest version of a kind of document.
SELECT version, content FROM documents WHERE kind = %(kind)s
ORDER BY version DESC LIMIT 1;
