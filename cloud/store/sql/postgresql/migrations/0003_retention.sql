-- Retention: finished runs and the audit rows the cloud has acknowledged can be
-- compacted away; the chain then starts from the last removed row (its seq and hash),
-- so what is kept still verifies. Same rule as SQLite's 0003.

CREATE TABLE audit_retention (
    id        integer PRIMARY KEY CHECK (id = 1),
    base_seq  bigint NOT NULL,  -- the last row compacted away (0: none yet)
    base_hash text NOT NULL,    -- its hash: the first kept row's prev_hash
    acked_seq bigint NOT NULL   -- the cloud holds every row up to here
);

-- Still append-only for everything the retention base has not passed.
CREATE FUNCTION workflow_audit_log_delete_behind_base() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.seq > coalesce((SELECT base_seq FROM audit_retention WHERE id = 1), 0) THEN
        RAISE EXCEPTION 'workflow_audit_log is append-only';
    END IF;
    RETURN OLD;
END
$$;

DROP TRIGGER workflow_audit_log_no_delete ON workflow_audit_log;
CREATE TRIGGER workflow_audit_log_no_delete BEFORE DELETE ON workflow_audit_log
    FOR EACH ROW EXECUTE FUNCTION workflow_audit_log_delete_behind_base();

CREATE INDEX workflow_runs_by_updated ON workflow_runs (updated_at);
