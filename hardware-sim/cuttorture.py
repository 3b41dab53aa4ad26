"""Power-cut torture: a terminal's payment load, cut at VFS events, rebooted, checked.

Two drivers over one rig and one checker (DESIGN.md invariant 2):

* ``run(n, seed=, workdir=)`` -- random cuts. A terminal takes payment load from a
  simulated POS app (online and offline approvals, declines, refunds, now and then a
  jammed printer whose saga reverses the authorisation; the cloud uploads and
  acknowledges the outbox, the terminal checkpoints its WAL) until the power goes at a
  seeded random write or sync of its database, clean or torn. Then it reboots: the dead
  connections are closed, the database is reopened through a fresh ``PowerLossVFS``
  (which has its own next cut, so recovery is cut too), runs are recovered, the POS
  retries the request it got no answer to under the same idempotency key, and the
  invariants are checked. A database lives ``LIFE_CUTS`` cuts, then a new terminal
  starts (so each check stays cheap however large ``n`` is).
* ``sweep(scenario, workdir=)`` -- every event in turn. For one payment, one refund or
  one saga rollback, count the events of a clean run, then for each event i: copy a
  template database (with a WAL of committed frames), run the scenario, cut at event
  i, reboot on the default VFS, recover, retry, check, and require the outcome of a
  clean run.

The checker (``check_invariants``) is public: given a terminal, what the POS was told,
the acquirer's ledger and what the cloud already received, it lists every violation:
integrity, runs left in flight, the audit chain, payments the POS saw approved that are
missing or doubled, outbox messages missing or doubled, charges the terminal does not
account for (or accounts for twice), counters that disagree with the runs.

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

import contextlib
import itertools
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import apsw
import httpx
from hwsim.acquirer import LedgerEntry, SimAcquirer
from hwsim.card_reader import make_card
from hwsim.killcheck import money_may_be_held, reversal_pending
from hwsim.network import SimNetworkLink
from hwsim.powerloss import PowerLossVFS
from hwsim.printer import SimPrinter

from edge.engine import FakeClock, RunRecord, Status
from edge.engine.context import idempotency_key
from edge.engine.records import OutboxMessage
from edge.errors import TillflowError
from edge.store.base import OUTBOX_COUNTER
from edge.terminal.acquirer_http import HttpAcquirer
from edge.terminal.carddata import CardRead, Sensitive
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.ports import AuthRequest, AuthResponse, CardReadError
from edge.terminal.risk import OFFLINE
from edge.terminal.runtime import Peripherals, Terminal

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

#: Virtual time a terminal starts at: 2033, inside the test cards' validity (2039).
START = 2_000_000_000.0
#: Virtual seconds a reboot takes: past the engine's 30 s lease, so the new process may
#: take over runs the dead one held (same pid, so it cannot tell the owner is gone).
REBOOT_S = 60.0
#: Virtual seconds between two customers.
TXN_GAP_S = 20.0
#: Cuts one database lives through before a new terminal starts: the checks read every
#: run, so a bounded database keeps their cost flat over thousands of cuts.
LIFE_CUTS = 25
#: A cut lands at a uniformly random event among the next this many: about ten
#: transactions' worth, so cuts hit payments, recoveries, acks and checkpoints alike.
CUT_WINDOW = 500
#: Turns of "recover, advance to the next due run" before a run counts as stuck.
MAX_SETTLE_TURNS = 100
DEVICE_ID = "T-CUT-0001"
CURRENCY = "EUR"

#: Small limits, so offline approvals and every kind of offline decline both happen.
LIMITS = RiskLimits(
    floor_limit_minor=2_000,
    offline_amount_cap_minor=12_000,
    offline_count_cap=10,
    velocity_max=6,
    online_random_percent=0,
)

#: Online authorisations of this BIN are declined by the acquirer (the "mastercard").
DECLINED_BIN = "5555"
#: Share of online visa payments whose approval is lost, then a long outage follows;
#: its length in virtual seconds (the authorisation retries for about 3 s of it).
LOST_ANSWER_SHARE = 0.06
LOST_OUTAGE_S = (60.0, 3_600.0)

_IN_FLIGHT = [Status.RUNNING, Status.COMPENSATING, Status.WAITING]
_ALL = 1_000_000


class PowerOff(BaseException):
    """The terminal lost power: nothing after the cut may reach a device.

    A BaseException, so no step's ``except Exception`` turns it into a failed attempt
    and no engine code commits anything on its behalf.
    """


class _Stuck(Exception):
    """A run stayed in flight through ``MAX_SETTLE_TURNS`` turns of recovery."""


# --- what the POS asks and what it was told -------------------------------------------------


@dataclass(frozen=True)
class Txn:
    """One request of the POS app. ``key`` is its idempotency key: a retry sends it again."""

    key: str
    kind: Literal["payment", "refund"]
    amount_minor: int
    card: str = "visa"
    link_up: bool = True
    jam: bool = False  # the printer jams for good: the payment's saga reverses it
    original: str | None = None  # a refund's payment run
    #: The acquirer approves, the answer is lost, the link stays down this long (s).
    lost_outage_s: float = 0.0

    @property
    def pos_key(self) -> str:
        return f"pos:{self.kind}:{self.key}"

    def input(self) -> dict[str, Any]:
        data: dict[str, Any] = {"amount_minor": self.amount_minor, "currency": CURRENCY}
        if self.original is not None:
            data["original_run_id"] = self.original
        return data


@dataclass(frozen=True)
class Seen:
    """The answer the POS received (before any power cut) to one request."""

    txn: Txn
    run_id: str
    status: str
    decision: str | None

    @property
    def approved(self) -> bool:
        return self.decision == "approved"


# --- the terminal's hardware, its power, and its reboots -------------------------------------


class _Mains:
    """The terminal's power: off once the VFS it writes through has been cut."""

    def __init__(self) -> None:
        self.vfs: PowerLossVFS | None = None
        self.was_cut = False  # latched when the VFS goes, until the next boot

    @property
    def off(self) -> bool:
        return self.was_cut or (self.vfs is not None and self.vfs.cut)

    def check(self) -> None:
        if self.off:
            raise PowerOff("the terminal has no power")


class _Customer:
    """The card reader with the current customer's card on it (one per request, as long
    as the request lasts, so a retry after a reboot reads it again)."""

    def __init__(self, mains: _Mains) -> None:
        self.mains = mains
        self.card: CardRead | None = None

    def read(self, timeout_s: float) -> CardRead:
        self.mains.check()
        if self.card is None:
            raise CardReadError("timeout")
        return self.card


class _PoweredPrinter:
    def __init__(self, mains: _Mains, printer: SimPrinter) -> None:
        self.mains, self.printer = mains, printer

    def print_receipt(self, lines: list[str]) -> None:
        self.mains.check()
        self.printer.print_receipt(lines)


class _LostAnswer:
    """The fault of ``Txn.lost_outage_s``, armed by the POS for its request and fired at
    the terminal's next authorisation: the acquirer decides and records it, the reply is
    lost, and the link then stays down. Once per request, across reboots (a retry after
    a cut re-arms it only if it never fired)."""

    def __init__(self, sim: SimAcquirer, link: SimNetworkLink) -> None:
        self.sim, self.link = sim, link
        self.armed: Txn | None = None
        self.fired: set[str] = set()  # POS keys
        self.lost_keys: set[str] = set()  # the acquirer keys whose answer was lost
        self.outage_s = 0.0

    def arm(self, txn: Txn) -> None:
        if txn.lost_outage_s and txn.pos_key not in self.fired:
            self.armed = txn

    def authorize(self, http: HttpAcquirer, req: AuthRequest) -> AuthResponse:
        txn, self.armed = self.armed, None
        if txn is None:
            return http.authorize(req)
        self.fired.add(txn.pos_key)
        self.lost_keys.add(req.idempotency_key)
        self.outage_s += txn.lost_outage_s
        self.sim.lose_reply(req.idempotency_key)
        try:
            return http.authorize(req)
        finally:
            self.link.down_for(txn.lost_outage_s)


class _PoweredAcquirer:
    def __init__(self, mains: _Mains, http: HttpAcquirer, lost: _LostAnswer) -> None:
        self.mains, self.http, self.lost = mains, http, lost

    def authorize(self, req: AuthRequest) -> AuthResponse:
        self.mains.check()
        return self.lost.authorize(self.http, req)

    def reverse(self, original_key: str, idempotency_key: str) -> AuthResponse:
        self.mains.check()
        return self.http.reverse(original_key, idempotency_key)

    def refund(self, req: AuthRequest) -> AuthResponse:
        self.mains.check()
        return self.http.refund(req)


_vfs_names = itertools.count()


class _Rig:
    """One terminal (its data directory, hardware and clock) across power cuts."""

    def __init__(
        self,
        root: Path,
        acquirer: SimAcquirer,
        client: httpx.Client,
        clock_start: float = START,
    ) -> None:
        self.root = root
        self.clock = FakeClock(clock_start)
        self.mains = _Mains()
        self.link = SimNetworkLink(self.clock)
        self.printer = SimPrinter()
        self.customer = _Customer(self.mains)
        # One shared client: building one (its TLS context) costs more than a payment.
        self.http = HttpAcquirer(acquirer.url, client=client, link=self.link, timeout_s=5.0)
        self.lost = _LostAnswer(acquirer, self.link)
        self.peripherals = Peripherals(
            card_reader=self.customer,
            printer=_PoweredPrinter(self.mains, self.printer),
            acquirer=_PoweredAcquirer(self.mains, self.http, self.lost),
            link=self.link,
        )
        self.cfg = EdgeConfig(
            device_id=DEVICE_ID,
            data_dir=root,
            socket_path=root / "api.sock",
            synchronous="FULL",
            risk=LIMITS,
        )
        self.terminal: Terminal | None = None
        #: The event the last cut landed on: "write db", "sync db-wal", ...
        self.cut_kind: str | None = None
        #: Cuts the VFS could not carry out (the disk is then not what a cut leaves).
        self.cut_failures: list[str] = []
        #: The kind of every event the current boot's VFS saw, in order.
        self.event_kinds: list[str] = []

    @property
    def cut(self) -> bool:
        return self.mains.off

    @property
    def vfs(self) -> PowerLossVFS | None:
        return self.mains.vfs

    def boot(
        self, cut_at: int | None = None, *, tear: bool = False, powerloss: bool = True
    ) -> Terminal:
        """Open the terminal: through a fresh ``PowerLossVFS`` cutting at its event
        ``cut_at`` (never, if None), or through the default VFS (``powerloss=False``).
        Raises what a cut during the open raises (the rig is then cut)."""
        assert self.terminal is None, "boot a terminal that is down"
        vfs: PowerLossVFS | None = None
        self.cut_kind = None
        self.event_kinds = []
        if powerloss:
            tear_rng = random.Random(cut_at)

            def on_event(kind: str, path: str, n: int) -> None:
                self.event_kinds.append(kind)
                if n == cut_at and vfs is not None:
                    self.cut_kind = f"{kind} {path.rsplit('.', 1)[-1]}"
                    try:
                        vfs.cut_power(tear=tear, rng=tear_rng)
                    except apsw.Error as exc:  # a tool failure, told apart from a finding
                        self.cut_failures.append(
                            f"hwsim.powerloss failed to cut at {kind} {path}: "
                            f"{type(exc).__name__}: {exc}"
                        )
                        raise

            vfs = PowerLossVFS(f"cuttorture-{next(_vfs_names)}", on_event=on_event)
        self.mains.vfs = vfs  # a failed boot leaves it: down() unregisters it
        self.mains.was_cut = False
        terminal = Terminal(
            self.cfg,
            self.peripherals,
            clock=self.clock,
            rng=random.Random(0),
            vfs=None if vfs is None else vfs.vfs_name,
        )
        # Seeded backoff jitter: the same scenario writes the same events every time.
        terminal.engine.rng = random.Random(0)
        self.terminal = terminal
        return terminal

    def down(self) -> None:
        """Power is gone (or the terminal stops): close what is open, write nothing more."""
        terminal, self.terminal = self.terminal, None
        if terminal is not None:
            terminal.engine.close()
            # A dead connection's closing checkpoint fails; it is closed all the same.
            with contextlib.suppress(apsw.Error):
                terminal.store.close()
        self._unregister()

    def _unregister(self) -> None:
        if self.mains.vfs is not None:
            self.mains.was_cut = self.mains.vfs.cut
            self.mains.vfs.unregister()
        self.mains.vfs = None

    def close(self) -> None:
        self.down()
        self.http.close()  # the shared client stays open: its owner closes it

    def settle(self) -> None:
        """The daemon's main loop in virtual time: recover, advance to the next due run,
        until no run is in flight."""
        assert self.terminal is not None
        engine, store = self.terminal.engine, self.terminal.store
        for _ in range(MAX_SETTLE_TURNS):
            engine.recover()
            inflight = store.list_runs(_IN_FLIGHT, limit=_ALL)
            if not inflight:
                return
            now = self.clock.now()
            due = min((r.next_attempt_at or now for r in inflight), default=now)
            self.clock.advance(max(due - now, 0.5))
        stuck = store.list_runs(_IN_FLIGHT, limit=_ALL)
        raise _Stuck(", ".join(f"{r.workflow_type} {r.run_id} {r.status}" for r in stuck))


# --- the POS app -------------------------------------------------------------------------


@dataclass
class _Pos:
    rig: _Rig
    seen: dict[str, Seen] = field(default_factory=dict)  # pos key -> the answer

    def submit(self, txn: Txn) -> Seen | None:
        """Send ``txn`` and wait for the terminal to finish it. The answer, or None when
        the power went before it came (the POS then retries after the reboot). Raises
        what the terminal raised when it did not lose power."""
        rig = self.rig
        assert rig.terminal is not None
        rig.link.up() if txn.link_up else rig.link.down()
        rig.printer.state = "jam" if txn.jam else "ok"
        rig.customer.card = make_card(txn.card)
        rig.lost.arm(txn)
        try:
            engine = rig.terminal.engine
            run_id = engine.start(txn.kind, txn.input(), idempotency_key=txn.pos_key)
            rig.settle()
            run = engine.get(run_id)
        except (PowerOff, TillflowError, apsw.Error):
            if rig.cut:
                return None  # the card stays on the reader until the POS has an answer
            raise
        if rig.cut:
            return None  # the answer was never sent: the terminal died first
        rig.customer.card = None
        rig.lost.armed = None  # answered without reaching the acquirer: nothing to lose
        seen = Seen(txn, run.run_id, str(run.status), run.state.get("decision"))
        self.seen[txn.pos_key] = seen
        return seen


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
        terminal.store.ack_outbox_through(last)


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
                if self.rng.random() < 0.1:
                    _upload(rig.terminal, self.cloud)
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
                    rig.terminal, ledger=self.acquirer.ledger, cloud=self.cloud
                ):
                    self.violation(f"as the cut left it: {text}")
                tally.cuts_reversal_pending += any(_pending(r) for r in left)
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
            self.rig.terminal, seen=self.pos.seen, ledger=self.acquirer.ledger, cloud=self.cloud
        )
        for text in found:
            self.violation(text)
        self.unknown |= {
            r.run_id
            for r in self.rig.terminal.store.list_runs(None, limit=_ALL)
            if r.workflow_type == "payment" and _went_unknown(r)
        }


# --- the deterministic sweep -------------------------------------------------------------

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
