"""The power-cut tortures' checker (DESIGN.md invariant 2), and the cloud's side of the outbox.

``check_invariants``: given a terminal after recovery, what the POS was told, the
acquirer's ledger and what the cloud already received, it lists every violation:
integrity, runs left in flight, the audit chain, payments the POS saw approved that are
missing or doubled, outbox messages missing or doubled, charges the terminal does not
account for (or accounts for twice), counters that disagree with the runs.

``check_in_flight``: the database as a cut left it, before recovery: money held at the
acquirer belongs to an approved run or to one whose reversal is pending, and a payment
recorded as ``unknown`` has told the cloud so.

``_upload`` is the sync client (the cloud receives the outbox, the terminal drops it).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping

from hwsim.acquirer import LedgerEntry
from hwsim.cutrig import _ALL, _IN_FLIGHT, Seen
from hwsim.killcheck import money_may_be_held, reversal_pending

from edge.engine import RunRecord, Status
from edge.engine.context import idempotency_key
from edge.engine.records import Acknowledgement, OutboxMessage
from edge.store.base import OUTBOX_COUNTER
from edge.terminal.risk import OFFLINE
from edge.terminal.runtime import Terminal

__all__ = ["check_in_flight", "check_invariants"]


# --- the cloud's side of the outbox ----------------------------------------------------------


def _upload(terminal: Terminal, cloud: dict[str, OutboxMessage]) -> None:
    """The sync client: the cloud receives every message, then the terminal drops them."""
    last = 0
    while True:
        page = terminal.store.outbox(after_seq=last, limit=500)
        if not page:
            break
        for msg in page:
            cloud.setdefault(msg.message_id, msg)
        last = page[-1].seq or last
    if last:
        terminal.store.acknowledge(Acknowledgement(outbox_through=last))


def _all_messages(
    terminal: Terminal, cloud: Mapping[str, OutboxMessage], violations: list[str]
) -> list[OutboxMessage]:
    by_id = dict(cloud)
    after = 0
    while True:
        page = terminal.store.outbox(after_seq=after, limit=500)
        for msg in page:
            earlier = by_id.get(msg.message_id)
            if earlier is not None and earlier.payload != msg.payload:
                violations.append(f"message {msg.message_id} changed after it was uploaded")
            by_id[msg.message_id] = msg
        if len(page) < 500:
            return list(by_id.values())
        after = page[-1].seq or after


# --- the checker -------------------------------------------------------------------------


def _auth_key(run_id: str) -> str:
    return idempotency_key(run_id, "authorize_online", 1)


def _refund_key(run_id: str) -> str:
    return idempotency_key(run_id, "authorize_refund", 1)


def check_in_flight(
    terminal: Terminal,
    *,
    ledger: Mapping[str, LedgerEntry],
    cloud: Mapping[str, OutboxMessage] | None = None,
) -> list[str]:
    """The violations of a database as a cut left it, before recovery: money held at the
    acquirer (an approved authorisation not reversed) by a payment in flight that is
    neither approving (``money_may_be_held``) nor reversing it; a payment recorded as
    ``unknown`` whose message the cloud would never get. (Finished runs are
    ``check_invariants``' to judge, after recovery.)"""
    v: list[str] = []
    reversed_keys = {e.reverses for e in ledger.values() if e.operation == "reverse" and e.effect}
    runs = terminal.store.list_runs(_IN_FLIGHT, limit=_ALL)
    unknown_told = {
        m.run_id
        for m in _all_messages(terminal, cloud or {}, v)
        if m.topic == "payment" and m.payload.get("decision") == "unknown"
    }
    for run in runs:
        if run.workflow_type != "payment":
            continue
        key, decision, step = _auth_key(run.run_id), run.state.get("decision"), _step(run)
        entry = ledger.get(key)
        charged = entry is not None and entry.effect and key not in reversed_keys
        offline = bool(run.state.get("offline"))
        if charged and money_may_be_held(str(run.status), decision, step, offline=offline) is None:
            v.append(
                f"payment {run.run_id} ({run.status}, {decision} at {step}) holds a charge "
                f"under {key}: money held with no approved run and no pending reversal"
            )
        if decision == "unknown" and run.run_id not in unknown_told:
            v.append(
                f"payment {run.run_id} is unknown at {step} but no 'unknown' message was "
                "recorded: the cloud is not told the customer may be charged"
            )
    return v


def _step(run: RunRecord) -> str | None:
    frames = run.cursor.get("frames") or []
    return str(frames[-1][0]) if frames else None


def _pending(run: RunRecord) -> bool:
    """Still releasing money the customer may be charged (``killcheck.reversal_pending``)."""
    return reversal_pending(
        run.workflow_type, str(run.status), run.state.get("decision"), _step(run)
    )


def _went_unknown(run: RunRecord) -> bool:
    """An authorisation recorded as of unknown outcome (and reversed, once declined)."""
    return run.state.get("auth_key") is not None and run.state.get("decision") in (
        "unknown",
        "declined",
    )


def check_invariants(
    terminal: Terminal,
    *,
    seen: Mapping[str, Seen],
    ledger: Mapping[str, LedgerEntry],
    cloud: Mapping[str, OutboxMessage] | None = None,
) -> list[str]:
    """Every violation of invariant 2 in ``terminal``'s database after recovery.

    ``seen``: what the POS was told, by its idempotency key; ``ledger``: the acquirer's,
    every entry of this terminal; ``cloud``: messages the cloud received (and the
    terminal may since have dropped), by message id.
    """
    v: list[str] = []
    store = terminal.store
    integrity = store.integrity_check()
    if integrity != "ok":
        v.append(f"integrity_check: {integrity}")
        return v  # nothing below can be trusted
    report = terminal.engine.verify_audit()
    if not report.ok:
        v.append(str(report))
    runs = store.list_runs(None, limit=_ALL)
    by_id = {r.run_id: r for r in runs}
    by_pos: Counter[str] = Counter(r.idempotency_key for r in runs if r.idempotency_key)
    for run in runs:
        if run.status.terminal:
            continue
        if _pending(run):
            v.append(
                f"{run.workflow_type} {run.run_id} still has a reversal pending after "
                f"recovery ({run.status} at {_step(run)}): money not released"
            )
        else:
            v.append(f"{run.workflow_type} {run.run_id} is {run.status} after recovery")

    messages: dict[tuple[str | None, str], list[OutboxMessage]] = defaultdict(list)
    for msg in _all_messages(terminal, cloud or {}, v):
        messages[(msg.run_id, msg.topic)].append(msg)

    reversed_keys = {e.reverses for e in ledger.values() if e.operation == "reverse" and e.effect}
    known_keys: set[str] = set()
    offline = [0, 0]
    refund_claims: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for run in runs:
        if run.workflow_type == "payment":
            known_keys.add(_auth_key(run.run_id))
            v += _check_payment(run, messages[(run.run_id, "payment")], ledger, reversed_keys)
            approved = run.status is Status.COMPLETED and run.state.get("decision") == "approved"
            if approved and run.state.get("offline"):
                offline[0] += int(run.state["amount_minor"])
                offline[1] += 1
        elif run.workflow_type == "refund":
            known_keys.add(_refund_key(run.run_id))
            v += _check_refund(run, messages[(run.run_id, "refund")], ledger)
            claimed = int(run.state.get("claimed_minor") or 0)
            original = run.state.get("original_run_id")
            if original and claimed:
                refund_claims[original][0] += claimed
                refund_claims[original][1] += 1

    for key, entry in ledger.items():
        if entry.effect and entry.operation != "reverse" and key not in known_keys:
            v.append(
                f"acquirer {entry.operation} {key} ({entry.amount_minor}) moved money for "
                "no run in the database"
            )

    for pos_key, answer in seen.items():
        v += _check_seen(pos_key, answer, by_id.get(answer.run_id), by_pos[pos_key])

    counters = store.counters()
    if counters.get(OFFLINE, (0, 0)) != tuple(offline):
        v.append(
            f"offline counter {counters.get(OFFLINE, (0, 0))} != approved offline "
            f"payments {tuple(offline)}"
        )
    for original, claim in refund_claims.items():
        counted = counters.get(f"refund:{original}", (0, 0))
        if counted != tuple(claim):
            v.append(f"refund counter of {original} {counted} != refund claims {tuple(claim)}")
    if OUTBOX_COUNTER in counters:
        stats = store.outbox_stats()
        if counters[OUTBOX_COUNTER] != (stats.bytes, stats.depth):
            v.append(
                f"outbox counter {counters[OUTBOX_COUNTER]} != outbox "
                f"({stats.bytes} bytes, {stats.depth} messages)"
            )
    return v


def _decisions(msgs: list[OutboxMessage]) -> list[str]:
    return sorted(str(m.payload.get("decision")) for m in msgs)


def _check_payment(
    run: RunRecord,
    msgs: list[OutboxMessage],
    ledger: Mapping[str, LedgerEntry],
    reversed_keys: set[str | None],
) -> list[str]:
    v = []
    who = f"payment {run.run_id}"
    decision = run.state.get("decision")
    key = _auth_key(run.run_id)
    entry = ledger.get(key)
    charged = entry is not None and entry.effect and key not in reversed_keys
    # An unknown outcome is told once, when recorded; the final message follows it.
    unknown = ["unknown"] if _went_unknown(run) else []
    told = [m for m in msgs if m.payload.get("decision") == "unknown"]
    later = [m for m in msgs if m.payload.get("decision") != "unknown"]
    if told and later and min(m.seq or 0 for m in later) < max(m.seq or 0 for m in told):
        v.append(f"{who}: its final message comes before its 'unknown' one")
    if run.status is Status.COMPLETED:
        want = sorted([str(decision), *unknown])
        if decision == "unknown":
            v.append(f"{who} ended COMPLETED with decision unknown")
        if _decisions(msgs) != want:
            wanted = f"want {want}" if unknown else f"want one {decision}"
            v.append(f"{who} {decision}: messages {_decisions(msgs)} ({wanted})")
        online_ok = decision == "approved" and run.state.get("channel") == "online"
        if online_ok and not charged:
            v.append(f"{who} approved online, but the acquirer holds no charge under {key}")
        if online_ok and run.state.get("auth_key") != key:
            v.append(f"{who} approved under key {run.state.get('auth_key')}, not {key}")
        if charged and not online_ok:
            v.append(
                f"{who} is {decision} ({run.state.get('channel')}) but the card is charged: "
                "money held with no approved run and no pending reversal"
            )
    elif run.status is Status.ROLLED_BACK:
        want = sorted((["reversed"] if decision == "reversed" else []) + unknown)
        if _decisions(msgs) != want:
            v.append(f"{who} rolled back: messages {_decisions(msgs)} (want {want})")
        if charged:
            v.append(f"{who} rolled back but the card is still charged under {key}")
    else:
        v.append(f"{who} ended {run.status} ({decision}): {run.error}")
        if charged:
            v.append(f"{who} is {run.status} but the card is charged under {key}")
    return v


def _check_refund(
    run: RunRecord, msgs: list[OutboxMessage], ledger: Mapping[str, LedgerEntry]
) -> list[str]:
    v = []
    who = f"refund {run.run_id}"
    decision = run.state.get("decision")
    key = _refund_key(run.run_id)
    entry = ledger.get(key)
    refunded = entry is not None and entry.effect
    if run.status is not Status.COMPLETED:
        v.append(f"{who} ended {run.status} ({decision}): {run.error}")
    if _decisions(msgs) != [str(decision)]:
        v.append(f"{who} {decision}: messages {_decisions(msgs)} (want one {decision})")
    if decision == "approved" and (not refunded or run.state.get("refund_key") != key):
        v.append(f"{who} approved, but the acquirer holds no refund under {key}")
    if refunded and decision not in ("approved", "unknown"):
        v.append(f"{who} is {decision} but the acquirer refunded under {key}")
    return v


def _check_seen(pos_key: str, answer: Seen, run: RunRecord | None, runs_with_key: int) -> list[str]:
    told = f"the POS was told {answer.decision} ({answer.status}) for {pos_key}"
    if run is None:
        return [f"{told}, but run {answer.run_id} is gone"]
    v = []
    if runs_with_key != 1:
        v.append(f"{told}, and {runs_with_key} runs carry that key")
    if run.idempotency_key != pos_key:
        v.append(f"{told}, but run {run.run_id} carries key {run.idempotency_key}")
    if (str(run.status), run.state.get("decision")) != (answer.status, answer.decision):
        v.append(f"{told}, but run {run.run_id} is now {run.status} ({run.state.get('decision')})")
    return v
