"""The Fleet, Device and Audit pages. Each reads in one transaction on the Fleet API's
pool, with the same queries the API's lists use (``cloud.fleet.devices``: filtered and
paged in SQL, keyset on the device id) and the dashboard's own summaries
(``cloud.dashboard.queries``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse

from cloud.api.fleet.context import FleetContext
from cloud.dashboard import queries
from cloud.dashboard.render import Params, pages
from cloud.dashboard.session import CanAudit, CanRead, DashboardError
from cloud.dashboard.svg import share_bars
from cloud.fleet import audit, devices
from sync.server import ServiceError

router = APIRouter(include_in_schema=False)

#: Devices per page of the fleet list.
PAGE = 50
HEALTH = ("ok", "high_water", "full", "unknown")
DeviceIdPath = Annotated[str, Path(min_length=1, max_length=200)]


def _ctx(request: Request) -> FleetContext:
    ctx: FleetContext = request.app.state.fleet
    return ctx


def _clean_id(value: str, what: str) -> str:
    if "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise DashboardError(404, "Not found", f"no {what} with that id")
    return value


@router.get("/ui/fleet")
def fleet(request: Request, s: CanRead) -> HTMLResponse:
    ctx = _ctx(request)
    q = Params(request)
    store, group = q.text("store"), q.text("group")
    where = devices.DeviceFilter(
        store=store, group=group, health=q.choice("health", HEALTH),
        binary_version=q.text("binary_version"),
        config_version=q.integer("config_version"), policy_version=q.integer("policy_version"),
        status=q.choice("status", ("active", "revoked")),
    )  # fmt: skip
    after = q.text("after")
    now = ctx.clock.now()
    with ctx.transaction() as conn:
        found = queries.summary(
            conn, now=now, offline_after_s=ctx.settings.offline_after_s, store=store, group=group
        )
        rows = devices.devices(conn, where, after=after, limit=PAGE + 1)
        stores, groups = queries.names(conn)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    bars = {k: list(zip(v, share_bars(v, found.active), strict=True))
            for k, v in found.versions.items()}  # fmt: skip
    return pages(request).page(
        "fleet.html", s, summary=found, rows=rows, bars=bars, q=q, stores=stores, groups=groups,
        next=rows[-1].device_id if more and rows else None, health_states=HEALTH,
        stalled_s=queries.STALLED_OUTBOX_S, offline_after_s=ctx.settings.offline_after_s,
        filtered=any(v is not None for v in where.__dict__.values()),
    )  # fmt: skip


@router.get("/ui/devices/{device_id}")
def device(request: Request, device_id: DeviceIdPath, s: CanRead) -> HTMLResponse:
    ctx = _ctx(request)
    device_id = _clean_id(device_id, "device")
    with ctx.transaction() as conn:
        row = devices.device(conn, device_id)
        more = devices.more(conn, device_id)
        if row is None or more is None:
            raise DashboardError(404, "Not found", f"no device {device_id[:80]}")
        events = queries.timeline(conn, device_id, quarantine=s.can("audit"))
    return pages(request).page("device.html", s, d=row, more=more, t=events)


def _verify_device(ctx: FleetContext, device_id: str) -> dict[str, Any]:
    try:
        report = ctx.sync.verify_device_audit(device_id)
    except ServiceError as exc:
        if exc.code == "unknown_device":
            raise DashboardError(404, "Not found", f"no device {device_id[:80]}") from None
        raise DashboardError(400, "Refused", exc.message) from None
    chains = []
    with ctx.transaction() as conn:
        for c in report.chains:
            around = []
            if not c.ok and c.first_bad_seq is not None:
                around = queries.device_rows_around(conn, device_id, c.stream, c.chain,
                                                    c.first_bad_seq)  # fmt: skip
            chains.append({"stream": c.stream, "chain": c.chain, "ok": c.ok, "rows": c.rows,
                           "head_seq": c.head_seq, "first_bad_seq": c.first_bad_seq,
                           "reason": c.reason, "around": around})  # fmt: skip
    return {"device_id": device_id, "ok": report.ok, "chains": chains}


@router.get("/ui/audit")
def audit_page(request: Request, s: CanAudit) -> HTMLResponse:
    ctx = _ctx(request)
    q = Params(request)
    device_id = q.text("device")
    verify_cloud = q.choice("verify", ("cloud",)) is not None
    before = q.integer("before", low=1)
    action = q.text("action")
    checked_device = _verify_device(ctx, _clean_id(device_id, "device")) if device_id else None
    cloud = None
    with ctx.transaction() as conn:
        if verify_cloud:
            report = audit.verify(conn)
            around = []
            if not report.ok and report.broken_at is not None:
                around = queries.cloud_rows_around(conn, report.broken_at)
            cloud = {"ok": report.ok, "rows": report.rows, "first_bad_seq": report.broken_at,
                     "reason": report.reason, "around": around}  # fmt: skip
        latest = queries.cloud_latest(conn, before=before, action=action, limit=PAGE + 1)
    older = latest[PAGE - 1]["seq"] if len(latest) > PAGE else None
    return pages(request).page(
        "audit.html", s, q=q, cloud=cloud, device=checked_device, rows=latest[:PAGE],
        older=older, device_id=device_id or "",
    )  # fmt: skip
