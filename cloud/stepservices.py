"""What the cloud's workflow steps run on, read from ``ctx.services`` (an object or a
mapping: ``cloud.engine.cloud_engine`` passes ``{"settings": settings}``; tests and
benches may pass a ``pool`` and more).

``transaction(ctx)``: one transaction for a step, on ``services.pool`` (a psycopg_pool
pool of autocommit connections) or, without one, a connection of its own to
``services.settings.database_url``. A refusal of the documents service
(``DocumentError``) fails the step for good; a database fault is a retryable failure
(the step's retry policy decides); a worker with neither a pool nor a database URL
fails the attempt retryably too, so the run waits for a worker that has them instead of
ending (and starting a saga that could not reach the database either).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg

from cloud.documents._sql import Conn
from cloud.documents.errors import DocumentError
from cloud.settings import CloudSettings
from cloud.sync.postgres import UNAVAILABLE
from edge.engine import StepContext
from edge.errors import StepError


def service(ctx: StepContext, name: str) -> Any:
    """``ctx.services[name]`` or ``ctx.services.name``; None when absent."""
    services = ctx.services
    if isinstance(services, Mapping):
        return services.get(name)
    return getattr(services, name, None)


@contextlib.contextmanager
def transaction(
    ctx: StepContext, faults: tuple[type[BaseException], ...] = UNAVAILABLE
) -> Iterator[Conn]:
    """One transaction for the step (module docstring); ``faults``: what is a database
    fault worth another attempt."""
    try:
        pool = service(ctx, "pool")
        if pool is not None:
            with pool.connection() as conn, conn.transaction():
                yield conn
            return
        settings = service(ctx, "settings")
        url = settings.database_url if isinstance(settings, CloudSettings) else None
        if not url:
            raise StepError("no ctx.services.pool nor settings.database_url", retryable=True)
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn, conn.transaction():
            yield conn
    except DocumentError as exc:
        raise StepError(f"{exc.code}: {exc.message}", retryable=False) from exc
    except faults as exc:
        raise StepError(f"the database failed: {type(exc).__name__}", retryable=True) from exc
