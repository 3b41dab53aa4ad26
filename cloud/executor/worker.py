"""``tillflow cloud worker``'s body: a Celery worker with our app, plus the sweep.

Run any number, on any number of hosts, against one PostgreSQL and one Redis: the
broker spreads the wake-ups, the database decides who advances what (claims by
compare-and-set), and the sweeps (one re-sending at a time, by an advisory lock) submit
what no message will. SIGTERM is Celery's warm shutdown: the tasks in flight finish and
commit, then the process exits; a ``kill -9`` loses nothing either (the next worker
takes the runs over from their last commit).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from cloud.settings import CloudSettings

if TYPE_CHECKING:
    from edge.engine import Engine

log = logging.getLogger(__name__)

#: Connections of the main process's store: the sweep, the scheduled starts, one spare.
SWEEP_POOL_SIZE = 2


def redact(url: str) -> str:
    """``url`` without its password (what the log line shows)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def _unknown_outcomes(database_url: str) -> Callable[[Engine], object]:
    """The sweep's finder of unknown outcomes: one resolve_outcome run each."""
    import psycopg

    from cloud.outcomes.find import start_resolutions

    def find(engine: Engine) -> object:
        return start_resolutions(engine, lambda: psycopg.connect(database_url, autocommit=True))

    return find


def _late_joiners(settings: CloudSettings) -> Callable[[Engine], object]:
    """The sweep's finder of rollouts' late joiners: devices behind the version their
    assignments make effective get it queued (``cloud.rollouts.reconcile``)."""
    import psycopg

    from cloud.rollouts.reconcile import finder
    from cloud.sync.keys import load_key

    url = settings.database_url
    assert url is not None
    keys: list[Any] = []

    def key() -> Any:
        if not keys:  # read once, on the first pass that needs it
            keys.append(load_key(settings.key_path()))
        return keys[0]

    return finder(lambda: psycopg.connect(url, autocommit=True), key)


def run_worker(settings: CloudSettings) -> int:
    """Migrate the database, start the Celery worker and the sweep; return the exit code
    once the worker stopped (SIGTERM, SIGINT)."""
    from celery import signals
    from celery.exceptions import CPendingDeprecationWarning

    from cloud import embedded
    from cloud.engine import cloud_engine, schedules
    from cloud.executor import tasks
    from cloud.executor.celery_app import QUEUE, broker_url, make_app
    from cloud.executor.executor import CeleryExecutor
    from cloud.executor.sweep import Sweep
    from cloud.store.postgres import PostgresStore

    # unset: an embedded PostgreSQL (shared with serve when one runs from data_dir)
    settings = settings.model_copy(update={"database_url": embedded.database_url(settings)})
    assert settings.database_url is not None
    broker = broker_url(settings)
    app = make_app(settings)
    tasks.register(app, settings)
    store = PostgresStore(settings.database_url, pool_size=SWEEP_POOL_SIZE)  # migrates
    executor = CeleryExecutor(app)
    engine = cloud_engine(store, executor, settings=settings)
    sweep = Sweep(
        engine,
        store,
        executor,
        interval_s=settings.sweep_interval_s,
        schedules=schedules(settings),
        finders=[_unknown_outcomes(settings.database_url), _late_joiners(settings)],
    )
    stop = threading.Event()
    thread = threading.Thread(target=sweep.run, args=(stop,), name="tillflow-sweep", daemon=True)
    log.info(
        "worker %s: broker %s, database %s, %d process(es), sweep every %.1fs, %d schedule(s)",
        os.getpid(),
        redact(broker),
        redact(settings.database_url),
        settings.worker_concurrency,
        settings.sweep_interval_s,
        len(sweep.schedules),
        extra={"action": "worker_starting"},
    )

    def ready(**_: Any) -> None:
        # After the pool forked its processes: none of them inherits the sweep's thread.
        thread.start()
        log.info("worker %s ready", os.getpid(), extra={"action": "worker_ready"})

    def shutdown(**_: Any) -> None:
        stop.set()

    # We keep worker_cancel_long_running_tasks_on_connection_loss False on purpose
    # (celery_app); Celery warns on every reconnect that its default will change.
    warnings.filterwarnings(
        "ignore", category=CPendingDeprecationWarning, module=r"celery\.worker\.consumer"
    )
    signals.worker_ready.connect(ready, weak=False)
    signals.worker_shutdown.connect(shutdown, weak=False)
    try:
        worker = app.Worker(
            hostname=f"tillflow-{os.getpid()}@{socket.gethostname()}",
            concurrency=settings.worker_concurrency,
            pool="prefork",
            queues=[QUEUE],
            loglevel="INFO",
            quiet=True,
            optimization="fair",  # hand a task to a process that is free, not in turn
            without_gossip=True,  # no broadcast chatter: workers need not know each other
            without_mingle=True,
            without_heartbeat=True,
        )
        worker.start()
        code = worker.exitcode or 0
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=settings.sweep_interval_s + 5)
        signals.worker_ready.disconnect(ready)
        signals.worker_shutdown.disconnect(shutdown)
        engine.close()
        store.close()
    log.info(
        "worker %s stopped: %d sweep pass(es), %d run(s) re-submitted, %d schedule slot(s)",
        os.getpid(),
        sweep.stats.passes,
        sweep.stats.resubmitted,
        sweep.stats.scheduled,
        extra={"action": "worker_stopped"},
    )
    return int(code)
