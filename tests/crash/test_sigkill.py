"""Crash tests by real process death: a child process drives a run and is SIGKILLed while
a step (or a compensation) is in flight, after its effect reached the outside world but
before the engine committed it. A new engine on the same database recovers the run.

The dead child's lease is still valid by the clock; it must be freed at once because its
owner process is gone (DESIGN.md invariant 2), with no clock advance.
"""

from __future__ import annotations

import pytest

from edge.engine import Engine, Status

from .conftest import PAYMENT, Children, CrashDir, Engines


def _assert_dead_child_still_holds_lease(engine: Engine, run_id: str, pid: int) -> None:
    run = engine.get(run_id)
    assert run.lease_owner is not None and f":{pid}:" in run.lease_owner
    assert run.lease_expires_at is not None and run.lease_expires_at > engine.clock.now()


def _assert_store_sound(engine: Engine) -> None:
    assert engine.store.integrity_check() == "ok"  # type: ignore[attr-defined]
    assert engine.verify_audit().ok


@pytest.mark.parametrize("killed_in", ["reserve", "charge", "record_sale"])
def test_recover__after_sigkill_inside_step_completes_with_one_effect_per_key(
    crash_dir: CrashDir, engines: Engines, children: Children, killed_in: str
) -> None:
    child = children.start("crash_linear", PAYMENT, block_at=killed_in)
    run_id, killed_key = child.wait_blocked()
    child.sigkill()

    engine = engines.open(crash_dir.db)
    assert engine.store.integrity_check() == "ok"  # type: ignore[attr-defined]
    _assert_dead_child_still_holds_lease(engine, run_id, child.pid)
    assert engine.recover() == [run_id]

    view = engine.show(run_id)
    assert view.run.status is Status.COMPLETED
    completed = [r.step for r in view.steps if r.kind == "step" and r.status == "COMPLETED"]
    assert completed == ["reserve", "charge", "print_receipt", "record_sale"]
    keys = crash_dir.keys_by_step("step")
    assert set(keys) == set(completed)
    for step, counts in keys.items():
        assert len(counts) == 1, f"{step} presented {len(counts)} different keys: {counts}"
        assert counts.total() == (2 if step == killed_in else 1), (step, counts)
    assert set(keys[killed_in]) == {killed_key}  # the replay presented the killed attempt's key
    sales = engine.store.outbox()
    assert [m.topic for m in sales] == ["sale"]  # the killed process's message never committed
    _assert_store_sound(engine)


def test_recover__after_sigkill_inside_a_retried_attempt_replays_that_attempts_key(
    crash_dir: CrashDir, engines: Engines, children: Children
) -> None:
    child = children.start("crash_linear", PAYMENT, block_at="charge", fail_first="charge")
    run_id, killed_key = child.wait_blocked()
    child.sigkill()

    engine = engines.open(crash_dir.db)
    assert engine.recover() == [run_id]

    view = engine.show(run_id)
    assert view.run.status is Status.COMPLETED
    charges = [(r.status, r.attempt) for r in view.steps if r.step == "charge"]
    assert charges == [("RETRYING", 1), ("COMPLETED", 2)]
    by_attempt: dict[int, set[str]] = {}
    for e in crash_dir.effects():
        if e["step"] == "charge":
            by_attempt.setdefault(e["attempt"], set()).add(e["key"])
    assert by_attempt[2] == {killed_key}  # attempt 2 was replayed, not turned into attempt 3
    assert set(by_attempt) == {1, 2}
    assert by_attempt[1] != by_attempt[2]  # a retry is a new request downstream
    _assert_store_sound(engine)


@pytest.mark.parametrize(
    "killed_in", ["refund", "release"], ids=["first-compensation", "last-compensation"]
)
def test_recover__after_sigkill_inside_compensation_rolls_back_with_one_effect_per_key(
    crash_dir: CrashDir, engines: Engines, children: Children, killed_in: str
) -> None:
    child = children.start("crash_saga", PAYMENT, block_at=killed_in)
    run_id, killed_key = child.wait_blocked()
    child.sigkill()

    engine = engines.open(crash_dir.db)
    assert engine.get(run_id).status is Status.COMPENSATING
    _assert_dead_child_still_holds_lease(engine, run_id, child.pid)
    assert engine.recover() == [run_id]

    view = engine.show(run_id)
    assert view.run.status is Status.ROLLED_BACK
    undone = [(r.step, r.status) for r in view.steps if r.kind == "compensation"]
    assert undone == [("charge", "COMPLETED"), ("reserve", "COMPLETED")]  # reverse order
    compensations = crash_dir.keys_by_step("compensation")
    assert set(compensations) == {"charge", "reserve"}
    killed_step = {"refund": "charge", "release": "reserve"}[killed_in]
    for step, counts in compensations.items():
        assert len(counts) == 1, f"compensation of {step} presented keys {counts}"
        assert counts.total() == (2 if step == killed_step else 1), (step, counts)
    assert set(compensations[killed_step]) == {killed_key}
    for step, counts in crash_dir.keys_by_step("step").items():
        assert counts.total() == 1, f"forward step {step} ran again: {counts}"
    _assert_store_sound(engine)


def test_recover__after_sigkill_inside_a_retried_compensation_replays_that_attempts_key(
    crash_dir: CrashDir, engines: Engines, children: Children
) -> None:
    child = children.start("crash_saga", PAYMENT, block_at="refund", fail_first="refund")
    run_id, killed_key = child.wait_blocked()
    child.sigkill()

    engine = engines.open(crash_dir.db)
    assert engine.recover() == [run_id]

    view = engine.show(run_id)
    assert view.run.status is Status.ROLLED_BACK
    undone = [(r.step, r.status, r.attempt) for r in view.steps if r.kind == "compensation"]
    assert undone == [
        ("charge", "RETRYING", 1),
        ("charge", "COMPLETED", 2),
        ("reserve", "COMPLETED", 1),  # the attempt counter starts afresh per compensation
    ]
    refunds: dict[int, set[str]] = {}
    for e in crash_dir.effects():
        if e["fn"] == "refund":
            refunds.setdefault(e["attempt"], set()).add(e["key"])
    assert refunds[2] == {killed_key}
    assert set(refunds) == {1, 2}
    assert crash_dir.keys_by_step("compensation")["reserve"].total() == 1
    _assert_store_sound(engine)


def test_recover__after_sigkill_inside_a_child_runs_step_finishes_child_then_wakes_parent(
    crash_dir: CrashDir, engines: Engines, children: Children
) -> None:
    child = children.start("crash_parent", PAYMENT, block_at="charge")
    child_run_id, killed_key = child.wait_blocked()
    child.sigkill()

    engine = engines.open(crash_dir.db)
    (parent,) = [r for r in engine.list_runs() if r.workflow_type == "crash_parent"]
    assert parent.status is Status.WAITING and parent.cursor["child"] == child_run_id
    _assert_dead_child_still_holds_lease(engine, child_run_id, child.pid)
    assert engine.recover() == [child_run_id]  # the parent is woken by its child

    assert engine.get(child_run_id).status is Status.COMPLETED
    done = engine.show(parent.run_id)
    assert done.run.status is Status.COMPLETED
    assert done.run.state["outcome"] == "approved"  # the child's state came back
    for run_id in (parent.run_id, child_run_id):
        for step, counts in crash_dir.keys_by_step("step", run_id).items():
            assert len(counts) == 1, (run_id, step, counts)
    assert set(crash_dir.keys_by_step("step", child_run_id)["charge"]) == {killed_key}
    assert [m.topic for m in engine.store.outbox()] == ["sale"]
    _assert_store_sound(engine)


def test_recover__after_sigkill_inside_a_parallel_task_replays_every_task_with_its_key(
    crash_dir: CrashDir, engines: Engines, children: Children
) -> None:
    child = children.start("crash_parallel", PAYMENT, block_at="charge")
    run_id, killed_key = child.wait_blocked()
    child.sigkill()

    engine = engines.open(crash_dir.db)
    assert engine.recover() == [run_id]

    view = engine.show(run_id)
    assert view.run.status is Status.COMPLETED
    keys = crash_dir.keys_by_step("step")
    assert set(keys["authorise/capture"]) == {killed_key}
    # The whole PARALLEL step is one outcome: its sibling task never committed either, so
    # it ran again too, with the same key.
    for step, counts in keys.items():
        assert len(counts) == 1, (step, counts)
    assert keys["record_sale"].total() == 1
    _assert_store_sound(engine)
