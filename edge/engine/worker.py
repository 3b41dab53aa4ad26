"""A worker: claims due runs from the store and advances them, until told to stop.

Many workers (processes, hosts) can share one PostgreSQL database: ``claim_due`` never
hands the same run to two of them, and every commit is a compare-and-set on the run's
revision, so a run is advanced by exactly one worker at a time. A worker that dies
loses its leases (at once for a dead process on the same host, else when they expire)
and ``recover()`` in a living worker picks its runs up.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from edge.engine.runtime import Engine

log = logging.getLogger(__name__)

#: Runs claimed per poll: enough to amortise the claim, few enough that a worker does
#: not sit on work others could take.
DEFAULT_BATCH = 8
#: Seconds an idle worker waits before polling again.
DEFAULT_POLL_S = 0.2
#: Seconds between two ``recover()`` passes (finding runs of dead workers), busy or not:
#: a dead peer's runs must not wait for the queue to drain or their leases to expire.
RECOVER_EVERY_S = 5.0


@dataclass
class WorkerStats:
    claimed: int = 0
    recovered: int = 0
    polls: int = 0


class Worker:
    def __init__(
        self, engine: Engine, *, batch: int = DEFAULT_BATCH, poll_s: float = DEFAULT_POLL_S
    ) -> None:
        self.engine = engine
        self.batch = batch
        self.poll_s = poll_s
        self.stats = WorkerStats()
        self._next_recover = engine.clock.now() + RECOVER_EVERY_S

    def run_once(self) -> int:
        """Claim and advance one batch; returns how many runs it advanced."""
        e = self.engine
        now = e.clock.now()
        claimed = e.store.claim_due(e.owner, now, now + e.lease_s, self.batch)
        self.stats.polls += 1
        for run in claimed:
            e.advance(run.run_id, claimed=run)
        self.stats.claimed += len(claimed)
        if e.clock.now() >= self._next_recover:
            self.recover()
        return len(claimed)

    def recover(self) -> list[str]:
        """Take over runs whose holders died; advance them here. Unclaimed runs are left
        to ``claim_due``, so a worker starting against a backlog takes one batch."""
        ids = self.engine.recover(unleased=False)
        for run_id in ids:
            self.engine.advance(run_id)
        self.stats.recovered += len(ids)
        self._next_recover = self.engine.clock.now() + RECOVER_EVERY_S
        return ids

    def run(self, stop: threading.Event) -> WorkerStats:
        """Poll until ``stop`` is set."""
        log.info("worker %s started", self.engine.owner, extra={"action": "worker_started"})
        self.recover()
        while not stop.is_set():
            if self.run_once() == 0:
                stop.wait(self.poll_s)
        return self.stats
