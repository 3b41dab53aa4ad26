"""kill -9 torture: the terminal daemon under payment load, killed at random moments.

``run(n, seed=..., workdir=...)`` keeps ONE terminal (one data directory, a terminal's
life) beside the simulators (``SimDeviceServer``, ``SimAcquirer``) and a simulated POS
app, and SIGKILLs the daemon ``n`` times, restarting it after each kill as systemd
would. The POS behaves like a real one: it pays, refunds and voids one transaction at a
time; a request a kill cut off is sent again with the SAME idempotency key once the
daemon is back, until it gets an answer, and an answer that is not final yet is polled
until it is. The link goes down in windows, so payments are approved online and
offline; amounts over the floor limit while offline, and over the acquirer's limit while
online, are declined.

Where a kill lands (seeded; ``TRIGGERS``): during start-up, between "opening the
database" and READY (migration, recovery of what the last kill left); right after READY
(the POS's retry in flight); at a random moment under load; and at three moments that
chance rarely hits: the card reader has just handed a card over, the acquirer has just
recorded an effect and not yet answered (the lost reply), the printer has just printed.
Those three kill from inside the simulator, before it answers.

And a fault that spans lives (issue 10 §1): **an answer lost at the acquirer, then a
long outage** (``FAULTS``). Every ``FAULT_GAP_LIVES`` lives or so, once the previous one
is over, the acquirer's next approval of a new authorisation is recorded and its answer
lost -- the daemon killed right there (``lost_answer``), or the connection dropped with
the daemon left running, to be killed at a random moment of the outage
(``dropped_answer``) -- and at that moment the link goes down and the acquirer becomes
unreachable (``drop``: whatever slips past a cached link check is lost unanswered) for
``OUTAGE_FACTOR`` times the payment's whole authorisation retry window, plus a second.
The daemon runs in real time, and with the link down its retries fail at once, so that
window is the sum of their backoffs in payment.yaml (about 3.3 s); the outages last
6-11 s. Its later attempts find the link down, the outcome is ``unknown``, and
``reverse_unknown`` retries the reversal through the rest of the outage and after it.
The lives go on meanwhile, so kills land during the outage and while the reversal is
pending; the POS, whose payment it was, polls through ``unknown``/``reversal_pending``
until the sale is declined (``acquirer_unreachable``).

After every kill, with the daemon dead, ``hwsim.killcheck.Checker`` looks at the
database as the crash left it, at the acquirer's ledger and at what the POS saw; at the
end, after a graceful stop, once more with every run required to be finished. The
invariants it checks (DESIGN.md 2, issue 5) are listed in ``hwsim.killcheck``.

``python -m hwsim.killtorture -n 1000 --seed 7`` prints the tally as JSON (exit 1 when
a violation was found).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import httpx
from hwsim.acquirer import Mode, Operation, SimAcquirer
from hwsim.card_reader import SimCardReader
from hwsim.devices import SimDeviceServer
from hwsim.killcheck import TERMINAL_STATUSES, Checker, PosBook, PosOutcome
from hwsim.printer import SimPrinter

import edge.terminal
from edge.engine.definition import ActionStep
from edge.engine.loader import load_file
from edge.terminal.ports import AuthResponse

__all__ = ["FAULTS", "TRIGGERS", "main", "run"]

Log = Callable[[str], None]

#: Where kills land, with their weights (see the module docstring).
TRIGGERS: dict[str, int] = {
    "boot": 12,
    "ready": 10,
    "load": 30,
    "card": 14,
    "acquirer": 22,
    "print": 12,
}

#: The lost answer followed by a long outage, in its two variants, taken in turn: the
#: daemon killed as the answer is lost, or the connection dropped and the daemon killed
#: later in the outage. Kills that hit them count under these names.
FAULTS = ("lost_answer", "dropped_answer")
#: Ordinary lives between the end of one such fault (the link back, no reversal pending)
#: and the next; none is started in the last ``FAULT_TAIL_LIVES`` lives.
FAULT_GAP_LIVES = 25
FAULT_FIRST_LIFE = 8
FAULT_TAIL_LIVES = 15
#: How long a fault waits for an online approval to lose before the life is a "load".
FAULT_HOOK_TIMEOUT_S = 2.0
#: An outage lasts this many times the authorisation's retry window, plus a second.
OUTAGE_FACTOR = (1.5, 3.0)

# Risk limits: small payments may be approved offline; the offline caps are out of reach
# (nothing acknowledges the outbox here, so real caps would decline everything in time).
FLOOR_LIMIT = 2_500
#: The acquirer declines authorisations above this: online declines.
ACQUIRER_LIMIT = 9_000
#: The test card the acquirer declines by BIN.
HOT_BIN = "40000566"
CURRENCY = "EUR"

# Bounded waits, in seconds. Reached only when something is broken.
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 20.0
#: A run the POS holds that is not final yet (a retry backoff: at most 3 x 5 s, plus the
#: daemon's 1 s loop) must end within this.
RUN_TIMEOUT_S = 30.0
#: How long the POS waits for the daemon to come back after a kill.
GATE_TIMEOUT_S = 60.0
#: A payment the POS was shown ``reversal_pending`` must be settled within this, from
#: then (the outage, then the reversal's growing backoff: 1, 2, 4, 8 s...).
REVERSAL_TIMEOUT_S = 90.0
#: A hooked trigger (card, acquirer, print) that does not fire within this is replaced
#: by a plain kill (e.g. the link is down, so nothing reaches the acquirer).
HOOK_TIMEOUT_S = 0.6
#: Mean pause between two transactions: a busy till, not a benchmark (the database, and
#: so each check's cost, grows with the transactions).
THINK_S = 0.02
#: How often the POS polls a run that is not final, and the settling phase the database.
POLL_S = 0.05
#: Start-up: the window between "opening the database" and READY, until measured.
BOOT_WINDOW_S = 0.15
#: AF_UNIX paths must stay under ~108 bytes.
MAX_SOCKET_PATH = 100

_CARDS = {"visa": 30, "mastercard": 30, "amex": 25, "hot_listed": 8, "bad_luhn": 4, "expired": 3}


def _retry_window_s(step: str = "authorize_online") -> float:
    """The longest the payment's ``step`` retries for when every attempt fails at once
    (the link down): the sum of its backoffs, jitter at its maximum."""
    workflow = load_file(Path(edge.terminal.__file__).with_name("workflows") / "payment.yaml")
    action = workflow.steps[step]
    assert isinstance(action, ActionStep), f"{step} is not an action step"
    policy = action.retry
    attempts = policy.max_attempts
    assert isinstance(attempts, int), "a step retried forever has no window"
    return sum(
        min(policy.initial_backoff_s * policy.multiplier**k, policy.max_backoff_s)
        * (1 + policy.jitter)
        for k in range(attempts - 1)
    )


# --- the simulators, with kill hooks -------------------------------------------------------


class _Triggers:
    """One armed trigger at a time; the simulator that reaches it (after letting
    ``skip`` such moments pass, so a life serves some load first) kills the daemon from
    inside its handler, before it answers."""

    def __init__(self, kill: Callable[[], None]) -> None:
        self._kill = kill
        self._lock = threading.Lock()
        self._armed: str | None = None
        self._skip = 0
        self.fired = threading.Event()

    def arm(self, name: str, skip: int = 0) -> None:
        with self._lock:
            self.fired.clear()
            self._armed, self._skip = name, skip

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def hit(self, name: str) -> None:
        with self._lock:
            if self._armed != name:
                return
            if self._skip > 0:
                self._skip -= 1
                return
            self._armed = None
            self._kill()
            self.fired.set()


class _Reader(SimCardReader):
    def __init__(self, triggers: _Triggers) -> None:
        super().__init__()
        self._triggers = triggers

    def read(self, timeout_s: float) -> Any:
        card = super().read(timeout_s)
        self._triggers.hit("card")  # the card is out of the queue, the daemon never gets it
        return card


class _Printer(SimPrinter):
    def __init__(self, triggers: _Triggers) -> None:
        super().__init__()
        self._triggers = triggers

    def print_receipt(self, lines: list[str]) -> None:
        super().print_receipt(lines)
        self._triggers.hit("print")  # printed; the step that printed never commits


class _Fault:
    """One of ``FAULTS``, armed for a life: the acquirer fires it at the next approval of
    an authorisation it had not seen (``fire`` is the torture's: the outage, the kill)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: tuple[str, float] | None = None  # (variant, outage seconds)
        self.fired = threading.Event()

    def arm(self, variant: str, outage_s: float) -> None:
        with self._lock:
            self.fired.clear()
            self._armed = (variant, outage_s)

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def take(self) -> tuple[str, float] | None:
        with self._lock:
            armed, self._armed = self._armed, None
            return armed


class _Acquirer(SimAcquirer):
    """``SimAcquirer`` that reaches the ``acquirer`` trigger once it has decided and
    recorded a request, before the reply goes out: the reply is lost with the daemon.
    (``_apply`` is the simulator's one decide-and-record point.) An armed ``_Fault``
    goes first, at a new approved authorisation: ``fire(variant, outage_s, key)``."""

    def __init__(
        self, triggers: _Triggers, fault: _Fault, fire: Callable[[str, float, str], None]
    ) -> None:
        super().__init__()
        self._triggers = triggers
        self._fault = fault
        self._fire = fire

    def _apply(self, operation: Operation, key: str, body: bytes, mode: Mode) -> Any:
        with self._lock:
            fresh = key not in self._ledger
        response: AuthResponse = super()._apply(operation, key, body, mode)
        if operation == "authorize" and fresh and response.approved:
            armed = self._fault.take()
            if armed is not None:
                self._fire(*armed, key)
                self._fault.fired.set()
                return response
        self._triggers.hit("acquirer")
        return response


# --- the daemon process ------------------------------------------------------------------


class DaemonDied(Exception):
    """The daemon exited by itself."""


class _Daemon:
    """The daemon process and its notify socket."""

    def __init__(self, config: Path, sock_dir: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.notify_path = sock_dir / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(POLL_S)
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def spawn(self) -> None:
        self._drain()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        cmd = [sys.executable, "-m", "edge.cli", "edge", "run", "--config", str(self.config)]
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        with self._lock:
            self.proc = proc

    def wait_for(self, wanted: Callable[[str], bool], timeout_s: float) -> bool:
        """True once a notify line satisfies ``wanted``; False after ``timeout_s``.
        DaemonDied if the process ends first."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.notify.settimeout(min(POLL_S, remaining))
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                proc = self.proc
                if proc is not None and proc.poll() is not None:
                    raise DaemonDied(f"exit code {proc.returncode}") from None
                continue
            if any(wanted(line) for line in message.splitlines()):
                return True

    def _drain(self) -> None:
        self.notify.settimeout(0)
        with contextlib.suppress(BlockingIOError, TimeoutError):
            while True:
                self.notify.recv(4096)

    def kill(self) -> None:
        """SIGKILL (from any thread): no goodbye, no checkpoint. Reaped by ``reap``."""
        with self._lock:
            if self.proc is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)  # unreaped: the pid is still ours

    def reap(self) -> int:
        assert self.proc is not None
        return self.proc.wait(READY_TIMEOUT_S)

    def alive_for(self, seconds: float) -> bool:
        """Wait ``seconds`` of the daemon's life; False if it ended meanwhile."""
        assert self.proc is not None
        try:
            self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(READY_TIMEOUT_S)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(READY_TIMEOUT_S)
        self.notify.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no daemon log)"
        return "\n".join(text.splitlines()[-lines:])


class _Gate:
    """Open while a daemon is serving: the POS waits here to retry after a kill."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = False

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False

    def wait(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._open, timeout_s)


# --- the POS app -------------------------------------------------------------------------


class _Pos(threading.Thread):
    """One POS app: a transaction at a time, retried with the same key after a kill."""

    def __init__(
        self,
        rng: random.Random,
        sock: Path,
        devices: SimDeviceServer,
        gate: _Gate,
        book: PosBook,
    ) -> None:
        super().__init__(name="pos", daemon=True)
        self.rng = rng
        self.sock = sock
        self.devices = devices
        self.gate = gate
        self.book = book
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._seq = 0
        self._approved: list[str] = []  # payment run ids approved, not yet voided

    def run(self) -> None:
        transport = httpx.HTTPTransport(uds=str(self.sock))
        try:
            with httpx.Client(
                transport=transport, base_url="http://pos", timeout=REQUEST_TIMEOUT_S
            ) as client:
                while not self.stop.is_set():
                    self._transact(client, *self._next())
                    self.stop.wait(self.rng.expovariate(1 / THINK_S))  # the next customer
        except BaseException as exc:  # reported by the controller
            self.error = exc

    def top_up_card(self) -> None:
        """The customer's card is on the reader whenever the daemon may read one."""
        if self.devices.reader.queued == 0:
            names, weights = zip(*_CARDS.items(), strict=True)
            self.devices.insert_test_card(self.rng.choices(names, weights)[0])

    def _next(self) -> tuple[str, str, dict[str, Any]]:
        self._seq += 1
        key = f"k{self._seq:07d}"
        roll = self.rng.random()
        if roll < 0.10 and self._approved:
            payment = self._approved.pop(self.rng.randrange(len(self._approved)))
            return "void", "/v1/voids", {"payment_run_id": payment, "idempotency_key": key}
        if roll < 0.20:
            amount = self.rng.randint(100, 5_000)
            body = {"amount_minor": amount, "currency": CURRENCY, "idempotency_key": key}
            return "refund", "/v1/refunds", body
        size = self.rng.random()
        if size < 0.55:
            amount = self.rng.randint(100, FLOOR_LIMIT)
        elif size < 0.9:
            amount = self.rng.randint(FLOOR_LIMIT + 1, ACQUIRER_LIMIT)
        else:
            amount = self.rng.randint(ACQUIRER_LIMIT + 1, 20_000)
        body = {"amount_minor": amount, "currency": CURRENCY, "idempotency_key": key}
        return "payment", "/v1/payments", body

    def _transact(self, client: httpx.Client, kind: str, path: str, body: dict[str, Any]) -> None:
        key = str(body["idempotency_key"])
        with self.book.lock:
            self.book.sent[key] = kind
        retried = False
        deadline = time.monotonic() + RUN_TIMEOUT_S + GATE_TIMEOUT_S
        view: dict[str, Any] | None = None
        while view is None or not self._final(view, key):
            if view is not None and view.get("decision") == "unknown" and kind != "refund":
                deadline = self._pending(view, kind, key, deadline)
            if time.monotonic() > deadline:
                self._anomaly(f"{kind} {key}: no final answer within the deadline; last {view}")
                return
            try:
                if view is None:
                    self.top_up_card()
                    view = self._answer(client.post(path, json=body), kind, key)
                else:
                    self.stop.wait(POLL_S)  # not final yet (a retry backoff): poll
                    view = self._answer(client.get(f"/v1/runs/{view['run_id']}"), kind, key)
            except httpx.TransportError as exc:
                # The daemon died under the request: ask again, same key, once it is back.
                _close_sockets_of(exc)
                view = None
                with self.book.lock:
                    self.book.retries += 1
                    if not retried:
                        self.book.retried += 1
                retried = True
                if not self.gate.wait(GATE_TIMEOUT_S):
                    self._anomaly(f"{kind} {key}: the daemon did not come back")
                    return
                continue
            if view is None:
                return  # an error answer, recorded
        outcome = PosOutcome(
            kind,
            str(view["run_id"]),
            str(view["status"]),
            view.get("decision"),
            view.get("channel"),
            view.get("reason"),
        )
        with self.book.lock:
            self.book.outcomes[key] = outcome
        if kind == "payment" and outcome.status == "COMPLETED" and outcome.decision == "approved":
            self._approved.append(outcome.run_id)

    def _final(self, view: dict[str, Any], key: str) -> bool:
        """Whether ``view`` is the transaction's last word. A payment's or void's
        ``unknown`` never is (the terminal is releasing what the acquirer may hold): the
        POS polls on; one finished ``unknown`` is reported. (A refund may end unknown:
        README, known limits.)"""
        if view.get("status") not in TERMINAL_STATUSES:
            return False
        if view.get("decision") == "unknown" and view.get("workflow") != "refund":
            self._anomaly(f"{key}: run {view['run_id']} finished {view['status']} unknown")
        return True

    def _pending(self, view: dict[str, Any], kind: str, key: str, deadline: float) -> float:
        """A run shown ``unknown``: check what the POS is told, and give the reversal
        its time (the outage, then its backoff); returns the new deadline."""
        with self.book.lock:
            first = key not in self.book.pending_seen
            self.book.pending_seen.add(key)
        if first:
            if view.get("reason") != "reversal_pending" or view.get("auth_code"):
                self._anomaly(f"{kind} {key}: unknown, but shown {view}")
            if not view.get("customer_message"):
                self._anomaly(f"{kind} {key}: reversal pending with nothing to tell the customer")
            return max(deadline, time.monotonic() + REVERSAL_TIMEOUT_S)
        return deadline

    def _answer(self, response: httpx.Response, kind: str, key: str) -> dict[str, Any] | None:
        if response.status_code != 200:
            self._anomaly(f"{kind} {key}: HTTP {response.status_code}: {response.text[:300]}")
            return None
        view: dict[str, Any] = response.json()
        run_id = str(view["run_id"])
        with self.book.lock:
            first = self.book.run_ids.setdefault(key, run_id)
        if first != run_id:
            self._anomaly(f"{kind} {key}: answered with run {run_id}, earlier with {first}")
        return view

    def _anomaly(self, text: str) -> None:
        with self.book.lock:
            self.book.anomalies.append(text)


def _close_sockets_of(exc: BaseException) -> None:
    """Close the sockets the failed request's frames hold. httpcore leaves the socket of
    a failed Unix-socket connect (the daemon just killed) to the garbage collector, which
    then warns (ResourceWarning); a POS that retries through hundreds of kills would
    leave hundreds."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            for value in list(tb.tb_frame.f_locals.values()):
                if isinstance(value, socket.socket):
                    value.close()
            tb = tb.tb_next
        error = error.__cause__ or error.__context__


class _Weather(threading.Thread):
    """The network link: down for a second or so, between a few seconds up; and now and
    then a ``blackout``: the link down and the acquirer unreachable (``drop``) for as
    long as it says, whatever the weather. ``halt`` ends it all with the link up."""

    def __init__(self, rng: random.Random, devices: SimDeviceServer, acquirer: SimAcquirer):
        super().__init__(name="weather", daemon=True)
        self.rng = rng
        self.devices = devices
        self.acquirer = acquirer
        self._cond = threading.Condition()
        self._halted = False
        self._until = 0.0  # monotonic end of the blackout
        self.blackouts = 0
        self.blackout_s = 0.0

    def blackout(self, seconds: float) -> None:
        with self._cond:
            now = time.monotonic()
            self.blackout_s += max(now + seconds, self._until) - max(now, self._until)
            self._until = max(self._until, now + seconds)
            self.devices.set_link(False)
            self.acquirer.set_mode("drop")
            self.blackouts += 1
            self._cond.notify_all()

    def blacked_out(self) -> bool:
        with self._cond:
            return time.monotonic() < self._until

    def halt(self) -> None:
        with self._cond:
            self._halted = True
            self._cond.notify_all()

    def run(self) -> None:
        up = True
        with self._cond:
            while not self._halted:
                seen = self.blackouts
                pause = self.rng.uniform(2.0, 5.0) if up else self.rng.uniform(0.5, 2.0)
                self._cond.wait_for(lambda s=seen: self._halted or self.blackouts != s, pause)
                if self._halted:
                    break
                if self.blackouts == seen:
                    up = not up
                    self.devices.set_link(up)
                    continue
                while not self._halted and (left := self._until - time.monotonic()) > 0:
                    self._cond.wait(left)  # a later blackout may extend it meanwhile
                self.acquirer.set_mode("approve")
                self.devices.set_link(up := True)
            self.acquirer.set_mode("approve")
            self.devices.set_link(True)


# --- the torture -------------------------------------------------------------------------


def _config(work: Path, sock: Path, devices: str, acquirer: str) -> Path:
    path = work / "edge.yaml"
    path.write_text(
        "# Written by hwsim.killtorture: one terminal's life, killed again and again.\n"
        "device_id: T-KILL\n"
        f"data_dir: {work / 'data'}\n"
        f"socket_path: {sock}\n"
        "log_format: json\n"
        "synchronous: FULL\n"
        # Nothing acknowledges the outbox here: bounds out of reach, or all would decline.
        "outbox_max_messages: 10000000\n"
        "outbox_max_mb: 4096\n"
        "db_budget_mb: 65536\n"
        "risk:\n"
        f"  floor_limit_minor: {FLOOR_LIMIT}\n"
        "  offline_amount_cap_minor: 1000000000000\n"
        "  offline_count_cap: 1000000000\n"
        "  max_offline_age_s: 1000000000\n"
        "  velocity_max: 1000000000\n"
        "  online_random_percent: 50\n"
        "peripherals:\n"
        # The card is always on the reader; a read that finds none is a bug: fail fast.
        f"  card_reader: {{url: '{devices}', timeout_s: 2}}\n"
        f"  printer: {{url: '{devices}'}}\n"
        f"  link: {{url: '{devices}/link'}}\n"
        f"  acquirer: {{url: '{acquirer}', timeout_s: 5}}\n",
        encoding="utf-8",
    )
    return path


@dataclass
class _Tally:
    kills: int = 0
    triggers: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)  # FAULTS fired
    kills_in_outage: int = 0  # kills while a blackout held the link down
    kills_reversal_pending: int = 0  # kills that left a reversal pending
    violations: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    boot_s: float = 0.45  # spawn -> READY, measured
    window_s: float = BOOT_WINDOW_S  # "opening the database" -> READY, measured
    phases: dict[str, float] = field(  # seconds spent, by phase
        default_factory=lambda: dict.fromkeys(("life", "kill", "check"), 0.0)
    )

    def violation(self, where: str, problems: Iterable[str]) -> None:
        for problem in problems:
            if problem not in self.seen:  # a standing violation is reported once
                self.seen.add(problem)
                self.violations.append(f"{where}: {problem}")


class _Torture:
    def __init__(self, n: int, seed: int, work: Path, sock_dir: Path, log: Log | None) -> None:
        self.n = n
        self.seed = seed
        self.rng = random.Random(seed)
        self.work = work
        self.log = log or (lambda _: None)
        self.tally = _Tally()
        self.book = PosBook()
        self.gate = _Gate()
        self.daemon: _Daemon | None = None
        self.weather: _Weather | None = None
        self.triggers = _Triggers(self._kill)
        self.devices = SimDeviceServer(_Reader(self.triggers), _Printer(self.triggers))
        self.fault = _Fault()
        self.acquirer = _Acquirer(self.triggers, self.fault, self._fire)
        self.retry_window_s = _retry_window_s()
        self._fault_due: str | None = None  # the fault to arm until it fires
        self._fault_busy = False  # fired, and its outage or reversal not over yet
        self._next_fault = FAULT_FIRST_LIFE
        self._faults_started = 0
        self.acquirer.decline_over(ACQUIRER_LIMIT)
        self.acquirer.decline_bin(HOT_BIN, "hot_listed")
        self.sock_dir = sock_dir
        self.checker = Checker(work / "data" / "terminal.db")

    def _kill(self) -> None:
        self.gate.close()  # before the kill: every error the POS sees comes after it
        assert self.daemon is not None
        self.daemon.kill()

    def _fire(self, variant: str, outage_s: float, key: str) -> None:
        """From inside the acquirer, its approval under ``key`` recorded: the outage
        starts, and the answer is lost with the daemon or on the way back."""
        assert self.weather is not None
        self.weather.blackout(outage_s)
        if variant == "lost_answer":
            self._kill()
        else:
            self.acquirer.lose_reply(key)

    def _pick_fault(self, i: int) -> str | None:
        """The fault this life arms, if one is due (``FAULT_GAP_LIVES``)."""
        assert self.weather is not None
        if self._fault_busy:
            if self.weather.blacked_out() or self.checker.pending:
                return None
            self._fault_busy = False
            self._next_fault = i + FAULT_GAP_LIVES
        if self._fault_due is None and self._next_fault <= i <= self.n - FAULT_TAIL_LIVES:
            self._fault_due = FAULTS[self._faults_started % len(FAULTS)]
            self._faults_started += 1
        return self._fault_due

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        with self.devices, self.acquirer:
            cfg = _config(
                self.work, self.sock_dir / "edge.sock", self.devices.url, self.acquirer.url
            )
            self.daemon = _Daemon(cfg, self.sock_dir, self.work / "daemon.log")
            pos = _Pos(
                random.Random(self.seed + 1),
                self.sock_dir / "edge.sock",
                self.devices,
                self.gate,
                self.book,
            )
            weather = self.weather = _Weather(
                random.Random(self.seed + 2), self.devices, self.acquirer
            )
            try:
                weather.start()
                pos.start()
                for i in range(1, self.n + 1):
                    self._one_life(i, pos)
                    if i % max(1, self.n // 10) == 0:
                        self.log(
                            f"kill {i}/{self.n}: {len(self.book.outcomes)} transactions, "
                            f"{len(self.tally.violations)} violation(s), "
                            f"{time.monotonic() - started:.0f}s"
                        )
                self._last_life(pos)
            finally:
                pos.stop.set()
                weather.halt()
                self.gate.open()  # release a POS waiting for a daemon that will not come
                pos.join(REQUEST_TIMEOUT_S)
                weather.join(REQUEST_TIMEOUT_S)
                self.daemon.close()
        if pos.error is not None:
            self.tally.violation("POS", [f"the POS crashed: {pos.error!r}"])
        return self._summary(time.monotonic() - started)

    def _one_life(self, i: int, pos: _Pos) -> None:
        """Start the daemon, kill it at this life's trigger, check the crashed state."""
        assert self.daemon is not None and self.weather is not None
        names, weights = zip(*TRIGGERS.items(), strict=True)
        trigger = self._pick_fault(i) or self.rng.choices(names, weights)[0]
        pos.top_up_card()  # recovery may re-read the card the last kill took
        spawned = time.monotonic()
        self.daemon.spawn()
        try:
            trigger = self._until_trigger(trigger, spawned)
        except DaemonDied as exc:
            self.tally.violation(
                f"life {i}", [f"the daemon exited by itself ({exc}): {self.daemon.log_tail()}"]
            )
        killed = time.monotonic()
        self._kill()
        code = self.daemon.reap()
        self.triggers.disarm()
        self.fault.disarm()
        self.tally.kills += 1
        self.tally.triggers[trigger] += 1
        self.tally.kills_in_outage += self.weather.blacked_out()
        if code != -signal.SIGKILL:
            self.tally.violation(
                f"kill {i}",
                [f"the daemon ended with {code}, not by the kill: {self.daemon.log_tail()}"],
            )
        reaped = time.monotonic()
        problems = self.checker.check(self.acquirer.ledger, self.book.snapshot())
        self.tally.violation(f"after kill {i} ({trigger})", problems)
        self.tally.kills_reversal_pending += bool(self.checker.pending)
        done = time.monotonic()
        self.tally.phases["life"] += killed - spawned
        self.tally.phases["kill"] += reaped - killed
        self.tally.phases["check"] += done - reaped

    def _until_trigger(self, trigger: str, spawned: float) -> str:
        """Wait for the moment ``trigger`` names; return the trigger that happened."""
        assert self.daemon is not None
        daemon = self.daemon
        if trigger == "boot":
            if not daemon.wait_for(lambda ln: ln.startswith("STATUS=starting"), READY_TIMEOUT_S):
                raise DaemonDied("no start-up status")
            opening = time.monotonic()
            if not daemon.wait_for(
                lambda ln: ln == "READY=1", self.rng.uniform(0, self.tally.window_s)
            ):
                return "boot"
            self.tally.window_s = 0.8 * self.tally.window_s + 0.2 * (time.monotonic() - opening)
            self.gate.open()
            return "ready"  # READY came first: a kill right after it
        if not daemon.wait_for(lambda ln: ln == "READY=1", READY_TIMEOUT_S):
            raise DaemonDied(f"no READY within {READY_TIMEOUT_S:g}s")
        self.tally.boot_s = 0.8 * self.tally.boot_s + 0.2 * (time.monotonic() - spawned)
        self.gate.open()
        if trigger in FAULTS:
            return self._until_fault(trigger)
        if trigger == "ready":
            delay = self.rng.uniform(0.0, 0.03)
        elif trigger == "load":
            delay = self.rng.uniform(0.03, 0.35)
        else:
            self.triggers.arm(trigger, skip=self.rng.randrange(4))
            if self.triggers.fired.wait(HOOK_TIMEOUT_S):
                return trigger
            self.triggers.disarm()
            if self.triggers.fired.is_set():
                return trigger  # fired between the wait and the disarm
            return "load"
        if not daemon.alive_for(delay):
            raise DaemonDied(f"exit code {daemon.proc.returncode if daemon.proc else None}")
        return trigger

    def _until_fault(self, variant: str) -> str:
        """Arm ``variant`` and wait for it to fire: the life then ends at the lost answer
        (``lost_answer``) or at a random moment of the outage (``dropped_answer``)."""
        assert self.daemon is not None
        lo, hi = OUTAGE_FACTOR
        outage_s = self.rng.uniform(lo, hi) * self.retry_window_s + 1.0
        self.fault.arm(variant, outage_s)
        if not self.fault.fired.wait(FAULT_HOOK_TIMEOUT_S):
            self.fault.disarm()
            if not self.fault.fired.is_set():
                return "load"  # no online approval came (the link was down): next life
        self._fault_due, self._fault_busy = None, True
        self.tally.faults[variant] += 1
        if variant == "dropped_answer":
            delay = self.rng.uniform(0.2, outage_s)
            if not self.daemon.alive_for(delay):
                raise DaemonDied(f"exit code {self.daemon.proc and self.daemon.proc.returncode}")
        return variant

    def _last_life(self, pos: _Pos) -> None:
        """A last start: the POS finishes, every run ends, a graceful stop, final checks."""
        assert self.daemon is not None
        pos.top_up_card()
        self.daemon.spawn()
        try:
            if not self.daemon.wait_for(lambda ln: ln == "READY=1", READY_TIMEOUT_S):
                raise DaemonDied(f"no READY within {READY_TIMEOUT_S:g}s")
        except DaemonDied as exc:
            self.tally.violation("last start", [f"{exc}: {self.daemon.log_tail()}"])
            return
        self.gate.open()
        pos.stop.set()
        pos.join(RUN_TIMEOUT_S + GATE_TIMEOUT_S)
        assert self.weather is not None
        self.weather.halt()
        self.weather.join(REQUEST_TIMEOUT_S)  # it leaves the link up: backoffs can finish
        deadline = time.monotonic() + REVERSAL_TIMEOUT_S
        while self._unfinished() and time.monotonic() < deadline:
            time.sleep(POLL_S)  # the daemon's loop picks retries up when they are due
        code = self.daemon.terminate()
        if code != 0:
            self.tally.violation(
                "stop", [f"SIGTERM ended the daemon with {code}: {self.daemon.log_tail()}"]
            )
        problems = self.checker.check(self.acquirer.ledger, self.book.snapshot(), final=True)
        self.tally.violation("at the end", problems)

    def _unfinished(self) -> int:
        conn = apsw.Connection(str(self.checker.db), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            conn.set_busy_timeout(5_000)
            statuses = ",".join(f"'{s}'" for s in sorted(TERMINAL_STATUSES))
            row = conn.execute(
                f"SELECT count(*) FROM workflow_runs WHERE status NOT IN ({statuses})"
            ).fetchone()
            return int(row[0]) if row else 0
        finally:
            conn.close()

    def _summary(self, seconds: float) -> dict[str, Any]:
        book = self.book.snapshot()
        kinds: dict[str, Counter[str]] = {k: Counter() for k in ("payment", "refund", "void")}
        for o in book.outcomes.values():
            c = kinds[o.kind]
            c[o.decision or o.status.lower()] += 1
            if o.kind == "payment" and o.decision == "approved":
                c[f"approved_{o.channel or 'offline'}"] += 1
        sent = Counter(book.sent.values())
        ledger = self.acquirer.ledger.values()
        weather = self.weather
        unreachable = sum(
            1
            for o in book.outcomes.values()
            if o.kind == "payment" and o.reason == "acquirer_unreachable"
        )
        db = self.checker.db
        return {
            "kind": "kill",
            "n": self.n,
            "seed": self.seed,
            "kills": self.tally.kills,
            "kills_by_trigger": dict(sorted(self.tally.triggers.items())),
            "payments_sent": sent["payment"],
            "approved": kinds["payment"]["approved"],
            "approved_online": kinds["payment"]["approved_online"],
            "approved_offline": kinds["payment"]["approved_offline"],
            "declined": kinds["payment"]["declined"],
            "reversed": kinds["payment"]["reversed"],
            "failed": kinds["payment"]["failed"] + kinds["payment"]["rolled_back"],
            "refunds_sent": sent["refund"],
            "refunds_approved": kinds["refund"]["approved"],
            "voids_sent": sent["void"],
            "voids_approved": kinds["void"]["approved"],
            "retried_after_kill": book.retried,
            "requests_resent": book.retries,
            "acquirer_requests": len(self.acquirer.received),
            "acquirer_charges": sum(1 for e in ledger if e.operation == "authorize" and e.effect),
            # Issue 10 §1: answers lost at the acquirer, then long outages.
            "lost_answer_outages": dict(sorted(self.tally.faults.items())),
            "outages": weather.blackouts if weather else 0,
            "outage_seconds": round(weather.blackout_s, 1) if weather else 0.0,
            "auth_retry_window_s": round(self.retry_window_s, 2),
            "kills_in_outage": self.tally.kills_in_outage,
            "kills_reversal_pending": self.tally.kills_reversal_pending,
            "acquirer_replies_lost": self.acquirer.lost_replies,
            "acquirer_requests_dropped": self.acquirer.dropped,
            "went_unknown": self.checker.figures.get("went_unknown", 0),
            "released_after_unknown": self.checker.figures.get("released_after_unknown", 0),
            "pos_saw_reversal_pending": len(book.pending_seen),
            "declined_acquirer_unreachable": unreachable,
            "acquirer_reversals": sum(1 for e in ledger if e.operation == "reverse" and e.effect),
            "db_bytes": sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists()),
            "daemon_start_s": round(self.tally.boot_s, 3),
            "seconds_by_phase": {k: round(v, 1) for k, v in self.tally.phases.items()},
            "violations": self.tally.violations,
            "seconds": round(seconds, 1),
        }


def run(n: int, *, seed: int, workdir: Path, log: Log | None = None) -> dict[str, Any]:
    """Kill the terminal daemon ``n`` times under payment load; return the tally.

    ``workdir`` holds the terminal's data directory, its config and the daemon's log
    (``daemon.log``, appended across lives). The sockets go beside it, or to a fresh
    directory under the system's temp dir when its path is too long for AF_UNIX.
    """
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    workdir.mkdir(parents=True, exist_ok=True)
    sock_dir = workdir
    if len(str(workdir / "notify")) > MAX_SOCKET_PATH:
        sock_dir = Path(tempfile.mkdtemp(prefix="tfk-", dir="/tmp"))
    try:
        return _Torture(n, seed, workdir, sock_dir, log).run()
    finally:
        if sock_dir != workdir:
            shutil.rmtree(sock_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hwsim.killtorture",
        description="kill -9 the terminal daemon N times under payment load; print the tally",
    )
    parser.add_argument("-n", type=int, default=200, help="kills (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kills and the load")
    parser.add_argument(
        "--workdir", type=Path, help="where the terminal lives (default: a fresh temp dir, kept)"
    )
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tf-kill-"))
    tally = run(args.n, seed=args.seed, workdir=workdir, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({**tally, "workdir": str(workdir)}, indent=2))
    return 1 if tally["violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
