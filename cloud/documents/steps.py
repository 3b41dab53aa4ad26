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

from collections.abc import Mapping
from typing import Any

from cloud.documents import service
from cloud.fleet.tokens import Principal
from cloud.stepservices import transaction
from edge.engine import StepContext
from edge.errors import StepError


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
    with transaction(ctx) as conn:
        found = service.current(conn, w["kind"], w["scope"], w.get("value"))
    return {"previous": None if found is None else found.version}


def assign(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Assign the version (with its audit record, one transaction)."""
    w = _where(state, ctx)
    with transaction(ctx) as conn:
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
    with transaction(ctx) as conn:
        service.unassign(
            conn, w["kind"], w["scope"], w.get("value"), _actor(w, ctx), at=ctx.clock.now(),
            restore=None if previous is None else int(previous),
        )  # fmt: skip
    return {"restored": previous}


__all__ = ["assign", "note_assignment", "restore_assignment"]
