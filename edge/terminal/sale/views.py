"""What the POS app sees of a run (the local API's answer): no card data beyond the
masked PAN, and for a run whose outcome is not settled yet, what to tell the customer.

A finished sale always carries a decision: ``approved``, ``declined`` (with a
``reason``) or ``reversed``. While the acquirer may hold the customer's money and the
terminal is still releasing it (or a void's reversal is still being retried), the
decision is ``unknown`` with reason ``reversal_pending`` and a ``customer_message``;
never ``FAILED`` with no decision.
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

#: ... and while a void's reversal is retried (its first answer may have been lost).
CUSTOMER_MESSAGE_VOID_PENDING = (
    "The void is not confirmed yet: the terminal keeps trying to reach the acquirer. "
    "Do not void or refund this payment again; the result will show here."
)

_ENDED_WITHOUT_DECISION = (Status.FAILED, Status.ROLLED_BACK, Status.CANCELLED)


def _pending_message(run: RunRecord) -> str | None:
    """What to tell the customer while a reversal is retried, or None.

    A payment: its authorisation had no answer (``decision: unknown``), or a later step
    failed and the saga is reversing an approval. A void: its reversal is being retried.
    """
    if run.status.terminal:
        return None
    if run.workflow_type == "payment" and (
        run.state.get("decision") == UNKNOWN or run.status is Status.COMPENSATING
    ):
        return CUSTOMER_MESSAGE_REVERSAL_PENDING
    frames = run.cursor.get("frames") or []
    at = frames[-1][0] if frames else None
    if run.workflow_type == "void" and at == "reverse_payment" and run.next_attempt_at:
        return CUSTOMER_MESSAGE_VOID_PENDING
    return None


def reversal_pending(run: RunRecord) -> bool:
    """Whether money may be held for ``run`` while the terminal is still releasing it."""
    return _pending_message(run) is not None


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
    pending = _pending_message(run)
    if pending is not None:
        view["decision"], view["reason"] = UNKNOWN, REVERSAL_PENDING
        view["auth_code"] = None  # not a receipt's approval code while it is released
        view["customer_message"] = pending
    if run.status is Status.WAITING and frames:
        view["waiting_for"] = frames[-1][0]
    if run.error and run.status in _ENDED_WITHOUT_DECISION:
        view["error"] = {"code": run.error.get("code"), "step": run.error.get("step")}
        if view["decision"] is None:  # e.g. the card could not be read: nothing charged
            view["decision"] = "declined"
            view["reason"] = view["reason"] or run.error.get("code") or "failed"
    return view
