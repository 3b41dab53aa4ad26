"""The kill torture's reading of a terminal: the database a ``kill -9`` left, opened
read-only with SQL (``hwsim.killtorture`` runs it after every kill).

``Checker(db).check(ledger, book, final=..., cloud=...)`` opens the database read-only
(the next daemon must be the one to recover the WAL), reads it into the shared
``hwsim.invariants.Snapshot`` and returns the violations ``hwsim.invariants.check``
finds (what the POS saw, the messages, unknown outcomes, money, the offline exposure
and its release on acknowledgement, ...; listed there), after two of its own:

* ``PRAGMA integrity_check`` is ok, and the audit chain verifies: incrementally, from
  the last row this checker verified (the rows a crash could touch), and with
  ``final=True`` whole, the way ``tillflow audit verify`` checks it;
* with ``final=True`` (after a graceful stop, the link up), every run is in a terminal
  state and no reversal is pending.

``cloud`` holds the messages the cloud received (``hwsim.killsync``): the terminal drops
a message once it is acknowledged, so the messages are the outbox's and the cloud's.
Acquirer keys are traced to their runs from the step rows (their recorded operation
keys), never rebuilt from step names. ``Checker.pending`` lists the runs whose reversal
was pending at the last check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import apsw
from hwsim.acquirer import LedgerEntry
from hwsim.invariants import (
    TERMINAL_STATUSES,
    Message,
    Owners,
    PosBook,
    PosOutcome,
    Run,
    Snapshot,
    check,
    money_may_be_held,
    reversal_pending,
)

from edge.engine.audit import GENESIS, link
from edge.engine.navigation import step_path
from edge.engine.records import AuditEvent

__all__ = [
    "TERMINAL_STATUSES",
    "Checker",
    "PosBook",
    "PosOutcome",
    "money_may_be_held",
    "reversal_pending",
]

_RUNS_SQL = """
SELECT run_id, workflow_type, status, idempotency_key, state,
       json_extract(cursor, '$.frames'), error
FROM workflow_runs
"""
#: Step rows after the last one read, with their run's workflow; ``{key}`` is the
#: recorded operation key where the schema has one.
_STEPS_SQL = """
SELECT s.seq, s.run_id, r.workflow_type, s.step, {key}
FROM workflow_steps s JOIN workflow_runs r ON r.run_id = s.run_id
WHERE s.seq > ? ORDER BY s.seq
"""
_OUTBOX_SQL = "SELECT message_id, run_id, topic, payload, seq FROM outbox ORDER BY seq"
_OUTBOX_STATS_SQL = "SELECT coalesce(sum(length(payload)), 0), count(*) FROM outbox"
_AUDIT_SQL = """
SELECT seq, run_id, event, step, detail, at, prev_hash, hash
FROM workflow_audit_log WHERE seq >= ? ORDER BY seq
"""


def _json(text: Any) -> Any:
    return None if text is None else json.loads(text)


def _run(row: tuple[Any, ...]) -> Run:
    run_id, workflow, status, key, state, frames, error = row
    finished = str(status) in TERMINAL_STATUSES
    frames = _json(frames) or []
    return Run(
        run_id=str(run_id),
        workflow=str(workflow),
        status=str(status),
        key=None if key is None else str(key),
        state=_json(state) or {},
        step=str(frames[-1][0]) if frames and not finished else None,
        error=_json(error),
    )


def _offline_approval(m: Message, acknowledged: bool) -> bool:
    return (
        m.acknowledged == acknowledged
        and m.topic == "payment"
        and m.decision == "approved"
        and bool(m.payload.get("offline"))
    )


class Checker:
    """The invariants of one terminal database, the acquirer's ledger, a POS's book and
    what the cloud received.

    ``check`` opens the database read-only (a crashed daemon's WAL stays for the next
    daemon to recover) and returns the violations found, each a sentence. The audit
    chain is verified incrementally, from the last row verified by this checker (the
    rows a crash could touch); ``final=True`` verifies it whole through the engine, and
    also requires every run to be finished.
    """

    def __init__(self, db: Path) -> None:
        self.db = db
        self._audit_seq = 0
        self._audit_hash = GENESIS
        self._owners = Owners()  # acquirer key -> (run id, workflow), grown per check
        self._step_seq = 0  # the last step row traced
        #: Runs whose reversal was pending at the last check (``reversal_pending``).
        self.pending: list[str] = []
        #: Figures of the last check, for a tally: payments that went through an unknown
        #: outcome, how many of them finished, and whose authorisation the acquirer
        #: released (a reversal with an effect: the customer had been charged).
        self.figures: dict[str, int] = {}

    def check(
        self,
        ledger: Mapping[str, LedgerEntry],
        book: PosBook,
        *,
        final: bool = False,
        cloud: Mapping[str, Message] | None = None,
    ) -> list[str]:
        if not self.db.exists():  # killed before it first opened the database
            return [f"no database at {self.db}"] if book.run_ids else []
        try:
            return self._check(ledger, book, final=final, cloud=cloud or {})
        except apsw.Error as exc:
            return [f"the database does not open or read: {type(exc).__name__}: {exc}"]

    def _check(
        self,
        ledger: Mapping[str, LedgerEntry],
        book: PosBook,
        *,
        final: bool,
        cloud: Mapping[str, Message],
    ) -> list[str]:
        problems: list[str] = []
        conn = apsw.Connection(str(self.db), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            conn.set_busy_timeout(5_000)
            conn.execute("BEGIN")  # one snapshot for every read below
            integrity = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
            if integrity != ["ok"]:
                problems.append(f"PRAGMA integrity_check: {'; '.join(integrity[:3])}")
                return problems  # nothing else read from a corrupt file is worth checking
            snap = self._read(conn, cloud)
            problems += self._audit(conn)
            conn.execute("COMMIT")
        finally:
            conn.close()
        runs = snap.runs
        self.pending = sorted(r.run_id for r in runs.values() if r.reversal_pending)
        released = {e.reverses for e in ledger.values() if e.operation == "reverse" and e.effect}
        unknown = [r for r in runs.values() if r.went_unknown]
        self.figures = {
            "went_unknown": len(unknown),
            "finished_after_unknown": sum(1 for r in unknown if r.finished),
            "released_after_unknown": sum(1 for r in unknown if r.auth_key in released),
            "acknowledged": sum(1 for m in snap.messages if m.acknowledged),
            "offline_acknowledged": sum(1 for m in snap.messages if _offline_approval(m, True)),
        }
        problems += check(snap, ledger, book, final=final)
        if final:
            problems += self._full_audit()
        return problems

    def _read(self, conn: apsw.Connection, cloud: Mapping[str, Message]) -> Snapshot:
        rows = list(conn.execute(_RUNS_SQL))
        runs = {r.run_id: r for r in map(_run, rows)}
        columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(workflow_steps)")}
        key = "s.operation_key" if "operation_key" in columns else "NULL"
        for seq, run_id, workflow, path, op_key in conn.execute(
            _STEPS_SQL.format(key=key), (self._step_seq,)
        ):
            self._owners.step(str(run_id), str(workflow), str(path), op_key)
            self._step_seq = int(seq)
        owners = Owners(dict(self._owners.keys))
        for row in rows:  # in flight: the step it is on may have no row yet
            frames = _json(row[5]) or []
            if frames and str(row[2]) not in TERMINAL_STATUSES:
                owners.step(str(row[0]), str(row[1]), step_path(frames), None)
        problems: list[str] = []
        messages: list[Message] = []
        kept: set[str] = set()
        for message_id, run_id, topic, payload, seq in conn.execute(_OUTBOX_SQL):
            msg = Message(
                str(message_id),
                None if run_id is None else str(run_id),
                str(topic),
                _json(payload) or {},
                int(seq),
            )
            earlier = cloud.get(msg.message_id)
            if earlier is not None and dict(earlier.payload) != dict(msg.payload):
                problems.append(f"message {msg.message_id} changed after it was uploaded")
            kept.add(msg.message_id)
            messages.append(msg)
        messages += [
            Message(m.message_id, m.run_id, m.topic, m.payload, m.seq, acknowledged=True)
            for i, m in cloud.items()
            if i not in kept
        ]
        counters = {
            str(r[0]): (int(r[1]), int(r[2]))
            for r in conn.execute("SELECT name, amount, count FROM counters")
        }
        stats = conn.execute(_OUTBOX_STATS_SQL).fetchone()
        outbox = (int(stats[0]), int(stats[1])) if stats else None
        return Snapshot(runs, messages, counters, owners.keys, outbox, problems)

    # --- audit -----------------------------------------------------------------------------

    def _audit(self, conn: apsw.Connection) -> list[str]:
        """Verify the rows after the last one verified (and that one again: a crash must
        not have changed it), then that the head points at the last row."""
        prev_seq, prev_hash = self._audit_seq, self._audit_hash
        for seq, run_id, event, step, detail, at, row_prev, row_hash in conn.execute(
            _AUDIT_SQL, (max(prev_seq, 1),)
        ):
            if seq == self._audit_seq:
                if row_hash != self._audit_hash:
                    return [f"audit row {seq} changed after it was verified"]
                continue
            if seq != prev_seq + 1:
                return [f"audit chain: row {prev_seq + 1} is missing"]
            if row_prev != prev_hash:
                return [f"audit chain: row {seq}'s prev_hash does not match row {prev_seq}"]
            ev = AuditEvent(run_id, event, at, step, json.loads(detail))
            if link(prev_hash, seq, ev) != row_hash:
                return [f"audit chain: row {seq} does not match its hash (edited)"]
            prev_seq, prev_hash = seq, row_hash
        head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        head_seq, head_hash = (int(head[0]), str(head[1])) if head else (0, GENESIS)
        if (head_seq, head_hash) != (prev_seq, prev_hash):
            return [f"audit chain: the head says row {head_seq} but the log ends at {prev_seq}"]
        self._audit_seq, self._audit_hash = prev_seq, prev_hash
        return []

    def _full_audit(self) -> list[str]:
        """The whole chain, the way ``tillflow audit verify`` checks it."""
        from edge.engine import Engine
        from edge.store.sqlite import SqliteStore

        store = SqliteStore(self.db, migrate=False)
        try:
            engine = Engine(store)
            report = engine.verify_audit()
            engine.close()
        finally:
            store.close()
        return [] if report.ok else [f"tillflow audit verify: {report}"]
