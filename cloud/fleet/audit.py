"""The cloud's own audit log: every operator action, one hash-chained table.

Each row is hashed with the terminal's link function (``edge.engine.audit.link``,
version 2, stream 0), so one rule, one golden file and one verifier cover both. The
row's fields go into the hashed event as::

    AuditEvent(run_id=None, event=action, at=at, step=target,
               detail={"actor": actor, "actor_token": token_id, "actor_role": role,
                       "detail": detail})

``append`` runs in the caller's transaction (the action and its record commit
together); it locks the log's head row, so appends are one at a time and ``seq`` has no
gaps. ``verify`` walks the rows from genesis to the head it keeps: an edited row, a
removed or reordered row, or a removed tail is found (with the first bad seq).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from cloud.fleet._sql import Conn, Q
from edge.engine.audit import HASH_VERSION, ChainReport, link, verify_chain
from edge.engine.records import AuditEvent, AuditRow

#: Rows read per query when verifying.
VERIFY_PAGE = 5000
#: Floats at or above this magnitude are kept as text in a detail: PostgreSQL's jsonb
#: writes them back as integers, which hash differently.
_FLOAT_TEXT_ABOVE = 1e15


@dataclass(frozen=True)
class CloudAuditRow:
    seq: int
    at: float
    actor: str
    actor_token: str | None
    actor_role: str | None
    action: str
    target: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str
    version: int

    def event(self) -> AuditEvent:
        return event(
            self.actor, self.actor_token, self.actor_role, self.action, self.target,
            self.detail, self.at,
        )  # fmt: skip


def event(
    actor: str,
    actor_token: str | None,
    actor_role: str | None,
    action: str,
    target: str | None,
    detail: Mapping[str, Any],
    at: float,
) -> AuditEvent:
    """The event a cloud audit row hashes as (the module docstring)."""
    who = {"actor": actor, "actor_token": actor_token, "actor_role": actor_role}
    return AuditEvent(None, action, at, target, {**who, "detail": dict(detail)})


def storable(value: Any) -> Any:
    """``value`` as it reads back from jsonb unchanged: finite numbers only, huge floats
    as text, tuples as lists, keys as text."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        if abs(value) >= _FLOAT_TEXT_ABOVE:
            return repr(value)
        return value
    if isinstance(value, Mapping):
        return {str(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return str(value)


def append(
    conn: Conn,
    *,
    actor: str,
    actor_token: str | None,
    actor_role: str | None,
    action: str,
    target: str | None,
    detail: Mapping[str, Any] | None,
    at: float,
) -> CloudAuditRow:
    """Append one row (inside the caller's transaction); returns it."""
    clean = storable(dict(detail or {}))
    head = conn.execute(Q["audit_head"]).fetchone()
    if head is None:
        raise RuntimeError("the cloud audit log has no head row: is the fleet schema migrated?")
    seq, prev = int(head[0]) + 1, str(head[1])
    ev = event(actor, actor_token, actor_role, action, target, clean, at)
    hashed = link(prev, seq, ev, version=HASH_VERSION)
    conn.execute(
        Q["append_audit"],
        {
            "seq": seq,
            "at": at,
            "actor": actor,
            "actor_token": actor_token,
            "actor_role": actor_role,
            "action": action,
            "target": target,
            "detail": Jsonb(clean),
            "prev_hash": prev,
            "hash": hashed,
            "version": HASH_VERSION,
        },
    )
    return CloudAuditRow(
        seq, at, actor, actor_token, actor_role, action, target, clean, prev, hashed,
        HASH_VERSION,
    )  # fmt: skip


def _row(r: Sequence[Any]) -> CloudAuditRow:
    return CloudAuditRow(
        int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], r[6], dict(r[7]), r[8], r[9], int(r[10])
    )


def rows(
    conn: Conn,
    *,
    after: int = 0,
    limit: int = 100,
    action: str | None = None,
    actor: str | None = None,
) -> list[CloudAuditRow]:
    params = {"after": after, "limit": limit, "action": action, "actor": actor}
    return [_row(r) for r in conn.execute(Q["audit_rows"], params).fetchall()]


def _all_rows(conn: Conn) -> Iterator[AuditRow]:
    after = 0
    while True:
        page = rows(conn, after=after, limit=VERIFY_PAGE)
        for r in page:
            ev = r.event()
            yield AuditRow(
                r.seq, ev.run_id, ev.event, ev.step, ev.detail, r.at, r.prev_hash, r.hash,
                0, r.version,
            )  # fmt: skip
        if len(page) < VERIFY_PAGE:
            return
        after = page[-1].seq


def verify(conn: Conn) -> ChainReport:
    """Re-check every row from genesis to the head (the first broken link, if any)."""
    head = conn.execute(Q["audit_head_unlocked"]).fetchone()
    kept = None if head is None else (int(head[0]), str(head[1]))
    return verify_chain(_all_rows(conn), kept)
