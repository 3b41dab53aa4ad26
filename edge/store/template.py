"""New terminal databases copied from one migrated database, not each migrated anew.

Making a ``SqliteStore`` on a new file runs every migration, each its own write
transaction: about 5 ms of the ~9 ms a simulated terminal costs to make, the same work
for every database a process makes. A process that makes many (the fleet simulator's
thousands of terminals, a test suite) calls ``share_new_databases()`` once; from then on a
``SqliteStore`` opened with ``migrate=True`` on a path that does not exist yet (and no
custom VFS) starts from this process's template: one database migrated once
(``DatabaseTemplate``, built on first use with the same ``SqliteStore`` code), whose bytes
are written beside the new path, given their own stream id, then linked into place.
``SqliteStore`` then opens it as it opens any database: the connection settings are
applied, and ``migrate`` finds nothing to do.

What must not be shared is drawn again for each copy: the database's stream id
(``database_meta.stream``, migration 0006), by which the sync protocol tells one
database's outbox seqs from another's (DESIGN.md invariant 9: a new database is a new
stream). The template holds a placeholder there, 32 hex digits drawn for this process,
found exactly once in its bytes (its old value zeroed by ``secure_delete``); each copy's
bytes have it replaced by a new draw of the same length before they are written. A TEXT
value replaced in place by one of the same length leaves the record, its page and the
file as valid as they were (SQLite keeps no page checksums; the column is not indexed),
and costs nothing: a second connection to draw it by SQL cost 1.5 ms a copy, the whole
copy is 0.15 ms.

The copy is made under a temporary name and linked to the path (``os.link`` fails if the
path exists): two openers racing on one new path never replace each other's file, and a
crash mid-copy leaves only the temporary file. With ``durable`` (synchronous FULL or
EXTRA) the file and its directory are fsynced, as SQLite would have synced its own first
commits.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import apsw

#: Makes a migrated, empty database at a path (``SqliteStore``'s own migration).
Migrate = Callable[[Path], None]

__all__ = ["DatabaseTemplate", "Migrate", "share_new_databases", "shared", "stop_sharing"]

_SECURE_DELETE = "PRAGMA secure_delete=ON"
#: Migration 0006 drew the template's stream id; this replaces it with the placeholder.
_SET_STREAM = "UPDATE database_meta SET value = ? WHERE key = 'stream'"
_STREAM_CHARS = 32  # lower(hex(randomblob(16))), as migration 0006 draws it


class DatabaseTemplate:
    """One migrated, empty database's bytes, and ``make(path)`` a copy of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._image: tuple[bytes, int] | None = None

    def image(self, migrate: Migrate) -> tuple[bytes, int]:
        """The template's bytes and the offset of their stream id's placeholder, built
        on first use by ``migrate`` (which makes a migrated database at a path: the
        store's own code) in a scratch directory."""
        with self._lock:
            if self._image is None:
                self._image = _build(migrate)
            return self._image

    def make(
        self, path: str | os.PathLike[str], migrate: Migrate, *, durable: bool = False
    ) -> bool:
        """Write a new database at ``path`` from the template (built by ``migrate`` on
        first use), with a stream id of its own; False (nothing written) if ``path``
        exists already."""
        image, at = self.image(migrate)
        copy = bytearray(image)
        copy[at : at + _STREAM_CHARS] = secrets.token_hex(_STREAM_CHARS // 2).encode("ascii")
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.new")
        try:
            with open(tmp, "xb") as f:
                f.write(copy)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            if durable:
                _fsync_dir(target.parent)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _build(migrate: Migrate) -> tuple[bytes, int]:
    placeholder = secrets.token_hex(_STREAM_CHARS // 2)
    scratch = Path(tempfile.mkdtemp(prefix="tillflow-template-"))
    try:
        path = scratch / "template.db"
        migrate(path)
        db = apsw.Connection(str(path))
        try:
            db.execute(_SECURE_DELETE)
            db.execute(_SET_STREAM, (placeholder,))
        finally:
            db.close()  # the last connection: the WAL is folded in and removed
        image = path.read_bytes()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mark = placeholder.encode("ascii")
    if image.count(mark) != 1:  # drawn for this process: more than once cannot happen
        raise RuntimeError(f"the template holds its stream placeholder {image.count(mark)} times")
    return image, image.index(mark)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_shared: DatabaseTemplate | None = None


def share_new_databases() -> DatabaseTemplate:
    """From now on, in this process, new ``SqliteStore`` databases are copies of one
    template (module docstring); the template (made once, built on first use)."""
    global _shared
    if _shared is None:
        _shared = DatabaseTemplate()
    return _shared


def stop_sharing() -> None:
    """New databases are migrated one by one again (the default)."""
    global _shared
    _shared = None


def shared() -> DatabaseTemplate | None:
    """The process's template, if ``share_new_databases`` was called."""
    return _shared
