-- Guarded counters: running totals that a step's commit changes only within caps
-- (offline exposure, outbox depth...). Checked and changed in the step's transaction.

CREATE TABLE counters (
    name       text PRIMARY KEY,
    amount     bigint NOT NULL DEFAULT 0,
    count      bigint NOT NULL DEFAULT 0,
    updated_at double precision NOT NULL
);
