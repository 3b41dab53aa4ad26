"""The deterministic power-cut sweep: ``sweep(scenario, workdir=)`` cuts at every event in turn.

For one payment, one refund, one saga rollback or one payment whose approval's answer is
lost before an outage (``SCENARIOS``), count the events of a clean run, then for each
event i: copy a template database (with a WAL of committed frames), run the scenario,
cut at event i, reboot on the default VFS, recover, retry, check (``hwsim.cutcheck``),
and require the outcome of a clean run. The terminal and the POS are ``hwsim.cutrig``'s.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import httpx
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import make_card
from hwsim.cutcheck import _auth_key, check_in_flight, check_invariants
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

from edge.errors import TillflowError
from edge.terminal.acquirer_http import HttpAcquirer
from edge.terminal.carddata import Sensitive
from edge.terminal.ports import AuthRequest

__all__ = ["SCENARIOS", "sweep"]

#: The scenarios of ``sweep``: the request, and the (status, decision) of a clean run.
SCENARIOS: dict[str, tuple[Txn, tuple[str, str]]] = {
    "payment": (Txn("sweep", "payment", 2_500), ("COMPLETED", "approved")),
    "refund": (Txn("sweep", "refund", 1_000), ("COMPLETED", "approved")),
    "saga": (Txn("sweep", "payment", 2_500, jam=True), ("ROLLED_BACK", "reversed")),
    # The approval's answer lost, then an outage past the authorisation's retries (3 s)
    # and the reversal's first three: declined, reversed (issue 10 §1). Short, as every
    # retry adds its commit's events to the sweep; the random cuts have the long ones.
    "lost": (Txn("sweep", "payment", 2_500, lost_outage_s=8.0), ("COMPLETED", "declined")),
}
#: Outcomes as correct as a clean run's after some cuts: a cut among the lost payment's
#: authorisation retries reboots (``REBOOT_S``) after its outage, and the replayed
#: authorisation gets the acquirer's recorded approval before anything said unknown.
_ALSO_CORRECT: dict[str, set[tuple[str, str]]] = {"lost": {("COMPLETED", "approved")}}
#: The template's own payment: the one the refund scenario refunds.
_SETUP = Txn("setup", "payment", 2_500)


@dataclass(frozen=True)
class _Template:
    root: Path
    setup: Seen
    clock: float


def _prepare(root: Path, client: httpx.Client) -> _Template:
    """A terminal that took one online payment, copied while open: the database, its
    WAL holding that payment's committed frames (synced: FULL), and the data key."""
    copy = root / "template"
    with SimAcquirer() as acquirer:
        rig = _Rig(root / "prepare", acquirer, client)
        try:
            rig.boot(powerloss=False)
            setup = _Pos(rig).submit(_SETUP)
            if setup is None or not setup.approved:
                raise RuntimeError(f"the template's payment was not approved: {setup}")
            copy.mkdir(parents=True)
            for name in ("terminal.db", "terminal.db-wal"):
                shutil.copyfile(rig.root / name, copy / name)
            shutil.copytree(rig.root / "keys", copy / "keys")
            clock = rig.clock.now()
        finally:
            rig.close()
    return _Template(copy, setup, clock)


def _setup_charge(acquirer: SimAcquirer, template: _Template, client: httpx.Client) -> None:
    """The acquirer remembers the template's payment: replay its authorisation."""
    card = make_card(_SETUP.card)
    HttpAcquirer(acquirer.url, client=client).authorize(
        AuthRequest(
            pan=Sensitive(card.pan.reveal()),
            expiry=card.expiry,
            amount_minor=_SETUP.amount_minor,
            currency=CURRENCY,
            idempotency_key=_auth_key(template.setup.run_id),
            terminal_id=DEVICE_ID,
        )
    )


def _scenario_txn(scenario: str, template: _Template) -> Txn:
    txn = SCENARIOS[scenario][0]
    if txn.kind == "refund":
        return Txn(txn.key, "refund", txn.amount_minor, original=template.setup.run_id)
    return txn


@contextlib.contextmanager
def _world(
    template: _Template, root: Path, client: httpx.Client
) -> Iterator[tuple[_Rig, _Pos, SimAcquirer]]:
    """A copy of the template, an acquirer that knows its payment, a POS that saw it."""
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(template.root, root)
    with SimAcquirer() as acquirer:
        _setup_charge(acquirer, template, client)
        rig = _Rig(root, acquirer, client, clock_start=template.clock + TXN_GAP_S)
        pos = _Pos(rig, {_SETUP.pos_key: template.setup})
        try:
            yield rig, pos, acquirer
        finally:
            rig.close()


def _play(rig: _Rig, pos: _Pos, txn: Txn, cut_at: int | None, tear: bool) -> list[str]:
    """Boot, send ``txn``, checkpoint, stop; until the cut if there is one. The kinds of
    the events the VFS saw, in order."""
    try:
        rig.boot(cut_at, tear=tear)
        if pos.submit(txn) is not None:
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
        template = _prepare(workdir / f"{scenario}-template", client)
        txn = _scenario_txn(scenario, template)
        with _world(template, workdir / f"{scenario}-clean", client) as (rig, pos, _):
            kinds = _play(rig, pos, txn, None, False)
            clean = pos.seen.get(txn.pos_key)
        if clean is None or (clean.status, clean.decision) != want:
            violations.append(f"{scenario}: a clean run ended {clean} (want {want})")
        for i, kind in enumerate(kinds, start=1):
            if tear and kind != "write":
                continue
            root = workdir / f"{scenario}-cut"
            with _world(template, root, client) as (rig, pos, acquirer):
                also = _ALSO_CORRECT.get(scenario, set())
                cut_kind, found = _cut_once(rig, pos, acquirer, txn, want, i, tear, also)
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
    rig: _Rig,
    pos: _Pos,
    acquirer: SimAcquirer,
    txn: Txn,
    want: tuple[str, str],
    cut_at: int,
    tear: bool,
    also: Set[tuple[str, str]] = frozenset(),
) -> tuple[str, list[str]]:
    """Play ``txn`` cut at event ``cut_at``, reboot, recover, retry, check: the kind of
    event cut, and the violations. ``also``: outcomes as good as ``want`` here."""
    _play(rig, pos, txn, cut_at, tear)
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
            for text in check_in_flight(rig.terminal, ledger=acquirer.ledger)
        ]
        rig.settle()
        answer = pos.seen.get(txn.pos_key) or pos.submit(txn)
    except (TillflowError, apsw.Error, _Stuck) as exc:
        return cut_kind, [*found, f"reboot failed: {type(exc).__name__}: {exc}"]
    assert rig.terminal is not None
    found += check_invariants(rig.terminal, seen=pos.seen, ledger=acquirer.ledger)
    got = None if answer is None else (answer.status, answer.decision)
    if got != want and got not in also:
        found.append(f"the request ended {got}, a clean run {want}")
    return cut_kind, found
