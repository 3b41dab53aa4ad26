-- The sync service's queries (cloud.sync.postgres), each one statement. Values are
-- always bound parameters; arrays of a batch are passed whole and unnest()ed.

-- name: create_migrations_table
-- Bookkeeping for applied sync migrations; created before the first one runs.
CREATE TABLE IF NOT EXISTS sync_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at double precision NOT NULL
);

-- name: schema_version
-- The highest applied sync migration.
SELECT coalesce(max(version), 0) FROM sync_schema_migrations;

-- name: record_migration
-- Mark one migration applied.
INSERT INTO sync_schema_migrations (version, name, applied_at)
VALUES (%(version)s, %(name)s, %(at)s);

-- name: engine_present
-- Whether the engine store's bookkeeping table is in this database.
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- name: engine_schema_version
-- The engine store's schema version (when engine_present).
SELECT coalesce(max(version), 0) FROM schema_migrations;

-- name: add_token
-- A new enrollment token, by its hash.
INSERT INTO enroll_tokens (token_hash, store, group_name, created_at, expires_at)
VALUES (%(token_hash)s, %(store)s, %(group)s, %(created_at)s, %(expires_at)s);

-- name: consume_token
-- Take an unused, unexpired token: of two racing takers exactly one gets a row.
UPDATE enroll_tokens SET used_at = %(now)s, device_id = %(device_id)s
WHERE token_hash = %(token_hash)s AND used_at IS NULL AND expires_at > %(now)s
RETURNING store, group_name, expires_at;

-- name: token_holder
-- The device a used token enrolled (an enrollment asked again after a lost answer).
SELECT device_id FROM enroll_tokens WHERE token_hash = %(token_hash)s AND used_at IS NOT NULL;

-- name: add_device
-- Register an enrolled device.
INSERT INTO devices (device_id, store, group_name, public_key, status, enrolled_at,
                     binary_version, hardware)
VALUES (%(device_id)s, %(store)s, %(group)s, %(public_key)s, %(status)s, %(enrolled_at)s,
        %(binary_version)s, %(hardware)s);

-- name: device
-- One device with its latest health.
SELECT d.device_id, d.store, d.group_name, d.public_key, d.status, d.enrolled_at,
       d.binary_version, d.hardware, d.previous_public_key, d.rotated_at, d.revoked_at,
       d.conflicts, h.last_seen_at, h.heartbeat
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
WHERE d.device_id = %(device_id)s;

-- name: device_locked
-- One device, its row locked until the transaction ends (one exchange at a time).
SELECT d.device_id, d.store, d.group_name, d.public_key, d.status, d.enrolled_at,
       d.binary_version, d.hardware, d.previous_public_key, d.rotated_at, d.revoked_at,
       d.conflicts, NULL::double precision AS last_seen_at, NULL::jsonb AS heartbeat
FROM devices d WHERE d.device_id = %(device_id)s FOR UPDATE;

-- name: devices
-- Every device with its latest health, by store then id.
SELECT d.device_id, d.store, d.group_name, d.public_key, d.status, d.enrolled_at,
       d.binary_version, d.hardware, d.previous_public_key, d.rotated_at, d.revoked_at,
       d.conflicts, h.last_seen_at, h.heartbeat
FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id
ORDER BY d.store, d.device_id;

-- name: revoke_device
-- Revoke an active device.
UPDATE devices SET status = 'revoked', revoked_at = %(at)s
WHERE device_id = %(device_id)s AND status = 'active';

-- name: replace_key
-- The device's new key; the old one kept as its previous key.
UPDATE devices SET previous_public_key = public_key, public_key = %(public_key)s,
                   rotated_at = %(at)s
WHERE device_id = %(device_id)s;

-- name: add_conflicts
-- Count conflicting outbox entries on the device.
UPDATE devices SET conflicts = conflicts + %(count)s WHERE device_id = %(device_id)s;

-- name: record_nonce
-- Remember a nonce (no row back: seen before), forgetting the device's old ones.
WITH pruned AS (
    DELETE FROM device_nonces WHERE device_id = %(device_id)s AND seen_at < %(prune_before)s
)
INSERT INTO device_nonces (device_id, nonce, seen_at)
VALUES (%(device_id)s, %(nonce)s, %(at)s)
ON CONFLICT DO NOTHING
RETURNING 1;

-- name: insert_messages
-- A batch of outbox entries in one statement (the rows as one JSON array, parsed by the
-- server); the seqs inserted come back.
INSERT INTO sync_messages (device_id, stream, seq, message_id, run_id, step, topic, payload,
                           created_at, content_hash, received_at)
SELECT %(device_id)s, %(stream)s, t.seq, t.message_id, t.run_id, t.step, t.topic,
       coalesce(t.payload, 'null'::jsonb), t.created_at, t.content_hash, %(at)s
FROM json_to_recordset(%(rows)s::json)
     AS t(seq bigint, message_id text, run_id text, step text, topic text, payload jsonb,
          created_at double precision, content_hash text)
ON CONFLICT DO NOTHING
RETURNING seq;

-- name: message_hashes
-- The content hashes held for some seqs of a stream.
SELECT seq, content_hash FROM sync_messages
WHERE device_id = %(device_id)s AND stream = %(stream)s AND seq = ANY(%(seqs)s::bigint[]);

-- name: mark_outbox
-- Raise a stream's acknowledged mark (never lower it).
INSERT INTO sync_streams (device_id, stream, outbox_acked, updated_at)
VALUES (%(device_id)s, %(stream)s, %(through)s, %(at)s)
ON CONFLICT (device_id, stream) DO UPDATE
SET outbox_acked = greatest(sync_streams.outbox_acked, excluded.outbox_acked),
    updated_at = excluded.updated_at;

-- name: quarantine
-- Keep rejected entries and rows; one already kept (same fingerprint) is not doubled.
INSERT INTO quarantine (device_id, stream, seq, kind, reason, detail, entry, fingerprint,
                        received_at)
SELECT %(device_id)s, %(stream)s, t.seq, t.kind, t.reason, t.detail, t.entry,
       t.fingerprint, %(at)s
FROM json_to_recordset(%(rows)s::json)
     AS t(seq bigint, kind text, reason text, detail text, entry text, fingerprint text)
ON CONFLICT DO NOTHING
RETURNING 1;

-- name: chain
-- One audit chain's state.
SELECT chain, base_seq, base_hash, head_seq, head_hash, state, first_bad_seq, reason,
       broken_at
FROM audit_chains
WHERE device_id = %(device_id)s AND stream = %(stream)s AND chain = %(chain)s;

-- name: chains
-- Every audit chain of a device.
SELECT stream, chain, base_seq, base_hash, head_seq, head_hash, state, first_bad_seq,
       reason, broken_at
FROM audit_chains WHERE device_id = %(device_id)s ORDER BY stream, chain;

-- name: audit_hashes
-- The hashes of some stored rows of a chain.
SELECT seq, hash FROM device_audit
WHERE device_id = %(device_id)s AND stream = %(stream)s AND chain = %(chain)s
  AND seq = ANY(%(seqs)s::bigint[]);

-- name: copy_audit
-- Verified audit rows of a batch, by COPY (the fast path of insert_audit).
COPY device_audit (device_id, stream, chain, seq, run_id, event, step, detail, at,
                   prev_hash, hash, version) FROM STDIN;

-- name: insert_audit
-- A batch of verified audit rows in one statement (one JSON array, parsed by the server).
INSERT INTO device_audit (device_id, stream, chain, seq, run_id, event, step, detail, at,
                          prev_hash, hash, version)
SELECT %(device_id)s, %(stream)s, t.chain, t.seq, t.run_id, t.event, t.step, t.detail, t.at,
       t.prev_hash, t.hash, t.version
FROM json_to_recordset(%(rows)s::json)
     AS t(chain bigint, seq bigint, run_id text, event text, step text, detail jsonb,
          at double precision, prev_hash text, hash text, version integer)
ON CONFLICT DO NOTHING;

-- name: save_chain
-- Create or update an audit chain's state.
INSERT INTO audit_chains (device_id, stream, chain, base_seq, base_hash, head_seq, head_hash,
                          state, first_bad_seq, reason, broken_at, updated_at)
VALUES (%(device_id)s, %(stream)s, %(chain)s, %(base_seq)s, %(base_hash)s, %(head_seq)s,
        %(head_hash)s, %(state)s, %(first_bad_seq)s, %(reason)s, %(broken_at)s, %(at)s)
ON CONFLICT (device_id, stream, chain) DO UPDATE
SET head_seq = excluded.head_seq, head_hash = excluded.head_hash, state = excluded.state,
    first_bad_seq = excluded.first_bad_seq, reason = excluded.reason,
    broken_at = excluded.broken_at, updated_at = excluded.updated_at;

-- name: audit_rows
-- A page of a chain's stored rows, in seq order.
SELECT seq, run_id, event, step, detail, at, prev_hash, hash, chain, version
FROM device_audit
WHERE device_id = %(device_id)s AND stream = %(stream)s AND chain = %(chain)s
  AND seq > %(after_seq)s AND seq <= %(through_seq)s
ORDER BY seq
LIMIT %(limit)s;

-- name: save_heartbeat
-- The device's latest heartbeat and last-seen time.
INSERT INTO device_health (device_id, stream, heartbeat, last_seen_at)
VALUES (%(device_id)s, %(stream)s, %(heartbeat)s, %(at)s)
ON CONFLICT (device_id) DO UPDATE
SET stream = excluded.stream, heartbeat = excluded.heartbeat,
    last_seen_at = excluded.last_seen_at;

-- name: find_commands
-- Which (command_id, seq) pairs are this device's commands.
SELECT command_id, seq FROM commands
WHERE device_id = %(device_id)s AND command_id = ANY(%(command_ids)s::text[]);

-- name: record_command_results
-- Each command's outcome as the device reported it, unless it has one.
UPDATE commands c SET status = r.status, reason = r.reason, result_at = r.at
FROM unnest(%(command_ids)s::text[], %(seqs)s::bigint[], %(statuses)s::text[],
            %(reasons)s::text[], %(ats)s::double precision[])
     AS r(command_id, seq, status, reason, at)
WHERE c.device_id = %(device_id)s AND c.command_id = r.command_id AND c.seq = r.seq
  AND c.status NOT IN ('applied', 'refused');

-- name: take_commands
-- The device's pending commands after a seq, marked delivered, with their envelopes; in
-- the same statement (one round trip, not two), its queued commands past their expiry
-- marked expired: they will never go. The two sets of rows are disjoint (expires_at <=
-- now against > now), so no row is updated twice.
WITH expired AS (
    UPDATE commands SET status = 'expired'
    WHERE device_id = %(device_id)s AND status = 'queued' AND expires_at <= %(now)s
)
UPDATE commands c SET status = 'delivered', delivered_at = coalesce(c.delivered_at, %(now)s)
FROM (SELECT command_id FROM commands
      WHERE device_id = %(device_id)s AND seq > %(after_seq)s
        AND status IN ('queued', 'delivered') AND expires_at > %(now)s
      ORDER BY seq LIMIT %(limit)s) AS p
WHERE c.command_id = p.command_id
RETURNING c.seq, c.envelope;

-- name: next_command_seq
-- Allocate the device's next command seq.
UPDATE devices SET command_seq = command_seq + 1 WHERE device_id = %(device_id)s
RETURNING command_seq;

-- name: add_command
-- A sealed command, queued.
INSERT INTO commands (command_id, device_id, seq, action, envelope, document, created_at,
                      expires_at, batch_id)
VALUES (%(command_id)s, %(device_id)s, %(seq)s, %(action)s, %(envelope)s, %(document)s,
        %(created_at)s, %(expires_at)s, %(batch_id)s);

-- name: target_devices
-- The active devices of a group or a store (the one not NULL), locked, in id order.
SELECT device_id FROM devices
WHERE status = 'active'
  AND (%(group)s::text IS NULL OR group_name = %(group)s::text)
  AND (%(store)s::text IS NULL OR store = %(store)s::text)
ORDER BY device_id
FOR UPDATE;

-- name: lock_devices
-- Which devices of a list are active, locked, in id order.
SELECT device_id FROM devices
WHERE status = 'active' AND device_id = ANY(%(device_ids)s::text[])
ORDER BY device_id
FOR UPDATE;

-- name: cancel_commands
-- Cancel the commands of a list not yet sent (queued), in one statement.
UPDATE commands SET status = 'cancelled', reason = coalesce(reason, 'cancelled before it was sent')
WHERE command_id = ANY(%(command_ids)s::text[]) AND status = 'queued'
RETURNING command_id;

-- name: next_command_seqs
-- Allocate the next command seq of each of some devices.
UPDATE devices SET command_seq = command_seq + 1
WHERE device_id = ANY(%(device_ids)s::text[])
RETURNING device_id, command_seq;

-- name: add_commands
-- Sealed commands of a batch, queued in one statement (one JSON array, in order).
INSERT INTO commands (command_id, device_id, seq, action, envelope, document, created_at,
                      expires_at, batch_id)
SELECT t.command_id, t.device_id, t.seq, t.action, t.envelope, t.document, t.created_at,
       t.expires_at, t.batch_id
FROM ROWS FROM (json_to_recordset(%(rows)s::json)
                AS (command_id text, device_id text, seq bigint, action text,
                    envelope text, document jsonb, created_at double precision,
                    expires_at double precision, batch_id text)) WITH ORDINALITY
     AS t(command_id, device_id, seq, action, envelope, document, created_at, expires_at,
          batch_id, n)
ORDER BY t.n;

-- name: lock_documents
-- Serialise new versions of one document kind until the transaction ends.
SELECT pg_advisory_xact_lock(%(lock)s::integer, hashtext(%(kind)s));

-- name: documents_head
-- The highest version of a document kind (0 if none).
SELECT coalesce(max(version), 0) FROM sync_documents WHERE kind = %(kind)s;

-- name: document
-- One document's content.
SELECT content FROM sync_documents WHERE kind = %(kind)s AND version = %(version)s;

-- name: add_document
-- A new document version.
INSERT INTO sync_documents (kind, version, content, created_at)
VALUES (%(kind)s, %(version)s, %(content)s, %(at)s);
