"""Versioning (pinned definitions and code), recovery by lease, and the audit hash chain."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import tf_steps

from edge.engine import Engine, InlineExecutor, Status
from edge.engine.records import Commit, RunRecord

V1 = """
workflow_type: versioned
version: 1
on_code_change: {policy}
steps:
  - {{name: wait, type: WAIT}}
  - {{name: old_step, type: STANDARD, function: "tf_steps:add"}}
"""
V2 = """
workflow_type: versioned
version: 2
steps:
  - {name: wait, type: WAIT}
  - {name: new_step, type: STANDARD, function: "tf_steps:noop"}
"""


def _surgery(store, run_id: str, **changes) -> RunRecord:
    """Rewrite a run row through the Store seam (works on every backend)."""
    run = store.get_run(run_id)
    new = dataclasses.replace(run, revision=run.revision + 1, **changes)
    store.commit(Commit(run=new, expected_revision=run.revision))
    return new


def test_versioning__a_run_finishes_on_the_definition_it_started_with(engine, register):
    register(V1.format(policy="warn"))
    old = engine.start("versioned", {})
    register(V2)
    new = engine.start("versioned", {})
    engine.resume(old, {})
    engine.resume(new, {})
    ran = {r: [s.step for s in engine.show(r).steps if s.kind == "step"] for r in (old, new)}
    assert ran == {old: ["old_step"], new: ["new_step"]}
    assert engine.get(old).definition_hash != engine.get(new).definition_hash


def test_versioning__a_restarted_engine_loads_the_pinned_definition_from_the_store(
    store_factory, clock, register, engine
):
    register(V1.format(policy="warn"))
    old = engine.start("versioned", {})
    register(V2)
    fresh = Engine(store_factory(), InlineExecutor(), clock=clock)  # knows no YAML at all
    fresh.resume(old, {})
    assert [s.step for s in fresh.show(old).steps if s.kind == "step"] == ["old_step"]


@pytest.mark.parametrize(
    ("policy", "status"), [("warn", Status.COMPLETED), ("fail", Status.FAILED)]
)
def test_code_change__under_a_running_run_is_audited_and_applies_the_policy(
    engine, register, store, policy, status
):
    register(V1.format(policy=policy))
    run_id = engine.start("versioned", {})
    pinned = store.get_run(run_id).fingerprints
    _surgery(store, run_id, fingerprints={**pinned, "tf_steps:add": "0" * 16})
    engine.resume(run_id, {})
    run = engine.get(run_id)
    assert run.status is status
    changed = [a for a in engine.show(run_id).audit if a.event == "code_changed"]
    assert len(changed) == 1 and changed[0].detail["function"] == "tf_steps:add"
    assert changed[0].detail["policy"] == policy
    if policy == "fail":
        assert run.error["code"] == "code_changed"
        assert tf_steps.effects("add:old_step") == []


LONG = """
workflow_type: long
version: 1
steps:
  - {name: one, type: STANDARD, function: "tf_steps:add"}
  - {name: two, type: STANDARD, function: "tf_steps:add"}
"""


def _dead_owner() -> str:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    import socket

    return f"{socket.gethostname()}:{int(proc.stdout)}:1:deadbeef"


def _interrupted_run(engine, register, store, owner: str, clock) -> str:
    """A run whose holder stopped after step one: RUNNING, cursor at step two."""
    register(LONG)
    run_id = engine.start("long", {"x": 1})
    _surgery(
        store,
        run_id,
        status=Status.RUNNING,
        cursor={"frames": [["two", None]], "attempt": 1},
        state={"x": 1, "total": 1},
        lease_owner=owner,
        lease_expires_at=clock.now() + 3600,
    )
    return run_id


def test_recover__a_lease_whose_owner_process_died_counts_as_expired_at_once(
    engine, register, store, clock
):
    run_id = _interrupted_run(engine, register, store, _dead_owner(), clock)
    assert engine.recover() == [run_id]
    run = engine.get(run_id)
    assert run.status is Status.COMPLETED and run.state["total"] == 2


def test_recover__a_live_holder_keeps_its_lease_until_it_expires(engine, register, store, clock):
    live_owner = engine.owner.rsplit(":", 1)[0] + ":0ther000"  # this process, another engine
    run_id = _interrupted_run(engine, register, store, live_owner, clock)
    assert engine.recover() == []
    clock.advance(3601)
    assert engine.recover() == [run_id]
    assert engine.get(run_id).status is Status.COMPLETED


def test_recover__ignores_finished_and_waiting_runs(engine, register):
    register(LONG)
    register(V1.format(policy="warn"))
    engine.start("long", {})
    engine.start("versioned", {})
    assert engine.recover() == []


# --- audit chain ---------------------------------------------------------------------


@pytest.fixture
def audited(engine, register):
    register(LONG)
    for i in range(3):
        engine.start("long", {"x": i})
    report = engine.verify_audit()
    assert report.ok and report.rows == 12
    return engine


def test_audit__an_edited_row_is_detected_at_its_seq(audited, backend):
    backend.edit_audit(5, detail={"attempt": 9})
    report = audited.verify_audit()
    assert not report.ok and report.broken_at == 5 and "edited" in report.reason


def test_audit__a_deleted_row_is_detected(audited, backend):
    backend.delete_audit(7)
    report = audited.verify_audit()
    assert not report.ok and report.broken_at == 7 and "missing" in report.reason


def test_audit__a_removed_tail_is_detected_by_the_head(audited, backend):
    backend.delete_audit(12)
    report = audited.verify_audit()
    assert not report.ok and report.broken_at == 12


def test_audit__a_rechained_forgery_still_disagrees_with_the_head(audited, backend):
    backend.delete_audit(11, 12)  # the last two of the 12 rows
    backend.set_audit_head(99)
    assert not audited.verify_audit().ok


@pytest.mark.sql_only
def test_audit__the_log_refuses_updates_and_deletes(audited, backend):
    with pytest.raises(backend.refusal, match="append-only"):
        backend.execute("UPDATE workflow_audit_log SET event = 'x' WHERE seq = 1")
    with pytest.raises(backend.refusal, match="append-only"):
        backend.execute("DELETE FROM workflow_audit_log WHERE seq = 1")


def test_start__a_retried_request_drives_the_run_a_crash_left_in_flight(
    engine, register, store, clock
):
    register(LONG)
    keyed = engine.start("long", {"x": 1}, idempotency_key="pos-42")
    _surgery(  # as if the terminal died after step one
        store,
        keyed,
        status=Status.RUNNING,
        cursor={"frames": [["two", None]], "attempt": 1},
        state={"x": 1, "total": 1},
        lease_owner=_dead_owner(),
        lease_expires_at=clock.now() + 3600,
    )
    restarted = Engine(store, InlineExecutor(), clock=clock)
    assert restarted.start("long", {"x": 1}, idempotency_key="pos-42") == keyed
    run = restarted.get(keyed)
    assert run.status is Status.COMPLETED and run.state["total"] == 2
