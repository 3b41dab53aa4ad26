-- Documents assigned to the fleet, a group, a store or a device, and commands sent to
-- many devices at once (issue 13). Add only: nothing of 0001 changes meaning.

-- Which document version is assigned where: at most one per (kind, scope, value). The
-- effective document of a device is its most specific match (device > store > group >
-- fleet; cloud.documents.scope). ``value`` is the group, store or device id, and ''
-- for the fleet.
CREATE TABLE document_assignments (
    assignment_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          text NOT NULL,
    scope         text NOT NULL CHECK (scope IN ('fleet', 'group', 'store', 'device')),
    value         text NOT NULL,
    version       bigint NOT NULL,
    assigned_at   double precision NOT NULL,
    assigned_by   text NOT NULL,
    CHECK ((scope = 'fleet') = (value = '')),
    UNIQUE (kind, scope, value),
    FOREIGN KEY (kind, version) REFERENCES sync_documents (kind, version)
);

-- A command sent to a group or a store is one command per device, all with one
-- batch id; ``command_no`` orders every command by when it was made (the lists' cursor).
ALTER TABLE commands ADD COLUMN batch_id text;
ALTER TABLE commands ADD COLUMN command_no bigint GENERATED ALWAYS AS IDENTITY;

CREATE UNIQUE INDEX commands_by_no ON commands (command_no);
CREATE INDEX commands_by_batch ON commands (batch_id, command_no) WHERE batch_id IS NOT NULL;
CREATE INDEX commands_by_device ON commands (device_id, command_no);
-- what the expiry sweep looks at: commands still waiting, by when they expire
CREATE INDEX commands_pending_expiry ON commands (expires_at)
    WHERE status IN ('queued', 'delivered');
