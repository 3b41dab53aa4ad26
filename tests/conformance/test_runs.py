"""Starting runs, idempotency, state models, the outbox, and one transaction per outcome."""

from __future__ import annotations

import threading

import pytest
import tf_steps

from edge.engine import Engine, InlineExecutor, Status
from edge.engine.context import operation_key
from edge.engine.loader import load_text
from edge.errors import InputError, WorkflowNotFound

LINEAR = """
workflow_type: linear
version: 1
steps:
  - {name: one, type: STANDARD, function: "tf_steps:add"}
  - {name: two, type: STANDARD, function: "tf_steps:add"}
  - {name: sale, type: STANDARD, function: "tf_steps:emit_sale"}
"""


def test_start__runs_every_step_and_merges_returned_dicts(engine, register):
    register(LINEAR)
    run_id = engine.start("linear", {"x": 5, "amount": 900})
    run = engine.get(run_id)
    assert run.status is Status.COMPLETED
    assert run.state == {"x": 5, "amount": 900, "total": 10, "sold": True}
    steps = [(s.step, s.status) for s in engine.show(run_id).steps]
    assert steps == [("one", "COMPLETED"), ("two", "COMPLETED"), ("sale", "COMPLETED")]


def test_start__same_idempotency_key_returns_the_existing_run(engine, register):
    register(LINEAR)
    first = engine.start("linear", {"x": 1}, idempotency_key="pos-1")
    second = engine.start("linear", {"x": 999}, idempotency_key="pos-1")
    assert first == second
    assert len(engine.list_runs()) == 1
    assert len(tf_steps.effects("add:one")) == 1


def test_start__two_concurrent_callers_with_one_key_get_one_run(store_factory, clock):
    wf = load_text(LINEAR)
    engines = [Engine(store_factory(), InlineExecutor(), clock=clock) for _ in range(2)]
    for e in engines:
        e.register(wf)
    barrier = threading.Barrier(2)
    ids: list[str] = []

    def go(e: Engine) -> None:
        barrier.wait()
        ids.append(e.start("linear", {"x": 1}, idempotency_key="same"))

    threads = [threading.Thread(target=go, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(ids) == 2 and ids[0] == ids[1]
    assert len(engines[0].list_runs()) == 1
    assert len(tf_steps.effects("add:one")) == 1


def test_start__unknown_workflow_type_is_a_clear_error(engine):
    with pytest.raises(WorkflowNotFound, match="no workflow 'nope'"):
        engine.start("nope", {})


def test_start__state_model_validates_input_and_steps_see_the_model(engine, register):
    register("""
workflow_type: typed
version: 1
state_model: "tf_steps:PaymentState"
steps:
  - {name: add, type: STANDARD, function: "tf_steps:typed_add"}
""")
    run = engine.get(engine.start("typed", {"amount": 250}))
    assert run.status is Status.COMPLETED
    assert run.state == {"amount": 250, "currency": "EUR", "total": 250, "approved_by": None}
    with pytest.raises(InputError, match="PaymentState"):
        engine.start("typed", {"amount": "not a number"})


def test_emit__outbox_message_commits_with_the_step_and_is_ordered(engine, register, store):
    register(LINEAR)
    a = engine.start("linear", {"amount": 100})
    b = engine.start("linear", {"amount": 200})
    msgs = store.outbox()
    assert [(m.run_id, m.topic, m.payload) for m in msgs] == [
        (a, "sale", {"amount": 100}),
        (b, "sale", {"amount": 200}),
    ]
    assert msgs[0].seq < msgs[1].seq
    assert len({m.message_id for m in msgs}) == 2


def test_emit__a_failed_attempt_leaves_nothing_in_the_outbox(engine, register, store):
    register("""
workflow_type: emitter
version: 1
steps:
  - name: sale
    type: STANDARD
    function: "tf_steps:emit_sale"
    retry: {max_attempts: 2, initial_backoff_s: 1, jitter: 0}
""")
    tf_steps.KNOBS["emit_then_fail"] = 1
    run_id = engine.start("emitter", {"amount": 5})
    assert engine.get(run_id).status is Status.COMPLETED
    msgs = store.outbox()
    assert len(msgs) == 1 and msgs[0].payload == {"amount": 5}


def test_step_outcome__is_one_transaction_per_step(store, clock, register):
    """Count the store's write calls: one to start, one per action step outcome."""
    calls: list[str] = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def start(self, commit):
            calls.append("start")
            return self.inner.start(commit)

        def commit(self, commit):
            calls.append("commit")
            return self.inner.commit(commit)

    eng = Engine(Counting(store), InlineExecutor(), clock=clock)
    eng.register(load_text(LINEAR))
    eng.start("linear", {})
    assert calls == ["start", "commit", "commit", "commit"]


def test_step_outcome__a_commit_that_fails_leaves_the_run_as_it_was(store, clock):
    """Invariant 1: if the outcome's transaction fails, none of its parts are visible."""

    class FailingCommit:
        def __init__(self, inner):
            self.inner = inner
            self.fail_next = False

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def commit(self, commit):
            if self.fail_next:
                # Let the store write everything, then break the transaction from inside
                # by adding a row that violates a constraint (a duplicate message id).
                dup = commit.outbox[-1] if commit.outbox else None
                if dup is not None:
                    commit.outbox.append(dup)
            return self.inner.commit(commit)

    failing = FailingCommit(store)
    eng = Engine(failing, InlineExecutor(), clock=clock)
    eng.register(load_text(LINEAR))
    failing.fail_next = True
    from edge.errors import StoreError

    with pytest.raises(StoreError):
        eng.start("linear", {"amount": 1})
    run = eng.list_runs()[0]
    assert run.status is Status.RUNNING
    assert run.cursor["frames"] == [["sale", None]]
    assert [s.step for s in eng.show(run.run_id).steps] == ["one", "two"]
    assert store.outbox() == []
    assert eng.verify_audit().ok


def test_step_history__returns_each_rows_operation_key(engine, register, store):
    register(LINEAR)
    run_id = engine.start("linear", {"x": 1})
    rows = store.step_history(run_id)
    assert [(r.step, r.operation_key) for r in rows] == [
        (step, operation_key(run_id, step)) for step in ("one", "two", "sale")
    ]
