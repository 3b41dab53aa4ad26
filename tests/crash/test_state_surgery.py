"""Crash tests by state surgery: finish a run, rewind its row in the database as if the
process had died just after an earlier commit, then let a NEW engine recover it.

What was committed before the rewound point must not run again; what comes after runs
again with the SAME idempotency keys, so a downstream system recognises the replay
(DESIGN.md invariants 1-3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import apsw
import pytest

from edge.engine import Engine, FakeClock, Status
from edge.engine.records import StepRecord

from .conftest import PAYMENT, START, CrashDir, Engines

LIVE_FOREIGN_OWNER = "another-terminal:4242:1:cafebabe"  # not this host: never "dead"


def _finished(
    engines: Engines, crash: CrashDir, workflow_type: str, payload: dict[str, Any]
) -> tuple[str, Engine]:
    engine = engines.open(crash.db)
    engine.register(crash.workflow(workflow_type))
    run_id = engine.start(workflow_type, payload)
    return run_id, engine


def _rewind(
    db: Path,
    run_id: str,
    *,
    status: Status,
    cursor: dict[str, Any],
    state: dict[str, Any],
    delete_steps_from_seq: int,
    bump_revision: bool,
    lease_owner: str | None = None,
    lease_expires_at: float | None = None,
) -> None:
    """Put the run row back to what an earlier commit left, straight through SQLite.

    Step rows (and outbox messages) from ``delete_steps_from_seq`` on belong to commits
    that, in the rewound world, never happened; the audit log is append-only and stays.
    """
    conn = apsw.Connection(str(db))
    try:
        conn.execute("BEGIN IMMEDIATE")
        gone = [
            row[0]
            for row in conn.execute(
                "SELECT step FROM workflow_steps WHERE run_id = ? AND seq >= ?",
                (run_id, delete_steps_from_seq),
            )
        ]
        conn.execute(
            "DELETE FROM workflow_steps WHERE run_id = ? AND seq >= ?",
            (run_id, delete_steps_from_seq),
        )
        for step in gone:
            conn.execute("DELETE FROM outbox WHERE run_id = ? AND step = ?", (run_id, step))
        # A forward run carries no error yet; a compensating one keeps the failure that
        # started its rollback.
        conn.execute(
            "UPDATE workflow_runs SET status = ?, cursor = ?, state = ?, error = CASE WHEN ? "
            "THEN error END, lease_owner = ?, lease_expires_at = ?, next_attempt_at = NULL, "
            "revision = revision + ? WHERE run_id = ?",
            (
                str(status),
                json.dumps(cursor),
                json.dumps(state),
                status is Status.COMPENSATING,
                lease_owner,
                lease_expires_at,
                1 if bump_revision else 0,
                run_id,
            ),
        )
        assert conn.changes() == 1
        conn.execute("COMMIT")
    finally:
        conn.close()


def _state_before(run_input: dict[str, Any], history: list[StepRecord], seq: int) -> dict[str, Any]:
    """The state as the commits before ``seq`` left it: the input, then each completed
    step's output merged in order (these workflows use no output_key)."""
    state = dict(run_input)
    for row in history:
        if row.seq is not None and row.seq < seq and row.kind == "step" and row.output:
            state.update(row.output)
    return state


def _completed_step_paths(history: list[StepRecord]) -> list[str]:
    return [r.step for r in history if r.kind == "step" and r.status == "COMPLETED"]


def _assert_store_sound(engine: Engine) -> None:
    assert engine.store.integrity_check() == "ok"  # type: ignore[attr-defined]
    assert engine.verify_audit().ok


# --- forward steps ---------------------------------------------------------------------


@pytest.mark.parametrize("bump_revision", [False, True], ids=["same-revision", "bumped-revision"])
@pytest.mark.parametrize(
    ("lease_owner", "lease_expires_at"),
    [(None, None), (LIVE_FOREIGN_OWNER, START - 1.0)],
    ids=["released-lease", "expired-foreign-lease"],
)
@pytest.mark.parametrize("rewind_to", ["reserve", "charge", "print_receipt", "record_sale"])
def test_recover__after_rewind_to_a_step_reruns_only_the_uncommitted_steps(
    crash_dir: CrashDir,
    engines: Engines,
    rewind_to: str,
    bump_revision: bool,
    lease_owner: str | None,
    lease_expires_at: float | None,
) -> None:
    run_id, first = _finished(engines, crash_dir, "crash_linear", PAYMENT)
    done = first.show(run_id)
    assert done.run.status is Status.COMPLETED
    cut = next(r.seq for r in done.steps if r.kind == "step" and r.step == rewind_to)
    assert cut is not None
    committed_before = {r.step for r in done.steps if r.kind == "step" and r.seq < cut}
    engines.crash(first)

    _rewind(
        crash_dir.db,
        run_id,
        status=Status.RUNNING,
        cursor={"frames": [[rewind_to, None]], "attempt": 1},
        state=_state_before(done.run.input, done.steps, cut),
        delete_steps_from_seq=cut,
        bump_revision=bump_revision,
        lease_owner=lease_owner,
        lease_expires_at=lease_expires_at,
    )
    second = engines.open(crash_dir.db)
    assert second.recover() == [run_id]

    after = second.show(run_id)
    assert after.run.status is Status.COMPLETED
    assert after.run.state == done.run.state  # the replay is deterministic
    assert _completed_step_paths(after.steps) == _completed_step_paths(done.steps)
    keys = crash_dir.keys_by_step("step")
    for step, counts in keys.items():
        assert len(counts) == 1, f"{step} presented {len(counts)} different keys: {counts}"
        (times,) = counts.values()
        assert times == (1 if step in committed_before else 2), (step, counts)
    assert [m.topic for m in second.store.outbox()] == ["sale"]
    _assert_store_sound(second)


def test_recover__leaves_a_rewound_run_alone_while_another_terminal_holds_a_live_lease(
    crash_dir: CrashDir, engines: Engines
) -> None:
    run_id, first = _finished(engines, crash_dir, "crash_linear", PAYMENT)
    done = first.show(run_id)
    cut = next(r.seq for r in done.steps if r.step == "print_receipt")
    assert cut is not None
    engines.crash(first)
    _rewind(
        crash_dir.db,
        run_id,
        status=Status.RUNNING,
        cursor={"frames": [["print_receipt", None]], "attempt": 1},
        state=_state_before(done.run.input, done.steps, cut),
        delete_steps_from_seq=cut,
        bump_revision=True,
        lease_owner=LIVE_FOREIGN_OWNER,
        lease_expires_at=START + 30.0,
    )
    clock = FakeClock(START)
    second = engines.open(crash_dir.db, clock)

    assert second.recover() == []
    assert second.get(run_id).status is Status.RUNNING
    assert crash_dir.keys_by_step("step")["print_receipt"].total() == 1

    clock.advance(30.0)  # the holder never renewed: its lease runs out
    assert second.recover() == [run_id]
    assert second.get(run_id).status is Status.COMPLETED
    assert crash_dir.keys_by_step("step")["reserve"].total() == 1


@pytest.mark.parametrize("iteration", [0, 1, 2])
def test_recover__after_rewind_into_a_loop_iteration_resumes_at_that_iteration(
    crash_dir: CrashDir, engines: Engines, iteration: int
) -> None:
    payload = {**PAYMENT, "skus": ["a", "b", "c"]}
    run_id, first = _finished(engines, crash_dir, "crash_loop", payload)
    done = first.show(run_id)
    assert done.run.status is Status.COMPLETED
    path = f"items[{iteration}].charge_item"
    cut = next(r.seq for r in done.steps if r.kind == "step" and r.step == path)
    assert cut is not None
    committed_before = {r.step for r in done.steps if r.kind == "step" and r.seq < cut}
    engines.crash(first)

    _rewind(
        crash_dir.db,
        run_id,
        status=Status.RUNNING,
        cursor={"frames": [["items", iteration], ["charge_item", None]], "attempt": 1},
        state=_state_before(done.run.input, done.steps, cut),
        delete_steps_from_seq=cut,
        bump_revision=True,
    )
    second = engines.open(crash_dir.db)
    assert second.recover() == [run_id]

    after = second.show(run_id)
    assert after.run.status is Status.COMPLETED
    assert after.run.state["charged"] == ["a", "b", "c"]
    assert after.run.state == done.run.state
    assert _completed_step_paths(after.steps) == _completed_step_paths(done.steps)
    for step, counts in crash_dir.keys_by_step("step").items():
        assert len(counts) == 1, (step, counts)
        assert counts.total() == (1 if step in committed_before else 2), (step, counts)
    _assert_store_sound(second)


# --- compensation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "undone", [1, 2], ids=["last-compensation-lost", "both-compensations-lost"]
)
def test_recover__after_rewind_into_compensation_rolls_back_once_per_compensation_key(
    crash_dir: CrashDir, engines: Engines, undone: int
) -> None:
    run_id, first = _finished(engines, crash_dir, "crash_saga", PAYMENT)
    done = first.show(run_id)
    assert done.run.status is Status.ROLLED_BACK
    compensations = [r for r in done.steps if r.kind == "compensation"]
    assert [r.step for r in compensations] == ["charge", "reserve"]  # reverse order
    cut = compensations[-undone].seq
    assert cut is not None
    kept = {r.step for r in compensations if r.seq < cut}
    engines.crash(first)

    _rewind(
        crash_dir.db,
        run_id,
        status=Status.COMPENSATING,
        cursor=done.run.cursor,  # a finished rollback leaves the compensating cursor
        state=done.run.state,  # these compensations change no state
        delete_steps_from_seq=cut,
        bump_revision=False,
    )
    second = engines.open(crash_dir.db)
    assert second.recover() == [run_id]

    after = second.show(run_id)
    assert after.run.status is Status.ROLLED_BACK
    redone = [r for r in after.steps if r.kind == "compensation"]
    assert [(r.step, r.status, r.ref_seq) for r in redone] == [
        (r.step, r.status, r.ref_seq) for r in compensations
    ]
    for step, counts in crash_dir.keys_by_step("compensation").items():
        assert len(counts) == 1, f"compensation of {step} presented keys {counts}"
        assert counts.total() == (1 if step in kept else 2), (step, counts)
    for step, counts in crash_dir.keys_by_step("step").items():
        assert counts.total() == 1, f"forward step {step} ran again during rollback: {counts}"
    _assert_store_sound(second)
