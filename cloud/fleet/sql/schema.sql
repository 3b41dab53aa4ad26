-- The Fleet API's full current schema: what applying every migration in migrations/
-- produces (a test checks the two converge; change both together). Needs the sync
-- service's tables (devices, enroll_tokens, quarantine) first.

-- API tokens: only the SHA-256 of the clear token is kept (shown once, when made).
-- token_id is a prefix of that hash: safe to show and to log.
CREATE TABLE api_tokens (
    token_id     text PRIMARY KEY,
    token_hash   text NOT NULL UNIQUE,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'operator', 'auditor', 'read_only')),
    created_at   double precision NOT NULL,
    created_by   text NOT NULL,
    revoked_at   double precision,
    revoked_by   text,
    last_used_at double precision
);

-- The cloud's own audit log: one chain (stream 0), hashed with the terminal's link
-- function (edge.engine.audit.link, cloud.fleet.audit says which fields go where).
CREATE TABLE cloud_audit (
    seq         bigint PRIMARY KEY CHECK (seq >= 1),
    at          double precision NOT NULL,
    actor       text NOT NULL,
    actor_token text,
    actor_role  text,
    action      text NOT NULL,
    target      text,
    detail      jsonb NOT NULL,
    prev_hash   text NOT NULL,
    hash        text NOT NULL,
    version     integer NOT NULL
);

-- The cloud audit log's head: the last row's (seq, hash). Its row lock serialises
-- appends (one chain), and a removed tail is found because the head still names it.
CREATE TABLE cloud_audit_head (
    one  boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq  bigint NOT NULL,
    hash text NOT NULL
);

INSERT INTO cloud_audit_head (one, seq, hash) VALUES (true, 0, repeat('0', 64));

CREATE TABLE device_tags (
    device_id text NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    tag       text NOT NULL,
    added_at  double precision NOT NULL,
    PRIMARY KEY (device_id, tag)
);

CREATE INDEX device_tags_by_tag ON device_tags (tag, device_id);

-- An enrollment token revoked by an operator (its expiry is also pulled to the moment
-- of revocation, so the sync service's consume_token refuses it).
CREATE TABLE enroll_token_revocations (
    token_hash text PRIMARY KEY REFERENCES enroll_tokens (token_hash) ON DELETE CASCADE,
    revoked_at double precision NOT NULL,
    revoked_by text NOT NULL
);

-- What operators did with quarantined items: who, why, and how a replay came out.
CREATE TABLE quarantine_decisions (
    decision_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    quarantine_id bigint NOT NULL REFERENCES quarantine (quarantine_id) ON DELETE CASCADE,
    decision      text NOT NULL CHECK (decision IN ('replayed', 'still_quarantined', 'discarded')),
    actor         text NOT NULL,
    reason        text,
    at            double precision NOT NULL
);

CREATE INDEX quarantine_decisions_by_item ON quarantine_decisions (quarantine_id, decision_id);
