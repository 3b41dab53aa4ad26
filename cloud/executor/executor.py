"""``CeleryExecutor``: the engine's ``Executor`` port over a Celery broker.

``submit(run_id, not_before)`` publishes ``advance_run(run_id)`` and nothing else: the
run's state is in PostgreSQL, the message only says "look at this run". A publish that
fails (the broker away) is logged and dropped: the run is durable and the sweep submits
it again (``ports.Executor``: a submission may be lost without harm).

When is a run advanced, for a ``not_before`` in the future:

- from a process that does not hold the run (the API, the sweep): a countdown, when the
  wait is at most ``MAX_COUNTDOWN_S`` (well under the broker's visibility timeout, see
  ``celery_app``); a longer wait sends nothing, and the sweep submits the run once due;
- from a worker process, whose engine hands back a run it holds that sleeps through a
  retry backoff (``hold_sleeping=True``): the run keeps this process's lease through the
  backoff (``outcomes.schedule_retry``), so a message served by any other process would
  find it held and do nothing. This process times it itself (``_Timers``) and advances
  it when due; if the process dies meanwhile, its lease is seen dead (same host) or
  expires, and the sweep submits the run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING

from cloud.executor.celery_app import ADVANCE_TASK, MAX_COUNTDOWN_S, QUEUE
from edge.engine.ports import Driver

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

#: Seconds between two warnings about failed publishes: a broker away for an hour must
#: not write a line per run.
PUBLISH_WARN_EVERY_S = 10.0


class CeleryExecutor:
    #: Nothing is advanced in the caller: new runs stay unleased for the worker to claim.
    advances_in_caller = False

    def __init__(
        self,
        app: Celery,
        *,
        hold_sleeping: bool = False,
        max_countdown_s: float = MAX_COUNTDOWN_S,
    ) -> None:
        self.app = app
        self.hold_sleeping = hold_sleeping
        self.max_countdown_s = max_countdown_s
        self._engine: Driver | None = None
        self._timers: _Timers | None = None
        #: Counts, for tests and the bench: messages published, publishes that failed,
        #: waits left to the sweep, runs timed in this process.
        self.sent = 0
        self.failed = 0
        self.left_to_sweep = 0
        self.timed = 0
        self._last_warning = 0.0

    def bind(self, engine: Driver) -> None:
        self._engine = engine

    def submit(self, run_id: str, not_before: float | None = None) -> None:
        wait = 0.0
        if not_before is not None and self._engine is not None:
            wait = not_before - self._engine.clock.now()
        if wait > self.max_countdown_s:
            self.left_to_sweep += 1  # long waits live in the database
            return
        if wait > 0 and self.hold_sleeping and self._engine is not None:
            self._timer().add(time.monotonic() + wait, run_id)
            self.timed += 1
            return
        self.send(run_id, countdown=wait if wait > 0 else None)

    def send(self, run_id: str, *, countdown: float | None = None) -> bool:
        """Publish ``advance_run(run_id)``; False (logged, rate-limited) if it failed."""
        try:
            self.app.send_task(ADVANCE_TASK, args=(run_id,), queue=QUEUE, countdown=countdown)
        except Exception as exc:  # kombu's and redis's errors alike: the sweep resubmits
            self.failed += 1
            now = time.monotonic()
            if now - self._last_warning >= PUBLISH_WARN_EVERY_S:
                self._last_warning = now
                log.warning(
                    "cannot publish run %s to the broker (%s: %s); the sweep will submit it "
                    "(%d publish(es) failed so far)",
                    run_id,
                    type(exc).__name__,
                    exc,
                    self.failed,
                    extra={"action": "publish_failed", "run_id": run_id},
                )
            return False
        self.sent += 1
        return True

    def hold(self, run_id: str, delay_s: float) -> None:
        """Advance ``run_id``, which this process holds, in ``delay_s`` seconds here (a
        task whose store was away: no other process may take the run while we hold it)."""
        self._timer().add(time.monotonic() + delay_s, run_id, delay_s)

    def close(self) -> None:
        if self._timers is not None:
            self._timers.stop()

    def _timer(self) -> _Timers:
        if self._timers is None:
            assert self._engine is not None
            self._timers = _Timers(self._engine)
        return self._timers


#: Seconds between two tries of a run whose advance failed here (the store away): the
#: first wait doubles up to this.
RETRY_MAX_S = 30.0


class _Timers:
    """One daemon thread advancing this process's sleeping runs when they come due.

    An advance that fails (the store away) is tried again here, the wait doubling up to
    ``RETRY_MAX_S``: this process still holds the run, so nobody else would until its
    lease expires. Once the run moved on (finished, or taken by another process after
    the lease expired) ``advance`` returns at once and the timer is done with it.
    """

    def __init__(self, engine: Driver) -> None:
        self.engine = engine
        self._heap: list[tuple[float, int, str, float]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tillflow-timers", daemon=True)
        self._thread.start()

    def add(self, due: float, run_id: str, retry_s: float = 1.0) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), run_id, retry_s))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, run_id, retry_s = heapq.heappop(self._heap)
            try:
                self.engine.advance(run_id)  # still sleeping: comes back through submit
            except Exception as exc:  # the store away: this process holds it, try again
                retry_s = min(RETRY_MAX_S, max(retry_s, 0.5) * 2)
                log.warning(
                    "advancing run %s failed (%s: %s); trying again in %.1fs",
                    run_id,
                    type(exc).__name__,
                    exc,
                    retry_s,
                    extra={"action": "timer_failed", "run_id": run_id},
                )
                self.add(time.monotonic() + retry_s, run_id, retry_s)
