"""Step functions of the demo payment workflow.

They keep a tiny in-memory "acquirer" keyed by idempotency key, the way a real acquirer
deduplicates: a step replayed after a crash presents the same key and is recognised.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from edge.engine import StepContext
from edge.errors import StepError

#: What the pretend acquirer has seen: idempotency key -> operation.
ACQUIRER: dict[str, dict[str, Any]] = {}


def validate(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    if state.get("currency") not in ("EUR", "USD", "GBP"):
        raise StepError(f"unsupported currency {state.get('currency')!r}", retryable=False)
    return {"validated": True}


def reject(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"outcome": "rejected: amount must be positive"}


def reserve_funds(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ACQUIRER.setdefault(ctx.idempotency_key, {"op": "reserve", "amount": state["amount"]})
    return {"reservation": f"R-{ctx.idempotency_key[:8]}"}


def release_funds(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ACQUIRER.setdefault(ctx.idempotency_key, {"op": "release", "of": state.get("reservation")})
    return {"reservation": None}


def charge_card(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ACQUIRER.setdefault(ctx.idempotency_key, {"op": "charge", "amount": state["amount"]})
    return {"charge_id": f"C-{ctx.idempotency_key[:8]}"}


def refund_card(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ACQUIRER.setdefault(ctx.idempotency_key, {"op": "refund", "of": state.get("charge_id")})
    return {"refund_id": f"F-{ctx.idempotency_key[:8]}"}


def _crash_here(step: str) -> None:
    """The demo's stand-in for a power cut: die by SIGKILL inside the named step."""
    if os.environ.get("TILLFLOW_DEMO_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def print_receipt(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _crash_here("print_receipt")
    if state.get("printer") == "jammed":
        raise StepError("printer jammed")
    return {"receipt": f"{state['amount'] / 100:.2f} {state['currency']} approved"}


def record_sale(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ctx.emit(
        "sale",
        {"amount": state["amount"], "currency": state["currency"], "charge_id": state["charge_id"]},
    )
    return {"outcome": "approved"}
