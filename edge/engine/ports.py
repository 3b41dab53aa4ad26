"""The engine's ports: what it needs from persistence and execution, nothing more.

A terminal plugs in SQLite and an inline executor; the cloud plugs in PostgreSQL and
Celery. Stores see rows (``records``), never workflow semantics: they do not know what
a saga or a loop is. The contract each method must keep is in its docstring and is
checked by ``tests/conformance`` against every store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from edge.engine.clock import Clock
from edge.engine.records import (
    Acknowledgement,
    AckResult,
    AuditRetention,
    AuditRow,
    CommandRecord,
    Commit,
    Compaction,
    OutboxMessage,
    OutboxStats,
    RunRecord,
    Status,
    StepRecord,
)


class Store(Protocol):
    """What the engine calls, and nothing else."""

    # --- schema ------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply pending migrations, each in its own transaction; return the version."""

    def schema_version(self) -> int:
        """The highest applied migration (0 for an empty database)."""

    # --- definitions -------------------------------------------------------------
    def save_definition(
        self, content_hash: str, workflow_type: str, version: str, snapshot: str, at: float
    ) -> None:
        """Store a definition snapshot; saving the same hash again is a no-op."""

    def load_definition(self, content_hash: str) -> str | None:
        """The snapshot stored under ``content_hash``, or None."""

    def latest_definition(self, workflow_type: str) -> str | None:
        """The most recently registered snapshot of ``workflow_type``, or None."""

    # --- runs ----------------------------------------------------------------------
    def start(self, commit: Commit) -> tuple[str, bool]:
        """Insert ``commit.run`` with its audit rows in one transaction.

        If a run with the same ``idempotency_key`` exists, insert nothing and return
        ``(existing_run_id, False)`` -- also when two callers race. Else
        ``(run_id, True)``.
        """

    def commit(self, commit: Commit) -> None:
        """Apply one step outcome atomically: replace the run row if its revision is
        still ``commit.expected_revision`` (else raise LeaseLost and change nothing);
        append steps (assigning ``seq``), audit rows (chained with ``audit.link``),
        outbox messages (assigning a monotonic ``seq``); apply ``guards`` (any that
        would pass its cap raises LimitExceeded and nothing commits); insert ``new_runs``; wake
        ``wake`` parents (WAITING -> RUNNING, due now, lease cleared, revision + 1)."""

    def claim(
        self, run_id: str, expected_revision: int, owner: str, lease_expires_at: float
    ) -> RunRecord | None:
        """Take the lease on a run if its revision is unchanged; revision + 1.
        Returns the claimed run, or None if someone else changed it first."""

    def claim_due(
        self, owner: str, now: float, lease_expires_at: float, limit: int
    ) -> list[RunRecord]:
        """Claim up to ``limit`` runs that are due now and not held by a live lease:
        RUNNING/COMPENSATING runs whose ``next_attempt_at`` is null or past and whose
        lease is free, expired or ``owner``'s; WAITING runs whose timeout passed. Each is
        leased to ``owner`` (revision + 1) and returned. Concurrent callers never get the
        same run (PostgreSQL: ``FOR UPDATE SKIP LOCKED``)."""

    def renew_lease(self, run_id: str, owner: str, lease_expires_at: float) -> bool:
        """Extend a lease this owner holds; False if it no longer holds it."""

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def list_runs(
        self, statuses: Sequence[Status] | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """Most recent first."""

    def recoverable(self, now: float, limit: int = 1000) -> list[RunRecord]:
        """Runs that may need a worker: RUNNING or COMPENSATING (any lease), and WAITING
        runs whose ``next_attempt_at`` (timeout) is at or before ``now``. Oldest first."""

    def step_history(self, run_id: str) -> list[StepRecord]:
        """All step rows of a run, in ``seq`` order."""

    # --- audit and outbox ------------------------------------------------------------
    def audit_rows(self, run_id: str | None = None) -> Iterator[AuditRow]:
        """Audit rows in (stream, seq) order, for one run or the whole database."""

    def audit_head(self, stream: int = 0) -> tuple[int, str] | None:
        """(seq, hash) of a stream's last audit row, kept in the same transaction."""

    def audit_heads(self) -> dict[int, tuple[int, str]]:
        """Every stream's (seq, hash) head, for the verifier (``audit.verify_streams``)."""

    def audit_retention(self, stream: int = 0) -> AuditRetention | None:
        """Where retention has compacted a stream to; None if nothing was acknowledged."""

    def close(self) -> None: ...


class OutboxSource(Protocol):
    """What a store holds for the cloud (the sync client's source): the outbox, and the
    one way anything in it, or in the audit log, is acknowledged. The engine never calls it."""

    def outbox(self, after_seq: int = 0, limit: int = 100) -> list[OutboxMessage]:
        """Unacknowledged messages after ``after_seq``, in ``seq`` order."""

    def outbox_stats(self) -> OutboxStats:
        """Depth, payload bytes, oldest message time and last seq of the outbox."""

    def database_id(self) -> str:
        """The database's own id (32 lowercase hex), drawn once when it was created and
        never changed: the sync protocol's ``stream``. A re-flashed or replaced database
        draws a new one, so its outbox seqs never collide with the old database's."""

    def audit_after(self, after_seq: int, limit: int, stream: int = 0) -> list[AuditRow]:
        """Up to ``limit`` audit rows of ``stream`` with a seq above ``after_seq``, in seq
        order (what the sync client uploads after the last acknowledged row)."""

    def acknowledge(self, ack: Acknowledgement) -> AckResult:
        """In one transaction: delete outbox messages up to ``ack.outbox_through``, apply
        ``ack.releases`` of exactly the messages deleted (never below zero: an ack always
        goes through), and mark the audit log held up to ``ack.audit_through`` (rows up
        to it may be compacted). Repeating an acknowledgement changes nothing."""


class CommandLedger(Protocol):
    """The commands a terminal took from the control plane, and the documents they
    brought into force (DESIGN.md invariants 8 and 10). The engine never calls it."""

    def command_high_water(self) -> int:
        """The highest command seq recorded (applied or refused); 0 if none."""

    def trusted_time(self) -> float | None:
        """The latest ``issued_at`` of a recorded command (a time the control plane
        signed): the terminal's clock may not be set back behind it. None if none."""

    def active_document(self, kind: str) -> tuple[int, dict[str, Any]] | None:
        """(version, content) of the highest version of a ``kind`` document, or None."""

    def record_command(self, rec: CommandRecord) -> bool:
        """In ONE transaction: if ``rec.seq`` is not None, compare-and-set it above the
        high water (an equal or lower seq returns False and writes nothing), insert the
        ledger row and ``rec.document``; then append ``rec.audit`` (chained as a
        commit's) and ``rec.outbox`` (within the outbox bound, as a commit's). A part
        that fails rolls back every part. With ``seq`` None only the audit events and
        outbox messages are written. True when it was written."""


class Maintenance(Protocol):
    """Retention and the counters behind guards: run by a terminal's maintenance pass."""

    def counters(self) -> dict[str, tuple[int, int]]:
        """Every guarded counter: name -> (amount, count)."""

    def compact(
        self,
        *,
        before: float,
        counter_prefix: str | None = None,
        counters_before: float | None = None,
    ) -> Compaction:
        """Retention, in one transaction: remove finished runs last changed before
        ``before`` (with their steps and input; a parent stays while a descendant is
        kept), acknowledged audit rows written before ``before`` (moving the chain's
        base), and counters named ``counter_prefix…`` unchanged since ``counters_before``."""


class Driver(Protocol):
    """The engine as an executor sees it: something that advances runs, on a clock."""

    @property
    def clock(self) -> Clock: ...

    def advance(self, run_id: str, claimed: RunRecord | None = None) -> None:
        """Advance ``run_id`` as far as it can go now; a run left sleeping through a
        retry backoff is handed back to the executor with ``submit(run_id, due)``."""


class Executor(Protocol):
    """Decides where and when a runnable run is advanced. The engine tells it, and never
    asks what it is: everything an executor needs of the engine is declared here.

    The engine calls ``submit`` for every run it makes runnable: a new run, a child, a
    woken parent, a resumed or recovered run, and a run that sleeps through a retry
    backoff (``not_before`` = when it is due). A submission may be lost or repeated
    without harm: the run is durable, ``advance`` leases it by compare-and-set, and
    ``Engine.recover`` (or a worker's ``claim_due``) finds whatever nobody advanced.
    """

    #: True when ``submit`` advances the run in the calling thread before returning (the
    #: inline executor): the engine then leases a new run to itself at birth, saving a
    #: claim. False (a queue, a broker, polling workers): new runs are left unleased, for
    #: whoever advances them to claim.
    advances_in_caller: bool

    def bind(self, engine: Driver) -> None:
        """Called once by ``Engine(...)`` with the engine that submits to this executor;
        an executor that advances runs itself keeps it (a broker's may ignore it)."""

    def submit(self, run_id: str, not_before: float | None = None) -> None:
        """Arrange for ``run_id`` to be advanced, at or after ``not_before`` (a clock
        time; None: now). Called from inside ``advance`` too: an executor that advances
        in the caller's thread must queue such a call, not recurse."""
