"""The SQLite file's size and WAL: what keeps a terminal's database inside its budget.

The settings that bound the file (one small function each, with the reason) and the
upkeep a terminal's maintenance pass runs: checkpoints, the size report, giving free
pages back, the integrity check. ``SqliteStore`` applies the settings at open and
inherits the upkeep from ``FileUpkeep``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import apsw

CheckpointMode = Literal["PASSIVE", "FULL", "RESTART", "TRUNCATE"]

#: The WAL is cut back to this size whenever a checkpoint resets it (journal_size_limit).
DEFAULT_WAL_LIMIT_BYTES = 4 * 1024 * 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    busy: bool  # a reader's snapshot kept part of the WAL from being folded in or reset
    wal_frames: int
    checkpointed: int


@dataclass(frozen=True)
class Storage:
    page_size: int
    pages: int  # the database file, in pages
    free_pages: int  # pages in the file that hold nothing (reused, or reclaimed)
    max_pages: int  # the hard budget: past it a write fails with SQLITE_FULL
    wal_bytes: int
    wal_limit_bytes: int

    @property
    def used_bytes(self) -> int:
        return (self.pages - self.free_pages) * self.page_size

    @property
    def file_bytes(self) -> int:
        return self.pages * self.page_size

    @property
    def budget_bytes(self) -> int:
        return self.max_pages * self.page_size


def pragma(conn: apsw.Connection, text: str) -> int:
    value = conn.execute(f"PRAGMA {text}").fetchall()[0][0]
    assert isinstance(value, int), (text, value)
    return value


# --- settings: one function each, with why -------------------------------------------------


def use_incremental_vacuum(conn: apsw.Connection) -> None:
    # Retention frees pages; INCREMENTAL lets ``reclaim()`` give them back to the file
    # system (a terminal's flash is small) without a full VACUUM's copy of the database.
    # The mode is fixed when the first table is created; a database made before it was
    # set is converted once, by a VACUUM. https://www.sqlite.org/pragma.html#pragma_auto_vacuum
    if pragma(conn, "auto_vacuum") == 2:
        return
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    if pragma(conn, "page_count") > 0:
        try:
            conn.execute("VACUUM")
        except apsw.Error as exc:  # e.g. no room for the copy: the database still works
            log.warning("could not convert the database to incremental vacuum: %s", exc)


def limit_wal(conn: apsw.Connection, limit_bytes: int) -> None:
    # After a checkpoint resets the WAL, truncate the file back to this size, so one
    # burst of writes does not keep its space forever. https://www.sqlite.org/pragma.html#pragma_journal_size_limit
    conn.execute(f"PRAGMA journal_size_limit={int(limit_bytes)}")


def set_page_budget(conn: apsw.Connection, max_bytes: int) -> None:
    # A hard cap on the database file: a write past it fails with SQLITE_FULL
    # (StorageFull) and its transaction rolls back whole, like a full disk would.
    size = pragma(conn, "page_size")
    conn.execute(f"PRAGMA max_page_count={max(1, int(max_bytes) // size)}")


# --- upkeep --------------------------------------------------------------------------------


class FileUpkeep:
    """Checkpoints, size and integrity of the store's one file (a mixin of SqliteStore)."""

    path: str
    wal_limit_bytes: int
    _conn: apsw.Connection
    _lock: threading.RLock
    _translate: Callable[[str], contextlib.AbstractContextManager[None]]

    def checkpoint(self, mode: CheckpointMode = "TRUNCATE") -> Checkpoint:
        """Fold the WAL into the database. TRUNCATE (graceful stop, maintenance) also
        empties the WAL file -- unless a reader still holds an older snapshot, which the
        result says (``busy``); PASSIVE never waits for anyone."""
        with self._lock, self._translate("checkpoint"):
            row = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()[0]
            busy, frames, done = cast(tuple[int, int, int], row)
            return Checkpoint(busy=bool(busy), wal_frames=frames, checkpointed=done)

    def storage(self) -> Storage:
        """Pages in use, free pages, the page budget and the WAL's size on disk."""
        with self._lock, self._translate("storage"):
            size = pragma(self._conn, "page_size")
            pages = pragma(self._conn, "page_count")
            free = pragma(self._conn, "freelist_count")
            budget = pragma(self._conn, "max_page_count")
        wal = Path(self.path + "-wal")
        return Storage(
            page_size=size,
            pages=pages,
            free_pages=free,
            max_pages=budget,
            wal_bytes=wal.stat().st_size if wal.exists() else 0,
            wal_limit_bytes=self.wal_limit_bytes,
        )

    def reclaim(self, pages: int | None = None) -> int:
        """Give free pages back to the file system (``auto_vacuum=INCREMENTAL``): all of
        them, or at most ``pages``. Returns how many pages the file shrank by."""
        with self._lock, self._translate("reclaim"):
            before = pragma(self._conn, "page_count")
            arg = "" if pages is None else f"({int(pages)})"
            self._conn.execute(f"PRAGMA incremental_vacuum{arg}").fetchall()
            after = pragma(self._conn, "page_count")
            return before - after

    def integrity_check(self) -> str:
        with self._lock, self._translate("integrity_check"):
            return str(self._conn.execute("PRAGMA integrity_check").fetchall()[0][0])
