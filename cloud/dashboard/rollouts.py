"""The Rollout pages: the list, one rollout (its funnel per wave against the abort
threshold, why it aborted, the rollback's progress, its devices, the operators'
controls so far), the live fragment the page fetches every 2 s, and the controls.

A control is the Fleet API's, step for step (``cloud.api.fleet.routes.rollouts``): the
request recorded by ``cloud.rollouts.service.control`` in one transaction with its row
of the cloud audit log (actor: the session's token, as a bearer token's would be), then
the run woken (``wake_run``). The route's rule asks ``operate`` of the session, as the
API's does of a bearer token; a read-only session is refused (403) whatever it posts.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from cloud.api.fleet.context import FleetContext
from cloud.api.fleet.routes.rollouts import wake_run
from cloud.dashboard import queries
from cloud.dashboard.render import SECURITY_HEADERS, Params, pages
from cloud.dashboard.session import CanOperate, CanRead, DashboardError, Session
from cloud.dashboard.svg import funnel, progress
from cloud.documents.errors import DocumentError
from cloud.rollouts import service

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

PAGE = 50
DEVICE_PAGE = 50
#: The controls, as the page names them, and the service's name for each.
CONTROLS = {"pause": "pause", "resume": "resume", "approve": "approve",
            "retry-failed": "retry_failed", "abort": "abort"}  # fmt: skip
RolloutIdPath = Annotated[str, Path(min_length=1, max_length=200)]
#: The device filters in the order an operator looks for trouble: the failures, then
#: those still waiting for an answer, then the rest.
DEVICE_ORDER = ("failed", "refused", "timed_out", "notified", "applied", "held", "planned",
                "healthy", "cancelled")  # fmt: skip


def _ctx(request: Request) -> FleetContext:
    ctx: FleetContext = request.app.state.fleet
    return ctx


def _refusal(exc: DocumentError) -> DashboardError:
    titles = {404: "Not found", 409: "Not now"}
    message = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
    return DashboardError(exc.status if exc.status < 500 else 400,
                          titles.get(exc.status, "Refused"), message)  # fmt: skip


def _clean(value: str) -> str:
    if "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value) or not value.isascii():
        raise DashboardError(404, "Not found", "no rollout with that id")
    return value


def allowed_controls(s: Session, v: dict[str, Any]) -> list[tuple[str, str]]:
    """The (path word, label) of each control this caller may use on the rollout now
    (its role holds operate, the status allows it: ``service.ALLOWED``)."""
    if not s.can("operate"):
        return []
    out = []
    for word, action in CONTROLS.items():
        ok = v["status"] in service.ALLOWED[action]
        if action == "abort" and v["controls"]["abort_requested"]:
            ok = False
        if action == "retry_failed":  # allowed with none to retry, but a button for nothing
            ok = ok and any(w["failed"] + w["refused"] + w["timed_out"] for w in v["waves"])
        if ok:
            out.append((word, word.replace("-", " ")))
    return out


def _live_context(s: Session, v: dict[str, Any]) -> dict[str, Any]:
    rb = v.get("rollback")
    return {
        "v": v, "chart": funnel(v), "buttons": allowed_controls(s, v),
        "rollback_bar": progress(rb["restored"], rb["to_restore"]) if rb else "",
        "finished": v["status"] in service.FINISHED and not (rb and rb["status"] == "running"),
    }  # fmt: skip


@router.get("/ui/rollouts")
def rollout_list(request: Request, s: CanRead) -> HTMLResponse:
    ctx = _ctx(request)
    q = Params(request)
    kind = q.choice("kind", service.KINDS)
    status = q.choice("status", service.ROLLOUT_STATUSES)
    after = q.text("after")
    try:
        with ctx.transaction() as conn:
            found = service.rollouts(conn, kind=kind, status=status, after=after, limit=PAGE)
    except DocumentError as exc:
        raise _refusal(exc) from None
    return pages(request).page(
        "rollouts.html", s, items=found["items"], next=found["next"], q=q,
        kinds=service.KINDS, statuses=service.ROLLOUT_STATUSES,
    )  # fmt: skip


def _view(ctx: FleetContext, rollout_id: str) -> dict[str, Any]:
    with ctx.transaction() as conn:
        return service.view(conn, rollout_id, now=ctx.clock.now())


def _done(request: Request) -> str | None:
    """The control just taken (the redirect's ``?done=``), if it names one."""
    done = request.query_params.get("done")
    return done if done in CONTROLS.values() else None


@router.get("/ui/rollouts/{rollout_id}")
def rollout(request: Request, rollout_id: RolloutIdPath, s: CanRead) -> HTMLResponse:
    ctx = _ctx(request)
    rollout_id = _clean(rollout_id)
    q = Params(request)
    wave = q.integer("wave", low=1, high=10_000)
    status = q.choice("device_status", service.DEVICE_STATUSES)
    after = q.text("after")
    try:
        with ctx.transaction() as conn:
            v = service.view(conn, rollout_id, now=ctx.clock.now())
            found = service.devices(conn, rollout_id, wave=wave, status=status, after=after,
                                    limit=DEVICE_PAGE)  # fmt: skip
            controls = queries.controls(conn, rollout_id)
    except DocumentError as exc:
        raise _refusal(exc) from None
    return pages(request).page(
        "rollout.html", s, q=q, devices=found["items"], next=found["next"], controls=controls,
        device_order=DEVICE_ORDER, notice=_done(request),
        **_live_context(s, v),
    )  # fmt: skip


@router.get("/ui/rollouts/{rollout_id}/live")
def rollout_live(request: Request, rollout_id: RolloutIdPath, s: CanRead) -> HTMLResponse:
    """The part of the rollout page that moves (status, controls, funnel, abort,
    rollback), fetched by the page every 2 s."""
    try:
        v = _view(_ctx(request), _clean(rollout_id))
    except DocumentError as exc:
        raise _refusal(exc) from None
    return pages(request).page("rollout_live.html", s, **_live_context(s, v))


def control(request: Request, rollout_id: str, action: service.Action, s: Session) -> Response:
    ctx = _ctx(request)
    rollout_id = _clean(rollout_id)
    reason = (s.form.get("reason") or "").strip()[:1000] or None
    try:  # as the API does: the engine's store made first
        ctx.engine()
    except Exception as exc:  # recorded anyway; the run reads it at its next poll
        log.warning(
            "rollout %s: no engine to wake the run with: %s: %s", rollout_id,
            type(exc).__name__, exc, extra={"action": "dashboard_no_engine"},
        )  # fmt: skip
    try:
        with ctx.transaction() as conn:
            view = service.control(conn, rollout_id, action, s.who, at=ctx.clock.now(),
                                   reason=reason)  # fmt: skip
    except DocumentError as exc:
        raise _refusal(exc) from None
    try:
        wake_run(ctx, view["kind"], rollout_id)
    except Exception as exc:  # recorded: the run reads it at its next poll anyway
        log.warning(
            "rollout %s: %s recorded, the run not woken: %s: %s", rollout_id, action,
            type(exc).__name__, exc, extra={"action": "dashboard_wake_failed"},
        )  # fmt: skip
    log.info(
        "rollout %s: %s by %s from the dashboard", rollout_id, action, s.who.name,
        extra={"action": f"dashboard_rollout_{action}"},
    )  # fmt: skip
    where = f"/ui/rollouts/{quote(rollout_id, safe='')}?done={action}"
    return RedirectResponse(where, status_code=303, headers=SECURITY_HEADERS)


def _route(word: str, action: service.Action) -> None:
    def steer(request: Request, rollout_id: RolloutIdPath, s: CanOperate) -> Response:
        return control(request, rollout_id, action, s)

    steer.__name__ = f"dashboard_rollout_{action}"
    router.post(f"/ui/rollouts/{{rollout_id}}/{word}")(steer)


for _word, _action in CONTROLS.items():
    _route(_word, _action)  # type: ignore[arg-type]
