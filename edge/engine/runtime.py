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
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from edge.engine import newrun, outcomes, saga, settle, waits
from edge.engine import steps as stepexec
from edge.engine.audit import ChainReport, verify_streams
from edge.engine.clock import Clock, SystemClock
from edge.engine.context import StepContext, idempotency_key, operation_key
from edge.engine.definition import ActionStep, SubWorkflowStep, WaitStep
from edge.engine.executor import InlineExecutor
from edge.engine.lease import Heartbeat, make_owner, owner_is_dead
from edge.engine.loader import Workflow
from edge.engine.navigation import Frames, Settled, step_path
from edge.engine.outcomes import NO_RETRY
from edge.engine.ports import Executor, Store
from edge.engine.records import AuditEvent, Commit, RunRecord, RunView, Status, StepRecord
from edge.engine.registry import Registry
from edge.errors import (
    InputError,
    InvalidRunState,
    LeaseLost,
    LimitExceeded,
    RunNotFound,
    StepError,
)

if TYPE_CHECKING:  # httpx is imported by the first HTTP step, not by the idle daemon
    import httpx

log = logging.getLogger(__name__)

#: Seconds a worker's claim on a run lasts without a heartbeat. Long enough that a busy
#: step never loses it; a crashed holder on THIS host is detected at once regardless.
DEFAULT_LEASE_S = 30.0

#: Times a step is run again after its guard was refused before it fails: a step that
#: reads the counters first decides differently on the second run; a third refusal
#: means it ignores them.
GUARD_RERUNS = 3


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
        services: Any = None,
    ) -> None:
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.owner = owner or make_owner()
        self.lease_s = lease_s
        self._http = http_client
        self._new_id = new_id or (lambda: uuid.uuid4().hex)
        #: Handed to every step as ``ctx.services`` (the terminal's ports, policy, keys):
        #: opaque to the engine. A Mapping is copied (as it always was); none is an empty
        #: object.
        self.services: Any = SimpleNamespace() if services is None else services
        if isinstance(services, Mapping):
            self.services = dict(services)
        self.executor: Executor = executor if executor is not None else InlineExecutor()
        self.registry = Registry(store, self.clock)
        #: Runs this engine committed last and still holds: no re-read before the next
        #: step. Safe because every commit is a compare-and-set on the revision.
        self._hot: dict[str, RunRecord] = {}
        #: The validated state-model instance of a run's current revision.
        self._views: dict[str, tuple[int, BaseModel]] = {}
        #: Guard refusals in a row per run (see _guard_refused).
        self._refusals: dict[str, int] = {}
        #: Runs a thread of this engine is advancing right now: one thread per run.
        self._driving: set[str] = set()
        #: Runs taken over from a holder that died or let its lease expire, until their
        #: next commit: the attempt in flight may have run there (``StepContext.replay``).
        self._taken_over: set[str] = set()
        self._heartbeat = Heartbeat(store, self.owner, self.clock, lease_s)
        self._lock = threading.Lock()
        self.executor.bind(self)

    # --- definitions and starting ---------------------------------------------------------

    def register(self, workflow: Workflow | str | Path) -> Workflow:
        """Make a definition the current one for its type (new runs only; running runs
        keep the definition they started with)."""
        return self.registry.register(workflow)

    def start(
        self,
        workflow_type: str,
        input: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> str:
        """Start a run and hand it to the executor; the same key returns the same run."""
        wf = self.registry.latest(workflow_type)
        # Lease at birth only if this thread will advance it now; else leave it claimable.
        lease = self.executor.advances_in_caller
        run, commit = self._new_run(wf, dict(input or {}), idempotency_key, lease=lease)
        run_id, created = self.store.start(commit)
        if created:
            log.info(
                "run %s started (%s)",
                run_id,
                workflow_type,
                extra={"action": "run_started", "run_id": run_id, "workflow": workflow_type},
            )
            self._remember(run)
            self.executor.submit(run_id)
            for child in commit.new_runs:  # FIRE_AND_FORGET steps settled at the start
                self.executor.submit(child.run_id)
        else:
            # A retry of a request whose run a crash left in flight: drive it if nobody
            # live holds it (advance checks), instead of waiting for recover().
            self.executor.submit(run_id)
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
        return newrun.new_run(
            wf,
            run_input,
            run_id=self._new_id(),
            key=key,
            now=now,
            lease=(self.owner, now + self.lease_s) if lease else None,
            parent=parent,
            nav=self.registry.navigator(wf),
            new_child=self._new_child,
        )

    def _new_child(
        self, workflow_type: str, input: dict[str, Any], key: str, parent: tuple[str, str | None]
    ) -> tuple[RunRecord, Commit]:
        """A child run, unleased, of the latest definition of its type (``settle.NewChild``)."""
        wf = self.registry.latest(workflow_type)
        return self._new_run(wf, input, key, lease=False, parent=parent)

    # --- driving -------------------------------------------------------------------------

    def advance(self, run_id: str, claimed: RunRecord | None = None) -> None:
        """Advance a run as far as it can go now. A run left sleeping through a retry
        backoff is handed to the executor, ``submit(run_id, due)``; one that finished,
        waits, or is not ours is left as it is.
        ``claimed``: the run as a claim by this engine just returned it (saves a read)."""
        due = self._drive(run_id, claimed)
        if due is not None:  # submitted once this thread no longer drives it
            self.executor.submit(run_id, due)

    def _drive(self, run_id: str, claimed: RunRecord | None) -> float | None:
        """``advance``'s loop: when the run is next due if it sleeps through a backoff."""
        with self._lock:
            if run_id in self._driving:  # another thread of this engine is on it
                return None
            self._driving.add(run_id)
        try:
            run = claimed if claimed is not None else self._acquire(run_id)
        except BaseException:
            self._driving.discard(run_id)
            raise
        if run is None:
            self._driving.discard(run_id)
            return None
        self._heartbeat.hold(run_id)
        try:
            wf = self.registry.pinned(run)
            while True:
                now = self.clock.now()
                if run.status.terminal:
                    return None
                if run.status is Status.WAITING:
                    if run.next_attempt_at is None or run.next_attempt_at > now:
                        return None
                    run = self._timed_out(wf, run)
                    continue
                if run.next_attempt_at is not None and run.next_attempt_at > now:
                    return run.next_attempt_at
                if run.status is Status.COMPENSATING:
                    run = self._compensate(wf, run)
                else:
                    run = self._step(wf, run)
        except LeaseLost as exc:
            self._forget(run_id)
            log.warning("lease lost: %s", exc, extra={"action": "lease_lost", "run_id": run_id})
            return None
        finally:
            self._heartbeat.release(run_id)
            self._driving.discard(run_id)

    def _acquire(self, run_id: str) -> RunRecord | None:
        hot = self._hot.get(run_id)
        if hot is not None:
            return hot
        run = self._get(run_id)
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
        waiting = run.status is Status.WAITING
        if waiting and (run.next_attempt_at is None or run.next_attempt_at > now):
            return None  # nothing to do until input, a child, or the timeout
        return self._claim(run, now)

    def _claim(self, run: RunRecord, now: float) -> RunRecord | None:
        """Claim a run nobody live holds; remember a takeover from another holder."""
        claimed = self.store.claim(run.run_id, run.revision, self.owner, now + self.lease_s)
        if claimed is not None and run.lease_owner not in (None, self.owner):
            self._taken_over.add(run.run_id)
        return claimed

    def draft(self, run: RunRecord) -> Commit:
        """A Commit that replaces ``run`` at its next revision, still leased to us."""
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

    def commit(self, c: Commit) -> RunRecord:
        """Apply ``c`` in one transaction, then hand any runs it made runnable to the executor."""
        try:
            self.store.commit(c)
        except BaseException:
            self._forget(c.run.run_id)
            raise
        self._taken_over.discard(c.run.run_id)
        self._remember(c.run)
        for child in c.new_runs:
            self.executor.submit(child.run_id)
        for parent in c.wake:
            self.executor.submit(parent)
        return c.run

    def _remember(self, run: RunRecord) -> None:
        if run.lease_owner == self.owner and not run.status.terminal:
            self._hot[run.run_id] = run
        else:
            self._forget(run.run_id)

    def _forget(self, run_id: str) -> None:
        self._hot.pop(run_id, None)
        self._views.pop(run_id, None)

    def _step(self, wf: Workflow, run: RunRecord) -> RunRecord:
        frames: Frames = run.cursor["frames"]
        step = wf.steps[frames[-1][0]]
        path = step_path(frames)
        attempt = int(run.cursor.get("attempt", 1))
        c = self.draft(run)
        now = self.clock.now()
        if isinstance(step, WaitStep):
            return self.commit(waits.enter_wait(c, step, path, now))
        if isinstance(step, SubWorkflowStep) and not run.cursor.get("child"):
            spawned = waits.spawn_child(
                c, wf, step, path, attempt, now, self._new_child, self.rng, self.lease_s
            )
            return self.commit(spawned)
        item, index = self.registry.navigator(wf).item_at(frames, run.state, run.input)
        policy = step.retry if isinstance(step, ActionStep) else NO_RETRY
        ctx = StepContext(
            run_id=run.run_id,
            step=path,
            attempt=attempt,
            idempotency_key=idempotency_key(run.run_id, path, attempt),
            operation_key=operation_key(run.run_id, path),
            clock=self.clock,
            input=run.input,
            item=item,
            index=index,
            last_attempt=not policy.allows_retry_after(attempt),
            replay=run.run_id in self._taken_over,
            services=self.services,
        )
        functions = [getattr(step, "function", None)] + [
            t.function for t in getattr(step, "tasks", [])
        ]
        try:
            outcomes.check_code(c, wf, functions, now)
            new_state, instance, output = stepexec.invoke(
                step, wf, run, ctx, self._state_view, self._http_client, self.store.get_run
            )
        except Exception as exc:  # the attempt failed; its retry policy decides what next
            if isinstance(exc, LeaseLost):
                raise
            end = self.clock.now()
            if isinstance(step, SubWorkflowStep):
                c.run.cursor.pop("child", None)
            if not outcomes.schedule_retry(
                c, "step", step.name, path, attempt, policy, exc, now, end, self.rng, self.lease_s
            ):
                outcomes.fail_step(c, wf, step.name, path, attempt, exc, now, end)
            return self.commit(c)
        if new_state is None:  # a sub-workflow's child is still running
            c.run.status = Status.WAITING
            c.run.lease_owner = c.run.lease_expires_at = None
            return self.commit(c)
        end = self.clock.now()
        c.run.state = new_state
        c.outbox.extend(ctx._emitted)
        c.guards.extend(ctx._guards)
        c.steps.append(
            StepRecord(
                run.run_id,
                path,
                step.name,
                "step",
                "COMPLETED",
                attempt,
                now,
                end,
                output,
                operation_key=ctx.operation_key,
            )
        )
        c.audit.append(AuditEvent(run.run_id, "step_completed", end, path, {"attempt": attempt}))
        c.run.cursor = {"frames": frames, "attempt": 1}
        self._settle(c, wf, self.registry.navigator(wf).after(frames, new_state, run.input))
        try:
            committed = self.commit(c)
        except LimitExceeded as exc:
            return self._guard_refused(wf, run, step.name, path, attempt, exc, now)
        self._refusals.pop(run.run_id, None)
        if instance is not None and committed.run_id in self._hot:
            self._views[committed.run_id] = (committed.revision, instance)
        return committed

    def _guard_refused(
        self,
        wf: Workflow,
        run: RunRecord,
        name: str,
        path: str,
        attempt: int,
        exc: LimitExceeded,
        started: float,
    ) -> RunRecord:
        """A guard of the step's outcome would pass its cap; nothing was committed.

        Run the step again against the new totals (it is expected to decide differently,
        e.g. decline); a step refused ``GUARD_RERUNS`` times in a row fails with the reason.
        """
        refused = self._refusals.get(run.run_id, 0) + 1
        if refused < GUARD_RERUNS:
            self._refusals[run.run_id] = refused
            log.info(
                "step %s refused by guard (%s); running it again",
                path,
                exc.reason,
                extra={"action": "guard_refused", "run_id": run.run_id, "step": path},
            )
            return run
        self._refusals.pop(run.run_id, None)
        c = self.draft(run)
        outcomes.fail_step(c, wf, name, path, attempt, exc, started, self.clock.now())
        c.run.error = {**(c.run.error or {}), "reason": exc.reason}
        return self.commit(c)

    def _state_view(self, wf: Workflow, run: RunRecord) -> Any:
        cached = self._views.pop(run.run_id, None)
        if cached is not None and cached[0] == run.revision:
            return cached[1]
        return stepexec.state_view(run.state, wf.state_model)

    def _http_client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                import httpx  # here, not at import: ~13 MB and 36 ms nothing idle needs

                self._http = httpx.Client()
            return self._http

    def _settle(self, c: Commit, wf: Workflow, settled: Settled) -> None:
        nav = self.registry.navigator(wf)
        settle.settle(c, wf, nav, settled, self.clock.now(), self._new_child)

    def _timed_out(self, wf: Workflow, run: RunRecord) -> RunRecord:
        c = self.draft(run)
        nav = self.registry.navigator(wf)
        return self.commit(waits.wait_timed_out(c, wf, nav, self.clock.now(), self._new_child))

    # --- saga ------------------------------------------------------------------------------

    def _compensate(self, wf: Workflow, run: RunRecord) -> RunRecord:
        """Run (one attempt of) the next compensation, or end the run when none is left."""
        pending = saga.pending_compensations(wf, self.store.step_history(run.run_id))
        c = self.draft(run)
        now = self.clock.now()
        if not pending:
            return self.commit(saga.undone(c, now))
        row = pending[0]
        step = wf.steps[row.step_name]
        assert isinstance(step, ActionStep) and step.compensate
        attempt = int(run.cursor.get("attempt", 1))
        ctx = saga.compensation_context(
            run,
            row,
            attempt,
            self.clock,
            last_attempt=not step.compensation_retry.allows_retry_after(attempt),
            replay=run.run_id in self._taken_over,
            services=self.services,
        )
        try:
            outcomes.check_code(c, wf, [step.compensate], now)
            new_state = stepexec.compensate(step, wf, run, ctx)
        except Exception as exc:  # this compensation attempt failed; its policy decides
            end = self.clock.now()
            saga.compensation_failed(c, wf, pending, ctx, exc, now, end, self.rng, self.lease_s)
            return self.commit(c)
        return self.commit(saga.compensated(c, row, ctx, new_state, now, self.clock.now()))

    # --- WAIT and sub-workflows ----------------------------------------------------------

    def resume(self, run_id: str, input: dict[str, Any] | None = None) -> None:
        """Answer a WAIT step with ``input`` and continue the run."""
        run = self._get(run_id)
        wf = self.registry.pinned(run)
        frames = run.cursor.get("frames") or []
        step = wf.steps.get(frames[-1][0]) if frames else None
        if run.status is not Status.WAITING or not isinstance(step, WaitStep):
            raise InvalidRunState(f"run {run_id} is {run.status}, not waiting for input")
        data: dict[str, Any] = dict(input or {})
        if step.input_schema:
            try:
                data = wf.models[step.input_schema].model_validate(data).model_dump(mode="json")
            except ValidationError as exc:
                problem = stepexec.validation_problem(exc)
                raise InputError(f"input for step '{step.name}' is invalid: {problem}") from None
        c = self.draft(run)
        c.run.status = Status.RUNNING
        now = self.clock.now()
        path = step_path(frames)
        try:
            c.run.state, _ = stepexec.apply_output(run.state, data, step.output_key, wf.state_model)
        except StepError as exc:  # its message names fields, never their values
            raise InputError(f"input for step '{step.name}' is invalid: {exc.message}") from None
        c.steps.append(
            StepRecord(
                run_id,
                path,
                step.name,
                "input",
                "COMPLETED",
                1,
                now,
                now,
                data,
                operation_key=operation_key(run_id, path),
            )
        )
        c.audit.append(AuditEvent(run_id, "resumed", now, path))
        self._settle(c, wf, self.registry.navigator(wf).after(frames, c.run.state, run.input))
        try:
            self.commit(c)
        except LeaseLost as exc:
            raise InvalidRunState(f"run {run_id} changed while resuming (resumed twice?)") from exc
        self.executor.submit(run_id, c.run.next_attempt_at)

    # --- cancel, recover, inspect --------------------------------------------------------

    def cancel(self, run_id: str, reason: str = "", *, compensate: bool = False) -> None:
        """Stop a run. With ``compensate=True`` its completed steps are compensated first
        (status COMPENSATING, then CANCELLED). A step in flight elsewhere loses its lease."""
        for _ in range(5):
            run = self._get(run_id)
            if run.status.terminal:
                raise InvalidRunState(f"run {run_id} is already {run.status}")
            c = saga.cancelled(self.draft(run), reason, compensate, self.clock.now())
            try:
                self.commit(c)
            except LeaseLost:
                continue
            if compensate:
                self.executor.submit(run_id)
            return
        raise InvalidRunState(f"run {run_id} kept changing; cancel again")

    def recover(self, *, unleased: bool = True) -> list[str]:
        """Resume every run whose holder is gone (lease expired, or its process died on
        this host) and every WAITING run whose timeout passed. Returns their ids.

        ``unleased``: also take runs nobody ever claimed (children, woken parents, runs
        started for workers). A terminal wants them (nothing else will run them); a
        cloud worker leaves them to ``claim_due``, which shares them out in batches.
        """
        now = self.clock.now()
        picked = []
        for run in self.store.recoverable(now):
            if run.lease_owner is None and not unleased:
                continue
            if run.run_id in self._driving:
                continue  # a thread of this engine is on it right now
            held = (
                run.lease_owner is not None
                and run.lease_owner != self.owner
                and (run.lease_expires_at or 0) > now
                and not owner_is_dead(run.lease_owner)
            )
            waiting = run.status is Status.WAITING
            if held or (waiting and (run.next_attempt_at is None or run.next_attempt_at > now)):
                continue
            if waiting and run.cursor.get("child"):
                continue  # waits on its child, which recovers on its own
            taken_over = run.lease_owner not in (None, self.owner)
            claimed = run if run.lease_owner == self.owner else self._claim(run, now)
            if claimed is None:
                continue
            self._forget(run.run_id)
            picked.append(run.run_id)
            if taken_over:
                log.info(
                    "recovered run %s from %s (%s)",
                    run.run_id,
                    run.lease_owner,
                    run.status,
                    extra={"action": "recovered", "run_id": run.run_id},
                )
            else:  # our own retry whose backoff ended, a WAIT timeout, an unclaimed run
                log.debug("resuming run %s", run.run_id, extra={"action": "resume_due"})
            self.executor.submit(run.run_id, claimed.next_attempt_at)
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
        heads = self.store.audit_heads()
        kept = {s: self.store.audit_retention(s) for s in heads}
        bases = {s: (k.base_seq, k.base_hash) for s, k in kept.items() if k and k.base_seq}
        return verify_streams(self.store.audit_rows(), heads, bases)

    def close(self) -> None:
        """Stop the heartbeat; the store stays open (its owner closes it)."""
        self._heartbeat.stop()
