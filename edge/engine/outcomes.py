"""What a failed attempt, a finished run or a code change writes into a step's Commit.

Free functions over a ``Commit``: no I/O here; the engine commits what they build.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from edge.engine.context import operation_key as opkey
from edge.engine.definition import RetryPolicy
from edge.engine.loader import Workflow
from edge.engine.records import AuditEvent, Commit, Status, StepRecord
from edge.errors import CodeChanged

log = logging.getLogger("edge.engine.runtime")

NO_RETRY = RetryPolicy(max_attempts=1)


def backoff(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    """Seconds to wait after failed ``attempt`` (1-based), with +/- jitter."""
    try:
        grown = policy.initial_backoff_s * policy.multiplier ** (attempt - 1)
    except OverflowError:  # a long outage under ``max_attempts: forever``: long capped
        grown = policy.max_backoff_s
    base = min(policy.max_backoff_s, grown)
    return max(0.0, base * (1 + rng.uniform(-policy.jitter, policy.jitter)))


def error_dict(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "code": getattr(exc, "code", "step_failed"),
        "message": str(exc),
    }


def schedule_retry(
    c: Commit,
    kind: str,
    name: str,
    path: str,
    attempt: int,
    policy: RetryPolicy,
    exc: BaseException,
    started: float,
    now: float,
    rng: random.Random,
    lease_s: float,
    ref_seq: int | None = None,
    operation_key: str | None = None,
) -> bool:
    """If ``exc`` may be retried and attempts remain, record the retry and return True.

    The run keeps its lease through the backoff (``next_attempt_at + lease_s``): the
    same worker continues on time, and a dead one is detected by ``recover()``.
    ``operation_key`` goes on the row (default: the step's, from ``path``).
    """
    if not (getattr(exc, "retryable", True) and policy.allows_retry_after(attempt)):
        return False
    run = c.run
    err = error_dict(exc)
    delay = backoff(policy, attempt, rng)
    run.next_attempt_at = now + delay
    run.lease_expires_at = run.next_attempt_at + lease_s
    run.cursor["attempt"] = attempt + 1
    c.steps.append(
        StepRecord(
            run.run_id,
            path,
            name,
            kind,
            "RETRYING",
            attempt,
            started,
            now,
            error=err,
            ref_seq=ref_seq,
            operation_key=operation_key or opkey(run.run_id, path),
        )
    )
    event = "step_retry_scheduled" if kind == "step" else "compensation_retry_scheduled"
    c.audit.append(
        AuditEvent(
            run.run_id, event, now, path, {**err, "attempt": attempt, "delay_s": round(delay, 3)}
        )
    )
    log.info(
        "%s %s failed (attempt %d), retry in %.2fs: %s",
        kind,
        path,
        attempt,
        delay,
        exc,
        extra={"action": "retry_scheduled", "run_id": run.run_id, "step": path},
    )
    return True


def fail_step(
    c: Commit,
    wf: Workflow,
    name: str,
    path: str,
    attempt: int,
    exc: BaseException,
    started: float,
    now: float,
) -> None:
    """The step failed for good: compensate (saga) or end FAILED."""
    run = c.run
    err = error_dict(exc)
    c.steps.append(
        StepRecord(
            run.run_id,
            path,
            name,
            "step",
            "FAILED",
            attempt,
            started,
            now,
            error=err,
            operation_key=opkey(run.run_id, path),
        )
    )
    c.audit.append(AuditEvent(run.run_id, "step_failed", now, path, {**err, "attempt": attempt}))
    log.warning(
        "step %s failed for good: %s",
        path,
        exc,
        extra={"action": "step_failed", "run_id": run.run_id, "step": path},
    )
    run.error = {**err, "step": path}
    if wf.definition.saga:
        run.status = Status.COMPENSATING
        run.next_attempt_at = None
        run.cursor = {"frames": run.cursor.get("frames", []), "attempt": 1, "compensating": True}
        c.audit.append(AuditEvent(run.run_id, "compensation_started", now, path))
    else:
        finish(c, Status.FAILED, now)


def finish(c: Commit, status: Status, now: float) -> None:
    """End the run: release the lease, audit it, wake a waiting parent."""
    run = c.run
    run.status = status
    run.lease_owner = None
    run.lease_expires_at = None
    run.next_attempt_at = None
    detail: dict[str, Any] = {}
    if run.error and status is not Status.COMPLETED:
        detail = {"error": run.error}
    c.audit.append(AuditEvent(run.run_id, f"run_{status.lower()}", now, None, detail))
    if run.parent_run_id and run.parent_step:
        c.wake.append(run.parent_run_id)
    log.info(
        "run %s %s",
        run.run_id,
        status,
        extra={"action": "run_finished", "run_id": run.run_id, "status": str(status)},
    )


def check_code(c: Commit, wf: Workflow, paths: list[str | None], now: float) -> None:
    """Versioning: compare each function's code now with the fingerprint the run pinned."""
    for p in paths:
        if p is None:
            continue
        pinned = c.run.fingerprints.get(p)
        current = wf.fingerprints.get(p)
        if pinned is None or current is None or pinned == current:
            continue
        policy = wf.definition.on_code_change
        detail = {"function": p, "pinned": pinned, "current": current, "policy": policy}
        c.audit.append(AuditEvent(c.run.run_id, "code_changed", now, None, detail))
        if policy == "fail":
            raise CodeChanged(
                f"code of '{p}' changed under run {c.run.run_id} (on_code_change: fail)"
            )
        log.warning(
            "code of %s changed under run %s; continuing (on_code_change: warn)",
            p,
            c.run.run_id,
            extra={"action": "code_changed", "run_id": c.run.run_id},
        )
        c.run.fingerprints[p] = current  # audited once per run, not per step
