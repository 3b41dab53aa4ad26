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
