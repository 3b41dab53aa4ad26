"""The engine drives an executor only through ``ports.Executor``: a third executor, not
one the engine ships, gets every runnable run, including a run handed back to sleep
through its retry backoff, and decides by its own declaration whether new runs are
leased at birth."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import tf_steps

from edge.engine import Engine, FakeClock, Status
from edge.engine.loader import load_text
from edge.engine.ports import Driver
from edge.store.sqlite import SqliteStore

RETRY = """
workflow_type: retry
version: 1
steps:
  - name: flaky
    type: STANDARD
    function: "tf_steps:flaky"
    retry: {max_attempts: 3, initial_backoff_s: 2, jitter: 0}
"""

CHILD = """
workflow_type: child
version: 1
steps:
  - {name: work, type: STANDARD, function: "tf_steps:add"}
"""

PARENT = """
workflow_type: parent
version: 1
steps:
  - {name: call, type: SUB_WORKFLOW, workflow: child}
  - {name: after, type: STANDARD, function: "tf_steps:noop"}
"""


class QueueExecutor:
    """A broker's queue in miniature: records every submission, advances only when told."""

    def __init__(self, *, advances_in_caller: bool = False) -> None:
        self.advances_in_caller = advances_in_caller
        self.engine: Driver | None = None
        self.submissions: list[tuple[str, float | None]] = []
        self._queue: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    def bind(self, engine: Driver) -> None:
        self.engine = engine

    def submit(self, run_id: str, not_before: float | None = None) -> None:
        self.submissions.append((run_id, not_before))
        heapq.heappush(self._queue, (not_before or 0.0, next(self._seq), run_id))

    def run_due(self) -> list[str]:
        """Advance every run due by now, in due order; returns the ids advanced."""
        assert self.engine is not None
        ran = []
        while self._queue and self._queue[0][0] <= self.engine.clock.now():
            _, _, run_id = heapq.heappop(self._queue)
            self.engine.advance(run_id)
            ran.append(run_id)
        return ran


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Engine, QueueExecutor, FakeClock]]:
    store = SqliteStore(str(tmp_path / "executor.db"))
    clock = FakeClock(100.0)
    executor = QueueExecutor()
    engine = Engine(store, executor, clock=clock)
    for text in (RETRY, CHILD, PARENT):
        engine.register(load_text(text))
    yield engine, executor, clock
    engine.close()
    store.close()


def test_executor_port__the_engine_binds_itself_to_its_executor(world):
    engine, executor, _ = world
    assert executor.engine is engine


def test_executor_port__a_backoff_is_handed_back_with_its_due_time(world):
    engine, executor, clock = world
    tf_steps.KNOBS["flaky"] = 1
    run_id = engine.start("retry", {})
    assert executor.submissions == [(run_id, None)]
    assert engine.get(run_id).lease_owner is None  # not advanced in the caller: not leased

    assert executor.run_due() == [run_id]  # attempt 1 fails: due again 2 s later
    assert executor.submissions[-1] == (run_id, 102.0)
    assert engine.get(run_id).status is Status.RUNNING
    assert executor.run_due() == []  # nothing is due before its time
    clock.advance(2)
    assert executor.run_due() == [run_id]
    run = engine.get(run_id)
    assert run.status is Status.COMPLETED and run.state["attempt"] == 2
    assert len(executor.submissions) == 2  # a finished run is not submitted again


def test_executor_port__children_and_woken_parents_are_submitted(world):
    engine, executor, _ = world
    parent = engine.start("parent", {})
    executor.run_due()  # parent spawns the child; the child's final commit wakes it
    submitted = [rid for rid, _ in executor.submissions]
    child = submitted[1]
    assert submitted == [parent, child, parent]
    assert engine.get(child).parent_run_id == parent
    assert engine.get(child).status is Status.COMPLETED
    assert engine.get(parent).status is Status.COMPLETED


def test_executor_port__an_executor_advancing_in_the_caller_gets_runs_leased_at_birth(
    tmp_path: Path,
):
    store = SqliteStore(str(tmp_path / "inline.db"))
    executor = QueueExecutor(advances_in_caller=True)
    engine = Engine(store, executor, clock=FakeClock(100.0))
    engine.register(load_text(RETRY))
    try:
        run_id = engine.start("retry", {})
        run = engine.get(run_id)
        assert run.lease_owner == engine.owner and run.lease_expires_at == 100.0 + engine.lease_s
        executor.run_due()
        assert engine.get(run_id).status is Status.COMPLETED
    finally:
        engine.close()
        store.close()
