"""The commit writer, written once above a small query seam that each store implements.

One ``Commit`` is: compare-and-set on the run's revision, the guards (with the outbox
bound), new runs and their inputs, steps (``seq`` assigned), outbox messages (``seq``
assigned), waking parents, and the audit rows chained onto their stream's head. Every
store writes it with ``write_commit`` inside its own transaction; a dialect module keeps
only how it opens that transaction and talks to its driver.

The seam is ``Tx``: run a named query (the same names in every dialect's ``.sql``) and
get a ``Result`` back. Inside ``tx.batch()`` a dialect may send the statements without
waiting for their answers (PostgreSQL's pipeline: one round trip for the batch); their
results are read only after the batch ends. SQLite and the in-memory store answer at
once. Results are read, and errors raised, after each batch: the caller's transaction
rolls back whole on any of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

from edge.engine.audit import GENESIS, HASH_VERSION, link, stream_of
from edge.engine.records import (
    Acknowledgement,
    AckResult,
    AuditEvent,
    CommandRecord,
    Commit,
    Compaction,
    Guard,
    OutboxMessage,
    RunRecord,
)
from edge.errors import LeaseLost, StoreError
from edge.store import rows as rowmap
from edge.store.base import OUTBOX_COUNTER, guard_params, guard_refused

log = logging.getLogger(__name__)

#: The payload size the outbox bound counts: the compact JSON text a store keeps.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Result(Protocol):
    """One statement's answer, readable once the batch it was sent in has ended."""

    def rows(self) -> list[dict[str, Any]]:
        """The rows it returned (a SELECT, or RETURNING)."""

    @property
    def count(self) -> int:
        """The rows it changed (INSERT, UPDATE, DELETE)."""


class Tx(Protocol):
    """One open write transaction, as the writer sees it."""

    def encode(self, value: Any) -> Any:
        """A JSON document as the driver takes it (text, ``Jsonb``, ...)."""

    def encode_ids(self, ids: list[str]) -> Any:
        """A list of run ids as the dialect's ``IN`` takes it (a JSON array, an array)."""

    def q(self, name: str, params: Mapping[str, Any] | None = None) -> Result:
        """Run (or, inside ``batch``, send) the named query."""

    def batch(self) -> AbstractContextManager[Any]:
        """Statements sent inside travel together; read their results after it ends."""


class Answer:
    """A result that was there at once (SQLite, memory): its rows and the rows changed."""

    __slots__ = ("_rows", "count")

    def __init__(self, rows: list[dict[str, Any]], count: int) -> None:
        self._rows, self.count = rows, count

    def rows(self) -> list[dict[str, Any]]:
        return self._rows


def outbox_bound(max_messages: int | None, max_bytes: int | None) -> Guard | None:
    """The guard that bounds an outbox (None: unbounded). A step whose messages would
    pass it is refused in its own transaction (LimitExceeded, ``outbox_full``)."""
    if max_messages is None and max_bytes is None:
        return None
    return Guard(OUTBOX_COUNTER, max_amount=max_bytes, max_count=max_messages, reason="outbox_full")


class AlreadyApplied(Exception):
    """A retried commit finds that its first try landed (its ``token`` is on the run)."""


def landed(tx: Tx, c: Commit) -> bool:
    """Whether ``c`` already committed: the run carries its token (a store that retries
    after losing the connection during COMMIT asks this before writing again)."""
    found = tx.q("get_run", {"run_id": c.run.run_id}).rows()
    return bool(found) and found[0].get("commit_token") == c.token


def start_run(
    tx: Tx, c: Commit, *, retry: bool = False, streams: int = 1, where: str = ""
) -> tuple[str, bool]:
    """Insert a new run and everything its first commit holds; an idempotency key
    already taken inserts nothing and answers ``(existing_run_id, False)``."""
    if retry and tx.q("get_run", {"run_id": c.run.run_id}).rows():
        return c.run.run_id, True  # the first try landed before the connection dropped
    with tx.batch():
        inserted = tx.q("insert_run", _run_params(tx, c.run, c.token))
    if not inserted.rows():
        found = tx.q("run_by_idempotency_key", {"idempotency_key": c.run.idempotency_key})
        return str(found.rows()[0]["run_id"]), False
    write_commit(tx, c, started=True, streams=streams, where=where)
    return c.run.run_id, True


def write_commit(
    tx: Tx,
    c: Commit,
    *,
    started: bool = False,
    retry: bool = False,
    outbox_bound: Guard | None = None,
    streams: int = 1,
    where: str = "",
) -> None:
    """Write one outcome in two batches: everything up to the audit head's lock, then
    (with what came back) the audit rows; the caller's transaction commits it.

    ``started``: ``c.run`` was just inserted by ``start_run`` (no compare-and-set).
    ``retry``: an earlier try may have landed unheard; ask before writing (AlreadyApplied).
    ``streams``: how many audit chains the store keeps; each event goes to its run's
    (``audit.stream_of``), and the heads are locked in stream order (no deadlock).
    ``where``: the store's path, for error messages.
    """
    if retry and not started and landed(tx, c):
        raise AlreadyApplied
    enc = tx.encode
    guards = list(c.guards) + _outbox_guard(c.outbox, outbox_bound)
    with tx.batch():
        if started:
            _insert_input(tx, c.run, None)
            update = None
        else:
            params = {**_run_params(tx, c.run, c.token), "expected_revision": c.expected_revision}
            update = tx.q("update_run", params)
        applied = []
        for g in guards:
            params = guard_params(g, c.run.updated_at)
            tx.q("ensure_counter", params)
            applied.append(tx.q("apply_counter", params))
        children = []
        for child in c.new_runs:
            params = _run_params(tx, child, c.token)
            children.append(tx.q("insert_run", params))
            _insert_input(tx, child, params["state"])
        steps = [tx.q("insert_step", rowmap.step_params(s, enc)) for s in c.steps]
        outbox = [tx.q("insert_outbox", rowmap.outbox_params(m, enc)) for m in c.outbox]
        for parent in c.wake:
            tx.q("wake_run", {"run_id": parent, "at": c.run.updated_at})
        # Last, so the chains' locks are held only for the second batch and COMMIT.
        chains, heads = _lock_heads(tx, c.audit, streams)
    if update is not None and update.count != 1:
        if landed(tx, c):
            raise AlreadyApplied
        raise LeaseLost(
            f"run {c.run.run_id} changed under us (expected revision "
            f"{c.expected_revision}); this outcome was not committed",
            operation="commit",
            path=where,
        )
    for guard, result in zip(guards, applied, strict=True):
        if result.count != 1:
            raise guard_refused(guard)
    for child, result in zip(c.new_runs, children, strict=True):
        if not result.rows():
            raise StoreError(
                f"child run of {c.run.run_id} collides with an existing idempotency key "
                f"{child.idempotency_key}",
                operation="commit",
                path=where,
            )
    for step, result in zip(c.steps, steps, strict=True):
        step.seq = int(result.rows()[0]["seq"])
    for msg, result in zip(c.outbox, outbox, strict=True):
        msg.seq = int(result.rows()[0]["seq"])
    _append_chains(tx, chains, heads)


def _outbox_guard(outbox: list[OutboxMessage], bound: Guard | None) -> list[Guard]:
    """The outbox bound's change for ``outbox`` (none when unbounded or nothing queued)."""
    if bound is None or not outbox:
        return []
    size = sum(len(_dumps(m.payload)) for m in outbox)
    return [replace(bound, amount=size, count=len(outbox))]


def _lock_heads(
    tx: Tx, events: list[AuditEvent], streams: int
) -> tuple[dict[int, list[AuditEvent]], dict[int, Result]]:
    """Send the head locks of the streams ``events`` go to, in stream order (no
    deadlock); the events by stream, and each stream's head result."""
    chains: dict[int, list[AuditEvent]] = {}
    for ev in events:
        chains.setdefault(stream_of(ev.run_id, streams), []).append(ev)
    heads = {}
    for stream in sorted(chains):
        at = {"stream": stream, "genesis": GENESIS}
        tx.q("ensure_audit_head", at)
        heads[stream] = tx.q("audit_head", at)
    return chains, heads


def _append_chains(
    tx: Tx, chains: dict[int, list[AuditEvent]], heads: Mapping[int, Result]
) -> None:
    if chains:
        with tx.batch():
            for stream, events in chains.items():
                _append(tx, stream, events, heads[stream].rows())


def record_command(
    tx: Tx,
    rec: CommandRecord,
    *,
    outbox_bound: Guard | None,
    streams: int = 1,
    retry: bool = False,
) -> bool:
    """One command from the control plane, in the caller's transaction
    (``CommandLedger.record_command``): the ledger row by compare-and-set on the seq and
    the document it brings, then its audit rows and outbox messages as a commit writes
    them (chained, within the outbox bound). False, with nothing written, when the seq
    is not above the high water. ``retry``: an earlier try may have landed unheard (the
    ledger row is there with this seq): True without writing again."""
    if rec.seq is not None:
        if rec.document is not None and rec.status != "applied":
            raise ValueError(f"command {rec.command_id}: a refused command brings no document")
        if retry:
            found = tx.q("get_command", {"command_id": rec.command_id}).rows()
            if found and int(found[0]["seq"]) == rec.seq:
                return True
        tx.q("lock_command_ledger")
        row = {
            "seq": rec.seq,
            "command_id": rec.command_id,
            "action": rec.action,
            "status": rec.status,
            "reason": rec.reason,
            "issued_at": rec.issued_at,
            "at": rec.at,
        }
        if tx.q("insert_command", row).count != 1:
            return False
        if rec.document is not None:
            kind, version, content = rec.document
            params = {"kind": kind, "version": version, "content": tx.encode(content)}
            tx.q("insert_document", {**params, "seq": rec.seq, "at": rec.at})
    guards = _outbox_guard(rec.outbox, outbox_bound)
    with tx.batch():
        applied = []
        for g in guards:
            params = guard_params(g, rec.at)
            tx.q("ensure_counter", params)
            applied.append(tx.q("apply_counter", params))
        enc = tx.encode
        outbox = [tx.q("insert_outbox", rowmap.outbox_params(m, enc)) for m in rec.outbox]
        chains, heads = _lock_heads(tx, rec.audit, streams)
    for guard, result in zip(guards, applied, strict=True):
        if result.count != 1:
            raise guard_refused(guard)
    for msg, result in zip(rec.outbox, outbox, strict=True):
        msg.seq = int(result.rows()[0]["seq"])
    _append_chains(tx, chains, heads)
    return True


def _append(tx: Tx, stream: int, events: list[AuditEvent], head: list[dict[str, Any]]) -> None:
    seq, prev = (int(head[0]["seq"]), str(head[0]["hash"])) if head else (0, GENESIS)
    for ev in events:
        seq += 1
        digest = link(prev, seq, ev, stream=stream)
        params = rowmap.audit_params(
            seq, ev, prev, digest, tx.encode, stream=stream, version=HASH_VERSION
        )
        tx.q("insert_audit", params)
        prev = digest
    tx.q("set_audit_head", {"stream": stream, "seq": seq, "hash": prev})


def _run_params(tx: Tx, run: RunRecord, token: str) -> dict[str, Any]:
    return {**rowmap.run_params(run, tx.encode), "commit_token": token}


def _insert_input(tx: Tx, run: RunRecord, encoded_state: Any) -> None:
    # The state usually starts as the input: encode it once.
    same = encoded_state is not None and run.input == run.state
    text = encoded_state if same else tx.encode(run.input)
    tx.q("insert_run_input", {"run_id": run.run_id, "input": text})


def acknowledge(
    tx: Tx, ack: Acknowledgement, *, outbox_bound: Guard | None, at: float
) -> AckResult:
    """One acknowledgement, in the caller's transaction.

    The DELETE says which messages it really removed: only their ``releases`` apply, so
    an acknowledgement repeated, or raced by another (the loser's DELETE finds nothing),
    releases nothing twice. A message's releases apply in order up to the first one its
    counter refuses (below zero, or a once-only marker already taken): the rest of that
    message's are left out, and the acknowledgement itself always goes through.
    """
    deleted: list[dict[str, Any]] = []
    if ack.outbox_through is not None:
        deleted = tx.q("ack_outbox", {"seq": ack.outbox_through}).rows()
    released: list[Guard] = []
    for r in deleted:  # a message's changes in order, up to the first one refused
        for guard in ack.releases.get(int(r["seq"]), ()):
            if not _apply_release(tx, guard, at):
                break
            released.append(guard)
    if outbox_bound is not None and deleted:
        size = sum(int(r["bytes"]) for r in deleted)
        _apply_release(tx, Guard(OUTBOX_COUNTER, amount=-size, count=-len(deleted)), at)
    if ack.audit_through is not None:
        # A terminal's one stream: the cloud acknowledges what a terminal sent it.
        tx.q("ack_audit", {"stream": 0, "seq": ack.audit_through, "genesis": GENESIS})
    return AckResult(messages=len(deleted), released=tuple(released))


def _apply_release(tx: Tx, guard: Guard, at: float) -> bool:
    """One counter change of an acknowledgement; False (and a log line) if its counter
    refuses it. The acknowledgement itself always goes through."""
    params = guard_params(guard, at)
    tx.q("ensure_counter", params)
    if tx.q("apply_counter", params).count == 1:
        return True
    capped = guard.max_amount is not None or guard.max_count is not None
    # Past a cap: a once-only marker another commit took first, as designed. Below
    # zero: a release of something never held, worth a warning.
    log.log(
        logging.INFO if capped else logging.WARNING,
        "ack: counter %r refuses %+d / %+d (%s); the rest of that message's changes are left",
        guard.name,
        guard.amount,
        guard.count,
        "past its cap" if capped else "below zero",
        extra={"action": "ack_release_refused", "counter": guard.name},
    )
    return False


def compact(
    tx: Tx, *, before: float, counter_prefix: str | None, counters_before: float | None
) -> Compaction:
    """Retention, in the caller's transaction.

    The audit base moves before the rows behind it are deleted, so the delete trigger --
    which refuses any row past the base -- lets exactly those go and no other.
    """
    found = tx.q("compactable_runs", {"before": before}).rows()
    runs = steps = 0
    if found:
        ids = tx.encode_ids([str(r["run_id"]) for r in found])
        steps = tx.q("delete_steps_of_runs", {"run_ids": ids}).count
        tx.q("delete_inputs_of_runs", {"run_ids": ids})
        runs = tx.q("delete_runs", {"run_ids": ids}).count
    audit = 0
    for kept in tx.q("audit_retentions").rows():
        stream, base, acked = int(kept["stream"]), int(kept["base_seq"]), int(kept["acked_seq"])
        at = {"stream": stream, "acked_seq": acked, "before": before}
        point = tx.q("audit_compact_point", at).rows()
        if point and int(point[0]["seq"]) > base:
            seq = int(point[0]["seq"])
            tx.q("set_audit_base", {"stream": stream, "seq": seq, "hash": str(point[0]["hash"])})
            audit += tx.q("delete_audit_through", {"stream": stream, "seq": seq}).count
    counters = 0
    if counter_prefix is not None and counters_before is not None:
        params = {"prefix": counter_prefix, "before": counters_before}
        counters = tx.q("delete_idle_counters", params).count
    return Compaction(runs=runs, steps=steps, audit_rows=audit, counters=counters)
