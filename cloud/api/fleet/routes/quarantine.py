"""The quarantine (audit to read, operate to act): rejected and conflicting outbox
entries and audit rows a chain could not take. List (by device, status, kind), read
one (with the entry as sent and what operators did with it), replay it through the
sync ingest as the device's, or discard it (who and why are kept)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict

from cloud.api.fleet.auth import CanAudit, CanOperate
from cloud.api.fleet.context import Ctx
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.fields import QText, Why
from cloud.api.fleet.paging import DEFAULT_LIMIT, After, Limit, Page, page
from cloud.fleet import quarantine
from cloud.fleet._sql import Conn
from sync import wire

router = APIRouter(tags=["quarantine"])

ItemId = Annotated[int, Path(ge=1, le=wire.MAX_INT64, description="the item's id")]
Status = Literal["open", "replayed", "discarded"]


class ItemOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int
    device_id: str
    stream: str
    seq: int
    kind: Literal["outbox", "audit"]
    reason: str
    detail: str
    received_at: float
    status: Status


class DecisionOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["replayed", "still_quarantined", "discarded"]
    actor: str
    reason: str | None
    at: float


class ItemDetail(ItemOut):
    #: The entry as the device sent it (JSON).
    entry: Any
    decisions: list[DecisionOut]


class ReplayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Why | None = None


class DiscardIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Why


class ReplayOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: applied or duplicate (landed), else why it is still quarantined.
    outcome: str
    landed: bool
    #: The item that holds the entry now, if the replay kept it as a new one.
    superseded_by: int | None
    item: ItemDetail


def _out(it: quarantine.Item) -> ItemOut:
    return ItemOut(
        id=it.id, device_id=it.device_id, stream=it.stream, seq=it.seq, kind=it.kind,
        reason=it.reason, detail=it.detail, received_at=it.received_at, status=it.status,
    )  # fmt: skip


def _detail(conn: Conn, id_: int) -> ItemDetail:
    it = quarantine.item(conn, id_)
    if it is None:
        raise _missing(id_)
    return ItemDetail(
        **_out(it).model_dump(),
        entry=it.parsed_entry(),
        decisions=[DecisionOut(**d.__dict__) for d in quarantine.decisions(conn, id_)],
    )


def _missing(id_: int) -> ApiError:
    return ApiError(404, "quarantine_item_not_found", f"no quarantine item {id_}", field="item_id")


def _open(conn: Conn, id_: int) -> quarantine.Item:
    it = quarantine.item(conn, id_, lock=True)
    if it is None:
        raise _missing(id_)
    if it.status != "open":
        raise ApiError(409, "not_open", f"quarantine item {id_} is {it.status}, not open")
    return it


@router.get("/api/v1/quarantine")
def list_quarantine(
    who: CanAudit,
    ctx: Ctx,
    device_id: QText = None,
    status: Status | None = None,
    kind: Literal["outbox", "audit"] | None = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[ItemOut]:
    """Quarantined items by id (``after``: an id)."""
    if after is not None and not (after.isdigit() and len(after) <= 18):
        raise ApiError(422, "invalid_cursor", "after must be a page's next", field="query.after")
    with ctx.transaction() as conn:
        rows = quarantine.items(
            conn, after=None if after is None else int(after), device_id=device_id,
            status=status, kind=kind, limit=limit + 1,
        )  # fmt: skip
    items, nxt = page(rows, limit, lambda r: str(r.id))
    return Page[ItemOut](items=[_out(r) for r in items], next=nxt)


@router.get("/api/v1/quarantine/{item_id}")
def get_quarantine_item(item_id: ItemId, who: CanAudit, ctx: Ctx) -> ItemDetail:
    with ctx.transaction() as conn:
        return _detail(conn, item_id)


@router.post("/api/v1/quarantine/{item_id}/replay")
def replay_quarantine_item(
    item_id: ItemId,
    who: CanOperate,
    ctx: Ctx,
    body: ReplayIn | None = None,
) -> ReplayOut:
    """Re-run the entry through the sync ingest as the device's: it lands (applied, or a
    duplicate of what the cloud holds) or stays quarantined with the new reason."""
    why = body.reason if body else None
    with ctx.transaction() as conn:
        it = _open(conn, item_id)
        result = quarantine.replay(
            conn, ctx.sync_in(conn), it, actor=who.name, why=why, at=ctx.clock.now()
        )
        ctx.record(
            conn, who, "quarantine.replay", str(item_id),
            {"device_id": it.device_id, "kind": it.kind, "seq": it.seq,
             "outcome": result.outcome, "landed": result.landed, "reason": why},
        )  # fmt: skip
        return ReplayOut(
            outcome=result.outcome,
            landed=result.landed,
            superseded_by=result.superseded_by,
            item=_detail(conn, item_id),
        )


@router.post("/api/v1/quarantine/{item_id}/discard")
def discard_quarantine_item(
    item_id: ItemId,
    body: DiscardIn,
    who: CanOperate,
    ctx: Ctx,
) -> ItemDetail:
    """Set the item aside for good (status discarded), with who did it and why."""
    with ctx.transaction() as conn:
        it = _open(conn, item_id)
        quarantine.discard(conn, it, actor=who.name, why=body.reason, at=ctx.clock.now())
        ctx.record(
            conn, who, "quarantine.discard", str(item_id),
            {"device_id": it.device_id, "kind": it.kind, "seq": it.seq, "reason": body.reason},
        )  # fmt: skip
        return _detail(conn, item_id)
