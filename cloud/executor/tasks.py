"""The one task, ``advance_run(run_id)``: claim this run, advance it.

Each worker process keeps one ``Engine`` on one ``PostgresStore`` (made at its first
task, after the fork: a connection pool must not cross ``fork()``). ``engine.advance``
claims the run by revision compare-and-set, so the task needs no guard of its own:

- a duplicated message, or one redelivered while the run is in flight elsewhere, finds
  the run held by a live lease and returns;
- one that arrives after the run moved on finds it finished or waiting, and returns;
- one redelivered after its worker died takes the run over (the dead holder's lease is
  seen dead on the same host, or has expired) and resumes it from its last commit.

A store that is away (PostgreSQL restarting) fails the task after the store's own
retries; the message is acknowledged as done and the run, durable, is submitted again
by the sweep once the database is back.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from cloud.executor.celery_app import ADVANCE_TASK
from cloud.settings import CloudSettings
from edge.errors import TillflowError

if TYPE_CHECKING:
    from celery import Celery

    from cloud.executor.executor import CeleryExecutor
    from edge.engine import Engine

log = logging.getLogger(__name__)

#: Connections per worker process: the task's thread, the lease heartbeat, the timers.
POOL_SIZE = 3
#: Seconds before a run whose store was away is tried again in this process.
RETRY_FIRST_S = 1.0


class _ProcessEngine:
    """The engine of this process, made on first use and made again after a fork."""

    def __init__(self, app: Celery, settings: CloudSettings) -> None:
        self.app = app
        self.settings = settings
        self._pid = 0
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._executor: CeleryExecutor | None = None

    @property
    def executor(self) -> CeleryExecutor:
        """This process's executor (its timers hold the runs this process sleeps on)."""
        self.get()
        assert self._executor is not None
        return self._executor

    def get(self) -> Engine:
        with self._lock:
            if self._engine is None or self._pid != os.getpid():
                self._engine = self._make()
                self._pid = os.getpid()
            return self._engine

    def _make(self) -> Engine:
        from cloud.engine import cloud_engine
        from cloud.executor.executor import CeleryExecutor
        from cloud.store.postgres import PostgresStore

        if not self.settings.database_url:
            raise TillflowError("the worker has no database_url")
        store = PostgresStore(self.settings.database_url, pool_size=POOL_SIZE, migrate=False)
        self._executor = CeleryExecutor(self.app, hold_sleeping=True)
        engine = cloud_engine(store, self._executor, settings=self.settings)
        log.info(
            "worker process %s serves runs as %s",
            os.getpid(),
            engine.owner,
            extra={"action": "process_engine", "owner": engine.owner},
        )
        return engine


def register(app: Celery, settings: CloudSettings) -> None:
    """Register ``advance_run`` on ``app``, bound to this process's engine."""
    engines = _ProcessEngine(app, settings)

    def advance_run(run_id: str) -> None:
        """Claim ``run_id`` (compare-and-set) and advance it as far as it goes."""
        try:
            engine = engines.get()
        except TillflowError as exc:  # no store yet: the sweep submits the run again
            log.warning(
                "run %s not advanced: %s",
                run_id,
                exc,
                extra={"action": "advance_failed", "run_id": run_id},
            )
            return
        try:
            engine.advance(run_id)
        except TillflowError as exc:  # the store away mid-run: we may hold it, retry here
            log.warning(
                "run %s not advanced (%s); trying again in this process",
                run_id,
                exc,
                extra={"action": "advance_failed", "run_id": run_id},
            )
            engines.executor.hold(run_id, RETRY_FIRST_S)

    # Celery's decorator is untyped; registering by a call keeps advance_run typed.
    as_task: Any = app.task(name=ADVANCE_TASK, ignore_result=True)
    as_task(advance_run)
