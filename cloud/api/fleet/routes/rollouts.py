"""Rollouts (``cloud.rollouts``): a config, fraud-policy or release change pushed to the
fleet in staged waves by a workflow run on the cloud engine (ConfigRollout,
PolicyRollout, ReleaseRollout), which advances on the devices' health and rolls back by
saga. Operate to start one and to steer it (pause, resume, approve, abort,
retry-failed), read to follow it (the rollout with its waves, threshold, rate, abort
and rollback; its devices, paged).

A start is two commits: the rollout row (``service.create``: the request validated, a
malformed document or option a 422 naming the field, nothing written; recorded in the
cloud audit log in the same transaction), then its run (``engine.start``, input
``{"rollout_id"}``, idempotency key ``rollout:<id>``): the run does all the rest of the
writing, in the workers. A control is recorded the same way (``service.control``), then
the run is woken: a run WAITING between two polls is answered (``engine.resume``) so it
reads the control now; any other is submitted to the executor again. A publish to the
broker that fails is logged and the answer is still 201/200: the run is in the
database, and the workers' sweep submits a run no message reached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.fleet.auth import CanOperate, CanRead
from cloud.api.fleet.context import Ctx, FleetContext
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.fields import Clean, Why
from cloud.api.fleet.paging import After, Limit, Page
from cloud.api.fleet.routes.documents import translated
from cloud.rollouts import service
from cloud.rollouts.service import RolloutKind, RolloutRequest
from edge.engine import Status
from edge.errors import InputError, InvalidRunState
from sync import wire

log = logging.getLogger(__name__)

router = APIRouter(tags=["rollouts"])

RolloutStatus = Literal[
    "pending", "running", "paused", "awaiting_approval", "succeeded", "aborting",
    "rolled_back", "failed",
]  # fmt: skip
DeviceStatus = Literal[
    "planned", "held", "notified", "applied", "healthy", "failed", "refused", "timed_out",
    "cancelled",
]  # fmt: skip
Control = Literal["pause", "resume", "approve", "abort", "retry_failed"]
RolloutId = Annotated[
    str, Path(min_length=1, max_length=wire.MAX_FIELD_CHARS, description="ro_..."), Clean
]
#: The most rollout summaries one page holds (each counts its devices).
LIST_PAGE_MAX = 500
#: What a WAIT between two polls is answered with when a control wakes the run.
WAKE_INPUT: dict[str, Any] = {}


class ControlIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Why | None = Field(None, description="why (kept in the audit log)")


# --- what the routes answer (the design's view; a field the service adds is kept) ------------


class _Open(BaseModel):
    """A model of the view that documents its fields and keeps any others it carries."""

    model_config = ConfigDict(extra="allow")


class DocumentOut(_Open):
    kind: str
    version: int | None = Field(description="the version the run made or took (null: not yet)")
    release: str | None = Field(None, description="(release) the release's name")


class ThresholdOut(_Open):
    failure_percent: float
    min_sample_wave: int
    min_sample_total: int
    count: list[str] = Field(description="the failure kinds that count")


class RateOut(_Open):
    failure_percent: float | None
    failures: int
    sampled: int


class WaveOut(_Open):
    wave: int
    size: int = Field(description="devices targeted through this wave (cumulative)")
    targeted: int = Field(description="this wave's own devices")
    notified: int
    applied: int
    healthy: int
    failed: int
    refused: int
    timed_out: int
    pending: int
    cancelled: int
    status: str
    started_at: float | None
    finished_at: float | None


class AbortOut(_Open):
    criterion: str = Field(description="wave_failure_rate, total_failure_rate or operator")
    wave: int | None = None
    figures: dict[str, Any] | None = Field(
        None, description="failures, sampled, failure_percent, threshold"
    )
    at: float | None = None
    by: str | None = None
    reason: str | None = None


class RollbackOut(_Open):
    status: Literal["running", "done"]
    to_restore: int
    restored: int
    failed: int
    timed_out: int
    pending: int


class ControlsOut(_Open):
    paused: bool
    approved_through: int
    abort_requested: bool


class DownloadsOut(_Open):
    devices: int = Field(description="devices whose release_result reported their bytes")
    total: int = Field(description="bytes they downloaded, together")
    mean: int | None = Field(description="per device (null: none reported yet)")
    max: int | None
    restore_devices: int = Field(description="devices that reported a restore's bytes")
    restore_total: int = Field(description="bytes the restores after a rollback downloaded")


class RolloutOut(_Open):
    rollout_id: str
    kind: str
    status: str
    created_at: float
    created_by: str
    run_id: str | None
    run_status: str | None
    updated_at: float
    finished_at: float | None
    document: DocumentOut
    options: dict[str, Any] = Field(description="the options as given, defaults filled in")
    seed: int
    current_wave: int
    threshold: ThresholdOut
    rate: RateOut
    waves: list[WaveOut]
    abort: AbortOut | None
    rollback: RollbackOut | None
    bytes_downloaded: DownloadsOut | None = Field(
        None, description="(release) the bytes sent: what the devices reported downloading"
    )
    controls: ControlsOut


class RolloutSummary(_Open):
    rollout_id: str
    kind: str
    status: str
    created_at: float
    created_by: str
    updated_at: float
    finished_at: float | None
    document: DocumentOut
    current_wave: int
    targeted: int
    abort: AbortOut | None


class RolloutDeviceOut(_Open):
    device_id: str
    store: str
    group: str | None
    wave: int
    status: str
    previous_version: int | None
    command_id: str | None
    notified_at: float | None
    applied_at: float | None
    healthy_at: float | None
    failed_at: float | None
    last_error: str | None
    restore_status: str
    restore_command_id: str | None
    restored_at: float | None
    bytes_downloaded: int | None = Field(
        None, description="(release) what its release_result reported downloading (delta)"
    )
    restore_bytes_downloaded: int | None = Field(
        None, description="(release) what its restore's release_result reported downloading"
    )


# --- text the database cannot hold ---------------------------------------------------------


def _unstorable(value: Any, where: str) -> str | None:
    """The first field of ``value`` holding a NUL or a lone surrogate (PostgreSQL text
    and jsonb take neither), as ``body.a.b``; None if every string is storable."""
    if isinstance(value, str):
        bad = "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
        return where if bad else None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _unstorable(k, where) or _unstorable(v, f"{where}.{k}")
            if found:
                return found
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _unstorable(v, f"{where}.{i}")
            if found:
                return found
    return None


def _check_storable(body: BaseModel) -> None:
    where = _unstorable(body.model_dump(mode="python"), "body")
    if where is not None:
        raise ApiError(
            422, "invalid_value", "must not hold a NUL character or a lone surrogate", field=where
        )


# --- the run: started after the row commits, woken after a control ---------------------------


def start_run(ctx: FleetContext, kind: RolloutKind, rollout_id: str) -> str:
    """Start the rollout's run (or find it: the key makes a second start the same run,
    submitted again). A failed publish is the executor's to log; a store away raises."""
    engine = ctx.engine()
    return engine.start(
        service.workflow_type(kind),
        {"rollout_id": rollout_id},
        idempotency_key=service.run_key(rollout_id),
    )


def wake_run(ctx: FleetContext, kind: RolloutKind, rollout_id: str) -> str:
    """Have the run read a control now. Started if it is not yet (a start whose commit
    was lost); answered if it WAITs between polls; else submitted to the executor (a
    run that sleeps through a backoff in a worker keeps its lease there and reads the
    control at its next poll)."""
    engine = ctx.engine()
    run_id = start_run(ctx, kind, rollout_id)  # submits an existing run once more
    if engine.get(run_id).status is not Status.WAITING:
        return run_id
    try:
        engine.resume(run_id, dict(WAKE_INPUT))
    except (InvalidRunState, InputError) as exc:  # moved on meanwhile: the submit serves
        log.info(
            "rollout %s: run %s not resumed (%s)", rollout_id, run_id, exc,
            extra={"action": "rollout_wake_skipped", "run_id": run_id},
        )  # fmt: skip
        return run_id
    # resume leaves the run leased to this process, which never advances it: let the
    # lease go so a worker may claim it at once, then tell the workers
    engine.store.renew_lease(run_id, engine.owner, engine.clock.now())
    engine.executor.submit(run_id)
    return run_id


def _started(ctx: FleetContext, kind: RolloutKind, rollout_id: str) -> None:
    try:
        run_id = start_run(ctx, kind, rollout_id)
    except Exception as exc:  # the store away, the engine not made: say so, rollout named
        log.error(
            "rollout %s recorded but its run was not started: %s: %s",
            rollout_id, type(exc).__name__, exc,
            extra={"action": "rollout_run_not_started"},
        )  # fmt: skip
        raise ApiError(
            503,
            "run_not_started",
            f"rollout {rollout_id} is recorded (pending) but its run could not be started "
            f"({type(exc).__name__}); a control on it starts the run: POST "
            f"/api/v1/rollouts/{rollout_id}/pause then /resume, or /abort to drop it",
        ) from None
    log.info(
        "rollout %s: run %s started", rollout_id, run_id,
        extra={"action": "rollout_started", "run_id": run_id},
    )  # fmt: skip


def _create(ctx: FleetContext, kind: RolloutKind, body: RolloutRequest, who: Any) -> RolloutOut:
    _check_storable(body)
    with translated(), ctx.transaction() as conn:
        rollout_id = service.create(conn, kind, body, who, at=ctx.clock.now())
    _started(ctx, kind, rollout_id)
    with translated(), ctx.transaction() as conn:
        return RolloutOut.model_validate(service.view(conn, rollout_id, now=ctx.clock.now()))


# --- starting -------------------------------------------------------------------------------


@router.post("/api/v1/config/rollout", status_code=201)
def config_rollout(body: RolloutRequest, who: CanOperate, ctx: Ctx) -> RolloutOut:
    """Roll a config out: new ``content`` (validated with the terminal's model) or an
    existing ``version``, to the devices ``target`` selects, in ``waves``; the answer is
    the rollout (status pending: its run has just started)."""
    return _create(ctx, "config", body, who)


@router.post("/api/v1/policy/rollout", status_code=201)
def policy_rollout(body: RolloutRequest, who: CanOperate, ctx: Ctx) -> RolloutOut:
    """Roll a fraud policy out: new ``content`` or an existing ``version``."""
    return _create(ctx, "policy", body, who)


@router.post("/api/v1/release/rollout", status_code=201)
def release_rollout(body: RolloutRequest, who: CanOperate, ctx: Ctx) -> RolloutOut:
    """Roll a terminal release out: ``release``, the name of an uploaded bundle."""
    return _create(ctx, "release", body, who)


# --- following ------------------------------------------------------------------------------


@router.get("/api/v1/rollouts")
def list_rollouts(
    who: CanRead,
    ctx: Ctx,
    kind: Literal["config", "policy", "release"] | None = None,
    status: RolloutStatus | None = None,
    limit: Limit = 50,
    after: After = None,
) -> Page[RolloutSummary]:
    """Rollouts, newest first (a summary each); every filter given must match. A page
    holds at most ``LIST_PAGE_MAX`` (a longer ``limit`` gives that many, and ``next``)."""
    with translated(), ctx.transaction() as conn:
        found = service.rollouts(
            conn, kind=kind, status=status, after=after, limit=min(limit, LIST_PAGE_MAX)
        )
    return Page[RolloutSummary].model_validate(found)


@router.get("/api/v1/rollouts/{rollout_id}")
def get_rollout(rollout_id: RolloutId, who: CanRead, ctx: Ctx) -> RolloutOut:
    """Everything about one rollout: per wave targeted, notified, applied, healthy,
    failed, refused, timed out, pending; the threshold and the current rate; why it
    aborted (criterion, figures) and how far the rollback has got; the controls."""
    with translated(), ctx.transaction() as conn:
        return RolloutOut.model_validate(service.view(conn, rollout_id, now=ctx.clock.now()))


@router.get("/api/v1/rollouts/{rollout_id}/devices")
def rollout_devices(
    rollout_id: RolloutId,
    who: CanRead,
    ctx: Ctx,
    wave: Annotated[int | None, Query(ge=1, le=10_000)] = None,
    status: DeviceStatus | None = None,
    limit: Limit = 100,
    after: After = None,
) -> Page[RolloutDeviceOut]:
    """A rollout's devices: wave, status with its timestamps, last error, restore."""
    with translated(), ctx.transaction() as conn:
        found = service.devices(
            conn, rollout_id, wave=wave, status=status, after=after, limit=limit
        )
    return Page[RolloutDeviceOut].model_validate(found)


# --- steering -------------------------------------------------------------------------------


def _control(action: Control) -> Callable[..., RolloutOut]:
    def steer(
        rollout_id: RolloutId,
        who: CanOperate,
        ctx: Ctx,
        body: Annotated[ControlIn | None, Body()] = None,
    ) -> RolloutOut:
        reason = None if body is None else body.reason
        try:  # first: its store's tables are there before the rollout's run is read
            ctx.engine()
        except Exception as exc:  # the control is recorded anyway; the run reads it
            log.warning(
                "rollout %s: no engine to wake the run with: %s: %s",
                rollout_id, type(exc).__name__, exc, extra={"action": "rollout_no_engine"},
            )  # fmt: skip
        with translated(), ctx.transaction() as conn:
            view = service.control(conn, rollout_id, action, who, at=ctx.clock.now(), reason=reason)
        try:
            wake_run(ctx, view["kind"], rollout_id)
        except Exception as exc:  # recorded: the run reads it at its next poll anyway
            log.warning(
                "rollout %s: %s recorded, the run not woken: %s: %s",
                rollout_id, action, type(exc).__name__, exc,
                extra={"action": "rollout_wake_failed"},
            )  # fmt: skip
        return RolloutOut.model_validate(view)

    steer.__name__ = f"rollout_{action}"
    return steer


_WHAT = {
    "pause": "pause after the devices notified so far (none more is notified)",
    "resume": "go on from a pause",
    "approve": "let the next wave start (a gate after a wave: gates.approve_after)",
    "abort": "stop and roll back by saga: every device that took the change is restored",
    "retry_failed": "notify the failed and timed-out devices again (paused or finished "
    "with failures)",
}
for _action, _what in _WHAT.items():
    router.post(
        f"/api/v1/rollouts/{{rollout_id}}/{_action.replace('_', '-')}",
        summary=f"{_action.replace('_', ' ')} a rollout",
        description=f"{_what[0].upper()}{_what[1:]}; recorded in the audit log, then the run "
        "is woken. A control the rollout's status does not allow is 409 rollout_state.",
    )(_control(_action))  # type: ignore[arg-type]
