-- Unknown outcomes (issue 13): an authorisation or refund a terminal sent whose answer
-- was lost, as the sync service received its 'unknown' message, and the truth the
-- resolve_outcome workflow learnt at the acquirer under the operation's key. Versioned
-- apart (outcomes_schema_migrations). Times are Unix seconds (double precision).

CREATE TABLE unknown_outcomes (
    outcome_id     text PRIMARY KEY,
    device_id      text NOT NULL,
    -- the operation's idempotency key, as the acquirer knows it
    op_key         text NOT NULL,
    operation      text NOT NULL CHECK (operation IN ('authorization', 'refund')),
    -- the terminal's run the operation belongs to
    run_id         text NOT NULL,
    amount_minor   bigint,
    currency       text,
    -- the 'unknown' message: its place in the device's outbox and when it was made
    stream         text NOT NULL,
    message_seq    bigint NOT NULL,
    reported_at    double precision NOT NULL,
    found_at       double precision NOT NULL,
    state          text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    -- the resolve_outcome run started for it (engine runs table)
    resolve_run_id text,
    -- the truth: the acquirer's status, its answer as it was, when it was asked
    status         text CHECK (status IN ('approved', 'declined', 'reversed', 'not_found')),
    acquirer_ref   text,
    lookup         jsonb,
    resolved_at    double precision,
    -- the resolve_outcome command that told the terminal (sync's commands table), or
    -- why none was sent (the device is revoked, say)
    command_id     text,
    command_note   text,
    -- every outcome in the order it was found: the list's cursor
    outcome_no     bigint GENERATED ALWAYS AS IDENTITY,
    UNIQUE (device_id, op_key),
    CHECK ((state = 'resolved') = (status IS NOT NULL AND resolved_at IS NOT NULL))
);

CREATE UNIQUE INDEX unknown_outcomes_by_no ON unknown_outcomes (outcome_no);
-- what the finder and the API's "still open" look at
CREATE INDEX unknown_outcomes_open ON unknown_outcomes (found_at) WHERE state = 'open';
