-- Canonical Tillflow PostgreSQL schema: what applying every migration produces.
-- A test checks the two converge; change both together (add a migration, edit this).

CREATE TABLE workflow_definitions (
    content_hash   text PRIMARY KEY,
    workflow_type  text NOT NULL,
    version        text NOT NULL,
    snapshot       text NOT NULL,
    registered_at  double precision NOT NULL,
    registered_seq bigint GENERATED ALWAYS AS IDENTITY
);

CREATE INDEX workflow_definitions_by_type
    ON workflow_definitions (workflow_type, registered_at, registered_seq);

CREATE TABLE workflow_runs (
    run_id           text PRIMARY KEY,
    workflow_type    text NOT NULL,
    definition_hash  text NOT NULL REFERENCES workflow_definitions (content_hash),
    fingerprints     jsonb NOT NULL,
    status           text NOT NULL CHECK (status IN ('RUNNING', 'WAITING', 'COMPLETED',
                         'FAILED', 'COMPENSATING', 'ROLLED_BACK', 'CANCELLED')),
    state            jsonb NOT NULL,
    cursor           jsonb NOT NULL,
    revision         bigint NOT NULL,
    idempotency_key  text UNIQUE,
    parent_run_id    text REFERENCES workflow_runs (run_id),
    parent_step      text,
    lease_owner      text,
    lease_expires_at double precision,
    next_attempt_at  double precision,
    error            jsonb,
    created_at       double precision NOT NULL,
    updated_at       double precision NOT NULL,
    -- Which commit wrote this revision: after a connection drops during COMMIT, the
    -- store reads it back to tell "landed" from "lost" and never applies an outcome twice.
    commit_token     text
);

-- A run's input never changes; kept apart so the per-step UPDATE does not copy it.
CREATE TABLE workflow_run_inputs (
    run_id text PRIMARY KEY REFERENCES workflow_runs (run_id),
    input  jsonb NOT NULL
);

CREATE INDEX workflow_runs_in_flight ON workflow_runs (created_at)
    WHERE status IN ('RUNNING', 'COMPENSATING', 'WAITING');
CREATE INDEX workflow_runs_by_status ON workflow_runs (status, created_at);
CREATE INDEX workflow_runs_by_parent ON workflow_runs (parent_run_id);
CREATE INDEX workflow_runs_by_updated ON workflow_runs (updated_at);

CREATE TABLE workflow_steps (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      text NOT NULL REFERENCES workflow_runs (run_id),
    step        text NOT NULL,
    step_name   text NOT NULL,
    kind        text NOT NULL,
    status      text NOT NULL,
    attempt     integer NOT NULL,
    started_at  double precision NOT NULL,
    finished_at double precision NOT NULL,
    output      jsonb,
    error       jsonb,
    ref_seq     bigint,
    operation_key text
);

CREATE INDEX workflow_steps_by_run ON workflow_steps (run_id, seq);

-- Append-only, hash-chained per stream (see edge/engine/audit.py).
CREATE TABLE workflow_audit_log (
    seq       bigint NOT NULL,
    run_id    text,
    event     text NOT NULL,
    step      text,
    detail    jsonb NOT NULL,
    at        double precision NOT NULL,
    prev_hash text NOT NULL,
    hash      text NOT NULL,
    stream    integer NOT NULL DEFAULT 0,  -- audit.stream_of(run_id, streams)
    version   integer NOT NULL DEFAULT 1,  -- the hash rule (1: before version 2)
    PRIMARY KEY (stream, seq)
);

CREATE INDEX workflow_audit_log_by_run ON workflow_audit_log (run_id, stream, seq);

CREATE FUNCTION workflow_audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'workflow_audit_log is append-only';
END
$$;

CREATE TRIGGER workflow_audit_log_no_update BEFORE UPDATE ON workflow_audit_log
    FOR EACH ROW EXECUTE FUNCTION workflow_audit_log_append_only();
-- Rows behind the retention base (compacted after the cloud acknowledged them) may go.
CREATE FUNCTION workflow_audit_log_delete_behind_base() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.seq > coalesce(
        (SELECT base_seq FROM audit_retention WHERE stream = OLD.stream), 0) THEN
        RAISE EXCEPTION 'workflow_audit_log is append-only';
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER workflow_audit_log_no_delete BEFORE DELETE ON workflow_audit_log
    FOR EACH ROW EXECUTE FUNCTION workflow_audit_log_delete_behind_base();
CREATE TRIGGER workflow_audit_log_no_truncate BEFORE TRUNCATE ON workflow_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION workflow_audit_log_append_only();

-- Retention: the last compacted row (the kept chain starts from its hash) and how far
-- the cloud has acknowledged the log.
CREATE TABLE audit_retention (
    stream    integer PRIMARY KEY,
    base_seq  bigint NOT NULL,
    base_hash text NOT NULL,
    acked_seq bigint NOT NULL
);

-- Each stream's last link. Appenders lock their streams' rows (FOR UPDATE, in stream
-- order), last in their transaction: that orders each chain across workers and holds
-- the lock only briefly; workers on different streams do not wait on each other.
CREATE TABLE audit_head (
    stream integer PRIMARY KEY,
    seq    bigint NOT NULL,
    hash   text NOT NULL
);

INSERT INTO audit_head (stream, seq, hash)
VALUES (0, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE outbox (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text NOT NULL UNIQUE,
    run_id     text,
    step       text,
    topic      text NOT NULL,
    payload    jsonb NOT NULL,
    created_at double precision NOT NULL
);

CREATE TABLE counters (
    name       text PRIMARY KEY,
    amount     bigint NOT NULL DEFAULT 0,
    count      bigint NOT NULL DEFAULT 0,
    updated_at double precision NOT NULL
);

-- The database's own id (the sync protocol's stream), drawn once when it is created.
CREATE TABLE database_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

INSERT INTO database_meta (key, value)
VALUES ('stream', md5(random()::text || clock_timestamp()::text));

-- Commands taken from the control plane (applied or refused), one row per seq.
CREATE TABLE command_ledger (
    seq        bigint PRIMARY KEY,
    command_id text NOT NULL UNIQUE,
    action     text NOT NULL,
    status     text NOT NULL CHECK (status IN ('applied', 'refused')),
    reason     text,
    issued_at  double precision NOT NULL,
    at         double precision NOT NULL
);

-- Config and policy documents; the highest version of a kind is in force.
CREATE TABLE documents (
    kind        text NOT NULL,
    version     bigint NOT NULL,
    content     jsonb NOT NULL,
    command_seq bigint NOT NULL REFERENCES command_ledger (seq),
    at          double precision NOT NULL,
    PRIMARY KEY (kind, version)
);
