"""API tokens (admin): make one (its clear text answered once), list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.fleet.auth import CanAdmin
from cloud.api.fleet.context import Ctx
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.fields import Clean
from cloud.api.fleet.paging import DEFAULT_LIMIT, After, Limit, Page, page
from cloud.fleet import tokens
from cloud.fleet.tokens import MAX_NAME_CHARS, Role

router = APIRouter(tags=["api tokens"])

TokenId = Annotated[str, Path(pattern=r"^tok_[0-9a-f]{16}$", description="the token's id")]


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[
        str, Field(min_length=1, max_length=MAX_NAME_CHARS, description="who holds it"), Clean
    ]
    role: Role


class TokenOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_id: str
    name: str
    role: str
    created_at: float
    created_by: str
    revoked_at: float | None
    revoked_by: str | None
    last_used_at: float | None


class MadeToken(TokenOut):
    #: The clear token: in this answer only (the cloud keeps its SHA-256).
    token: str


def _out(t: tokens.ApiToken) -> TokenOut:
    return TokenOut(**t.__dict__)


@router.post("/api/v1/api-tokens", status_code=201)
def create_token(
    body: NewToken,
    who: CanAdmin,
    ctx: Ctx,
) -> MadeToken:
    problem = tokens.name_problem(body.name)
    if problem:
        raise ApiError(422, "invalid_request", f"name {problem}", field="body.name")
    with ctx.transaction() as conn:
        token, made = tokens.create(conn, body.name, body.role, at=ctx.clock.now(), by=who.name)
        detail = {"name": made.name, "role": made.role}
        ctx.record(conn, who, "api_token.create", made.token_id, detail)
    return MadeToken(token=token, **made.__dict__)


@router.get("/api/v1/api-tokens")
def list_tokens(
    who: CanAdmin,
    ctx: Ctx,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[TokenOut]:
    with ctx.transaction() as conn:
        rows = tokens.tokens(conn, after=after, limit=limit + 1)
    items, nxt = page(rows, limit, lambda t: t.token_id)
    return Page[TokenOut](items=[_out(t) for t in items], next=nxt)


@router.post("/api/v1/api-tokens/{token_id}/revoke")
def revoke_token(
    token_id: TokenId,
    who: CanAdmin,
    ctx: Ctx,
) -> TokenOut:
    with ctx.transaction() as conn:
        revoked = tokens.revoke(conn, token_id, at=ctx.clock.now(), by=who.name)
        if revoked is None:
            raise ApiError(404, "token_not_found", f"no API token {token_id}", field="token_id")
        ctx.record(conn, who, "api_token.revoke", token_id, {"name": revoked.name})
    return _out(revoked)
