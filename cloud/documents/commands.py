"""Commands as operators send and follow them: to one device, or to every active device
of a group or a store in one call (``SyncService.queue_commands``: a sealed command per
device under its own seq, one batch id), with the document they carry named by
``(kind, version)`` -- a version the documents service stored, so validated with the
terminal's model.

A command's status, as the API shows it::

    queued ──(the device's next sync takes it)──► delivered ──► applied
                                                          └───► refused (the device's reason)
    queued/delivered, past expires_at, no result yet ───► expired

``expired`` is how a pending command past its expiry reads (``commands``), and what
``sweep_expired`` writes; the device's own answer still wins when it comes later (a
command the device applied offline before it expired reads ``applied`` once that
result is synced).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cloud.documents import service
from cloud.documents._sql import Conn, Q
from cloud.documents.errors import NotFound
from cloud.fleet.tokens import Principal
from sync.server import CommandBatch, CommandTarget, NewDocument, SyncService

STATUSES = ("queued", "delivered", "applied", "refused", "expired")


@dataclass(frozen=True)
class CommandStatus:
    command_no: int
    command_id: str
    device_id: str
    seq: int
    action: str
    batch_id: str | None
    status: str
    reason: str | None
    created_at: float
    expires_at: float
    delivered_at: float | None
    result_at: float | None
    document_kind: str | None
    document_version: int | None


@dataclass(frozen=True)
class BatchStatus:
    batch_id: str
    action: str
    created_at: float
    expires_at: float
    total: int
    by_status: dict[str, int]


def send(
    conn: Conn,
    sync: SyncService,
    who: Principal,
    target: CommandTarget,
    action: str,
    *,
    document: tuple[str, int] | None = None,
    ttl_s: float,
    at: float,
) -> CommandBatch:
    """Queue ``action`` for ``target`` (``sync`` working in ``conn``'s transaction:
    ``FleetContext.sync_in(conn)``) and record it (``command.send``), together.
    ``document``: the stored (kind, version) it carries (``document_not_found``)."""
    doc = None
    if document is not None:
        stored = service.get(conn, document[0], document[1])
        assert stored.content is not None
        doc = NewDocument(stored.content, stored.kind, stored.version)  # type: ignore[arg-type]
    batch = sync.queue_commands(target, action, doc, ttl_s)
    detail: dict[str, Any] = {
        "batch_id": batch.batch_id,
        "action": action,
        "devices": len(batch.commands),
        "expires_at": batch.expires_at,
        "document": None if document is None else {"kind": document[0], "version": document[1]},
    }
    service.record(conn, who, "command.send", f"{target.scope}:{target.value}", detail, at)
    return batch


def _status(r: Sequence[Any]) -> CommandStatus:
    return CommandStatus(
        int(r[0]), r[1], r[2], int(r[3]), r[4], r[5], r[6], r[7], float(r[8]), float(r[9]),
        r[10], r[11], r[12], None if r[13] is None else int(r[13]),
    )  # fmt: skip


def commands(
    conn: Conn,
    *,
    now: float,
    device_id: str | None = None,
    status: str | None = None,
    batch_id: str | None = None,
    command_id: str | None = None,
    after: int | None = None,
    limit: int = 100,
) -> list[CommandStatus]:
    """Commands newest first (below the cursor ``after``, a ``command_no``), each filter
    None or matched, with the status as it reads at ``now``."""
    params = {"now": now, "device_id": device_id, "status": status, "batch_id": batch_id,
              "command_id": command_id, "after": after, "limit": limit}  # fmt: skip
    return [_status(r) for r in conn.execute(Q["commands"], params).fetchall()]


def command(conn: Conn, command_id: str, *, now: float) -> CommandStatus:
    found = commands(conn, now=now, command_id=command_id, limit=1)
    if not found:
        raise NotFound("command_not_found", f"no command {command_id[:80]}", field="command_id")
    return found[0]


def batch(conn: Conn, batch_id: str, *, now: float) -> BatchStatus:
    """A batch's commands counted by status (every status present, 0 where none)."""
    rows = conn.execute(Q["batch_counts"], {"batch_id": batch_id, "now": now}).fetchall()
    if not rows:
        raise NotFound("batch_not_found", f"no command batch {batch_id[:80]}", field="batch_id")
    counts = dict.fromkeys(STATUSES, 0)
    for _, _, _, status, n in rows:
        counts[status] = int(n)
    first = rows[0]
    return BatchStatus(
        batch_id,
        str(first[0]),
        min(float(r[1]) for r in rows),
        max(float(r[2]) for r in rows),
        sum(counts.values()),
        counts,
    )


def sweep_expired(conn: Conn, *, now: float) -> int:
    """Mark ``expired`` every command still queued or delivered past its expiry (a
    periodic job's body; reads show it so already). Returns how many."""
    return len(conn.execute(Q["sweep_expired"], {"now": now}).fetchall())


__all__ = [
    "STATUSES",
    "BatchStatus",
    "CommandStatus",
    "batch",
    "command",
    "commands",
    "send",
    "sweep_expired",
]
