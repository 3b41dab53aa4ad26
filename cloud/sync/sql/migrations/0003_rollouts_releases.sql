-- What rollouts and releases need of the sync tables (issue 14). Add only: nothing of
-- 0001/0002 changes meaning.

-- A release is a document too (``install_release`` carries it; its content is
-- sync.wire.ReleaseContent), versioned like config and policy: versions only grow, and
-- a rollback is a new version with the old content.
ALTER TABLE sync_documents DROP CONSTRAINT sync_documents_kind_check;
ALTER TABLE sync_documents ADD CONSTRAINT sync_documents_kind_check
    CHECK (kind IN ('config', 'policy', 'release'));

-- A version withdrawn by a rollout's compensation: kept (the audit trail and the
-- "versions only grow" rule need its number taken), never assigned or sent again.
ALTER TABLE sync_documents ADD COLUMN withdrawn_at double precision;

-- A command taken back before a device was sent it (a rollout that aborts cancels
-- what it had not delivered): never sent; a result for it is still recorded.
ALTER TABLE commands DROP CONSTRAINT commands_status_check;
ALTER TABLE commands ADD CONSTRAINT commands_status_check
    CHECK (status IN ('queued', 'delivered', 'applied', 'refused', 'expired', 'cancelled'));
