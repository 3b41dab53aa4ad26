"""One device's audit chains re-walked from what the cloud holds, and compared with the
heads a signed digest recorded for them (``cloud.control.digest``).

A chain is ok when its rows link from its base to its head (``edge.engine.audit
.verify_chain``, as ``SyncService.verify_device_audit`` checks them), no break was
recorded when its rows came in, and, where a digest signed a head for it, the row at
that seq still carries the signed hash (so an edit re-chained all the way to the head is
found too). A chain the digest covers that the cloud no longer holds, or that now ends
before the signed seq, is broken as well.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from cloud.control import Conn
from cloud.control.digest import Head
from cloud.sync.postgres import PostgresSyncTx
from edge.engine.audit import verify_chain
from edge.engine.records import AuditRow
from sync.server_records import ChainRecord

#: Rows read per query.
PAGE_ROWS = 5000


@dataclass(frozen=True)
class ChainCheck:
    device_id: str
    stream: str
    chain: int
    ok: bool
    rows: int
    head_seq: int
    first_bad_seq: int | None = None
    reason: str | None = None
    #: The head a digest signed for this chain (None: none did).
    signed_seq: int | None = None
    signed_hash: str | None = None


def check_device(
    conn: Conn, device_id: str, signed: Mapping[tuple[str, int], Head] | None = None
) -> list[ChainCheck]:
    """Every chain of ``device_id``, walked in ``conn``'s transaction; ``signed``: the
    heads a digest holds for it, by (stream, chain)."""
    tx = PostgresSyncTx(conn)
    signed = dict(signed or {})
    out = []
    for stream, record in tx.chains(device_id):
        out.append(_check(tx, device_id, stream, record, signed.pop((stream, record.chain), None)))
    for (stream, chain), head in sorted(signed.items()):
        why = f"the cloud no longer holds this chain (signed head seq {head.head_seq})"
        out.append(
            ChainCheck(
                device_id,
                stream,
                chain,
                False,
                0,
                0,
                head.head_seq,
                why,
                head.head_seq,
                head.head_hash,
            )
        )
    return out


def _check(
    tx: PostgresSyncTx, device_id: str, stream: str, record: ChainRecord, signed: Head | None
) -> ChainCheck:
    seen: dict[int, str] = {}
    want = signed.head_seq if signed is not None else None
    if want is not None and want == record.base_seq:
        seen[want] = record.base_hash
    rows = _rows(tx, device_id, stream, record, want, seen)
    report = verify_chain(
        rows,
        (record.head_seq, record.head_hash),
        (record.base_seq, record.base_hash),
        stream=record.chain,
    )
    found = ChainCheck(
        device_id=device_id,
        stream=stream,
        chain=record.chain,
        ok=True,
        rows=report.rows,
        head_seq=record.head_seq,
        signed_seq=want,
        signed_hash=signed.head_hash if signed is not None else None,
    )
    if not report.ok:
        return replace(found, ok=False, first_bad_seq=report.broken_at, reason=report.reason)
    if record.state == "broken":
        why = f"broken when its rows came in: {record.reason}"
        return replace(found, ok=False, first_bad_seq=record.first_bad_seq, reason=why)
    if signed is not None:
        problem = _against_signed(record, signed, seen.get(signed.head_seq))
        if problem:
            return replace(found, ok=False, first_bad_seq=signed.head_seq, reason=problem)
    return found


def _against_signed(record: ChainRecord, signed: Head, found: str | None) -> str | None:
    if signed.head_seq < record.base_seq:
        return f"the signed head seq {signed.head_seq} is before the chain's base {record.base_seq}"
    if found is None:
        return (
            f"the chain ends at seq {record.head_seq}, before the signed head seq "
            f"{signed.head_seq} (rows removed)"
        )
    if found != signed.head_hash:
        return (
            f"row {signed.head_seq} hashes to {found[:16]}…, the signed digest holds "
            f"{signed.head_hash[:16]}…: rows at or before it were changed and re-chained"
        )
    return None


def _rows(
    tx: PostgresSyncTx,
    device_id: str,
    stream: str,
    record: ChainRecord,
    want: int | None,
    seen: dict[int, str],
) -> Iterator[AuditRow]:
    """The chain's rows from its base to its head, noting the hash at seq ``want``."""
    after = record.base_seq
    while True:
        page = tx.audit_rows(device_id, stream, record.chain, after, record.head_seq, PAGE_ROWS)
        for row in page:
            if row.seq == want:
                seen[row.seq] = row.hash
            yield row
        if len(page) < PAGE_ROWS:
            return
        after = page[-1].seq


__all__ = ["PAGE_ROWS", "ChainCheck", "check_device"]
