"""A simulated network link: down windows on a clock, manual switches, seeded loss.

``SimNetworkLink`` implements ``edge.terminal.drivers.contracts.NetworkLink``. It is up
unless one of these says down:

* ``down()`` was called (until ``up()``);
* ``down_for(seconds)`` was called less than ``seconds`` of the clock ago (an outage
  that outlives whatever switches ``up()``/``down()`` meanwhile);
* the clock is inside a scheduled down window ``[start_s, end_s)``, in seconds after
  ``origin`` (the clock's reading when the link was made, unless given);
* the check is "lost": a fraction ``loss`` of checks fail, drawn from ``rng``, so the
  same seed gives the same sequence of drops.

Each check is a round trip: it spends ``latency_s`` of the clock's time (``clock.sleep``,
instant on a ``FakeClock``) before answering.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

from edge.engine.clock import Clock

__all__ = ["SimNetworkLink"]


class SimNetworkLink:
    def __init__(
        self,
        clock: Clock,
        schedule: Sequence[tuple[float, float]] = (),
        latency_s: float = 0.0,
        loss: float = 0.0,
        rng: random.Random | None = None,
        *,
        origin: float | None = None,
    ) -> None:
        for start, end in schedule:
            if not 0 <= start < end:
                raise ValueError(f"a down window needs 0 <= start < end, got ({start}, {end})")
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss is a fraction in [0, 1], got {loss}")
        if latency_s < 0:
            raise ValueError(f"latency_s must not be negative, got {latency_s}")
        self.clock = clock
        self.schedule = sorted(schedule)
        self.latency_s = latency_s
        self.loss = loss
        self.origin = clock.now() if origin is None else origin
        self._rng = rng if rng is not None else random.Random(0)
        self._forced_down = False
        self._lock = threading.Lock()
        self.checks = 0
        self.dropped = 0

    # --- manual switches ----------------------------------------------------------------

    def down(self) -> None:
        """Cut the link until ``up()`` (scheduled windows still apply after that)."""
        self._forced_down = True

    def up(self) -> None:
        self._forced_down = False

    def down_for(self, seconds: float) -> None:
        """An outage from now, ``seconds`` of the clock long: a down window added to the
        schedule, so ``up()`` does not end it."""
        if seconds <= 0:
            raise ValueError(f"an outage lasts a positive time, got {seconds}")
        start = max(self.clock.now() - self.origin, 0.0)
        with self._lock:
            self.schedule = sorted([*self.schedule, (start, start + seconds)])

    # --- NetworkLink ---------------------------------------------------------------------

    def is_up(self) -> bool:
        if self.latency_s:
            self.clock.sleep(self.latency_s)
        with self._lock:
            self.checks += 1
            if self._forced_down or self.in_window():
                return False
            # Draw only when loss is configured, so adding a window does not shift the
            # sequence of drops a seed produces.
            if self.loss and self._rng.random() < self.loss:
                self.dropped += 1
                return False
            return True

    def in_window(self) -> bool:
        """Whether the clock is inside a scheduled down window now."""
        elapsed = self.clock.now() - self.origin
        return any(start <= elapsed < end for start, end in self.schedule)
