"""The audit hash chain: one chain per database, each row hashing its predecessor.

Written once here and called by every store inside the transaction that appends, so
the rule is the same on SQLite and PostgreSQL. ``verify_chain`` walks rows in order
and reports the first broken link: an edited row (hash mismatch), a removed row (gap
in ``seq`` or ``prev_hash`` mismatch), or a removed tail (head disagrees).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from edge.engine.records import AuditEvent, AuditRow

GENESIS = "0" * 64


_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def link(prev_hash: str, seq: int, event: AuditEvent) -> str:
    """The hash of one audit row: its predecessor's hash and its canonical JSON content."""
    body = _canonical(
        [seq, event.run_id, event.event, event.step, event.detail, repr(float(event.at))]
    )
    return hashlib.sha256(f"{prev_hash}|{body}".encode()).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    rows: int
    broken_at: int | None = None
    reason: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"audit chain ok: {self.rows} rows verified"
        return f"audit chain BROKEN at seq {self.broken_at}: {self.reason}"


def verify_chain(
    rows: Iterable[AuditRow],
    head: tuple[int, str] | None,
    base: tuple[int, str] | None = None,
) -> ChainReport:
    """``base``: (seq, hash) of the last row retention removed; the kept rows must
    continue from it. The rows before it are the cloud's to keep and verify."""
    prev_seq, prev_hash = base if base else (0, GENESIS)
    n = 0
    for row in rows:
        n += 1
        if row.seq != prev_seq + 1:
            return ChainReport(False, n, prev_seq + 1, f"row {prev_seq + 1} is missing")
        if row.prev_hash != prev_hash:
            return ChainReport(False, n, row.seq, "prev_hash does not match the row before")
        expected = link(
            prev_hash, row.seq, AuditEvent(row.run_id, row.event, row.at, row.step, row.detail)
        )
        if row.hash != expected:
            return ChainReport(False, n, row.seq, "row content does not match its hash (edited)")
        prev_seq, prev_hash = row.seq, row.hash
    head_seq, head_hash = head if head else (0, GENESIS)
    if (head_seq, head_hash) != (prev_seq, prev_hash):
        return ChainReport(
            False, n, prev_seq + 1, f"head says {head_seq} rows but the log ends at {prev_seq}"
        )
    return ChainReport(True, n)
