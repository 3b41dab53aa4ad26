-- A step's stable operation key (the same on every attempt and after a crash): what a
-- compensation reads to find the effect it undoes. Rows written before it read as NULL.
-- Same rule as SQLite's 0004.

ALTER TABLE workflow_steps ADD COLUMN operation_key text;
