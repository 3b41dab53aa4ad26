"""Commands (operate to send, read to follow): to one device, or to every active device
of a group or a store in one call -- one sealed command per device, under its own seq,
all sharing a batch id -- carrying a stored document version by (kind, version). Each
command's status: queued, delivered, applied, refused (with the device's reason), or
expired (past its expiry with no result)."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud.api.fleet.auth import CanOperate, CanRead
from cloud.api.fleet.context import Ctx
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.fields import Clean, QText, Text
from cloud.api.fleet.paging import DEFAULT_LIMIT, After, Limit, Page, page
from cloud.api.fleet.routes.documents import cursor, translated
from cloud.documents import commands
from sync import wire
from sync.server import DEFAULT_COMMAND_TTL_S, CommandTarget, ServiceError

router = APIRouter(tags=["commands"])

#: A command lives at most this long (30 days): a terminal offline longer gets a new one.
MAX_TTL_S = 30 * 86_400.0
Action = Literal["update_config", "activate_policy", "request_health"]
Status = Literal["queued", "delivered", "applied", "refused", "expired"]
IdPath = Annotated[str, Path(min_length=1, max_length=wire.MAX_FIELD_CHARS), Clean]


class TargetIn(BaseModel):
    """Exactly one of the three."""

    model_config = ConfigDict(extra="forbid")

    device_id: Text | None = None
    group: Text | None = None
    store: Text | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        given = [n for n in ("device_id", "group", "store") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("name exactly one of device_id, group, store")
        return self


class DocumentRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["config", "policy"]
    version: Annotated[int, Field(ge=1, le=wire.MAX_INT64)]


class CommandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: TargetIn
    action: Action
    document: DocumentRef | None = Field(
        None, description="the stored version it carries (update_config, activate_policy)"
    )
    ttl_s: float = Field(DEFAULT_COMMAND_TTL_S, gt=0, le=MAX_TTL_S, allow_inf_nan=False)


class QueuedOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command_id: str
    device_id: str
    seq: int


class BatchOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_id: str
    action: str
    scope: Literal["device", "group", "store"]
    value: str
    expires_at: float
    document: DocumentRef | None
    commands: list[QueuedOut]


class CommandOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command_id: str
    device_id: str
    seq: int
    action: str
    batch_id: str | None
    status: Status
    reason: str | None
    created_at: float
    expires_at: float
    delivered_at: float | None
    result_at: float | None
    document: DocumentRef | None


class BatchStatusOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_id: str
    action: str
    created_at: float
    expires_at: float
    total: int
    by_status: dict[Status, int]


def _out(c: commands.CommandStatus) -> CommandOut:
    doc = None
    if c.document_kind in ("config", "policy") and c.document_version is not None:
        doc = DocumentRef(kind=c.document_kind, version=c.document_version)
    return CommandOut(
        command_id=c.command_id, device_id=c.device_id, seq=c.seq, action=c.action,
        batch_id=c.batch_id, status=c.status, reason=c.reason,
        created_at=c.created_at, expires_at=c.expires_at, delivered_at=c.delivered_at,
        result_at=c.result_at, document=doc,
    )  # fmt: skip


@router.post("/api/v1/commands", status_code=201)
def send_command(body: CommandIn, who: CanOperate, ctx: Ctx) -> BatchOut:
    """Queue the command for the target's devices (revoked ones are left out), recorded
    with the send; each device takes its own with its next sync."""
    target = CommandTarget(body.target.device_id, body.target.group, body.target.store)
    document = None if body.document is None else (body.document.kind, body.document.version)
    try:
        with translated(), ctx.transaction() as conn:
            made = commands.send(
                conn, ctx.sync_in(conn), who, target, body.action, document=document,
                ttl_s=body.ttl_s, at=ctx.clock.now(),
            )  # fmt: skip
    except ServiceError as exc:
        if exc.code == "no_devices":
            raise ApiError(404, "no_devices", exc.message, field="target") from None
        raise
    return BatchOut(
        batch_id=made.batch_id, action=made.action, scope=target.scope, value=target.value,
        expires_at=made.expires_at, document=body.document,
        commands=[QueuedOut(command_id=c.command_id, device_id=c.device_id, seq=c.seq)
                  for c in made.commands],
    )  # fmt: skip


@router.get("/api/v1/commands")
def list_commands(
    who: CanRead,
    ctx: Ctx,
    device: QText = None,
    status: Status | None = None,
    batch: QText = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[CommandOut]:
    """Commands newest first; every filter given must match (status as it reads now)."""
    with translated(), ctx.transaction() as conn:
        rows = commands.commands(
            conn, now=ctx.clock.now(), device_id=device, status=status, batch_id=batch,
            after=cursor(after), limit=limit + 1,
        )  # fmt: skip
    items, nxt = page(rows, limit, lambda c: str(c.command_no))
    return Page[CommandOut](items=[_out(c) for c in items], next=nxt)


@router.get("/api/v1/commands/{command_id}")
def get_command(command_id: IdPath, who: CanRead, ctx: Ctx) -> CommandOut:
    with translated(), ctx.transaction() as conn:
        return _out(commands.command(conn, command_id, now=ctx.clock.now()))


@router.get("/api/v1/command-batches/{batch_id}")
def get_batch(batch_id: IdPath, who: CanRead, ctx: Ctx) -> BatchStatusOut:
    """A batch's commands counted by status (the commands: GET /api/v1/commands?batch=)."""
    with translated(), ctx.transaction() as conn:
        b = commands.batch(conn, batch_id, now=ctx.clock.now())
    return BatchStatusOut(
        batch_id=b.batch_id, action=b.action, created_at=b.created_at, expires_at=b.expires_at,
        total=b.total, by_status=b.by_status,
    )  # fmt: skip
