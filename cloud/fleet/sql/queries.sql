-- The Fleet API's queries on PostgreSQL. Every value is a bound parameter
-- (%(name)s); a filter left out is a NULL parameter that matches everything.

-- name: add_token
-- Store a new API token (its hash only).
INSERT INTO api_tokens (token_id, token_hash, name, role, created_at, created_by)
VALUES (%(token_id)s, %(token_hash)s, %(name)s, %(role)s, %(at)s, %(by)s)
RETURNING token_id, name, role, created_at, created_by, revoked_at, revoked_by, last_used_at;

-- name: token_by_hash
-- The live token a presented secret hashes to (none if unknown or revoked).
SELECT token_id, name, role, last_used_at FROM api_tokens
WHERE token_hash = %(token_hash)s AND revoked_at IS NULL;

-- name: touch_token
-- Note a token's use, at most once a minute (not a write per request).
UPDATE api_tokens SET last_used_at = %(at)s
WHERE token_id = %(token_id)s AND (last_used_at IS NULL OR last_used_at < %(at)s - 60);

-- name: tokens
-- API tokens by id, after a cursor.
SELECT token_id, name, role, created_at, created_by, revoked_at, revoked_by, last_used_at
FROM api_tokens
WHERE %(after)s::text IS NULL OR token_id > %(after)s::text
ORDER BY token_id
LIMIT %(limit)s;

-- name: revoke_token
-- Revoke a token (a revoked one stays revoked, as it was).
UPDATE api_tokens
SET revoked_at = coalesce(revoked_at, %(at)s), revoked_by = coalesce(revoked_by, %(by)s)
WHERE token_id = %(token_id)s
RETURNING token_id, name, role, created_at, created_by, revoked_at, revoked_by, last_used_at;

-- name: audit_head
-- The cloud audit log's head, locked until the transaction ends (one writer at a time).
SELECT seq, hash FROM cloud_audit_head WHERE one FOR UPDATE;

-- name: audit_head_unlocked
-- The head as it is now (for verification).
SELECT seq, hash FROM cloud_audit_head WHERE one;

-- name: append_audit
-- One row of the cloud audit log, and the head moved to it.
WITH row AS (
    INSERT INTO cloud_audit (seq, at, actor, actor_token, actor_role, action, target, detail,
                             prev_hash, hash, version)
    VALUES (%(seq)s, %(at)s, %(actor)s, %(actor_token)s, %(actor_role)s, %(action)s,
            %(target)s, %(detail)s, %(prev_hash)s, %(hash)s, %(version)s)
    RETURNING seq, hash
)
UPDATE cloud_audit_head SET seq = row.seq, hash = row.hash FROM row WHERE one;

-- name: audit_rows
-- The cloud audit log after a seq, in order.
SELECT seq, at, actor, actor_token, actor_role, action, target, detail, prev_hash, hash,
       version
FROM cloud_audit
WHERE seq > %(after)s
  AND (%(action)s::text IS NULL OR action = %(action)s::text)
  AND (%(actor)s::text IS NULL OR actor = %(actor)s::text)
ORDER BY seq
LIMIT %(limit)s;

-- name: devices
-- Devices by id after a cursor, each filter NULL or matched exactly; with the latest
-- heartbeat's versions and storage state (the health: ok, high_water, full; unknown
-- before the first heartbeat) and the device's tags.
SELECT d.device_id, d.store, d.group_name, d.status, d.enrolled_at, d.revoked_at,
       coalesce(h.heartbeat ->> 'binary_version', d.binary_version) AS binary_version,
       (h.heartbeat ->> 'config_version')::bigint AS config_version,
       (h.heartbeat ->> 'policy_version')::bigint AS policy_version,
       coalesce(h.heartbeat ->> 'storage_state', 'unknown') AS health,
       h.last_seen_at,
       coalesce((SELECT array_agg(t.tag ORDER BY t.tag) FROM device_tags t
                 WHERE t.device_id = d.device_id), '{}') AS tags
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
WHERE (%(after)s::text IS NULL OR d.device_id > %(after)s::text)
  AND (%(device_id)s::text IS NULL OR d.device_id = %(device_id)s::text)
  AND (%(store)s::text IS NULL OR d.store = %(store)s::text)
  AND (%(group)s::text IS NULL OR d.group_name = %(group)s::text)
  AND (%(tag)s::text IS NULL OR EXISTS (SELECT 1 FROM device_tags t
                                        WHERE t.device_id = d.device_id
                                          AND t.tag = %(tag)s::text))
  AND (%(binary_version)s::text IS NULL
       OR coalesce(h.heartbeat ->> 'binary_version', d.binary_version) = %(binary_version)s::text)
  AND (%(config_version)s::text IS NULL
       OR h.heartbeat ->> 'config_version' = %(config_version)s::text)
  AND (%(policy_version)s::text IS NULL
       OR h.heartbeat ->> 'policy_version' = %(policy_version)s::text)
  AND (%(health)s::text IS NULL
       OR coalesce(h.heartbeat ->> 'storage_state', 'unknown') = %(health)s::text)
  AND (%(status)s::text IS NULL OR d.status = %(status)s::text)
  AND (%(seen_before)s::float8 IS NULL OR h.last_seen_at < %(seen_before)s::float8)
  AND (%(seen_after)s::float8 IS NULL OR h.last_seen_at >= %(seen_after)s::float8)
ORDER BY d.device_id
LIMIT %(limit)s;

-- name: device_more
-- What one device's page shows beyond its list row.
SELECT d.hardware, d.conflicts, d.rotated_at, h.heartbeat, h.stream,
       (SELECT count(*) FROM quarantine q
        WHERE q.device_id = d.device_id AND q.status = 'open') AS open_quarantine
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
WHERE d.device_id = %(device_id)s;

-- name: device_chains
-- A device's audit chains as the cloud holds them.
SELECT stream, chain, base_seq, head_seq, state, first_bad_seq, reason, broken_at, updated_at
FROM audit_chains WHERE device_id = %(device_id)s
ORDER BY stream, chain;

-- name: device_lock
-- A device's group, its row locked until the transaction ends.
SELECT group_name FROM devices WHERE device_id = %(device_id)s FOR UPDATE;

-- name: move_device
-- Put a device in a group (NULL: none).
UPDATE devices SET group_name = %(group)s WHERE device_id = %(device_id)s;

-- name: add_tag
-- Tag a device (a tag it has stays as it was).
INSERT INTO device_tags (device_id, tag, added_at) VALUES (%(device_id)s, %(tag)s, %(at)s)
ON CONFLICT DO NOTHING
RETURNING 1;

-- name: remove_tag
-- Untag a device.
DELETE FROM device_tags WHERE device_id = %(device_id)s AND tag = %(tag)s RETURNING 1;

-- name: device_tags
-- A device's tags.
SELECT tag FROM device_tags WHERE device_id = %(device_id)s ORDER BY tag;

-- name: groups
-- Groups with their device counts, by name after a cursor.
SELECT group_name, count(*) FROM devices
WHERE group_name IS NOT NULL
  AND (%(after)s::text IS NULL OR group_name > %(after)s::text)
  AND (%(store)s::text IS NULL OR store = %(store)s::text)
GROUP BY group_name
ORDER BY group_name
LIMIT %(limit)s;

-- name: stores
-- Stores with their device counts, by name after a cursor.
SELECT store, count(*) FROM devices
WHERE (%(after)s::text IS NULL OR store > %(after)s::text)
GROUP BY store
ORDER BY store
LIMIT %(limit)s;

-- name: device_audit
-- A device's audit rows in (stream, chain, seq) order after a cursor.
SELECT stream, chain, seq, run_id, event, step, detail, at, prev_hash, hash, version
FROM device_audit
WHERE device_id = %(device_id)s
  AND (%(stream)s::text IS NULL OR stream = %(stream)s::text)
  AND (%(chain)s::bigint IS NULL OR chain = %(chain)s::bigint)
  AND (stream, chain, seq) > (%(a_stream)s::text, %(a_chain)s::bigint, %(a_seq)s::bigint)
ORDER BY stream, chain, seq
LIMIT %(limit)s;

-- name: enroll_tokens
-- Enrollment tokens by id (a prefix of the hash) after a cursor; never the hash itself.
SELECT left(e.token_hash, 12), e.store, e.group_name, e.created_at, e.expires_at,
       e.used_at, e.device_id, r.revoked_at, r.revoked_by
FROM enroll_tokens e LEFT JOIN enroll_token_revocations r ON r.token_hash = e.token_hash
WHERE (%(after)s::text IS NULL OR left(e.token_hash, 12) > %(after)s::text)
  AND (%(store)s::text IS NULL OR e.store = %(store)s::text)
  AND (%(id)s::text IS NULL OR left(e.token_hash, 12) = %(id)s::text)
ORDER BY left(e.token_hash, 12), e.token_hash
LIMIT %(limit)s;

-- name: enroll_token_lock
-- The enrollment tokens an id names (locked: a racing enrollment waits, then fails).
SELECT token_hash, used_at, device_id FROM enroll_tokens
WHERE left(token_hash, 12) = %(id)s
FOR UPDATE;

-- name: revoke_enroll_token
-- Revoke an enrollment token: noted, and its expiry pulled to now so none can use it.
WITH noted AS (
    INSERT INTO enroll_token_revocations (token_hash, revoked_at, revoked_by)
    VALUES (%(token_hash)s, %(at)s, %(by)s)
    ON CONFLICT DO NOTHING
    RETURNING token_hash
)
UPDATE enroll_tokens SET expires_at = least(expires_at, %(at)s)
WHERE token_hash = %(token_hash)s;

-- name: quarantine_items
-- Quarantined items by id after a cursor, filtered by device, status and kind.
SELECT quarantine_id, device_id, stream, seq, kind, reason, detail, received_at, status
FROM quarantine
WHERE (%(after)s::bigint IS NULL OR quarantine_id > %(after)s::bigint)
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(kind)s::text IS NULL OR kind = %(kind)s::text)
ORDER BY quarantine_id
LIMIT %(limit)s;

-- name: quarantine_item_lock
-- One quarantined item with the entry as kept, locked until the transaction ends.
SELECT quarantine_id, device_id, stream, seq, kind, reason, detail, received_at, status, entry
FROM quarantine WHERE quarantine_id = %(id)s
FOR UPDATE;

-- name: quarantine_item
-- One quarantined item with the entry as kept.
SELECT quarantine_id, device_id, stream, seq, kind, reason, detail, received_at, status, entry
FROM quarantine WHERE quarantine_id = %(id)s;

-- name: settle_quarantine
-- Set a quarantined item's status, reason and detail.
UPDATE quarantine SET status = %(status)s, reason = %(reason)s, detail = %(detail)s
WHERE quarantine_id = %(id)s;

-- name: add_decision
-- Note what an operator did with a quarantined item.
INSERT INTO quarantine_decisions (quarantine_id, decision, actor, reason, at)
VALUES (%(id)s, %(decision)s, %(actor)s, %(reason)s, %(at)s);

-- name: decisions
-- What operators did with a quarantined item, in order.
SELECT decision, actor, reason, at FROM quarantine_decisions
WHERE quarantine_id = %(id)s ORDER BY decision_id;

-- name: superseding_items
-- Open items a replay just quarantined anew for the same entry (kept as a new record).
SELECT quarantine_id FROM quarantine
WHERE device_id = %(device_id)s AND stream = %(stream)s AND kind = %(kind)s
  AND seq = %(seq)s AND status = 'open' AND quarantine_id <> %(id)s
  AND received_at = %(at)s
ORDER BY quarantine_id;
