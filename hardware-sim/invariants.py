"""Invariant 2 (DESIGN.md), checked one way for both tortures: the kill -9 torture
(``hwsim.killcheck``) and the power-cut torture (``hwsim.cutcheck``).

The data it reads (``Snapshot``, ``PosBook``, ``Run``, ``Message``, ``Owners``) and the
money rules they answer to live in ``hwsim.readings``. Each torture reads its terminal
its own way (the kill torture opens the crashed database read-only with SQL; the cut
torture asks the rebooted terminal's store) into one ``Snapshot``: its runs, every
message it ever recorded (those still in the outbox and those the cloud already holds),
its counters, and the key of every operation its steps may have presented to the
acquirer. ``check(snapshot, ledger, book, final=...)``
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

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from hwsim.acquirer import LedgerEntry
from hwsim.readings import (
    OFFLINE_COUNTER,
    TERMINAL_STATUSES,
    UNKNOWN,
    Message,
    Owners,
    PosBook,
    PosOutcome,
    Run,
    Snapshot,
    attempt_keys,
    money_may_be_held,
    pos_key,
    reversal_pending,
)

from edge.store.base import OUTBOX_COUNTER
from edge.terminal.sale.risk import released_marker

__all__ = [
    "OFFLINE_COUNTER",
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
    "pos_key",
    "reversal_pending",
]

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
