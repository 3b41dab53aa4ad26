-- The control workflows' full current schema: what applying every migration in
-- migrations/ produces (a test checks the two converge; change both together).

-- The latest re-verification of each device chain (one row per chain, replaced by each
-- run): ok, or broken with the first bad seq and why.
CREATE TABLE audit_verifications (
    device_id     text NOT NULL,
    stream        text NOT NULL,
    chain         bigint NOT NULL,
    ok            boolean NOT NULL,
    rows_checked  bigint NOT NULL,
    head_seq      bigint NOT NULL,
    first_bad_seq bigint,
    reason        text,
    -- the digest the chain was compared with (null: none yet)
    digest_seq    bigint,
    run_id        text NOT NULL,
    verified_at   double precision NOT NULL,
    PRIMARY KEY (device_id, stream, chain)
);

CREATE INDEX audit_verifications_broken ON audit_verifications (device_id) WHERE NOT ok;

-- Signed digests of every chain's head, one per AuditAggregation run, each naming the
-- hash of the one before (cloud.control.digest has the bytes hashed and signed).
CREATE TABLE audit_digests (
    seq        bigint PRIMARY KEY CHECK (seq >= 1),
    run_id     text NOT NULL UNIQUE,
    made_at    double precision NOT NULL,
    heads      bigint NOT NULL,
    heads_hash text NOT NULL,
    prev_hash  text NOT NULL,
    hash       text NOT NULL,
    key_id     text NOT NULL,
    signature  text NOT NULL
);

-- The heads a digest covers (their canonical list is what heads_hash is over).
CREATE TABLE audit_digest_heads (
    digest_seq bigint NOT NULL REFERENCES audit_digests (seq),
    device_id  text NOT NULL,
    stream     text NOT NULL,
    chain      bigint NOT NULL,
    head_seq   bigint NOT NULL,
    head_hash  text NOT NULL,
    PRIMARY KEY (digest_seq, device_id, stream, chain)
);

-- Devices raised for not syncing within offline_after_s: one row per device, open
-- until it is seen again (cleared_at), raised anew when it goes silent again.
CREATE TABLE device_alerts (
    device_id    text PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('silent')),
    raised_at    double precision NOT NULL,
    -- when the device was last seen as the alert was raised (enrolled_at if never)
    last_seen_at double precision NOT NULL,
    cleared_at   double precision,
    run_id       text NOT NULL
);

CREATE INDEX device_alerts_open ON device_alerts (device_id) WHERE cleared_at IS NULL;
