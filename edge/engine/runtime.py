"""The engine: start, advance, resume, cancel, recover runs. Written once, above the Store seam.

Each step outcome is ONE ``store.commit``: the new state, the cursor, step rows, audit
rows and outbox messages together (DESIGN.md invariant 1). Step code runs outside
that transaction; if the process dies before the commit, the attempt runs again with
the same idempotency key.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from edge.engine import steps as stepexec
from edge.engine.audit import ChainReport, verify_chain
from edge.engine.clock import Clock, SystemClock
from edge.engine.context import StepContext, idempotency_key
from edge.engine.definition import (
    ActionStep,
    FireAndForgetStep,
    HttpStep,
    ParallelStep,
    RetryPolicy,
    StandardStep,
    SubWorkflowStep,
    WaitStep,
)
from edge.engine.executor import InlineExecutor
from edge.engine.lease import make_owner, owner_is_dead
from edge.engine.loader import Workflow, load_file, load_snapshot
from edge.engine.navigation import Frames, Navigator, Settled, step_path
from edge.engine.ports import Executor, Store
from edge.engine.records import (
    AuditEvent,
    AuditRow,
    Commit,
    RunRecord,
    Status,
    StepRecord,
)
from edge.engine.templating import render
from edge.errors import (
    CodeChanged,
    ExpressionError,
    InputError,
    InvalidRunState,
    LeaseLost,
    RunNotFound,
    StepError,
    TillflowError,
    WorkflowNotFound,
)

log = logging.getLogger(__name__)

#: Seconds a worker's claim on a run lasts without a heartbeat. Long enough that a busy
#: step never loses it; a crashed holder on THIS host is detected at once regardless.
DEFAULT_LEASE_S = 30.0

_NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass
class RunView:
    """Everything ``show`` reports about one run."""

    run: RunRecord
    steps: list[StepRecord]
    audit: list[AuditRow]


def backoff(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    """Seconds to wait after failed ``attempt`` (1-based), with +/- jitter."""
    base = min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier ** (attempt - 1))
    return max(0.0, base * (1 + rng.uniform(-policy.jitter, policy.jitter)))


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "code": getattr(exc, "code", "step_failed"),
        "message": str(exc),
    }


class Engine:
    """The one entry point: give it a store and an executor, the only things that differ
    between a terminal and the cloud."""

    def __init__(
        self,
        store: Store,
        executor: Executor | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        owner: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        http_client: httpx.Client | None = None,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.owner = owner or make_owner()
        self.lease_s = lease_s
        self._http = http_client
        self._new_id = new_id or (lambda: uuid.uuid4().hex)
        if executor is None:
            executor = InlineExecutor()
        if isinstance(executor, InlineExecutor):
            executor.bind(self)
        self.executor: Executor = executor
        self._by_hash: dict[str, Workflow] = {}
        self._by_type: dict[str, Workflow] = {}
        self._nav: dict[str, Navigator] = {}
        self._active: set[str] = set()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- definitions -------------------------------------------------------------------

    def register(self, workflow: Workflow | str | Path) -> Workflow:
        """Make a definition the current one for its type (new runs only; running runs
        keep the definition they started with)."""
        wf = workflow if isinstance(workflow, Workflow) else load_file(workflow)
        self.store.save_definition(
            wf.content_hash, wf.workflow_type, wf.version, wf.snapshot, self.clock.now()
        )
        self._by_hash[wf.content_hash] = wf
        self._by_type[wf.workflow_type] = wf
        return wf

    def _latest(self, workflow_type: str) -> Workflow:
        wf = self._by_type.get(workflow_type)
        if wf is None:
            snapshot = self.store.latest_definition(workflow_type)
            if snapshot is None:
                raise WorkflowNotFound(
                    f"no workflow '{workflow_type}' is registered",
                    hint="register its YAML first (tillflow run PATH does)",
                )
            wf = self._remember(load_snapshot(snapshot, source=f"<stored {workflow_type}>"))
        return wf

    def _remember(self, wf: Workflow) -> Workflow:
        self._by_hash.setdefault(wf.content_hash, wf)
        return self._by_hash[wf.content_hash]

    def _pinned(self, run: RunRecord) -> Workflow:
        wf = self._by_hash.get(run.definition_hash)
        if wf is None:
            snapshot = self.store.load_definition(run.definition_hash)
            if snapshot is None:
                raise WorkflowNotFound(
                    f"definition {run.definition_hash[:12]} of run {run.run_id} is missing"
                )
            wf = self._remember(load_snapshot(snapshot, source=f"<pinned {run.workflow_type}>"))
        return wf

    def _navigator(self, wf: Workflow) -> Navigator:
        nav = self._nav.get(wf.content_hash)
        if nav is None:
            nav = self._nav[wf.content_hash] = Navigator(wf)
        return nav

    # --- starting ------------------------------------------------------------------------

    def start(
        self,
        workflow_type: str,
        input: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> str:
        """Start a run and hand it to the executor; the same key returns the same run."""
        wf = self._latest(workflow_type)
        _, commit = self._new_run(wf, dict(input or {}), idempotency_key, lease=True)
        run_id, created = self.store.start(commit)
        if created:
            log.info(
                "run started",
                extra={"action": "run_started", "run_id": run_id, "workflow": workflow_type},
            )
            self.executor.submit(run_id)
            for child in commit.new_runs:  # FIRE_AND_FORGET steps settled at the start
                self.executor.submit(child.run_id)
        return run_id

    def _new_run(
        self,
        wf: Workflow,
        run_input: dict[str, Any],
        key: str | None,
        *,
        lease: bool,
        parent: tuple[str, str | None] | None = None,
    ) -> tuple[RunRecord, Commit]:
        now = self.clock.now()
        model = wf.state_model
        if model is not None:
            try:
                state = model.model_validate(run_input).model_dump(mode="json")
            except ValidationError as exc:
                raise InputError(f"input does not match {model.__name__}: {exc}") from exc
        else:
            state = dict(run_input)
        stepexec.ensure_json(state)
        run = RunRecord(
            run_id=self._new_id(),
            workflow_type=wf.workflow_type,
            definition_hash=wf.content_hash,
            fingerprints=dict(wf.fingerprints),
            status=Status.RUNNING,
            state=state,
            input=run_input,
            cursor={"frames": [], "attempt": 1},
            revision=1,
            created_at=now,
            updated_at=now,
            idempotency_key=key,
            parent_run_id=parent[0] if parent else None,
            parent_step=parent[1] if parent else None,
            lease_owner=self.owner if lease else None,
            lease_expires_at=now + self.lease_s if lease else None,
        )
        commit = Commit(run=run, expected_revision=0)
        commit.audit.append(
            AuditEvent(
                run.run_id,
                "run_started",
                now,
                detail={
                    "workflow_type": wf.workflow_type,
                    "version": wf.version,
                    "definition_hash": wf.content_hash,
                    "parent_run_id": run.parent_run_id,
                },
            )
        )
        self._settle(commit, wf, self._navigator(wf).start(state, run_input))
        return run, commit

    # --- driving -------------------------------------------------------------------------

    def advance(self, run_id: str) -> float | None:
        """Advance a run as far as it can go now. Returns when it is next due if it is
        sleeping through a retry backoff; None when it finished, waits, or is not ours."""
        run = self._acquire(run_id)
        if run is None:
            return None
        self._active.add(run_id)
        self._ensure_heartbeat()
        try:
            wf = self._pinned(run)
            while True:
                now = self.clock.now()
                if run.status.terminal:
                    return None
                if run.status is Status.WAITING:
                    if run.next_attempt_at is None or run.next_attempt_at > now:
                        return None
                    run = self._wait_timed_out(wf, run)
                    continue
                if run.next_attempt_at is not None and run.next_attempt_at > now:
                    return run.next_attempt_at
                if run.status is Status.COMPENSATING:
                    run = self._compensate_next(wf, run)
                else:
                    run = self._step(wf, run)
        except LeaseLost as exc:
            log.warning("lease lost: %s", exc, extra={"action": "lease_lost", "run_id": run_id})
            return None
        finally:
            self._active.discard(run_id)

    def _acquire(self, run_id: str) -> RunRecord | None:
        run = self.store.get_run(run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id}")
        if run.status.terminal:
            return None
        if run.lease_owner == self.owner:
            return run
        now = self.clock.now()
        free = (
            run.lease_owner is None
            or (run.lease_expires_at or 0) <= now
            or owner_is_dead(run.lease_owner)
        )
        if not free:
            return None
        if run.status is Status.WAITING and (
            run.next_attempt_at is None or run.next_attempt_at > now
        ):
            return None  # nothing to do until input, a child, or the timeout
        return self.store.claim(run_id, run.revision, self.owner, now + self.lease_s)

    def _draft(self, run: RunRecord) -> Commit:
        now = self.clock.now()
        new = dataclasses.replace(
            run,
            revision=run.revision + 1,
            updated_at=now,
            lease_owner=self.owner,
            lease_expires_at=now + self.lease_s,
            next_attempt_at=None,
            cursor=dict(run.cursor),
            fingerprints=dict(run.fingerprints),
        )
        return Commit(run=new, expected_revision=run.revision)

    def _commit(self, c: Commit) -> RunRecord:
        self.store.commit(c)
        for child in c.new_runs:
            self.executor.submit(child.run_id)
        for parent in c.wake:
            self.executor.submit(parent)
        return c.run

    def _step(self, wf: Workflow, run: RunRecord) -> RunRecord:
        frames: Frames = run.cursor["frames"]
        name = frames[-1][0]
        step = wf.steps[name]
        path = step_path(frames)
        attempt = int(run.cursor.get("attempt", 1))
        c = self._draft(run)
        now = self.clock.now()
        if isinstance(step, WaitStep):
            return self._commit(self._enter_wait(c, step, path, now))
        if isinstance(step, SubWorkflowStep) and not run.cursor.get("child"):
            return self._commit(self._spawn_child(c, wf, step, path, attempt, now))
        nav = self._navigator(wf)
        item, index = nav.item_at(frames, run.state, run.input)
        ctx = StepContext(
            run_id=run.run_id,
            step=path,
            attempt=attempt,
            idempotency_key=idempotency_key(run.run_id, path, attempt),
            clock=self.clock,
            input=run.input,
            item=item,
            index=index,
        )
        try:
            self._check_code(
                c,
                wf,
                [getattr(step, "function", None)]
                + [t.function for t in getattr(step, "tasks", [])],
            )
            new_state, output = self._invoke(wf, run, step, ctx)
        except Exception as exc:  # the attempt failed; policy decides what happens next
            if isinstance(exc, LeaseLost):
                raise
            if isinstance(step, SubWorkflowStep):
                c.run.cursor.pop("child", None)
            self._fail(c, wf, step.name, path, attempt, getattr(step, "retry", _NO_RETRY), exc, now)
            return self._commit(c)
        if new_state is None:  # a sub-workflow's child is still running
            c.run.status = Status.WAITING
            c.run.lease_owner = c.run.lease_expires_at = None
            return self._commit(c)
        c.run.state = new_state
        c.outbox.extend(ctx._emitted)
        c.steps.append(
            StepRecord(
                run.run_id,
                path,
                step.name,
                "step",
                "COMPLETED",
                attempt,
                now,
                self.clock.now(),
                output=output,
            )
        )
        c.audit.append(
            AuditEvent(run.run_id, "step_completed", self.clock.now(), path, {"attempt": attempt})
        )
        c.run.cursor = {"frames": frames, "attempt": 1}
        self._settle(c, wf, self._navigator(wf).after(frames, new_state, run.input))
        return self._commit(c)

    def _invoke(
        self, wf: Workflow, run: RunRecord, step: Any, ctx: StepContext
    ) -> tuple[dict[str, Any] | None, Any]:
        """Run one attempt: (new state, output to record), or (None, None) to keep waiting."""
        model = wf.state_model
        timeout = getattr(step, "timeout_s", None)
        if isinstance(step, StandardStep):
            fn = wf.functions[step.function]
            view = stepexec.state_view(run.state, model)
            out = stepexec.call_with_timeout(lambda: fn(view, ctx), timeout)
            if isinstance(out, dict) or out is None:
                stepexec.ensure_json(out)
            return stepexec.apply_output(run.state, out, step.output_key, model), out
        if isinstance(step, ParallelStep):
            res = stepexec.call_with_timeout(
                lambda: stepexec.run_parallel(step, wf.functions, run.state, model, ctx), timeout
            )
            state = res["state"]
            if model is not None:
                state = stepexec.apply_output(state, {}, None, model)
            stepexec.ensure_json(state)
            return state, {"errors": res["errors"]} if res["errors"] else None
        if isinstance(step, HttpStep):
            client = self._http_client()
            out = stepexec.run_http(step, client, run.state, run.input, ctx)
            return stepexec.apply_output(run.state, out, step.output_key or step.name, model), {
                "status": out["status"]
            }
        if isinstance(step, SubWorkflowStep):
            child = self.store.get_run(run.cursor["child"])
            if child is None or not child.status.terminal:
                return None, None
            if child.status is not Status.COMPLETED:
                raise StepError(
                    f"child run {child.run_id} ({child.workflow_type}) ended {child.status}"
                )
            out = child.state
            if step.output_key:
                return stepexec.apply_output(run.state, out, step.output_key, model), {
                    "child": child.run_id
                }
            return stepexec.apply_output(run.state, out, None, model), {"child": child.run_id}
        if isinstance(step, FireAndForgetStep):
            raise AssertionError("FIRE_AND_FORGET is handled before invocation")
        raise AssertionError(f"no executor for step type {type(step).__name__}")

    def _http_client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                self._http = httpx.Client()
            return self._http

    def _settle(self, c: Commit, wf: Workflow, settled: Settled) -> None:
        """Record the pure moves (decisions, loop turns) and where the run now stands.
        FIRE_AND_FORGET steps are settled here too: starting an independent child is just
        an insert in this same transaction."""
        run = c.run
        now = self.clock.now()
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
                        output=d.detail,
                    )
                )
                c.audit.append(AuditEvent(run.run_id, "decision", now, d.path, d.detail))
            run.cursor = {"frames": settled.frames, "attempt": 1}
            if settled.failure is not None:
                name, path, exc = settled.failure
                self._fail(c, wf, name, path, 1, _NO_RETRY, exc, now)
                return
            if not settled.frames:
                self._finish(c, Status.COMPLETED)
                return
            top = wf.steps[settled.frames[-1][0]]
            if not isinstance(top, FireAndForgetStep):
                return
            path = step_path(settled.frames)
            key = idempotency_key(run.run_id, path, 1)
            try:
                child_wf = self._latest(top.workflow)
                child_input = self._child_input(top.input, run)
                child, child_commit = self._new_run(
                    child_wf, child_input, key, lease=False, parent=(run.run_id, None)
                )
            except (TillflowError, ExpressionError) as exc:
                self._fail(c, wf, top.name, path, 1, _NO_RETRY, exc, now)
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
                    output={"child": child.run_id},
                )
            )
            if top.output_key:
                run.state = {**run.state, top.output_key: child.run_id}
            settled = self._navigator(wf).after(settled.frames, run.state, run.input)

    def _fail(
        self,
        c: Commit,
        wf: Workflow,
        name: str,
        path: str,
        attempt: int,
        policy: RetryPolicy,
        exc: BaseException,
        started: float,
    ) -> None:
        run = c.run
        now = self.clock.now()
        err = _error(exc)
        retryable = bool(getattr(exc, "retryable", True))
        if retryable and attempt < policy.max_attempts:
            delay = backoff(policy, attempt, self.rng)
            run.next_attempt_at = now + delay
            run.lease_expires_at = run.next_attempt_at + self.lease_s
            run.cursor["attempt"] = attempt + 1
            c.steps.append(
                StepRecord(
                    run.run_id, path, name, "step", "RETRYING", attempt, started, now, error=err
                )
            )
            c.audit.append(
                AuditEvent(
                    run.run_id,
                    "step_retry_scheduled",
                    now,
                    path,
                    {**err, "attempt": attempt, "delay_s": round(delay, 3)},
                )
            )
            log.info(
                "step %s failed (attempt %d), retry in %.2fs: %s",
                path,
                attempt,
                delay,
                exc,
                extra={"action": "step_retry", "run_id": run.run_id, "step": path},
            )
            return
        c.steps.append(
            StepRecord(run.run_id, path, name, "step", "FAILED", attempt, started, now, error=err)
        )
        c.audit.append(
            AuditEvent(run.run_id, "step_failed", now, path, {**err, "attempt": attempt})
        )
        log.warning(
            "step %s failed for good: %s",
            path,
            exc,
            extra={"action": "step_failed", "run_id": run.run_id, "step": path},
        )
        run.error = {**err, "step": path}
        if wf.definition.saga:
            run.status = Status.COMPENSATING
            run.cursor = {
                "frames": run.cursor.get("frames", []),
                "attempt": 1,
                "compensating": True,
            }
            c.audit.append(AuditEvent(run.run_id, "compensation_started", now, path))
        else:
            self._finish(c, Status.FAILED)

    def _finish(self, c: Commit, status: Status) -> None:
        run = c.run
        run.status = status
        run.lease_owner = None
        run.lease_expires_at = None
        run.next_attempt_at = None
        detail: dict[str, Any] = {}
        if run.error and status is not Status.COMPLETED:
            detail = {"error": run.error}
        c.audit.append(
            AuditEvent(run.run_id, f"run_{status.lower()}", self.clock.now(), None, detail)
        )
        if run.parent_run_id and run.parent_step:
            c.wake.append(run.parent_run_id)
        log.info(
            "run %s %s",
            run.run_id,
            status,
            extra={"action": "run_finished", "run_id": run.run_id, "status": str(status)},
        )

    def _check_code(self, c: Commit, wf: Workflow, paths: list[str | None]) -> None:
        """Versioning: compare the code now to what the run pinned at start."""
        for p in paths:
            if p is None:
                continue
            pinned = c.run.fingerprints.get(p)
            current = wf.fingerprints.get(p)
            if pinned is None or current is None or pinned == current:
                continue
            now = self.clock.now()
            detail = {
                "function": p,
                "pinned": pinned,
                "current": current,
                "policy": wf.definition.on_code_change,
            }
            c.audit.append(AuditEvent(c.run.run_id, "code_changed", now, None, detail))
            if wf.definition.on_code_change == "fail":
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

    # --- WAIT and sub-workflows ----------------------------------------------------------

    def _enter_wait(self, c: Commit, step: WaitStep, path: str, now: float) -> Commit:
        c.run.status = Status.WAITING
        c.run.lease_owner = c.run.lease_expires_at = None
        c.run.next_attempt_at = now + step.timeout_s if step.timeout_s else None
        c.audit.append(
            AuditEvent(c.run.run_id, "waiting", now, path, {"timeout_s": step.timeout_s})
        )
        return c

    def _spawn_child(
        self, c: Commit, wf: Workflow, step: SubWorkflowStep, path: str, attempt: int, now: float
    ) -> Commit:
        key = idempotency_key(c.run.run_id, path, attempt)
        try:
            child_input = self._child_input(step.input, c.run)
            child, child_commit = self._new_run(
                self._latest(step.workflow),
                child_input,
                key,
                lease=False,
                parent=(c.run.run_id, path),
            )
        except (TillflowError, ExpressionError) as exc:
            self._fail(c, wf, step.name, path, attempt, step.retry, exc, now)
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

    @staticmethod
    def _child_input(template: dict[str, Any], run: RunRecord) -> dict[str, Any]:
        """A child's input: the step's ``input`` rendered from state, else a copy of the state."""
        if not template:
            return dict(run.state)
        rendered = render(template, run.state, run.input)
        assert isinstance(rendered, dict)  # rendering a dict gives a dict
        return rendered

    def resume(self, run_id: str, input: dict[str, Any] | None = None) -> None:
        """Answer a WAIT step with ``input`` and continue the run."""
        run = self._get(run_id)
        wf = self._pinned(run)
        frames = run.cursor.get("frames") or []
        step = wf.steps.get(frames[-1][0]) if frames else None
        if run.status is not Status.WAITING or not isinstance(step, WaitStep):
            raise InvalidRunState(f"run {run_id} is {run.status}, not waiting for input")
        data: Any = dict(input or {})
        if step.input_schema:
            try:
                data = wf.models[step.input_schema].model_validate(data).model_dump(mode="json")
            except ValidationError as exc:
                raise InputError(f"input for step '{step.name}' is invalid: {exc}") from exc
        stepexec.ensure_json(data)
        c = self._draft(run)
        c.run.status = Status.RUNNING
        now = self.clock.now()
        path = step_path(frames)
        c.run.state = stepexec.apply_output(run.state, data, step.output_key, wf.state_model)
        c.steps.append(
            StepRecord(run_id, path, step.name, "input", "COMPLETED", 1, now, now, output=data)
        )
        c.audit.append(AuditEvent(run_id, "resumed", now, path))
        self._settle(c, wf, self._navigator(wf).after(frames, c.run.state, run.input))
        try:
            self._commit(c)
        except LeaseLost as exc:
            raise InvalidRunState(f"run {run_id} changed while resuming (resumed twice?)") from exc
        self.executor.submit(run_id, c.run.next_attempt_at)

    def _wait_timed_out(self, wf: Workflow, run: RunRecord) -> RunRecord:
        frames = run.cursor["frames"]
        step = wf.steps[frames[-1][0]]
        path = step_path(frames)
        c = self._draft(run)
        c.run.status = Status.RUNNING
        now = self.clock.now()
        c.steps.append(StepRecord(run.run_id, path, step.name, "timeout", "TIMED_OUT", 1, now, now))
        c.audit.append(AuditEvent(run.run_id, "wait_timed_out", now, path))
        target = step.on_timeout if isinstance(step, WaitStep) else None
        if target:
            self._settle(c, wf, self._navigator(wf).jump(frames, target, run.state, run.input))
        else:
            self._fail(
                c,
                wf,
                step.name,
                path,
                1,
                _NO_RETRY,
                StepError("timed out waiting for input", retryable=False),
                now,
            )
        return self._commit(c)

    # --- saga ----------------------------------------------------------------------------

    def _compensate_next(self, wf: Workflow, run: RunRecord) -> RunRecord:
        history = self.store.step_history(run.run_id)
        done = {r.ref_seq for r in history if r.kind == "compensation" and r.status == "COMPLETED"}
        pending = [
            r
            for r in reversed(history)
            if r.kind == "step"
            and r.status == "COMPLETED"
            and r.seq not in done
            and getattr(wf.steps.get(r.step_name), "compensate", None)
        ]
        c = self._draft(run)
        now = self.clock.now()
        if not pending:
            self._finish(
                c, Status.CANCELLED if run.cursor.get("cancel_reason") else Status.ROLLED_BACK
            )
            return self._commit(c)
        row = pending[0]
        step = wf.steps[row.step_name]
        assert isinstance(step, ActionStep) and step.compensate
        comp_path = step.compensate
        attempt = int(run.cursor.get("attempt", 1))
        ctx = StepContext(
            run_id=run.run_id,
            step=row.step,
            attempt=attempt,
            idempotency_key=idempotency_key(run.run_id, f"compensate:{row.step}", attempt),
            clock=self.clock,
            input=run.input,
            output=row.output,
        )
        try:
            self._check_code(c, wf, [comp_path])
            fn = wf.functions[comp_path]
            view = stepexec.state_view(run.state, wf.state_model)
            out = stepexec.call_with_timeout(
                lambda: fn(view, ctx), getattr(step, "timeout_s", None)
            )
            new_state = stepexec.apply_output(run.state, out, None, wf.state_model)
        except Exception as exc:  # compensation attempt failed
            policy: RetryPolicy = getattr(step, "retry", _NO_RETRY)
            err = _error(exc)
            if getattr(exc, "retryable", True) and attempt < policy.max_attempts:
                delay = backoff(policy, attempt, self.rng)
                c.run.next_attempt_at = now + delay
                c.run.lease_expires_at = c.run.next_attempt_at + self.lease_s
                c.run.cursor["attempt"] = attempt + 1
                c.steps.append(
                    StepRecord(
                        run.run_id,
                        row.step,
                        row.step_name,
                        "compensation",
                        "RETRYING",
                        attempt,
                        now,
                        self.clock.now(),
                        error=err,
                        ref_seq=row.seq,
                    )
                )
                c.audit.append(
                    AuditEvent(
                        run.run_id,
                        "compensation_retry_scheduled",
                        now,
                        row.step,
                        {**err, "attempt": attempt},
                    )
                )
                return self._commit(c)
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
                    self.clock.now(),
                    error=err,
                    ref_seq=row.seq,
                )
            )
            c.audit.append(
                AuditEvent(
                    run.run_id, "compensation_failed", now, row.step, {**err, "uncompensated": left}
                )
            )
            c.run.error = {**(run.error or {}), "compensation_error": err, "uncompensated": left}
            self._finish(c, Status.FAILED)
            return self._commit(c)
        c.run.state = new_state
        c.outbox.extend(ctx._emitted)
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
                self.clock.now(),
                ref_seq=row.seq,
            )
        )
        c.audit.append(AuditEvent(run.run_id, "compensated", now, row.step, {"attempt": attempt}))
        return self._commit(c)

    # --- cancel, recover, inspect --------------------------------------------------------

    def cancel(self, run_id: str, reason: str = "", *, compensate: bool = False) -> None:
        """Stop a run. With ``compensate=True`` its completed steps are compensated first
        (status COMPENSATING, then CANCELLED). A step in flight elsewhere loses its lease."""
        for _ in range(5):
            run = self._get(run_id)
            if run.status.terminal:
                raise InvalidRunState(f"run {run_id} is already {run.status}")
            c = self._draft(run)
            now = self.clock.now()
            c.audit.append(
                AuditEvent(
                    run_id,
                    "cancel_requested",
                    now,
                    None,
                    {"reason": reason, "compensate": compensate},
                )
            )
            c.run.error = {
                "type": "Cancelled",
                "code": "cancelled",
                "message": reason or "cancelled",
            }
            if compensate:
                c.run.status = Status.COMPENSATING
                c.run.cursor = {
                    **c.run.cursor,
                    "attempt": 1,
                    "compensating": True,
                    "cancel_reason": reason,
                }
                c.run.lease_owner = c.run.lease_expires_at = None
            else:
                self._finish(c, Status.CANCELLED)
            try:
                self._commit(c)
            except LeaseLost:
                continue
            if compensate:
                self.executor.submit(run_id)
            return
        raise InvalidRunState(f"run {run_id} kept changing; cancel again")

    def recover(self) -> list[str]:
        """Resume every run whose holder is gone (lease expired, or its process died on
        this host) and every WAITING run whose timeout passed. Returns their ids."""
        now = self.clock.now()
        picked = []
        for run in self.store.recoverable(now):
            held = (
                run.lease_owner is not None
                and run.lease_owner != self.owner
                and (run.lease_expires_at or 0) > now
                and not owner_is_dead(run.lease_owner)
            )
            if held:
                continue
            if run.status is Status.WAITING and (
                run.next_attempt_at is None or run.next_attempt_at > now
            ):
                continue
            if run.status is Status.WAITING and run.cursor.get("child"):
                continue  # waits on its child, which recovers on its own
            claimed = (
                run
                if run.lease_owner == self.owner
                else self.store.claim(run.run_id, run.revision, self.owner, now + self.lease_s)
            )
            if claimed is None:
                continue
            picked.append(run.run_id)
            self.executor.submit(run.run_id, claimed.next_attempt_at)
        log.info(
            "recovered %d run(s)", len(picked), extra={"action": "recover", "count": len(picked)}
        )
        return picked

    def _get(self, run_id: str) -> RunRecord:
        run = self.store.get_run(run_id)
        if run is None:
            raise RunNotFound(
                f"no run {run_id}", hint="tillflow list shows the runs in this database"
            )
        return run

    def get(self, run_id: str) -> RunRecord:
        return self._get(run_id)

    def show(self, run_id: str) -> RunView:
        run = self._get(run_id)
        return RunView(run, self.store.step_history(run_id), list(self.store.audit_rows(run_id)))

    def list_runs(self, status: Status | None = None, limit: int = 100) -> list[RunRecord]:
        return self.store.list_runs([status] if status else None, limit)

    def verify_audit(self) -> ChainReport:
        return verify_chain(self.store.audit_rows(), self.store.audit_head())

    # --- heartbeat -----------------------------------------------------------------------

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None:
            with self._lock:
                if self._heartbeat is None:
                    self._heartbeat = threading.Thread(
                        target=self._beat, name="tillflow-heartbeat", daemon=True
                    )
                    self._heartbeat.start()

    def _beat(self) -> None:
        # Real time on purpose: leases protect against wall-clock stalls of this process.
        while not self._stop.wait(self.lease_s / 3):
            for run_id in list(self._active):
                try:
                    self.store.renew_lease(run_id, self.owner, self.clock.now() + self.lease_s)
                except TillflowError as exc:
                    log.warning(
                        "heartbeat failed for %s: %s",
                        run_id,
                        exc,
                        extra={"action": "heartbeat_failed", "run_id": run_id},
                    )

    def close(self) -> None:
        """Stop the heartbeat; the store stays open (its owner closes it)."""
        self._stop.set()
