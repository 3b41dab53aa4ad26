-- Retention: a terminal's database stays within its size budget. Finished runs and the
-- audit rows the cloud has acknowledged are compacted away; the chain then starts from
-- the last removed row (its seq and hash), so what is kept still verifies.

-- base_seq: the last row compacted away (0: none yet); base_hash: its hash, the first
-- kept row's prev_hash; acked_seq: the cloud holds every row up to here.
CREATE TABLE audit_retention (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    base_seq  INTEGER NOT NULL,
    base_hash TEXT NOT NULL,
    acked_seq INTEGER NOT NULL
) STRICT;

-- Still append-only for everything the retention base has not passed: removing a row
-- the cloud may not hold, or one past the base, fails loudly.
DROP TRIGGER workflow_audit_log_no_delete;

CREATE TRIGGER workflow_audit_log_no_delete BEFORE DELETE ON workflow_audit_log
WHEN OLD.seq > coalesce((SELECT base_seq FROM audit_retention WHERE id = 1), 0)
BEGIN
    SELECT RAISE(ABORT, 'workflow_audit_log is append-only');
END;

CREATE INDEX workflow_runs_by_updated ON workflow_runs (updated_at);
