"""Runs that wait: on input (WAIT, with an optional timeout) or on a child run
(SUB_WORKFLOW). What entering, timing out and spawning write into a step's Commit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge.engine import outcomes
from edge.engine.context import idempotency_key
from edge.engine.definition import SubWorkflowStep, WaitStep
from edge.engine.loader import Workflow
from edge.engine.navigation import step_path
from edge.engine.records import AuditEvent, Commit, RunRecord, Status, StepRecord
from edge.engine.templating import render
from edge.errors import ExpressionError, StepError, TillflowError

if TYPE_CHECKING:
    from edge.engine.runtime import Engine


def enter_wait(c: Commit, step: WaitStep, path: str, now: float) -> Commit:
    """The run waits for ``resume``: no lease, due again only at its timeout (if any)."""
    c.run.status = Status.WAITING
    c.run.lease_owner = c.run.lease_expires_at = None
    c.run.next_attempt_at = now + step.timeout_s if step.timeout_s else None
    c.audit.append(AuditEvent(c.run.run_id, "waiting", now, path, {"timeout_s": step.timeout_s}))
    return c


def wait_timed_out(engine: Engine, wf: Workflow, run: RunRecord) -> RunRecord:
    """Nobody answered in time: continue at ``on_timeout``, or fail the step."""
    frames = run.cursor["frames"]
    step = wf.steps[frames[-1][0]]
    path = step_path(frames)
    c = engine.draft(run)
    c.run.status = Status.RUNNING
    now = engine.clock.now()
    c.steps.append(StepRecord(run.run_id, path, step.name, "timeout", "TIMED_OUT", 1, now, now))
    c.audit.append(AuditEvent(run.run_id, "wait_timed_out", now, path))
    target = step.on_timeout if isinstance(step, WaitStep) else None
    if target:
        nav = engine.registry.navigator(wf)
        engine._settle(c, wf, nav.jump(frames, target, run.state, run.input))
    else:
        exc = StepError("timed out waiting for input", retryable=False)
        outcomes.fail_step(c, wf, step.name, path, 1, exc, now, now)
    return engine.commit(c)


def child_input(template: dict[str, Any], run: RunRecord) -> dict[str, Any]:
    """A child's input: the step's ``input`` rendered from state, else a copy of the state."""
    if not template:
        return dict(run.state)
    rendered = render(template, run.state, run.input)
    assert isinstance(rendered, dict)  # rendering a dict gives a dict
    return rendered


def spawn_child(
    engine: Engine,
    c: Commit,
    wf: Workflow,
    step: SubWorkflowStep,
    path: str,
    attempt: int,
    now: float,
) -> Commit:
    """Insert the child run in the parent's commit; the parent waits until the child's
    final commit wakes it. The child's idempotency key is the parent step's attempt key."""
    key = idempotency_key(c.run.run_id, path, attempt)
    try:
        child_wf = engine.registry.latest(step.workflow)
        child, child_commit = engine._new_run(
            child_wf, child_input(step.input, c.run), key, lease=False, parent=(c.run.run_id, path)
        )
    except (TillflowError, ExpressionError) as exc:
        if not outcomes.schedule_retry(
            c, "step", step.name, path, attempt, step.retry, exc, now, now,
            engine.rng, engine.lease_s,
        ):  # fmt: skip
            outcomes.fail_step(c, wf, step.name, path, attempt, exc, now, now)
        return c
    c.new_runs.append(child)
    c.audit.extend(child_commit.audit)
    c.run.cursor["child"] = child.run_id
    if not child.status.terminal:  # a child that settled at birth needs no waiting
        c.run.status = Status.WAITING
        c.run.lease_owner = c.run.lease_expires_at = None
    c.audit.append(
        AuditEvent(c.run.run_id, "child_started", now, path, {"child_run_id": child.run_id})
    )
    return c
