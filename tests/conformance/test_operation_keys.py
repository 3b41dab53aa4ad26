"""Stable operation keys: a step's ``ctx.operation_key`` is the same on every attempt and
after a crash, is recorded with the step, and is what its compensation sees; the
idempotency key still changes with each attempt."""

from __future__ import annotations

import dataclasses

import pytest
import tf_steps

from edge.engine import Engine, InlineExecutor, Status
from edge.engine.context import idempotency_key, operation_key
from edge.engine.loader import load_text

SAGA = """
workflow_type: keyed
version: 1
saga: true
steps:
  - name: reserve
    type: STANDARD
    function: "tf_steps:keyed"
    compensate: "tf_steps:undo_keyed"
    retry: {max_attempts: 3, initial_backoff_s: 1, jitter: 0}
  - {name: final, type: STANDARD, function: "tf_steps:fatal"}
"""

LOOP = """
workflow_type: keyed_loop
version: 1
saga: true
steps:
  - name: each
    type: LOOP
    mode: ITERATE
    over: state.items
    max_iterations: 10
    body:
      - name: reserve
        type: STANDARD
        function: "tf_steps:keyed"
        compensate: "tf_steps:undo_keyed"
  - {name: final, type: STANDARD, function: "tf_steps:fatal"}
"""


class _ProcessDied(BaseException):
    """Stands for SIGKILL: nothing after it runs, ``except Exception`` does not see it."""


def _keys(kind: str) -> list[tuple[str, int, str, str]]:
    return [(step, attempt, op, idem) for k, step, attempt, op, idem in tf_steps.KEYS if k == kind]


def test_operation_key__a_step_and_its_compensation_see_the_same_key(engine, register):
    register(SAGA)
    run_id = engine.start("keyed", {})
    assert engine.get(run_id).status is Status.ROLLED_BACK
    [(step, _, op, idem)] = _keys("step")
    [(undo_step, _, undo_op, undo_idem)] = _keys("undo")
    assert step == undo_step == "reserve"
    assert op == undo_op == operation_key(run_id, "reserve")
    # the first attempt's idempotency key: what in-flight runs of older builds used
    assert op == idempotency_key(run_id, "reserve", 1) == idem
    assert undo_idem not in (idem, op)  # the compensation's attempts are its own


def test_operation_key__a_retried_step_keeps_it_while_its_idempotency_key_changes(
    engine, register, clock
):
    register(SAGA)
    tf_steps.KNOBS["keyed"] = 2
    run_id = engine.start("keyed", {})
    attempts = _keys("step")
    assert [a for _, a, _, _ in attempts] == [1, 2, 3]
    assert {op for _, _, op, _ in attempts} == {operation_key(run_id, "reserve")}
    assert len({idem for _, _, _, idem in attempts}) == 3
    [(_, _, undo_op, _)] = _keys("undo")
    assert undo_op == operation_key(run_id, "reserve")


def test_operation_key__is_the_same_after_a_crash_in_another_engine(store_factory, clock):
    tf_steps.KNOBS["keyed_crash"] = _ProcessDied()
    first = Engine(store_factory(), InlineExecutor(), clock=clock, owner="host:1:dead")
    first.register(load_text(SAGA))
    with pytest.raises(_ProcessDied):
        first.start("keyed", {})
    clock.advance(60)  # its lease expires; nothing of the attempt was committed
    heir = Engine(store_factory(), InlineExecutor(), clock=clock, owner="host:2:heir")
    [run_id] = heir.recover()
    assert heir.get(run_id).status is Status.ROLLED_BACK
    before, after = _keys("step")
    assert before[1:] == after[1:]  # same attempt: same operation and idempotency keys
    assert before[2] == operation_key(run_id, "reserve")
    [(_, _, undo_op, _)] = _keys("undo")
    assert undo_op == before[2]
    first.close()
    heir.close()


def test_operation_key__a_compensation_in_a_loop_gets_its_iterations_key(engine, register):
    register(LOOP)
    run_id = engine.start("keyed_loop", {"items": ["a", "b", "c"]})
    assert engine.get(run_id).status is Status.ROLLED_BACK
    done = [(step, op) for step, _, op, _ in _keys("step")]
    paths = ["each[0].reserve", "each[1].reserve", "each[2].reserve"]
    assert done == [(p, operation_key(run_id, p)) for p in paths]
    assert len({op for _, op in done}) == 3
    undone = [(step, op) for step, _, op, _ in _keys("undo")]
    assert undone == list(reversed(done))


class _Recording:
    """The store under test, with every step row the engine commits kept aside."""

    def __init__(self, inner, recorded_keys=None):
        self.inner = inner
        self.rows = []
        self.recorded_keys = recorded_keys

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def commit(self, commit):
        self.rows.extend(commit.steps)
        return self.inner.commit(commit)

    def step_history(self, run_id):
        rows = self.inner.step_history(run_id)
        if self.recorded_keys is None:
            return rows
        return [
            dataclasses.replace(r, operation_key=self.recorded_keys.get(r.step, r.operation_key))
            for r in rows
        ]


def test_operation_key__is_recorded_on_every_row_written_for_the_step(store, clock):
    recording = _Recording(store)
    eng = Engine(recording, InlineExecutor(), clock=clock)
    eng.register(load_text(SAGA))
    tf_steps.KNOBS["keyed"] = 1
    run_id = eng.start("keyed", {})
    rows = [(r.step, r.kind, r.status, r.operation_key) for r in recording.rows]
    op = operation_key(run_id, "reserve")
    assert [row for row in rows if row[0] == "reserve"] == [
        ("reserve", "step", "RETRYING", op),
        ("reserve", "step", "COMPLETED", op),
        ("reserve", "compensation", "COMPLETED", op),
    ]
    assert ("final", "step", "FAILED", operation_key(run_id, "final")) in rows
    # and the store keeps it: what a compensation after a restart reads
    kept = [(r.kind, r.status, r.operation_key) for r in store.step_history(run_id)]
    assert [k for k in kept if k[2] == op] == [
        ("step", "RETRYING", op),
        ("step", "COMPLETED", op),
        ("compensation", "COMPLETED", op),
    ]
    eng.close()


def test_operation_key__a_compensation_reads_the_key_recorded_with_its_step(store, clock):
    """Not rebuilt from the step's name or path: the row's key is the one it gets."""
    recording = _Recording(store, recorded_keys={"reserve": "key-the-store-recorded"})
    eng = Engine(recording, InlineExecutor(), clock=clock)
    eng.register(load_text(SAGA))
    eng.start("keyed", {})
    [(_, _, undo_op, _)] = _keys("undo")
    assert undo_op == "key-the-store-recorded"
    eng.close()
