"""The SQLite store (apsw, WAL): the terminal's persistence.

One writer connection guarded by a lock; every write is one ``BEGIN IMMEDIATE``
transaction. Connection settings are one small function each, with the reason.
Driver errors are translated here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import apsw

from edge.engine.audit import GENESIS, link
from edge.engine.records import (
    Acknowledgement,
    AckResult,
    Commit,
    Compaction,
    Guard,
    RunRecord,
)
from edge.errors import LeaseLost, MigrationError, StorageFull, StoreError
from edge.store import rows as rowmap
from edge.store.base import (
    OUTBOX_COUNTER,
    RowReads,
    acknowledge_in,
    compact_in,
    guard_params,
    guard_refused,
)
from edge.store.queries import load_migrations, load_queries

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
CheckpointMode = Literal["PASSIVE", "FULL", "RESTART", "TRUNCATE"]

#: The WAL is cut back to this size whenever a checkpoint resets it (journal_size_limit).
DEFAULT_WAL_LIMIT_BYTES = 4 * 1024 * 1024

#: Milliseconds a writer waits for the lock before giving up: long enough to ride out a
#: checkpoint or a second process (the CLI beside the daemon), short enough to surface.
DEFAULT_BUSY_TIMEOUT_MS = 5_000

_QUERIES = load_queries("sqlite")

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


#: Built once: ``json.dumps`` with options constructs a new encoder on every call.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# --- connection settings: one function each, with why -----------------------------------


def _use_wal(conn: apsw.Connection) -> None:
    # WAL: readers never block the writer, and a commit is one sequential append.
    # https://www.sqlite.org/wal.html
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
    if str(mode).lower() != "wal":
        raise StoreError(f"cannot enable WAL (journal_mode={mode})", operation="open")


def _set_synchronous(conn: apsw.Connection, level: Synchronous) -> None:
    # FULL (default): a committed payment survives power loss. NORMAL in WAL mode may
    # lose the last commits on power loss but never corrupts. https://www.sqlite.org/pragma.html#pragma_synchronous
    conn.execute(f"PRAGMA synchronous={level}")


def _pragma(conn: apsw.Connection, text: str) -> int:
    value = conn.execute(f"PRAGMA {text}").fetchall()[0][0]
    assert isinstance(value, int), (text, value)
    return value


def _use_incremental_vacuum(conn: apsw.Connection) -> None:
    # Retention frees pages; INCREMENTAL lets ``reclaim()`` give them back to the file
    # system (a terminal's flash is small) without a full VACUUM's copy of the database.
    # The mode is fixed when the first table is created; a database made before it was
    # set is converted once, by a VACUUM. https://www.sqlite.org/pragma.html#pragma_auto_vacuum
    if _pragma(conn, "auto_vacuum") == 2:
        return
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    if _pragma(conn, "page_count") > 0:
        try:
            conn.execute("VACUUM")
        except apsw.Error as exc:  # e.g. no room for the copy: the database still works
            log.warning("could not convert the database to incremental vacuum: %s", exc)


def _limit_wal(conn: apsw.Connection, limit_bytes: int) -> None:
    # After a checkpoint resets the WAL, truncate the file back to this size, so one
    # burst of writes does not keep its space forever. https://www.sqlite.org/pragma.html#pragma_journal_size_limit
    conn.execute(f"PRAGMA journal_size_limit={int(limit_bytes)}")


def _set_page_budget(conn: apsw.Connection, max_bytes: int) -> None:
    # A hard cap on the database file: a write past it fails with SQLITE_FULL
    # (StorageFull) and its transaction rolls back whole, like a full disk would.
    size = _pragma(conn, "page_size")
    conn.execute(f"PRAGMA max_page_count={max(1, int(max_bytes) // size)}")


def _enforce_foreign_keys(conn: apsw.Connection) -> None:
    # Off by default in SQLite, for backward compatibility only.
    conn.execute("PRAGMA foreign_keys=ON")


def _set_busy_timeout(conn: apsw.Connection, ms: int) -> None:
    # Without it a second connection fails at once with SQLITE_BUSY instead of waiting.
    conn.set_busy_timeout(ms)


class SqliteStore(RowReads):
    """Store on one SQLite file. Thread-safe: one lock serialises all use of the connection."""

    dialect = "sqlite"

    @staticmethod
    def _decode(value: Any) -> Any:
        return _loads(value)

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        migrate: bool = True,
        outbox_max_messages: int | None = None,
        outbox_max_bytes: int | None = None,
        vfs: str | None = None,
        max_bytes: int | None = None,
        wal_limit_bytes: int = DEFAULT_WAL_LIMIT_BYTES,
    ) -> None:
        """``outbox_max_*``: bound the outbox (the terminal's store-and-forward queue). A
        step whose messages would pass a bound is refused in its own transaction
        (LimitExceeded, reason ``outbox_full``); acknowledging messages makes room.

        ``vfs``: the name of a registered apsw VFS to open the file through (the crash
        tests use ``hwsim.powerloss``); the platform default when None.

        ``max_bytes``: the database file's hard budget (``max_page_count``); a write past
        it raises StorageFull and commits nothing. ``wal_limit_bytes``: the size a
        checkpoint truncates the WAL back to."""
        self.wal_limit_bytes = wal_limit_bytes
        self.path = str(path)
        self.outbox_bound = (
            Guard(
                OUTBOX_COUNTER,
                max_amount=outbox_max_bytes,
                max_count=outbox_max_messages,
                reason="outbox_full",
            )
            if outbox_max_messages is not None or outbox_max_bytes is not None
            else None
        )
        self._lock = threading.RLock()
        try:
            self._conn = (
                apsw.Connection(self.path) if vfs is None else apsw.Connection(self.path, vfs=vfs)
            )
        except apsw.Error as exc:
            raise StoreError(
                f"cannot open database: {exc}",
                operation="open",
                path=self.path,
                hint="check that the directory exists and is writable",
            ) from exc
        try:
            with self._translate("open"):
                _set_busy_timeout(self._conn, busy_timeout_ms)
                _use_incremental_vacuum(self._conn)
                _use_wal(self._conn)
                _limit_wal(self._conn, wal_limit_bytes)
                _set_synchronous(self._conn, synchronous)
                _enforce_foreign_keys(self._conn)
            if migrate:
                self.migrate()
            if max_bytes is not None:
                with self._translate("open"):
                    _set_page_budget(self._conn, max_bytes)
        except BaseException:
            self._conn.close()
            raise

    # --- plumbing ------------------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self, operation: str) -> Iterator[None]:
        try:
            yield
        except apsw.FullError as exc:
            raise StorageFull(
                "the database is full; new work is declined, nothing committed was lost",
                operation=operation,
                path=self.path,
                hint="free disk space or raise the size budget",
            ) from exc
        except (apsw.BusyError, apsw.LockedError) as exc:
            raise StoreError(
                f"database is busy: {exc}", operation=operation, path=self.path, retryable=True
            ) from exc
        except apsw.Error as exc:
            raise StoreError(
                f"{type(exc).__name__}: {exc}", operation=operation, path=self.path
            ) from exc

    @contextlib.contextmanager
    def _tx(self, operation: str) -> Iterator[apsw.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front, so two
        writers serialise here instead of failing mid-transaction."""
        with self._lock, self._translate(operation):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                # SQLITE_FULL (and some I/O errors) may have rolled the transaction back
                # already; a second ROLLBACK would fail and hide the real error.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT leaves it open
                    self._conn.execute("ROLLBACK")
                raise

    def _q(self, name: str, params: Mapping[str, Any] | None = None) -> apsw.Cursor:
        return self._conn.execute(_QUERIES[name], params or {})

    def _rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock, self._translate(name):
            cur = self._q(name, params)
            try:
                cols = [d[0] for d in cur.get_description()]
            except apsw.ExecutionCompleteError:
                return []
            return [dict(zip(cols, row, strict=True)) for row in cur]

    def _txq(self, name: str, params: Mapping[str, Any]) -> tuple[list[dict[str, Any]], int]:
        # Inside a transaction (the lock is reentrant); changes() counts the rows a
        # statement changed, which is all the shared statements read it for.
        return self._rows(name, params), int(self._conn.changes())

    def _scalar(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        with self._lock, self._translate(name):
            row = self._q(name, params).fetchone()
            return None if row is None else row[0]

    # --- schema --------------------------------------------------------------------

    def migrate(self) -> int:
        with self._tx("migrate"):
            self._q("create_migrations_table")
        current = self.schema_version()
        migrations = load_migrations(self.dialect)
        if current > len(migrations):
            raise MigrationError(
                f"database schema version {current} is newer than this build knows "
                f"({len(migrations)})",
                operation="migrate",
                path=self.path,
                hint="upgrade tillflow, or restore the matching database backup",
            )
        for mig in migrations[current:]:
            try:
                with self._tx(f"migrate {mig.version:04d}_{mig.name}") as conn:
                    # Re-read under the write lock: another process (the daemon beside
                    # the CLI) may have applied it since.
                    if int(self._q("schema_version").get) >= mig.version:
                        continue
                    conn.execute(mig.sql)
                    self._q(
                        "record_migration",
                        {"version": mig.version, "name": mig.name, "at": time.time()},
                    )
            except StoreError as exc:
                raise MigrationError(
                    f"migration {mig.version:04d}_{mig.name} failed: {exc.message}",
                    operation="migrate",
                    path=self.path,
                ) from exc
        return self.schema_version()

    # --- definitions ---------------------------------------------------------------

    def save_definition(
        self, content_hash: str, workflow_type: str, version: str, snapshot: str, at: float
    ) -> None:
        with self._tx("save_definition"):
            self._q(
                "save_definition",
                {
                    "content_hash": content_hash,
                    "workflow_type": workflow_type,
                    "version": version,
                    "snapshot": snapshot,
                    "at": at,
                },
            )

    # --- runs ----------------------------------------------------------------------

    def start(self, commit: Commit) -> tuple[str, bool]:
        key = commit.run.idempotency_key
        with self._tx("start"):
            if key is not None:
                existing = self._q("run_by_idempotency_key", {"idempotency_key": key}).fetchone()
                if existing is not None:
                    return str(existing[0]), False
            self._apply(commit, insert=True)
        return commit.run.run_id, True

    def commit(self, commit: Commit) -> None:
        with self._tx("commit"):
            self._apply(commit, insert=False)

    def _apply(self, c: Commit, *, insert: bool) -> None:
        if insert:
            self._insert_run(c.run)
        else:
            self._q(
                "update_run",
                {**rowmap.run_params(c.run, _dumps), "expected_revision": c.expected_revision},
            )
            if self._conn.changes() != 1:
                raise LeaseLost(
                    f"run {c.run.run_id} changed under us (expected revision "
                    f"{c.expected_revision}); this outcome was not committed",
                    operation="commit",
                    path=self.path,
                )
        guards = list(c.guards)
        if self.outbox_bound is not None and c.outbox:
            size = sum(len(_dumps(m.payload)) for m in c.outbox)
            guards.append(replace(self.outbox_bound, amount=size, count=len(c.outbox)))
        for guard in guards:  # first: a refused guard leaves nothing to undo
            params = guard_params(guard, c.run.updated_at)
            self._q("ensure_counter", params)
            self._q("apply_counter", params)
            if self._conn.changes() != 1:
                raise guard_refused(guard)
        for child in c.new_runs:
            self._insert_run(child)
        for step in c.steps:
            self._q("insert_step", rowmap.step_params(step, _dumps))
            step.seq = self._conn.last_insert_rowid()
        if c.audit:
            head = self._q("audit_head").fetchone()
            seq, prev = (int(head[0]), str(head[1])) if head else (0, GENESIS)
            for ev in c.audit:
                seq += 1
                digest = link(prev, seq, ev)
                self._q("insert_audit", rowmap.audit_params(seq, ev, prev, digest, _dumps))
                prev = digest
            self._q("set_audit_head", {"seq": seq, "hash": prev})
        for msg in c.outbox:
            self._q("insert_outbox", rowmap.outbox_params(msg, _dumps))
            msg.seq = self._conn.last_insert_rowid()
        for parent in c.wake:
            self._q("wake_run", {"run_id": parent, "at": c.run.updated_at})

    def _insert_run(self, run: RunRecord) -> None:
        params = rowmap.run_params(run, _dumps)
        self._q("insert_run", params)
        # The state usually starts as the input: encode it once.
        text = params["state"] if run.input == run.state else _dumps(run.input)
        self._q("insert_run_input", {"run_id": run.run_id, "input": text})

    def claim(
        self, run_id: str, expected_revision: int, owner: str, lease_expires_at: float
    ) -> RunRecord | None:
        with self._tx("claim"):
            self._q(
                "claim_run",
                {
                    "run_id": run_id,
                    "expected_revision": expected_revision,
                    "owner": owner,
                    "lease_expires_at": lease_expires_at,
                },
            )
            if self._conn.changes() != 1:
                return None
        return self.get_run(run_id)

    def claim_due(
        self, owner: str, now: float, lease_expires_at: float, limit: int
    ) -> list[RunRecord]:
        params = {"owner": owner, "now": now, "lease_expires_at": lease_expires_at, "limit": limit}
        with self._tx("claim_due"):
            ids = [row[0] for row in self._q("claim_due", params)]
        runs = [self.get_run(run_id) for run_id in ids]
        return [r for r in runs if r is not None]

    def renew_lease(self, run_id: str, owner: str, lease_expires_at: float) -> bool:
        with self._tx("renew_lease"):
            self._q(
                "renew_lease",
                {"run_id": run_id, "owner": owner, "lease_expires_at": lease_expires_at},
            )
            return bool(self._conn.changes() == 1)

    def acknowledge(self, ack: Acknowledgement) -> AckResult:
        with self._tx("acknowledge"):
            return acknowledge_in(self._txq, ack, outbox_bound=self.outbox_bound, at=time.time())

    def compact(
        self,
        *,
        before: float,
        counter_prefix: str | None = None,
        counters_before: float | None = None,
    ) -> Compaction:
        with self._tx("compact"):
            return compact_in(
                self._txq,
                run_ids=_dumps,
                before=before,
                counter_prefix=counter_prefix,
                counters_before=counters_before,
            )

    def checkpoint(self, mode: CheckpointMode = "TRUNCATE") -> Checkpoint:
        """Fold the WAL into the database. TRUNCATE (graceful stop, maintenance) also
        empties the WAL file -- unless a reader still holds an older snapshot, which the
        result says (``busy``); PASSIVE never waits for anyone."""
        with self._lock, self._translate("checkpoint"):
            row = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()[0]
            busy, frames, done = cast(tuple[int, int, int], row)
            return Checkpoint(busy=bool(busy), wal_frames=frames, checkpointed=done)

    # --- size ----------------------------------------------------------------------

    def storage(self) -> Storage:
        """Pages in use, free pages, the page budget and the WAL's size on disk."""
        with self._lock, self._translate("storage"):
            size = _pragma(self._conn, "page_size")
            pages = _pragma(self._conn, "page_count")
            free = _pragma(self._conn, "freelist_count")
            budget = _pragma(self._conn, "max_page_count")
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
            before = _pragma(self._conn, "page_count")
            arg = "" if pages is None else f"({int(pages)})"
            self._conn.execute(f"PRAGMA incremental_vacuum{arg}").fetchall()
            after = _pragma(self._conn, "page_count")
            return before - after

    # --- maintenance -----------------------------------------------------------------

    def integrity_check(self) -> str:
        with self._lock, self._translate("integrity_check"):
            return str(self._conn.execute("PRAGMA integrity_check").fetchall()[0][0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
