"""The rows that cross the Store seam. Plain data: no behaviour, no SQL, no driver types."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal


class Status(StrEnum):
    RUNNING = "RUNNING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    COMPENSATING = "COMPENSATING"
    ROLLED_BACK = "ROLLED_BACK"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.ROLLED_BACK, Status.CANCELLED})
IN_FLIGHT = (Status.RUNNING, Status.COMPENSATING, Status.WAITING)


@dataclass
class RunRecord:
    run_id: str
    workflow_type: str
    definition_hash: str
    fingerprints: dict[str, str]
    status: Status
    state: dict[str, Any]
    input: dict[str, Any]
    #: Where the run stands: {"frames": [[step, loop_index|None], ...], "attempt": n, ...}
    cursor: dict[str, Any]
    revision: int
    created_at: float
    updated_at: float
    idempotency_key: str | None = None
    parent_run_id: str | None = None
    parent_step: str | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    #: When the run is next due: end of a retry backoff, or a WAIT's timeout.
    next_attempt_at: float | None = None
    error: dict[str, Any] | None = None


@dataclass
class StepRecord:
    """One attempt's outcome (or a compensation's, or a routing decision)."""

    run_id: str
    step: str  # path, e.g. "charge" or "items[2].reserve"
    step_name: str
    kind: str  # "step" | "compensation" | "decision" | "input" | "timeout"
    status: str  # COMPLETED | FAILED | RETRYING | TIMED_OUT
    attempt: int
    started_at: float
    finished_at: float
    output: Any = None
    error: dict[str, Any] | None = None
    #: For a compensation: the seq of the step row it compensates.
    ref_seq: int | None = None
    seq: int | None = None  # assigned by the store
    #: The step's stable operation key (``StepContext.operation_key``): the same on
    #: every attempt and after a crash; a compensation reads it from here.
    operation_key: str | None = None


@dataclass
class AuditEvent:
    run_id: str | None
    event: str
    at: float
    step: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditRow:
    seq: int
    run_id: str | None
    event: str
    step: str | None
    detail: dict[str, Any]
    at: float
    prev_hash: str
    hash: str
    #: The chain the row belongs to (``audit.stream_of``; a terminal has only 0) and
    #: the hash rule it was written with (``audit.HASH_VERSION``; 1 for older rows).
    stream: int = 0
    version: int = 2


@dataclass
class OutboxMessage:
    message_id: str
    run_id: str | None
    step: str | None
    topic: str
    payload: Any
    created_at: float
    seq: int | None = None  # assigned by the store: device-monotonic


@dataclass(frozen=True)
class Guard:
    """Change counter ``name`` by (``amount``, ``count``) in the step's transaction, only if
    it stays within ``max_amount``/``max_count`` (None: no cap) and never below zero.
    Otherwise nothing commits and the step learns ``reason`` (LimitExceeded)."""

    name: str
    amount: int = 0
    count: int = 0
    max_amount: int | None = None
    max_count: int | None = None
    reason: str = "limit_exceeded"


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    bytes: int
    oldest: float | None  # created_at of the oldest unacknowledged message
    last_seq: int


@dataclass(frozen=True)
class Acknowledgement:
    """What the cloud confirmed it holds, and the counter changes that go with it.

    ``releases`` maps an outbox message's ``seq`` to the counter changes its removal
    makes (e.g. the offline exposure an offline sale held). A store applies them in the
    transaction that removes the messages, and only for messages that transaction really
    removes: an acknowledgement repeated, or raced by another, releases nothing twice.
    A message's changes apply in order and stop at the first one its counter refuses (a
    cap, or zero): put a once-only marker first (``max_count=1``) and what follows it is
    given back once, by whichever of the acknowledgement or another commit (a void)
    takes the marker first.
    """

    outbox_through: int | None = None
    audit_through: int | None = None
    releases: Mapping[int, tuple[Guard, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class AckResult:
    """What one acknowledgement changed."""

    messages: int = 0  # outbox messages removed
    released: tuple[Guard, ...] = ()  # the counter changes applied with them


@dataclass(frozen=True)
class AuditRetention:
    """Where the kept audit chain starts, and how far the cloud has acknowledged it."""

    base_seq: int  # the last row compacted away (0: none); the chain resumes after it
    base_hash: str  # that row's hash: the first kept row's prev_hash
    acked_seq: int


@dataclass(frozen=True)
class Compaction:
    """What one retention pass removed."""

    runs: int = 0
    steps: int = 0
    audit_rows: int = 0
    counters: int = 0


@dataclass
class Commit:
    """Everything one step outcome changes; a store applies it in ONE transaction.

    ``run`` replaces the stored run row if its revision is still ``expected_revision``
    (else LeaseLost: another worker got there first and this outcome is dropped).
    """

    run: RunRecord
    expected_revision: int
    steps: list[StepRecord] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    outbox: list[OutboxMessage] = field(default_factory=list)
    #: Counter changes with caps, checked in the same transaction (see Guard).
    guards: list[Guard] = field(default_factory=list)
    new_runs: list[RunRecord] = field(default_factory=list)
    #: Parents to wake (WAITING on a child that just finished): made RUNNING and due now.
    wake: list[str] = field(default_factory=list)
    #: Identifies this commit, so a store that lost its connection during COMMIT can
    #: tell whether it landed (and must not be applied again).
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class CommandRecord:
    """A command from the control plane, as the terminal takes it: ONE transaction
    (``CommandLedger.record_command``, DESIGN.md invariant 8).

    ``seq`` not None: the ledger row (compare-and-set: ``seq`` must be above every seq
    recorded, else nothing is written), the ``document`` it brings into force (only with
    ``status`` applied: ``(kind, version, content)``), then ``audit`` and ``outbox``.
    ``seq`` None: a command that never gets a ledger row (forged, replayed): only its
    ``audit`` events (and ``outbox`` messages, if any) are written.
    """

    seq: int | None
    command_id: str
    action: str
    status: Literal["applied", "refused"]
    reason: str | None
    issued_at: float
    at: float
    document: tuple[str, int, dict[str, Any]] | None = None
    audit: list[AuditEvent] = field(default_factory=list)
    outbox: list[OutboxMessage] = field(default_factory=list)


@dataclass
class RunView:
    """Everything ``show`` reports about one run."""

    run: RunRecord
    steps: list[StepRecord]
    audit: list[AuditRow]
