"""Step functions for the test suite. Every effect is recorded with its idempotency key,
the way a downstream system would see it; knobs in ``KNOBS`` make steps fail on cue."""

from __future__ import annotations

import threading
from typing import Any

from pydantic import BaseModel

from edge.engine import StepContext
from edge.errors import StepError

EFFECTS: list[tuple[str, str]] = []  # (what, idempotency key)
#: What ``keyed`` and ``undo_keyed`` saw: (kind, step, attempt, operation key, idempotency key)
KEYS: list[tuple[str, str, int, str, str]] = []
KNOBS: dict[str, Any] = {}
RELEASE = threading.Event()


def reset() -> None:
    EFFECTS.clear()
    KEYS.clear()
    KNOBS.clear()
    RELEASE.clear()


def _effect(what: str, ctx: StepContext) -> None:
    EFFECTS.append((what, ctx.idempotency_key))


def effects(what: str) -> list[str]:
    return [key for w, key in EFFECTS if w == what]


def add(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect(f"add:{ctx.step}", ctx)
    return {"total": state.get("total", 0) + state.get("x", 1)}


def noop(state: dict[str, Any], ctx: StepContext) -> None:
    _effect(f"noop:{ctx.step}", ctx)


def flaky(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Fails KNOBS['flaky'] times (retryable), then succeeds."""
    _effect("flaky", ctx)
    if KNOBS.get("flaky", 0) > 0:
        KNOBS["flaky"] -= 1
        raise StepError("flaky failure")
    return {"flaky": "ok", "attempt": ctx.attempt}


def fatal(state: dict[str, Any], ctx: StepContext) -> None:
    _effect("fatal", ctx)
    raise StepError("fatal failure", retryable=False)


def boom(state: dict[str, Any], ctx: StepContext) -> None:
    raise RuntimeError("unexpected bug in step code")


def undo(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect(f"undo:{ctx.step}", ctx)
    return {"undone": [*state.get("undone", []), ctx.step]}


def undo_fails(state: dict[str, Any], ctx: StepContext) -> None:
    _effect(f"undo_fails:{ctx.step}", ctx)
    raise StepError("cannot undo")


def emit_sale(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ctx.emit("sale", {"amount": state.get("amount", 0)})
    if KNOBS.get("emit_then_fail"):
        KNOBS["emit_then_fail"] -= 1
        raise StepError("failed after emitting")
    return {"sold": True}


def collect(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect(f"collect:{ctx.index}", ctx)
    return {"seen": [*state.get("seen", []), [ctx.index, ctx.item]]}


def incr(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"n": state.get("n", 0) + 1}


def task_a(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect("task_a", ctx)
    return {"a": 1, "shared": "from_a", "nested": {"a": 1, "same": "a"}}


def task_b(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect("task_b", ctx)
    return {"b": 2, "shared": "from_b", "nested": {"b": 2, "same": "b"}}


def task_fails(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    raise StepError("task failed")


def blocks(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Blocks until RELEASE is set (timeout tests release it in teardown)."""
    RELEASE.wait(10)
    return {"blocked": False}


def read_input(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"saw_input": ctx.input}


class PaymentState(BaseModel):
    amount: int
    currency: str = "EUR"
    total: int = 0
    approved_by: str | None = None


def typed_add(state: PaymentState, ctx: StepContext) -> dict[str, Any]:
    assert isinstance(state, PaymentState)
    return {"total": state.total + state.amount}


class Approval(BaseModel):
    approver: str


def approve_within_cap(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Approves offline if the exposure counter has room, else declines; guards the approval
    so a concurrent approval cannot slip under the cap between the check and the commit."""
    _effect("approve", ctx)
    cap = int(state.get("cap", 100))
    exposure = ctx.services["store"].counters().get("offline", (0, 0))[0]
    if KNOBS.get("ignore_counters"):
        exposure = 0  # a step that never looks: its guard is all that stands in the way
    if exposure + state["amount"] > cap:
        return {"decision": "declined", "reason": "offline_amount_cap"}
    if KNOBS.get("barrier"):
        KNOBS["barrier"].wait(5)  # both racers have read the counter before either commits
    ctx.guard(
        "offline", amount=state["amount"], count=1, max_amount=cap, reason="offline_amount_cap"
    )
    return {"decision": "approved"}


def bump_counter(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one to the counter the input names (a guard without caps)."""
    ctx.guard(str(state["counter"]), count=1)
    return {}


def sees_attempt(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Records (attempt, last_attempt, replay); fails while KNOBS['flaky'] > 0."""
    EFFECTS.append((f"sees:{ctx.attempt}:{ctx.last_attempt}:{ctx.replay}", ctx.idempotency_key))
    if KNOBS.get("flaky", 0) > 0:
        KNOBS["flaky"] -= 1
        raise StepError("not yet")
    return {"seen": ctx.attempt}


def dies_once(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """The process 'dies' (a BaseException nothing catches) the first time it runs."""
    EFFECTS.append((f"dies_once:{ctx.replay}", ctx.idempotency_key))
    if not KNOBS.get("died"):
        KNOBS["died"] = True
        raise KNOBS["crash"]
    return {"replayed": ctx.replay}


def undo_flaky(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """A compensation that fails KNOBS['undo_flaky'] times, then undoes."""
    _effect(f"undo_flaky:{ctx.step}", ctx)
    if KNOBS.get("undo_flaky", 0) > 0:
        KNOBS["undo_flaky"] -= 1
        raise StepError("cannot undo yet")
    return {"undone": [*state.get("undone", []), ctx.step]}


def returns_bad_amount(state: PaymentState, ctx: StepContext) -> dict[str, Any]:
    """A bug: puts a card number where the state model wants an amount."""
    return {"amount": "4111111111111111x"}


def keyed(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Records its keys; fails KNOBS['keyed'] times (retryable), 'dies' once with
    KNOBS['keyed_crash'] (a BaseException) if set, then succeeds."""
    KEYS.append(("step", ctx.step, ctx.attempt, ctx.operation_key, ctx.idempotency_key))
    crash = KNOBS.pop("keyed_crash", None)
    if crash is not None:
        raise crash
    if KNOBS.get("keyed", 0) > 0:
        KNOBS["keyed"] -= 1
        raise StepError("not yet")
    return {"replayed": ctx.replay}


def undo_keyed(state: dict[str, Any], ctx: StepContext) -> None:
    """A compensation that records the keys it was given."""
    KEYS.append(("undo", ctx.step, ctx.attempt, ctx.operation_key, ctx.idempotency_key))


def keep_services(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Keeps (step, what it was handed as ``ctx.services``) in KNOBS['services']."""
    KNOBS.setdefault("services", []).append((ctx.step, ctx.services))
    return {}
