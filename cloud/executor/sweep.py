"""The sweep: every ``settings.sweep_interval_s``, submit what the broker will not.

Every ``tillflow cloud worker`` runs one (a thread of its main process). A pass:

1. takes a PostgreSQL advisory lock, so one sweep of the fleet re-sends at a time (many
   sweeps would each re-send the same runs: duplicates that are harmless, but that a big
   backlog would multiply); a pass that does not get the lock does only step 3;
2. submits each run that needs a wake-up nobody else will send (``store.recoverable``,
   without claiming it: the worker that serves the message claims it):
   - a RUNNING/COMPENSATING run that is due and whose lease is free: its holder died
     (seen dead on this host, or its lease expired) or released it;
   - a WAITING run whose timeout passed (long waits live in the database, never in a
     broker countdown);
   - an unleased run (new, a child, a woken parent) untouched for ``lost_after_s``: its
     message was lost (a Redis restart without persistence, a failed publish);
   and re-sends none of them within ``lost_after_s`` of its last send from here;
3. starts each scheduled workflow whose slot came (``cloud.engine.Schedule``), with the
   idempotency key ``f"{type}:{slot}"``: started once across every worker, whichever
   sweep gets there first (``Store.start`` returns the existing run to the others).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cloud.engine import Schedule
from cloud.executor.executor import CeleryExecutor
from cloud.store.postgres import PostgresStore
from edge.engine import Engine, RunRecord, Status
from edge.engine.lease import owner_is_dead

log = logging.getLogger(__name__)

#: An unleased run untouched for this many sweep intervals has lost its message: long
#: enough that a message still queued behind a backlog is not sent twice every pass.
LOST_AFTER_SWEEPS = 6
#: Runs looked at per pass (oldest first); the rest wait for the next pass.
BATCH = 1000
#: Any 64-bit number of ours: one re-sending sweep at a time across the fleet.
SWEEP_LOCK = 0x7417_5EE9
#: Seconds between two warnings of a failing pass (the database away for minutes).
WARN_EVERY_S = 30.0


@dataclass
class SweepStats:
    passes: int = 0
    locked_out: int = 0
    resubmitted: int = 0
    scheduled: int = 0
    failures: int = 0


class Sweep:
    def __init__(
        self,
        engine: Engine,
        store: PostgresStore,
        executor: CeleryExecutor,
        *,
        interval_s: float,
        schedules: Sequence[Schedule] = (),
        lost_after_s: float | None = None,
        finders: Sequence[Callable[[Engine], object]] = (),
    ) -> None:
        self.engine = engine
        self.store = store
        self.executor = executor
        self.interval_s = interval_s
        self.schedules = list(schedules)
        #: Called with the engine each pass, after the schedules: each finds work in the
        #: database and starts its runs (idempotently), e.g. unknown outcomes to resolve.
        self.finders = list(finders)
        self.lost_after_s = (
            lost_after_s if lost_after_s is not None else (LOST_AFTER_SWEEPS * interval_s)
        )
        self.stats = SweepStats()
        self._sent: dict[str, float] = {}
        self._slots: dict[str, int] = {}
        self._last_warning = 0.0

    # --- one pass --------------------------------------------------------------------

    def run_once(self) -> None:
        self.stats.passes += 1
        with self.store.pool.connection() as conn:
            got = conn.execute("SELECT pg_try_advisory_lock(%s) AS got", (SWEEP_LOCK,)).fetchone()
            if got and got["got"]:
                try:
                    self._resubmit()
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (SWEEP_LOCK,))
            else:
                self.stats.locked_out += 1
        self._start_scheduled()
        for find in self.finders:
            find(self.engine)

    def _resubmit(self) -> None:
        now = self.engine.clock.now()
        self._sent = {k: t for k, t in self._sent.items() if now - t < self.lost_after_s}
        for run in self.store.recoverable(now, BATCH):
            if run.run_id in self._sent or not self.needs_wakeup(run, now):
                continue
            if self.executor.send(run.run_id):
                self._sent[run.run_id] = now
                self.stats.resubmitted += 1
                log.info(
                    "submitted run %s (%s, lease %s)",
                    run.run_id,
                    run.status,
                    run.lease_owner or "free",
                    extra={"action": "sweep_submitted", "run_id": run.run_id},
                )

    def needs_wakeup(self, run: RunRecord, now: float) -> bool:
        """Whether ``run`` is due with nobody live on it and no message likely on its way."""
        if run.status is Status.WAITING:  # recoverable lists only those timed out
            return not run.cursor.get("child")  # a child's parent wakes with its child
        if run.next_attempt_at is not None and run.next_attempt_at > now:
            return False  # sleeping through a backoff (its holder times it)
        if run.lease_owner is None:
            return now - run.updated_at >= self.lost_after_s
        expired = (run.lease_expires_at or 0) <= now
        return expired or owner_is_dead(run.lease_owner)

    def _start_scheduled(self) -> None:
        now = self.engine.clock.now()
        for s in self.schedules:
            slot = s.slot(now)
            if self._slots.get(s.workflow_type) == slot:
                continue
            run_id = self.engine.start(s.workflow_type, dict(s.input), idempotency_key=s.key(slot))
            self._slots[s.workflow_type] = slot
            self.stats.scheduled += 1
            log.info(
                "schedule %s slot %s: run %s",
                s.workflow_type,
                slot,
                run_id,
                extra={"action": "scheduled", "run_id": run_id, "workflow": s.workflow_type},
            )

    # --- the loop --------------------------------------------------------------------

    def run(self, stop: threading.Event) -> SweepStats:
        """A pass now, then one every ``interval_s`` until ``stop`` is set. A failing
        pass (the database or the broker away) is logged, rate-limited, and tried again
        at the next interval."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # the database or broker away: keep sweeping
                self.stats.failures += 1
                mono = time.monotonic()
                if mono - self._last_warning >= WARN_EVERY_S:
                    self._last_warning = mono
                    log.warning(
                        "sweep pass failed (%s: %s); trying again in %.1fs",
                        type(exc).__name__,
                        exc,
                        self.interval_s,
                        extra={"action": "sweep_failed"},
                    )
            stop.wait(self.interval_s)
        return self.stats
