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
Those three kill from inside the simulator, before it answers. And around the cloud's
acknowledgement (``ack``): the daemon runs with a sync client (``hwsim.killsync``) that
uploads its outbox to a simulated cloud and acknowledges what the cloud holds through
``Terminal.acknowledge`` (the messages dropped, the offline exposure of the offline
approvals among them released, in one transaction); the kill lands a few milliseconds
after the cloud's answer, before, inside or after that transaction.

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

This module holds where and when the kills land (``TRIGGERS``, ``FAULTS``), the
controller that runs the lives, kills, checks and tallies (``_Torture``), and ``run`` and
``main``. The simulators' kill hooks, the fault and the weather are in
``hwsim.killfaults``; the daemon process and its notify socket in ``hwsim.killdaemon``;
the POS app in ``hwsim.killpos``.

``python -m hwsim.killtorture -n 1000 --seed 7`` prints the tally as JSON (exit 1 when
a violation was found).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
from hwsim.devices import SimDeviceServer
from hwsim.killcheck import TERMINAL_STATUSES, Checker, PosBook
from hwsim.killdaemon import POLL_S, READY_TIMEOUT_S, DaemonDied, _Daemon, _Gate
from hwsim.killfaults import _Acquirer, _Fault, _Printer, _Reader, _Triggers, _Weather
from hwsim.killpos import (
    ACQUIRER_LIMIT,
    FLOOR_LIMIT,
    GATE_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    REVERSAL_TIMEOUT_S,
    RUN_TIMEOUT_S,
    _Pos,
)
from hwsim.killsync import SimCloud

from edge.engine.definition import ActionStep
from edge.engine.loader import load_file
from edge.terminal.sale import WORKFLOWS

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
    "ack": 12,
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

#: The test card the acquirer declines by BIN.
HOT_BIN = "40000566"

#: A hooked trigger (card, acquirer, print) that does not fire within this is replaced
#: by a plain kill (e.g. the link is down, so nothing reaches the acquirer).
HOOK_TIMEOUT_S = 0.6
#: The ``ack`` trigger waits for the daemon's next sync turn (its loop turns every 1 s).
ACK_HOOK_TIMEOUT_S = 2.5
#: The ``ack`` kill lands this long (at most) after the cloud answered: before, inside
#: or after the daemon's acknowledgement (a transaction of a few milliseconds).
ACK_KILL_DELAY_S = 0.012
#: Start-up: the window between "opening the database" and READY, until measured.
BOOT_WINDOW_S = 0.15
#: AF_UNIX paths must stay under ~108 bytes.
MAX_SOCKET_PATH = 100


def _retry_window_s(step: str = "authorize_online") -> float:
    """The longest the payment's ``step`` retries for when every attempt fails at once
    (the link down): the sum of its backoffs, jitter at its maximum."""
    workflow = load_file(WORKFLOWS / "payment.yaml")
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
        # The cloud acknowledges only at the daemon's sync turns: bounds out of reach.
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
        self.cloud = SimCloud(on_answer=self._acked)
        self._ack_rng = random.Random(seed + 3)  # the cloud's handler thread only
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

    def _acked(self) -> None:
        """From inside the cloud, its answer sent: the ``ack`` trigger's kill, a moment
        later, lands around the daemon's ``Terminal.acknowledge``."""
        if self.triggers.armed("ack"):
            time.sleep(self._ack_rng.uniform(0.0, ACK_KILL_DELAY_S))
            self.triggers.hit("ack")

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
        with self.devices, self.acquirer, self.cloud:
            cfg = _config(
                self.work, self.sock_dir / "edge.sock", self.devices.url, self.acquirer.url
            )
            # The daemon with a sync client: its outbox uploaded to and acknowledged by
            # the cloud, through Terminal.acknowledge (hwsim.killsync).
            command = [sys.executable, "-m", "hwsim.killsync", "--config", str(cfg)]
            command += ["--cloud", self.cloud.url]
            self.daemon = _Daemon(cfg, self.sock_dir, self.work / "daemon.log", command)
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
        self.tally.violation("cloud", self.cloud.conflicts)
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
        problems = self.checker.check(
            self.acquirer.ledger, self.book.snapshot(), cloud=self.cloud.messages()
        )
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
            ack = trigger == "ack"
            self.triggers.arm(trigger, skip=0 if ack else self.rng.randrange(4))
            if self.triggers.fired.wait(ACK_HOOK_TIMEOUT_S if ack else HOOK_TIMEOUT_S):
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
        problems = self.checker.check(
            self.acquirer.ledger, self.book.snapshot(), final=True, cloud=self.cloud.messages()
        )
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
            # Section 5 of issue 11: the cloud's acknowledgements, through Terminal.acknowledge.
            "cloud_uploads": self.cloud.uploads,
            "acknowledged": self.checker.figures.get("acknowledged", 0),
            "offline_acknowledged": self.checker.figures.get("offline_acknowledged", 0),
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
