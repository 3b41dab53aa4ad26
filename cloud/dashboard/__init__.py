"""The operator dashboard: the fleet, its rollouts and its audit in a browser, served
under ``/ui`` by ``tillflow cloud serve`` beside the Fleet API, on the same context
(``app.state.fleet``), the same tokens and roles, the same services.

Pages (server-rendered Jinja2, a few lines of plain JavaScript, SVG charts; every asset
served from here, nothing from a CDN):

- ``/ui/login``: a form for an API token (the session: ``cloud.dashboard.session``)
- ``/ui/fleet``: devices by health, last seen and version; the devices needing attention
  first (a broken audit chain, a stalled outbox); the list, filtered and paged in SQL
- ``/ui/rollouts``, ``/ui/rollouts/{id}``: the list; one rollout's funnel per wave against
  its abort threshold (``svg.funnel``), refreshed every 2 s from ``/ui/rollouts/{id}/live``,
  why it aborted, the rollback's progress, its devices, and the controls its status and
  the caller's role allow (POSTs through ``cloud.rollouts.service.control``, recorded in
  the cloud audit log as the API's are)
- ``/ui/devices/{id}``: versions, health, chains; a timeline of syncs, commands (status,
  refusal reasons), rollouts and quarantined entries
- ``/ui/audit``: verify the cloud's chain or a device's, and see the first broken link

Every route states one access rule (``session(permission)`` or ``public()``), so
``check_rules`` holds for these routes as for the API's. ``mount_dashboard(app)`` adds
them to an app that has the Fleet API.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from cloud.api.fleet.auth import check_rules, public
from cloud.api.fleet.context import FleetContext
from cloud.dashboard import pages as page_routes
from cloud.dashboard import rollouts as rollout_routes
from cloud.dashboard.render import SECURITY_HEADERS, Pages
from cloud.dashboard.session import (
    COOKIE,
    COOKIE_PATH,
    MAX_TOKEN_CHARS,
    SESSION_MAX_AGE_S,
    CanRead,
    DashboardError,
    LoginNeeded,
    cookie_value,
    cross_site,
    new_nonce,
    read_form,
    safe_next,
)

PREFIX = "/ui"
STATIC = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}

router = APIRouter(include_in_schema=False)
Public = [Depends(public())]


@router.get("/ui", dependencies=Public)
@router.get("/ui/", dependencies=Public)
def home() -> RedirectResponse:
    return RedirectResponse("/ui/fleet", status_code=303)


@router.get("/ui/static/{name}", dependencies=Public)
def static(name: Annotated[str, Path(max_length=40)]) -> Response:
    if name not in STATIC:
        raise DashboardError(404, "Not found", f"no asset {name[:40]}")
    body = resources.files("cloud.dashboard").joinpath("static", name).read_bytes()
    headers = {"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"}
    return Response(body, media_type=STATIC[name], headers=headers)


@router.get("/ui/login", dependencies=Public)
def login_form(request: Request) -> HTMLResponse:
    p: Pages = request.app.state.dashboard_pages
    nxt = safe_next(request.query_params.get("next"))
    return p.page("login.html", None, next=nxt, error=request.query_params.get("why"))


@router.post("/ui/login", dependencies=Public)
async def login(request: Request) -> Response:
    """Check the token as the API would; a live one becomes the session's cookie."""
    p: Pages = request.app.state.dashboard_pages
    if cross_site(request):
        raise DashboardError(403, "Refused", "a login from another site is refused")
    form = await read_form(request)
    token = form.get("token", "").strip()
    nxt = safe_next(form.get("next"))
    ctx: FleetContext = request.app.state.fleet
    who = None
    if token and len(token) <= MAX_TOKEN_CHARS and token.isascii() and "." not in token:
        who = await run_in_threadpool(ctx.authenticate, token)
    if who is None:
        why = "the token is unknown or revoked" if token else "give an API token"
        return p.page("login.html", None, status=401, next=nxt, error=why)
    answer = RedirectResponse(nxt, status_code=303, headers=SECURITY_HEADERS)
    answer.set_cookie(
        COOKIE, cookie_value(new_nonce(), token), max_age=SESSION_MAX_AGE_S, path=COOKIE_PATH,
        httponly=True, samesite="strict", secure=request.url.scheme == "https",
    )  # fmt: skip
    return answer


@router.post("/ui/logout")
def logout(s: CanRead) -> Response:
    answer = RedirectResponse("/ui/login", status_code=303, headers=SECURITY_HEADERS)
    answer.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return answer


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoginNeeded)
    async def login_needed(request: Request, exc: LoginNeeded) -> Response:
        from urllib.parse import urlencode

        query = {"next": safe_next(exc.next_path)}
        if exc.why:
            query["why"] = exc.why
        answer = RedirectResponse(f"/ui/login?{urlencode(query)}", status_code=303)
        if exc.why:  # a cookie whose token is no longer live: drop it
            answer.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
        return answer

    @app.exception_handler(DashboardError)
    async def refused(request: Request, exc: DashboardError) -> Response:
        p: Pages = request.app.state.dashboard_pages
        return p.page("error.html", None, status=exc.status, title=exc.title, message=exc.message)


def mount_dashboard(app: FastAPI) -> FastAPI:
    """Add the dashboard's routes to ``app`` (which serves the Fleet API)."""
    ctx: FleetContext = app.state.fleet
    app.state.dashboard_pages = Pages(ctx.clock.now)
    for r in (router, page_routes.router, rollout_routes.router):
        app.include_router(r)
    install_handlers(app)
    check_rules(app)
    return app


__all__ = ["PREFIX", "mount_dashboard"]
