"""Power loss: an apsw VFS that forgets every write a file had not synced when power goes.

``PowerLossVFS`` wraps a real VFS (``base``, the default one unless named). Every file
opened through it -- main database, WAL, rollback journal -- writes straight to the real
file, but first remembers what it overwrote: the bytes under each ``xWrite`` and the
tail cut by each ``xTruncate`` (an undo log per path). ``xSync`` makes the file's log
empty: what was written so far is now durable. ``cut_power()`` undoes, newest first,
every write since each file's last sync, so the real file holds exactly what "the disk"
kept; with ``tear=True`` the newest unsynced write of each file survives in part, a
random whole number of sectors from its start, as a write cut short on the platter.

After a cut the connections on this VFS are dead: any further ``xWrite``, ``xTruncate``,
``xSync``, ``xDelete`` or ``xOpen`` raises ``apsw.IOError``, so closing them writes
nothing (a closing connection's checkpoint fails and the WAL is kept). Close them, then
reopen the database with any VFS, e.g. the default one.

Code that opens its own connection without a ``vfs=`` (``SqliteStore``) can be put on
this VFS with ``makedefault=True``; unregister it once those connections are closed.

The model is kind to the disk in one way: writes are never reordered, so a file's
durable state is always a prefix of its history. A deleted file is gone for good (the
delete is treated as durable). The ``-shm`` wal-index is not opened through ``xOpen``
(the unix VFS maps it itself), so its writes are not logged; SQLite rebuilds it from
the WAL when the first connection opens the database again, so nothing is lost.

Disk full: set ``free_bytes`` (e.g. to 0 from ``on_event`` at a chosen event) and a
write that would grow a file beyond it fails with ``SQLITE_FULL``, as a full flash
would; ``full_errors`` counts them. Set it back to None to "free the disk".

``on_event(kind, path, n)`` is called after each write, truncate and sync has reached
the real file (``kind`` is ``"write"``, ``"truncate"`` or ``"sync"``; ``n`` counts the
events of all files, from 1): a test sweeping crash points calls ``vfs.cut_power()``
from it at event N. Per-path counts are in ``writes``, ``truncates`` and ``syncs``.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apsw

__all__ = ["PowerLossFile", "PowerLossVFS", "close_after_cut"]

_RESTORE_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Undo:
    """One unsynced change: restore ``old`` at ``offset`` and the size ``old_size``."""

    kind: str  # "write" | "truncate"
    offset: int
    old: bytes
    old_size: int
    data: bytes = b""  # what a write wrote, for tearing


def _name_of(name: str | apsw.URIFilename | None) -> str | None:
    if isinstance(name, apsw.URIFilename):
        return name.filename()
    return name


class PowerLossFile(apsw.VFSFile):
    def __init__(self, vfs: PowerLossVFS, name: Any, flags: list[int]) -> None:
        super().__init__(vfs.base, name, flags)
        self._vfs = vfs
        self.path = _name_of(name)
        self.dead = False

    def _check_alive(self, what: str) -> None:
        if self.dead:
            raise apsw.IOError(f"{what} after power cut: {self.path}")

    def xWrite(self, data: Any, offset: int) -> None:
        self._check_alive("write")
        data = bytes(data)
        if self.path is None:  # temp file: nothing to survive anyway
            super().xWrite(data, offset)
            return
        with self._vfs._lock:
            size = super().xFileSize()
            self._vfs._allocate(self.path, max(0, offset + len(data) - size))
            end = min(offset + len(data), size)
            old = super().xRead(end - offset, offset) if end > offset else b""
            super().xWrite(data, offset)
            self._vfs._record(self.path, "write", _Undo("write", offset, old, size, data))

    def xTruncate(self, newsize: int) -> None:
        self._check_alive("truncate")
        if self.path is None:
            super().xTruncate(newsize)
            return
        with self._vfs._lock:
            size = super().xFileSize()
            old = super().xRead(size - newsize, newsize) if newsize < size else b""
            super().xTruncate(newsize)
            self._vfs._release(max(0, size - newsize))
            self._vfs._record(self.path, "truncate", _Undo("truncate", newsize, old, size))

    def xSync(self, flags: int) -> None:
        self._check_alive("sync")
        super().xSync(flags)
        if self.path is not None:
            with self._vfs._lock:
                self._vfs._synced(self.path)

    def xClose(self) -> None:
        with self._vfs._lock:
            self._vfs._open_files.get(self.path, set()).discard(self)
        super().xClose()

    # --- used by the cut, on the real file, bypassing the checks above --------------

    def _raw_write(self, data: bytes, offset: int) -> None:
        apsw.VFSFile.xWrite(self, data, offset)

    def _raw_truncate(self, size: int) -> None:
        apsw.VFSFile.xTruncate(self, size)

    def _raw_size(self) -> int:
        return int(apsw.VFSFile.xFileSize(self))


class PowerLossVFS(apsw.VFS):
    def __init__(
        self,
        name: str = "powerloss",
        base: str = "",
        on_event: Callable[[str, str, int], object] | None = None,
        makedefault: bool = False,
    ) -> None:
        self.vfs_name = name
        # Resolved now: once this VFS is the default, "" would name this VFS itself.
        self.base = base or apsw.vfs_names()[0]
        self.on_event = on_event
        self.writes: Counter[str] = Counter()
        self.truncates: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.events = 0
        self.cut = False
        #: Bytes the "disk" has left for files to grow into; None: unlimited. A write
        #: that would grow a file past it fails with SQLITE_FULL (apsw.FullError) and
        #: changes nothing; overwriting within a file's size, or truncating, is free.
        self.free_bytes: int | None = None
        self.full_errors = 0
        self._lock = threading.RLock()
        self._pending: dict[str, list[_Undo]] = {}
        self._open_files: dict[str | None, set[PowerLossFile]] = {}
        super().__init__(name, base, makedefault=makedefault)

    # --- VFS ---------------------------------------------------------------------

    def xOpen(self, name: Any, flags: list[int]) -> PowerLossFile:
        if self.cut:
            raise apsw.IOError(f"open after power cut: {_name_of(name)}")
        f = PowerLossFile(self, name, flags)
        with self._lock:
            self._open_files.setdefault(f.path, set()).add(f)
        return f

    def xDelete(self, filename: str, syncdir: bool) -> None:
        if self.cut:
            raise apsw.IOError(f"delete after power cut: {filename}")
        super().xDelete(filename, syncdir)
        with self._lock:
            self._pending.pop(filename, None)

    # --- bookkeeping ---------------------------------------------------------------

    def _record(self, path: str, kind: str, undo: _Undo) -> None:
        self._pending.setdefault(path, []).append(undo)
        (self.writes if kind == "write" else self.truncates)[path] += 1
        self._event(kind, path)

    def _allocate(self, path: str, growth: int) -> None:
        if self.free_bytes is None or growth == 0:
            return
        if growth > self.free_bytes:
            self.full_errors += 1
            raise apsw.FullError(f"disk full (simulated): {path} needs {growth} more bytes")
        self.free_bytes -= growth

    def _release(self, freed: int) -> None:
        if self.free_bytes is not None:
            self.free_bytes += freed

    def _synced(self, path: str) -> None:
        self._pending.pop(path, None)
        self.syncs[path] += 1
        self._event("sync", path)

    def _event(self, kind: str, path: str) -> None:
        self.events += 1
        if self.on_event is not None and not self.cut:
            self.on_event(kind, path, self.events)

    def pending(self, path: str) -> int:
        """How many changes to ``path`` a power cut now would drop."""
        with self._lock:
            return len(self._pending.get(path, ()))

    # --- the cut -------------------------------------------------------------------

    def cut_power(
        self, tear: bool = False, sector: int = 512, rng: random.Random | None = None
    ) -> dict[str, int]:
        """Drop every change since each file's last sync; returns how many per path.

        ``tear``: keep a prefix of each file's newest unsynced write, a random whole
        number of ``sector``-sized sectors (possibly none, never all of a write that
        spans sector boundaries). Idempotent: a second cut finds nothing to drop.
        """
        rng = random.Random(0) if rng is None else rng
        with self._lock:
            self.cut = True
            for files in self._open_files.values():
                for f in files:
                    f.dead = True
            dropped: dict[str, int] = {}
            for path in sorted(self._pending):
                log = self._pending[path]
                if not log:
                    continue
                dropped[path] = len(log)
                torn = log[-1] if tear and log[-1].kind == "write" else None
                with _RawFile(self, path) as raw:
                    for undo in reversed(log):
                        raw.write(undo.old, undo.offset)
                        raw.truncate(undo.old_size)
                    if torn is not None:
                        keep = _torn_prefix(torn.offset, len(torn.data), sector, rng)
                        if keep:
                            raw.write(torn.data[:keep], torn.offset)
            self._pending.clear()
            return dropped


def _torn_prefix(offset: int, length: int, sector: int, rng: random.Random) -> int:
    """Bytes of a write at ``offset`` that reached the disk: up to a sector boundary."""
    first = (offset // sector + 1) * sector
    cuts = [0, *(b - offset for b in range(first, offset + length, sector))]
    return rng.choice(cuts)


class _RawFile:
    """The real file under ``path``: through an open VFS file when there is one (a
    separate descriptor closed later would drop the process's POSIX locks on it),
    otherwise through a file of the base VFS opened just for the repair."""

    def __init__(self, vfs: PowerLossVFS, path: str) -> None:
        self._vfs = vfs
        self._path = path
        self._own: apsw.VFSFile | None = None
        files = vfs._open_files.get(path)
        self._file: PowerLossFile | None = next(iter(files)) if files else None

    def __enter__(self) -> _RawFile:
        if self._file is None:
            flags = [apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_MAIN_JOURNAL, 0]
            self._own = apsw.VFSFile(self._vfs.base, self._path, flags)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            self._own.xClose()

    def write(self, data: bytes, offset: int) -> None:
        # In pieces: the unix VFS writes at most 128 KiB per xWrite and fails a longer
        # one part-way (SQLITE_FULL), which would leave an undone WAL truncate half
        # restored -- a corruption of the tool's making, not SQLite's.
        for start in range(0, len(data), _RESTORE_CHUNK):
            piece = data[start : start + _RESTORE_CHUNK]
            if self._file is not None:
                self._file._raw_write(piece, offset + start)
            else:
                assert self._own is not None
                self._own.xWrite(piece, offset + start)

    def truncate(self, size: int) -> None:
        if self._file is not None:
            if self._file._raw_size() != size:
                self._file._raw_truncate(size)
        else:
            assert self._own is not None
            if self._own.xFileSize() != size:
                self._own.xTruncate(size)


def close_after_cut(conn: apsw.Connection) -> None:
    """Close a connection whose power was cut. Its closing checkpoint fails on the dead
    files (so nothing reaches the disk) and ``close`` reports that failure, but the
    connection is closed all the same."""
    with contextlib.suppress(apsw.IOError):
        conn.close()
