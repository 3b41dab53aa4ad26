"""A new run: its first row, and the commit that starts it.

A builder, like ``outcomes``: no I/O; the engine inserts what it returns (``store.start``
for a run started by a caller, in the parent's commit for a child).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from edge.engine import settle
from edge.engine import steps as stepexec
from edge.engine.loader import Workflow
from edge.engine.navigation import Navigator
from edge.engine.records import AuditEvent, Commit, RunRecord, Status
from edge.errors import InputError


def initial_state(wf: Workflow, run_input: dict[str, Any]) -> dict[str, Any]:
    """The state a run starts with: its input, validated by the state model if any."""
    model = wf.state_model
    if model is None:
        stepexec.ensure_json(run_input)
        return dict(run_input)
    try:
        return model.model_validate(run_input).model_dump(mode="json")
    except ValidationError as exc:
        # from None, and no {exc}: pydantic's text quotes the input, which may be
        # anything a client sent (a card number included).
        problem = stepexec.validation_problem(exc)
        raise InputError(f"input does not match {model.__name__}: {problem}") from None


def new_run(
    wf: Workflow,
    run_input: dict[str, Any],
    *,
    run_id: str,
    key: str | None,
    now: float,
    lease: tuple[str, float] | None,
    parent: tuple[str, str | None] | None,
    nav: Navigator,
    new_child: settle.NewChild,
) -> tuple[RunRecord, Commit]:
    """The run and its starting commit, settled to its first action step (or to its end).

    ``lease``: (owner, expiry) when the caller advances the run at once, else None (the
    run is left for whoever claims it). ``parent``: (run id, step path or None).
    """
    state = initial_state(wf, run_input)
    run = RunRecord(
        run_id=run_id,
        workflow_type=wf.workflow_type,
        definition_hash=wf.content_hash,
        fingerprints=dict(wf.fingerprints),
        status=Status.RUNNING,
        state=state,
        input=run_input,
        cursor={"frames": [], "attempt": 1},
        revision=1,
        created_at=now,
        updated_at=now,
        idempotency_key=key,
        parent_run_id=parent[0] if parent else None,
        parent_step=parent[1] if parent else None,
        lease_owner=lease[0] if lease else None,
        lease_expires_at=lease[1] if lease else None,
    )
    commit = Commit(run=run, expected_revision=0)
    detail = {
        "workflow_type": wf.workflow_type,
        "version": wf.version,
        "definition_hash": wf.content_hash,
        "parent_run_id": run.parent_run_id,
    }
    commit.audit.append(AuditEvent(run.run_id, "run_started", now, detail=detail))
    settle.settle(commit, wf, nav, nav.start(state, run_input), now, new_child)
    return run, commit
