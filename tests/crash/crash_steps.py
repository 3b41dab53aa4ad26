"""Step functions for the crash tests, copied into each test's ``tmp_path``.

Every call appends one line to ``ledger.jsonl`` beside this file (append, flush,
fsync) BEFORE returning, the way a real acquirer would see the request: a process killed
after the effect but before the engine's commit leaves the effect in the ledger. The key
the step presents tells a replay (same key, recognised downstream) from a new effect.

``TILLFLOW_CRASH_BLOCK_AT=<function name>`` makes that function, after its effect, say
``BLOCKED <run_id> <key>`` on stdout and block on stdin so that the parent can SIGKILL
the process inside the step. Only the child process of a test sets it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from edge.engine import StepContext
from edge.errors import StepError

LEDGER = Path(__file__).with_name("ledger.jsonl")
BLOCK_AT_ENV = "TILLFLOW_CRASH_BLOCK_AT"
#: Fail the first attempt of this function (retryably), for tests of retried attempts.
FAIL_FIRST_ENV = "TILLFLOW_CRASH_FAIL_FIRST"


def _effect(name: str, kind: str, ctx: StepContext) -> None:
    entry = {
        "fn": name,
        "kind": kind,
        "run_id": ctx.run_id,
        "step": ctx.step,
        "attempt": ctx.attempt,
        "key": ctx.idempotency_key,
        "pid": os.getpid(),
    }
    with LEDGER.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if os.environ.get(FAIL_FIRST_ENV) == name and ctx.attempt == 1:
        raise StepError(f"{name}: transient failure on attempt 1")
    if os.environ.get(BLOCK_AT_ENV) == name:
        sys.stdout.write(f"BLOCKED {ctx.run_id} {ctx.idempotency_key}\n")
        sys.stdout.flush()
        sys.stdin.readline()  # the parent kills us here; EOF means it gave up on us
        raise SystemExit(f"{name}: parent closed stdin instead of killing this process")


def reserve(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect("reserve", "step", ctx)
    return {"reservation": f"R-{ctx.idempotency_key[:8]}"}


def release(state: dict[str, Any], ctx: StepContext) -> None:
    _effect("release", "compensation", ctx)


def charge(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect("charge", "step", ctx)
    return {"charge_id": f"C-{ctx.idempotency_key[:8]}"}


def refund(state: dict[str, Any], ctx: StepContext) -> None:
    _effect("refund", "compensation", ctx)


def charge_item(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect("charge_item", "step", ctx)
    return {"charged": [*state.get("charged", []), ctx.item]}


def print_receipt(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect("print_receipt", "step", ctx)
    return {"receipt": f"{state['amount'] / 100:.2f} approved"}


def record_sale(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect("record_sale", "step", ctx)
    ctx.emit("sale", {"amount": state["amount"], "charge_id": state.get("charge_id")})
    return {"outcome": "approved"}


def decline(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _effect("decline", "step", ctx)
    raise StepError("issuer declined", retryable=False)
