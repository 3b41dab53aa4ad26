"""The power-cut tortures' reading of a terminal, and the cloud's side of the outbox.

The invariants are ``hwsim.invariants``' (shared with the kill torture); this module
reads a booted terminal into its ``Snapshot``, through the terminal's own store:

``check_invariants``: after recovery: integrity, the audit chain (``verify_audit``), and
every invariant with ``final=True`` (no run left in flight).

``check_in_flight``: the database as a cut left it, before recovery: every invariant a
crash must not break (``final=False``): money held at the acquirer belongs to an
approved run or to one whose reversal is pending, a payment recorded as ``unknown`` has
told the cloud so, the counters agree with the runs and the acknowledgements...

``_upload`` is the sync client: the cloud receives the outbox, then acknowledges it
through ``Terminal.acknowledge`` (the one way acks happen), which drops the messages and
releases the offline exposure of the offline approvals among them in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping

from hwsim.acquirer import LedgerEntry
from hwsim.cutrig import _ALL, Seen
from hwsim.invariants import Message, Owners, PosBook, PosOutcome, Run, Snapshot, check, pos_key

from edge.engine import RunRecord
from edge.engine.navigation import step_path
from edge.engine.records import OutboxMessage
from edge.store.base import OUTBOX_COUNTER
from edge.terminal.service.terminal import Terminal

__all__ = ["check_in_flight", "check_invariants", "run_of"]

#: Messages read from the outbox per page.
_PAGE = 500


# --- the cloud's side of the outbox ----------------------------------------------------------


def _upload(terminal: Terminal, cloud: dict[str, OutboxMessage]) -> int:
    """The sync client: the cloud receives every message, then acknowledges them all
    through ``Terminal.acknowledge``. Returns the messages dropped."""
    last = 0
    while True:
        page = terminal.store.outbox(after_seq=last, limit=_PAGE)
        if not page:
            break
        for msg in page:
            cloud.setdefault(msg.message_id, msg)
        last = page[-1].seq or last
    return terminal.acknowledge(last) if last else 0


def _outbox(terminal: Terminal) -> list[OutboxMessage]:
    out: list[OutboxMessage] = []
    after = 0
    while True:
        page = terminal.store.outbox(after_seq=after, limit=_PAGE)
        out += page
        if len(page) < _PAGE:
            return out
        after = page[-1].seq or after


def _message(msg: OutboxMessage, *, acknowledged: bool) -> Message:
    return Message(msg.message_id, msg.run_id, msg.topic, msg.payload, msg.seq or 0, acknowledged)


# --- the terminal as read --------------------------------------------------------------------


def _step(run: RunRecord) -> str | None:
    frames = run.cursor.get("frames") or []
    return str(frames[-1][0]) if frames else None


def run_of(run: RunRecord) -> Run:
    """A run as the shared checks see it."""
    return Run(
        run.run_id,
        run.workflow_type,
        str(run.status),
        run.idempotency_key,
        run.state,
        None if run.status.terminal else _step(run),
        run.error,
    )


def snapshot(terminal: Terminal, cloud: Mapping[str, OutboxMessage] | None = None) -> Snapshot:
    """``terminal`` as the shared checks see it; ``cloud``: the messages the cloud
    received (the terminal may since have dropped them), by message id."""
    store = terminal.store
    problems: list[str] = []
    records = store.list_runs(None, limit=_ALL)
    owners = Owners()
    for rec in records:
        for row in store.step_history(rec.run_id):
            owners.step(rec.run_id, rec.workflow_type, row.step, row.operation_key)
        frames = rec.cursor.get("frames") or []
        if frames and not rec.status.terminal:  # in flight: its step may have no row yet
            owners.step(rec.run_id, rec.workflow_type, step_path(frames), None)
    kept = _outbox(terminal)
    in_outbox = {m.message_id for m in kept}
    cloud = cloud or {}
    messages = [_message(m, acknowledged=False) for m in kept]
    for msg in kept:
        earlier = cloud.get(msg.message_id)
        if earlier is not None and earlier.payload != msg.payload:
            problems.append(f"message {msg.message_id} changed after it was uploaded")
    messages += [_message(m, acknowledged=True) for i, m in cloud.items() if i not in in_outbox]
    counters = store.counters()
    outbox = None
    if OUTBOX_COUNTER in counters:
        stats = store.outbox_stats()
        outbox = (stats.bytes, stats.depth)
    return Snapshot(
        {r.run_id: run_of(r) for r in records},
        messages,
        counters,
        owners.keys,
        outbox,
        problems,
    )


def book_of(seen: Mapping[str, Seen], sent: Mapping[str, str] | None = None) -> PosBook:
    """The POS's answers (by the run's idempotency key) as the shared checks read them;
    ``sent``: every request it sent (answered or not), if known."""
    outcomes = {
        pos_key(k): PosOutcome(s.txn.kind, s.run_id, s.status, s.decision) for k, s in seen.items()
    }
    return PosBook(
        sent={pos_key(k): kind for k, kind in (sent or {}).items()},
        run_ids={k: o.run_id for k, o in outcomes.items()},
        outcomes=outcomes,
        knows_sent=sent is not None,
    )


# --- the checks ------------------------------------------------------------------------------


def check_in_flight(
    terminal: Terminal,
    *,
    ledger: Mapping[str, LedgerEntry],
    cloud: Mapping[str, OutboxMessage] | None = None,
    seen: Mapping[str, Seen] | None = None,
    sent: Mapping[str, str] | None = None,
) -> list[str]:
    """The violations of a database as a cut left it, before recovery: everything a
    crash must not break, runs in flight allowed (``hwsim.invariants.check``,
    ``final=False``). ``seen``/``sent``: what the POS was told and sent, if known."""
    book = None if seen is None else book_of(seen, sent)
    return check(snapshot(terminal, cloud), ledger, book, final=False)


def check_invariants(
    terminal: Terminal,
    *,
    seen: Mapping[str, Seen],
    ledger: Mapping[str, LedgerEntry],
    cloud: Mapping[str, OutboxMessage] | None = None,
    sent: Mapping[str, str] | None = None,
) -> list[str]:
    """Every violation of invariant 2 in ``terminal``'s database after recovery.

    ``seen``: what the POS was told, by its idempotency key; ``ledger``: the acquirer's,
    every entry of this terminal; ``cloud``: messages the cloud received (and the
    terminal may since have dropped), by message id; ``sent``: every request the POS
    sent, by key (None: not known, so a run's key is not checked against it).
    """
    v: list[str] = []
    integrity = terminal.store.integrity_check()
    if integrity != "ok":
        return [f"integrity_check: {integrity}"]  # nothing below can be trusted
    report = terminal.engine.verify_audit()
    if not report.ok:
        v.append(str(report))
    return v + check(snapshot(terminal, cloud), ledger, book_of(seen, sent), final=True)
