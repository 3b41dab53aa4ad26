"""``GET /metrics`` for Prometheus (permission ``read``: Prometheus sends a bearer token,
``authorization: {credentials: TOKEN}`` in its scrape config), in the text format.

Each app has a registry of its own (``metrics_of(app)``; not prometheus-client's global
one, so that many apps in one process do not share or clash): the fleet's gauges, from
the database at each scrape (``cloud.control.metrics.FleetCollector``), and API latency,
a histogram by method, route template and status fed by ``LatencyMiddleware``, which
``instrument(app)`` adds (it must be called while the app is built, before it starts).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.api.fleet.auth import CanRead
from cloud.api.fleet.context import FleetContext
from cloud.control.metrics import FleetCollector

router = APIRouter(tags=["metrics"])

#: Seconds: from a cached read to a page of 1,000 devices or a slow digest check.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: The route label of a request that matched no route (a 404): one label, not its path.
UNMATCHED = "<unmatched>"

_lock = threading.Lock()


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    latency: Histogram


def metrics_of(app: FastAPI) -> Metrics:
    """The app's registry (made on first use)."""
    found = getattr(app.state, "metrics", None)
    if isinstance(found, Metrics):
        return found
    with _lock:
        found = getattr(app.state, "metrics", None)
        if isinstance(found, Metrics):
            return found
        registry = CollectorRegistry(auto_describe=False)

        def fleet() -> FleetContext:
            ctx: FleetContext = app.state.fleet
            return ctx

        registry.register(
            FleetCollector(lambda: fleet().transaction(), lambda: fleet().clock.now())
        )
        latency = Histogram(
            "tillflow_api_request_duration_seconds",
            "API request latency by method, route template and status.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        made = Metrics(registry, latency)
        app.state.metrics = made
        return made


class LatencyMiddleware:
    """Times every HTTP request into ``histogram`` (a plain ASGI middleware: it neither
    buffers nor wraps the body)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            self.histogram.labels(scope["method"], template, str(status[0])).observe(
                time.perf_counter() - started
            )


def instrument(app: FastAPI) -> Metrics:
    """Feed API latency into the app's registry (call once, while building the app)."""
    made = metrics_of(app)
    app.add_middleware(LatencyMiddleware, histogram=made.latency)
    return made


# Not in /openapi.json: it is Prometheus's, in its text format, outside /api/v1 (the
# route-rule test still enumerates it: it serves to a ``read`` token only).
@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
def metrics(who: CanRead, request: Request) -> Response:
    """The fleet's gauges (computed in SQL now) and API latency, Prometheus text format."""
    body = generate_latest(metrics_of(request.app).registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)


__all__ = ["LatencyMiddleware", "Metrics", "instrument", "metrics_of", "router"]
