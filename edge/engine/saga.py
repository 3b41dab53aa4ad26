"""Compensation: undo completed steps in reverse order, one committed outcome each.

Builders, like ``outcomes``: they read the history they are given and fill in a draft
``Commit``; the engine runs the compensation's code and commits.

A compensation acts on what its step did, so its context carries that step's
operation key, read from the step's row (``StepRecord.operation_key``), never rebuilt
from a step name; rows written before keys were recorded fall back to
``operation_key(run_id, path)``, the value the step saw.
"""

from __future__ import annotations

import random
from typing import Any

from edge.engine import outcomes
from edge.engine.clock import Clock
from edge.engine.context import StepContext, idempotency_key, operation_key
from edge.engine.definition import ActionStep
from edge.engine.loader import Workflow
from edge.engine.records import AuditEvent, Commit, RunRecord, Status, StepRecord


def pending_compensations(wf: Workflow, history: list[StepRecord]) -> list[StepRecord]:
    """Completed steps that have a compensation not yet done, most recent first."""
    done = {r.ref_seq for r in history if r.kind == "compensation" and r.status == "COMPLETED"}
    return [
        r
        for r in reversed(history)
        if r.kind == "step"
        and r.status == "COMPLETED"
        and r.seq not in done
        and isinstance(wf.steps.get(r.step_name), ActionStep)
        and getattr(wf.steps[r.step_name], "compensate", None)
    ]


def step_operation_key(row: StepRecord) -> str:
    """The operation key a step row was recorded with (its path's, for older rows)."""
    return row.operation_key or operation_key(row.run_id, row.step)


def compensation_context(
    run: RunRecord,
    row: StepRecord,
    attempt: int,
    clock: Clock,
    *,
    last_attempt: bool,
    replay: bool,
    services: Any,
) -> StepContext:
    """What the compensation of ``row`` sees: that step's path, output and operation
    key; an idempotency key of its own per attempt."""
    return StepContext(
        run_id=run.run_id,
        step=row.step,
        attempt=attempt,
        idempotency_key=idempotency_key(run.run_id, f"compensate:{row.step}", attempt),
        operation_key=step_operation_key(row),
        clock=clock,
        input=run.input,
        output=row.output,
        last_attempt=last_attempt,
        replay=replay,
        services=services,
    )


def cancelled(c: Commit, reason: str, compensate: bool, now: float) -> Commit:
    """A cancel: the run ends CANCELLED, or with ``compensate`` goes COMPENSATING first
    (unleased, for whoever advances it next) and ends CANCELLED when all is undone."""
    run = c.run
    detail = {"reason": reason, "compensate": compensate}
    c.audit.append(AuditEvent(run.run_id, "cancel_requested", now, None, detail))
    run.error = {"type": "Cancelled", "code": "cancelled", "message": reason or "cancelled"}
    if compensate:
        run.status = Status.COMPENSATING
        run.cursor = {**run.cursor, "attempt": 1, "compensating": True, "cancel_reason": reason}
        run.lease_owner = run.lease_expires_at = None
    else:
        outcomes.finish(c, Status.CANCELLED, now)
    return c


def undone(c: Commit, now: float) -> Commit:
    """No compensation is left: ROLLED_BACK (CANCELLED for a cancel with compensation)."""
    cancelled = bool(c.run.cursor.get("cancel_reason"))
    outcomes.finish(c, Status.CANCELLED if cancelled else Status.ROLLED_BACK, now)
    return c


def compensated(
    c: Commit,
    row: StepRecord,
    ctx: StepContext,
    new_state: dict[str, Any],
    started: float,
    now: float,
) -> Commit:
    """The compensation of ``row`` succeeded: its state, messages and guards commit."""
    run = c.run
    run.state = new_state
    c.outbox.extend(ctx._emitted)
    c.guards.extend(ctx._guards)
    run.cursor["attempt"] = 1
    c.steps.append(
        StepRecord(
            run.run_id,
            row.step,
            row.step_name,
            "compensation",
            "COMPLETED",
            ctx.attempt,
            started,
            now,
            ref_seq=row.seq,
            operation_key=ctx.operation_key,
        )
    )
    c.audit.append(AuditEvent(run.run_id, "compensated", now, row.step, {"attempt": ctx.attempt}))
    return c


def compensation_failed(
    c: Commit,
    wf: Workflow,
    pending: list[StepRecord],
    ctx: StepContext,
    exc: BaseException,
    started: float,
    now: float,
    rng: random.Random,
    lease_s: float,
) -> Commit:
    """This attempt of the compensation of ``pending[0]`` failed: retry it if its policy
    allows, else end FAILED listing the steps left uncompensated (never a silent rollback)."""
    row = pending[0]
    step = wf.steps[row.step_name]
    assert isinstance(step, ActionStep)
    run = c.run
    if outcomes.schedule_retry(
        c, "compensation", row.step_name, row.step, ctx.attempt, step.compensation_retry, exc,
        started, now, rng, lease_s, ref_seq=row.seq, operation_key=ctx.operation_key,
    ):  # fmt: skip
        return c
    err = outcomes.error_dict(exc)
    left = [r.step for r in pending]
    c.steps.append(
        StepRecord(
            run.run_id,
            row.step,
            row.step_name,
            "compensation",
            "FAILED",
            ctx.attempt,
            started,
            now,
            error=err,
            ref_seq=row.seq,
            operation_key=ctx.operation_key,
        )
    )
    c.audit.append(
        AuditEvent(run.run_id, "compensation_failed", now, row.step, {**err, "uncompensated": left})
    )
    run.error = {**(run.error or {}), "compensation_error": err, "uncompensated": left}
    outcomes.finish(c, Status.FAILED, now)
    return c
