-- The documents service's queries (cloud.documents), each one statement, every value a
-- bound parameter. The tables are the sync service's (cloud/sync/sql): sync_documents,
-- document_assignments, commands, devices.

-- name: documents
-- Versions of a kind, newest first, below a cursor version (NULL: from the newest).
SELECT kind, version, created_at FROM sync_documents
WHERE kind = %(kind)s AND (%(after)s::bigint IS NULL OR version < %(after)s::bigint)
ORDER BY version DESC
LIMIT %(limit)s;

-- name: document
-- One version with its content (and when it was withdrawn, if it was).
SELECT kind, version, content, created_at, withdrawn_at FROM sync_documents
WHERE kind = %(kind)s AND version = %(version)s;

-- name: document_exists
-- Whether a version exists.
SELECT 1 FROM sync_documents WHERE kind = %(kind)s AND version = %(version)s;

-- name: withdraw_document
-- Withdraw a version (kept, its number taken), unless it was withdrawn already.
UPDATE sync_documents SET withdrawn_at = %(at)s
WHERE kind = %(kind)s AND version = %(version)s AND withdrawn_at IS NULL
RETURNING version;

-- name: lock_assignment
-- Serialise changes of one (kind, scope, value) until the transaction ends.
SELECT pg_advisory_xact_lock(%(lock)s::integer, hashtext(%(kind)s || '/' || %(scope)s || '/' || %(value)s));

-- name: assignment
-- The assignment of one (kind, scope, value).
SELECT assignment_id, kind, scope, value, version, assigned_at, assigned_by
FROM document_assignments
WHERE kind = %(kind)s AND scope = %(scope)s AND value = %(value)s;

-- name: assignment_by_id
-- One assignment by its id (of a kind).
SELECT assignment_id, kind, scope, value, version, assigned_at, assigned_by
FROM document_assignments
WHERE kind = %(kind)s AND assignment_id = %(assignment_id)s;

-- name: put_assignment
-- Assign a version to (kind, scope, value), replacing the one there was.
INSERT INTO document_assignments (kind, scope, value, version, assigned_at, assigned_by)
VALUES (%(kind)s, %(scope)s, %(value)s, %(version)s, %(at)s, %(by)s)
ON CONFLICT (kind, scope, value) DO UPDATE
SET version = excluded.version, assigned_at = excluded.assigned_at,
    assigned_by = excluded.assigned_by
RETURNING assignment_id, kind, scope, value, version, assigned_at, assigned_by;

-- name: delete_assignment
-- Remove the assignment of (kind, scope, value).
DELETE FROM document_assignments
WHERE kind = %(kind)s AND scope = %(scope)s AND value = %(value)s
RETURNING assignment_id, kind, scope, value, version, assigned_at, assigned_by;

-- name: assignments
-- Assignments of a kind by id after a cursor, each filter NULL or matched exactly.
SELECT assignment_id, kind, scope, value, version, assigned_at, assigned_by
FROM document_assignments
WHERE kind = %(kind)s
  AND (%(after)s::bigint IS NULL OR assignment_id > %(after)s::bigint)
  AND (%(scope)s::text IS NULL OR scope = %(scope)s::text)
  AND (%(value)s::text IS NULL OR value = %(value)s::text)
  AND (%(version)s::bigint IS NULL OR version = %(version)s::bigint)
ORDER BY assignment_id
LIMIT %(limit)s;

-- name: place
-- Where a device sits (store, group), its status, and the versions its latest
-- heartbeat says are in force.
SELECT d.device_id, d.store, d.group_name, d.status,
       (h.heartbeat ->> 'config_version')::bigint, (h.heartbeat ->> 'policy_version')::bigint
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
WHERE d.device_id = %(device_id)s;

-- name: candidates
-- The assignments of a kind that could name a device (the rule picks one).
SELECT assignment_id, kind, scope, value, version, assigned_at, assigned_by
FROM document_assignments
WHERE kind = %(kind)s
  AND (scope = 'fleet'
       OR (scope = 'group' AND value = %(group)s::text)
       OR (scope = 'store' AND value = %(store)s::text)
       OR (scope = 'device' AND value = %(device_id)s::text));

-- name: commands
-- Commands newest first, below a cursor, each filter NULL or matched; the status as it
-- reads now: one still queued or delivered past its expiry is expired.
SELECT c.command_no, c.command_id, c.device_id, c.seq, c.action, c.batch_id,
       CASE WHEN c.status IN ('queued', 'delivered') AND c.expires_at <= %(now)s
            THEN 'expired' ELSE c.status END AS status,
       c.reason, c.created_at, c.expires_at, c.delivered_at, c.result_at,
       c.document ->> 'kind', (c.document ->> 'version')::bigint
FROM commands c
WHERE (%(after)s::bigint IS NULL OR c.command_no < %(after)s::bigint)
  AND (%(command_id)s::text IS NULL OR c.command_id = %(command_id)s::text)
  AND (%(device_id)s::text IS NULL OR c.device_id = %(device_id)s::text)
  AND (%(batch_id)s::text IS NULL OR c.batch_id = %(batch_id)s::text)
  AND (%(status)s::text IS NULL
       OR (CASE WHEN c.status IN ('queued', 'delivered') AND c.expires_at <= %(now)s
                THEN 'expired' ELSE c.status END) = %(status)s::text)
ORDER BY c.command_no DESC
LIMIT %(limit)s;

-- name: batch_counts
-- A batch's commands counted by status as it reads now.
SELECT min(c.action), min(c.created_at), min(c.expires_at),
       CASE WHEN c.status IN ('queued', 'delivered') AND c.expires_at <= %(now)s
            THEN 'expired' ELSE c.status END AS status,
       count(*)
FROM commands c WHERE c.batch_id = %(batch_id)s
GROUP BY 4;

-- name: sweep_expired
-- Mark expired the commands still queued or delivered past their expiry (a later
-- result from the device still sets its status: the device's word wins).
UPDATE commands SET status = 'expired',
                    reason = coalesce(reason, 'not applied before it expired')
WHERE status IN ('queued', 'delivered') AND expires_at <= %(now)s
RETURNING command_id;
