-- The control workflows' queries on PostgreSQL (cloud.control). Every value is a bound
-- parameter (%(name)s); a filter left out is a NULL parameter that matches everything.

-- name: device_page
-- A page of device ids (every device, revoked ones too: their chains still count).
SELECT device_id FROM devices
WHERE %(after)s::text IS NULL OR device_id > %(after)s::text
ORDER BY device_id
LIMIT %(limit)s;

-- name: save_verification
-- A chain's latest re-verification (replacing the one before).
INSERT INTO audit_verifications (device_id, stream, chain, ok, rows_checked, head_seq,
                                 first_bad_seq, reason, digest_seq, run_id, verified_at)
VALUES (%(device_id)s, %(stream)s, %(chain)s, %(ok)s, %(rows)s, %(head_seq)s,
        %(first_bad_seq)s, %(reason)s, %(digest_seq)s, %(run_id)s, %(at)s)
ON CONFLICT (device_id, stream, chain) DO UPDATE
SET ok = EXCLUDED.ok, rows_checked = EXCLUDED.rows_checked, head_seq = EXCLUDED.head_seq,
    first_bad_seq = EXCLUDED.first_bad_seq, reason = EXCLUDED.reason,
    digest_seq = EXCLUDED.digest_seq, run_id = EXCLUDED.run_id,
    verified_at = EXCLUDED.verified_at;

-- name: verifications
-- Chains as last re-verified, by device, after a cursor; ``ok`` null: any.
SELECT device_id, stream, chain, ok, rows_checked, head_seq, first_bad_seq, reason,
       digest_seq, run_id, verified_at
FROM audit_verifications
WHERE (%(ok)s::boolean IS NULL OR ok = %(ok)s::boolean)
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s::text)
  AND (%(after)s::text IS NULL OR device_id || '/' || stream || '/' || chain::text > %(after)s::text)
ORDER BY device_id || '/' || stream || '/' || chain::text
LIMIT %(limit)s;

-- name: not_ok_in_run
-- The chains a run found broken.
SELECT device_id, stream, chain FROM audit_verifications
WHERE run_id = %(run_id)s AND NOT ok;

-- name: current_heads
-- Every device chain's head as the cloud holds it.
SELECT device_id, stream, chain, head_seq, head_hash FROM audit_chains;

-- name: lock_digests
-- One digest made at a time (their seqs have no gaps, each names the one before).
SELECT pg_advisory_xact_lock(%(lock)s);

-- name: digest_by_run
-- The digest a run made (a retried step finds it).
SELECT seq, run_id, made_at, heads, heads_hash, prev_hash, hash, key_id, signature
FROM audit_digests WHERE run_id = %(run_id)s;

-- name: digest
-- One digest by seq.
SELECT seq, run_id, made_at, heads, heads_hash, prev_hash, hash, key_id, signature
FROM audit_digests WHERE seq = %(seq)s;

-- name: latest_digest
-- The newest digest.
SELECT seq, run_id, made_at, heads, heads_hash, prev_hash, hash, key_id, signature
FROM audit_digests ORDER BY seq DESC LIMIT 1;

-- name: digests
-- Digests newest first, before a cursor (a seq).
SELECT seq, run_id, made_at, heads, heads_hash, prev_hash, hash, key_id, signature
FROM audit_digests
WHERE %(before)s::bigint IS NULL OR seq < %(before)s::bigint
ORDER BY seq DESC
LIMIT %(limit)s;

-- name: add_digest
-- A new digest (its heads go in with copy_digest_heads, in the same transaction).
INSERT INTO audit_digests (seq, run_id, made_at, heads, heads_hash, prev_hash, hash,
                           key_id, signature)
VALUES (%(seq)s, %(run_id)s, %(made_at)s, %(heads)s, %(heads_hash)s, %(prev_hash)s,
        %(hash)s, %(key_id)s, %(signature)s);

-- name: copy_digest_heads
-- A digest's heads, in bulk.
COPY audit_digest_heads (digest_seq, device_id, stream, chain, head_seq, head_hash)
FROM STDIN;

-- name: digest_heads
-- The heads a digest covers; one device's when device_id is given.
SELECT device_id, stream, chain, head_seq, head_hash FROM audit_digest_heads
WHERE digest_seq = %(seq)s
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s::text);

-- name: digest_devices
-- A page of the devices a digest covers, after a cursor.
SELECT DISTINCT device_id FROM audit_digest_heads
WHERE digest_seq = %(seq)s
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s::text)
  AND (%(after)s::text IS NULL OR device_id > %(after)s::text)
ORDER BY device_id
LIMIT %(limit)s;

-- name: raise_silent
-- Raise every active device not seen since the threshold (enrolled and never seen: since
-- its enrollment); one still raised keeps its first raising, a cleared one is raised anew.
INSERT INTO device_alerts (device_id, kind, raised_at, last_seen_at, cleared_at, run_id)
SELECT d.device_id, 'silent', %(now)s, coalesce(h.last_seen_at, d.enrolled_at), NULL,
       %(run_id)s
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
WHERE d.status = 'active' AND coalesce(h.last_seen_at, d.enrolled_at) < %(threshold)s
ON CONFLICT (device_id) DO UPDATE
SET raised_at = EXCLUDED.raised_at, last_seen_at = EXCLUDED.last_seen_at,
    cleared_at = NULL, run_id = EXCLUDED.run_id
WHERE device_alerts.cleared_at IS NOT NULL
RETURNING device_id;

-- name: clear_seen
-- Clear the alerts of devices seen since they were raised, and of revoked devices.
UPDATE device_alerts a SET cleared_at = %(now)s
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
WHERE a.device_id = d.device_id AND a.cleared_at IS NULL
  AND (d.status <> 'active' OR coalesce(h.last_seen_at, d.enrolled_at) > a.last_seen_at)
RETURNING a.device_id;

-- name: open_alerts
-- How many devices are raised.
SELECT count(*) FROM device_alerts WHERE cleared_at IS NULL;

-- name: alerts
-- Alerts after a cursor (device id), with the device's last sighting as it is now: an
-- open alert whose device has been seen since is shown cleared at that sighting.
-- state: 'raised', 'cleared' or NULL (all).
SELECT * FROM (
    SELECT a.device_id, a.kind, a.raised_at, a.last_seen_at,
           coalesce(h.last_seen_at, d.enrolled_at) AS seen_now,
           CASE WHEN a.cleared_at IS NOT NULL THEN a.cleared_at
                WHEN d.status <> 'active' THEN d.revoked_at
                WHEN coalesce(h.last_seen_at, d.enrolled_at) > a.last_seen_at
                    THEN coalesce(h.last_seen_at, d.enrolled_at)
           END AS cleared_at,
           d.store, a.run_id
    FROM device_alerts a
    JOIN devices d ON d.device_id = a.device_id
    LEFT JOIN device_health h ON h.device_id = a.device_id
) x
WHERE (%(state)s::text IS NULL
       OR (%(state)s::text = 'raised' AND x.cleared_at IS NULL)
       OR (%(state)s::text = 'cleared' AND x.cleared_at IS NOT NULL))
  AND (%(after)s::text IS NULL OR x.device_id > %(after)s::text)
ORDER BY x.device_id
LIMIT %(limit)s;

-- name: metrics_devices
-- Devices by status, and how many were seen in the last 5, 15 and 60 minutes.
SELECT count(*) FILTER (WHERE d.status = 'active'),
       count(*) FILTER (WHERE d.status = 'revoked'),
       count(*) FILTER (WHERE h.last_seen_at >= %(now)s - 300),
       count(*) FILTER (WHERE h.last_seen_at >= %(now)s - 900),
       count(*) FILTER (WHERE h.last_seen_at >= %(now)s - 3600)
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id;

-- name: metrics_lag
-- Percentiles (p50, p95, p99) over active devices that have synced of the seconds
-- since each was last seen, and of its outbox's oldest entry's age as it last reported
-- it (an empty outbox: 0); NULLs when no device has synced.
SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
           (ORDER BY greatest(%(now)s - h.last_seen_at, 0)),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
           (ORDER BY CASE WHEN jsonb_typeof(h.heartbeat -> 'outbox_oldest_age_s') = 'number'
                          THEN (h.heartbeat ->> 'outbox_oldest_age_s')::double precision
                          ELSE 0 END)
FROM device_health h JOIN devices d ON d.device_id = h.device_id
WHERE d.status = 'active';

-- name: metrics_commands
-- Commands by status.
SELECT status, count(*) FROM commands GROUP BY status;

-- name: metrics_runs_present
-- Whether the engine store's runs table is in this database.
SELECT to_regclass('workflow_runs') IS NOT NULL;

-- name: metrics_runs
-- Workflow runs by status.
SELECT status, count(*) FROM workflow_runs GROUP BY status;

-- name: metrics_audit
-- Raised devices, and chains found broken by their last re-verification.
SELECT (SELECT count(*) FROM device_alerts WHERE cleared_at IS NULL),
       (SELECT count(*) FROM audit_verifications WHERE NOT ok);
