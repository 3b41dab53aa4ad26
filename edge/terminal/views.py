"""What the POS app sees of a run (the local API's answer): no card data beyond the
masked PAN, and for a run whose outcome is not settled yet, what to tell the customer.

A finished sale always carries a decision: ``approved``, ``declined`` (with a
``reason``) or ``reversed``. While the acquirer may hold the customer's money and the
terminal is still releasing it, the decision is ``unknown`` with reason
``reversal_pending`` and a ``customer_message``; never ``FAILED`` with no decision.
"""

from __future__ import annotations

from typing import Any

from edge.engine import RunRecord, Status

UNKNOWN = "unknown"
REVERSAL_PENDING = "reversal_pending"

#: What the cashier tells the customer while a reversal is pending.
CUSTOMER_MESSAGE_REVERSAL_PENDING = (
    "The payment did not go through. If the amount was reserved on the card, the "
    "terminal is releasing it automatically. Take the payment again as a new sale, "
    "or another way."
)

_ENDED_WITHOUT_DECISION = (Status.FAILED, Status.ROLLED_BACK, Status.CANCELLED)


def _reversal_pending(run: RunRecord) -> bool:
    """A payment that may have been authorised and is being reversed: its authorisation
    had no answer (``decision: unknown``), or a later step failed and the saga is
    reversing an approval."""
    if run.workflow_type != "payment" or run.status.terminal:
        return False
    return run.state.get("decision") == UNKNOWN or run.status is Status.COMPENSATING


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
    if _reversal_pending(run):
        view["decision"], view["reason"] = UNKNOWN, REVERSAL_PENDING
        view["auth_code"] = None  # not a receipt's approval code while it is released
        view["customer_message"] = CUSTOMER_MESSAGE_REVERSAL_PENDING
    if run.status is Status.WAITING and frames:
        view["waiting_for"] = frames[-1][0]
    if run.error and run.status in _ENDED_WITHOUT_DECISION:
        view["error"] = {"code": run.error.get("code"), "step": run.error.get("step")}
        if view["decision"] is None:  # e.g. the card could not be read: nothing charged
            view["decision"] = "declined"
            view["reason"] = view["reason"] or run.error.get("code") or "failed"
    return view
