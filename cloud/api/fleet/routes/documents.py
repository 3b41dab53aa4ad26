"""Config and fraud-policy documents (``cloud.documents``): versions (operate to make,
read to look), their scoped assignments (fleet, group, store, device; operate to change),
and the effective document of a device (read). A new version is validated with the
terminal's own model: a bad one is a 422 naming the field, and nothing is stored. Every
change is recorded in the cloud audit log in its own transaction."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.fleet.auth import CanOperate, CanRead
from cloud.api.fleet.context import Ctx
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.fields import Clean, DeviceId
from cloud.api.fleet.paging import DEFAULT_LIMIT, After, Limit, Page, page
from cloud.documents import service
from cloud.documents.errors import DocumentError
from cloud.documents.scope import MAX_VALUE_CHARS
from sync import wire

router = APIRouter(tags=["documents"])

KindPath = Annotated[Literal["config", "policy"], Path(description="config or policy")]
VersionPath = Annotated[int, Path(ge=1, le=wire.MAX_INT64)]
Version = Annotated[int, Field(ge=1, le=wire.MAX_INT64)]
ScopeName = Literal["fleet", "group", "store", "device"]
ScopeValue = Annotated[str, Field(min_length=1, max_length=MAX_VALUE_CHARS), Clean]
QValue = Annotated[str | None, Query(min_length=1, max_length=MAX_VALUE_CHARS), Clean]


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """The documents service's refusals as the API's (status, code, field)."""
    try:
        yield
    except DocumentError as exc:
        message = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
        raise ApiError(exc.status, exc.code, message, field=exc.field) from None


def cursor(after: str | None) -> int | None:
    """A numeric cursor (a version, an id); anything else is not one of ours."""
    if after is None:
        return None
    if not (after.isascii() and after.isdigit()) or len(after) > 18:
        raise ApiError(422, "invalid_cursor", "after is not a cursor this list gave", field="after")
    return int(after)


class NewDocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: dict[str, Any] = Field(
        description="the document: a config's {risk: {...}}, or a fraud policy"
    )
    version: Version | None = Field(
        None, description="the version to take (above every other); default: the next"
    )


class DocumentSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    version: int
    created_at: float


class DocumentOut(DocumentSummary):
    content: dict[str, Any]


class AssignmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Version
    scope: ScopeName
    value: ScopeValue | None = Field(
        None, description="the group, store or device id; none for the fleet"
    )


class AssignmentOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    assignment_id: int
    kind: str
    scope: str
    value: str | None
    version: int
    assigned_at: float
    assigned_by: str
    previous_version: int | None = Field(
        None, description="the version this assignment replaced (in the answer to POST)"
    )


class EffectiveOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str
    kind: str
    store: str
    group: str | None
    version: int | None = Field(description="the version the device should run (null: none)")
    scope: str | None = Field(description="where it comes from: device, store, group, fleet")
    value: str | None
    assignment_id: int | None
    content: dict[str, Any] | None
    in_force_version: int | None = Field(description="the version its latest heartbeat reports")
    in_sync: bool


def _assignment(a: service.Assignment, *, previous: bool = False) -> AssignmentOut:
    return AssignmentOut(
        assignment_id=a.assignment_id, kind=a.kind, scope=a.scope, value=a.value or None,
        version=a.version, assigned_at=a.assigned_at, assigned_by=a.assigned_by,
        previous_version=a.previous if previous else None,
    )  # fmt: skip


# --- assignments (before /{kind}/{version}: "assignments" is no version) -------------------


@router.post("/api/v1/documents/{kind}/assignments", status_code=201)
def assign(kind: KindPath, body: AssignmentIn, who: CanOperate, ctx: Ctx) -> AssignmentOut:
    """Assign a version to the fleet, a group, a store or a device (replacing the one
    there), recorded with the change."""
    with translated(), ctx.transaction() as conn:
        made = service.assign(
            conn, kind, body.version, body.scope, body.value, who, at=ctx.clock.now()
        )
    return _assignment(made, previous=True)


@router.get("/api/v1/documents/{kind}/assignments")
def list_assignments(
    kind: KindPath,
    who: CanRead,
    ctx: Ctx,
    scope: ScopeName | None = None,
    value: QValue = None,
    version: Annotated[int | None, Query(ge=1, le=wire.MAX_INT64)] = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[AssignmentOut]:
    """Assignments of a kind by id; every filter given must match."""
    with translated(), ctx.transaction() as conn:
        rows = service.assignments(
            conn, kind, scope=scope, value=value, version=version, after=cursor(after),
            limit=limit + 1,
        )  # fmt: skip
    items, nxt = page(rows, limit, lambda a: str(a.assignment_id))
    return Page[AssignmentOut](items=[_assignment(a) for a in items], next=nxt)


@router.delete("/api/v1/documents/{kind}/assignments/{assignment_id}")
def unassign(
    kind: KindPath,
    assignment_id: Annotated[int, Path(ge=1, le=wire.MAX_INT64)],
    who: CanOperate,
    ctx: Ctx,
) -> AssignmentOut:
    """Remove one assignment (its devices fall back to the next scope that names them);
    the answer is what was removed."""
    with translated(), ctx.transaction() as conn:
        found = service.assignment_by_id(conn, kind, assignment_id)
        gone = service.unassign(conn, kind, found.scope, found.value, who, at=ctx.clock.now())
        assert gone is not None  # the row was there, under the assignment's lock
    return _assignment(gone)


# --- versions --------------------------------------------------------------------------------


@router.post("/api/v1/documents/{kind}", status_code=201)
def create_document(kind: KindPath, body: NewDocumentIn, who: CanOperate, ctx: Ctx) -> DocumentOut:
    """A new version, validated with the terminal's model (422 naming the field, nothing
    stored); a version not above the newest is 409 stale_version."""
    with translated(), ctx.transaction() as conn:
        made = service.create(
            conn, kind, body.content, who, at=ctx.clock.now(), version=body.version
        )
    assert made.content is not None
    return DocumentOut(
        kind=made.kind, version=made.version, created_at=made.created_at, content=made.content
    )


@router.get("/api/v1/documents/{kind}")
def list_documents(
    kind: KindPath, who: CanRead, ctx: Ctx, limit: Limit = DEFAULT_LIMIT, after: After = None
) -> Page[DocumentSummary]:
    """Versions of a kind, newest first (without their content)."""
    with translated(), ctx.transaction() as conn:
        rows = service.versions(conn, kind, after=cursor(after), limit=limit + 1)
    items, nxt = page(rows, limit, lambda d: str(d.version))
    return Page[DocumentSummary](
        items=[DocumentSummary(kind=d.kind, version=d.version, created_at=d.created_at)
               for d in items],
        next=nxt,
    )  # fmt: skip


@router.get("/api/v1/documents/{kind}/{version}")
def get_document(kind: KindPath, version: VersionPath, who: CanRead, ctx: Ctx) -> DocumentOut:
    with translated(), ctx.transaction() as conn:
        d = service.get(conn, kind, version)
    assert d.content is not None
    return DocumentOut(kind=d.kind, version=d.version, created_at=d.created_at, content=d.content)


# --- the effective document ------------------------------------------------------------------


@router.get("/api/v1/devices/{device_id}/effective/{kind}")
def effective_document(device_id: DeviceId, kind: KindPath, who: CanRead, ctx: Ctx) -> EffectiveOut:
    """The document the device follows: its most specific assignment (device > store >
    group > fleet), and whether its latest heartbeat reports that version in force."""
    with translated(), ctx.transaction() as conn:
        e = service.effective(conn, device_id, kind)
    a = e.assignment
    return EffectiveOut(
        device_id=e.device_id, kind=e.kind, store=e.place.store, group=e.place.group,
        version=e.version, scope=None if a is None else a.scope,
        value=None if a is None else (a.value or None),
        assignment_id=None if a is None else a.assignment_id, content=e.content,
        in_force_version=e.in_force, in_sync=e.in_sync,
    )  # fmt: skip
