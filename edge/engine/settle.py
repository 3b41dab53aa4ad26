"""Settling a commit: the pure moves after a step (decisions, loop turns) and where the
run now stands, including FIRE_AND_FORGET children started in the same transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.engine import outcomes, waits
from edge.engine.context import idempotency_key
from edge.engine.definition import FireAndForgetStep
from edge.engine.loader import Workflow
from edge.engine.navigation import Settled, step_path
from edge.engine.records import AuditEvent, Commit, Status, StepRecord
from edge.errors import ExpressionError, TillflowError

if TYPE_CHECKING:
    from edge.engine.runtime import Engine


def settle(engine: Engine, c: Commit, wf: Workflow, settled: Settled) -> None:
    """Record the pure moves (decisions, loop turns) and where the run now stands.
    FIRE_AND_FORGET steps are settled here too: starting an independent child is just
    an insert in this same transaction."""
    run = c.run
    now = engine.clock.now()
    while True:
        for d in settled.decisions:
            c.steps.append(
                StepRecord(
                    run.run_id, d.path, d.step, "decision", "COMPLETED", 1, now, now, d.detail
                )
            )
            c.audit.append(AuditEvent(run.run_id, "decision", now, d.path, d.detail))
        run.cursor = {"frames": settled.frames, "attempt": 1}
        if settled.failure is not None:
            name, path, exc = settled.failure
            outcomes.fail_step(c, wf, name, path, 1, exc, now, now)
            return
        if not settled.frames:
            outcomes.finish(c, Status.COMPLETED, now)
            return
        top = wf.steps[settled.frames[-1][0]]
        if not isinstance(top, FireAndForgetStep):
            return
        path = step_path(settled.frames)
        key = idempotency_key(run.run_id, path, 1)
        try:
            child_wf = engine.registry.latest(top.workflow)
            child_input = waits.child_input(top.input, run)
            child, child_commit = engine._new_run(
                child_wf, child_input, key, lease=False, parent=(run.run_id, None)
            )
        except (TillflowError, ExpressionError) as exc:
            outcomes.fail_step(c, wf, top.name, path, 1, exc, now, now)
            return
        c.new_runs.append(child)
        c.audit.extend(child_commit.audit)
        c.steps.append(
            StepRecord(
                run.run_id,
                path,
                top.name,
                "step",
                "COMPLETED",
                1,
                now,
                now,
                {"child": child.run_id},
            )
        )
        if top.output_key:
            run.state = {**run.state, top.output_key: child.run_id}
        settled = engine.registry.navigator(wf).after(settled.frames, run.state, run.input)
