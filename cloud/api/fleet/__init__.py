"""The Fleet API: operators' HTTP API under ``/api/v1``, served by the sync service's app.

``mount_fleet(app, ctx)`` puts the context on ``app.state.fleet``, includes every
routes module found in ``cloud.api.fleet.routes`` (each exposes ``router``; adding a
file is enough), adds ``/openapi.json`` (public), and installs the error handlers that
give every refusal one shape (``cloud.api.fleet.errors``). The app that mounts it calls
``auth.check_rules`` once every route is in: a route without a rule stops the build.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterable
from typing import Any

import psycopg.errors
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from cloud.api.fleet import errors
from cloud.api.fleet.auth import public, rule_answer
from cloud.api.fleet.context import FleetContext
from sync.server import BackendUnavailable, ServiceError

log = logging.getLogger(__name__)

#: Where route modules are found.
ROUTES_PACKAGE = "cloud.api.fleet.routes"
API_PREFIX = "/api/v1"


def discover_routers(package: str = ROUTES_PACKAGE) -> list[APIRouter]:
    """The ``router`` of every module in ``package``, by module name."""
    pkg = importlib.import_module(package)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        router = getattr(module, "router", None)
        if isinstance(router, APIRouter):
            found.append(router)
    return found


def mount_fleet(
    app: FastAPI, ctx: FleetContext, routers: Iterable[APIRouter] | None = None
) -> FastAPI:
    """Mount the Fleet API (``routers``, else those discovered) on ``app``."""
    app.state.fleet = ctx
    for router in discover_routers() if routers is None else routers:
        app.include_router(router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(public())])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    install_handlers(app)
    return app


def install_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"error": {code, message, field}}``, with its status."""

    @app.exception_handler(errors.ApiError)
    async def api_error(request: Request, exc: errors.ApiError) -> JSONResponse:
        return errors.response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI parses a JSON body before any dependency runs: the route's rule is
        # asked first, so a stranger learns 401, not what the body lacked.
        refusal = await run_in_threadpool(rule_answer, request)
        return errors.response(refusal or errors.from_validation(exc))

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return errors.response(errors.from_service(exc))

    @app.exception_handler(psycopg.errors.DataError)
    async def bad_value(request: Request, exc: psycopg.errors.DataError) -> JSONResponse:
        # a value the fields' checks let through and PostgreSQL refused (out of range, a
        # character text cannot hold): the input's fault, so a 422, and logged to be
        # checked earlier next time
        log.warning(
            "the database refused a value for %s %s: %s", request.method,
            request.url.path[:200], type(exc).__name__, extra={"action": "fleet_bad_value"},
        )  # fmt: skip
        return errors.response(
            errors.ApiError(422, "invalid_value", "a value given cannot be stored or compared")
        )

    @app.exception_handler(BackendUnavailable)
    async def unavailable(request: Request, exc: BackendUnavailable) -> JSONResponse:
        return errors.response(errors.from_unavailable(exc))


__all__ = ["API_PREFIX", "discover_routers", "install_handlers", "mount_fleet"]
