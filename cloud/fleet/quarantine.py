"""The quarantine as operators work it: list and read items, replay one, discard one.

A **replay** runs the stored entry through the sync service's ingest again, as the
device's, in the caller's transaction (under the device's row lock, as an exchange
runs): an outbox entry through the same per-entry judgement a sync uses
(``SyncService._take_outbox``); an audit row onto the chain the cloud holds
(``walk_chain``). It lands (applied, or a duplicate of what the cloud holds: the item is
``replayed``) or stays quarantined, the item's reason and detail now the new ones. Should
the ingest keep it as a new record (the entry reads differently now, so its fingerprint
differs), the old item is ``replayed`` and the new one is open in its place. A
**discard** sets ``discarded``. Either notes who did it and why
(``quarantine_decisions``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cloud.fleet._sql import Conn, Q
from sync import wire
from sync.server import SyncService
from sync.server_ingest import BadItem, walk_chain


@dataclass(frozen=True)
class Item:
    id: int
    device_id: str
    stream: str
    seq: int
    kind: str
    reason: str
    detail: str
    received_at: float
    status: str
    entry: str | None = None

    def parsed_entry(self) -> Any:
        """The entry as the device sent it (JSON; NaN and the like read back as such)."""
        if self.entry is None:
            return None
        try:
            return json.loads(self.entry)
        except ValueError:
            return self.entry


def _item(r: Sequence[Any]) -> Item:
    return Item(int(r[0]), r[1], r[2], int(r[3]), r[4], r[5], r[6], float(r[7]), r[8],
                r[9] if len(r) > 9 else None)  # fmt: skip


def items(
    conn: Conn,
    *,
    after: int | None,
    device_id: str | None,
    status: str | None,
    kind: str | None,
    limit: int,
) -> list[Item]:
    params = {
        "after": after, "device_id": device_id, "status": status, "kind": kind, "limit": limit,
    }  # fmt: skip
    return [_item(r) for r in conn.execute(Q["quarantine_items"], params).fetchall()]


def item(conn: Conn, id_: int, *, lock: bool = False) -> Item | None:
    q = Q["quarantine_item_lock" if lock else "quarantine_item"]
    row = conn.execute(q, {"id": id_}).fetchone()
    return None if row is None else _item(row)


@dataclass(frozen=True)
class Decision:
    decision: str
    actor: str
    reason: str | None
    at: float


def decisions(conn: Conn, id_: int) -> list[Decision]:
    rows = conn.execute(Q["decisions"], {"id": id_}).fetchall()
    return [Decision(r[0], r[1], r[2], float(r[3])) for r in rows]


def _decide(conn: Conn, id_: int, decision: str, actor: str, reason: str | None, at: float) -> None:
    params = {"id": id_, "decision": decision, "actor": actor, "reason": reason, "at": at}
    conn.execute(Q["add_decision"], params)


def discard(conn: Conn, it: Item, *, actor: str, why: str, at: float) -> None:
    conn.execute(
        Q["settle_quarantine"],
        {"id": it.id, "status": "discarded", "reason": it.reason, "detail": it.detail},
    )
    _decide(conn, it.id, "discarded", actor, why, at)


@dataclass(frozen=True)
class Replayed:
    """How a replay came out: ``landed`` (applied or duplicate), or still quarantined
    with ``reason``/``detail``; ``superseded_by``: the new item that holds it now."""

    outcome: str  # applied, duplicate, rejected, conflict, chain_broken, ...
    landed: bool
    reason: str | None
    detail: str | None
    superseded_by: int | None = None


def replay(
    conn: Conn, service: SyncService, it: Item, *, actor: str, why: str | None, at: float
) -> Replayed:
    """Re-run ``it`` (locked by the caller) through the ingest on ``service`` (bound to
    ``conn``'s transaction) and settle it."""
    raw = it.parsed_entry()
    with service.backend.transaction() as tx:
        device = tx.device(it.device_id, lock=True)
        if device is None:
            raise LookupError(f"no device {it.device_id}")
        if it.kind == "outbox":
            result = _replay_outbox(service, tx, device, it, raw, at)
        else:
            result = _replay_audit(tx, it, raw, at)
    newer = [
        int(r[0])
        for r in conn.execute(
            Q["superseding_items"],
            {"device_id": it.device_id, "stream": it.stream, "kind": it.kind, "seq": it.seq,
             "id": it.id, "at": at},
        ).fetchall()
    ]  # fmt: skip
    if result.landed or newer:
        status, reason, detail = "replayed", it.reason, it.detail
    else:
        status, reason, detail = "open", result.reason or it.reason, result.detail or it.detail
    conn.execute(
        Q["settle_quarantine"], {"id": it.id, "status": status, "reason": reason, "detail": detail}
    )
    decision = "replayed" if result.landed else "still_quarantined"
    note = why if not newer else f"{why or 'replayed'}; now kept as quarantine item {newer[0]}"
    _decide(conn, it.id, decision, actor, note, at)
    if newer:
        return Replayed(result.outcome, result.landed, result.reason, result.detail, newer[0])
    return result


def _replay_outbox(
    service: SyncService, tx: Any, device: Any, it: Item, raw: Any, at: float
) -> Replayed:
    entry: wire.OutboxEntry | BadItem
    try:
        entry = wire.decode(raw, wire.OutboxEntry)
    except wire.WireError as exc:
        entry = BadItem(it.seq, exc.message, raw)
    # The sync's own per-entry judgement, so a replay is judged exactly as a sync is.
    results, _ = service._take_outbox(tx, device, it.stream, [entry], at, False)
    verdict = results[0]
    landed = verdict.status in ("applied", "duplicate")
    detail = None if landed else f"replayed: {verdict.status} ({verdict.reason})"
    return Replayed(verdict.status, landed, verdict.reason, detail)


def _replay_audit(tx: Any, it: Item, raw: Any, at: float) -> Replayed:
    chain_no = raw.get("chain", 0) if isinstance(raw, dict) else 0
    row: wire.AuditEntry | BadItem
    try:
        row = wire.decode(raw, wire.AuditEntry)
    except wire.WireError as exc:
        row = BadItem(it.seq, exc.message, raw, chain_no if isinstance(chain_no, int) else 0)
    start = tx.chain(it.device_id, it.stream, row.chain)
    if start is None:
        return Replayed(
            "no_chain", False, "no_chain", "replayed: the cloud holds no chain this row continues"
        )
    held = {}
    if isinstance(row, wire.AuditEntry) and start.base_seq < row.seq <= start.head_seq:
        held = tx.audit_hashes(it.device_id, it.stream, row.chain, {row.seq})
    walk = walk_chain(start, [row], held, at)
    if walk.accepted:
        tx.insert_audit(it.device_id, it.stream, walk.accepted, at)
    if walk.quarantined:
        tx.quarantine(it.device_id, it.stream, walk.quarantined, at)
    tx.save_chain(it.device_id, it.stream, walk.chain, at)
    if not walk.quarantined:
        return Replayed("applied" if walk.accepted else "duplicate", True, None, None)
    q = walk.quarantined[0]
    return Replayed(q.reason, False, q.reason, f"replayed: {q.detail}")
