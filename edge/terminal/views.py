"""What the POS app sees of a run (the local API's answer): no card data beyond the
masked PAN, and for a run whose outcome is not known yet, what to tell the customer."""

from __future__ import annotations

from typing import Any

from edge.engine import RunRecord, Status


def run_view(run: RunRecord) -> dict[str, Any]:
    """The POS app's view of a run."""
    state = run.state
    frames = run.cursor.get("frames") or []
    view: dict[str, Any] = {
        "run_id": run.run_id,
        "workflow": run.workflow_type,
        "status": str(run.status),
        "decision": state.get("decision"),
        "reason": state.get("reason"),
        "channel": state.get("channel"),
        "auth_code": state.get("auth_code"),
        "amount_minor": state.get("amount_minor"),
        "currency": state.get("currency"),
        "masked_pan": (state.get("card") or {}).get("masked"),
    }
    if run.status is Status.WAITING and frames:
        view["waiting_for"] = frames[-1][0]
    if run.error and run.status in (Status.FAILED, Status.ROLLED_BACK):
        view["error"] = {"code": run.error.get("code"), "step": run.error.get("step")}
    return view
