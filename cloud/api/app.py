"""The control plane's HTTP face: the sync service's routes, which move bytes to
``SyncService``, and (given a ``FleetContext``) the Fleet API under ``/api/v1`` with its
OpenAPI at ``/openapi.json`` (``cloud.api.fleet``).

The sync routes (and, without the Fleet API, nothing else: every other path is a 404 in
the error shape):

- ``POST /v1/enroll``      the one-time token is the credential
- ``POST /v1/sync``        signed by the device key (``sync.signing``)
- ``POST /v1/rotate-key``  signed by the device's current key
- ``GET  /v1/releases/{release}/manifest``, ``GET /v1/files/{sha256}``  signed by the
  device key: a release's signed file list and its files by hash (``cloud.api.releases``)
- ``GET  /v1/health``      ok, and the database's schema versions

Every route carries one access rule (``cloud.api.fleet.auth``): the device routes are
``device_signed``, health is ``public``, the Fleet API's say which permission they
need. The app is not built if a route has none (``check_rules``).

The raw body is read with a cap (more is 413 before it is all in memory) and passed,
with the method, the path and the headers, to the service, which runs in a worker
thread (it blocks on the database). The service answers every bad input itself with a
4xx; the handlers here make sure nothing that is not a bug becomes a 5xx (an
unexpected exception is a logged 500, a real bug).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cloud.api.fleet.auth import check_rules, device_signed, public, require_rule
from cloud.api.releases import add_release_routes
from sync import wire
from sync.server import MAX_ENROLL_BYTES, BackendUnavailable, SyncService

if TYPE_CHECKING:
    from cloud.api.fleet.context import FleetContext

log = logging.getLogger(__name__)

Handler = Callable[[str, str, Mapping[str, str], bytes], tuple[int, dict[str, Any]]]

#: The largest body read for each route (a sync body may be sent without gzip).
SYNC_BODY_CAP = max(wire.MAX_BATCH_BYTES, wire.MAX_COMPRESSED_BYTES)
SMALL_BODY_CAP = MAX_ENROLL_BYTES


class _TooLarge(Exception):
    def __init__(self, cap: int) -> None:
        self.cap = cap


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body = wire.WireError(code, message).body() | extra
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(math.ceil(extra["retry_after"]))
    return JSONResponse(body, status_code=status, headers=headers)


def _answer(status: int, body: dict[str, Any]) -> JSONResponse:
    headers = {}
    if status == 503 and "retry_after" in body:
        headers["Retry-After"] = str(math.ceil(float(body["retry_after"])))
    return JSONResponse(body, status_code=status, headers=headers)


async def _body(request: Request, cap: int) -> bytes:
    """The raw body, at most ``cap`` bytes (a longer one is refused as it arrives)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _TooLarge(cap)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _TooLarge(cap)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    service: SyncService,
    *,
    close: Callable[[], None] | None = None,
    fleet: FleetContext | None = None,
    fleet_routers: Iterable[APIRouter] | None = None,
) -> FastAPI:
    """The app serving ``service`` (deny by default: only the routes above) and, with
    ``fleet``, the Fleet API (``fleet_routers``, else every routes module found).
    ``close`` runs when the server shuts down (the backend's pool). Raises
    ``RouteRuleError`` if a route has no access rule."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_rules(app)  # again: a route added after the build does not start either
        try:
            yield
        finally:
            if close is not None:
                await run_in_threadpool(close)

    app = FastAPI(
        title="Tillflow sync service",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # the Fleet API serves its own, under a public rule
        lifespan=lifespan,
        dependencies=[Depends(require_rule)],
    )
    signed_rule = [Depends(device_signed())]

    async def signed(request: Request, handler: Handler, cap: int) -> JSONResponse:
        body = await _body(request, cap)
        status, answer = await run_in_threadpool(
            handler, request.method, request.url.path, request.headers, body
        )
        return _answer(status, answer)

    @app.post("/v1/enroll", dependencies=signed_rule, include_in_schema=False)
    async def enroll(request: Request) -> JSONResponse:
        body = await _body(request, SMALL_BODY_CAP)
        status, answer = await run_in_threadpool(
            service.enroll, body, request.headers, request.url.path
        )
        return _answer(status, answer)

    @app.post("/v1/sync", dependencies=signed_rule, include_in_schema=False)
    async def sync(request: Request) -> JSONResponse:
        return await signed(request, service.sync, SYNC_BODY_CAP)

    @app.post("/v1/rotate-key", dependencies=signed_rule, include_in_schema=False)
    async def rotate_key(request: Request) -> JSONResponse:
        return await signed(request, service.rotate_key, SMALL_BODY_CAP)

    add_release_routes(app, service)  # GET /v1/releases/{release}/manifest, /v1/files/{sha256}

    @app.get("/v1/health", dependencies=[Depends(public())])
    async def health() -> JSONResponse:
        try:
            versions = await run_in_threadpool(service.backend.schema_versions)
        except BackendUnavailable as exc:
            return _error(503, "unavailable", exc.message, ok=False, retry_after=exc.retry_after_s)
        return JSONResponse(
            {
                "ok": True,
                "schema_versions": versions,
                "protocol_versions": list(wire.SUPPORTED_VERSIONS),
            }
        )

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, exc: _TooLarge) -> JSONResponse:
        return _error(413, "body_too_large", f"the body is over {exc.cap} bytes")

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the connection dropped mid-body: nothing was read whole, nothing was done
        log.info("client went away mid-request", extra={"action": "client_disconnect"})
        return _error(400, "incomplete_body", "the connection closed before the body ended")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "bad_request")
        message = {
            404: f"no route {request.url.path[:200]}",
            405: f"{request.method} is not served at {request.url.path[:200]}",
        }.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, code, message)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception(
            "unexpected error serving %s %s", request.method, request.url.path[:200],
            extra={"action": "http_500"},
        )  # fmt: skip
        return _error(500, "internal", "an unexpected error; it is logged")

    if fleet is not None:
        from cloud.api.fleet import mount_fleet

        app.title = "Tillflow control plane"
        from cloud.api.fleet.routes.metrics import instrument

        mount_fleet(app, fleet, fleet_routers)
        instrument(app)  # the API latency histogram /metrics serves
    check_rules(app)
    return app
