"""Settling a commit: the pure moves after a step (decisions, loop turns) and where the
run now stands, including FIRE_AND_FORGET children started in the same transaction.

A builder, like ``outcomes``: it fills in the ``Commit`` it is given and does no I/O.
A child run is made by the ``NewChild`` callable the engine passes in.
"""

from __future__ import annotations

from typing import Any, Protocol

from edge.engine import outcomes
from edge.engine.context import idempotency_key, operation_key
from edge.engine.definition import FireAndForgetStep
from edge.engine.loader import Workflow
from edge.engine.navigation import Navigator, Settled, step_path
from edge.engine.records import AuditEvent, Commit, RunRecord, Status, StepRecord
from edge.engine.templating import render
from edge.errors import ExpressionError, TillflowError


class NewChild(Protocol):
    """Makes a child run of the latest definition of ``workflow_type``, unleased, with
    the commit that would start it (its run row and audit rows), committing nothing.
    ``parent``: (parent run id, the parent's step path, or None for a run that nobody
    waits for). Raises TillflowError (say, no such workflow, or input its model refuses)."""

    def __call__(
        self,
        workflow_type: str,
        input: dict[str, Any],
        key: str,
        parent: tuple[str, str | None],
    ) -> tuple[RunRecord, Commit]: ...


def child_input(template: dict[str, Any], run: RunRecord) -> dict[str, Any]:
    """A child's input: the step's ``input`` rendered from state, else a copy of the state."""
    if not template:
        return dict(run.state)
    rendered = render(template, run.state, run.input)
    assert isinstance(rendered, dict)  # rendering a dict gives a dict
    return rendered


def settle(
    c: Commit, wf: Workflow, nav: Navigator, settled: Settled, now: float, new_child: NewChild
) -> None:
    """Record the pure moves (decisions, loop turns) and where the run now stands.
    FIRE_AND_FORGET steps are settled here too: starting an independent child is just
    an insert in this same transaction."""
    run = c.run
    while True:
        for d in settled.decisions:
            c.steps.append(
                StepRecord(
                    run.run_id,
                    d.path,
                    d.step,
                    "decision",
                    "COMPLETED",
                    1,
                    now,
                    now,
                    d.detail,
                    operation_key=operation_key(run.run_id, d.path),
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
            child, child_commit = new_child(
                top.workflow, child_input(top.input, run), key, (run.run_id, None)
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
                operation_key=operation_key(run.run_id, path),
            )
        )
        if top.output_key:
            run.state = {**run.state, top.output_key: child.run_id}
        settled = nav.after(settled.frames, run.state, run.input)
