-- The dashboard's own reads on PostgreSQL (the lists it shares with the Fleet API are
-- cloud.fleet's and cloud.rollouts' queries). Every value is a bound parameter
-- (%(name)s); a filter left NULL matches everything. Nothing here writes.

-- name: fleet_summary
-- Devices in scope, counted in one pass over their latest heartbeat: active ones by
-- health (the storage state; unknown before the first heartbeat), by binary, config and
-- policy version (compliance, most devices first); by when they were last seen
-- (recently, within the offline threshold, silent past it, never); and the revoked.
WITH v AS MATERIALIZED (
    SELECT d.status,
           coalesce(h.heartbeat ->> 'storage_state', 'unknown') AS health,
           coalesce(h.heartbeat ->> 'binary_version', d.binary_version) AS binary_version,
           h.heartbeat ->> 'config_version' AS config_version,
           h.heartbeat ->> 'policy_version' AS policy_version,
           h.last_seen_at
    FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
    WHERE (%(store)s::text IS NULL OR d.store = %(store)s::text)
      AND (%(group)s::text IS NULL OR d.group_name = %(group)s::text)
), a AS (
    SELECT * FROM v WHERE status = 'active'
)
SELECT kind, value, n FROM (
    SELECT 'health' AS kind, health AS value, count(*) AS n FROM a GROUP BY 2
    UNION ALL
    SELECT 'binary', binary_version, count(*) FROM a GROUP BY 2
    UNION ALL
    SELECT 'config', config_version, count(*) FROM a GROUP BY 2
    UNION ALL
    SELECT 'policy', policy_version, count(*) FROM a GROUP BY 2
    UNION ALL
    SELECT 'seen', s.value, s.n
    FROM (SELECT count(*) AS active,
                 count(*) FILTER (WHERE last_seen_at >= %(recent)s::float8) AS recent,
                 count(*) FILTER (WHERE last_seen_at >= %(offline)s::float8) AS online,
                 count(*) FILTER (WHERE last_seen_at < %(offline)s::float8) AS silent,
                 count(*) FILTER (WHERE last_seen_at IS NULL) AS never
          FROM a) c
    CROSS JOIN LATERAL (VALUES ('active', c.active), ('recent', c.recent),
                               ('online', c.online), ('silent', c.silent),
                               ('never', c.never)) AS s (value, n)
    UNION ALL
    SELECT 'seen', 'revoked', count(*) FROM v WHERE status = 'revoked'
) c
ORDER BY kind, n DESC, value NULLS LAST;

-- name: attention
-- Active devices an operator should look at first: an audit chain the cloud found
-- broken, or an outbox whose oldest unsent entry is older than the threshold now (its
-- age at the last heartbeat plus the time since). Broken chains first, then the
-- oldest outbox; ``total`` counts them all, past the limit.
WITH broken AS (
    SELECT device_id, count(*) AS chains, min(first_bad_seq) AS first_bad_seq,
           min(reason) AS reason
    FROM audit_chains WHERE state = 'broken'
    GROUP BY device_id
), h AS (
    SELECT device_id, last_seen_at, heartbeat,
           (heartbeat ->> 'outbox_oldest_age_s')::float8
               + greatest(0, %(now)s::float8 - last_seen_at) AS outbox_age_s
    FROM device_health
)
SELECT d.device_id, d.store, d.group_name, h.last_seen_at,
       (h.heartbeat ->> 'outbox_depth')::bigint AS outbox_depth, h.outbox_age_s,
       b.chains AS broken_chains, b.first_bad_seq, b.reason,
       h.heartbeat ->> 'last_error' AS last_error, count(*) OVER () AS total
FROM devices d
LEFT JOIN h ON h.device_id = d.device_id
LEFT JOIN broken b ON b.device_id = d.device_id
WHERE d.status = 'active'
  AND (%(store)s::text IS NULL OR d.store = %(store)s::text)
  AND (%(group)s::text IS NULL OR d.group_name = %(group)s::text)
  AND (b.device_id IS NOT NULL OR h.outbox_age_s > %(stalled_s)s::float8)
ORDER BY b.device_id IS NOT NULL DESC, h.outbox_age_s DESC NULLS LAST, d.device_id
LIMIT %(limit)s;

-- name: store_names
-- Store names for the filter's suggestions, by name.
SELECT DISTINCT store FROM devices ORDER BY store LIMIT %(limit)s;

-- name: group_names
-- Group names for the filter's suggestions, by name.
SELECT DISTINCT group_name FROM devices WHERE group_name IS NOT NULL
ORDER BY group_name LIMIT %(limit)s;

-- name: device_commands
-- A device's latest commands, newest first, with their status and refusal reason.
SELECT command_id, action, status, reason, created_at, delivered_at, result_at,
       document ->> 'kind' AS doc_kind, document ->> 'version' AS doc_version
FROM commands WHERE device_id = %(device_id)s
ORDER BY command_no DESC
LIMIT %(limit)s;

-- name: device_syncs
-- A device's latest syncs that carried outbox entries: when, how many, which topics.
SELECT received_at, count(*), array_agg(DISTINCT topic ORDER BY topic), min(seq), max(seq)
FROM sync_messages WHERE device_id = %(device_id)s
GROUP BY received_at
ORDER BY received_at DESC
LIMIT %(limit)s;

-- name: device_quarantine
-- A device's quarantined entries, newest first.
SELECT quarantine_id, stream, seq, kind, reason, detail, received_at, status
FROM quarantine WHERE device_id = %(device_id)s
ORDER BY quarantine_id DESC
LIMIT %(limit)s;

-- name: device_rollouts
-- The rollouts a device took part in, newest first, with its status in each.
SELECT r.rollout_id, r.kind, r.status, rd.wave, rd.status, rd.notified_at, rd.applied_at,
       rd.healthy_at, rd.failed_at, rd.last_error, rd.restore_status, r.created_at
FROM rollout_devices rd JOIN rollouts r ON r.rollout_id = rd.rollout_id
WHERE rd.device_id = %(device_id)s
ORDER BY r.created_at DESC
LIMIT %(limit)s;

-- name: rollout_controls
-- What operators asked of a rollout, in order.
SELECT action, requested_by, requested_at, reason, detail
FROM rollout_controls WHERE rollout_id = %(rollout_id)s
ORDER BY control_id;

-- name: cloud_audit_around
-- The cloud audit rows around a seq (the first broken link and its neighbours).
SELECT seq, at, actor, actor_role, action, target, detail, prev_hash, hash
FROM cloud_audit WHERE seq BETWEEN %(low)s AND %(high)s
ORDER BY seq;

-- name: cloud_audit_latest
-- The cloud audit log newest first, before a seq (NULL: from the head).
SELECT seq, at, actor, actor_role, action, target, detail, prev_hash, hash
FROM cloud_audit
WHERE (%(before)s::bigint IS NULL OR seq < %(before)s::bigint)
  AND (%(action)s::text IS NULL OR action = %(action)s::text)
ORDER BY seq DESC
LIMIT %(limit)s;

-- name: device_audit_around
-- A device's audit rows of one chain around a seq.
SELECT seq, run_id, event, step, at, prev_hash, hash
FROM device_audit
WHERE device_id = %(device_id)s AND stream = %(stream)s AND chain = %(chain)s
  AND seq BETWEEN %(low)s AND %(high)s
ORDER BY seq;
