"""A simulated receipt printer.

``SimPrinter`` implements ``edge.terminal.drivers.contracts.Printer``. ``state`` is ``"ok"``,
``"paper_out"`` or ``"jam"``; while it is not ok every print fails (``PaperOut`` /
``PrinterJam``) and prints nothing, until ``refill()`` or ``clear_jam()``.
``fail_next(state)`` makes only the next print fail, as a jam that clears itself or a
roll that runs out mid-receipt and is swapped at once. Printed receipts are kept in
``printed``.
"""

from __future__ import annotations

import threading
from typing import Literal, get_args

from edge.terminal.drivers.contracts import PaperOut, PrinterJam

__all__ = ["PrinterState", "SimPrinter"]

PrinterState = Literal["ok", "paper_out", "jam"]
_STATES: tuple[str, ...] = get_args(PrinterState)


def _check_state(state: str) -> PrinterState:
    if state not in _STATES:
        raise ValueError(f"printer state must be one of {', '.join(_STATES)}; got {state!r}")
    return state  # type: ignore[return-value]


class SimPrinter:
    def __init__(self, state: PrinterState = "ok") -> None:
        self._state: PrinterState = _check_state(state)
        self._next_failure: PrinterState | None = None
        self._lock = threading.Lock()
        self.printed: list[list[str]] = []
        self.attempts = 0

    @property
    def state(self) -> PrinterState:
        return self._state

    @state.setter
    def state(self, value: PrinterState) -> None:
        self._state = _check_state(value)

    def fail_next(self, state: PrinterState) -> None:
        """The next print fails as if in ``state``; the one after prints normally."""
        if _check_state(state) == "ok":
            raise ValueError("fail_next needs a failing state: 'paper_out' or 'jam'")
        self._next_failure = state

    def refill(self) -> None:
        """An operator loads paper."""
        if self._state == "paper_out":
            self._state = "ok"

    def clear_jam(self) -> None:
        """An operator clears the paper path."""
        if self._state == "jam":
            self._state = "ok"

    def print_receipt(self, lines: list[str]) -> None:
        with self._lock:
            self.attempts += 1
            failure, self._next_failure = self._next_failure, None
            state = failure or self._state
            if state == "paper_out":
                raise PaperOut()
            if state == "jam":
                raise PrinterJam()
            self.printed.append(list(lines))
