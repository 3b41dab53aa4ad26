-- Audit chains per stream, hash version 2 (edge/engine/audit.py): a run's rows go to
-- its stream, each stream is its own chain with its own head row, so workers appending
-- to different streams never wait on one row. Rows from before are version 1 on stream
-- 0 (the one chain there was) and keep verifying under that rule; the old head and
-- retention rows become stream 0's.

ALTER TABLE workflow_audit_log ADD COLUMN stream integer NOT NULL DEFAULT 0;
ALTER TABLE workflow_audit_log ADD COLUMN version integer NOT NULL DEFAULT 1;
ALTER TABLE workflow_audit_log DROP CONSTRAINT workflow_audit_log_pkey;
ALTER TABLE workflow_audit_log ADD PRIMARY KEY (stream, seq);
DROP INDEX workflow_audit_log_by_run;
CREATE INDEX workflow_audit_log_by_run ON workflow_audit_log (run_id, stream, seq);

ALTER TABLE audit_head DROP CONSTRAINT audit_head_id_check;
ALTER TABLE audit_head RENAME COLUMN id TO stream;
UPDATE audit_head SET stream = 0;

ALTER TABLE audit_retention DROP CONSTRAINT audit_retention_id_check;
ALTER TABLE audit_retention RENAME COLUMN id TO stream;
UPDATE audit_retention SET stream = 0;

-- Still append-only for everything its stream's retention base has not passed.
CREATE OR REPLACE FUNCTION workflow_audit_log_delete_behind_base() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.seq > coalesce(
        (SELECT base_seq FROM audit_retention WHERE stream = OLD.stream), 0) THEN
        RAISE EXCEPTION 'workflow_audit_log is append-only';
    END IF;
    RETURN OLD;
END
$$;
