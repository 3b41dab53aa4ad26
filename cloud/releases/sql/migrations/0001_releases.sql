-- Terminal releases (issue 14's ReleaseRollout, issue 17's delta updates): each uploaded
-- bundle (`make bundle`'s tar.gz), verified with the release key before anything is
-- stored, kept as its signed file list and its files by content hash. A file's bytes
-- are stored once however many releases hold it (release_blobs), so a device that has
-- release A and is told to install B fetches only what B adds. Versioned apart
-- (releases_schema_migrations). Times are Unix seconds (double precision).

CREATE TABLE release_blobs (
    sha256   text PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size     bigint NOT NULL CHECK (size >= 0),
    content  bytea NOT NULL,
    CHECK (octet_length(content) = size)
);

CREATE TABLE releases (
    -- the release as the binary names itself (its heartbeat's binary_version): VERSION
    release         text PRIMARY KEY,
    -- SHA-256 of SHA256SUMS, the text the signature covers: what ReleaseContent names
    manifest_sha256 text NOT NULL UNIQUE CHECK (manifest_sha256 ~ '^[0-9a-f]{64}$'),
    sums            text NOT NULL,
    -- the raw 64-byte Ed25519 signature of sums (SHA256SUMS.sig)
    signature       bytea NOT NULL CHECK (octet_length(signature) = 64),
    files           integer NOT NULL CHECK (files >= 1),
    bytes           bigint NOT NULL CHECK (bytes >= 0),
    -- bytes of this release's files that no release uploaded before it held
    new_bytes       bigint NOT NULL CHECK (new_bytes >= 0),
    uploaded_at     double precision NOT NULL,
    uploaded_by     text NOT NULL,
    -- every release in the order it came: the list's cursor
    release_no      bigint GENERATED ALWAYS AS IDENTITY
);

CREATE UNIQUE INDEX releases_by_no ON releases (release_no);

CREATE TABLE release_files (
    release  text NOT NULL REFERENCES releases (release) ON DELETE CASCADE,
    -- the path inside the bundle, as SHA256SUMS lists it (tillflow-edge/_internal/...)
    path     text NOT NULL,
    sha256   text NOT NULL REFERENCES release_blobs (sha256),
    size     bigint NOT NULL CHECK (size >= 0),
    -- the file's permission bits in the bundle (0755 for executables, else 0644)
    mode     integer NOT NULL CHECK (mode >= 0 AND mode <= 4095),
    PRIMARY KEY (release, path)
);

CREATE INDEX release_files_by_sha256 ON release_files (sha256);
