-- Sync (issue 12), as in the SQLite store: the database's own id, the commands the
-- control plane sent, and the documents they brought into force.

-- stream: drawn once, when the database is created (here: when this migration runs on
-- it), never changed. A database cloned from a template copies its template's.
CREATE TABLE database_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

INSERT INTO database_meta (key, value)
VALUES ('stream', md5(random()::text || clock_timestamp()::text));

-- One row per command seq taken, applied or refused: the seq only grows.
CREATE TABLE command_ledger (
    seq        bigint PRIMARY KEY,
    command_id text NOT NULL UNIQUE,
    action     text NOT NULL,
    status     text NOT NULL CHECK (status IN ('applied', 'refused')),
    reason     text,
    issued_at  double precision NOT NULL,
    at         double precision NOT NULL
);

-- Config and policy documents; the highest version of a kind is in force.
CREATE TABLE documents (
    kind        text NOT NULL,
    version     bigint NOT NULL,
    content     jsonb NOT NULL,
    command_seq bigint NOT NULL REFERENCES command_ledger (seq),
    at          double precision NOT NULL,
    PRIMARY KEY (kind, version)
);
