"""The sync service's storage on PostgreSQL (psycopg 3 + psycopg_pool): the
``sync.server.SyncBackend`` the control plane runs on.

One ``transaction()`` is one PostgreSQL transaction on one pooled connection (READ
COMMITTED; a device's exchanges are serialised by its row lock, ``device(lock=True)``).
A batch's outbox entries, audit rows and quarantined items each go in one statement
(``unnest`` of arrays), never a round trip per row. Server-side faults (connection lost
or refused, admin shutdown, serialization failure, deadlock, pool timeout, disk full)
become ``BackendUnavailable``: the service answers 503 and nothing of the transaction
committed.

Schema: numbered migrations in ``cloud/sync/sql/migrations`` beside ``schema.sql``, with
their own version table (``sync_schema_migrations``), so these tables live beside the
engine store's in one database.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import psycopg
import psycopg.errors
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from cloud.pgschema import SchemaSet
from edge.engine.records import AuditRow
from edge.store.queries import Migration, parse_queries
from sync import wire
from sync.server import BackendUnavailable
from sync.server_records import ChainRecord, DeviceRecord, NewCommand, QuarantineItem, TokenGrant

Conn = psycopg.Connection[tuple[Any, ...]]

_SQL = resources.files("cloud.sync").joinpath("sql")
_Q = parse_queries(_SQL.joinpath("queries.sql").read_text())

#: Any 64-bit number of ours, other than the engine store's: serialises sync migrations.
_MIGRATION_LOCK = 0x7417_5C0E
#: The first key of the per-kind document lock (pg_advisory_xact_lock(int, int)).
_DOCUMENT_LOCK = 0x7417_D0C

#: Commands of a batch per INSERT statement (a JSON array each; envelopes are ~1-2 KB).
_COMMANDS_PER_INSERT = 1000

DEFAULT_POOL_SIZE = 8
#: How long a transaction waits for a pooled connection before it is a 503.
DEFAULT_POOL_TIMEOUT_S = 5.0

#: Failures of the server, not of the request: retryable, never a rejection.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # connection lost or refused, admin shutdown, query cancelled
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.DiskFull,
    psycopg.errors.InsufficientResources,
    PoolTimeout,
)


#: The sync service's tables: their migrations and version table (``cloud.pgschema``).
SCHEMA = SchemaSet("sync", "cloud.sync", _MIGRATION_LOCK)


def load_migrations() -> list[Migration]:
    """The numbered migrations ``NNNN_name.sql``, in order; numbers must be 1..n."""
    return SCHEMA.migrations()


def load_schema() -> str:
    return SCHEMA.schema()


#: A pooled connection returned less than this long ago is handed out again without the
#: check's round trip (an empty query): under load a connection comes back and goes out
#: again within milliseconds, and the check was one round trip in ten of an exchange.
#: One the server dropped inside this window fails its request as a retryable 503.
CHECK_IDLE_AFTER_S = 1.0

_returned_at: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()
_returned_lock = threading.Lock()


def _mark_returned(conn: Conn) -> None:
    """The pool's ``reset``: the connection came back to the pool working, now."""
    with _returned_lock:
        _returned_at[conn] = time.monotonic()


def _check_if_idle(conn: Conn) -> None:
    """The pool's ``check``: ``ConnectionPool.check_connection`` (raises if the server
    dropped it), unless the connection came back less than ``CHECK_IDLE_AFTER_S`` ago."""
    with _returned_lock:
        at = _returned_at.get(conn)
    if at is not None and time.monotonic() - at < CHECK_IDLE_AFTER_S:
        return
    ConnectionPool.check_connection(conn)


class PostgresSyncBackend:
    """``SyncBackend`` on the PostgreSQL database ``url`` (migrated on open unless
    ``migrate=False``)."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        connect_timeout_s: float = 10.0,
        migrate: bool = True,
    ) -> None:
        self.where = redact(url)
        self.pool: ConnectionPool[Conn] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            open=False,
            name="tillflow-sync",
            timeout=pool_timeout_s,
            # a connection the server dropped while idle (a restart) is replaced
            # before it is handed out, not failed on the first request; one back in
            # the pool a moment ago goes out unchecked (``_check_if_idle``)
            check=_check_if_idle,
            reset=_mark_returned,
        )
        try:
            self.pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout as exc:
            self.pool.close()
            raise BackendUnavailable(
                f"cannot connect to PostgreSQL at {self.where}: is the server running, and "
                "does the URL name an existing database?"
            ) from exc
        try:
            if migrate:
                self.migrate()
        except BaseException:
            self.pool.close()
            raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PostgresSyncTx]:
        try:
            with self.pool.connection() as conn, conn.transaction():
                yield PostgresSyncTx(conn)
        except UNAVAILABLE as exc:
            raise BackendUnavailable(
                f"PostgreSQL at {self.where}: {type(exc).__name__}: {str(exc).strip()[:200]}"
            ) from exc

    def schema_versions(self) -> dict[str, int]:
        with self.transaction() as tx:
            return tx.schema_versions()

    def migrate(self) -> int:
        """Apply the pending migrations, once across processes (an advisory lock), each
        in its own savepoint; returns the version the database is at."""
        with self.transaction() as tx:
            return SCHEMA.migrate(tx.conn, where=self.where, unavailable=UNAVAILABLE)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> PostgresSyncBackend:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class PostgresSyncTx:
    """``sync.server.SyncTransaction`` on one connection inside a transaction."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._cursor: psycopg.Cursor[Any] | None = None

    def _x(self, name: str, params: Mapping[str, Any] | None = None) -> psycopg.Cursor[Any]:
        """Run a named query on this transaction's one cursor (made on first use: a
        cursor per statement cost 17 us of psycopg's each, ~6 statements an exchange).
        Every caller takes the result before the next statement, so none is lost."""
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self.conn.cursor()
        return cursor.execute(_Q[name], params or {})

    def schema_versions(self) -> dict[str, int]:
        row = self._x("schema_version").fetchone()
        out = {"sync": int(row[0]) if row else 0}
        present = self._x("engine_present").fetchone()
        if present and present[0]:
            engine = self._x("engine_schema_version").fetchone()
            out["engine"] = int(engine[0]) if engine else 0
        return out

    # --- enrollment ----------------------------------------------------------------------

    def add_token(
        self, token_hash: str, store: str, group: str | None, created_at: float, expires_at: float
    ) -> None:
        self._x(
            "add_token",
            {
                "token_hash": token_hash,
                "store": store,
                "group": group,
                "created_at": created_at,
                "expires_at": expires_at,
            },
        )

    def consume_token(self, token_hash: str, now: float, device_id: str) -> TokenGrant | None:
        row = self._x(
            "consume_token", {"token_hash": token_hash, "now": now, "device_id": device_id}
        ).fetchone()
        return None if row is None else TokenGrant(row[0], row[1], row[2])

    def token_holder(self, token_hash: str) -> str | None:
        row = self._x("token_holder", {"token_hash": token_hash}).fetchone()
        return None if row is None else row[0]

    def add_device(self, device: DeviceRecord) -> None:
        self._x(
            "add_device",
            {
                "device_id": device.device_id,
                "store": device.store,
                "group": device.group,
                "public_key": device.public_key,
                "status": device.status,
                "enrolled_at": device.enrolled_at,
                "binary_version": device.binary_version,
                "hardware": Jsonb(dict(device.hardware)),
            },
        )

    # --- devices -------------------------------------------------------------------------

    def device(self, device_id: str, *, lock: bool = False) -> DeviceRecord | None:
        row = self._x("device_locked" if lock else "device", {"device_id": device_id}).fetchone()
        return None if row is None else _device(row)

    def devices(self) -> list[DeviceRecord]:
        return [_device(row) for row in self._x("devices").fetchall()]

    def revoke_device(self, device_id: str, at: float) -> bool:
        return self._x("revoke_device", {"device_id": device_id, "at": at}).rowcount == 1

    def replace_key(self, device_id: str, public_key: str, at: float) -> None:
        self._x("replace_key", {"device_id": device_id, "public_key": public_key, "at": at})

    def add_conflicts(self, device_id: str, count: int) -> None:
        self._x("add_conflicts", {"device_id": device_id, "count": count})

    def record_nonce(self, device_id: str, nonce: str, at: float, prune_before: float) -> bool:
        params = {"device_id": device_id, "nonce": nonce, "at": at, "prune_before": prune_before}
        return self._x("record_nonce", params).fetchone() is not None

    # --- outbox --------------------------------------------------------------------------

    def insert_messages(
        self, device_id: str, stream: str, entries: Sequence[wire.OutboxEntry], at: float
    ) -> dict[int, str]:
        if not entries:
            return {}
        batch = _json([_message_row(e) for e in entries])
        params = {"device_id": device_id, "stream": stream, "at": at, "rows": batch}
        inserted = {row[0] for row in self._x("insert_messages", params).fetchall()}
        others = [e.seq for e in entries if e.seq not in inserted]
        if not others:
            return {}
        rows = self._x(
            "message_hashes", {"device_id": device_id, "stream": stream, "seqs": others}
        ).fetchall()
        return {int(seq): str(h) for seq, h in rows}

    def mark_outbox(self, device_id: str, stream: str, through: int, at: float) -> None:
        self._x(
            "mark_outbox", {"device_id": device_id, "stream": stream, "through": through, "at": at}
        )

    def quarantine(
        self, device_id: str, stream: str, items: Sequence[QuarantineItem], at: float
    ) -> int:
        if not items:
            return 0
        rows = [
            {
                "seq": q.seq,
                "kind": q.kind,
                "reason": q.reason,
                "detail": _text(q.detail),
                "entry": q.entry,
                "fingerprint": q.fingerprint,
            }
            for q in items
        ]
        params = {"device_id": device_id, "stream": stream, "at": at, "rows": _json(rows)}
        return len(self._x("quarantine", params).fetchall())

    # --- audit ---------------------------------------------------------------------------

    def chain(self, device_id: str, stream: str, chain: int) -> ChainRecord | None:
        row = self._x(
            "chain", {"device_id": device_id, "stream": stream, "chain": chain}
        ).fetchone()
        return None if row is None else _chain(row)

    def chains(self, device_id: str) -> list[tuple[str, ChainRecord]]:
        rows = self._x("chains", {"device_id": device_id}).fetchall()
        return [(str(row[0]), _chain(row[1:])) for row in rows]

    def audit_hashes(
        self, device_id: str, stream: str, chain: int, seqs: Collection[int]
    ) -> dict[int, str]:
        params = {"device_id": device_id, "stream": stream, "chain": chain, "seqs": list(seqs)}
        return {int(seq): str(h) for seq, h in self._x("audit_hashes", params).fetchall()}

    def insert_audit(
        self, device_id: str, stream: str, rows: Sequence[wire.AuditEntry], at: float
    ) -> None:
        """COPY, the fastest way in (the rows are new: above the chain's head, under the
        device's row lock). Should one be there after all (a chain reset by hand), the
        COPY's savepoint is rolled back and the rows go in skipping what is there."""
        if not rows:
            return
        try:
            with self.conn.transaction(), self.conn.cursor().copy(_Q["copy_audit"]) as copy:
                for r in rows:
                    copy.write_row(
                        (
                            device_id,
                            stream,
                            r.chain,
                            r.seq,
                            r.run_id,
                            r.event,
                            r.step,
                            _json(r.detail),
                            r.at,
                            r.prev_hash,
                            r.hash,
                            r.version,
                        )
                    )
        except psycopg.errors.UniqueViolation:
            params = {
                "device_id": device_id,
                "stream": stream,
                "rows": _json([_audit_row(r) for r in rows]),
            }
            self._x("insert_audit", params)

    def save_chain(self, device_id: str, stream: str, record: ChainRecord, at: float) -> None:
        self._x(
            "save_chain",
            {
                "device_id": device_id,
                "stream": stream,
                "chain": record.chain,
                "base_seq": record.base_seq,
                "base_hash": record.base_hash,
                "head_seq": record.head_seq,
                "head_hash": record.head_hash,
                "state": record.state,
                "first_bad_seq": record.first_bad_seq,
                "reason": None if record.reason is None else _text(record.reason),
                "broken_at": record.broken_at,
                "at": at,
            },
        )

    def audit_rows(
        self, device_id: str, stream: str, chain: int, after_seq: int, through_seq: int, limit: int
    ) -> list[AuditRow]:
        params = {
            "device_id": device_id,
            "stream": stream,
            "chain": chain,
            "after_seq": after_seq,
            "through_seq": through_seq,
            "limit": limit,
        }
        return [
            AuditRow(
                seq=int(r[0]),
                run_id=r[1],
                event=r[2],
                step=r[3],
                detail=r[4],
                at=float(r[5]),
                prev_hash=r[6],
                hash=r[7],
                stream=int(r[8]),
                version=int(r[9]),
            )
            for r in self._x("audit_rows", params).fetchall()
        ]

    # --- health --------------------------------------------------------------------------

    def save_heartbeat(
        self, device_id: str, stream: str, heartbeat: Mapping[str, Any], at: float
    ) -> None:
        self._x(
            "save_heartbeat",
            {
                "device_id": device_id,
                "stream": stream,
                "heartbeat": Jsonb(dict(heartbeat)),
                "at": at,
            },
        )

    # --- commands and documents ----------------------------------------------------------

    def find_commands(
        self, device_id: str, keys: Collection[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        ids = sorted({command_id for command_id, _ in keys})
        rows = self._x("find_commands", {"device_id": device_id, "command_ids": ids}).fetchall()
        return {(str(c), int(s)) for c, s in rows} & set(keys)

    def record_command_results(
        self, device_id: str, results: Sequence[wire.CommandResult], at: float
    ) -> None:
        if not results:
            return
        self._x(
            "record_command_results",
            {
                "device_id": device_id,
                "command_ids": [r.command_id for r in results],
                "seqs": [r.seq for r in results],
                "statuses": [r.status for r in results],
                "reasons": [None if r.reason is None else _text(r.reason) for r in results],
                "ats": [r.at for r in results],
            },
        )

    def take_commands(self, device_id: str, after_seq: int, now: float, limit: int) -> list[str]:
        params = {"device_id": device_id, "after_seq": after_seq, "now": now, "limit": limit}
        rows = self._x("take_commands", params).fetchall()
        return [str(envelope) for _, envelope in sorted(rows)]

    def next_command_seq(self, device_id: str) -> int:
        row = self._x("next_command_seq", {"device_id": device_id}).fetchone()
        if row is None:
            raise LookupError(f"no device {device_id}")
        return int(row[0])

    def add_command(self, command: NewCommand) -> None:
        self._x(
            "add_command",
            {
                "command_id": command.command_id,
                "device_id": command.device_id,
                "seq": command.seq,
                "action": command.action,
                "envelope": command.envelope,
                "document": None if command.document is None else Jsonb(dict(command.document)),
                "created_at": command.created_at,
                "expires_at": command.expires_at,
                "batch_id": command.batch_id,
            },
        )

    def target_devices(self, group: str | None, store: str | None) -> list[str]:
        if (group is None) == (store is None):
            raise ValueError("target_devices takes a group or a store, one of the two")
        rows = self._x("target_devices", {"group": group, "store": store}).fetchall()
        return [str(r[0]) for r in rows]

    def lock_devices(self, device_ids: Sequence[str]) -> list[str]:
        rows = self._x("lock_devices", {"device_ids": sorted(set(device_ids))}).fetchall()
        return [str(r[0]) for r in rows]

    def cancel_commands(self, command_ids: Sequence[str]) -> list[str]:
        rows = self._x("cancel_commands", {"command_ids": list(command_ids)}).fetchall()
        return sorted(str(r[0]) for r in rows)

    def next_command_seqs(self, device_ids: Sequence[str]) -> dict[str, int]:
        rows = self._x("next_command_seqs", {"device_ids": list(device_ids)}).fetchall()
        seqs = {str(d): int(seq) for d, seq in rows}
        missing = set(device_ids) - set(seqs)
        if missing:
            raise LookupError(f"no device {sorted(missing)[0]}")
        return seqs

    def add_commands(self, commands: Sequence[NewCommand]) -> None:
        for at in range(0, len(commands), _COMMANDS_PER_INSERT):
            rows = [_command_row(c) for c in commands[at : at + _COMMANDS_PER_INSERT]]
            self._x("add_commands", {"rows": _json(rows)})

    def documents_head(self, kind: str) -> int:
        self._x("lock_documents", {"lock": _DOCUMENT_LOCK, "kind": kind})
        row = self._x("documents_head", {"kind": kind}).fetchone()
        return int(row[0]) if row else 0

    def document(self, kind: str, version: int) -> dict[str, Any] | None:
        row = self._x("document", {"kind": kind, "version": version}).fetchone()
        return None if row is None else dict(row[0])

    def add_document(self, kind: str, version: int, content: Mapping[str, Any], at: float) -> None:
        self._x(
            "add_document",
            {"kind": kind, "version": version, "content": Jsonb(dict(content)), "at": at},
        )


# --- rows ----------------------------------------------------------------------------------


def _device(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        store=row[1],
        group=row[2],
        public_key=row[3],
        status=row[4],
        enrolled_at=float(row[5]),
        binary_version=row[6],
        hardware=row[7] or {},
        previous_public_key=row[8],
        rotated_at=row[9],
        revoked_at=row[10],
        conflicts=int(row[11]),
        last_seen_at=row[12],
        heartbeat=row[13],
    )


def _chain(row: Sequence[Any]) -> ChainRecord:
    return ChainRecord(
        chain=int(row[0]),
        base_seq=int(row[1]),
        base_hash=row[2],
        head_seq=int(row[3]),
        head_hash=row[4],
        state=row[5],
        first_bad_seq=None if row[6] is None else int(row[6]),
        reason=row[7],
        broken_at=row[8],
    )


def _message_row(e: wire.OutboxEntry) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "message_id": e.message_id,
        "run_id": e.run_id,
        "step": e.step,
        "topic": e.topic,
        "payload": e.payload,
        "created_at": e.created_at,
        "content_hash": e.content_hash,
    }


def _command_row(c: NewCommand) -> dict[str, Any]:
    return {
        "command_id": c.command_id,
        "device_id": c.device_id,
        "seq": c.seq,
        "action": c.action,
        "envelope": c.envelope,
        "document": None if c.document is None else dict(c.document),
        "created_at": c.created_at,
        "expires_at": c.expires_at,
        "batch_id": c.batch_id,
    }


def _audit_row(r: wire.AuditEntry) -> dict[str, Any]:
    return {
        "chain": r.chain,
        "seq": r.seq,
        "run_id": r.run_id,
        "event": r.event,
        "step": r.step,
        "detail": r.detail,
        "at": r.at,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
        "version": r.version,
    }


def _json(value: Any) -> str:
    """JSON text of a batch (or a jsonb value): only values the service checked storable
    (no NUL, no lone surrogate, finite numbers) come here."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _text(value: str) -> str:
    """A message for a text column (reasons quote what a device sent): no NUL."""
    return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode()


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable database URL>"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(info.items()))
