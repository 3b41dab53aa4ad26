-- Guarded counters: running totals that a step's commit changes only within caps
-- (offline exposure, outbox depth...). Checked and changed in the step's transaction.

CREATE TABLE counters (
    name       TEXT PRIMARY KEY,
    amount     INTEGER NOT NULL DEFAULT 0,
    count      INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
) STRICT;
