"""The deterministic power-cut sweep: ``sweep(scenario, workdir=)`` cuts at every event in turn.

For one payment, one refund, one saga rollback, one payment whose approval's answer is
lost before an outage, or the cloud's acknowledgement of an outbox holding an offline
approval (``SCENARIOS``), count the events of a clean run, then for each event i: copy a
template database (with a WAL of committed frames), run the scenario, cut at event i,
reboot on the default VFS, recover, retry, check (``hwsim.cutcheck``), and require the
outcome of a clean run. The terminal and the POS are ``hwsim.cutrig``'s.

The acknowledgement goes through ``Terminal.acknowledge``, as every one does: it drops
the messages and releases the offline exposure of the offline approvals among them in
one transaction, so a cut anywhere in it releases that exposure once or not at all (and
the cloud's retry then once). Its outcome is ``("ACKED", "released")``: the outbox
empty and no offline exposure left.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import httpx
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import make_card
from hwsim.cutcheck import _upload, check_in_flight, check_invariants
from hwsim.cutrig import (
    CURRENCY,
    DEVICE_ID,
    REBOOT_S,
    TXN_GAP_S,
    PowerOff,
    Seen,
    Txn,
    _Pos,
    _Rig,
    _Stuck,
)
from hwsim.invariants import OFFLINE_COUNTER

from edge.engine.records import OutboxMessage
from edge.errors import TillflowError
from edge.terminal.carddata import Sensitive
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.drivers.contracts import AuthRequest

__all__ = ["SCENARIOS", "sweep"]

#: The outcome of the ``ack`` scenario when nothing is left to acknowledge or release.
ACKED = ("ACKED", "released")
#: The scenarios of ``sweep``: the request, and the (status, decision) of a clean run.
SCENARIOS: dict[str, tuple[Txn, tuple[str, str]]] = {
    "payment": (Txn("sweep", "payment", 2_500), ("COMPLETED", "approved")),
    "refund": (Txn("sweep", "refund", 1_000), ("COMPLETED", "approved")),
    "saga": (Txn("sweep", "payment", 2_500, jam=True), ("ROLLED_BACK", "reversed")),
    # The approval's answer lost, then an outage past the authorisation's retries (3 s)
    # and the reversal's first three: declined, reversed (issue 10 §1). Short, as every
    # retry adds its commit's events to the sweep; the random cuts have the long ones.
    "lost": (Txn("sweep", "payment", 2_500, lost_outage_s=8.0), ("COMPLETED", "declined")),
    # The cloud acknowledges the outbox: the template's online payment and an offline one.
    "ack": (Txn("sweep", "ack", 0), ACKED),
}
#: Outcomes as correct as a clean run's after some cuts: a cut among the lost payment's
#: authorisation retries reboots (``REBOOT_S``) after its outage, and the replayed
#: authorisation gets the acquirer's recorded approval before anything said unknown.
_ALSO_CORRECT: dict[str, set[tuple[str, str]]] = {"lost": {("COMPLETED", "approved")}}
#: The template's own payment: the one the refund scenario refunds.
_SETUP = Txn("setup", "payment", 2_500)
#: The ``ack`` scenario's template also took an offline payment, for the ack to release.
_OFFLINE = Txn("offline", "payment", 1_500, link_up=False)


@dataclass(frozen=True)
class _Template:
    root: Path
    setup: Seen
    clock: float
    #: The key the setup payment's authorisation went under (its recorded state's).
    auth_key: str
    #: Every answer the template's POS got, by the run's key.
    seen: dict[str, Seen]


def _prepare(root: Path, client: httpx.Client, scenario: str) -> _Template:
    """A terminal that took one online payment (and for ``ack`` an offline one too),
    copied while open: the database, its WAL holding the payments' committed frames
    (synced: FULL), and the data key."""
    copy = root / "template"
    with SimAcquirer() as acquirer:
        rig = _Rig(root / "prepare", acquirer, client)
        try:
            rig.boot(powerloss=False)
            pos = _Pos(rig)
            setup = pos.submit(_SETUP)
            if setup is None or not setup.approved:
                raise RuntimeError(f"the template's payment was not approved: {setup}")
            if scenario == "ack":
                offline = pos.submit(_OFFLINE)
                if offline is None or not offline.approved:
                    raise RuntimeError(f"the template's offline payment: {offline}")
            assert rig.terminal is not None
            auth_key = str(rig.terminal.engine.get(setup.run_id).state["auth_key"])
            copy.mkdir(parents=True)
            for name in ("terminal.db", "terminal.db-wal"):
                shutil.copyfile(rig.root / name, copy / name)
            shutil.copytree(rig.root / "keys", copy / "keys")
            clock = rig.clock.now()
        finally:
            rig.close()
    return _Template(copy, setup, clock, auth_key, dict(pos.seen))


def _setup_charge(acquirer: SimAcquirer, template: _Template, client: httpx.Client) -> None:
    """The acquirer remembers the template's payment: replay its authorisation."""
    card = make_card(_SETUP.card)
    HttpAcquirer(acquirer.url, client=client).authorize(
        AuthRequest(
            pan=Sensitive(card.pan.reveal()),
            expiry=card.expiry,
            amount_minor=_SETUP.amount_minor,
            currency=CURRENCY,
            idempotency_key=template.auth_key,
            terminal_id=DEVICE_ID,
        )
    )


def _scenario_txn(scenario: str, template: _Template) -> Txn:
    txn = SCENARIOS[scenario][0]
    if txn.kind == "refund":
        return Txn(txn.key, "refund", txn.amount_minor, original=template.setup.run_id)
    return txn


@dataclass
class _Scene:
    """One copy of the template: the terminal, its POS, the acquirer, and the cloud (the
    messages it received, by id)."""

    rig: _Rig
    pos: _Pos
    acquirer: SimAcquirer
    cloud: dict[str, OutboxMessage] = field(default_factory=dict)
    #: The ``ack`` scenario's outcome, once the cloud got an answer to its acknowledgement.
    acked: tuple[str, str] | None = None

    def request(self, txn: Txn) -> tuple[str, str] | None:
        """Send ``txn`` (the cloud's acknowledgement, for ``ack``): its outcome, or None
        when the power went first. Raises what a cut raises."""
        if txn.kind != "ack":
            answer = self.pos.submit(txn)
            return None if answer is None else (answer.status, str(answer.decision))
        terminal = self.rig.terminal
        assert terminal is not None
        _upload(terminal, self.cloud)  # Terminal.acknowledge
        if self.rig.cut:
            return None
        left = terminal.store.outbox_stats().depth
        exposure = terminal.store.counters().get(OFFLINE_COUNTER, (0, 0))
        self.acked = ACKED if (left, tuple(exposure)) == (0, (0, 0)) else (
            f"{left} message(s) left", f"offline exposure {exposure}"
        )  # fmt: skip
        return self.acked

    def outcome(self, txn: Txn) -> tuple[str, str] | None:
        """The outcome the POS (or the cloud) got to ``txn`` so far."""
        if txn.kind == "ack":
            return self.acked
        seen = self.pos.seen.get(txn.pos_key)
        return None if seen is None else (seen.status, str(seen.decision))


@contextlib.contextmanager
def _world(template: _Template, root: Path, client: httpx.Client) -> Iterator[_Scene]:
    """A copy of the template, an acquirer that knows its payment, a POS that saw it."""
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(template.root, root)
    with SimAcquirer() as acquirer:
        _setup_charge(acquirer, template, client)
        rig = _Rig(root, acquirer, client, clock_start=template.clock + TXN_GAP_S)
        sent = {k: s.txn.kind for k, s in template.seen.items()}
        pos = _Pos(rig, dict(template.seen), sent)
        try:
            yield _Scene(rig, pos, acquirer)
        finally:
            rig.close()


def _play(scene: _Scene, txn: Txn, cut_at: int | None, tear: bool) -> list[str]:
    """Boot, send ``txn``, checkpoint, stop; until the cut if there is one. The kinds of
    the events the VFS saw, in order."""
    rig = scene.rig
    try:
        rig.boot(cut_at, tear=tear)
        if scene.request(txn) is not None:
            assert rig.terminal is not None
            rig.terminal.store.checkpoint()  # the daemon's graceful stop
            terminal, rig.terminal = rig.terminal, None
            terminal.close()
    except (PowerOff, TillflowError, apsw.Error):
        if not rig.cut:
            raise
    rig.down()
    return list(rig.event_kinds)


def sweep(
    scenario: str,
    *,
    workdir: Path,
    tear: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Cut the power at every write, truncate and sync of one ``scenario`` in turn
    (``SCENARIOS``: the request, the daemon's checkpoint, its stop); after each, reboot
    on the default VFS, recover, retry, and check the invariants and that the request
    ends as a clean run does. ``tear``: tear the newest unsynced write of each file;
    then only the cuts right after a write are swept (elsewhere a tear changes little).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}; got {scenario!r}")
    started = time.monotonic()
    workdir = Path(workdir)
    want = SCENARIOS[scenario][1]
    violations: list[str] = []
    swept: Counter[str] = Counter()
    with httpx.Client(trust_env=False) as client:
        template = _prepare(workdir / f"{scenario}-template", client, scenario)
        txn = _scenario_txn(scenario, template)
        with _world(template, workdir / f"{scenario}-clean", client) as scene:
            kinds = _play(scene, txn, None, False)
            clean = scene.outcome(txn)
        if clean != want:
            violations.append(f"{scenario}: a clean run ended {clean} (want {want})")
        for i, kind in enumerate(kinds, start=1):
            if tear and kind != "write":
                continue
            root = workdir / f"{scenario}-cut"
            with _world(template, root, client) as scene:
                also = _ALSO_CORRECT.get(scenario, set())
                cut_kind, found = _cut_once(scene, txn, want, i, tear, also)
            swept[cut_kind] += 1
            where = f"{scenario}: cut at event {i}/{len(kinds)} ({cut_kind})"
            where += " torn" if tear else ""
            violations += [f"{where}: {text}" for text in found]
            if found and log is not None:
                log(f"{where}: {found}")
    return {
        "kind": "power-sweep",
        "scenario": scenario,
        "tear": tear,
        "events": len(kinds),
        "swept": sum(swept.values()),
        "cut_at": dict(swept),
        "violations": violations,
        "seconds": round(time.monotonic() - started, 1),
    }


def _cut_once(
    scene: _Scene,
    txn: Txn,
    want: tuple[str, str],
    cut_at: int,
    tear: bool,
    also: Set[tuple[str, str]] = frozenset(),
) -> tuple[str, list[str]]:
    """Play ``txn`` cut at event ``cut_at``, reboot, recover, retry, check: the kind of
    event cut, and the violations. ``also``: outcomes as good as ``want`` here."""
    rig, pos, acquirer = scene.rig, scene.pos, scene.acquirer
    _play(scene, txn, cut_at, tear)
    if not rig.cut:
        return "none", [f"event {cut_at} never came (the scenario is not deterministic)"]
    cut_kind = rig.cut_kind or "?"
    found = list(rig.cut_failures)
    rig.clock.advance(REBOOT_S)
    try:
        rig.boot(powerloss=False)
        assert rig.terminal is not None
        found += [
            f"as the cut left it: {text}"
            for text in check_in_flight(
                rig.terminal,
                ledger=acquirer.ledger,  # a copy: read it after the cut
                cloud=scene.cloud,
                seen=pos.seen,
                sent=pos.sent,
            )
        ]
        rig.settle()
        got = scene.outcome(txn) or scene.request(txn)
    except (TillflowError, apsw.Error, _Stuck) as exc:
        return cut_kind, [*found, f"reboot failed: {type(exc).__name__}: {exc}"]
    assert rig.terminal is not None
    found += check_invariants(
        rig.terminal, seen=pos.seen, ledger=acquirer.ledger, cloud=scene.cloud, sent=pos.sent
    )
    if got != want and got not in also:
        found.append(f"the request ended {got}, a clean run {want}")
    return cut_kind, found
