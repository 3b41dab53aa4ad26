"""What the tortures hand to the invariant checker (``hwsim.invariants``): what the POS
saw (``PosBook``) and the terminal as read after a crash (``Snapshot`` of ``Run``s and
``Message``s, the keys each run may have presented: ``Owners``), and the money rules that
say where a payment may hold a charge. Data and the rules that read it; no checks."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge.engine.context import idempotency_key

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "ROLLED_BACK", "CANCELLED"})
#: A payment decision while the acquirer may hold money the terminal is releasing.
UNKNOWN = "unknown"
#: Attempts of a step whose idempotency keys are traced back to its run: a retried step
#: presents a new key per attempt, so a second charge under another attempt's key is
#: still found (and counted as the double charge it is).
TRACED_ATTEMPTS = 5
#: Where a payment may hold money (edge/terminal/sale/workflows/payment.yaml, void.yaml): the
#: step whose answer is not recorded yet, and the steps that release it. Only the money
#: rules read step names, and only to say where a run is; keys come from the rows.
AUTHORIZE, REVERSE_UNKNOWN, VOID_REVERSE = "authorize_online", "reverse_unknown", "reverse_payment"
#: The offline exposure counter's name (``edge.terminal.sale.risk.OFFLINE``).
OFFLINE_COUNTER = "offline"


def attempt_keys(run_id: str, path: str) -> list[str]:
    """Every key a step at ``path`` may present: its operation key is the first
    attempt's idempotency key (``edge.engine.context.operation_key``), then one per
    retry."""
    return [idempotency_key(run_id, path, a) for a in range(1, TRACED_ATTEMPTS + 1)]


def money_may_be_held(
    status: str, decision: str | None, step: str | None, *, offline: bool = False
) -> str | None:
    """Why a payment run in this ``status``, with this ``decision``, at this ``step``
    (the top of its cursor) may hold an authorisation the acquirer has not reversed; None
    when it may not: money held with no approved run and no pending reversal."""
    if offline:
        return None  # an offline approval never reached the acquirer
    if status == "COMPLETED":
        return "approved" if decision == "approved" else None
    if status == "COMPENSATING":
        return "reversing its approval" if decision == "approved" else None
    if status in TERMINAL_STATUSES:
        return None
    if step == AUTHORIZE:
        return "authorising (its answer not recorded yet)"
    if decision == UNKNOWN and step == REVERSE_UNKNOWN:
        return "reversal pending"
    if decision == "approved":
        return "approved, finishing"
    return None


def reversal_pending(workflow: str, status: str, decision: str | None, step: str | None) -> bool:
    """A run still releasing money the customer may be charged: a payment whose outcome is
    unknown or whose approval the saga reverses, a void retrying its reversal."""
    if status in TERMINAL_STATUSES:
        return False
    if workflow == "payment":
        return decision == UNKNOWN or status == "COMPENSATING"
    return workflow == "void" and step == VOID_REVERSE


# --- what the POS saw --------------------------------------------------------------------


@dataclass(frozen=True)
class PosOutcome:
    """A final answer the POS got: the run, its status and decision."""

    kind: str  # payment | refund | void
    run_id: str
    status: str
    decision: str | None
    channel: str | None = None
    reason: str | None = None


@dataclass
class PosBook:
    """What the simulated POS sent and was told, by its idempotency key (the POS's own:
    the run carries ``pos:<workflow>:<key>``)."""

    sent: dict[str, str] = field(default_factory=dict)  # key -> kind
    run_ids: dict[str, str] = field(default_factory=dict)  # key -> first run id answered
    outcomes: dict[str, PosOutcome] = field(default_factory=dict)  # key -> final answer
    anomalies: list[str] = field(default_factory=list)
    retried: int = 0  # transactions that needed a retry after a kill
    retries: int = 0  # requests sent again after a kill
    #: Keys whose run the POS was shown as ``unknown``/``reversal_pending`` on the way.
    pending_seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: False when ``sent`` is not known whole (the cut torture's book holds answers only).
    knows_sent: bool = True

    def snapshot(self) -> PosBook:
        with self.lock:
            return PosBook(
                dict(self.sent),
                dict(self.run_ids),
                dict(self.outcomes),
                list(self.anomalies),
                self.retried,
                self.retries,
                set(self.pending_seen),
                knows_sent=self.knows_sent,
            )


def pos_key(run_key: str) -> str:
    """The POS's key inside the run's (the API prefixes it: ``pos:<workflow>:<key>``)."""
    return run_key.rsplit(":", 1)[-1]


# --- the terminal as read -----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run as the checks see it: its row, and the top of its cursor while in flight."""

    run_id: str
    workflow: str
    status: str
    key: str | None  # the run's idempotency key
    state: Mapping[str, Any]
    step: str | None = None  # the top of the cursor: where it is, or None once finished
    error: Any = None

    def _str(self, name: str) -> str | None:
        value = self.state.get(name)
        return None if value is None else str(value)

    @property
    def decision(self) -> str | None:
        return self._str("decision")

    @property
    def channel(self) -> str | None:
        return self._str("channel")

    @property
    def offline(self) -> bool:
        return bool(self.state.get("offline"))

    @property
    def amount(self) -> int:
        return int(self.state.get("amount_minor") or 0)

    @property
    def auth_key(self) -> str | None:
        return self._str("auth_key")

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def went_unknown(self) -> bool:
        """A payment whose authorisation was recorded as of unknown outcome (and reversed,
        once it is declined): the outcome keeps the key in its state."""
        return (
            self.workflow == "payment"
            and self.auth_key is not None
            and self.decision in (UNKNOWN, "declined")
        )

    @property
    def reversal_pending(self) -> bool:
        return reversal_pending(self.workflow, self.status, self.decision, self.step)

    def where(self) -> str:
        at = f" at {self.step}" if self.step and not self.finished else ""
        return f"{self.status}, {self.decision}{at}"


@dataclass(frozen=True)
class Message:
    """One outbox message the terminal recorded. ``acknowledged``: the cloud holds it and
    the terminal dropped it (only an acknowledgement removes a message)."""

    message_id: str
    run_id: str | None
    topic: str
    payload: Mapping[str, Any]
    seq: int
    acknowledged: bool = False

    @property
    def decision(self) -> Any:
        return self.payload.get("decision")


@dataclass
class Snapshot:
    """A terminal as one torture read it, for ``check``."""

    runs: Mapping[str, Run]
    #: Every message recorded: still in the outbox, or acknowledged (the cloud's copy).
    messages: Sequence[Message]
    counters: Mapping[str, tuple[int, int]]
    #: Acquirer key -> (run id, workflow): every key a run's steps may have presented.
    owners: Mapping[str, tuple[str, str]]
    #: The outbox as it stands: (payload bytes, messages); None if not read.
    outbox: tuple[int, int] | None = None
    #: Found while reading (say, a message the cloud holds that changed since).
    problems: list[str] = field(default_factory=list)


class Owners:
    """Builds ``Snapshot.owners``: call ``step`` for each step row (its path, and the
    operation key it records) and for the step each run in flight is on (no row yet:
    ``operation_key`` None)."""

    def __init__(self, keys: dict[str, tuple[str, str]] | None = None) -> None:
        self.keys: dict[str, tuple[str, str]] = {} if keys is None else keys
        self._paths: set[tuple[str, str]] = set()

    def step(self, run_id: str, workflow: str, path: str, operation_key: str | None) -> None:
        if operation_key:
            self.keys[operation_key] = (run_id, workflow)
        if (run_id, path) not in self._paths:
            self._paths.add((run_id, path))
            for key in attempt_keys(run_id, path):
                self.keys.setdefault(key, (run_id, workflow))
