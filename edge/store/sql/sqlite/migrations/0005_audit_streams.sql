-- Audit chains per stream, hash version 2 (edge/engine/audit.py). A terminal keeps one
-- stream (0): the chain, its head and its retention base stay as they were. Each row
-- now says which stream it belongs to and which hash rule it was written with: rows
-- from before are version 1 on stream 0, and keep verifying under that rule.

ALTER TABLE workflow_audit_log ADD COLUMN stream INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workflow_audit_log ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
