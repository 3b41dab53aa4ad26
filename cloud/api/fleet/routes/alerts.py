"""What AuditAggregation found: devices raised for not syncing (read), every chain's
latest re-verification and the signed digests of every chain's head (audit), and a
check of the cloud's copy of the devices' rows against a signed digest (audit).

The digest check refuses a digest that is not the control plane's (409
``digest_refused``: its hashes, its place in the chain of digests or its signature do not
verify): nothing is compared with it. Against one that verifies it answers, for a page
of the devices it covers, each chain whose rows no longer lead to the signed head.
"""

from __future__ import annotations

import threading
import weakref
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.fleet.auth import CanAudit, CanRead
from cloud.api.fleet.context import Ctx, FleetContext
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.fields import QText, Text
from cloud.api.fleet.paging import DEFAULT_LIMIT, MAX_LIMIT, After, Limit, Page, page
from cloud.control import Conn, migrate
from cloud.control import alerts as alerts_
from cloud.control import digest as digests
from cloud.control._sql import Q
from cloud.control.chains import check_device
from sync import signing, wire

router = APIRouter(tags=["alerts and audit digests"])

#: Devices walked per verify call by default: each is every row of its chains.
DEFAULT_VERIFY_DEVICES = 100

_migrated: weakref.WeakSet[object] = weakref.WeakSet()
_migrating = threading.Lock()


def _ready(ctx: FleetContext, conn: Conn) -> None:
    """The control tables, migrated once per pool if ``serve`` has not (a new database)."""
    if ctx.pool in _migrated:
        return
    with _migrating:
        migrate(conn)
        _migrated.add(ctx.pool)


# --- silent devices ----------------------------------------------------------------------


class AlertOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str
    store: str
    kind: str
    state: Literal["raised", "cleared"]
    raised_at: float
    #: When the device was last seen (as of now).
    last_seen_at: float
    #: Seconds since it was last seen, while raised (null once cleared).
    silent_s: float | None
    cleared_at: float | None
    #: The AuditAggregation run that raised it.
    run_id: str


@router.get("/api/v1/alerts")
def list_alerts(
    who: CanRead,
    ctx: Ctx,
    state: Annotated[Literal["raised", "cleared", "all"], Query()] = "raised",
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[AlertOut]:
    """Devices raised for not syncing within ``offline_after_s``, by device id, with how
    long each has been silent; one seen again since shows as cleared at once."""
    now = ctx.clock.now()
    with ctx.transaction() as conn:
        _ready(ctx, conn)
        rows = alerts_.listed(
            conn, state=None if state == "all" else state, after=after, limit=limit + 1
        )
    items, nxt = page(rows, limit, lambda a: a.device_id)
    return Page[AlertOut](
        items=[
            AlertOut(
                device_id=a.device_id,
                store=a.store,
                kind=a.kind,
                state=a.state,
                raised_at=a.raised_at,
                last_seen_at=a.seen_now,
                silent_s=max(0.0, now - a.seen_now) if a.state == "raised" else None,
                cleared_at=a.cleared_at,
                run_id=a.run_id,
            )
            for a in items
        ],
        next=nxt,
    )


# --- re-verification ---------------------------------------------------------------------


class VerificationOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str
    stream: str
    chain: int
    ok: bool
    rows: int
    head_seq: int
    first_bad_seq: int | None
    reason: str | None
    #: The digest the chain was compared with (null: there was none yet).
    digest_seq: int | None
    run_id: str
    verified_at: float


@router.get("/api/v1/audit/verifications")
def list_verifications(
    who: CanAudit,
    ctx: Ctx,
    state: Annotated[Literal["ok", "broken", "all"], Query()] = "all",
    device_id: QText = None,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[VerificationOut]:
    """Every device chain as the last AuditAggregation re-verified it (``next``:
    ``DEVICE/STREAM/CHAIN``)."""
    ok = {"ok": True, "broken": False, "all": None}[state]
    params = {"ok": ok, "device_id": device_id, "after": after, "limit": limit + 1}
    with ctx.transaction() as conn:
        _ready(ctx, conn)
        rows = [
            VerificationOut(
                device_id=r[0],
                stream=r[1],
                chain=int(r[2]),
                ok=bool(r[3]),
                rows=int(r[4]),
                head_seq=int(r[5]),
                first_bad_seq=r[6],
                reason=r[7],
                digest_seq=r[8],
                run_id=r[9],
                verified_at=float(r[10]),
            )
            for r in conn.execute(Q["verifications"], params)
        ]
    items, nxt = page(rows, limit, lambda v: f"{v.device_id}/{v.stream}/{v.chain}")
    return Page[VerificationOut](items=items, next=nxt)


# --- signed digests ----------------------------------------------------------------------


class DigestOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq: int
    run_id: str
    made_at: float
    #: How many chain heads it signs.
    heads: int
    heads_hash: str
    prev_hash: str
    hash: str
    key_id: str
    signature: str


def _digest_out(d: digests.Digest) -> DigestOut:
    return DigestOut(**d.__dict__)


@router.get("/api/v1/audit/digests")
def list_digests(
    who: CanAudit,
    ctx: Ctx,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> Page[DigestOut]:
    """The signed digests, newest first (``after``: a seq; the page holds older ones)."""
    if after is not None and not (after.isdigit() and len(after) <= 18):
        raise ApiError(422, "invalid_cursor", "after must be a page's next", field="query.after")
    with ctx.transaction() as conn:
        _ready(ctx, conn)
        rows = digests.listed(conn, before=int(after) if after else None, limit=limit + 1)
    items, nxt = page(rows, limit, lambda d: str(d.seq))
    return Page[DigestOut](items=[_digest_out(d) for d in items], next=nxt)


class VerifyDigest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The digest to check against (default: the newest).
    digest_seq: int | None = Field(None, ge=1, le=wire.MAX_INT64)
    #: Only this device (default: every device the digest covers, a page at a time).
    device_id: Text | None = None
    #: The ``next`` of the answer before.
    after: Text | None = None
    limit: int = Field(DEFAULT_VERIFY_DEVICES, ge=1, le=MAX_LIMIT)


class Mismatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str
    stream: str
    chain: int
    #: The head the digest signed for the chain (null: the chain is newer than it).
    signed_seq: int | None
    signed_hash: str | None
    head_seq: int
    first_bad_seq: int | None
    reason: str | None


class DigestVerification(BaseModel):
    model_config = ConfigDict(extra="forbid")

    digest: DigestOut
    devices_checked: int
    chains_checked: int
    #: Every chain of the page's devices that no longer matches the signed digest.
    mismatches: list[Mismatch]
    next: str | None


@router.post("/api/v1/audit/digests/verify")
def verify_digest(body: VerifyDigest, who: CanAudit, ctx: Ctx) -> DigestVerification:
    """Check a signed digest, then walk the cloud's copy of each device's rows it covers
    (a page of devices per call) and name every chain that no longer leads to the head
    the digest signed."""
    public = signing.load_public(ctx.sync.public_key)
    with ctx.transaction() as conn:
        _ready(ctx, conn)
        target = body.digest_seq
        if target is None:
            newest = digests.latest(conn)
            if newest is None:
                raise ApiError(404, "digest_not_found", "no digest has been made yet")
            target = newest.seq
        try:
            found, problems = digests.verify_stored(conn, target, public)
        except KeyError:
            raise ApiError(
                404, "digest_not_found", f"no digest {target}", field="body.digest_seq"
            ) from None
        if problems:
            raise ApiError(
                409, "digest_refused",
                f"digest {target} is not the control plane's: {'; '.join(problems)}",
                field="body.digest_seq",
            )  # fmt: skip
        ids = digests.devices_of(
            conn, target, device_id=body.device_id, after=body.after, limit=body.limit + 1
        )
        kept, nxt = page(ids, body.limit, lambda d: d)
        mismatches, chains = [], 0
        for device_id in kept:
            signed = {(h.stream, h.chain): h for h in digests.heads_of(conn, target, device_id)}
            checks = check_device(conn, device_id, signed)
            chains += len(checks)
            mismatches += [
                Mismatch(
                    device_id=c.device_id,
                    stream=c.stream,
                    chain=c.chain,
                    signed_seq=c.signed_seq,
                    signed_hash=c.signed_hash,
                    head_seq=c.head_seq,
                    first_bad_seq=c.first_bad_seq,
                    reason=c.reason,
                )
                for c in checks
                if not c.ok
            ]
    return DigestVerification(
        digest=_digest_out(found),
        devices_checked=len(kept),
        chains_checked=chains,
        mismatches=mismatches,
        next=nxt,
    )
