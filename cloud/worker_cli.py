"""``tillflow cloud worker``: a Celery worker of the cloud's engine, plus the sweep (a
``cloud/cli.py`` plugin).

Settings as ``serve``'s: ``--config FILE`` (YAML, else ``$TILLFLOW_CLOUD_CONFIG``), then
``TILLFLOW_*``, then the flags given (``cloud.settings.load_settings``). Only argparse is
imported here; the rest when the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]

#: The command's flags that are settings: flag dest -> field.
WORKER_FLAGS = {
    "database_url": "database_url",
    "broker_url": "broker_url",
    "concurrency": "worker_concurrency",
}


def add_parsers(
    cloud: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    common: argparse.ArgumentParser,
    db: argparse.ArgumentParser,
    key: argparse.ArgumentParser,
) -> dict[str, Handler]:
    p = cloud.add_parser(
        "worker",
        parents=[common, db],
        help="run a worker of the cloud's engine (Celery + the sweep) until SIGTERM",
        description="Migrate the database, then advance runs as the broker (Redis) wakes "
        "them, and every sweep_interval_s submit what came due or what a lost message left "
        "behind, and start scheduled workflows. Run any number on any number of hosts "
        "against one database and one broker. SIGTERM finishes the runs in flight, then "
        "exits. Logs 'worker PID ready' once it consumes.",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the settings file (YAML; default: $TILLFLOW_CLOUD_CONFIG); TILLFLOW_* "
        "variables and the flags given override it",
    )
    p.add_argument(
        "--broker-url",
        metavar="URL",
        help="the Celery broker, redis://HOST:PORT/N (default: settings broker_url)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="worker processes (default: settings worker_concurrency, 1)",
    )
    return {"worker": _worker}


def _worker(args: argparse.Namespace) -> int:
    from cloud.executor.worker import run_worker
    from cloud.settings import load_settings
    from edge.terminal.service.daemon import configure_logging

    flags = {field: getattr(args, dest, None) for dest, field in WORKER_FLAGS.items()}
    settings = load_settings(args.config, **flags)
    configure_logging(settings.log_format)
    return run_worker(settings)
