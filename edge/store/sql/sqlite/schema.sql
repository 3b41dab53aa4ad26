-- Canonical Tillflow SQLite schema: what applying every migration produces.
-- A test checks the two converge; change both together (add a migration, edit this).

CREATE TABLE workflow_definitions (
    content_hash  TEXT PRIMARY KEY,
    workflow_type TEXT NOT NULL,
    version       TEXT NOT NULL,
    snapshot      TEXT NOT NULL,
    registered_at REAL NOT NULL
) STRICT;

CREATE INDEX workflow_definitions_by_type
    ON workflow_definitions (workflow_type, registered_at);

CREATE TABLE workflow_runs (
    run_id           TEXT PRIMARY KEY,
    workflow_type    TEXT NOT NULL,
    definition_hash  TEXT NOT NULL REFERENCES workflow_definitions (content_hash),
    fingerprints     TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('RUNNING', 'WAITING', 'COMPLETED',
                         'FAILED', 'COMPENSATING', 'ROLLED_BACK', 'CANCELLED')),
    state            TEXT NOT NULL,
    cursor           TEXT NOT NULL,
    revision         INTEGER NOT NULL,
    idempotency_key  TEXT UNIQUE,
    parent_run_id    TEXT REFERENCES workflow_runs (run_id),
    parent_step      TEXT,
    lease_owner      TEXT,
    lease_expires_at REAL,
    next_attempt_at  REAL,
    error            TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL
) STRICT;

-- A run's input never changes; kept apart so the per-step UPDATE of a run does not
-- rewrite it (SQLite rewrites the whole row on every UPDATE).
CREATE TABLE workflow_run_inputs (
    run_id TEXT PRIMARY KEY REFERENCES workflow_runs (run_id),
    input  TEXT NOT NULL
) STRICT;

CREATE INDEX workflow_runs_by_status ON workflow_runs (status, next_attempt_at);
CREATE INDEX workflow_runs_by_parent ON workflow_runs (parent_run_id);
CREATE INDEX workflow_runs_by_updated ON workflow_runs (updated_at);

-- seq is global (the rowid): increasing within a run, and assigned without a lookup.
CREATE TABLE workflow_steps (
    seq         INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES workflow_runs (run_id),
    step        TEXT NOT NULL,
    step_name   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    status      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL NOT NULL,
    output      TEXT,
    error       TEXT,
    ref_seq     INTEGER,
    operation_key TEXT
) STRICT;

CREATE INDEX workflow_steps_by_run ON workflow_steps (run_id, seq);

-- Append-only, hash-chained (see edge/engine/audit.py); a terminal has one stream (0),
-- version is the hash rule each row was written with (1: before version 2 existed). The triggers make an honest
-- mistake fail loudly; the chain makes a deliberate edit detectable.
CREATE TABLE workflow_audit_log (
    seq       INTEGER PRIMARY KEY,
    run_id    TEXT,
    event     TEXT NOT NULL,
    step      TEXT,
    detail    TEXT NOT NULL,
    at        REAL NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    stream    INTEGER NOT NULL DEFAULT 0,
    version   INTEGER NOT NULL DEFAULT 1
) STRICT;

CREATE INDEX workflow_audit_log_by_run ON workflow_audit_log (run_id, seq);

CREATE TRIGGER workflow_audit_log_no_update BEFORE UPDATE ON workflow_audit_log
BEGIN
    SELECT RAISE(ABORT, 'workflow_audit_log is append-only');
END;

-- Rows behind the retention base (compacted after the cloud acknowledged them) may go.
CREATE TRIGGER workflow_audit_log_no_delete BEFORE DELETE ON workflow_audit_log
WHEN OLD.seq > coalesce((SELECT base_seq FROM audit_retention WHERE id = 1), 0)
BEGIN
    SELECT RAISE(ABORT, 'workflow_audit_log is append-only');
END;

-- Retention: the last compacted row (the kept chain starts from its hash) and how far
-- the cloud has acknowledged the log.
CREATE TABLE audit_retention (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    base_seq  INTEGER NOT NULL,
    base_hash TEXT NOT NULL,
    acked_seq INTEGER NOT NULL
) STRICT;

CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
) STRICT;

CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    run_id     TEXT,
    step       TEXT,
    topic      TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at REAL NOT NULL
) STRICT;

CREATE TABLE counters (
    name       TEXT PRIMARY KEY,
    amount     INTEGER NOT NULL DEFAULT 0,
    count      INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
) STRICT;

-- The database's own id (the sync protocol's stream), drawn once when it is created.
CREATE TABLE database_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

INSERT INTO database_meta (key, value) VALUES ('stream', lower(hex(randomblob(16))));

-- Commands taken from the control plane (applied or refused), one row per seq.
CREATE TABLE command_ledger (
    seq        INTEGER PRIMARY KEY,
    command_id TEXT NOT NULL UNIQUE,
    action     TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('applied', 'refused')),
    reason     TEXT,
    issued_at  REAL NOT NULL,
    at         REAL NOT NULL
) STRICT;

-- Config and policy documents; the highest version of a kind is in force.
CREATE TABLE documents (
    kind        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    content     TEXT NOT NULL,
    command_seq INTEGER NOT NULL REFERENCES command_ledger (seq),
    at          REAL NOT NULL,
    PRIMARY KEY (kind, version)
) STRICT;
