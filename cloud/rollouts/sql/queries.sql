-- The rollouts' queries (cloud.rollouts), each one statement, every value a bound
-- parameter; a filter left out is a NULL parameter that matches everything. They read
-- the sync service's tables (devices, device_health, commands, sync_messages,
-- sync_documents, document_assignments) and the fleet's (device_tags).

-- name: targets
-- The active devices a selector names (AND across fields, OR within one), by id;
-- ``only`` narrows it to some devices.
SELECT d.device_id, d.store, d.group_name
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
WHERE d.status = 'active'
  AND (%(stores)s::text[] IS NULL OR d.store = ANY(%(stores)s::text[]))
  AND (%(groups)s::text[] IS NULL OR d.group_name = ANY(%(groups)s::text[]))
  AND (%(tags)s::text[] IS NULL OR EXISTS (
        SELECT 1 FROM device_tags t
        WHERE t.device_id = d.device_id AND t.tag = ANY(%(tags)s::text[])))
  AND (%(binary_versions)s::text[] IS NULL
       OR coalesce(h.heartbeat ->> 'binary_version', d.binary_version)
          = ANY(%(binary_versions)s::text[]))
  AND (%(device_ids)s::text[] IS NULL OR d.device_id = ANY(%(device_ids)s::text[]))
  AND (%(only)s::text[] IS NULL OR d.device_id = ANY(%(only)s::text[]))
ORDER BY d.device_id;

-- name: insert_rollout
-- A new rollout, pending.
INSERT INTO rollouts (rollout_id, kind, status, options, seed, content, source_version,
                      release, reason, created_at, created_by, updated_at)
VALUES (%(rollout_id)s, %(kind)s, 'pending', %(options)s, %(seed)s, %(content)s,
        %(source_version)s, %(release)s, %(reason)s, %(at)s, %(by)s, %(at)s);

-- name: insert_waves
-- A rollout's waves: cumulative sizes and each wave's own device count.
INSERT INTO rollout_waves (rollout_id, wave, size, targeted)
SELECT %(rollout_id)s, w.wave, w.size, w.targeted
FROM unnest(%(waves)s::integer[], %(sizes)s::integer[], %(targeted)s::integer[])
     AS w(wave, size, targeted);

-- name: insert_devices
-- A rollout's devices, each in its wave, planned.
INSERT INTO rollout_devices (rollout_id, device_id, store, group_name, wave)
SELECT %(rollout_id)s, d.device_id, d.store, d.group_name, d.wave
FROM unnest(%(device_ids)s::text[], %(stores)s::text[], %(groups)s::text[],
            %(waves)s::integer[]) AS d(device_id, store, group_name, wave)
ON CONFLICT (rollout_id, device_id) DO NOTHING;

-- name: rollout
-- One rollout.
SELECT rollout_id, kind, status, options, seed, content, source_version, release, reason,
       version, run_id, current_wave, created_at, created_by, updated_at, finished_at,
       paused, approved_through, abort_requested, abort, finalized
FROM rollouts WHERE rollout_id = %(rollout_id)s;

-- name: rollout_for_update
-- One rollout, locked until the transaction ends (one writer at a time).
SELECT rollout_id, kind, status, options, seed, content, source_version, release, reason,
       version, run_id, current_wave, created_at, created_by, updated_at, finished_at,
       paused, approved_through, abort_requested, abort, finalized
FROM rollouts WHERE rollout_id = %(rollout_id)s
FOR UPDATE;

-- name: rollouts
-- Rollouts newest first (by id after a cursor), each filter NULL or matched.
SELECT rollout_id, kind, status, options, seed, content, source_version, release, reason,
       version, run_id, current_wave, created_at, created_by, updated_at, finished_at,
       paused, approved_through, abort_requested, abort, finalized
FROM rollouts
WHERE (%(kind)s::text IS NULL OR kind = %(kind)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(after)s::text IS NULL OR (created_at, rollout_id) < (
        SELECT created_at, rollout_id FROM rollouts WHERE rollout_id = %(after)s::text))
ORDER BY created_at DESC, rollout_id DESC
LIMIT %(limit)s;

-- name: run_of
-- The run started for a rollout (idempotency key rollout:<id>), and its status.
SELECT run_id, status FROM workflow_runs WHERE idempotency_key = %(key)s;

-- name: waves
-- A rollout's waves.
SELECT wave, size, targeted, status, started_at, finished_at
FROM rollout_waves WHERE rollout_id = %(rollout_id)s ORDER BY wave;

-- name: status_counts
-- A rollout's devices counted by wave and status.
SELECT wave, status, count(*) FROM rollout_devices
WHERE rollout_id = %(rollout_id)s GROUP BY wave, status;

-- name: restore_counts
-- A rollout's devices counted by restore status.
SELECT restore_status, count(*) FROM rollout_devices
WHERE rollout_id = %(rollout_id)s GROUP BY restore_status;

-- name: devices
-- A page of a rollout's devices by id after a cursor, each filter NULL or matched.
SELECT device_id, store, group_name, wave, status, previous_version, command_id,
       notified_at, applied_at, healthy_at, failed_at, last_error, restore_status,
       restore_command_id, restored_at, previous_release, restore_version, late
FROM rollout_devices
WHERE rollout_id = %(rollout_id)s
  AND (%(wave)s::integer IS NULL OR wave = %(wave)s::integer)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(after)s::text IS NULL OR device_id > %(after)s::text)
ORDER BY device_id
LIMIT %(limit)s;

-- name: add_control
-- An operator's control request, recorded.
INSERT INTO rollout_controls (rollout_id, action, requested_by, requested_at, reason, detail)
VALUES (%(rollout_id)s, %(action)s, %(by)s, %(at)s, %(reason)s, %(detail)s);

-- name: set_controls
-- The controls as they stand after a request, and the status it leads to.
UPDATE rollouts SET paused = %(paused)s, approved_through = %(approved_through)s,
                    abort_requested = %(abort_requested)s, status = %(status)s,
                    updated_at = %(at)s
WHERE rollout_id = %(rollout_id)s;

-- name: retry_failed
-- The failed and timed-out devices of a rollout planned again (re-notified by its run).
UPDATE rollout_devices SET status = 'planned', command_id = NULL, notified_at = NULL,
                           applied_at = NULL, healthy_at = NULL, failed_at = NULL
WHERE rollout_id = %(rollout_id)s AND status IN ('failed', 'refused', 'timed_out')
RETURNING device_id;

-- name: set_status
-- A rollout's status (and, when it ends, when).
UPDATE rollouts SET status = %(status)s, updated_at = %(at)s,
                    finished_at = coalesce(finished_at, %(finished_at)s)
WHERE rollout_id = %(rollout_id)s;

-- name: set_started
-- The run took the rollout: its id, running.
UPDATE rollouts SET run_id = %(run_id)s, updated_at = %(at)s,
                    status = CASE WHEN status = 'pending' THEN 'running' ELSE status END
WHERE rollout_id = %(rollout_id)s;

-- name: set_version
-- The document version the rollout pushes.
UPDATE rollouts SET version = %(version)s, updated_at = %(at)s
WHERE rollout_id = %(rollout_id)s;

-- name: set_wave
-- The wave the rollout is at, started.
UPDATE rollouts SET current_wave = %(wave)s, updated_at = %(at)s
WHERE rollout_id = %(rollout_id)s;

-- name: start_wave
-- A wave started (the first time only).
UPDATE rollout_waves SET status = CASE WHEN status = 'planned' THEN 'running' ELSE status END,
                         started_at = coalesce(started_at, %(at)s)
WHERE rollout_id = %(rollout_id)s AND wave = %(wave)s;

-- name: end_wave
-- A wave done (or aborted).
UPDATE rollout_waves SET status = %(status)s, finished_at = coalesce(finished_at, %(at)s)
WHERE rollout_id = %(rollout_id)s AND wave = %(wave)s;

-- name: set_abort
-- Why the rollout aborts, once (the first reason stands), and its status.
UPDATE rollouts SET abort = coalesce(abort, %(abort)s), status = 'aborting', updated_at = %(at)s
WHERE rollout_id = %(rollout_id)s;

-- name: set_finalized
-- The fleet-level assignment Finalize made, and success.
UPDATE rollouts SET finalized = %(finalized)s, status = 'succeeded', updated_at = %(at)s,
                    finished_at = coalesce(finished_at, %(at)s)
WHERE rollout_id = %(rollout_id)s;

-- name: cancel_unstarted
-- After a rollback: the devices never commanded (waves that never started) cancelled.
UPDATE rollout_devices SET status = 'cancelled'
WHERE rollout_id = %(rollout_id)s AND status IN ('planned', 'held') AND command_id IS NULL;

-- name: abort_unstarted
-- After a rollback: the waves that never started, aborted.
UPDATE rollout_waves SET status = 'aborted', finished_at = coalesce(finished_at, %(at)s)
WHERE rollout_id = %(rollout_id)s AND status IN ('planned', 'running');

-- name: to_notify
-- Devices of the waves through ``wave`` not yet commanded, locked (one writer), by id.
SELECT device_id, store FROM rollout_devices
WHERE rollout_id = %(rollout_id)s AND wave <= %(wave)s AND status IN ('planned', 'held')
  AND command_id IS NULL
ORDER BY wave, device_id
FOR UPDATE;

-- name: notified_since
-- Devices this rollout notified since a time (the rate's last minute).
SELECT count(*) FROM rollout_devices
WHERE rollout_id = %(rollout_id)s AND notified_at >= %(since)s;

-- name: hold
-- Devices a window or the rate keeps back for now.
UPDATE rollout_devices SET status = 'held'
WHERE rollout_id = %(rollout_id)s AND device_id = ANY(%(device_ids)s::text[])
  AND status = 'planned';

-- name: effective_versions
-- For each device: the version of a kind it follows now (device > store > group >
-- fleet) and what its own device-scope assignment is (NULL: none).
SELECT d.device_id,
       (SELECT a.version FROM document_assignments a
        WHERE a.kind = %(kind)s
          AND (a.scope = 'fleet'
               OR (a.scope = 'group' AND a.value = d.group_name)
               OR (a.scope = 'store' AND a.value = d.store)
               OR (a.scope = 'device' AND a.value = d.device_id))
        ORDER BY CASE a.scope WHEN 'device' THEN 0 WHEN 'store' THEN 1
                              WHEN 'group' THEN 2 ELSE 3 END
        LIMIT 1) AS effective,
       (SELECT a.version FROM document_assignments a
        WHERE a.kind = %(kind)s AND a.scope = 'device' AND a.value = d.device_id) AS own,
       h.heartbeat ->> 'binary_version'
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
WHERE d.device_id = ANY(%(device_ids)s::text[]);

-- name: assign_devices
-- Device-scope assignments of one version to many devices (replacing theirs).
INSERT INTO document_assignments (kind, scope, value, version, assigned_at, assigned_by)
SELECT %(kind)s, 'device', d, %(version)s, %(at)s, %(by)s
FROM unnest(%(device_ids)s::text[]) AS d
ON CONFLICT (kind, scope, value) DO UPDATE
SET version = excluded.version, assigned_at = excluded.assigned_at,
    assigned_by = excluded.assigned_by;

-- name: unassign_devices
-- Device-scope assignments removed.
DELETE FROM document_assignments
WHERE kind = %(kind)s AND scope = 'device' AND value = ANY(%(device_ids)s::text[]);

-- name: mark_notified
-- Devices commanded: their command, when, and what they followed before.
UPDATE rollout_devices rd
SET status = 'notified', command_id = n.command_id, notified_at = %(at)s,
    previous_version = n.previous_version, previous_assignment = n.previous_assignment,
    previous_release = n.previous_release
FROM unnest(%(device_ids)s::text[], %(command_ids)s::text[], %(previous)s::bigint[],
            %(assignments)s::bigint[], %(releases)s::text[])
     AS n(device_id, command_id, previous_version, previous_assignment, previous_release)
WHERE rd.rollout_id = %(rollout_id)s AND rd.device_id = n.device_id;

-- name: progress_refused
-- Notified devices whose command the device refused.
UPDATE rollout_devices rd SET status = 'refused', failed_at = coalesce(c.result_at, %(now)s),
                              last_error = c.reason
FROM commands c
WHERE rd.rollout_id = %(rollout_id)s AND rd.status = 'notified'
  AND c.command_id = rd.command_id AND c.status = 'refused';

-- name: progress_release_failed
-- Devices that reported their release install failed (outbox topic release_result).
UPDATE rollout_devices rd SET status = 'failed', failed_at = %(now)s,
                              last_error = left(coalesce(m.payload ->> 'reason', 'install failed'), 1024)
FROM sync_messages m
WHERE rd.rollout_id = %(rollout_id)s AND rd.status IN ('notified', 'applied')
  AND m.device_id = rd.device_id AND m.topic = 'release_result'
  AND m.payload ->> 'command_id' = rd.command_id AND m.payload ->> 'status' = 'failed';

-- name: progress_applied
-- Notified devices whose command was applied (for a release: and whose heartbeat
-- reports running it).
UPDATE rollout_devices rd SET status = 'applied', applied_at = coalesce(c.result_at, %(now)s)
FROM commands c
WHERE rd.rollout_id = %(rollout_id)s AND rd.status = 'notified'
  AND c.command_id = rd.command_id AND c.status = 'applied'
  AND (%(release)s::text IS NULL OR EXISTS (
        SELECT 1 FROM device_health h
        WHERE h.device_id = rd.device_id
          AND h.heartbeat ->> 'binary_version' = %(release)s::text));

-- name: progress_unhealthy
-- Soaking devices whose heartbeat since they applied says they are not well: storage
-- not ok, an error, or no longer on the change.
UPDATE rollout_devices rd
SET status = 'failed', failed_at = %(now)s,
    last_error = left(coalesce(h.heartbeat ->> 'last_error',
                               CASE WHEN h.heartbeat ->> 'storage_state' <> 'ok'
                                    THEN 'storage ' || (h.heartbeat ->> 'storage_state')
                                    ELSE 'no longer on the version rolled out' END), 1024)
FROM device_health h
WHERE rd.rollout_id = %(rollout_id)s AND rd.status = 'applied'
  AND h.device_id = rd.device_id AND h.last_seen_at >= rd.applied_at
  AND (h.heartbeat ->> 'storage_state' <> 'ok'
       OR h.heartbeat ->> 'last_error' IS NOT NULL
       OR (%(release)s::text IS NULL
           AND coalesce((h.heartbeat ->> %(field)s)::bigint, 0) < %(version)s)
       OR (%(release)s::text IS NOT NULL
           AND h.heartbeat ->> 'binary_version' IS DISTINCT FROM %(release)s::text));

-- name: progress_payments_failing
-- Soaking devices whose sales stopped being approved: at least 3 payments received since
-- they applied, none approved (a terminal that cannot take a payment is not healthy,
-- whatever its heartbeat says). Read through sync_messages_payments (sync 0004).
UPDATE rollout_devices rd
SET status = 'failed', failed_at = %(now)s,
    last_error = 'payments failing: ' || f.n || ' since the change, none approved'
FROM (SELECT r.device_id, count(*) AS n,
             count(*) FILTER (WHERE m.payload ->> 'decision' = 'approved') AS approved
      FROM rollout_devices r
      JOIN sync_messages m ON m.device_id = r.device_id AND m.topic = 'payment'
                          AND m.received_at >= r.applied_at
      WHERE r.rollout_id = %(rollout_id)s AND r.status = 'applied'
      GROUP BY r.device_id) f
WHERE rd.rollout_id = %(rollout_id)s AND rd.status = 'applied'
  AND f.device_id = rd.device_id AND f.n >= 3 AND f.approved = 0;

-- name: progress_healthy
-- Soaking devices with a healthy heartbeat soak_s or more after they applied.
UPDATE rollout_devices rd SET status = 'healthy', healthy_at = %(now)s
FROM device_health h
WHERE rd.rollout_id = %(rollout_id)s AND rd.status = 'applied'
  AND h.device_id = rd.device_id AND h.last_seen_at >= rd.applied_at + %(soak_s)s
  AND h.heartbeat ->> 'storage_state' = 'ok' AND h.heartbeat ->> 'last_error' IS NULL
  AND ((%(release)s::text IS NULL
        AND coalesce((h.heartbeat ->> %(field)s)::bigint, 0) >= %(version)s)
       OR (%(release)s::text IS NOT NULL
           AND h.heartbeat ->> 'binary_version' = %(release)s::text));

-- name: progress_timed_out
-- Devices silent too long: not applied within device_timeout_s of being notified, or
-- no healthy heartbeat within soak_s + device_timeout_s of applying.
UPDATE rollout_devices
SET status = 'timed_out', failed_at = %(now)s,
    last_error = CASE WHEN status = 'notified' THEN 'not applied within device_timeout_s'
                      ELSE 'no healthy heartbeat within soak_s + device_timeout_s' END
WHERE rollout_id = %(rollout_id)s
  AND ((status = 'notified' AND notified_at + %(timeout_s)s <= %(now)s)
       OR (status = 'applied' AND applied_at + %(soak_s)s + %(timeout_s)s <= %(now)s));

-- name: wave_unsettled
-- Devices of the waves through ``wave`` without an outcome yet.
SELECT count(*) FROM rollout_devices
WHERE rollout_id = %(rollout_id)s AND wave <= %(wave)s
  AND status IN ('planned', 'held', 'notified', 'applied');

-- name: wave_devices_queued
-- The commands of a wave's devices not yet sent (to cancel).
SELECT rd.command_id FROM rollout_devices rd JOIN commands c ON c.command_id = rd.command_id
WHERE rd.rollout_id = %(rollout_id)s AND rd.wave = %(wave)s AND c.status = 'queued';

-- name: cancel_devices
-- A wave's devices whose command was taken back, or that were never commanded.
UPDATE rollout_devices rd SET status = 'cancelled'
WHERE rd.rollout_id = %(rollout_id)s AND rd.wave = %(wave)s
  AND (rd.status IN ('planned', 'held')
       OR (rd.status = 'notified' AND EXISTS (
             SELECT 1 FROM commands c
             WHERE c.command_id = rd.command_id AND c.status = 'cancelled')));

-- name: mark_restore
-- A wave's devices that may hold the change (their command was delivered and not
-- refused): restore pending. Returns each with the version it followed before.
UPDATE rollout_devices rd SET restore_status = 'pending'
FROM commands c
WHERE rd.rollout_id = %(rollout_id)s AND rd.wave = %(wave)s AND rd.restore_status = 'none'
  AND c.command_id = rd.command_id AND c.delivered_at IS NOT NULL
  AND c.status <> 'refused'
RETURNING rd.device_id;

-- name: put_back
-- A wave's devices that never took the change (never commanded, cancelled, refused):
-- with their previous device assignment, to put back.
SELECT device_id, previous_assignment FROM rollout_devices
WHERE rollout_id = %(rollout_id)s AND wave = %(wave)s AND restore_status = 'none'
  AND command_id IS NOT NULL;

-- name: restore_pending
-- A wave's devices with a restore to make or follow.
SELECT device_id, previous_version, previous_release, restore_version, restore_command_id
FROM rollout_devices
WHERE rollout_id = %(rollout_id)s AND wave = %(wave)s AND restore_status = 'pending'
ORDER BY device_id
FOR UPDATE;

-- name: restore_version_of
-- The restore version this rollout already made for a previous version (reused).
SELECT restore_version FROM rollout_devices
WHERE rollout_id = %(rollout_id)s AND restore_version IS NOT NULL
  AND previous_version IS NOT DISTINCT FROM %(previous)s::bigint
  AND previous_release IS NOT DISTINCT FROM %(previous_release)s::text
LIMIT 1;

-- name: set_restore_version
-- The version a device is restored with.
UPDATE rollout_devices SET restore_version = %(version)s
WHERE rollout_id = %(rollout_id)s AND device_id = ANY(%(device_ids)s::text[]);

-- name: restore_failed
-- Devices that cannot be restored (why in last_error).
UPDATE rollout_devices SET restore_status = 'failed', last_error = %(why)s
WHERE rollout_id = %(rollout_id)s AND device_id = ANY(%(device_ids)s::text[]);

-- name: mark_restore_notified
-- Devices sent their restore command.
UPDATE rollout_devices rd SET restore_status = 'notified', restore_command_id = n.command_id,
                              restore_notified_at = %(at)s
FROM unnest(%(device_ids)s::text[], %(command_ids)s::text[]) AS n(device_id, command_id)
WHERE rd.rollout_id = %(rollout_id)s AND rd.device_id = n.device_id;

-- name: restore_progress
-- Restores followed: applied and (heartbeat) running the restore version or the
-- previous release: restored; refused: failed; silent past the timeout: timed out.
UPDATE rollout_devices rd
SET restore_status = CASE
        WHEN c.status = 'refused' THEN 'failed'
        WHEN c.status = 'applied' AND (
             (%(release)s::boolean AND h.heartbeat ->> 'binary_version' = rd.previous_release)
             OR (NOT %(release)s::boolean
                 AND coalesce((h.heartbeat ->> %(field)s)::bigint, 0) >= rd.restore_version))
             THEN 'restored'
        ELSE 'timed_out' END,
    restored_at = CASE WHEN c.status = 'applied' THEN %(now)s ELSE restored_at END,
    last_error = CASE WHEN c.status = 'refused' THEN c.reason ELSE rd.last_error END
FROM commands c LEFT JOIN device_health h ON h.device_id = c.device_id
WHERE rd.rollout_id = %(rollout_id)s AND rd.wave = %(wave)s
  AND rd.restore_status = 'notified' AND c.command_id = rd.restore_command_id
  AND (c.status = 'refused'
       OR (c.status = 'applied' AND (
             (%(release)s::boolean AND h.heartbeat ->> 'binary_version' = rd.previous_release)
             OR (NOT %(release)s::boolean
                 AND coalesce((h.heartbeat ->> %(field)s)::bigint, 0) >= rd.restore_version)))
       OR rd.restore_notified_at + %(timeout_s)s <= %(now)s);

-- name: restore_release_failed
-- Release restores the device reported failed (outbox topic release_result).
UPDATE rollout_devices rd SET restore_status = 'failed',
                              last_error = left(coalesce(m.payload ->> 'reason', 'install failed'), 1024)
FROM sync_messages m
WHERE rd.rollout_id = %(rollout_id)s AND rd.wave = %(wave)s AND rd.restore_status = 'notified'
  AND m.device_id = rd.device_id AND m.topic = 'release_result'
  AND m.payload ->> 'command_id' = rd.restore_command_id AND m.payload ->> 'status' = 'failed';

-- name: active_rollouts
-- Rollouts a device may still join (their run is on its waves).
SELECT rollout_id, options, current_wave FROM rollouts
WHERE status IN ('running', 'paused', 'awaiting_approval') AND current_wave >= 1
ORDER BY rollout_id;

-- name: late_targets
-- The active devices a running rollout's selector names that are not its devices yet
-- (enrolled, moved or tagged since it was planned).
SELECT d.device_id, d.store, d.group_name
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
WHERE d.status = 'active'
  AND (%(stores)s::text[] IS NULL OR d.store = ANY(%(stores)s::text[]))
  AND (%(groups)s::text[] IS NULL OR d.group_name = ANY(%(groups)s::text[]))
  AND (%(tags)s::text[] IS NULL OR EXISTS (
        SELECT 1 FROM device_tags t
        WHERE t.device_id = d.device_id AND t.tag = ANY(%(tags)s::text[])))
  AND (%(binary_versions)s::text[] IS NULL
       OR coalesce(h.heartbeat ->> 'binary_version', d.binary_version)
          = ANY(%(binary_versions)s::text[]))
  AND (%(device_ids)s::text[] IS NULL OR d.device_id = ANY(%(device_ids)s::text[]))
  AND NOT EXISTS (SELECT 1 FROM rollout_devices rd
                  WHERE rd.rollout_id = %(rollout_id)s AND rd.device_id = d.device_id)
ORDER BY d.device_id
LIMIT %(limit)s;

-- name: join_late
-- Late joiners added to a running rollout, in the wave it is at (its run notifies and
-- follows them like the rest).
INSERT INTO rollout_devices (rollout_id, device_id, store, group_name, wave, late)
SELECT %(rollout_id)s, d.device_id, d.store, d.group_name, %(wave)s, true
FROM unnest(%(device_ids)s::text[], %(stores)s::text[], %(groups)s::text[])
     AS d(device_id, store, group_name)
ON CONFLICT (rollout_id, device_id) DO NOTHING;

-- name: wave_grew
-- A wave's device count after late joiners came.
UPDATE rollout_waves SET targeted = targeted + %(n)s
WHERE rollout_id = %(rollout_id)s AND wave = %(wave)s;

-- name: retried_finished
-- Rollouts that succeeded with devices an operator asked to retry (retry_failed), or
-- still on their way after such a retry.
SELECT r.rollout_id FROM rollouts r
WHERE r.status = 'succeeded' AND EXISTS (
      SELECT 1 FROM rollout_devices rd
      WHERE rd.rollout_id = r.rollout_id AND rd.status IN ('planned', 'notified', 'applied'))
ORDER BY r.rollout_id
LIMIT %(limit)s;

-- name: restores_unsettled
-- A wave's restores not yet settled.
SELECT count(*) FROM rollout_devices
WHERE rollout_id = %(rollout_id)s AND wave = %(wave)s
  AND restore_status IN ('pending', 'notified');

-- name: release_row
-- An uploaded release by name (cloud.releases).
SELECT release, manifest_sha256, files, bytes FROM releases WHERE release = %(release)s;

-- name: document_row
-- One document version's content and withdrawal.
SELECT content, withdrawn_at FROM sync_documents WHERE kind = %(kind)s AND version = %(version)s;

-- name: release_document_of
-- The newest release document naming a release (to restore it).
SELECT version, content FROM sync_documents
WHERE kind = 'release' AND content ->> 'release' = %(release)s
ORDER BY version DESC LIMIT 1;

-- name: behind
-- Late joiners: active devices whose heartbeat reports a config or policy version below
-- the one their assignments make effective (device > store > group > fleet), that
-- version not withdrawn, no command of its action still pending for the device, none
-- for that version ever taken or answered (a refusal is not asked again), and not
-- waiting in a rollout of that kind for its wave (the rollout brings it).
WITH effective AS (
    SELECT d.device_id, k.kind, k.action, k.field,
           (SELECT a.version FROM document_assignments a
            WHERE a.kind = k.kind
              AND (a.scope = 'fleet'
                   OR (a.scope = 'group' AND a.value = d.group_name)
                   OR (a.scope = 'store' AND a.value = d.store)
                   OR (a.scope = 'device' AND a.value = d.device_id))
            ORDER BY CASE a.scope WHEN 'device' THEN 0 WHEN 'store' THEN 1
                                  WHEN 'group' THEN 2 ELSE 3 END
            LIMIT 1) AS version,
           h.heartbeat
    FROM devices d
    JOIN device_health h ON h.device_id = d.device_id
    CROSS JOIN (VALUES ('config', 'update_config', 'config_version'),
                       ('policy', 'activate_policy', 'policy_version'))
               AS k(kind, action, field)
    WHERE d.status = 'active'
)
SELECT e.device_id, e.kind, e.version
FROM effective e JOIN sync_documents s ON s.kind = e.kind AND s.version = e.version
WHERE s.withdrawn_at IS NULL
  AND coalesce((e.heartbeat ->> e.field)::bigint, 0) < e.version
  AND NOT EXISTS (
        SELECT 1 FROM rollout_devices rd JOIN rollouts r ON r.rollout_id = rd.rollout_id
        WHERE rd.device_id = e.device_id AND r.kind = e.kind
          AND r.status IN ('pending', 'running', 'paused', 'awaiting_approval')
          AND rd.status IN ('planned', 'held'))
  AND NOT EXISTS (
        SELECT 1 FROM commands c
        WHERE c.device_id = e.device_id AND c.action = e.action
          AND (c.status IN ('queued', 'delivered') AND c.expires_at > %(now)s
               OR ((c.document ->> 'version')::bigint = e.version
                   AND c.status IN ('applied', 'refused'))))
ORDER BY e.device_id, e.kind
LIMIT %(limit)s;

-- name: behind_release
-- Late joiners of a release: active devices whose heartbeat names another release than
-- the release document their assignments make effective, with no install_release
-- pending and none for that document taken or answered.
WITH effective AS (
    SELECT d.device_id,
           (SELECT a.version FROM document_assignments a
            WHERE a.kind = 'release'
              AND (a.scope = 'fleet'
                   OR (a.scope = 'group' AND a.value = d.group_name)
                   OR (a.scope = 'store' AND a.value = d.store)
                   OR (a.scope = 'device' AND a.value = d.device_id))
            ORDER BY CASE a.scope WHEN 'device' THEN 0 WHEN 'store' THEN 1
                                  WHEN 'group' THEN 2 ELSE 3 END
            LIMIT 1) AS version,
           h.heartbeat
    FROM devices d JOIN device_health h ON h.device_id = d.device_id
    WHERE d.status = 'active'
)
SELECT e.device_id, 'release', e.version
FROM effective e JOIN sync_documents s ON s.kind = 'release' AND s.version = e.version
WHERE s.withdrawn_at IS NULL
  AND e.heartbeat ->> 'binary_version' IS DISTINCT FROM s.content ->> 'release'
  AND NOT EXISTS (
        SELECT 1 FROM rollout_devices rd JOIN rollouts r ON r.rollout_id = rd.rollout_id
        WHERE rd.device_id = e.device_id AND r.kind = 'release'
          AND r.status IN ('pending', 'running', 'paused', 'awaiting_approval')
          AND rd.status IN ('planned', 'held'))
  AND NOT EXISTS (
        SELECT 1 FROM commands c
        WHERE c.device_id = e.device_id AND c.action = 'install_release'
          AND (c.status IN ('queued', 'delivered') AND c.expires_at > %(now)s
               OR ((c.document ->> 'version')::bigint = e.version
                   AND c.status IN ('applied', 'refused'))))
ORDER BY e.device_id
LIMIT %(limit)s;

-- name: mark_late
-- Devices of running or finished rollouts the reconciler sent their version late.
UPDATE rollout_devices rd SET late = true
FROM rollouts r
WHERE r.rollout_id = rd.rollout_id AND r.kind = %(kind)s AND r.version = %(version)s
  AND rd.device_id = ANY(%(device_ids)s::text[]);

-- name: release_bytes
-- The bytes each device of a release rollout reported downloading (its release_result:
-- for the rollout's command and for its restore), of the devices named or (NULL) all.
-- The values are the devices' own, as sent (checked by the caller).
SELECT d.device_id,
       (SELECT m.payload->'bytes_downloaded' FROM sync_messages m
        WHERE m.device_id = d.device_id AND m.topic = 'release_result'
          AND m.payload->>'command_id' = d.command_id
        ORDER BY m.received_at DESC LIMIT 1),
       (SELECT m.payload->'bytes_downloaded' FROM sync_messages m
        WHERE m.device_id = d.device_id AND m.topic = 'release_result'
          AND m.payload->>'command_id' = d.restore_command_id
        ORDER BY m.received_at DESC LIMIT 1)
FROM rollout_devices d
WHERE d.rollout_id = %(rollout_id)s
  AND (%(devices)s::text[] IS NULL OR d.device_id = ANY(%(devices)s::text[]));
