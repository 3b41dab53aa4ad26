"""The two executors the engine ships (``ports.Executor``): inline and polling.

``InlineExecutor`` advances runs in the calling thread (the terminal's choice).
``submit`` from inside a drive (a child run, a woken parent, a run handed back to sleep
through its retry backoff) queues instead of recursing. Runs sleeping through a backoff
are either slept for (``sleep=True``, the CLI's ``run``: the clock is a port, so a
FakeClock makes this instant) or left durable for a later ``recover()``
(``sleep=False``, a daemon with other work to do; they are listed in ``deferred``).
"""

from __future__ import annotations

import heapq
import itertools
import threading

from edge.engine.ports import Driver


class InlineExecutor:
    #: It advances in the caller's thread: the engine leases a new run to itself at birth.
    advances_in_caller = True

    def __init__(self, *, sleep: bool = True) -> None:
        self.sleep = sleep
        self._engine: Driver | None = None
        self._local = threading.local()
        self._seq = itertools.count()
        #: Runs left sleeping when ``sleep=False``: (due, run_id).
        self.deferred: list[tuple[float, str]] = []

    def bind(self, engine: Driver) -> None:
        self._engine = engine

    def submit(self, run_id: str, not_before: float | None = None) -> None:
        if self._engine is None:
            raise RuntimeError("InlineExecutor is not bound to an Engine")
        queue: list[tuple[float, int, str]] | None = getattr(self._local, "queue", None)
        item = (not_before or 0.0, next(self._seq), run_id)
        if queue is not None:  # already draining in this thread: no recursion
            heapq.heappush(queue, item)
            return
        queue = self._local.queue = [item]
        engine = self._engine
        try:
            while queue:
                due, _, rid = heapq.heappop(queue)
                wait = due - engine.clock.now()
                if wait > 0:
                    if not self.sleep:
                        self.deferred.append((due, rid))
                        continue
                    engine.clock.sleep(wait)
                engine.advance(rid)  # a run still sleeping comes back through submit
        finally:
            self._local.queue = None


class PollingExecutor:
    """Leaves runs in the store for ``Worker``s to claim (the cloud's choice without a
    broker, and the tests' way to run many worker processes on one database)."""

    #: Nothing is advanced here: new runs stay unleased for a worker's ``claim_due``.
    advances_in_caller = False

    def __init__(self) -> None:
        self.submitted = 0

    def bind(self, engine: Driver) -> None:
        """Nothing to keep: workers hold their own engines."""

    def submit(self, run_id: str, not_before: float | None = None) -> None:
        self.submitted += 1  # durable already: a worker's claim_due will find it
