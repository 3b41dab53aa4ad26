"""The in-memory store: the whole Store contract on dicts, for tests of workflows.

An integrator tests a workflow in milliseconds: ``Engine(MemoryStore(), InlineExecutor(),
clock=FakeClock())`` runs every step type, saga, wait, guard, outbox and audit rule
exactly as on SQLite, because it is the same commit writer (``edge.store.writer``) over
the same named queries -- here each name is a small function on dicts -- and it passes
the same conformance suite.

What it does not do: durability. Nothing survives the process; there is no file, no
crash safety, no size budget, no second process. Two ``MemoryStore`` objects share data
only when given the same ``MemoryDatabase`` (a "restart" in a test). One lock serialises
every transaction (thread-safe, no concurrency beyond that); a transaction that raises
leaves the tables as they were.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge.engine.records import (
    TERMINAL,
    Acknowledgement,
    AckResult,
    CommandRecord,
    Commit,
    Compaction,
    RunRecord,
)
from edge.errors import StoreError
from edge.store import writer
from edge.store.base import RowReads
from edge.store.queries import load_migrations

__all__ = ["MemoryDatabase", "MemoryStore"]

Row = dict[str, Any]
P = Mapping[str, Any]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_FINISHED = {str(s) for s in TERMINAL}
_LIVE = ("RUNNING", "COMPENSATING")


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass
class MemoryDatabase:
    """The tables. Rows are dicts that are replaced, never changed in place, so a
    transaction's undo is a shallow copy of each table."""

    definitions: dict[str, Row] = field(default_factory=dict)
    runs: dict[str, Row] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    steps: dict[int, Row] = field(default_factory=dict)
    audit: dict[tuple[int, int], Row] = field(default_factory=dict)
    heads: dict[int, Row] = field(default_factory=dict)
    retention: dict[int, Row] = field(default_factory=dict)
    outbox: dict[int, Row] = field(default_factory=dict)
    counters: dict[str, Row] = field(default_factory=dict)
    #: The database's own id, drawn when it is made (``OutboxSource.database_id``).
    meta: dict[str, str] = field(default_factory=lambda: {"stream": secrets.token_hex(16)})
    commands: dict[int, Row] = field(default_factory=dict)
    documents: dict[tuple[str, int], Row] = field(default_factory=dict)
    #: Sequences, never reused (as SQLite's AUTOINCREMENT): steps, outbox, insertion order.
    last: dict[str, int] = field(default_factory=lambda: {"step": 0, "outbox": 0, "order": 0})
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def snapshot(self) -> dict[str, Any]:
        return {k: dict(v) for k, v in vars(self).items() if isinstance(v, dict)}

    def restore(self, saved: dict[str, Any]) -> None:
        for k, v in saved.items():
            setattr(self, k, v)

    def next(self, what: str) -> int:
        self.last[what] += 1
        return self.last[what]


class MemoryStore(RowReads):
    """Store + OutboxSource + Maintenance on a ``MemoryDatabase`` (a new one if None)."""

    dialect = "memory"
    path = ":memory:"

    @staticmethod
    def _decode(value: Any) -> Any:
        return _loads(value)

    def __init__(
        self,
        database: MemoryDatabase | None = None,
        *,
        outbox_max_messages: int | None = None,
        outbox_max_bytes: int | None = None,
        audit_streams: int = 1,
    ) -> None:
        """``audit_streams``: how many audit chains (one, as a terminal; more, to test a
        workflow's audit as the cloud keeps it)."""
        self.audit_streams = audit_streams
        self.db = database if database is not None else MemoryDatabase()
        self.outbox_bound = writer.outbox_bound(outbox_max_messages, outbox_max_bytes)
        self._queries = _Queries(self.db)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[_Tx]:
        with self.db.lock:
            saved = self.db.snapshot()
            try:
                yield _Tx(self._queries)
            except BaseException:
                self.db.restore(saved)
                raise

    def _rows(self, name: str, params: P | None = None) -> list[Row]:
        with self.db.lock:
            return self._queries.run(name, params or {}).rows()

    def _scalar(self, name: str, params: P | None = None) -> Any:
        found = self._rows(name, params)
        return next(iter(found[0].values())) if found else None

    # --- Store -------------------------------------------------------------------------

    def migrate(self) -> int:
        return self.schema_version()

    def schema_version(self) -> int:
        return len(load_migrations("sqlite"))  # the same tables, always current

    def save_definition(
        self, content_hash: str, workflow_type: str, version: str, snapshot: str, at: float
    ) -> None:
        params = {"content_hash": content_hash, "workflow_type": workflow_type}
        with self._tx() as tx:
            tx.q("save_definition", {**params, "version": version, "snapshot": snapshot, "at": at})

    def start(self, commit: Commit) -> tuple[str, bool]:
        with self._tx() as tx:
            return writer.start_run(tx, commit, streams=self.audit_streams, where=self.path)

    def commit(self, commit: Commit) -> None:
        with self._tx() as tx:
            writer.write_commit(
                tx,
                commit,
                outbox_bound=self.outbox_bound,
                streams=self.audit_streams,
                where=self.path,
            )

    def claim(
        self, run_id: str, expected_revision: int, owner: str, lease_expires_at: float
    ) -> RunRecord | None:
        params = {"run_id": run_id, "expected_revision": expected_revision, "owner": owner}
        with self._tx() as tx:
            if tx.q("claim_run", {**params, "lease_expires_at": lease_expires_at}).count != 1:
                return None
        return self.get_run(run_id)

    def claim_due(
        self, owner: str, now: float, lease_expires_at: float, limit: int
    ) -> list[RunRecord]:
        params = {"owner": owner, "now": now, "lease_expires_at": lease_expires_at, "limit": limit}
        with self._tx() as tx:
            ids = [row["run_id"] for row in tx.q("claim_due", params).rows()]
        runs = [self.get_run(run_id) for run_id in ids]
        return [r for r in runs if r is not None]

    def renew_lease(self, run_id: str, owner: str, lease_expires_at: float) -> bool:
        params = {"run_id": run_id, "owner": owner, "lease_expires_at": lease_expires_at}
        with self._tx() as tx:
            return tx.q("renew_lease", params).count == 1

    def close(self) -> None:
        pass  # nothing to release: the data lives as long as its MemoryDatabase

    # --- OutboxSource, Maintenance ----------------------------------------------------------

    def acknowledge(self, ack: Acknowledgement) -> AckResult:
        with self._tx() as tx:
            return writer.acknowledge(tx, ack, outbox_bound=self.outbox_bound, at=time.time())

    def record_command(self, rec: CommandRecord) -> bool:
        with self._tx() as tx:
            return writer.record_command(
                tx, rec, outbox_bound=self.outbox_bound, streams=self.audit_streams
            )

    def compact(
        self,
        *,
        before: float,
        counter_prefix: str | None = None,
        counters_before: float | None = None,
    ) -> Compaction:
        with self._tx() as tx:
            return writer.compact(
                tx, before=before, counter_prefix=counter_prefix, counters_before=counters_before
            )


class _Tx:
    """The writer's seam on the tables: every query answers at once."""

    def __init__(self, queries: _Queries) -> None:
        self._queries = queries

    def encode(self, value: Any) -> str:
        return _dumps(value)

    def encode_ids(self, ids: list[str]) -> list[str]:
        return list(ids)

    def q(self, name: str, params: P | None = None) -> writer.Answer:
        return self._queries.run(name, params or {})

    def batch(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


def _answer(rows: list[Row] | None = None, count: int = 0) -> writer.Answer:
    return writer.Answer(rows or [], count)


class _Queries:
    """Each named query of the SQL dialects, as a function on the tables: the same name,
    the same parameters, the same rows back (JSON columns as text)."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db

    def run(self, name: str, p: P) -> writer.Answer:
        fn: Callable[[P], writer.Answer] | None = getattr(self, f"q_{name}", None)
        if fn is None:
            raise KeyError(f"the in-memory store has no query '{name}'")
        return fn(p)

    # --- definitions ------------------------------------------------------------------

    def q_save_definition(self, p: P) -> writer.Answer:
        if p["content_hash"] in self.db.definitions:
            return _answer()
        row = {k: p[k] for k in ("content_hash", "workflow_type", "version", "snapshot")}
        self.db.definitions[p["content_hash"]] = {
            **row,
            "registered_at": p["at"],
            "order": self.db.next("order"),
        }
        return _answer(count=1)

    def q_load_definition(self, p: P) -> writer.Answer:
        found = self.db.definitions.get(p["content_hash"])
        return _answer([{"snapshot": found["snapshot"]}] if found else [])

    def q_latest_definition(self, p: P) -> writer.Answer:
        mine = [d for d in self.db.definitions.values() if d["workflow_type"] == p["workflow_type"]]
        mine.sort(key=lambda d: (d["registered_at"], d["order"]))
        return _answer([{"snapshot": mine[-1]["snapshot"]}] if mine else [])

    # --- runs -----------------------------------------------------------------------------

    def _with_input(self, run: Row) -> Row:
        return {**run, "input": self.db.inputs.get(run["run_id"])}

    def _update(self, run_id: str, **changes: Any) -> None:
        self.db.runs[run_id] = {**self.db.runs[run_id], **changes}

    def q_run_by_idempotency_key(self, p: P) -> writer.Answer:
        key = p["idempotency_key"]
        found = [
            r for r in self.db.runs.values() if key is not None and r["idempotency_key"] == key
        ]
        return _answer([{"run_id": r["run_id"]} for r in found])

    def q_insert_run(self, p: P) -> writer.Answer:
        if p["idempotency_key"] is not None and self.q_run_by_idempotency_key(p).rows():
            return _answer()  # ON CONFLICT (idempotency_key) DO NOTHING
        if p["run_id"] in self.db.runs:
            raise _conflict(f"run {p['run_id']} exists")  # a primary key conflict
        self.db.runs[p["run_id"]] = {**p, "order": self.db.next("order")}
        return _answer([{"run_id": p["run_id"]}], 1)

    def q_insert_run_input(self, p: P) -> writer.Answer:
        self.db.inputs[p["run_id"]] = p["input"]
        return _answer(count=1)

    def q_update_run(self, p: P) -> writer.Answer:
        run = self.db.runs.get(p["run_id"])
        if run is None or run["revision"] != p["expected_revision"]:
            return _answer()
        fields = (
            "status", "state", "cursor", "revision", "lease_owner", "lease_expires_at",
            "next_attempt_at", "error", "fingerprints", "updated_at", "commit_token",
        )  # fmt: skip
        self._update(p["run_id"], **{k: p[k] for k in fields if k in p})
        return _answer(count=1)

    def q_wake_run(self, p: P) -> writer.Answer:
        run = self.db.runs.get(p["run_id"])
        if run is None or run["status"] != "WAITING":
            return _answer()
        self._update(
            p["run_id"],
            status="RUNNING",
            next_attempt_at=p["at"],
            lease_owner=None,
            lease_expires_at=None,
            revision=run["revision"] + 1,
            updated_at=p["at"],
        )
        return _answer(count=1)

    def q_claim_run(self, p: P) -> writer.Answer:
        run = self.db.runs.get(p["run_id"])
        if run is None or run["revision"] != p["expected_revision"]:
            return _answer()
        self._lease(run, p)
        return _answer(count=1)

    def _lease(self, run: Row, p: P) -> None:
        self._update(
            run["run_id"],
            lease_owner=p["owner"],
            lease_expires_at=p["lease_expires_at"],
            revision=run["revision"] + 1,
        )

    def q_claim_due(self, p: P) -> writer.Answer:
        now = p["now"]

        def due(r: Row) -> bool:
            at = r["next_attempt_at"]
            ready = (r["status"] in _LIVE and (at is None or at <= now)) or (
                r["status"] == "WAITING" and at is not None and at <= now
            )
            free = (
                r["lease_owner"] is None
                or r["lease_expires_at"] <= now
                or r["lease_owner"] == p["owner"]
            )
            return ready and free

        found = sorted(filter(due, self.db.runs.values()), key=_oldest)[: p["limit"]]
        for run in found:
            self._lease(run, p)
        return _answer([{"run_id": r["run_id"]} for r in found], len(found))

    def q_renew_lease(self, p: P) -> writer.Answer:
        run = self.db.runs.get(p["run_id"])
        if run is None or run["lease_owner"] != p["owner"]:
            return _answer()
        self._update(p["run_id"], lease_expires_at=p["lease_expires_at"])
        return _answer(count=1)

    def q_get_run(self, p: P) -> writer.Answer:
        run = self.db.runs.get(p["run_id"])
        return _answer([self._with_input(run)] if run else [])

    def q_list_runs(self, p: P) -> writer.Answer:
        found = sorted(self.db.runs.values(), key=_oldest, reverse=True)[: p["limit"]]
        return _answer([self._with_input(r) for r in found])

    def q_list_runs_by_status(self, p: P) -> writer.Answer:
        mine = [r for r in self.db.runs.values() if r["status"] == p["status"]]
        found = sorted(mine, key=_oldest, reverse=True)[: p["limit"]]
        return _answer([self._with_input(r) for r in found])

    def q_recoverable_runs(self, p: P) -> writer.Answer:
        def needs(r: Row) -> bool:
            at = r["next_attempt_at"]
            waiting = r["status"] == "WAITING" and at is not None and at <= p["now"]
            return r["status"] in _LIVE or waiting

        found = sorted(filter(needs, self.db.runs.values()), key=_oldest)[: p["limit"]]
        return _answer([self._with_input(r) for r in found])

    # --- steps ----------------------------------------------------------------------------

    def q_insert_step(self, p: P) -> writer.Answer:
        seq = self.db.next("step")
        self.db.steps[seq] = {**p, "seq": seq}
        return _answer([{"seq": seq}], 1)

    def q_step_history(self, p: P) -> writer.Answer:
        found = [s for seq, s in sorted(self.db.steps.items()) if s["run_id"] == p["run_id"]]
        return _answer(found)

    # --- audit ----------------------------------------------------------------------------

    def q_ensure_audit_head(self, p: P) -> writer.Answer:
        stream = p.get("stream", 0)
        if stream in self.db.heads:
            return _answer()
        self.db.heads[stream] = {"stream": stream, "seq": 0, "hash": p["genesis"]}
        return _answer(count=1)

    def q_audit_head(self, p: P) -> writer.Answer:
        head = self.db.heads.get(p.get("stream", 0))
        return _answer([{"seq": head["seq"], "hash": head["hash"]}] if head else [])

    def q_audit_heads(self, p: P) -> writer.Answer:
        return _answer([h for _, h in sorted(self.db.heads.items()) if h["seq"] > 0])

    def q_set_audit_head(self, p: P) -> writer.Answer:
        stream = p.get("stream", 0)
        self.db.heads[stream] = {"stream": stream, "seq": p["seq"], "hash": p["hash"]}
        return _answer(count=1)

    def q_insert_audit(self, p: P) -> writer.Answer:
        row = {"stream": 0, "version": 1, **p}
        key = (row["stream"], row["seq"])
        if key in self.db.audit:
            raise _conflict(f"audit row {key} exists")
        self.db.audit[key] = row
        return _answer(count=1)

    def q_audit_rows(self, p: P) -> writer.Answer:
        return _answer([r for _, r in sorted(self.db.audit.items())])

    def q_audit_rows_for_run(self, p: P) -> writer.Answer:
        found = [r for _, r in sorted(self.db.audit.items()) if r["run_id"] == p["run_id"]]
        return _answer(found)

    def q_audit_retention(self, p: P) -> writer.Answer:
        kept = self.db.retention.get(p.get("stream", 0))
        return _answer([kept] if kept else [])

    def q_audit_retentions(self, p: P) -> writer.Answer:
        return _answer([r for _, r in sorted(self.db.retention.items())])

    def q_ack_audit(self, p: P) -> writer.Answer:
        stream = p.get("stream", 0)
        kept = self.db.retention.get(stream)
        base = {"stream": stream, "base_seq": 0, "base_hash": p["genesis"], "acked_seq": 0}
        kept = kept or base
        self.db.retention[stream] = {**kept, "acked_seq": max(kept["acked_seq"], p["seq"])}
        return _answer(count=1)

    def q_audit_compact_point(self, p: P) -> writer.Answer:
        stream = p.get("stream", 0)
        found = [
            r
            for (s, seq), r in sorted(self.db.audit.items())
            if s == stream and seq <= p["acked_seq"] and r["at"] < p["before"]
        ]
        return _answer([{"seq": found[-1]["seq"], "hash": found[-1]["hash"]}] if found else [])

    def q_set_audit_base(self, p: P) -> writer.Answer:
        stream = p.get("stream", 0)
        kept = self.db.retention.get(stream)
        if kept is None or kept["base_seq"] >= p["seq"]:
            return _answer()
        self.db.retention[stream] = {**kept, "base_seq": p["seq"], "base_hash": p["hash"]}
        return _answer(count=1)

    def q_delete_audit_through(self, p: P) -> writer.Answer:
        stream = p.get("stream", 0)
        gone = [k for k in self.db.audit if k[0] == stream and k[1] <= p["seq"]]
        for key in gone:
            del self.db.audit[key]
        return _answer(count=len(gone))

    # --- outbox and counters --------------------------------------------------------------

    def q_insert_outbox(self, p: P) -> writer.Answer:
        if any(m["message_id"] == p["message_id"] for m in self.db.outbox.values()):
            raise _conflict(f"outbox message {p['message_id']} exists")
        seq = self.db.next("outbox")
        self.db.outbox[seq] = {**p, "seq": seq}
        return _answer([{"seq": seq}], 1)

    def q_outbox_after(self, p: P) -> writer.Answer:
        found = [m for seq, m in sorted(self.db.outbox.items()) if seq > p["after_seq"]]
        return _answer(found[: p["limit"]])

    def q_outbox_stats(self, p: P) -> writer.Answer:
        msgs = list(self.db.outbox.values())
        return _answer(
            [
                {
                    "depth": len(msgs),
                    "bytes": sum(len(m["payload"]) for m in msgs),
                    "oldest": min((m["created_at"] for m in msgs), default=None),
                    "last_seq": max(self.db.outbox, default=0),
                }
            ]
        )

    def q_ack_outbox(self, p: P) -> writer.Answer:
        gone = [m for seq, m in sorted(self.db.outbox.items()) if seq <= p["seq"]]
        for m in gone:
            del self.db.outbox[m["seq"]]
        return _answer([{"seq": m["seq"], "bytes": len(m["payload"])} for m in gone], len(gone))

    def q_ensure_counter(self, p: P) -> writer.Answer:
        if p["name"] in self.db.counters:
            return _answer()
        self.db.counters[p["name"]] = {
            "name": p["name"],
            "amount": 0,
            "count": 0,
            "updated_at": p["at"],
        }
        return _answer(count=1)

    def q_apply_counter(self, p: P) -> writer.Answer:
        c = self.db.counters.get(p["name"])
        if c is None:
            return _answer()
        amount, count = c["amount"] + p["amount"], c["count"] + p["count"]
        within = (p["max_amount"] is None or amount <= p["max_amount"]) and (
            p["max_count"] is None or count <= p["max_count"]
        )
        if not within or amount < 0 or count < 0:
            return _answer()
        self.db.counters[p["name"]] = {**c, "amount": amount, "count": count, "updated_at": p["at"]}
        return _answer(count=1)

    def q_counters(self, p: P) -> writer.Answer:
        return _answer([c for _, c in sorted(self.db.counters.items())])

    def q_delete_idle_counters(self, p: P) -> writer.Answer:
        gone = [
            n
            for n, c in self.db.counters.items()
            if n.startswith(p["prefix"]) and c["updated_at"] < p["before"]
        ]
        for name in gone:
            del self.db.counters[name]
        return _answer(count=len(gone))

    # --- sync: the database's id, the command ledger, documents ---------------------------

    def q_database_id(self, p: P) -> writer.Answer:
        return _answer([{"value": self.db.meta["stream"]}] if "stream" in self.db.meta else [])

    def q_audit_after(self, p: P) -> writer.Answer:
        found = [
            r
            for (s, seq), r in sorted(self.db.audit.items())
            if s == p["stream"] and seq > p["after_seq"]
        ]
        return _answer(found[: p["limit"]])

    def q_lock_command_ledger(self, p: P) -> writer.Answer:
        return self.q_database_id(p)  # the store's one lock serialises every transaction

    def q_insert_command(self, p: P) -> writer.Answer:
        high = max(self.db.commands, default=0)
        taken = any(c["command_id"] == p["command_id"] for c in self.db.commands.values())
        if p["seq"] <= high or taken:
            return _answer()
        fields = ("seq", "command_id", "action", "status", "reason", "issued_at", "at")
        self.db.commands[p["seq"]] = {k: p[k] for k in fields}
        return _answer(count=1)

    def q_get_command(self, p: P) -> writer.Answer:
        found = [c for c in self.db.commands.values() if c["command_id"] == p["command_id"]]
        return _answer(found)

    def q_command_high_water(self, p: P) -> writer.Answer:
        return _answer([{"seq": max(self.db.commands, default=0)}])

    def q_trusted_time(self, p: P) -> writer.Answer:
        times = [c["issued_at"] for c in self.db.commands.values()]
        return _answer([{"at": max(times) if times else None}])

    def q_insert_document(self, p: P) -> writer.Answer:
        key = (p["kind"], p["version"])
        if key in self.db.documents:
            raise _conflict(f"document {key} exists")
        if p["seq"] not in self.db.commands:
            raise _conflict(f"document {key} names no ledger row {p['seq']}")
        row = {k: p[k] for k in ("kind", "version", "content", "at")}
        self.db.documents[key] = {**row, "command_seq": p["seq"]}
        return _answer(count=1)

    def q_active_document(self, p: P) -> writer.Answer:
        mine = [d for (kind, _), d in sorted(self.db.documents.items()) if kind == p["kind"]]
        found = max(mine, key=lambda d: d["version"]) if mine else None
        return _answer(
            [{"version": found["version"], "content": found["content"]}] if found else []
        )

    # --- retention of runs ----------------------------------------------------------------

    def q_compactable_runs(self, p: P) -> writer.Answer:
        def old(r: Row) -> bool:
            return r["status"] in _FINISHED and r["updated_at"] < p["before"]

        kept: set[str] = set()
        for r in self.db.runs.values():  # every ancestor of a run that stays, stays
            parent = r["parent_run_id"] if not old(r) else None
            while parent is not None and parent not in kept:
                kept.add(parent)
                parent = self.db.runs[parent]["parent_run_id"] if parent in self.db.runs else None
        found = [r for r in self.db.runs.values() if old(r) and r["run_id"] not in kept]
        return _answer([{"run_id": r["run_id"]} for r in found])

    def q_delete_steps_of_runs(self, p: P) -> writer.Answer:
        ids = set(p["run_ids"])
        gone = [seq for seq, s in self.db.steps.items() if s["run_id"] in ids]
        for seq in gone:
            del self.db.steps[seq]
        return _answer(count=len(gone))

    def q_delete_inputs_of_runs(self, p: P) -> writer.Answer:
        gone = [i for i in p["run_ids"] if self.db.inputs.pop(i, None) is not None]
        return _answer(count=len(gone))

    def q_delete_runs(self, p: P) -> writer.Answer:
        gone = [i for i in p["run_ids"] if self.db.runs.pop(i, None) is not None]
        return _answer(count=len(gone))


def _conflict(what: str) -> StoreError:
    return StoreError(f"constraint failed: {what}", operation="commit", path=MemoryStore.path)


def _oldest(r: Row) -> tuple[float, int]:
    return (r["created_at"], r["order"])
