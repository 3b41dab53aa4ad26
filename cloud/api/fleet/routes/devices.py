"""Devices (read to look; operate to change): the list with its filters, one device
with its heartbeat, tags, chains and open quarantine; tags; groups and stores; a move
to another group; and the kill switch (revoke: the device's next request is refused)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.fleet.auth import CanOperate, CanRead
from cloud.api.fleet.context import Ctx
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.fields import DeviceId, QText, Text
from cloud.api.fleet.paging import DEFAULT_LIMIT, After, Limit, Page, page
from cloud.fleet import devices
from cloud.fleet._sql import Conn
from sync import wire

router = APIRouter(tags=["devices"])

TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$"
QVersion = Annotated[int | None, Query(ge=0, le=wire.MAX_INT64)]
QTime = Annotated[float | None, Query(allow_inf_nan=False, description="Unix seconds")]
TagPath = Annotated[str, Path(pattern=TAG_PATTERN)]
Health = Literal["ok", "high_water", "full", "unknown"]


class DeviceOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str
    store: str
    group: str | None
    status: Literal["active", "revoked"]
    enrolled_at: float
    revoked_at: float | None
    binary_version: str | None
    config_version: int | None
    policy_version: int | None
    health: Health
    last_seen_at: float | None
    tags: list[str]


class ChainOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream: str
    chain: int
    base_seq: int
    head_seq: int
    state: Literal["ok", "broken"]
    first_bad_seq: int | None
    reason: str | None
    broken_at: float | None
    updated_at: float


class DeviceDetail(DeviceOut):
    hardware: dict[str, Any]
    conflicts: int
    rotated_at: float | None
    stream: str | None
    heartbeat: dict[str, Any] | None
    chains: list[ChainOut]
    open_quarantine: int


class TagIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tag: Annotated[str, Field(pattern=TAG_PATTERN)]


class GroupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: Text | None = Field(description="the group; null: none")


class Count(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    devices: int


def _out(row: devices.DeviceRow) -> DeviceOut:
    return DeviceOut(**row.__dict__)


def _detail(conn: Conn, device_id: str) -> DeviceDetail:
    row = devices.device(conn, device_id)
    more = devices.more(conn, device_id)
    if row is None or more is None:
        raise _no_device(device_id)
    return DeviceDetail(
        **row.__dict__, hardware=more.hardware, conflicts=more.conflicts,
        rotated_at=more.rotated_at, stream=more.stream, heartbeat=more.heartbeat,
        chains=[ChainOut(**c) for c in more.chains], open_quarantine=more.open_quarantine,
    )  # fmt: skip


def _no_device(device_id: str) -> ApiError:
    return ApiError(404, "device_not_found", f"no device {device_id[:80]}", field="device_id")


@router.get("/api/v1/devices")
def list_devices(
    who: CanRead,
    ctx: Ctx,
    store: QText = None,
    group: QText = None,
    tag: QText = None,
    binary_version: QText = None,
    config_version: QVersion = None,
    policy_version: QVersion = None,
    health: Health | None = None,
    status: Literal["active", "revoked"] | None = None,
    last_seen_before: QTime = None,
    last_seen_after: QTime = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[DeviceOut]:
    """Devices by id; every filter given must match (last seen: before is <, after >=)."""
    where = devices.DeviceFilter(
        store=store, group=group, tag=tag, binary_version=binary_version,
        config_version=config_version, policy_version=policy_version, health=health,
        status=status, seen_before=last_seen_before, seen_after=last_seen_after,
    )  # fmt: skip
    with ctx.transaction() as conn:
        rows = devices.devices(conn, where, after=after, limit=limit + 1)
    items, nxt = page(rows, limit, lambda r: r.device_id)
    return Page[DeviceOut](items=[_out(r) for r in items], next=nxt)


@router.get("/api/v1/devices/{device_id}")
def get_device(device_id: DeviceId, who: CanRead, ctx: Ctx) -> DeviceDetail:
    with ctx.transaction() as conn:
        return _detail(conn, device_id)


@router.post("/api/v1/devices/{device_id}/tags")
def add_tag(device_id: DeviceId, body: TagIn, who: CanOperate, ctx: Ctx) -> DeviceDetail:
    with ctx.transaction() as conn:
        if devices.lock(conn, device_id) is None:
            raise _no_device(device_id)
        if devices.add_tag(conn, device_id, body.tag, ctx.clock.now()):
            ctx.record(conn, who, "device.tag", device_id, {"tag": body.tag})
        return _detail(conn, device_id)


@router.delete("/api/v1/devices/{device_id}/tags/{tag}")
def remove_tag(device_id: DeviceId, tag: TagPath, who: CanOperate, ctx: Ctx) -> DeviceDetail:
    with ctx.transaction() as conn:
        if devices.lock(conn, device_id) is None:
            raise _no_device(device_id)
        if not devices.remove_tag(conn, device_id, tag):
            raise ApiError(
                404, "tag_not_found", f"device {device_id} has no tag {tag}", field="tag"
            )
        ctx.record(conn, who, "device.untag", device_id, {"tag": tag})
        return _detail(conn, device_id)


@router.put("/api/v1/devices/{device_id}/group")
def move_device(device_id: DeviceId, body: GroupIn, who: CanOperate, ctx: Ctx) -> DeviceDetail:
    with ctx.transaction() as conn:
        held = devices.lock(conn, device_id)
        if held is None:
            raise _no_device(device_id)
        if held[0] != body.group:
            devices.move(conn, device_id, body.group)
            ctx.record(conn, who, "device.move", device_id, {"from": held[0], "to": body.group})
        return _detail(conn, device_id)


@router.post("/api/v1/devices/{device_id}/revoke")
def revoke_device(device_id: DeviceId, who: CanOperate, ctx: Ctx) -> DeviceDetail:
    """The kill switch: the device's next request is refused (403 device_revoked)."""
    with ctx.transaction() as conn:
        was = devices.device(conn, device_id)
        if was is None:
            raise _no_device(device_id)
        ctx.sync_in(conn).revoke_device(device_id)
        if was.status == "active":
            ctx.record(conn, who, "device.revoke", device_id, {"store": was.store})
        return _detail(conn, device_id)


@router.get("/api/v1/groups")
def list_groups(
    who: CanRead,
    ctx: Ctx,
    store: QText = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[Count]:
    """Every group (of a store, if given) with its number of devices."""
    with ctx.transaction() as conn:
        rows = devices.groups(conn, after=after, store=store, limit=limit + 1)
    items, nxt = page(rows, limit, lambda r: r[0])
    return Page[Count](items=[Count(name=n, devices=c) for n, c in items], next=nxt)


@router.get("/api/v1/stores")
def list_stores(
    who: CanRead, ctx: Ctx, limit: Limit = DEFAULT_LIMIT, after: After = None
) -> Page[Count]:
    """Every store with its number of devices."""
    with ctx.transaction() as conn:
        rows = devices.stores(conn, after=after, limit=limit + 1)
    items, nxt = page(rows, limit, lambda r: r[0])
    return Page[Count](items=[Count(name=n, devices=c) for n, c in items], next=nxt)
