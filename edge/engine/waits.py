"""Runs that wait: on input (WAIT, with an optional timeout) or on a child run
(SUB_WORKFLOW). What entering, timing out and spawning write into a step's Commit.

Builders, like ``outcomes``: each fills in the draft ``Commit`` it is given and does no
I/O; the engine drafts and commits. A child run is made by the ``NewChild`` callable.
"""

from __future__ import annotations

import random

from edge.engine import outcomes, settle
from edge.engine.context import idempotency_key, operation_key
from edge.engine.definition import SubWorkflowStep, WaitStep
from edge.engine.loader import Workflow
from edge.engine.navigation import Navigator, step_path
from edge.engine.records import AuditEvent, Commit, Status, StepRecord
from edge.errors import ExpressionError, StepError, TillflowError


def enter_wait(c: Commit, step: WaitStep, path: str, now: float) -> Commit:
    """The run waits for ``resume``: no lease, due again only at its timeout (if any)."""
    c.run.status = Status.WAITING
    c.run.lease_owner = c.run.lease_expires_at = None
    c.run.next_attempt_at = now + step.timeout_s if step.timeout_s else None
    c.audit.append(AuditEvent(c.run.run_id, "waiting", now, path, {"timeout_s": step.timeout_s}))
    return c


def wait_timed_out(
    c: Commit, wf: Workflow, nav: Navigator, now: float, new_child: settle.NewChild
) -> Commit:
    """Nobody answered in time: continue at ``on_timeout``, or fail the step. ``c`` is
    the draft of the waiting run."""
    run = c.run
    frames = run.cursor["frames"]
    step = wf.steps[frames[-1][0]]
    path = step_path(frames)
    run.status = Status.RUNNING
    c.steps.append(
        StepRecord(
            run.run_id,
            path,
            step.name,
            "timeout",
            "TIMED_OUT",
            1,
            now,
            now,
            operation_key=operation_key(run.run_id, path),
        )
    )
    c.audit.append(AuditEvent(run.run_id, "wait_timed_out", now, path))
    target = step.on_timeout if isinstance(step, WaitStep) else None
    if target:
        settle.settle(c, wf, nav, nav.jump(frames, target, run.state, run.input), now, new_child)
    else:
        exc = StepError("timed out waiting for input", retryable=False)
        outcomes.fail_step(c, wf, step.name, path, 1, exc, now, now)
    return c


def spawn_child(
    c: Commit,
    wf: Workflow,
    step: SubWorkflowStep,
    path: str,
    attempt: int,
    now: float,
    new_child: settle.NewChild,
    rng: random.Random,
    lease_s: float,
) -> Commit:
    """Insert the child run in the parent's commit; the parent waits until the child's
    final commit wakes it. The child's idempotency key is the parent step's attempt key."""
    key = idempotency_key(c.run.run_id, path, attempt)
    try:
        child_input = settle.child_input(step.input, c.run)
        child, child_commit = new_child(step.workflow, child_input, key, (c.run.run_id, path))
    except (TillflowError, ExpressionError) as exc:
        if not outcomes.schedule_retry(
            c, "step", step.name, path, attempt, step.retry, exc, now, now, rng, lease_s
        ):
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
