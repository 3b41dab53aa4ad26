"""The kill -9 torture's fault injection: the simulators with kill hooks, and the weather.

``_Triggers`` holds one armed kill at a time; the card reader (``_Reader``: a card just
handed over), the printer (``_Printer``: a receipt just printed) and the acquirer
(``_Acquirer``: an effect just recorded, its reply not yet sent) reach it from inside
their handlers and kill the daemon before they answer. ``_Fault`` is the lost answer
then long outage of issue 10 §1, armed for a life and fired by ``_Acquirer`` at its next
approval of a new authorisation. ``_Weather`` is the network link: short down windows,
and the fault's ``blackout`` (the link down and the acquirer unreachable).
Used by ``hwsim.killtorture``, which decides when each is armed.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from hwsim.acquirer import Mode, Operation, SimAcquirer
from hwsim.card_reader import SimCardReader
from hwsim.devices import SimDeviceServer
from hwsim.printer import SimPrinter

from edge.terminal.drivers.contracts import AuthResponse


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

    def armed(self, name: str) -> bool:
        with self._lock:
            return self._armed == name

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
