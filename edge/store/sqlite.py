"""The SQLite store (apsw, WAL): the terminal's persistence.

One writer connection guarded by a lock; every write is one ``BEGIN IMMEDIATE``
transaction. Connection settings are one small function each, with the reason.
Driver errors are translated here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import apsw

from edge.engine.records import (
    Acknowledgement,
    AckResult,
    CommandRecord,
    Commit,
    Compaction,
    RunRecord,
)
from edge.errors import MigrationError, StorageFull, StoreError
from edge.store import writer
from edge.store.base import RowReads
from edge.store.queries import Migration, load_migrations, load_queries
from edge.store.sqlitefile import (
    DEFAULT_WAL_LIMIT_BYTES,
    Checkpoint,
    CheckpointMode,
    FileUpkeep,
    Storage,
    limit_wal,
    set_page_budget,
    use_incremental_vacuum,
)

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS",
    "DEFAULT_WAL_LIMIT_BYTES",
    "Checkpoint",
    "CheckpointMode",
    "SqliteStore",
    "Storage",
    "Synchronous",
]

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

#: Milliseconds a writer waits for the lock before giving up: long enough to ride out a
#: checkpoint or a second process (the CLI beside the daemon), short enough to surface.
DEFAULT_BUSY_TIMEOUT_MS = 5_000

_QUERIES = load_queries("sqlite")

#: Built once: ``json.dumps`` with options constructs a new encoder on every call.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


_MIGRATIONS: list[Migration] | None = None


def _sqlite_migrations() -> list[Migration]:
    """The SQLite migrations, read from the package once per process: reading the files
    was 0.9 ms of every store's opening (a fleet simulator opens thousands)."""
    global _MIGRATIONS
    if _MIGRATIONS is None:
        _MIGRATIONS = load_migrations("sqlite")
    return _MIGRATIONS


def _migrated(path: Path) -> None:
    """A new database at ``path``, migrated (what a template is built from)."""
    SqliteStore(path, synchronous="OFF", template=False).close()


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


def _enforce_foreign_keys(conn: apsw.Connection) -> None:
    # Off by default in SQLite, for backward compatibility only.
    conn.execute("PRAGMA foreign_keys=ON")


def _set_busy_timeout(conn: apsw.Connection, ms: int) -> None:
    # Without it a second connection fails at once with SQLITE_BUSY instead of waiting.
    conn.set_busy_timeout(ms)


class SqliteStore(RowReads, FileUpkeep):
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
        template: bool = True,
    ) -> None:
        """``outbox_max_*``: bound the outbox (the terminal's store-and-forward queue). A
        step whose messages would pass a bound is refused in its own transaction
        (LimitExceeded, reason ``outbox_full``); acknowledging messages makes room.

        ``vfs``: the name of a registered apsw VFS to open the file through (the crash
        tests use ``hwsim.powerloss``); the platform default when None.

        ``max_bytes``: the database file's hard budget (``max_page_count``); a write past
        it raises StorageFull and commits nothing. ``wal_limit_bytes``: the size a
        checkpoint truncates the WAL back to.

        ``template``: when the process shares a template (``edge.store.template``) and
        the file does not exist yet, start from a copy of it instead of migrating a new
        database (False: always migrate)."""
        self.wal_limit_bytes = wal_limit_bytes
        self.path = str(path)
        self.outbox_bound = writer.outbox_bound(outbox_max_messages, outbox_max_bytes)
        self._lock = threading.RLock()
        if template and migrate and vfs is None and not self.path.startswith((":", "file:")):
            from edge.store.template import shared  # only a process that shares one

            made = shared()
            if made is not None and not Path(self.path).exists():
                # a copy that cannot be made (no such directory, a full disk) is left
                # to the open below, which fails or migrates as it would have
                with contextlib.suppress(OSError, apsw.Error):
                    made.make(self.path, _migrated, durable=synchronous in ("FULL", "EXTRA"))
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
                use_incremental_vacuum(self._conn)
                _use_wal(self._conn)
                limit_wal(self._conn, wal_limit_bytes)
                _set_synchronous(self._conn, synchronous)
                _enforce_foreign_keys(self._conn)
            if migrate:
                self.migrate()
            if max_bytes is not None:
                with self._translate("open"):
                    set_page_budget(self._conn, max_bytes)
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
    def _tx(self, operation: str) -> Iterator[_Tx]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front, so two
        writers serialise here instead of failing mid-transaction."""
        with self._lock, self._translate(operation):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(self._conn)
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

    def _rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock, self._translate(name):
            return _Tx(self._conn).q(name, params).rows()

    def _scalar(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        found = self._rows(name, params)
        return next(iter(found[0].values())) if found else None

    # --- schema --------------------------------------------------------------------

    def migrate(self) -> int:
        with self._tx("migrate") as tx:
            tx.q("create_migrations_table")
        current = self.schema_version()
        migrations = _sqlite_migrations()
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
                with self._tx(f"migrate {mig.version:04d}_{mig.name}") as tx:
                    # Re-read under the write lock: another process (the daemon beside
                    # the CLI) may have applied it since.
                    if int(self._scalar("schema_version")) >= mig.version:
                        continue
                    self._conn.execute(mig.sql)
                    tx.q(
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
        params = {"content_hash": content_hash, "workflow_type": workflow_type}
        with self._tx("save_definition") as tx:
            tx.q("save_definition", {**params, "version": version, "snapshot": snapshot, "at": at})

    # --- runs ----------------------------------------------------------------------

    def start(self, commit: Commit) -> tuple[str, bool]:
        with self._tx("start") as tx:
            return writer.start_run(tx, commit, where=self.path)

    def commit(self, commit: Commit) -> None:
        with self._tx("commit") as tx:
            writer.write_commit(tx, commit, outbox_bound=self.outbox_bound, where=self.path)

    def claim(
        self, run_id: str, expected_revision: int, owner: str, lease_expires_at: float
    ) -> RunRecord | None:
        params = {"run_id": run_id, "expected_revision": expected_revision, "owner": owner}
        with self._tx("claim") as tx:
            if tx.q("claim_run", {**params, "lease_expires_at": lease_expires_at}).count != 1:
                return None
        return self.get_run(run_id)

    def claim_due(
        self, owner: str, now: float, lease_expires_at: float, limit: int
    ) -> list[RunRecord]:
        params = {"owner": owner, "now": now, "lease_expires_at": lease_expires_at, "limit": limit}
        with self._tx("claim_due") as tx:
            ids = [row["run_id"] for row in tx.q("claim_due", params).rows()]
        runs = [self.get_run(run_id) for run_id in ids]
        return [r for r in runs if r is not None]

    def renew_lease(self, run_id: str, owner: str, lease_expires_at: float) -> bool:
        params = {"run_id": run_id, "owner": owner, "lease_expires_at": lease_expires_at}
        with self._tx("renew_lease") as tx:
            return tx.q("renew_lease", params).count == 1

    def acknowledge(self, ack: Acknowledgement) -> AckResult:
        with self._tx("acknowledge") as tx:
            return writer.acknowledge(tx, ack, outbox_bound=self.outbox_bound, at=time.time())

    def record_command(self, rec: CommandRecord) -> bool:
        with self._tx("record_command") as tx:
            return writer.record_command(tx, rec, outbox_bound=self.outbox_bound)

    def compact(
        self,
        *,
        before: float,
        counter_prefix: str | None = None,
        counters_before: float | None = None,
    ) -> Compaction:
        with self._tx("compact") as tx:
            return writer.compact(
                tx, before=before, counter_prefix=counter_prefix, counters_before=counters_before
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Tx:
    """The writer's seam on the connection's open transaction: every query answers at
    once (one process, one file: there is no round trip to save)."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._conn = conn

    def encode(self, value: Any) -> str:
        return _dumps(value)

    def encode_ids(self, ids: list[str]) -> str:
        return _dumps(ids)  # the dialect's IN reads a JSON array (json_each)

    def q(self, name: str, params: Mapping[str, Any] | None = None) -> writer.Answer:
        cur = self._conn.execute(_QUERIES[name], params or {})
        try:
            cols = [d[0] for d in cur.get_description()]
        except apsw.ExecutionCompleteError:
            return writer.Answer([], self._conn.changes())
        rows = [dict(zip(cols, row, strict=True)) for row in cur]
        return writer.Answer(rows, self._conn.changes())

    def batch(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()
