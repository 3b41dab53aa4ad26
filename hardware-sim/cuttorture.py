"""Power-cut torture: a terminal's payment load, cut at VFS events, rebooted, checked.

Two drivers over one rig and one checker (DESIGN.md invariant 2):

* ``run(n, seed=, workdir=)`` -- random cuts, this module. A terminal takes payment load
  from a simulated POS app (online and offline approvals, declines, refunds, now and
  then a jammed printer whose saga reverses the authorisation; the cloud uploads and
  acknowledges the outbox, the terminal checkpoints its WAL) until the power goes at a
  seeded random write or sync of its database, clean or torn. Then it reboots: the dead
  connections are closed, the database is reopened through a fresh ``PowerLossVFS``
  (which has its own next cut, so recovery is cut too), runs are recovered, the POS
  retries the request it got no answer to under the same idempotency key, and the
  invariants are checked. A database lives ``LIFE_CUTS`` cuts, then a new terminal
  starts (so each check stays cheap however large ``n`` is).
* ``sweep(scenario, workdir=)`` -- every event in turn (``hwsim.cutsweep``, re-exported
  here with its ``SCENARIOS``). For one payment, one refund or one saga rollback, count
  the events of a clean run, then for each event i: copy a template database (with a WAL
  of committed frames), run the scenario, cut at event i, reboot on the default VFS,
  recover, retry, check, and require the outcome of a clean run.

The rig, the POS app and what it asks and was told (``Txn``, ``Seen``, ``PowerOff``)
are ``hwsim.cutrig``'s; the checker (``check_invariants``, ``check_in_flight``) is
``hwsim.cutcheck``'s. All are re-exported here. ``check_invariants``: given a terminal,
what the POS was told, the acquirer's ledger and what the cloud already received, it
lists every violation: integrity, runs left in flight, the audit chain, payments the POS
saw approved that are missing or doubled, outbox messages missing or doubled, charges
the terminal does not account for (or accounts for twice), counters that disagree with
the runs.

Now and then a payment meets the fault of issue 10 §1 (``Txn.lost_outage_s``): the
acquirer approves its authorisation, the answer is lost on the way back
(``SimAcquirer.lose_reply``), and the link then stays down for one to sixty virtual
minutes (``SimNetworkLink.down_for``, across reboots): far past the authorisation's
retries, so the outcome is ``unknown`` and ``reverse_unknown`` retries the reversal
through the outage. Virtual time makes long outages cheap; the cuts land among the
retries' commits like anywhere else. On every reboot, before recovery, the database as
the cut left it is checked too (``check_in_flight``): money held at the acquirer belongs
to an approved run or to one whose reversal is pending. The sweep's ``lost`` scenario
cuts such a payment at every event.

The acquirer (``hwsim.acquirer``, over loopback HTTP) and the cloud's inbox are outside
the cut, as the real ones are. After the cut the terminal's CPU is dead too: its card
reader, printer and acquirer calls raise ``PowerOff`` (which no step can catch), so a
dead terminal sends nothing. Time is virtual (``FakeClock``): a reboot takes
``REBOOT_S``, longer than a lease, so the new process may take over the old one's runs.
"""

from __future__ import annotations

import itertools
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import httpx
from hwsim.acquirer import SimAcquirer
from hwsim.cutcheck import _upload, check_in_flight, check_invariants, run_of
from hwsim.cutrig import (
    _ALL,
    _IN_FLIGHT,
    LIMITS,
    REBOOT_S,
    TXN_GAP_S,
    PowerOff,
    Seen,
    Txn,
    _Pos,
    _Rig,
    _Stuck,
)
from hwsim.cutsweep import SCENARIOS, sweep

from edge.engine.records import OutboxMessage
from edge.errors import TillflowError

__all__ = [
    "LIFE_CUTS",
    "SCENARIOS",
    "PowerOff",
    "Seen",
    "Txn",
    "check_in_flight",
    "check_invariants",
    "run",
    "sweep",
]

#: Cuts one database lives through before a new terminal starts: the checks read every
#: run, so a bounded database keeps their cost flat over thousands of cuts.
LIFE_CUTS = 25
#: A cut lands at a uniformly random event among the next this many: about ten
#: transactions' worth, so cuts hit payments, recoveries, acks and checkpoints alike.
CUT_WINDOW = 500
#: Share of answered requests after which the cloud takes and acknowledges the outbox.
ACK_SHARE = 0.25
#: Online authorisations of this BIN are declined by the acquirer (the "mastercard").
DECLINED_BIN = "5555"
#: Share of online visa payments whose approval is lost, then a long outage follows;
#: its length in virtual seconds (the authorisation retries for about 3 s of it).
LOST_ANSWER_SHARE = 0.06
LOST_OUTAGE_S = (60.0, 3_600.0)


# --- random cuts -------------------------------------------------------------------------


def _next_txn(rng: random.Random, n: int, pos: _Pos) -> Txn:
    """A seeded mix: mostly payments, some refunds of earlier approved online ones."""
    key = f"t{n}"
    refundable = [
        s for s in pos.seen.values()
        if s.txn.kind == "payment" and s.approved and s.txn.amount_minor > 2_000
    ]  # fmt: skip
    roll = rng.random()
    if roll < 0.12 and refundable:
        original = rng.choice(refundable)
        return Txn(
            key,
            "refund",
            rng.randint(1, original.txn.amount_minor // 2),
            card=original.txn.card,
            link_up=rng.random() < 0.9,
            original=original.run_id,
        )
    card = rng.choices(["visa", "mastercard", "bad_luhn", "expired"], [80, 12, 4, 4])[0]
    amount = rng.choice([rng.randint(100, 2_000), rng.randint(2_001, 9_000)])
    link_up = rng.random() < 0.8
    jam = rng.random() < 0.07
    lost = rng.random() < LOST_ANSWER_SHARE
    online_approval = card == "visa" and amount > LIMITS.floor_limit_minor and link_up
    return Txn(
        key,
        "payment",
        amount,
        card=card,
        link_up=link_up,
        jam=jam,
        lost_outage_s=rng.uniform(*LOST_OUTAGE_S) if lost and online_approval else 0.0,
    )


@dataclass
class _Tally:
    n: int
    seed: int
    cuts: int = 0
    torn: int = 0
    lives: int = 0
    cuts_in_recovery: int = 0  # cuts that hit a reboot before it had recovered
    payments_sent: int = 0
    refunds_sent: int = 0
    approved: int = 0
    declined: int = 0
    reversed: int = 0
    retried: int = 0  # requests the POS sent again after a cut, and got an answer to
    recovered_runs: int = 0  # runs in flight when a reboot opened the database
    checks: int = 0
    lost_answers: int = 0  # approvals whose answer was lost, then a long outage
    outage_s: float = 0.0  # virtual seconds of those outages
    went_unknown: int = 0  # payments recorded as of unknown outcome
    released_after_unknown: int = 0  # ... whose authorisation a reversal released
    cuts_reversal_pending: int = 0  # reboots that found a reversal pending
    acks_sent: int = 0  # acknowledgements of the outbox the cloud sent (Terminal.acknowledge)
    acks: int = 0  # ... that went through
    cuts_in_ack: int = 0  # ... that a cut interrupted
    offline_acknowledged: int = 0  # offline approvals among the acknowledged messages
    cut_at: Counter[str] = field(default_factory=Counter)  # "write db-wal": cuts there
    violations: list[str] = field(default_factory=list)

    def count(self, answer: Seen) -> None:
        if answer.approved:
            self.approved += 1
        elif answer.decision == "declined":
            self.declined += 1
        elif answer.decision == "reversed":
            self.reversed += 1


def run(
    n: int,
    *,
    seed: int,
    workdir: Path,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Cut the power ``n`` times under payment load; return the tally (see the module
    docstring). ``workdir`` holds one directory per terminal life, removed when its life
    ends without a violation (kept for a post-mortem otherwise)."""
    started = time.monotonic()
    rng = random.Random(seed)
    tally = _Tally(n=n, seed=seed)
    say = log or (lambda _line: None)
    life = 0
    with httpx.Client(trust_env=False) as client:
        while tally.cuts < n:
            life += 1
            root = Path(workdir) / f"life-{life:04d}"
            if root.exists():
                shutil.rmtree(root)
            before = len(tally.violations)
            with SimAcquirer() as acquirer:
                acquirer.decline_bin(DECLINED_BIN)
                life_cuts = min(LIFE_CUTS, n - tally.cuts)
                _Life(tally, rng, _Rig(root, acquirer, client), acquirer, say).live(life_cuts)
            tally.lives += 1
            if len(tally.violations) == before:
                shutil.rmtree(root, ignore_errors=True)
            say(
                f"life {life}: {tally.cuts}/{n} cuts ({tally.torn} torn), "
                f"{tally.payments_sent} payments, {len(tally.violations)} violation(s)"
            )
    out: dict[str, Any] = {"kind": "power", **tally.__dict__, "cut_at": dict(tally.cut_at)}
    out["outage_s"] = round(tally.outage_s, 1)
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


class _Life:
    """One terminal on one database through a number of power cuts."""

    def __init__(
        self,
        tally: _Tally,
        rng: random.Random,
        rig: _Rig,
        acquirer: SimAcquirer,
        say: Callable[[str], None],
    ) -> None:
        self.tally, self.rng, self.rig, self.acquirer, self.say = tally, rng, rig, acquirer, say
        self.pos = _Pos(rig)
        self.cloud: dict[str, OutboxMessage] = {}
        self.txns = itertools.count(1)
        self.pending: Txn | None = None  # the request the POS got no answer to
        self.tear = False
        self.unknown: set[str] = set()  # payment runs that went unknown

    def violation(self, text: str) -> None:
        line = f"{self.rig.root.name} cut {self.tally.cuts}: {text}"
        self.tally.violations.append(line)
        self.say(f"VIOLATION {line}")

    def boot(self) -> None:
        """Boot through a fresh VFS armed to cut at a random event of the next window."""
        self.tear = self.rng.random() < 0.5
        self.rig.boot(self.rng.randint(1, CUT_WINDOW), tear=self.tear)

    def count_cut(self) -> None:
        self.tally.cuts += 1
        self.tally.torn += self.tear
        self.tally.cut_at[self.rig.cut_kind or "?"] += 1
        for failure in self.rig.cut_failures:
            self.violation(failure)
        self.rig.cut_failures.clear()

    def live(self, cuts: int) -> None:
        rig = self.rig
        try:
            # Born on real power: cuts while creating the schema are test_powerloss's.
            rig.boot(powerloss=False)
            rig.down()
            self.boot()
            start = self.tally.cuts
            while self.tally.cuts < start + cuts:
                if not self.serve():
                    return
                if rig.cut:
                    self.count_cut()
                    if not self.reboot(last=self.tally.cuts >= start + cuts):
                        return
                    self.check()
        finally:
            self.count_lost()
            rig.close()

    def count_lost(self) -> None:
        """This life's lost answers, and the reversals that released them."""
        lost, tally = self.rig.lost, self.tally
        tally.lost_answers += len(lost.fired)
        tally.outage_s += lost.outage_s
        tally.went_unknown += len(self.unknown)
        tally.released_after_unknown += sum(
            1
            for e in self.acquirer.ledger.values()
            if e.operation == "reverse" and e.effect and e.reverses in lost.lost_keys
        )

    def serve(self) -> bool:
        """One POS request, then now and then an upload or a checkpoint, until the power
        goes. False after a violation that ends this life."""
        rig, tally = self.rig, self.tally
        try:
            if self.pending is None:
                rig.clock.advance(TXN_GAP_S)
                self.pending = _next_txn(self.rng, next(self.txns), self.pos)
                if self.pending.kind == "payment":
                    tally.payments_sent += 1
                else:
                    tally.refunds_sent += 1
            answer = self.pos.submit(self.pending)
            if answer is not None:
                tally.count(answer)
                self.pending = None
                assert rig.terminal is not None
                if self.rng.random() < ACK_SHARE:
                    self.acknowledge()
                if self.rng.random() < 0.08:
                    rig.terminal.store.checkpoint()
        except (PowerOff, TillflowError, apsw.Error) as exc:
            if not rig.cut:
                self.violation(f"{type(exc).__name__} without a power cut: {exc}")
                return False
        except _Stuck as exc:
            self.violation(f"runs stuck in flight: {exc}")
            return False
        return True

    def acknowledge(self) -> None:
        """The cloud takes the outbox and acknowledges it (``Terminal.acknowledge``),
        releasing the offline exposure of the offline approvals among it; a cut may land
        in it like anywhere else (the cloud acknowledges again at a later upload)."""
        assert self.rig.terminal is not None
        offline = sum(
            1
            for m in self.rig.terminal.store.outbox(limit=_ALL)
            if m.topic == "payment" and m.payload.get("offline")
            and m.payload.get("decision") == "approved"
        )  # fmt: skip
        self.tally.acks_sent += 1
        try:
            _upload(self.rig.terminal, self.cloud)
        except BaseException:
            self.tally.cuts_in_ack += self.rig.cut
            raise
        self.tally.acks += 1
        self.tally.offline_acknowledged += offline

    def reboot(self, *, last: bool) -> bool:
        """Reboot until one survives recovery and the POS's retry; each reboot has its
        own cut armed, so recovery is cut too. On the life's ``last`` cut, the reboot
        after a cut in recovery runs on real power. False after a violation."""
        rig, tally = self.rig, self.tally
        real_power = False
        while True:
            rig.down()
            rig.clock.advance(REBOOT_S)
            try:
                if real_power:
                    rig.boot(powerloss=False)
                else:
                    self.boot()
                assert rig.terminal is not None
                left = rig.terminal.store.list_runs(_IN_FLIGHT, limit=_ALL)
                in_flight = len(left)
                for text in check_in_flight(
                    rig.terminal,
                    ledger=self.acquirer.ledger,
                    cloud=self.cloud,
                    seen=self.pos.seen,
                    sent=self.pos.sent,
                ):
                    self.violation(f"as the cut left it: {text}")
                tally.cuts_reversal_pending += any(run_of(r).reversal_pending for r in left)
                rig.settle()
                tally.recovered_runs += in_flight
                if self.pending is not None:
                    answer = self.pos.submit(self.pending)
                    if answer is not None:
                        tally.retried += 1
                        tally.count(answer)
                        self.pending = None
            except (PowerOff, TillflowError, apsw.Error) as exc:
                if not rig.cut:
                    self.violation(f"reboot failed: {type(exc).__name__}: {exc}")
                    return False
            except _Stuck as exc:
                self.violation(f"runs stuck in flight after recovery: {exc}")
                return False
            if not rig.cut:
                return True
            # Cut again before the terminal had recovered and answered: one more cut.
            self.count_cut()
            tally.cuts_in_recovery += 1
            real_power = last

    def check(self) -> None:
        assert self.rig.terminal is not None
        self.tally.checks += 1
        found = check_invariants(
            self.rig.terminal,
            seen=self.pos.seen,
            ledger=self.acquirer.ledger,
            cloud=self.cloud,
            sent=self.pos.sent,
        )
        for text in found:
            self.violation(text)
        self.unknown |= {
            r.run_id
            for r in self.rig.terminal.store.list_runs(None, limit=_ALL)
            if run_of(r).went_unknown
        }
