"""Retention: finished runs, acknowledged audit rows and idle counters are compacted away;
what is kept still verifies, and nothing live or unacknowledged is touched."""

from __future__ import annotations

import pytest

from edge.engine import Status
from edge.engine.records import Acknowledgement

DAY = 86_400.0

TWO_STEPS = """
workflow_type: two
version: 1
steps:
  - {name: one, type: STANDARD, function: "tf_steps:add"}
  - {name: two, type: STANDARD, function: "tf_steps:add"}
"""

WAITS = """
workflow_type: waits
version: 1
steps:
  - {name: hold, type: WAIT}
  - {name: after, type: STANDARD, function: "tf_steps:noop"}
"""

BUMPS = """
workflow_type: bumps
version: 1
steps:
  - {name: bump, type: STANDARD, function: "tf_steps:bump_counter"}
"""

SPAWNS = """
workflow_type: spawns
version: 1
steps:
  - {name: spawn, type: FIRE_AND_FORGET, workflow: waits, output_key: child_id}
"""


@pytest.fixture
def aged(engine, register, clock):
    """Three runs finished two days ago, one waiting since then, one finished now."""
    register(TWO_STEPS)
    register(WAITS)
    old = [engine.start("two", {"x": i}) for i in range(3)]
    waiting = engine.start("waits", {})
    clock.advance(2 * DAY)
    recent = engine.start("two", {"x": 9})
    return {"old": old, "waiting": waiting, "recent": recent}


def test_compact__removes_finished_runs_older_than_the_cutoff_with_their_rows(
    aged, engine, store, clock
):
    done = store.compact(before=clock.now() - DAY)
    assert (done.runs, done.steps) == (3, 3 * 2)
    for run_id in aged["old"]:
        assert store.get_run(run_id) is None
        assert store.step_history(run_id) == []
    assert engine.get(aged["waiting"]).status is Status.WAITING
    assert engine.get(aged["recent"]).status is Status.COMPLETED
    assert len(store.step_history(aged["recent"])) == 2
    assert store.compact(before=clock.now() - DAY).runs == 0  # nothing left to do


def test_compact__a_finished_parent_stays_while_its_child_is_live(engine, register, store, clock):
    register(WAITS)
    register(SPAWNS)
    parent = engine.start("spawns", {})
    child = engine.get(parent).state["child_id"]
    assert engine.get(parent).status is Status.COMPLETED
    clock.advance(2 * DAY)
    assert store.compact(before=clock.now() - DAY).runs == 0
    engine.resume(child, {})
    clock.advance(2 * DAY)
    assert store.compact(before=clock.now() - DAY).runs == 2
    assert store.get_run(parent) is None and store.get_run(child) is None


def test_compact__keeps_every_audit_row_the_cloud_has_not_acknowledged(aged, engine, store, clock):
    rows = len(list(store.audit_rows()))
    store.compact(before=clock.now() + DAY)  # everything is old enough; nothing is acked
    assert len(list(store.audit_rows())) == rows
    assert store.audit_retention() is None
    assert engine.verify_audit().ok


def test_compact__acknowledged_audit_rows_go_and_the_kept_chain_still_verifies(
    aged, engine, register, store, clock
):
    store.acknowledge(Acknowledgement(audit_through=6))
    done = store.compact(before=clock.now() - DAY)
    assert done.audit_rows == 6
    assert next(r.seq for r in store.audit_rows()) == 7
    kept = store.audit_retention()
    assert kept is not None and (kept.base_seq, kept.acked_seq) == (6, 6)
    engine.start("two", {"x": 1})  # the chain goes on from the kept rows
    report = engine.verify_audit()
    assert report.ok, report


def test_compact__an_acknowledgement_never_moves_back(aged, store):
    store.acknowledge(Acknowledgement(audit_through=8))
    store.acknowledge(Acknowledgement(audit_through=3))
    kept = store.audit_retention()
    assert kept is not None and kept.acked_seq == 8


def test_compact__an_audit_row_written_after_the_cutoff_stays_even_if_acknowledged(
    aged, store, clock
):
    head = store.audit_head()
    assert head is not None
    store.acknowledge(Acknowledgement(audit_through=head[0]))
    store.compact(before=clock.now() - DAY)
    assert {r.run_id for r in store.audit_rows()} >= {aged["recent"]}


@pytest.mark.sql_only
def test_compact__a_kept_row_still_refuses_deletion(aged, store, clock, backend):
    store.acknowledge(Acknowledgement(audit_through=6))
    store.compact(before=clock.now() - DAY)
    with pytest.raises(backend.refusal, match="append-only"):
        backend.execute("DELETE FROM workflow_audit_log WHERE seq = 7")


def test_compact__tampering_with_a_kept_row_is_still_detected(aged, engine, store, clock, backend):
    store.acknowledge(Acknowledgement(audit_through=6))
    store.compact(before=clock.now() - DAY)
    backend.delete_audit(8)
    report = engine.verify_audit()
    assert not report.ok and report.broken_at == 8


def test_compact__the_first_kept_row_must_continue_from_the_base(
    aged, engine, store, clock, backend
):
    store.acknowledge(Acknowledgement(audit_through=6))
    store.compact(before=clock.now() - DAY)
    backend.delete_audit(7)  # forge the new start
    report = engine.verify_audit()
    assert not report.ok and report.broken_at == 7


def test_compact__removes_idle_counters_under_the_prefix_only(engine, register, store, clock):
    register(BUMPS)
    for name in ("velocity:a:1", "offline"):
        engine.start("bumps", {"counter": name})
    clock.advance(2 * DAY)
    engine.start("bumps", {"counter": "velocity:b:2"})
    now = clock.now()
    done = store.compact(before=now - DAY, counter_prefix="velocity:", counters_before=now - DAY)
    assert done.counters == 1
    assert set(store.counters()) == {"velocity:b:2", "offline"}
