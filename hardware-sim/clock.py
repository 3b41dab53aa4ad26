"""Virtual time with an agenda: ``FakeClock`` plus callbacks that fire as time passes.

Outage schedules, a customer pulling the card at second 3, a power cut at second 40:
``at(t, fn)`` runs ``fn`` when the clock is advanced (or slept) to or past ``t``, with
``now()`` reading exactly ``t`` while it runs, in time order (ties in the order they were
scheduled). Nothing waits on the wall clock.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable

from edge.engine.clock import FakeClock

__all__ = ["VirtualClock"]


class VirtualClock(FakeClock):
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        super().__init__(start)
        self._agenda: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()
        self._agenda_lock = threading.Lock()

    def at(self, t: float, fn: Callable[[], object]) -> None:
        """Run ``fn`` when time reaches ``t`` (absolute, this clock's seconds)."""
        if t < self.now():
            raise ValueError(f"cannot schedule at {t}: the clock already reads {self.now()}")
        with self._agenda_lock:
            heapq.heappush(self._agenda, (t, next(self._order), fn))

    def after(self, seconds: float, fn: Callable[[], object]) -> None:
        """Run ``fn`` ``seconds`` from now."""
        self.at(self.now() + seconds, fn)

    @property
    def pending(self) -> int:
        """Callbacks not yet fired."""
        with self._agenda_lock:
            return len(self._agenda)

    def advance(self, seconds: float) -> None:
        """Move forward ``seconds``, firing every callback due on the way."""
        if seconds < 0:
            raise ValueError(f"time only moves forward, got {seconds}")
        target = self.now() + seconds
        while True:
            with self._agenda_lock:
                if not self._agenda or self._agenda[0][0] > target:
                    break
                t, _, fn = heapq.heappop(self._agenda)
            self._move_to(t)
            fn()  # may schedule more callbacks, or advance the clock itself
        self._move_to(target)

    def _move_to(self, t: float) -> None:
        step = t - self.now()
        if step > 0:
            super().advance(step)
