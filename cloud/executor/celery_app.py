"""The Celery app of ``tillflow cloud worker`` and of every process that submits runs.

Every setting that matters for a durable engine is here, once, with its reason
(/work/shared/ANCHORS.md, "Celery as the executor"). None of them is what makes a run
safe: the claim by compare-and-set is. They make the broker a *good* wake-up: no message
dropped by a dying worker, none hoarded by a busy one, none redelivered in a loop.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from cloud import embedded
from cloud.settings import CloudSettings

#: The one queue every worker consumes and every submitter publishes to.
QUEUE = "tillflow.runs"
#: The task's registered name (what a message names; stable across code moves).
ADVANCE_TASK = "tillflow.advance_run"

#: Seconds Redis keeps a delivered, unacknowledged message hidden before it hands it to
#: another worker. Longer than any task runs (a task advances one run as far as it
#: goes: a few steps, an HTTP call with its timeout), so a task still running is not
#: started again elsewhere (open-chat-studio#4084: a second copy every 300 s). The
#: redelivery it guards (a whole worker killed) is also covered, sooner, by the sweep.
VISIBILITY_TIMEOUT_S = 3600.0
#: The longest countdown (ETA) a message may carry. Redis keeps an ETA message
#: unacknowledged in the worker until it is due, so one longer than the visibility
#: timeout is redelivered while it waits, again and again (codecov/umbrella#720:
#: duplicates "multiply exponentially"). Well under the timeout; longer waits are left in
#: the database for the sweep.
MAX_COUNTDOWN_S = 300.0
#: Publishing is a wake-up we can afford to lose (the sweep finds the run), so a
#: submitter never hangs on a broker that is away: a few quick tries, then give up.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.5}
#: Seconds a socket to Redis may block: a broker restart is noticed, not waited on.
SOCKET_TIMEOUT_S = 5.0


def broker_url(settings: CloudSettings) -> str:
    """The broker to use: ``settings.broker_url``, else the serverless one
    (``cloud.embedded.broker_url``: kombu's ``filesystem://``, one machine only)."""
    return embedded.broker_url(settings).url


def celery_config(settings: CloudSettings) -> dict[str, Any]:
    """The app's configuration; a function so a test can read every value."""
    broker = embedded.broker_url(settings)
    transport = {
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
    }
    return {
        "broker_url": broker.url,
        # celery#7651: set the timeout on the transport options (what kombu's Redis
        # transport reads); the same for results would matter only with a backend.
        "broker_transport_options": {**transport, **broker.transport_options},
        # No result backend: nobody waits on a task; a run's outcome is in PostgreSQL.
        "result_backend": None,
        "task_ignore_result": True,
        # Acknowledge after the task ran, not when it was received (Celery's default
        # acks early: a worker killed mid-task would lose the message, celery#1628)...
        "task_acks_late": True,
        # ...and when the child process running it dies (kill -9, OOM), reject it back to
        # the queue instead of acking it, which acks_late alone still does.
        "task_reject_on_worker_lost": True,
        # One message reserved per process at a time: a process busy on a long run does
        # not sit on four wake-ups other processes could serve (the default is 4).
        "worker_prefetch_multiplier": 1,
        # A lost broker connection does not cancel the task in flight: it finishes and
        # commits (its message is redelivered later and finds the run moved on: harmless).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Keep trying the broker when it is away, at start and afterwards, for ever: a
        # worker outlives a Redis restart.
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY,
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Our logging, not Celery's: the worker logs JSON lines under systemd as the
        # terminal's daemon does.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


def make_app(settings: CloudSettings) -> Celery:
    """A Celery app for ``settings``: what a submitter needs (it publishes by task name).
    A worker registers the task on it too (``tasks.register``).

    Not the process-wide "current" app: tests make one per worker fleet, each with its
    own broker, and nothing global carries over between them.
    """
    app = Celery("tillflow", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
