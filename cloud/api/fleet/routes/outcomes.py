"""Unknown outcomes (read): every authorisation or refund a terminal reported with its
answer lost, open until the acquirer's truth is recorded and sent to the terminal, with
its age, so nothing stays unknown silently. Filters: ``state`` (open, resolved),
``device_id``; paged by the order they were found."""

from __future__ import annotations

import threading
import weakref
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict

from cloud import outcomes as outcomes_schema
from cloud.api.fleet.auth import CanRead
from cloud.api.fleet.context import Ctx, FleetContext
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.paging import DEFAULT_LIMIT, After, Limit, Page, page
from cloud.outcomes import store
from cloud.outcomes._sql import Conn

router = APIRouter(tags=["unknown outcomes"])

OutcomeId = Annotated[
    str, Path(pattern=r"^out_[0-9a-f]{32}$", description="the outcome's id (out_...)")
]

_migrated: weakref.WeakSet[object] = weakref.WeakSet()
_migrating = threading.Lock()


def _ready(ctx: FleetContext, conn: Conn) -> None:
    """The outcomes table, migrated once per pool if ``serve`` has not (a new database)."""
    if ctx.pool in _migrated:
        return
    with _migrating:
        outcomes_schema.migrate(conn)
        _migrated.add(ctx.pool)


class OutcomeOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome_id: str
    device_id: str
    #: The operation's idempotency key, as the acquirer knows it.
    key: str
    operation: Literal["authorization", "refund"]
    #: The terminal's run the operation belongs to.
    run_id: str
    amount_minor: int | None
    currency: str | None
    #: open: the truth is not known yet; resolved: looked up, recorded and sent.
    state: Literal["open", "resolved"]
    #: When the terminal recorded the unknown outcome (its clock), and when the cloud
    #: found it.
    reported_at: float
    found_at: float
    #: Seconds since the terminal reported it (as of now).
    age_s: float
    #: Seconds it has been (or was) open in the cloud: found to resolved, or to now.
    open_for_s: float
    resolve_run_id: str | None
    #: The acquirer's truth: approved, declined, reversed (an authorisation a reversal
    #: released), not_found (the acquirer never saw the key).
    status: Literal["approved", "declined", "reversed", "not_found"] | None
    acquirer_ref: str | None
    resolved_at: float | None
    #: The resolve_outcome command that tells the terminal, and where it stands
    #: (queued, delivered, applied, refused, expired); ``command_note``: why none was
    #: sent (device_revoked, unknown_device).
    command_id: str | None
    command_status: str | None
    command_reason: str | None
    command_note: str | None


class OutcomeDetail(OutcomeOut):
    #: The acquirer's answer, as it was.
    lookup: dict[str, Any] | None


def _fields(row: store.OutcomeRow, now: float) -> dict[str, Any]:
    return {
        "outcome_id": row.outcome_id,
        "device_id": row.device_id,
        "key": row.key,
        "operation": row.operation,
        "run_id": row.run_id,
        "amount_minor": row.amount_minor,
        "currency": row.currency,
        "state": row.state,
        "reported_at": row.reported_at,
        "found_at": row.found_at,
        "age_s": max(0.0, now - row.reported_at),
        "open_for_s": max(0.0, (row.resolved_at or now) - row.found_at),
        "resolve_run_id": row.resolve_run_id,
        "status": row.status,
        "acquirer_ref": row.acquirer_ref,
        "resolved_at": row.resolved_at,
        "command_id": row.command_id,
        "command_status": row.command_status,
        "command_reason": row.command_reason,
        "command_note": row.command_note,
    }


def _cursor(after: str | None) -> int | None:
    if after is None:
        return None
    if not after.isdigit() or len(after) > 18:
        raise ApiError(422, "invalid_request", "after is not a cursor of this list", field="after")
    return int(after)


@router.get("/api/v1/outcomes")
def list_outcomes(
    who: CanRead,
    ctx: Ctx,
    state: Annotated[
        Literal["open", "resolved"] | None, Query(description="open or resolved")
    ] = None,
    device_id: Annotated[str | None, Query(max_length=256, description="one device")] = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[OutcomeOut]:
    cursor = _cursor(after)
    with ctx.transaction() as conn:
        _ready(ctx, conn)
        rows = store.outcomes(conn, state=state, device_id=device_id, after=cursor, limit=limit + 1)
    now = ctx.clock.now()
    items, nxt = page(rows, limit, lambda r: str(r.outcome_no))
    return Page[OutcomeOut](items=[OutcomeOut(**_fields(r, now)) for r in items], next=nxt)


@router.get("/api/v1/outcomes/{outcome_id}")
def get_outcome(outcome_id: OutcomeId, who: CanRead, ctx: Ctx) -> OutcomeDetail:
    with ctx.transaction() as conn:
        _ready(ctx, conn)
        row = store.outcome(conn, outcome_id)
    if row is None:
        raise ApiError(404, "outcome_not_found", f"no outcome {outcome_id}", field="outcome_id")
    return OutcomeDetail(**_fields(row, ctx.clock.now()), lookup=row.lookup)
