"""Invariant 2 (DESIGN.md), checked one way for both tortures: the kill -9 torture
(``hwsim.killcheck``) and the power-cut torture (``hwsim.cutcheck``).

Each torture reads its terminal its own way (the kill torture opens the crashed
database read-only with SQL; the cut torture asks the rebooted terminal's store) into
one ``Snapshot``: its runs, every message it ever recorded (those still in the outbox
and those the cloud already holds), its counters, and the key of every operation its
steps may have presented to the acquirer. ``check(snapshot, ledger, book, final=...)``
then lists the violations, each a sentence:

* what the POS saw: one run per idempotency key, every run the POS was answered with
  exists under that key, every run's key was sent by the POS, and what the POS was
  told as final is what the database says;
* messages: no run has two messages of one kind; every approved payment, refund and
  void has exactly one; a finished payment has exactly the messages its end calls for
  (its decision, and ``unknown`` first if its outcome ever was);
* unknown outcomes: one that was recorded told the cloud (in the same commit); the
  final message comes after it; no sale finishes ``unknown``;
* money (the acquirer's ledger): every charge belongs to a run; no run is charged twice,
  whatever keys it used; an approval is made under its step's operation key, and holds
  exactly one charge unless voided; a charge not reversed belongs to an approved
  payment or to one whose reversal is pending (``money_may_be_held``); an offline
  approval never reached the acquirer; a refund refunded at most once, exactly once if
  approved;
* counters: the offline exposure equals the offline approvals neither voided nor
  acknowledged by the cloud (released exactly once per acknowledged offline approval:
  the acknowledgement is cut and killed like everything else); a payment's refund
  counter equals its refunds' claims; the outbox counter equals the outbox;
* ``final=True`` (after recovery): every run finished, no reversal pending.

Keys are never rebuilt from YAML step names: a run's keys are the operation keys its
step rows record (``StepRecord.operation_key``), the idempotency keys of their attempts
(``attempt_keys``: a retry presenting another key is still traced to its run), and those
of the step its cursor is on (in flight, no row yet). The key a run's state records
(``auth_key``) must be one of them.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hwsim.acquirer import LedgerEntry

from edge.engine.context import idempotency_key
from edge.store.base import OUTBOX_COUNTER
from edge.terminal.sale.risk import released_marker

__all__ = [
    "TERMINAL_STATUSES",
    "UNKNOWN",
    "Message",
    "Owners",
    "PosBook",
    "PosOutcome",
    "Run",
    "Snapshot",
    "attempt_keys",
    "check",
    "money_may_be_held",
    "reversal_pending",
]

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "ROLLED_BACK", "CANCELLED"})
#: A payment decision while the acquirer may hold money the terminal is releasing.
UNKNOWN = "unknown"
#: Attempts of a step whose idempotency keys are traced back to its run: a retried step
#: presents a new key per attempt, so a second charge under another attempt's key is
#: still found (and counted as the double charge it is).
TRACED_ATTEMPTS = 5
#: Where a payment may hold money (edge/terminal/sale/workflows/payment.yaml, void.yaml): the
#: step whose answer is not recorded yet, and the steps that release it. Only the money
#: rules read step names, and only to say where a run is; keys come from the rows.
AUTHORIZE, REVERSE_UNKNOWN, VOID_REVERSE = "authorize_online", "reverse_unknown", "reverse_payment"
#: The offline exposure counter's name (``edge.terminal.sale.risk.OFFLINE``).
OFFLINE_COUNTER = "offline"


def attempt_keys(run_id: str, path: str) -> list[str]:
    """Every key a step at ``path`` may present: its operation key is the first
    attempt's idempotency key (``edge.engine.context.operation_key``), then one per
    retry."""
    return [idempotency_key(run_id, path, a) for a in range(1, TRACED_ATTEMPTS + 1)]


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
    """What the simulated POS sent and was told, by its idempotency key (the POS's own:
    the run carries ``pos:<workflow>:<key>``)."""

    sent: dict[str, str] = field(default_factory=dict)  # key -> kind
    run_ids: dict[str, str] = field(default_factory=dict)  # key -> first run id answered
    outcomes: dict[str, PosOutcome] = field(default_factory=dict)  # key -> final answer
    anomalies: list[str] = field(default_factory=list)
    retried: int = 0  # transactions that needed a retry after a kill
    retries: int = 0  # requests sent again after a kill
    #: Keys whose run the POS was shown as ``unknown``/``reversal_pending`` on the way.
    pending_seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: False when ``sent`` is not known whole (the cut torture's book holds answers only).
    knows_sent: bool = True

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
                knows_sent=self.knows_sent,
            )


def pos_key(run_key: str) -> str:
    """The POS's key inside the run's (the API prefixes it: ``pos:<workflow>:<key>``)."""
    return run_key.rsplit(":", 1)[-1]


# --- the terminal as read -----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run as the checks see it: its row, and the top of its cursor while in flight."""

    run_id: str
    workflow: str
    status: str
    key: str | None  # the run's idempotency key
    state: Mapping[str, Any]
    step: str | None = None  # the top of the cursor: where it is, or None once finished
    error: Any = None

    def _str(self, name: str) -> str | None:
        value = self.state.get(name)
        return None if value is None else str(value)

    @property
    def decision(self) -> str | None:
        return self._str("decision")

    @property
    def channel(self) -> str | None:
        return self._str("channel")

    @property
    def offline(self) -> bool:
        return bool(self.state.get("offline"))

    @property
    def amount(self) -> int:
        return int(self.state.get("amount_minor") or 0)

    @property
    def auth_key(self) -> str | None:
        return self._str("auth_key")

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def went_unknown(self) -> bool:
        """A payment whose authorisation was recorded as of unknown outcome (and reversed,
        once it is declined): the outcome keeps the key in its state."""
        return (
            self.workflow == "payment"
            and self.auth_key is not None
            and self.decision in (UNKNOWN, "declined")
        )

    @property
    def reversal_pending(self) -> bool:
        return reversal_pending(self.workflow, self.status, self.decision, self.step)

    def where(self) -> str:
        at = f" at {self.step}" if self.step and not self.finished else ""
        return f"{self.status}, {self.decision}{at}"


@dataclass(frozen=True)
class Message:
    """One outbox message the terminal recorded. ``acknowledged``: the cloud holds it and
    the terminal dropped it (only an acknowledgement removes a message)."""

    message_id: str
    run_id: str | None
    topic: str
    payload: Mapping[str, Any]
    seq: int
    acknowledged: bool = False

    @property
    def decision(self) -> Any:
        return self.payload.get("decision")


@dataclass
class Snapshot:
    """A terminal as one torture read it, for ``check``."""

    runs: Mapping[str, Run]
    #: Every message recorded: still in the outbox, or acknowledged (the cloud's copy).
    messages: Sequence[Message]
    counters: Mapping[str, tuple[int, int]]
    #: Acquirer key -> (run id, workflow): every key a run's steps may have presented.
    owners: Mapping[str, tuple[str, str]]
    #: The outbox as it stands: (payload bytes, messages); None if not read.
    outbox: tuple[int, int] | None = None
    #: Found while reading (say, a message the cloud holds that changed since).
    problems: list[str] = field(default_factory=list)


class Owners:
    """Builds ``Snapshot.owners``: call ``step`` for each step row (its path, and the
    operation key it records) and for the step each run in flight is on (no row yet:
    ``operation_key`` None)."""

    def __init__(self, keys: dict[str, tuple[str, str]] | None = None) -> None:
        self.keys: dict[str, tuple[str, str]] = {} if keys is None else keys
        self._paths: set[tuple[str, str]] = set()

    def step(self, run_id: str, workflow: str, path: str, operation_key: str | None) -> None:
        if operation_key:
            self.keys[operation_key] = (run_id, workflow)
        if (run_id, path) not in self._paths:
            self._paths.add((run_id, path))
            for key in attempt_keys(run_id, path):
                self.keys.setdefault(key, (run_id, workflow))


# --- the checks ------------------------------------------------------------------------------


def check(
    snap: Snapshot,
    ledger: Mapping[str, LedgerEntry],
    book: PosBook | None,
    *,
    final: bool,
) -> list[str]:
    """Every violation of invariant 2 in ``snap``, against the acquirer's ``ledger`` (every
    entry of this terminal) and what the POS was told (``book``; None: not checked).
    ``final``: after recovery, when every run must have finished."""
    problems = list(snap.problems)
    if book is not None:
        problems += _pos(snap.runs, book)
    problems += _messages(snap)
    problems += _unknown_outcomes(snap)
    problems += _money(snap, ledger)
    problems += _counters(snap)
    if final:
        problems += _unfinished(snap.runs)
    return problems


def _pos(runs: Mapping[str, Run], book: PosBook) -> list[str]:
    problems = list(book.anomalies)
    by_key: dict[str, list[Run]] = {}
    for r in runs.values():
        if r.key is not None:
            by_key.setdefault(pos_key(r.key), []).append(r)
        elif r.workflow in ("payment", "refund", "void"):
            problems.append(f"{r.workflow} run {r.run_id} has no idempotency key")
    for key, found in by_key.items():
        if len(found) > 1:
            ids = ", ".join(sorted(r.run_id for r in found))
            problems.append(f"key {key} has {len(found)} runs: {ids}")
        if book.knows_sent and key not in book.sent:
            problems.append(f"run {found[0].run_id} has key {key}, which the POS never sent")
    for key, run_id in book.run_ids.items():
        found = by_key.get(key, [])
        if run_id not in {r.run_id for r in found}:
            gone = "" if run_id in runs else f" (run {run_id} is gone)"
            problems.append(
                f"{book.sent.get(key)} {key}: the POS was answered with run {run_id}, which "
                f"the database does not hold under that key{gone}"
            )
    for key, seen in book.outcomes.items():
        run = runs.get(seen.run_id)
        if run is None:
            continue  # reported above
        if (run.status, run.decision) != (seen.status, seen.decision):
            problems.append(
                f"{seen.kind} {key}: the POS was told {seen.decision} ({seen.status}), the "
                f"database says {run.status}/{run.decision} for run {run.run_id}"
            )
    return problems


def _by_run(messages: Iterable[Message]) -> dict[tuple[str | None, str], list[Message]]:
    out: dict[tuple[str | None, str], list[Message]] = defaultdict(list)
    for m in messages:
        out[(m.run_id, m.topic)].append(m)
    return out


def _decisions(msgs: Sequence[Message]) -> list[str]:
    return sorted(str(m.decision) for m in msgs)


def _messages(snap: Snapshot) -> list[str]:
    kinds = Counter((m.run_id, m.topic, m.decision) for m in snap.messages)
    problems = [
        f"run {run_id} has {n} '{topic}' messages with decision {decision}"
        for (run_id, topic, decision), n in kinds.items()
        if n > 1
    ]
    by_run = _by_run(snap.messages)
    for r in snap.runs.values():
        approved = r.decision == "approved" and (
            # An approved refund whose receipt failed for good ends FAILED: the money is
            # the customer's (refund.yaml's refund_is_final refuses to undo it).
            r.status == "COMPLETED" or (r.workflow == "refund" and r.status == "FAILED")
        )
        kept = kinds[(r.run_id, r.workflow, "approved")]
        if approved and r.workflow in ("payment", "refund", "void") and kept == 0:
            problems.append(
                f"approved {r.workflow} {r.run_id} is missing from the outbox (and the "
                "cloud never got it)"
            )
        if r.finished and r.workflow == "payment":
            problems += _payment_messages(r, by_run[(r.run_id, "payment")])
        elif r.finished and r.workflow == "refund":
            problems += _refund_messages(r, by_run[(r.run_id, "refund")])
    return problems


def _payment_messages(r: Run, msgs: Sequence[Message]) -> list[str]:
    """A finished payment's messages: its decision, after ``unknown`` if it went so."""
    who, decision = f"payment {r.run_id}", r.decision
    unknown = [UNKNOWN] if r.went_unknown else []
    if r.status == "COMPLETED":
        want = sorted([str(decision), *unknown])
        if _decisions(msgs) != want:
            wanted = f"want {want}" if unknown else f"want one {decision}"
            return [f"{who} {decision}: messages {_decisions(msgs)} ({wanted})"]
    elif r.status == "ROLLED_BACK":
        want = sorted((["reversed"] if decision == "reversed" else []) + unknown)
        if _decisions(msgs) != want:
            return [f"{who} rolled back: messages {_decisions(msgs)} (want {want})"]
    else:
        return [f"{who} ended {r.status} ({decision}): {r.error}"]
    return []


def _refund_messages(r: Run, msgs: Sequence[Message]) -> list[str]:
    who, decision = f"refund {r.run_id}", r.decision
    problems = []
    if r.status != "COMPLETED" and not (r.status == "FAILED" and decision == "approved"):
        problems.append(f"{who} ended {r.status} ({decision}): {r.error}")
    if _decisions(msgs) != [str(decision)]:
        problems.append(f"{who} {decision}: messages {_decisions(msgs)} (want one {decision})")
    return problems


def _unknown_outcomes(snap: Snapshot) -> list[str]:
    """An authorisation of unknown outcome is told to the cloud when it is recorded, and
    how it ended once it has; a finished sale never stays unknown."""
    problems: list[str] = []
    by_run = _by_run(snap.messages)
    for r in snap.runs.values():
        if r.workflow != "payment":
            continue
        msgs = by_run[(r.run_id, "payment")]
        told = [m for m in msgs if m.decision == UNKNOWN]
        later = [m for m in msgs if m.decision != UNKNOWN]
        if r.finished and r.decision == UNKNOWN:
            problems.append(f"payment {r.run_id} ended {r.status} with decision unknown")
        if r.went_unknown and not told:
            problems.append(
                f"payment {r.run_id} ({r.where()}) went through an unknown outcome that the "
                "outbox never recorded (no 'unknown' message was recorded): the cloud is "
                "not told the customer may be charged"
            )
        if told and later and min(m.seq for m in later) < max(m.seq for m in told):
            final = sorted({str(m.decision) for m in later})
            problems.append(
                f"payment {r.run_id}: its final '{'/'.join(final)}' message comes before "
                "its 'unknown' one"
            )
        if not told or not r.finished or r.decision == UNKNOWN:
            continue
        final_n = sum(1 for m in later if m.decision == r.decision)
        if final_n != 1:
            problems.append(
                f"payment {r.run_id} ({r.status}, {r.decision}) has an 'unknown' message "
                f"but {final_n} final '{r.decision}' message(s)"
            )
    return problems


def _money(snap: Snapshot, ledger: Mapping[str, LedgerEntry]) -> list[str]:
    problems: list[str] = []
    runs = snap.runs
    released = {e.reverses for e in ledger.values() if e.operation == "reverse" and e.effect}
    charges: Counter[str] = Counter()  # run -> charges not reversed
    touched: Counter[str] = Counter()  # run -> authorisations sent at all
    refunds: Counter[str] = Counter()
    for key, entry in ledger.items():
        if entry.operation == "reverse":
            continue
        owner = snap.owners.get(key)
        if owner is None:
            if entry.effect:
                problems.append(
                    f"acquirer {entry.operation} of {entry.amount_minor} under key {key} "
                    "moved money for no run in the database (it belongs to no run)"
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
    voids = [r for r in runs.values() if r.workflow == "void"]
    voided = {r.state.get("payment_run_id") for r in voids if r.state.get("reversed")}
    voiding = {r.state.get("payment_run_id") for r in voids if not r.finished}
    for r in runs.values():
        if r.workflow == "payment":
            problems += _payment_money(r, charges[r.run_id], touched[r.run_id], snap, ledger,
                                       voided=r.run_id in voided, voiding=r.run_id in voiding,
                                       released=released)  # fmt: skip
        elif r.workflow == "refund":
            problems += _refund_money(r, refunds[r.run_id], ledger)
    return problems


def _payment_money(
    r: Run,
    n: int,
    touched: int,
    snap: Snapshot,
    ledger: Mapping[str, LedgerEntry],
    *,
    voided: bool,
    voiding: bool,
    released: set[str | None],
) -> list[str]:
    problems = []
    who = f"payment {r.run_id}"
    if n > 1:
        problems.append(f"{who} is charged {n} times (double charge)")
    if voiding:
        return problems  # a void in flight may have released it or not yet
    if r.offline and touched:
        problems.append(f"offline {who} reached the acquirer")
    why = money_may_be_held(r.status, r.decision, r.step, offline=r.offline)
    if n == 1 and (why is None or voided):
        problems.append(
            f"{who} ({r.where()}, {'voided' if voided else 'not voided'}) holds 1 charge(s) "
            f"at the acquirer, expected 0: {r.decision or r.status} but the card is "
            "charged: money held with no approved run and no pending reversal"
        )
    online = r.decision == "approved" and not r.offline and r.channel == "online"
    if r.status == "COMPLETED" and online and not voided:
        if n == 0:
            problems.append(
                f"{who} ({r.status}, {r.decision}, not voided) holds 0 charge(s) at the "
                "acquirer, expected 1"
            )
        key = r.auth_key
        entry = None if key is None else ledger.get(key)
        if key is None or snap.owners.get(key) != (r.run_id, "payment"):
            problems.append(
                f"{who} approved online under key {key}, which is not an operation key of its steps"
            )
        elif entry is None or not entry.effect or key in released:
            problems.append(f"{who} approved online, but the acquirer holds no charge under {key}")
    return problems


def _refund_money(r: Run, n: int, ledger: Mapping[str, LedgerEntry]) -> list[str]:
    who = f"refund {r.run_id}"
    key = r.state.get("refund_key")
    entry = None if key is None else ledger.get(str(key))
    if n > 1:
        return [f"{who} refunded {n} times"]
    if r.finished and r.decision == "approved" and (n != 1 or entry is None or not entry.effect):
        return [f"{who} approved, but the acquirer holds no refund under {key}"]
    if r.finished and n and r.decision not in ("approved", UNKNOWN):
        return [f"{who} is {r.decision} but the acquirer refunded under {key}"]
    return []


def _counters(snap: Snapshot) -> list[str]:
    problems = []
    acked = {
        m.run_id
        for m in snap.messages
        if m.acknowledged
        and m.topic == "payment"
        and m.decision == "approved"
        and m.payload.get("offline")
    }
    voids_released = {
        str(r.state.get("payment_run_id"))
        for r in snap.runs.values()
        if r.workflow == "void" and r.state.get("released")
    }
    amount = count = 0
    twice = []
    for r in snap.runs.values():
        if r.workflow != "payment" or r.decision != "approved" or not r.offline:
            continue
        # Acknowledged, voided, or both (a void, then the cloud's ack of the approval):
        # given back once either way, which the payment's release marker records.
        gone = r.run_id in acked or r.run_id in voids_released
        marker = snap.counters.get(released_marker(r.run_id), (0, 0))[1]
        if marker != int(gone):
            twice.append((r.run_id, marker, gone))
        if not gone:
            amount, count = amount + r.amount, count + 1
    held = tuple(snap.counters.get(OFFLINE_COUNTER, (0, 0)))
    if held != (amount, count):
        problems.append(
            f"offline exposure counter is {held[0]} in {held[1]}, the runs record {amount} "
            f"in {count} not yet acknowledged nor voided ({len(acked)} acknowledged): the "
            "offline counter is not released exactly once per acknowledged offline approval"
        )
    problems += [
        f"offline payment {run_id}'s release marker is {marker}, but it was "
        f"{'acknowledged or voided' if gone else 'neither acknowledged nor voided'}: its "
        "exposure was not given back exactly once"
        for run_id, marker, gone in twice
    ]
    claims: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in snap.runs.values():
        claimed = int(r.state.get("claimed_minor") or 0)
        original = r.state.get("original_run_id")
        if r.workflow == "refund" and original and claimed:
            claims[str(original)][0] += claimed
            claims[str(original)][1] += 1
    for original, claim in claims.items():
        counted = tuple(snap.counters.get(f"refund:{original}", (0, 0)))
        if counted != tuple(claim):
            problems.append(
                f"refund counter of {original} {counted} != refund claims {tuple(claim)}"
            )
    counted = snap.counters.get(OUTBOX_COUNTER)
    if snap.outbox is not None and counted is not None and tuple(counted) != snap.outbox:
        problems.append(
            f"outbox counter {counted} != outbox "
            f"({snap.outbox[0]} bytes, {snap.outbox[1]} messages)"
        )
    return problems


def _unfinished(runs: Mapping[str, Run]) -> list[str]:
    return [
        f"{r.workflow} run {r.run_id} still has a reversal pending after recovery "
        f"({r.where()}): money the customer may be charged is not released"
        if r.reversal_pending
        else f"{r.workflow} run {r.run_id} is {r.status} after recovery: still {r.status}, "
        "not finished"
        for r in runs.values()
        if not r.finished
    ]
