"""The kill torture's checker: what the POS saw, and invariant 2 against the database a
``kill -9`` left (``hwsim.killtorture`` runs it after every kill).

``Checker(db).check(ledger, book, final=...)`` opens the database read-only (the next
daemon must be the one to recover the WAL) and returns the violations it finds:

* ``PRAGMA integrity_check`` is ok, and the audit chain verifies;
* one run per idempotency key, every run the POS was answered with exists, and what the
  POS saw as final (approved, declined) is what the database says;
* every approved payment, refund and void has exactly one message in the outbox, and no
  run has two messages of one kind;
* money: every charge at the acquirer belongs to a payment run; no run is charged twice
  (whatever keys it used); a finished online approval holds exactly one charge unless
  voided, anything else none; an offline approval never reached the acquirer; a refund
  refunded at most once, and exactly once if approved;
* money held: a charge not reversed belongs to an approved payment (COMPLETED, or still
  running towards it: authorising, printing, recording) or to one whose reversal is
  pending (decision ``unknown`` at ``reverse_unknown``, or COMPENSATING an approval);
  "money held with no approved run and no pending reversal" is a violation, in flight
  too (``money_may_be_held``, which the power-cut torture shares);
* unknown outcomes: a payment whose decision is ``unknown`` has told the cloud (one
  ``unknown`` message, emitted in the same commit); a finished one that went through
  ``unknown`` has its final message after that one; none finishes ``unknown``;
* the offline exposure counter equals the unsent offline approvals the runs record;
* with ``final=True`` (after a graceful stop, the link up), every run is in a terminal
  state and no reversal is pending.

``Checker.pending`` lists the runs whose reversal was pending at the last check.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
from hwsim.acquirer import LedgerEntry

from edge.engine.audit import GENESIS, link
from edge.engine.context import idempotency_key
from edge.engine.records import AuditEvent

__all__ = [
    "TERMINAL_STATUSES",
    "Checker",
    "PosBook",
    "PosOutcome",
    "money_may_be_held",
    "reversal_pending",
]

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "ROLLED_BACK", "CANCELLED"})
#: A payment decision while the acquirer may hold money the terminal is releasing.
UNKNOWN = "unknown"
#: Steps the money rules look at (edge/terminal/workflows/payment.yaml, void.yaml).
AUTHORIZE, REVERSE_UNKNOWN, VOID_REVERSE = "authorize_online", "reverse_unknown", "reverse_payment"


def money_may_be_held(
    status: str, decision: str | None, step: str | None, *, offline: bool = False
) -> str | None:
    """Why a payment run in this ``status``, with this ``decision``, at this ``step``
    (the top of its cursor) may hold an authorisation the acquirer has not reversed; None
    when it may not: money held with no approved run and no pending reversal."""
    if offline:
        return None  # an offline approval never reached the acquirer
    if status == "COMPLETED":
        return "approved" if decision == "approved" else None
    if status == "COMPENSATING":
        return "reversing its approval" if decision == "approved" else None
    if status in TERMINAL_STATUSES:
        return None
    if step == AUTHORIZE:
        return "authorising (its answer not recorded yet)"
    if decision == UNKNOWN and step == REVERSE_UNKNOWN:
        return "reversal pending"
    if decision == "approved":
        return "approved, finishing"
    return None


def reversal_pending(workflow: str, status: str, decision: str | None, step: str | None) -> bool:
    """A run still releasing money the customer may be charged: a payment whose outcome is
    unknown or whose approval the saga reverses, a void retrying its reversal."""
    if status in TERMINAL_STATUSES:
        return False
    if workflow == "payment":
        return decision == UNKNOWN or status == "COMPENSATING"
    return workflow == "void" and step == VOID_REVERSE


# --- what the POS saw --------------------------------------------------------------------


@dataclass(frozen=True)
class PosOutcome:
    """A final answer the POS got: the run, its status and decision."""

    kind: str  # payment | refund | void
    run_id: str
    status: str
    decision: str | None
    channel: str | None = None
    reason: str | None = None


@dataclass
class PosBook:
    """What the simulated POS sent and was told, by its idempotency key."""

    sent: dict[str, str] = field(default_factory=dict)  # key -> kind
    run_ids: dict[str, str] = field(default_factory=dict)  # key -> first run id answered
    outcomes: dict[str, PosOutcome] = field(default_factory=dict)  # key -> final answer
    anomalies: list[str] = field(default_factory=list)
    retried: int = 0  # transactions that needed a retry after a kill
    retries: int = 0  # requests sent again after a kill
    #: Keys whose run the POS was shown as ``unknown``/``reversal_pending`` on the way.
    pending_seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> PosBook:
        with self.lock:
            return PosBook(
                dict(self.sent),
                dict(self.run_ids),
                dict(self.outcomes),
                list(self.anomalies),
                self.retried,
                self.retries,
                set(self.pending_seen),
            )


# --- the invariants -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    run_id: str
    workflow: str
    status: str
    key: str | None
    decision: str | None
    channel: str | None
    offline: bool
    amount: int
    payment_run_id: str | None
    reversed: bool
    released: bool
    step: str | None = None  # the top of the cursor: where it is, or None once finished
    reason: str | None = None
    auth_key: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def went_unknown(self) -> bool:
        """A payment whose authorisation was recorded as of unknown outcome (and reversed,
        once it is declined): ``_outcome_unknown`` keeps the key in its state."""
        return (
            self.workflow == "payment"
            and self.auth_key is not None
            and (self.decision in (UNKNOWN, "declined"))
        )

    @property
    def reversal_pending(self) -> bool:
        return reversal_pending(self.workflow, self.status, self.decision, self.step)

    def where(self) -> str:
        at = f" at {self.step}" if self.step and not self.finished else ""
        return f"{self.status}, {self.decision}{at}"


_RUNS_SQL = """
SELECT run_id, workflow_type, status, idempotency_key,
       json_extract(state, '$.decision'), json_extract(state, '$.channel'),
       json_extract(state, '$.offline'), json_extract(state, '$.amount_minor'),
       json_extract(state, '$.payment_run_id'), json_extract(state, '$.reversed'),
       json_extract(state, '$.released'), json_extract(cursor, '$.frames[#-1][0]'),
       json_extract(state, '$.reason'), json_extract(state, '$.auth_key')
FROM workflow_runs
"""
_OUTBOX_SQL = "SELECT run_id, topic, json_extract(payload, '$.decision'), seq FROM outbox"
_AUDIT_SQL = """
SELECT seq, run_id, event, step, detail, at, prev_hash, hash
FROM workflow_audit_log WHERE seq >= ? ORDER BY seq
"""

#: Attempts whose acquirer keys are traced back to their run: a retried step presents a
#: new key per attempt, so a second charge under another attempt's key is still found.
_TRACED_ATTEMPTS = 5
#: The step of each workflow that calls the acquirer under its own key.
_ACQUIRER_STEPS = {"payment": "authorize_online", "refund": "authorize_refund"}


class Checker:
    """The invariants of one terminal database, the acquirer's ledger and a POS's book.

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
        self._keys: dict[str, tuple[str, str]] = {}  # acquirer key -> (run id, workflow)
        self._traced: set[str] = set()
        #: Runs whose reversal was pending at the last check (``reversal_pending``).
        self.pending: list[str] = []
        #: Figures of the last check, for a tally: payments that went through an unknown
        #: outcome, how many of them finished, and whose authorisation the acquirer
        #: released (a reversal with an effect: the customer had been charged).
        self.figures: dict[str, int] = {}

    def check(
        self, ledger: Mapping[str, LedgerEntry], book: PosBook, *, final: bool = False
    ) -> list[str]:
        if not self.db.exists():  # killed before it first opened the database
            return [f"no database at {self.db}"] if book.run_ids else []
        try:
            return self._check(ledger, book, final=final)
        except apsw.Error as exc:
            return [f"the database does not open or read: {type(exc).__name__}: {exc}"]

    def _check(self, ledger: Mapping[str, LedgerEntry], book: PosBook, *, final: bool) -> list[str]:
        problems: list[str] = []
        conn = apsw.Connection(str(self.db), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            conn.set_busy_timeout(5_000)
            conn.execute("BEGIN")  # one snapshot for every read below
            integrity = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
            if integrity != ["ok"]:
                problems.append(f"PRAGMA integrity_check: {'; '.join(integrity[:3])}")
                return problems  # nothing else read from a corrupt file is worth checking
            runs = {row[0]: _run(row) for row in conn.execute(_RUNS_SQL)}
            messages: Counter[tuple[str, str, Any]] = Counter()
            first_seq: dict[tuple[str, str, Any], int] = {}  # a message's first seq
            for run_id, topic, decision, seq in conn.execute(_OUTBOX_SQL):
                messages[(str(run_id), str(topic), decision)] += 1
                first_seq.setdefault((str(run_id), str(topic), decision), int(seq))
            counters = {
                str(r[0]): (int(r[1]), int(r[2]))
                for r in conn.execute("SELECT name, amount, count FROM counters")
            }
            problems += self._audit(conn)
            conn.execute("COMMIT")
        finally:
            conn.close()
        self.pending = sorted(r.run_id for r in runs.values() if r.reversal_pending)
        problems += _pos(runs, book)
        problems += _outbox(runs, messages)
        problems += _unknown_outcomes(runs, messages, first_seq)
        problems += self._money(runs, ledger)
        problems += _offline_exposure(runs, counters)
        if final:
            problems += self._full_audit()
            problems += [
                f"{r.workflow} run {r.run_id} still has a reversal pending ({r.where()}) "
                "after recovery, a graceful stop and the link up: money the customer may "
                "be charged is not released"
                if r.reversal_pending
                else f"{r.workflow} run {r.run_id} is still {r.status} after recovery and a "
                "graceful stop"
                for r in runs.values()
                if not r.finished
            ]
        return problems

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

    # --- money -----------------------------------------------------------------------------

    def _trace(self, runs: Mapping[str, _Run]) -> None:
        """Learn the acquirer keys of runs not seen before."""
        for r in runs.values():
            step = _ACQUIRER_STEPS.get(r.workflow)
            if step is None or r.run_id in self._traced:
                continue
            self._traced.add(r.run_id)
            for attempt in range(1, _TRACED_ATTEMPTS + 1):
                self._keys[idempotency_key(r.run_id, step, attempt)] = (r.run_id, r.workflow)

    def _money(self, runs: Mapping[str, _Run], ledger: Mapping[str, LedgerEntry]) -> list[str]:
        self._trace(runs)
        problems: list[str] = []
        released = {e.reverses for e in ledger.values() if e.operation == "reverse" and e.effect}
        charges: Counter[str] = Counter()  # run -> charges not reversed
        touched: Counter[str] = Counter()  # run -> authorisations sent at all
        refunds: Counter[str] = Counter()
        for key, entry in ledger.items():
            if entry.operation == "reverse":
                continue
            owner = self._keys.get(key)
            if owner is None:
                if entry.effect:
                    problems.append(
                        f"acquirer {entry.operation} of {entry.amount_minor} under key {key} "
                        "belongs to no run in the database"
                    )
                continue
            run_id, workflow = owner
            if entry.operation == "authorize" and workflow == "payment":
                touched[run_id] += 1
                if entry.effect and key not in released:
                    charges[run_id] += 1
            elif entry.operation == "refund" and workflow == "refund" and entry.effect:
                refunds[run_id] += 1
            elif entry.effect:
                problems.append(f"acquirer {entry.operation} under key {key} from a {workflow}")
        unknown = [r for r in runs.values() if r.went_unknown]
        self.figures = {
            "went_unknown": len(unknown),
            "finished_after_unknown": sum(1 for r in unknown if r.finished),
            "released_after_unknown": sum(
                1 for r in unknown if idempotency_key(r.run_id, AUTHORIZE, 1) in released
            ),
        }
        voided = {r.payment_run_id for r in runs.values() if r.workflow == "void" and r.reversed}
        voiding = {
            r.payment_run_id for r in runs.values() if r.workflow == "void" and not r.finished
        }
        for r in runs.values():
            if r.workflow == "payment":
                n = charges[r.run_id]
                if n > 1:
                    problems.append(f"payment {r.run_id} is charged {n} times (double charge)")
                if r.run_id in voiding:
                    continue  # a void in flight may have released it or not yet
                if r.offline and touched[r.run_id]:
                    problems.append(f"offline payment {r.run_id} reached the acquirer")
                why = money_may_be_held(r.status, r.decision, r.step, offline=r.offline)
                if n == 1 and (why is None or r.run_id in voided):
                    problems.append(
                        f"payment {r.run_id} ({r.where()}, "
                        f"{'voided' if r.run_id in voided else 'not voided'}) holds 1 "
                        "charge(s) at the acquirer, expected 0: money held with no approved "
                        "run and no pending reversal"
                    )
                online = r.decision == "approved" and not r.offline
                if r.status == "COMPLETED" and online and r.run_id not in voided and n == 0:
                    problems.append(
                        f"payment {r.run_id} ({r.status}, {r.decision}, not voided) holds 0 "
                        "charge(s) at the acquirer, expected 1"
                    )
            elif r.workflow == "refund":
                n = refunds[r.run_id]
                if n > 1:
                    problems.append(f"refund {r.run_id} refunded {n} times")
                elif r.finished and r.decision == "approved" and n != 1:
                    problems.append(f"refund {r.run_id} was approved but never refunded")
                elif r.finished and r.decision == "declined" and n:
                    problems.append(f"refund {r.run_id} was declined but refunded")
        return problems


def _run(row: tuple[Any, ...]) -> _Run:
    return _Run(
        run_id=str(row[0]),
        workflow=str(row[1]),
        status=str(row[2]),
        key=None if row[3] is None else str(row[3]),
        decision=None if row[4] is None else str(row[4]),
        channel=None if row[5] is None else str(row[5]),
        offline=bool(row[6]),
        amount=int(row[7] or 0),
        payment_run_id=None if row[8] is None else str(row[8]),
        reversed=bool(row[9]),
        released=bool(row[10]),
        step=None if row[11] is None else str(row[11]),
        reason=None if row[12] is None else str(row[12]),
        auth_key=None if row[13] is None else str(row[13]),
    )


def _pos_key(run_key: str) -> str:
    """The POS's key inside the run's (the API prefixes it: ``pos:<workflow>:<key>``)."""
    return run_key.rsplit(":", 1)[-1]


def _pos(runs: Mapping[str, _Run], book: PosBook) -> list[str]:
    problems = list(book.anomalies)
    by_key: dict[str, list[_Run]] = {}
    for r in runs.values():
        if r.key is not None:
            by_key.setdefault(_pos_key(r.key), []).append(r)
        elif r.workflow in ("payment", "refund", "void"):
            problems.append(f"{r.workflow} run {r.run_id} has no idempotency key")
    for key, found in by_key.items():
        if len(found) > 1:
            ids = ", ".join(sorted(r.run_id for r in found))
            problems.append(f"key {key} has {len(found)} runs: {ids}")
        if key not in book.sent:
            problems.append(f"run {found[0].run_id} has key {key}, which the POS never sent")
    for key, run_id in book.run_ids.items():
        found = by_key.get(key, [])
        if run_id not in {r.run_id for r in found}:
            problems.append(
                f"{book.sent.get(key)} {key}: the POS was answered with run {run_id}, which "
                "the database does not hold under that key"
            )
    for key, seen in book.outcomes.items():
        run = runs.get(seen.run_id)
        if run is None:
            continue  # reported above
        if (run.status, run.decision) != (seen.status, seen.decision):
            problems.append(
                f"{seen.kind} {key}: the POS was told {seen.status}/{seen.decision}, the "
                f"database says {run.status}/{run.decision}"
            )
    return problems


def _outbox(runs: Mapping[str, _Run], messages: Counter[tuple[str, str, Any]]) -> list[str]:
    problems = [
        f"run {run_id} has {n} '{topic}' messages with decision {decision}"
        for (run_id, topic, decision), n in messages.items()
        if n > 1
    ]
    for r in runs.values():
        approved = r.decision == "approved" and (
            r.status == "COMPLETED" or (r.workflow == "refund" and r.status == "FAILED")
        )
        kept = messages[(r.run_id, r.workflow, "approved")]
        if approved and r.workflow in ("payment", "refund", "void") and kept != 1:
            problems.append(f"approved {r.workflow} {r.run_id} is missing from the outbox")
    return problems


def _unknown_outcomes(
    runs: Mapping[str, _Run],
    messages: Counter[tuple[str, str, Any]],
    first_seq: Mapping[tuple[str, str, Any], int],
) -> list[str]:
    """An authorisation of unknown outcome is told to the cloud when it is recorded, and
    how it ended once it has; a finished sale never stays unknown."""
    problems: list[str] = []
    for r in runs.values():
        if r.workflow != "payment":
            continue
        unknown = messages[(r.run_id, "payment", UNKNOWN)]
        if r.finished and r.decision == UNKNOWN:
            problems.append(f"payment {r.run_id} ended {r.status} with decision unknown")
        if r.went_unknown and not unknown:
            problems.append(
                f"payment {r.run_id} ({r.where()}) went through an unknown outcome that the "
                "outbox never recorded: the cloud is not told the customer may be charged"
            )
        if not unknown or not r.finished or r.decision == UNKNOWN:
            continue
        final = (r.run_id, "payment", r.decision)
        if messages[final] != 1:
            problems.append(
                f"payment {r.run_id} ({r.status}, {r.decision}) has an 'unknown' message "
                f"but {messages[final]} final '{r.decision}' message(s)"
            )
        elif first_seq[final] < first_seq[(r.run_id, "payment", UNKNOWN)]:
            problems.append(
                f"payment {r.run_id}: its final '{r.decision}' message comes before its "
                "'unknown' one"
            )
    return problems


def _offline_exposure(
    runs: Mapping[str, _Run], counters: Mapping[str, tuple[int, int]]
) -> list[str]:
    amount = count = 0
    for r in runs.values():
        if r.workflow == "payment" and r.decision == "approved" and r.offline:
            amount, count = amount + r.amount, count + 1
        elif r.workflow == "void" and r.released:
            amount, count = amount - r.amount, count - 1
    held = counters.get("offline", (0, 0))
    if held != (amount, count):
        return [
            f"offline exposure counter is {held[0]} in {held[1]}, the runs record "
            f"{amount} in {count}"
        ]
    return []
