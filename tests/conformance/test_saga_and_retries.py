"""Saga compensation, durable retries with backoff, cancel."""

from __future__ import annotations

import pytest
import tf_steps

from edge.engine import Engine, InlineExecutor, Status
from edge.engine.loader import load_text
from edge.errors import InvalidRunState

SAGA = """
workflow_type: saga
version: 1
saga: true
steps:
  - {{name: reserve, type: STANDARD, function: "tf_steps:add", compensate: "tf_steps:undo"}}
  - {{name: note, type: STANDARD, function: "tf_steps:noop"}}
  - name: charge
    type: STANDARD
    function: "tf_steps:add"
    compensate: "tf_steps:{charge_undo}"
    retry: {{max_attempts: 2, initial_backoff_s: 1, jitter: 0}}
  - {{name: final, type: STANDARD, function: "tf_steps:fatal"}}
"""


def test_saga__compensates_completed_steps_in_reverse_order(engine, register):
    register(SAGA.format(charge_undo="undo"))
    run_id = engine.start("saga", {})
    run = engine.get(run_id)
    assert run.status is Status.ROLLED_BACK
    assert run.state["undone"] == ["charge", "reserve"]
    comps = [(s.step, s.status) for s in engine.show(run_id).steps if s.kind == "compensation"]
    assert comps == [("charge", "COMPLETED"), ("reserve", "COMPLETED")]
    assert len(tf_steps.effects("undo:charge")) == 1
    events = [a.event for a in engine.show(run_id).audit]
    assert events.index("compensation_started") < events.index("run_rolled_back")


def test_saga__failing_compensation_ends_failed_listing_what_is_left(engine, register, clock):
    register(SAGA.format(charge_undo="undo_fails"))
    run = engine.get(engine.start("saga", {}))
    assert run.status is Status.FAILED
    assert run.error["uncompensated"] == ["charge", "reserve"]
    # the compensation was retried by the step's retry policy before giving up
    assert len(set(tf_steps.effects("undo_fails:charge"))) == 2
    assert tf_steps.effects("undo:reserve") == []


def test_no_saga__permanent_failure_ends_failed_without_compensation(engine, register):
    register(SAGA.format(charge_undo="undo").replace("saga: true", "saga: false"))
    run = engine.get(engine.start("saga", {}))
    assert run.status is Status.FAILED and run.error["step"] == "final"
    assert tf_steps.effects("undo:charge") == []


RETRY = """
workflow_type: retry
version: 1
steps:
  - name: flaky
    type: STANDARD
    function: "tf_steps:flaky"
    retry: {max_attempts: 4, initial_backoff_s: 2, multiplier: 3, max_backoff_s: 10, jitter: 0}
"""


def test_retry__backs_off_exponentially_up_to_the_cap_then_succeeds(engine, register, clock):
    register(RETRY)
    tf_steps.KNOBS["flaky"] = 3
    run = engine.get(engine.start("retry", {}))
    assert run.status is Status.COMPLETED and run.state["attempt"] == 4
    assert clock.slept == [2, 6, 10]
    keys = tf_steps.effects("flaky")
    assert len(keys) == 4 and len(set(keys)) == 4  # a new key per attempt
    rows = [(s.status, s.attempt) for s in engine.show(run.run_id).steps]
    assert rows == [("RETRYING", 1), ("RETRYING", 2), ("RETRYING", 3), ("COMPLETED", 4)]


def test_retry__exhausted_attempts_fail_the_run(engine, register):
    register(RETRY)
    tf_steps.KNOBS["flaky"] = 10
    run = engine.get(engine.start("retry", {}))
    assert run.status is Status.FAILED and len(tf_steps.effects("flaky")) == 4


def test_retry__backoff_is_durable_across_a_restart_and_runs_on_time(store_factory, clock):
    wf = load_text(RETRY)
    tf_steps.KNOBS["flaky"] = 1
    first = Engine(store_factory(), InlineExecutor(sleep=False), clock=clock)
    first.register(wf)
    run_id = first.start("retry", {})
    run = first.get(run_id)
    assert run.status is Status.RUNNING and run.next_attempt_at == clock.now() + 2
    first.close()  # "crash": the process is gone; nothing in memory survives

    restarted = Engine(store_factory(), InlineExecutor(sleep=False), clock=clock, owner="other")
    clock.advance(1)  # not yet due: the lease of the first engine still counts
    assert restarted.recover() == []
    clock.advance(31)  # past the backoff and the dead holder's lease
    assert restarted.recover() == [run_id]
    assert restarted.get(run_id).status is Status.COMPLETED
    assert [s.attempt for s in restarted.show(run_id).steps] == [1, 2]


def test_cancel__without_compensation_stops_the_run(engine, register):
    register("""
workflow_type: w
version: 1
saga: true
steps:
  - {name: reserve, type: STANDARD, function: "tf_steps:add", compensate: "tf_steps:undo"}
  - {name: wait, type: WAIT}
""")
    run_id = engine.start("w", {})
    engine.cancel(run_id, "customer walked away")
    run = engine.get(run_id)
    assert run.status is Status.CANCELLED and run.error["message"] == "customer walked away"
    assert tf_steps.effects("undo:reserve") == []
    with pytest.raises(InvalidRunState):
        engine.cancel(run_id, "again")


def test_cancel__with_compensation_undoes_completed_steps(engine, register):
    register("""
workflow_type: w
version: 1
steps:
  - {name: reserve, type: STANDARD, function: "tf_steps:add", compensate: "tf_steps:undo"}
  - {name: wait, type: WAIT}
""")
    run_id = engine.start("w", {})
    engine.cancel(run_id, "operator", compensate=True)
    run = engine.get(run_id)
    assert run.status is Status.CANCELLED
    assert run.state["undone"] == ["reserve"]
    assert len(tf_steps.effects("undo:reserve")) == 1


FOREVER = """
workflow_type: forever
version: 1
saga: true
steps:
  - name: charge
    type: STANDARD
    function: "tf_steps:add"
    compensate: "tf_steps:undo_flaky"
    retry: {max_attempts: 1}
    compensate_retry: {max_attempts: forever, initial_backoff_s: 1, max_backoff_s: 60}
  - name: release
    type: STANDARD
    function: "tf_steps:sees_attempt"
    retry: {max_attempts: forever, initial_backoff_s: 1, max_backoff_s: 60, jitter: 0}
  - {name: final, type: STANDARD, function: "tf_steps:fatal"}
"""


def test_retry_forever__a_step_is_retried_until_it_succeeds_with_capped_backoff(
    engine, register, clock
):
    register(FOREVER)
    tf_steps.KNOBS.update(flaky=150, undo_flaky=0)  # past the 100 a number may say
    start = clock.now()
    run = engine.get(engine.start("forever", {}))
    assert run.state["seen"] == 151
    seen = [w for w, _ in tf_steps.EFFECTS if w.startswith("sees:")]
    assert len(seen) == 151 and not any(":True:" in w for w in seen)  # never "last"
    assert clock.now() - start < 151 * 60 + 1  # the backoff stopped growing at 60 s


def test_compensate_retry__a_compensation_keeps_its_own_policy_until_it_is_done(engine, register):
    register(FOREVER)
    tf_steps.KNOBS.update(undo_flaky=40)  # the step itself allows one attempt only
    run = engine.get(engine.start("forever", {}))
    assert run.status is Status.ROLLED_BACK and run.state["undone"] == ["charge"]
    assert len(tf_steps.effects("undo_flaky:charge")) == 41


def test_last_attempt__a_step_knows_when_no_retry_follows(engine, register):
    register(RETRY_LAST)
    tf_steps.KNOBS.update(flaky=5)
    run = engine.get(engine.start("last", {}))
    assert run.status is Status.FAILED
    seen = [w for w, _ in tf_steps.EFFECTS if w.startswith("sees:")]
    assert seen == ["sees:1:False:False", "sees:2:False:False", "sees:3:True:False"]


RETRY_LAST = """
workflow_type: last
version: 1
steps:
  - name: try
    type: STANDARD
    function: "tf_steps:sees_attempt"
    retry: {max_attempts: 3, initial_backoff_s: 1, jitter: 0}
"""

DIES = """
workflow_type: dies
version: 1
steps:
  - {name: effect, type: STANDARD, function: "tf_steps:dies_once"}
  - {name: after, type: STANDARD, function: "tf_steps:sees_attempt"}
"""


class _ProcessDied(BaseException):
    """Stands for SIGKILL: nothing after it runs, ``except Exception`` does not see it."""


def test_replay__a_run_taken_over_from_a_dead_holder_replays_its_step_with_replay_set(store, clock):
    """The holder died mid-step (nothing committed); the engine that takes the run over
    tells the step this attempt may have run before, and only that attempt."""
    tf_steps.KNOBS["crash"] = _ProcessDied()
    first = Engine(store, InlineExecutor(), clock=clock, owner="host:1:dead")
    first.register(load_text(DIES, source="dies.yaml"))
    with pytest.raises(_ProcessDied):
        first.start("dies", {})
    clock.advance(60)  # its lease expires
    heir = Engine(store, InlineExecutor(), clock=clock, owner="host:2:heir")
    heir.register(load_text(DIES, source="dies.yaml"))
    [run_id] = heir.recover()
    run = heir.get(run_id)
    assert run.status is Status.COMPLETED and run.state["replayed"] is True
    assert [w for w, _ in tf_steps.EFFECTS] == [
        "dies_once:False", "dies_once:True", "sees:1:True:False",
    ]  # fmt: skip
    first.close()
    heir.close()
