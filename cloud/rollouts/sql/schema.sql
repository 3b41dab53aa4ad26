-- The rollouts' full current schema: what applying every migration in migrations/
-- produces (a test checks the two converge; change both together).

CREATE TABLE rollouts (
    rollout_id       text PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('config', 'policy', 'release')),
    status           text NOT NULL CHECK (status IN ('pending', 'running', 'paused',
                         'awaiting_approval', 'succeeded', 'aborting', 'rolled_back',
                         'failed')),
    options          jsonb NOT NULL,
    seed             bigint NOT NULL,
    -- what is rolled out: new content (validated at create), an existing version, or
    -- (release) an uploaded release by name
    content          jsonb,
    source_version   bigint,
    release          text,
    reason           text,
    -- the document version the run made or took (Create_Config_Version / Persist_Policy)
    version          bigint,
    run_id           text,
    current_wave     integer NOT NULL DEFAULT 0,
    created_at       double precision NOT NULL,
    created_by       text NOT NULL,
    updated_at       double precision NOT NULL,
    finished_at      double precision,
    -- the operators' controls as they stand (each request is a rollout_controls row)
    paused           boolean NOT NULL DEFAULT false,
    approved_through integer NOT NULL DEFAULT 0,
    abort_requested  boolean NOT NULL DEFAULT false,
    -- why it aborted: {criterion, wave, figures, at, by, reason}
    abort            jsonb,
    -- the fleet-level assignment Finalize made (scope, value, previous version)
    finalized        jsonb
);

CREATE INDEX rollouts_by_status ON rollouts (status, rollout_id);
CREATE INDEX rollouts_by_kind ON rollouts (kind, rollout_id);

-- A wave: its cumulative size (devices targeted through it) and its own device count.
CREATE TABLE rollout_waves (
    rollout_id  text NOT NULL REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
    wave        integer NOT NULL CHECK (wave >= 1),
    size        integer NOT NULL,
    targeted    integer NOT NULL,
    status      text NOT NULL DEFAULT 'planned'
                CHECK (status IN ('planned', 'running', 'done', 'aborted')),
    started_at  double precision,
    finished_at double precision,
    PRIMARY KEY (rollout_id, wave)
);

-- A targeted device: its wave, where it has got, and after an abort its restore.
CREATE TABLE rollout_devices (
    rollout_id          text NOT NULL REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
    device_id           text NOT NULL,
    store               text NOT NULL,
    group_name          text,
    wave                integer NOT NULL,
    status              text NOT NULL DEFAULT 'planned'
                        CHECK (status IN ('planned', 'held', 'notified', 'applied',
                            'healthy', 'failed', 'refused', 'timed_out', 'cancelled')),
    -- the version (config/policy) or release the device was following before
    previous_version    bigint,
    previous_release    text,
    -- its device-scope assignment before the rollout wrote one (restored on abort)
    previous_assignment bigint,
    command_id          text,
    notified_at         double precision,
    applied_at          double precision,
    healthy_at          double precision,
    failed_at           double precision,
    last_error          text,
    restore_status      text NOT NULL DEFAULT 'none'
                        CHECK (restore_status IN ('none', 'pending', 'notified', 'restored',
                            'failed', 'timed_out')),
    restore_version     bigint,
    restore_command_id  text,
    restore_notified_at double precision,
    restored_at         double precision,
    late                boolean NOT NULL DEFAULT false,
    PRIMARY KEY (rollout_id, device_id)
);

CREATE INDEX rollout_devices_by_wave ON rollout_devices (rollout_id, wave, status);
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id);
CREATE INDEX rollout_devices_by_command ON rollout_devices (command_id)
    WHERE command_id IS NOT NULL;

-- Every control request an operator made (pause, resume, approve, abort, retry_failed).
CREATE TABLE rollout_controls (
    control_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollout_id  text NOT NULL REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
    action      text NOT NULL CHECK (action IN ('pause', 'resume', 'approve', 'abort',
                    'retry_failed')),
    requested_by text NOT NULL,
    requested_at double precision NOT NULL,
    reason      text,
    -- the wave approved (approve), the devices re-notified (retry_failed)
    detail      jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX rollout_controls_by_rollout ON rollout_controls (rollout_id, control_id);
