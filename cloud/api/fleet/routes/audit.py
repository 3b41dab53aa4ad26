"""Audit (audit): a device's audit rows as the cloud holds them, paged, and their
re-verification; the cloud's own audit log of operator actions, paged, and its
verification (the first broken link)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from cloud.api.fleet.auth import CanAudit
from cloud.api.fleet.context import Ctx
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.fields import Clean, DeviceId
from cloud.api.fleet.paging import DEFAULT_LIMIT, After, Limit, Page, page
from cloud.fleet import audit, devices
from sync import wire

router = APIRouter(tags=["audit"])


class DeviceAuditOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream: str
    chain: int
    seq: int
    run_id: str | None
    event: str
    step: str | None
    detail: dict[str, Any]
    at: float
    prev_hash: str
    hash: str
    version: int


class ChainCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream: str
    chain: int
    ok: bool
    rows: int
    head_seq: int
    first_bad_seq: int | None
    reason: str | None
    #: The break was found when the rows came in (they never reached the store).
    recorded_at_ingest: bool


class DeviceVerification(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str
    ok: bool
    chains: list[ChainCheck]


class CloudAuditOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq: int
    at: float
    actor: str
    actor_token: str | None
    actor_role: str | None
    action: str
    target: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str
    version: int


class CloudVerification(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ok: bool
    rows: int
    first_bad_seq: int | None
    reason: str | None


@router.get("/api/v1/devices/{device_id}/audit")
def device_audit(
    device_id: DeviceId,
    who: CanAudit,
    ctx: Ctx,
    stream: Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$")] = None,
    chain: Annotated[int | None, Query(ge=0, le=wire.MAX_INT64)] = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[DeviceAuditOut]:
    """The device's audit rows in (stream, chain, seq) order; ``next`` is
    ``STREAM:CHAIN:SEQ`` of the last row."""
    cursor = devices.parse_audit_cursor(after)
    if cursor is None:
        raise ApiError(422, "invalid_cursor", "after must be a page's next", field="query.after")
    with ctx.transaction() as conn:
        if devices.lock(conn, device_id) is None:
            message = f"no device {device_id[:80]}"
            raise ApiError(404, "device_not_found", message, field="device_id")
        rows = devices.audit_rows(
            conn, device_id, stream=stream, chain=chain, after=cursor, limit=limit + 1
        )
    items, nxt = page(rows, limit, lambda r: r.cursor())
    return Page[DeviceAuditOut](items=[DeviceAuditOut(**r.__dict__) for r in items], next=nxt)


@router.get("/api/v1/devices/{device_id}/audit/verify")
def verify_device_audit(device_id: DeviceId, who: CanAudit, ctx: Ctx) -> DeviceVerification:
    """Every chain the cloud holds for the device, re-checked row by row from its base."""
    report = ctx.sync.verify_device_audit(device_id)
    return DeviceVerification(
        device_id=device_id,
        ok=report.ok,
        chains=[
            ChainCheck(
                stream=c.stream,
                chain=c.chain,
                ok=c.ok,
                rows=c.rows,
                head_seq=c.head_seq,
                first_bad_seq=c.first_bad_seq,
                reason=c.reason,
                recorded_at_ingest=c.recorded,
            )
            for c in report.chains
        ],
    )


@router.get("/api/v1/audit")
def cloud_audit(
    who: CanAudit,
    ctx: Ctx,
    action: Annotated[str | None, Query(min_length=1, max_length=200), Clean] = None,
    actor: Annotated[str | None, Query(min_length=1, max_length=200), Clean] = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[CloudAuditOut]:
    """The cloud's audit log in seq order (``after``: a seq)."""
    if after is not None and not (after.isdigit() and len(after) <= 18):
        raise ApiError(422, "invalid_cursor", "after must be a page's next", field="query.after")
    with ctx.transaction() as conn:
        rows = audit.rows(conn, after=int(after or 0), limit=limit + 1, action=action, actor=actor)
    items, nxt = page(rows, limit, lambda r: str(r.seq))
    return Page[CloudAuditOut](items=[CloudAuditOut(**r.__dict__) for r in items], next=nxt)


@router.get("/api/v1/audit/verify")
def verify_cloud_audit(who: CanAudit, ctx: Ctx) -> CloudVerification:
    """Every row of the cloud's audit log re-hashed from genesis to the head it keeps."""
    with ctx.transaction() as conn:
        report = audit.verify(conn)
    return CloudVerification(
        ok=report.ok, rows=report.rows, first_bad_seq=report.broken_at, reason=report.reason
    )
