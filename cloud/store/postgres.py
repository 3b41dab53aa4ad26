"""The PostgreSQL store (psycopg 3 + psycopg-pool): the engine's Store for the cloud.

Same contract as the SQLite store (``edge.engine.ports.Store``), same named queries in
PostgreSQL's dialect. What differs, and lives only here:

- many workers: ``claim_due`` skips rows other workers are claiming (SKIP LOCKED);
- transient failures (lost connection, serialization failure, deadlock) are retried
  with backoff, each time in a fresh transaction;
- a connection that drops during COMMIT leaves the outcome unknown: the retry reads
  the run's ``commit_token`` back and, if the first try landed, does not apply it again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from edge.engine.records import (
    Acknowledgement,
    AckResult,
    CommandRecord,
    Commit,
    Compaction,
    RunRecord,
)
from edge.errors import MigrationError, StorageFull, StoreError
from edge.store import rows as rowmap
from edge.store import writer
from edge.store.base import RowReads
from edge.store.queries import load_migrations, load_queries

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.Connection[dict[str, Any]]

_QUERIES = load_queries("postgresql", package="cloud.store")

#: Tries of one operation when the failure is transient (connection lost, serialization
#: failure, deadlock), and the first wait between them (doubling): ~3 s in all.
DEFAULT_RETRIES = 6
DEFAULT_BACKOFF_S = 0.05
#: Connections per store: a worker process advances one run at a time, plus the
#: heartbeat thread, plus one for a concurrent reader.
DEFAULT_POOL_SIZE = 4
#: Audit chains: a commit locks only its runs' streams' head rows, so W workers collide
#: about W/N of the time, not always; 16 keeps that small for 4-8 workers a host, and
#: verifying costs one pass whatever N is. Safe to change: a row stays in its stream.
DEFAULT_AUDIT_STREAMS = 16
#: Any 64-bit number of ours: serialises migrations across processes.
_MIGRATION_LOCK = 0x7417_F10E

_TRANSIENT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # connection lost or refused, admin shutdown
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    PoolTimeout,
)


class PostgresStore(RowReads):
    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        sleep: Callable[[float], None] = time.sleep,
        migrate: bool = True,
        fault: Callable[[str], None] | None = None,
        audit_streams: int = DEFAULT_AUDIT_STREAMS,
    ) -> None:
        """``fault`` is a fault-injection seam for tests: called with "before_commit"
        (inside the transaction) and "after_commit" (after it committed) on each write.
        ``audit_streams``: how many audit chains to spread runs over (see the constant)."""
        if audit_streams < 1:
            raise ValueError(f"audit_streams must be at least 1, not {audit_streams}")
        self.audit_streams = audit_streams
        self._opts: dict[str, Any] = {"streams": audit_streams, "where": _redact(url)}
        self.url = url
        self.path = _redact(url)
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._fault = fault or (lambda point: None)
        self.pool: ConnectionPool[Conn] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=False,
            name="tillflow",
        )
        try:
            self.pool.open(wait=True, timeout=10)
        except PoolTimeout as exc:
            self.pool.close()
            raise StoreError(
                f"cannot connect to PostgreSQL at {self.path}",
                operation="open",
                path=self.path,
                hint="is the server running, and does the URL name an existing database?",
                retryable=True,
            ) from exc
        try:
            if migrate:
                self.migrate()
        except BaseException:
            self.pool.close()
            raise

    # --- plumbing ------------------------------------------------------------------

    def _run(
        self,
        operation: str,
        fn: Callable[[Conn, int], T],
        *,
        write: bool = True,
        pipeline: bool = False,
    ) -> T:
        """Run ``fn(conn, attempt)`` in one transaction, retrying transient failures.

        ``pipeline``: BEGIN, the statements and COMMIT are sent without waiting for each
        answer (psycopg pipeline mode); ``fn`` syncs where it needs results.
        """
        for attempt in range(self.retries + 1):
            try:
                with self.pool.connection() as conn, self._translate(operation):
                    with (
                        conn.pipeline() if pipeline else contextlib.nullcontext(),
                        conn.transaction(),
                    ):
                        result = fn(conn, attempt)
                        if write:
                            self._fault("before_commit")
                    if write:
                        self._fault("after_commit")
                    return result
            except StoreError as exc:
                if not exc.retryable or attempt == self.retries:
                    raise
                delay = self.backoff_s * 2**attempt
                log.warning(
                    "%s failed (%s); retry %d in %.2fs",
                    operation,
                    exc.message,
                    attempt + 1,
                    delay,
                    extra={"action": "store_retry", "operation": operation},
                )
                self._sleep(delay)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _translate(self, operation: str) -> Iterator[None]:
        try:
            yield
        except psycopg.errors.DiskFull as exc:
            raise StorageFull(
                "the database server is out of disk; new work is declined",
                operation=operation,
                path=self.path,
            ) from exc
        except _TRANSIENT as exc:
            raise StoreError(
                f"{type(exc).__name__}: {exc}".strip(),
                operation=operation,
                path=self.path,
                retryable=True,
            ) from exc
        except psycopg.Error as exc:
            raise StoreError(
                f"{type(exc).__name__}: {exc}".strip(), operation=operation, path=self.path
            ) from exc

    def _tx(self, conn: Conn) -> _Tx:
        return _Tx(conn, self._q)  # through _q: the bench counts statements there

    @staticmethod
    def _q(conn: Conn, name: str, params: Mapping[str, Any] | None = None) -> psycopg.Cursor[Any]:
        return conn.execute(_QUERIES[name], params or {})

    def _rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return self._run(name, lambda conn, _: self._q(conn, name, params).fetchall(), write=False)

    def _scalar(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        def read(conn: Conn, _: int) -> Any:
            row = self._q(conn, name, params).fetchone()
            return None if row is None else next(iter(row.values()))

        return self._run(name, read, write=False)

    # --- schema --------------------------------------------------------------------

    def migrate(self) -> int:
        migrations = load_migrations(self.dialect, package="cloud.store")

        def apply_pending(conn: Conn, _: int) -> int:
            # One transaction, under an advisory lock: concurrent workers starting at
            # once migrate exactly once; DDL is transactional in PostgreSQL.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            self._q(conn, "create_migrations_table")
            row = self._q(conn, "schema_version").fetchone()
            current = int(next(iter(row.values()))) if row else 0
            if current > len(migrations):
                raise MigrationError(
                    f"database schema version {current} is newer than this build knows "
                    f"({len(migrations)})",
                    operation="migrate",
                    path=self.path,
                    hint="upgrade tillflow, or point it at the matching database",
                )
            for mig in migrations[current:]:
                try:
                    with conn.transaction():
                        conn.execute(mig.sql.encode())  # bytes: sent as-is, no placeholders
                        self._q(
                            conn,
                            "record_migration",
                            {"version": mig.version, "name": mig.name, "at": time.time()},
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {mig.version:04d}_{mig.name} failed: {exc}",
                        operation="migrate",
                        path=self.path,
                    ) from exc
            return len(migrations) if current < len(migrations) else current

        return self._run("migrate", apply_pending)

    # --- definitions ---------------------------------------------------------------

    def save_definition(
        self, content_hash: str, workflow_type: str, version: str, snapshot: str, at: float
    ) -> None:
        params = {
            "content_hash": content_hash,
            "workflow_type": workflow_type,
            "version": version,
            "snapshot": snapshot,
            "at": at,
        }
        self._run("save_definition", lambda conn, _: self._q(conn, "save_definition", params))

    # --- runs ----------------------------------------------------------------------

    def start(self, commit: Commit) -> tuple[str, bool]:
        def insert(conn: Conn, attempt: int) -> tuple[str, bool]:
            return writer.start_run(self._tx(conn), commit, retry=attempt > 0, **self._opts)

        return self._run("start", insert, pipeline=True)

    def commit(self, commit: Commit) -> None:
        def write(conn: Conn, attempt: int) -> None:
            writer.write_commit(self._tx(conn), commit, retry=attempt > 0, **self._opts)

        try:
            self._run("commit", write, pipeline=True)
        except writer.AlreadyApplied:
            log.info(
                "commit of run %s had landed before the connection dropped",
                commit.run.run_id,
                extra={"action": "commit_already_applied", "run_id": commit.run.run_id},
            )

    def claim(
        self, run_id: str, expected_revision: int, owner: str, lease_expires_at: float
    ) -> RunRecord | None:
        params = {"run_id": run_id, "expected_revision": expected_revision, "owner": owner}
        params["lease_expires_at"] = lease_expires_at

        def take(conn: Conn, _: int) -> RunRecord | None:
            if self._q(conn, "claim_run", params).rowcount != 1:
                return None
            row = self._q(conn, "get_run", {"run_id": run_id}).fetchone()
            return rowmap.run_from_row(row, self._decode) if row else None

        return self._run("claim", take)

    def claim_due(
        self, owner: str, now: float, lease_expires_at: float, limit: int
    ) -> list[RunRecord]:
        params = {"owner": owner, "now": now, "lease_expires_at": lease_expires_at, "limit": limit}
        return [
            rowmap.run_from_row(r, self._decode)
            for r in self._run(
                "claim_due", lambda conn, _: self._q(conn, "claim_due", params).fetchall()
            )
        ]

    def renew_lease(self, run_id: str, owner: str, lease_expires_at: float) -> bool:
        params = {"run_id": run_id, "owner": owner, "lease_expires_at": lease_expires_at}
        return self._run(
            "renew_lease", lambda conn, _: self._q(conn, "renew_lease", params).rowcount == 1
        )

    def acknowledge(self, ack: Acknowledgement) -> AckResult:
        def ack_in(conn: Conn, _: int) -> AckResult:
            return writer.acknowledge(self._tx(conn), ack, outbox_bound=None, at=time.time())

        return self._run("acknowledge", ack_in)

    def record_command(self, rec: CommandRecord) -> bool:
        def record(conn: Conn, attempt: int) -> bool:
            return writer.record_command(
                self._tx(conn),
                rec,
                outbox_bound=None,
                streams=self.audit_streams,
                retry=attempt > 0,
            )

        return self._run("record_command", record)

    def compact(
        self,
        *,
        before: float,
        counter_prefix: str | None = None,
        counters_before: float | None = None,
    ) -> Compaction:
        def compact_in(conn: Conn, _: int) -> Compaction:
            return writer.compact(
                self._tx(conn),
                before=before,
                counter_prefix=counter_prefix,
                counters_before=counters_before,
            )

        return self._run("compact", compact_in)

    def close(self) -> None:
        self.pool.close()


class _Result:
    """A statement's cursor; in a batch its answer arrives when the batch ends."""

    __slots__ = ("_cur",)

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    def rows(self) -> list[dict[str, Any]]:
        return self._cur.fetchall()

    @property
    def count(self) -> int:
        return self._cur.rowcount


class _Tx:
    """The writer's seam on a connection in a transaction: a batch is a pipeline, sent
    in one round trip and synced when it ends."""

    def __init__(self, conn: Conn, run: Callable[[Conn, str, Mapping[str, Any] | None], Any]):
        self._conn, self._run = conn, run

    def encode(self, value: Any) -> Jsonb:
        return Jsonb(value)

    def encode_ids(self, ids: list[str]) -> list[str]:
        return list(ids)  # = ANY(%(run_ids)s) takes an array

    def q(self, name: str, params: Mapping[str, Any] | None = None) -> _Result:
        return _Result(self._run(self._conn, name, params))

    def batch(self) -> contextlib.AbstractContextManager[Any]:
        return self._conn.pipeline()


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable database URL>"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(info.items()))


def open_store(url: str, **options: Any) -> PostgresStore:
    """Entry point ``tillflow.stores: postgresql`` (the CLI opens stores by URL scheme)."""
    return PostgresStore(url, **options)
