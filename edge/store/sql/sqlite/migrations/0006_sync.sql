-- Sync (issue 12): the database's own id, the commands the control plane sent, and the
-- documents they brought into force.

-- stream: drawn once, when the database is created (here: when this migration runs on
-- it), never changed. The sync protocol keys every outbox entry by (device, stream,
-- seq): a re-flashed or replaced database is a new stream, so its seqs never collide.
CREATE TABLE database_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

INSERT INTO database_meta (key, value) VALUES ('stream', lower(hex(randomblob(16))));

-- One row per command seq taken, applied or refused (DESIGN.md invariant 8): the seq
-- only grows (a replayed or older command gets no row), and issued_at, a time the
-- control plane signed, is the terminal's trusted time.
CREATE TABLE command_ledger (
    seq        INTEGER PRIMARY KEY,
    command_id TEXT NOT NULL UNIQUE,
    action     TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('applied', 'refused')),
    reason     TEXT,
    issued_at  REAL NOT NULL,
    at         REAL NOT NULL
) STRICT;

-- Config and policy documents, by kind and a version that only grows (a rollback is a
-- new version with the old content); the highest version of a kind is in force.
CREATE TABLE documents (
    kind        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    content     TEXT NOT NULL,
    command_seq INTEGER NOT NULL REFERENCES command_ledger (seq),
    at          REAL NOT NULL,
    PRIMARY KEY (kind, version)
) STRICT;
