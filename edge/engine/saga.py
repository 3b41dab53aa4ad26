"""Compensation: undo completed steps in reverse order, one committed outcome each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.engine import outcomes
from edge.engine import steps as stepexec
from edge.engine.context import StepContext, idempotency_key
from edge.engine.definition import ActionStep
from edge.engine.loader import Workflow
from edge.engine.records import AuditEvent, RunRecord, Status, StepRecord

if TYPE_CHECKING:
    from edge.engine.runtime import Engine


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


def compensate_next(engine: Engine, wf: Workflow, run: RunRecord) -> RunRecord:
    """Run (one attempt of) the next compensation, or end the run when none is left.

    Ends ROLLED_BACK (CANCELLED for a cancel with compensation), or FAILED listing the
    steps left uncompensated when a compensation fails for good: never a silent rollback.
    """
    pending = pending_compensations(wf, engine.store.step_history(run.run_id))
    c = engine.draft(run)
    now = engine.clock.now()
    if not pending:
        cancelled = bool(run.cursor.get("cancel_reason"))
        outcomes.finish(c, Status.CANCELLED if cancelled else Status.ROLLED_BACK, now)
        return engine.commit(c)
    row = pending[0]
    step = wf.steps[row.step_name]
    assert isinstance(step, ActionStep) and step.compensate
    attempt = int(run.cursor.get("attempt", 1))
    policy = step.compensation_retry
    ctx = StepContext(
        run_id=run.run_id,
        step=row.step,
        attempt=attempt,
        idempotency_key=idempotency_key(run.run_id, f"compensate:{row.step}", attempt),
        clock=engine.clock,
        input=run.input,
        output=row.output,
        last_attempt=not policy.allows_retry_after(attempt),
        replay=run.run_id in engine._taken_over,
        services=engine.services,
    )
    fn = wf.functions[step.compensate]
    try:
        outcomes.check_code(c, wf, [step.compensate], now)
        view = stepexec.state_view(run.state, wf.state_model)
        out = stepexec.call_with_timeout(lambda: fn(view, ctx), step.timeout_s)
        new_state, _ = stepexec.apply_output(run.state, out, None, wf.state_model)
    except Exception as exc:  # this compensation attempt failed; its policy decides
        end = engine.clock.now()
        if outcomes.schedule_retry(
            c,
            "compensation",
            row.step_name,
            row.step,
            attempt,
            policy,
            exc,
            now,
            end,
            engine.rng,
            engine.lease_s,
            ref_seq=row.seq,
        ):
            return engine.commit(c)
        err = outcomes.error_dict(exc)
        left = [r.step for r in pending]
        c.steps.append(
            StepRecord(
                run.run_id,
                row.step,
                row.step_name,
                "compensation",
                "FAILED",
                attempt,
                now,
                end,
                error=err,
                ref_seq=row.seq,
            )
        )
        c.audit.append(
            AuditEvent(
                run.run_id, "compensation_failed", end, row.step, {**err, "uncompensated": left}
            )
        )
        c.run.error = {**(run.error or {}), "compensation_error": err, "uncompensated": left}
        outcomes.finish(c, Status.FAILED, end)
        return engine.commit(c)
    end = engine.clock.now()
    c.run.state = new_state
    c.outbox.extend(ctx._emitted)
    c.guards.extend(ctx._guards)
    c.run.cursor["attempt"] = 1
    c.steps.append(
        StepRecord(
            run.run_id,
            row.step,
            row.step_name,
            "compensation",
            "COMPLETED",
            attempt,
            now,
            end,
            ref_seq=row.seq,
        )
    )
    c.audit.append(AuditEvent(run.run_id, "compensated", end, row.step, {"attempt": attempt}))
    return engine.commit(c)
