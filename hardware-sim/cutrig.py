"""The power-cut tortures' terminal, and the simulated POS app that drives it.

``_Rig`` is one terminal (its data directory, hardware and virtual clock) across power
cuts: ``boot`` opens it through a fresh ``PowerLossVFS`` armed to cut at one of its
events (or through the default VFS), ``down`` closes what a cut left open, ``settle``
runs the daemon's main loop in virtual time until no run is in flight. After a cut the
terminal's CPU is dead too: its card reader, printer and acquirer calls raise
``PowerOff`` (which no step can catch), so a dead terminal sends nothing.

``_LostAnswer`` is the fault of issue 10 §1 (``Txn.lost_outage_s``): the acquirer
approves an authorisation, the answer is lost on the way back (``SimAcquirer.lose_reply``)
and the link then stays down (``SimNetworkLink.down_for``, across reboots).

``_Pos`` is the POS app: it sends a ``Txn`` under its idempotency key and records the
answer it got (``Seen``); a request the power cut off is sent again after the reboot.
Used by ``hwsim.cuttorture`` (random cuts) and ``hwsim.cutsweep`` (every event in turn).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import apsw
import httpx
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import make_card
from hwsim.network import SimNetworkLink
from hwsim.powerloss import PowerLossVFS
from hwsim.printer import SimPrinter

from edge.engine import FakeClock, Status
from edge.errors import TillflowError
from edge.terminal.carddata import CardRead
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.drivers.contracts import AuthRequest, AuthResponse, CardReadError
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.terminal import Terminal

__all__ = ["PowerOff", "Seen", "Txn"]

#: Virtual time a terminal starts at: 2033, inside the test cards' validity (2039).
START = 2_000_000_000.0
#: Virtual seconds a reboot takes: past the engine's 30 s lease, so the new process may
#: take over runs the dead one held (same pid, so it cannot tell the owner is gone).
REBOOT_S = 60.0
#: Virtual seconds between two customers.
TXN_GAP_S = 20.0
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
    kind: Literal["payment", "refund", "ack"]  # ack: the cloud acknowledges the outbox
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
    sent: dict[str, str] = field(default_factory=dict)  # pos key -> kind, answered or not

    def submit(self, txn: Txn) -> Seen | None:
        """Send ``txn`` and wait for the terminal to finish it. The answer, or None when
        the power went before it came (the POS then retries after the reboot). Raises
        what the terminal raised when it did not lose power."""
        rig = self.rig
        assert rig.terminal is not None
        self.sent[txn.pos_key] = txn.kind
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
