"""Steps of the cloud executor tests: every effect is counted in a table, the way a
downstream system keyed by the step's operation key would see it.

The table lives in the database ``$CLOUD_STEPS_DB`` names (the test's own). Each call
of a step appends a row to ``step_calls`` (run, step, attempt, keys, pid, replay) and
upserts ``step_effects`` by the step's operation key (``calls`` counts the calls that
reached it): an effect done twice shows as ``calls = 2`` there, one never done as a
missing row. ``CLOUD_STEPS_BLOCK=<step>``: the first call of that step in the whole
fleet (a row in ``blocked``, taken by INSERT ... ON CONFLICT) hangs after its effect,
before the engine commits the outcome: the moment the kill tests kill its worker.

``effects_ddl()`` makes the tables; ``counted_yaml()`` is the workflow the tests run.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

from cloud.engine import Schedule
from edge.engine import StepContext
from edge.errors import StepError

DB_ENV = "CLOUD_STEPS_DB"
BLOCK_ENV = "CLOUD_STEPS_BLOCK"
SCHEDULE_ENV = "CLOUD_STEPS_SCHEDULE_EVERY_S"
#: Seconds ``pause`` takes: long enough that runs are in flight while a test breaks
#: something, short enough for hundreds of steps per test.
PAUSE_S = 0.05

DDL = """
CREATE TABLE IF NOT EXISTS step_calls (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          text NOT NULL,
    step            text NOT NULL,
    attempt         integer NOT NULL,
    operation_key   text NOT NULL,
    idempotency_key text NOT NULL,
    pid             integer NOT NULL,
    replay          boolean NOT NULL
);
CREATE TABLE IF NOT EXISTS step_effects (
    operation_key text PRIMARY KEY,
    run_id        text NOT NULL,
    step          text NOT NULL,
    calls         integer NOT NULL
);
CREATE TABLE IF NOT EXISTS blocked (
    step    text PRIMARY KEY,
    run_id  text NOT NULL,
    pid     integer NOT NULL
);
"""

_local = threading.local()


def _schedules() -> tuple[Schedule, ...]:
    every = os.environ.get(SCHEDULE_ENV)
    return (Schedule("ticker", float(every)),) if every else ()


#: ``$CLOUD_STEPS_SCHEDULE_EVERY_S`` set: a ``ticker`` run every that many seconds (the
#: sweep reads a step module's SCHEDULES, ``cloud.engine.schedules``).
SCHEDULES = _schedules()


def effects_ddl() -> str:
    return DDL


def counted_yaml(workflow_type: str = "counted", version: str = "1") -> str:
    """Four steps: an effect, a short pause, one that fails its first attempt (a retry
    backoff a worker times itself), and a last effect."""
    m = __name__
    retry = "{max_attempts: 12, initial_backoff_s: 0.2, max_backoff_s: 1.0, jitter: 0}"
    return f"""\
workflow_type: {workflow_type}
version: "{version}"
steps:
  # Every step records its call in the database, so every step has attempts enough to
  # outlast the 5 s database outage of the restart test (a step caught in it fails
  # that attempt; with one attempt only, the run would fail for good).
  - name: first
    type: STANDARD
    function: {m}:effect
    retry: {retry}
  - name: pause
    type: STANDARD
    function: {m}:pause
    retry: {retry}
  - name: flaky
    type: STANDARD
    function: {m}:flaky
    retry: {retry}
  - name: last
    type: STANDARD
    function: {m}:effect
    retry: {retry}
"""


def ticker_yaml() -> str:
    return f"""\
workflow_type: ticker
version: "1"
steps:
  - name: tick
    type: STANDARD
    function: {__name__}:tick
"""


def _conn() -> psycopg.Connection[Any]:
    conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ[DB_ENV], autocommit=True, connect_timeout=5)
        _local.conn = conn
    return conn


def _record(ctx: StepContext, *, done: bool = True) -> None:
    """Count the call; count the effect if ``done`` (a failing attempt does none)."""
    pid = os.getpid()
    conn = _conn()
    with conn.transaction():
        conn.execute(
            "INSERT INTO step_calls (run_id, step, attempt, operation_key, idempotency_key,"
            " pid, replay) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                ctx.run_id,
                ctx.step,
                ctx.attempt,
                ctx.operation_key,
                ctx.idempotency_key,
                pid,
                ctx.replay,
            ),
        )
        if not done:
            return
        conn.execute(
            "INSERT INTO step_effects (operation_key, run_id, step, calls)"
            " VALUES (%s, %s, %s, 1) ON CONFLICT (operation_key)"
            " DO UPDATE SET calls = step_effects.calls + 1",
            (ctx.operation_key, ctx.run_id, ctx.step),
        )
    if os.environ.get(BLOCK_ENV) == ctx.step:
        got = conn.execute(
            "INSERT INTO blocked (step, run_id, pid) VALUES (%s, %s, %s)"
            " ON CONFLICT (step) DO NOTHING RETURNING pid",
            (ctx.step, ctx.run_id, pid),
        ).fetchone()
        if got is not None:
            threading.Event().wait()  # hang: the effect done, the outcome not committed


def effect(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _record(ctx)
    return {f"{ctx.step}_done": True}


def pause(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _record(ctx)
    time.sleep(PAUSE_S)  # a step that takes a while (an acquirer call), not a test clock
    return {"paused": True}


def flaky(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _record(ctx, done=ctx.attempt > 1)
    if ctx.attempt == 1:
        raise StepError("the first attempt fails (the test's transient fault)", retryable=True)
    return {"flaky_done": ctx.attempt}


def tick(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """The scheduled workflow's one step."""
    _record(ctx)
    return {"ticked": True}
