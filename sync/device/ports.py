"""What the device client needs of the terminal and its store, and nothing more.

``edge.terminal.service.terminal.Terminal`` is a ``TerminalHooks`` and its store a
``SyncStore``; the tests pass small fakes. Edge never imports sync: the client reaches
the terminal only through these.
"""

from __future__ import annotations

from typing import Any, Protocol

from edge.engine.ports import CommandLedger, OutboxSource
from edge.engine.records import AuditRetention


class SyncStore(OutboxSource, CommandLedger, Protocol):
    """The outbox and audit log to upload, and the command ledger to record into."""

    def audit_retention(self, stream: int = 0) -> AuditRetention | None: ...


class TerminalHooks(Protocol):
    """The terminal as the sync client drives it."""

    #: The terminal's last error, reported in health; the sync runner sets it (``sync:``).
    last_error: str | None

    def health(self) -> dict[str, Any]:
        """What ``GET /v1/health`` answers: the heartbeat is made from it."""

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        """The cloud holds the outbox and audit log up to these seqs: drop what it holds
        and release the offline exposure of the sales among it (one transaction)."""

    def refresh_documents(self) -> None:
        """Put the config and policy documents just recorded in force."""

    def active_policy_version(self) -> int | None:
        """The fraud policy version in force (file or document): a new one must be above."""
