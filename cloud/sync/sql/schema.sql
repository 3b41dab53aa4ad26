-- The sync service's full current schema: what applying every migration in
-- migrations/ produces (a test checks the two converge; change both together).

CREATE TABLE devices (
    device_id           text PRIMARY KEY,
    store               text NOT NULL,
    group_name          text,
    public_key          text NOT NULL,
    status              text NOT NULL CHECK (status IN ('active', 'revoked')),
    enrolled_at         double precision NOT NULL,
    binary_version      text,
    hardware            jsonb NOT NULL DEFAULT '{}',
    previous_public_key text,
    rotated_at          double precision,
    revoked_at          double precision,
    -- the last command seq allocated to the device (the next is this + 1)
    command_seq         bigint NOT NULL DEFAULT 0,
    -- outbox entries whose key was held with other content (quarantined)
    conflicts           bigint NOT NULL DEFAULT 0
);

CREATE INDEX devices_by_store ON devices (store, device_id);

-- Only the token's SHA-256 is kept; the clear token is shown once, when it is made.
CREATE TABLE enroll_tokens (
    token_hash text PRIMARY KEY,
    store      text NOT NULL,
    group_name text,
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    used_at    double precision,
    device_id  text
);

-- Request nonces per device, kept twice the skew window (then pruned).
CREATE TABLE device_nonces (
    device_id text NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    nonce     text NOT NULL,
    seen_at   double precision NOT NULL,
    PRIMARY KEY (device_id, nonce)
);

CREATE INDEX device_nonces_by_age ON device_nonces (device_id, seen_at);

-- Per device database (stream): the highest outbox seq acknowledged (never lowered).
CREATE TABLE sync_streams (
    device_id    text NOT NULL,
    stream       text NOT NULL,
    outbox_acked bigint NOT NULL,
    updated_at   double precision NOT NULL,
    PRIMARY KEY (device_id, stream)
);

-- Outbox messages, applied once per (device, stream, seq). No foreign key: the bulk
-- insert of a batch checks nothing per row but its key.
CREATE TABLE sync_messages (
    device_id    text NOT NULL,
    stream       text NOT NULL,
    seq          bigint NOT NULL,
    message_id   text NOT NULL,
    run_id       text,
    step         text,
    topic        text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   double precision NOT NULL,
    content_hash text NOT NULL,
    received_at  double precision NOT NULL,
    PRIMARY KEY (device_id, stream, seq)
);
-- a device's payments by when they arrived: a rollout's health check reads them (0004)
CREATE INDEX sync_messages_payments ON sync_messages (device_id, received_at)
    WHERE topic = 'payment';
-- a device's release results by the command they answer: a release rollout's bytes (0005)
CREATE INDEX sync_messages_release_results ON sync_messages (device_id, (payload->>'command_id'))
    WHERE topic = 'release_result';

-- The devices' audit rows, every field the hash covers, verified before they land.
CREATE TABLE device_audit (
    device_id text NOT NULL,
    stream    text NOT NULL,
    chain     bigint NOT NULL,
    seq       bigint NOT NULL,
    run_id    text,
    event     text NOT NULL,
    step      text,
    detail    jsonb NOT NULL,
    at        double precision NOT NULL,
    prev_hash text NOT NULL,
    hash      text NOT NULL,
    version   integer NOT NULL,
    PRIMARY KEY (device_id, stream, chain, seq)
);

-- One row per device audit chain: where it starts (base), the last row verified
-- (head), and whether it broke (first bad seq, why, when).
CREATE TABLE audit_chains (
    device_id     text NOT NULL,
    stream        text NOT NULL,
    chain         bigint NOT NULL,
    base_seq      bigint NOT NULL,
    base_hash     text NOT NULL,
    head_seq      bigint NOT NULL,
    head_hash     text NOT NULL,
    state         text NOT NULL CHECK (state IN ('ok', 'broken')),
    first_bad_seq bigint,
    reason        text,
    broken_at     double precision,
    updated_at    double precision NOT NULL,
    PRIMARY KEY (device_id, stream, chain)
);

-- Rejected and conflicting outbox entries, and audit rows a chain could not take:
-- acknowledged (outbox) yet kept for an operator to replay or discard. ``entry`` is
-- JSON text (ASCII-escaped) so that anything a device sent can be kept as sent.
CREATE TABLE quarantine (
    quarantine_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id     text NOT NULL,
    stream        text NOT NULL,
    seq           bigint NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('outbox', 'audit')),
    reason        text NOT NULL,
    detail        text NOT NULL,
    entry         text NOT NULL,
    fingerprint   text NOT NULL,
    received_at   double precision NOT NULL,
    status        text NOT NULL DEFAULT 'open'
                  CHECK (status IN ('open', 'replayed', 'discarded')),
    UNIQUE (device_id, stream, kind, seq, fingerprint)
);

CREATE INDEX quarantine_open ON quarantine (device_id, received_at) WHERE status = 'open';

-- Commands, sealed when made: ``envelope`` is the wire.Envelope JSON sent as is.
CREATE TABLE commands (
    command_id   text PRIMARY KEY,
    device_id    text NOT NULL REFERENCES devices (device_id),
    seq          bigint NOT NULL,
    action       text NOT NULL,
    envelope     text NOT NULL,
    document     jsonb,
    status       text NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'delivered', 'applied', 'refused', 'expired',
                                   'cancelled')),
    reason       text,
    created_at   double precision NOT NULL,
    expires_at   double precision NOT NULL,
    delivered_at double precision,
    result_at    double precision,
    -- one id for the commands of one send to a group or a store (0002)
    batch_id     text,
    -- every command in the order it was made: the lists' cursor (0002)
    command_no   bigint GENERATED ALWAYS AS IDENTITY,
    UNIQUE (device_id, seq)
);

CREATE INDEX commands_pending ON commands (device_id, seq)
    WHERE status IN ('queued', 'delivered');
CREATE UNIQUE INDEX commands_by_no ON commands (command_no);
CREATE INDEX commands_by_batch ON commands (batch_id, command_no) WHERE batch_id IS NOT NULL;
CREATE INDEX commands_by_device ON commands (device_id, command_no);
-- what the expiry sweep looks at: commands still waiting, by when they expire
CREATE INDEX commands_pending_expiry ON commands (expires_at)
    WHERE status IN ('queued', 'delivered');

-- Config, policy and release documents the control plane sends; a version only grows
-- per kind, fleet-wide; a withdrawn one keeps its number (0003). (Not ``documents``: that is the engine store's table of the documents in
-- force on a database, which a terminal's own store has.)
CREATE TABLE sync_documents (
    kind         text NOT NULL CHECK (kind IN ('config', 'policy', 'release')),
    version      bigint NOT NULL,
    content      jsonb NOT NULL,
    created_at   double precision NOT NULL,
    withdrawn_at double precision,
    PRIMARY KEY (kind, version)
);

-- Which document version is assigned where: at most one per (kind, scope, value). The
-- effective document of a device is its most specific match (device > store > group >
-- fleet; cloud.documents.scope). ``value`` is the group, store or device id, and ''
-- for the fleet.
CREATE TABLE document_assignments (
    assignment_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          text NOT NULL,
    scope         text NOT NULL CHECK (scope IN ('fleet', 'group', 'store', 'device')),
    value         text NOT NULL,
    version       bigint NOT NULL,
    assigned_at   double precision NOT NULL,
    assigned_by   text NOT NULL,
    CHECK ((scope = 'fleet') = (value = '')),
    UNIQUE (kind, scope, value),
    FOREIGN KEY (kind, version) REFERENCES sync_documents (kind, version)
);

-- The latest heartbeat per device, and when it was last seen.
CREATE TABLE device_health (
    device_id    text PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    stream       text NOT NULL,
    heartbeat    jsonb NOT NULL,
    last_seen_at double precision NOT NULL
);
