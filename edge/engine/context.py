"""What a step function receives besides the state: ``fn(state, ctx) -> dict | None``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from edge.engine.clock import Clock
from edge.engine.records import Guard, OutboxMessage


def idempotency_key(run_id: str, step: str, attempt: int) -> str:
    """Stable per (run, step, attempt): a retried step presents a new key, a step re-run
    after a crash (same attempt, never committed) presents the same one, so the system
    downstream can tell a replay from a new request."""
    return hashlib.sha256(f"{run_id}\x1f{step}\x1f{attempt}".encode()).hexdigest()[:32]


def operation_key(run_id: str, step: str) -> str:
    """The stable key of the operation a step performs: the same on every attempt and
    after a crash. It is the first attempt's idempotency key (``idempotency_key(run_id,
    step, 1)``), so runs started before operation keys existed find what their first
    attempt did (e.g. an authorisation) under it. The engine records it on the step's
    rows (``StepRecord.operation_key``); a compensation reads it from there."""
    return idempotency_key(run_id, step, 1)


@dataclass
class StepContext:
    """``idempotency_key`` names this attempt (a retry presents a new one);
    ``operation_key`` names the operation (every attempt, and a replay after a crash,
    present the same one). A compensation sees the operation key recorded with the step
    it undoes, so it finds what that step did (say, the authorisation it reverses)
    without rebuilding a key from a step name; its own attempts still get new
    idempotency keys. Left empty, ``operation_key`` is ``operation_key(run_id, step)``."""

    run_id: str
    step: str
    attempt: int
    idempotency_key: str
    clock: Clock
    operation_key: str = ""
    #: Data given to ``resume`` (WAIT) or to ``start`` (the run's input).
    input: Any = None
    #: Current element and position of the innermost ITERATE/WHILE loop.
    item: Any = None
    index: int | None = None
    #: For a compensation: what the compensated step returned.
    output: Any = None
    #: No retry follows if this attempt fails (its policy's last, or not retryable): a
    #: step whose effect's outcome is unknown can record that instead of failing.
    last_attempt: bool = True
    #: This attempt may already have run in a process that died before committing it
    #: (the run was taken over from a dead or expired holder): an external effect may
    #: have happened even if this incarnation sees "not sent".
    replay: bool = False
    #: What the runtime hands to steps (ports to hardware, policy, keys): whatever was
    #: given as ``Engine(services=...)``, opaque to the engine; an empty object if nothing.
    services: Any = field(default_factory=SimpleNamespace, repr=False)
    _emitted: list[OutboxMessage] = field(default_factory=list, repr=False)
    _guards: list[Guard] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.operation_key:
            self.operation_key = operation_key(self.run_id, self.step)

    def guard(
        self,
        name: str,
        *,
        amount: int = 0,
        count: int = 0,
        max_amount: int | None = None,
        max_count: int | None = None,
        reason: str = "limit_exceeded",
    ) -> None:
        """Change counter ``name`` with this step's outcome, only within the caps.

        Checked inside the commit's transaction, so two concurrent steps cannot both slip
        under a cap. If it would pass one, nothing commits and the step runs again (same
        attempt, same idempotency key) against the new totals; a step that keeps being
        refused fails with LimitExceeded(``reason``).
        """
        self._guards.append(Guard(name, amount, count, max_amount, max_count, reason))

    def emit(self, topic: str, payload: Any) -> str:
        """Queue a message for the cloud; it commits with this step's outcome, or not at all.
        Returns its message id, stable across a crash-replay of the same attempt."""
        message_id = f"{self.idempotency_key}-{len(self._emitted)}"
        self._emitted.append(
            OutboxMessage(
                message_id=message_id,
                run_id=self.run_id,
                step=self.step,
                topic=topic,
                payload=payload,
                created_at=self.clock.now(),
            )
        )
        return message_id
