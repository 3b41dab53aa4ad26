-- Named queries of the SQLite store. Each starts with "-- name: NAME" and a one-line
-- description; the PostgreSQL store defines the same names (a test checks the sets).

-- name: create_migrations_table
-- Bookkeeping for applied migrations; created before the first one runs.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at REAL NOT NULL
) STRICT;

-- name: has_migrations_table
-- Whether migrations were ever applied here (status must not create anything).
SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations';

-- name: schema_version
-- The highest applied migration.
SELECT coalesce(max(version), 0) FROM schema_migrations;

-- name: record_migration
-- Mark one migration applied.
INSERT INTO schema_migrations (version, name, applied_at) VALUES (:version, :name, :at);

-- name: save_definition
-- Register a definition snapshot; the same content hash twice is a no-op.
INSERT INTO workflow_definitions (content_hash, workflow_type, version, snapshot, registered_at)
VALUES (:content_hash, :workflow_type, :version, :snapshot, :at)
ON CONFLICT (content_hash) DO NOTHING;

-- name: load_definition
-- One snapshot by content hash.
SELECT snapshot FROM workflow_definitions WHERE content_hash = :content_hash;

-- name: latest_definition
-- The newest snapshot registered for a workflow type.
SELECT snapshot FROM workflow_definitions WHERE workflow_type = :workflow_type
ORDER BY registered_at DESC, rowid DESC LIMIT 1;

-- name: run_by_idempotency_key
-- The run started with an idempotency key, if any.
SELECT run_id FROM workflow_runs WHERE idempotency_key = :idempotency_key;

-- name: insert_run
-- A new run row; an existing idempotency key inserts nothing (returns no row).
INSERT INTO workflow_runs (run_id, workflow_type, definition_hash, fingerprints, status, state,
    cursor, revision, idempotency_key, parent_run_id, parent_step, lease_owner,
    lease_expires_at, next_attempt_at, error, created_at, updated_at)
VALUES (:run_id, :workflow_type, :definition_hash, :fingerprints, :status, :state,
    :cursor, :revision, :idempotency_key, :parent_run_id, :parent_step, :lease_owner,
    :lease_expires_at, :next_attempt_at, :error, :created_at, :updated_at)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING run_id;

-- name: insert_run_input
-- A new run's input, written once.
INSERT INTO workflow_run_inputs (run_id, input) VALUES (:run_id, :input);

-- name: update_run
-- Replace a run's mutable columns if nobody else changed it since we read it.
UPDATE workflow_runs SET status = :status, state = :state, cursor = :cursor,
    revision = :revision, lease_owner = :lease_owner, lease_expires_at = :lease_expires_at,
    next_attempt_at = :next_attempt_at, error = :error, fingerprints = :fingerprints,
    updated_at = :updated_at
WHERE run_id = :run_id AND revision = :expected_revision;

-- name: wake_run
-- A child finished: make its WAITING parent runnable now.
UPDATE workflow_runs SET status = 'RUNNING', next_attempt_at = :at, lease_owner = NULL,
    lease_expires_at = NULL, revision = revision + 1, updated_at = :at
WHERE run_id = :run_id AND status = 'WAITING';

-- name: claim_run
-- Take the lease on a run whose revision is unchanged.
UPDATE workflow_runs SET lease_owner = :owner, lease_expires_at = :lease_expires_at,
    revision = revision + 1
WHERE run_id = :run_id AND revision = :expected_revision;

-- name: claim_due
-- Lease the oldest due runs nobody live holds (one writer: no skip-locking needed).
UPDATE workflow_runs SET lease_owner = :owner, lease_expires_at = :lease_expires_at,
    revision = revision + 1
WHERE run_id IN (
    SELECT run_id FROM workflow_runs
    WHERE ((status IN ('RUNNING', 'COMPENSATING')
            AND (next_attempt_at IS NULL OR next_attempt_at <= :now))
        OR (status = 'WAITING' AND next_attempt_at IS NOT NULL AND next_attempt_at <= :now))
      AND (lease_owner IS NULL OR lease_expires_at <= :now OR lease_owner = :owner)
    ORDER BY created_at, rowid LIMIT :limit)
RETURNING run_id;

-- name: renew_lease
-- Extend a lease we still hold.
UPDATE workflow_runs SET lease_expires_at = :lease_expires_at
WHERE run_id = :run_id AND lease_owner = :owner;

-- name: get_run
-- One run.
SELECT r.*, i.input FROM workflow_runs r LEFT JOIN workflow_run_inputs i USING (run_id)
WHERE r.run_id = :run_id;

-- name: list_runs
-- Most recent runs first.
SELECT r.*, i.input FROM workflow_runs r LEFT JOIN workflow_run_inputs i USING (run_id)
ORDER BY r.created_at DESC, r.rowid DESC LIMIT :limit;

-- name: list_runs_by_status
-- Most recent runs with one status first.
SELECT r.*, i.input FROM workflow_runs r LEFT JOIN workflow_run_inputs i USING (run_id)
WHERE r.status = :status ORDER BY r.created_at DESC, r.rowid DESC LIMIT :limit;

-- name: recoverable_runs
-- Runs a worker may need to pick up, oldest first.
SELECT r.*, i.input FROM workflow_runs r LEFT JOIN workflow_run_inputs i USING (run_id)
WHERE r.status IN ('RUNNING', 'COMPENSATING')
   OR (r.status = 'WAITING' AND r.next_attempt_at IS NOT NULL AND r.next_attempt_at <= :now)
ORDER BY r.created_at, r.rowid LIMIT :limit;

-- name: insert_step
-- One step outcome; returns its seq.
INSERT INTO workflow_steps (run_id, step, step_name, kind, status, attempt, started_at,
    finished_at, output, error, ref_seq, operation_key)
VALUES (:run_id, :step, :step_name, :kind, :status, :attempt, :started_at,
    :finished_at, :output, :error, :ref_seq, :operation_key)
RETURNING seq;

-- name: step_history
-- A run's step rows in order.
SELECT * FROM workflow_steps WHERE run_id = :run_id ORDER BY seq;

-- name: ensure_audit_head
-- Nothing to do: a terminal's one head row is created by set_audit_head (an upsert).
SELECT 1 WHERE :stream = 0;

-- name: audit_head
-- A stream's last link (a terminal has one stream, 0).
SELECT seq, hash FROM audit_head WHERE id = 1 AND :stream = 0;

-- name: audit_heads
-- Every stream's last link, for the verifier.
SELECT 0 AS stream, seq, hash FROM audit_head WHERE id = 1 AND seq > 0;

-- name: set_audit_head
-- Move a stream's last link.
INSERT INTO audit_head (id, seq, hash) SELECT 1, :seq, :hash WHERE :stream = 0
ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash;

-- name: insert_audit
-- Append one audit row.
INSERT INTO workflow_audit_log (seq, run_id, event, step, detail, at, prev_hash, hash,
    stream, version)
VALUES (:seq, :run_id, :event, :step, :detail, :at, :prev_hash, :hash, :stream, :version);

-- name: audit_rows
-- Every stream's chain, in (stream, seq) order.
SELECT * FROM workflow_audit_log ORDER BY stream, seq;

-- name: audit_rows_for_run
-- One run's audit rows in order.
SELECT * FROM workflow_audit_log WHERE run_id = :run_id ORDER BY stream, seq;

-- name: insert_outbox
-- Queue one message for the cloud; returns its seq.
INSERT INTO outbox (message_id, run_id, step, topic, payload, created_at)
VALUES (:message_id, :run_id, :step, :topic, :payload, :created_at)
RETURNING seq;

-- name: outbox_after
-- Queued messages after a sequence number, in order.
SELECT * FROM outbox WHERE seq > :after_seq ORDER BY seq LIMIT :limit;

-- name: ensure_counter
-- Create a guarded counter at zero if it does not exist yet.
INSERT INTO counters (name, amount, count, updated_at) VALUES (:name, 0, 0, :at)
ON CONFLICT (name) DO NOTHING;

-- name: apply_counter
-- Change a counter only if it stays within its caps (and never below zero).
UPDATE counters SET amount = amount + :amount, count = count + :count, updated_at = :at
WHERE name = :name
  AND (:max_amount IS NULL OR amount + :amount <= :max_amount)
  AND (:max_count IS NULL OR count + :count <= :max_count)
  AND amount + :amount >= 0 AND count + :count >= 0;

-- name: counters
-- Every guarded counter.
SELECT name, amount, count FROM counters ORDER BY name;

-- name: outbox_stats
-- Depth, payload bytes and the oldest message's time of the outbox.
SELECT count(*) AS depth, coalesce(sum(length(payload)), 0) AS bytes,
    min(created_at) AS oldest, coalesce(max(seq), 0) AS last_seq
FROM outbox;

-- name: ack_outbox
-- Drop what the cloud acknowledged, up to and including a seq; returns what went.
DELETE FROM outbox WHERE seq <= :seq RETURNING seq, length(payload) AS bytes;

-- name: audit_retention
-- A stream's retention base (the last compacted row) and how far the cloud acknowledged.
SELECT base_seq, base_hash, acked_seq FROM audit_retention WHERE id = 1 AND :stream = 0;

-- name: audit_retentions
-- Every stream's retention row.
SELECT 0 AS stream, base_seq, base_hash, acked_seq FROM audit_retention WHERE id = 1;

-- name: ack_audit
-- The cloud holds a stream's audit log up to a seq (never moves back).
INSERT INTO audit_retention (id, base_seq, base_hash, acked_seq)
SELECT 1, 0, :genesis, :seq WHERE :stream = 0
ON CONFLICT (id) DO UPDATE SET acked_seq = max(audit_retention.acked_seq, excluded.acked_seq);

-- name: audit_compact_point
-- A stream's newest acknowledged row written before a time: compaction removes up to here.
SELECT seq, hash FROM workflow_audit_log
WHERE stream = :stream AND seq <= :acked_seq AND at < :before
ORDER BY seq DESC LIMIT 1;

-- name: set_audit_base
-- Move a stream's retention base forward (first, so the delete trigger lets the rows go).
UPDATE audit_retention SET base_seq = :seq, base_hash = :hash
WHERE id = 1 AND :stream = 0 AND base_seq < :seq;

-- name: delete_audit_through
-- Remove a stream's compacted audit rows, up to and including the base.
DELETE FROM workflow_audit_log WHERE stream = :stream AND seq <= :seq;

-- name: compactable_runs
-- Finished runs changed before a time, but not the ancestors of any run that stays.
WITH RECURSIVE kept_parent (run_id) AS (
    SELECT parent_run_id FROM workflow_runs
    WHERE parent_run_id IS NOT NULL
      AND NOT (status IN ('COMPLETED', 'FAILED', 'ROLLED_BACK', 'CANCELLED')
               AND updated_at < :before)
    UNION
    SELECT r.parent_run_id FROM workflow_runs r JOIN kept_parent k ON r.run_id = k.run_id
    WHERE r.parent_run_id IS NOT NULL
)
SELECT run_id FROM workflow_runs
WHERE status IN ('COMPLETED', 'FAILED', 'ROLLED_BACK', 'CANCELLED') AND updated_at < :before
  AND run_id NOT IN (SELECT run_id FROM kept_parent);

-- name: delete_steps_of_runs
-- Step rows of compacted runs (run ids as a JSON array).
DELETE FROM workflow_steps WHERE run_id IN (SELECT value FROM json_each(:run_ids));

-- name: delete_inputs_of_runs
-- Inputs of compacted runs (run ids as a JSON array).
DELETE FROM workflow_run_inputs WHERE run_id IN (SELECT value FROM json_each(:run_ids));

-- name: delete_runs
-- Compacted runs themselves (run ids as a JSON array).
DELETE FROM workflow_runs WHERE run_id IN (SELECT value FROM json_each(:run_ids));

-- name: delete_idle_counters
-- Counters under a name prefix nobody has changed since a time (ended windows).
DELETE FROM counters WHERE name LIKE :prefix || '%' AND updated_at < :before;

-- name: database_id
-- The database's own id (the sync protocol's stream), drawn when it was created.
SELECT value FROM database_meta WHERE key = 'stream';

-- name: audit_after
-- A stream's audit rows after a seq, in order (what the sync client uploads).
SELECT * FROM workflow_audit_log WHERE stream = :stream AND seq > :after_seq
ORDER BY seq LIMIT :limit;

-- name: lock_command_ledger
-- Serialise commands (SQLite: BEGIN IMMEDIATE already holds the write lock).
SELECT value FROM database_meta WHERE key = 'stream';

-- name: insert_command
-- A command's ledger row, only if its seq is above every seq recorded (compare-and-set).
INSERT INTO command_ledger (seq, command_id, action, status, reason, issued_at, at)
SELECT :seq, :command_id, :action, :status, :reason, :issued_at, :at
WHERE :seq > (SELECT coalesce(max(seq), 0) FROM command_ledger)
  AND NOT EXISTS (SELECT 1 FROM command_ledger WHERE command_id = :command_id);

-- name: get_command
-- A command's ledger row by its id.
SELECT * FROM command_ledger WHERE command_id = :command_id;

-- name: command_high_water
-- The highest command seq recorded (0 if none).
SELECT coalesce(max(seq), 0) AS seq FROM command_ledger;

-- name: trusted_time
-- The latest time the control plane signed a recorded command at.
SELECT max(issued_at) AS at FROM command_ledger;

-- name: insert_document
-- A document a command brought into force.
INSERT INTO documents (kind, version, content, command_seq, at)
VALUES (:kind, :version, :content, :seq, :at);

-- name: active_document
-- The highest version of a kind of document.
SELECT version, content FROM documents WHERE kind = :kind ORDER BY version DESC LIMIT 1;
