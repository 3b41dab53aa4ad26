"""Enrollment tokens (operate): make one for a store (and group), list, revoke. The
clear token is in the answer to ``create`` only; lists show its id (a prefix of its
hash), store, group, expiry, and whether and by whom it was used."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.fleet.auth import CanOperate
from cloud.api.fleet.context import Ctx
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.fields import QText, Text
from cloud.api.fleet.paging import DEFAULT_LIMIT, After, Limit, Page, page
from cloud.fleet import enroll

router = APIRouter(tags=["enrollment tokens"])

#: A token lives at most this long (a week): it is a credential left lying about.
MAX_TTL_MINUTES = 7 * 24 * 60.0
EnrollId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="the token's id")]


class NewEnrollToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: Text
    group: Text | None = None
    ttl_minutes: float = Field(10.0, gt=0, le=MAX_TTL_MINUTES, allow_inf_nan=False)


class MadeEnrollToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The clear token: in this answer only (the cloud keeps its SHA-256).
    token: str
    id: str
    store: str
    group: str | None
    expires_at: float


class EnrollTokenOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    store: str
    group: str | None
    created_at: float
    expires_at: float
    state: Literal["live", "used", "expired", "revoked"]
    used_at: float | None
    used_by: str | None
    revoked_at: float | None
    revoked_by: str | None


@router.post("/api/v1/enroll-tokens", status_code=201)
def create_enroll_token(body: NewEnrollToken, who: CanOperate, ctx: Ctx) -> MadeEnrollToken:
    with ctx.transaction() as conn:
        made = ctx.sync_in(conn).create_enroll_token(
            body.store, body.group, ttl_s=body.ttl_minutes * 60
        )
        id_ = enroll.token_id(made.token)
        ctx.record(
            conn, who, "enroll_token.create", id_,
            {"store": made.store, "group": made.group, "expires_at": made.expires_at},
        )  # fmt: skip
    return MadeEnrollToken(
        token=made.token, id=id_, store=made.store, group=made.group, expires_at=made.expires_at
    )


@router.get("/api/v1/enroll-tokens")
def list_enroll_tokens(
    who: CanOperate,
    ctx: Ctx,
    store: QText = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[EnrollTokenOut]:
    with ctx.transaction() as conn:
        rows = enroll.tokens(conn, after=after, store=store, limit=limit + 1)
    items, nxt = page(rows, limit, lambda r: r.id)
    now = ctx.clock.now()
    return Page[EnrollTokenOut](items=[_out(r, now) for r in items], next=nxt)


@router.post("/api/v1/enroll-tokens/{token_id}/revoke")
def revoke_enroll_token(token_id: EnrollId, who: CanOperate, ctx: Ctx) -> EnrollTokenOut:
    status = {"not_found": 404, "ambiguous": 409, "used": 409}
    with ctx.transaction() as conn:
        try:
            enroll.revoke(conn, token_id, at=ctx.clock.now(), by=who.name)
        except enroll.RevokeRefused as exc:
            code = "enroll_token_not_found" if exc.code == "not_found" else f"token_{exc.code}"
            raise ApiError(status[exc.code], code, exc.message, field="token_id") from None
        ctx.record(conn, who, "enroll_token.revoke", token_id, {})
        row = enroll.tokens(conn, id_=token_id, limit=1)[0]
    return _out(row, ctx.clock.now())


def _out(r: enroll.EnrollTokenRow, now: float) -> EnrollTokenOut:
    return EnrollTokenOut(
        id=r.id, store=r.store, group=r.group, created_at=r.created_at,
        expires_at=r.expires_at, state=r.state(now),
        used_at=r.used_at, used_by=r.device_id, revoked_at=r.revoked_at,
        revoked_by=r.revoked_by,
    )  # fmt: skip
