"""Assigning a document as steps of a workflow on the engine (a rollout's persist and its
compensation), over ``cloud.documents.service``::

    steps:
      - name: note_assignment            # what is assigned there now, into the state
        type: STANDARD
        function: cloud.documents.steps:note_assignment
      - name: assign
        type: STANDARD
        function: cloud.documents.steps:assign
        compensate: cloud.documents.steps:restore_assignment
        retry: {max_attempts: 5, initial_backoff_s: 1, max_backoff_s: 30}

The run's input (or state) names ``kind``, ``version``, ``scope``, ``value`` (none for the
fleet) and ``actor`` (who asked: an operator's name, kept in the audit log).

Why two steps: the assignment commits in the control plane's own transaction (with its
audit record), not the engine's step commit, so a crash between the two re-runs
``assign``. Were the version it replaces read in that step, the re-run would read its
own write and the compensation would "restore" the new version. ``note_assignment``
reads it once, in a step of its own, and the state keeps it: ``assign`` is an upsert (a
re-run changes nothing) and ``restore_assignment`` puts back ``state.previous`` (or
removes the assignment when there was none) -- each, too, safe to run twice.

What the steps need from ``ctx.services`` (an object or a mapping): ``pool`` (a
psycopg_pool pool of autocommit connections), or ``settings`` (``CloudSettings`` with a
``database_url``) to connect with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg

from cloud.documents import service
from cloud.documents._sql import Conn
from cloud.documents.errors import DocumentError
from cloud.fleet.tokens import Principal
from cloud.settings import CloudSettings
from cloud.sync.postgres import UNAVAILABLE
from edge.engine import StepContext
from edge.errors import StepError


def _service(ctx: StepContext, name: str) -> Any:
    services = ctx.services
    if isinstance(services, Mapping):
        return services.get(name)
    return getattr(services, name, None)


@contextlib.contextmanager
def _transaction(ctx: StepContext) -> Iterator[Conn]:
    """One transaction for the step; a refusal fails it for good, a database fault is
    retried (the engine's retry policy)."""
    try:
        pool = _service(ctx, "pool")
        if pool is not None:
            with pool.connection() as conn, conn.transaction():
                yield conn
            return
        settings = _service(ctx, "settings")
        url = settings.database_url if isinstance(settings, CloudSettings) else None
        if not url:
            raise StepError("no ctx.services.pool nor settings.database_url", retryable=False)
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn, conn.transaction():
            yield conn
    except DocumentError as exc:
        raise StepError(f"{exc.code}: {exc.message}", retryable=False) from exc
    except UNAVAILABLE as exc:
        raise StepError(f"the database failed: {type(exc).__name__}", retryable=True) from exc


def _where(state: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    source = {**(ctx.input if isinstance(ctx.input, Mapping) else {}), **state}
    missing = [k for k in ("kind", "version", "scope") if source.get(k) is None]
    if missing:
        raise StepError(f"the assignment needs {', '.join(missing)}", retryable=False)
    return source


def _actor(source: Mapping[str, Any], ctx: StepContext) -> Principal:
    """Who the audit log names: the operator who asked, through this run."""
    name = str(source.get("actor") or "workflow")[:200]
    return Principal(token_id=f"run:{ctx.run_id}", name=name, role="operator")


def note_assignment(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """``previous``: the version assigned to (kind, scope, value) now (None: none)."""
    w = _where(state, ctx)
    with _transaction(ctx) as conn:
        found = service.current(conn, w["kind"], w["scope"], w.get("value"))
    return {"previous": None if found is None else found.version}


def assign(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Assign the version (with its audit record, one transaction)."""
    w = _where(state, ctx)
    with _transaction(ctx) as conn:
        made = service.assign(
            conn, w["kind"], int(w["version"]), w["scope"], w.get("value"), _actor(w, ctx),
            at=ctx.clock.now(),
        )  # fmt: skip
    return {"assignment_id": made.assignment_id, "assigned": made.version}


def restore_assignment(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """The compensation of ``assign``: put ``state.previous`` back (or remove the
    assignment if there was none), with its audit record."""
    w = _where(state, ctx)
    previous = state.get("previous")
    with _transaction(ctx) as conn:
        service.unassign(
            conn, w["kind"], w["scope"], w.get("value"), _actor(w, ctx), at=ctx.clock.now(),
            restore=None if previous is None else int(previous),
        )  # fmt: skip
    return {"restored": previous}


__all__ = ["assign", "note_assignment", "restore_assignment"]
