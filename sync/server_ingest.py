"""The sync service's pure steps, no storage: reading a request body (gzip with a cap),
splitting a sync request so each outbox entry and audit row is judged on its own,
checking one outbox entry, walking an audit chain, and the contiguous mark.

Kept apart from ``sync.server`` (which holds the port and the transaction) so each rule
can be read, and tested, as a function of its inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edge.engine.audit import at_micros, canonical_json, link
from edge.engine.records import AuditEvent
from sync import wire
from sync.server_records import ChainRecord, QuarantineItem


class Refusal(Exception):
    """A request the service answers with a 4xx (or 503): ``status``, and the error
    body's ``code``, ``message``, ``field``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        *,
        server_time: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        #: Sent with ``clock_skew``: the device corrects the time it signs with by it.
        self.server_time = server_time

    def body(self) -> dict[str, Any]:
        body = wire.WireError(self.code, self.message, self.field).body()
        if self.server_time is not None:
            body["error"]["server_time"] = self.server_time
        return body

    @classmethod
    def from_wire(cls, exc: wire.WireError) -> Refusal:
        """A decode error as an answer: 422 for a field of the right message that is
        wrong (``invalid_field``), 400 for a body that is not the message at all."""
        status = 422 if exc.code == "invalid_field" else 400
        return cls(status, exc.code, exc.message, exc.field)


# --- the body ----------------------------------------------------------------------------


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, its name compared case-insensitively."""
    value = headers.get(name)
    if value is not None:
        return value
    low = name.lower()
    for key, value in headers.items():
        if key.lower() == low:
            return value
    return None


def read_body(headers: Mapping[str, str], body: bytes) -> bytes:
    """The request's JSON bytes: gunzipped when ``content-encoding: gzip`` says so, at
    most ``wire.MAX_BATCH_BYTES`` of them (the decompressor stops there: a small gzip
    bomb never becomes a large allocation). Truncated, corrupt or trailing-garbage gzip
    is ``bad_gzip``; any other encoding ``unsupported_encoding``."""
    encoding = (header(headers, "content-encoding") or "identity").strip().lower()
    if encoding == "identity":
        if len(body) > wire.MAX_BATCH_BYTES:
            raise Refusal(
                413,
                "batch_too_large",
                f"the body is {len(body)} bytes; the limit is {wire.MAX_BATCH_BYTES}",
            )
        return body
    if encoding != "gzip":
        raise Refusal(
            415, "unsupported_encoding", f"content-encoding {encoding!r}: only gzip is taken"
        )
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
    try:
        out = decompressor.decompress(body, wire.MAX_BATCH_BYTES + 1)
    except zlib.error as exc:
        raise Refusal(400, "bad_gzip", f"the gzip body does not decompress: {exc}") from None
    if len(out) > wire.MAX_BATCH_BYTES or decompressor.unconsumed_tail:
        raise Refusal(
            413,
            "batch_too_large",
            f"the body decompresses to more than {wire.MAX_BATCH_BYTES} bytes",
        )
    if not decompressor.eof:
        raise Refusal(400, "bad_gzip", "the gzip body is truncated")
    if decompressor.unused_data:
        raise Refusal(400, "bad_gzip", "bytes follow the end of the gzip body")
    return out


def parse_json(data: bytes) -> Any:
    """``data`` as JSON, by ``wire.decode``'s rules (NaN, infinities and overflowing
    numbers refused; nesting that overflows the parser is ``too_deep``); each message
    and entry decoded from it then has its depth checked by ``wire.decode``."""
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refusal(400, "malformed_json", f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise Refusal(400, "too_deep", f"nested deeper than {wire.MAX_JSON_DEPTH} levels") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text[:40]} is out of range")
    return number


# --- splitting a sync request --------------------------------------------------------------


@dataclass(frozen=True)
class BadItem:
    """An outbox entry or audit row that does not validate: its ``seq`` (readable, or
    the whole request is refused), what was wrong, and what was sent (for quarantine)."""

    seq: int
    message: str
    raw: Any
    chain: int = 0  # an audit row's chain (readable, or the request is refused)


@dataclass(frozen=True)
class ParsedSync:
    request: wire.SyncRequest  # with ``outbox`` and ``audit`` empty: they are below
    outbox: list[wire.OutboxEntry | BadItem]
    audit: list[wire.AuditEntry | BadItem]
    #: No string anywhere in the body can hold a NUL or a lone surrogate (``clean_text``):
    #: the per-entry text checks may be skipped.
    clean: bool = False


#: How a NUL or a lone surrogate can get into a parsed JSON string: only as an escape
#: (``\u0000``, ``\ud800``..``\udfff``) or as CESU-style UTF-8 bytes of a surrogate
#: (which ``json.loads`` lets through). A match may be a false alarm (an escaped
#: backslash before ``u0000``): then every entry is checked one by one.
_SUSPECT_TEXT = re.compile(rb"\\u0000|\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def clean_text(body: bytes) -> bool:
    """True when no string in the JSON ``body`` can hold a NUL or a lone surrogate."""
    return _SUSPECT_TEXT.search(body) is None


def parse_sync(data: Any, *, clean: bool = False) -> ParsedSync:
    """A decoded sync request, each outbox entry and audit row validated on its own: one
    over-long field makes that entry a ``BadItem``, never the batch a 4xx. What cannot be
    keyed (an entry without a readable ``seq``) or bounded refuses the request."""
    if not isinstance(data, dict):
        raise Refusal(400, "wrong_type", f"expected a JSON object, got {type(data).__name__}")
    lists = {}
    for name in ("outbox", "audit"):
        items = data.get(name, [])
        if not isinstance(items, list):
            raise Refusal(422, "invalid_field", f"{name}: expected a list", name)
        if len(items) > wire.MAX_BATCH_ENTRIES:
            raise Refusal(
                413,
                "batch_too_large",
                f"{name} holds {len(items)} entries; the limit is {wire.MAX_BATCH_ENTRIES}",
                name,
            )
        lists[name] = items
    try:
        request = wire.decode({**data, "outbox": [], "audit": []}, wire.SyncRequest)
    except wire.WireError as exc:
        raise Refusal.from_wire(exc) from None
    outbox: list[wire.OutboxEntry | BadItem] = [
        _item(raw, i, "outbox", wire.OutboxEntry) for i, raw in enumerate(lists["outbox"])
    ]
    audit: list[wire.AuditEntry | BadItem] = [
        _item(raw, i, "audit", wire.AuditEntry) for i, raw in enumerate(lists["audit"])
    ]
    return ParsedSync(request, outbox, audit, clean)


def _item(raw: Any, index: int, name: str, model: type[wire.M]) -> wire.M | BadItem:
    seq = raw.get("seq") if isinstance(raw, dict) else None
    if type(seq) is not int or not 1 <= seq <= wire.MAX_INT64:
        where = f"{name}.{index}.seq"
        why = f"{where}: every entry needs an integer seq >= 1"
        raise Refusal(422, "invalid_field", why, where)
    chain = raw.get("chain", 0) if name == "audit" else 0
    if type(chain) is not int or not 0 <= chain <= wire.MAX_INT64:
        where = f"{name}.{index}.chain"
        raise Refusal(422, "invalid_field", f"{where}: an integer >= 0", where)
    try:
        return wire.decode(raw, model)
    except wire.WireError as exc:
        return BadItem(seq, exc.message, raw, chain)


# --- one outbox entry ----------------------------------------------------------------------


def text_problem(value: Any) -> str | None:
    """Why ``value`` (parsed JSON) cannot be stored as PostgreSQL text/jsonb, or None: a
    NUL character, or a lone surrogate (not UTF-8). Iterative."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "holds a NUL character"
            try:
                item.encode()
            except UnicodeEncodeError:
                return "holds a lone surrogate (not UTF-8)"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def outbox_problem(entry: wire.OutboxEntry, *, clean: bool = False) -> tuple[str, str] | None:
    """Why ``entry`` is rejected, as (reason code, detail), or None when it may be
    stored: text the database cannot hold, content that cannot be hashed, a
    ``content_hash`` other than the content's, a payload over ``MAX_PAYLOAD_BYTES``, or
    a ``command_result`` that is not one."""
    if not clean:
        problem = text_problem([entry.message_id, entry.run_id, entry.step, entry.topic])
        problem = problem or text_problem(entry.payload)
        if problem:
            return "invalid_text", f"entry {entry.seq} {problem}"
    try:
        payload = canonical(entry.payload)
        expected = outbox_hash(entry, payload)
        size = len(payload.encode())
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        return "unhashable", f"entry {entry.seq} cannot be hashed: {exc}"
    if expected != entry.content_hash:
        return "content_hash_mismatch", f"entry {entry.seq}: content does not match its hash"
    if size > wire.MAX_PAYLOAD_BYTES:
        return (
            "payload_too_large",
            f"entry {entry.seq}: payload is {size} bytes; the limit is {wire.MAX_PAYLOAD_BYTES}",
        )
    if entry.topic == COMMAND_RESULT_TOPIC:
        try:
            wire.decode(entry.payload, wire.CommandResult)
        except wire.WireError as exc:
            return "invalid_command_result", f"entry {entry.seq}: {exc.message}"
    return None


#: The outbox topic a terminal reports a command's outcome on (``wire.CommandResult``).
COMMAND_RESULT_TOPIC = "command_result"


def quarantine_item(kind: str, seq: int, reason: str, detail: str, raw: Any) -> QuarantineItem:
    """A quarantine record of ``raw`` (the entry as sent, or its model)."""
    if hasattr(raw, "model_dump"):
        raw = raw.model_dump(mode="python")
    try:
        text = json.dumps(raw, sort_keys=True, ensure_ascii=True, allow_nan=True)
    except (ValueError, TypeError, RecursionError):
        text = json.dumps({"seq": seq, "unrepresentable": True})
    return QuarantineItem(
        kind=kind,  # type: ignore[arg-type]
        seq=seq,
        reason=reason,
        detail=detail,
        entry=text,
        fingerprint=hashlib.sha256(text.encode()).hexdigest(),
    )


def contiguous_through(seqs: Sequence[int], settled: set[int]) -> int | None:
    """The highest seq of the contiguous prefix of ``seqs`` (sorted) that is settled:
    every seq in the batch at or below it was taken. None when the first is not (or the
    batch is empty); never a seq that is not in the batch."""
    through = None
    for seq in seqs:
        if seq not in settled:
            break
        through = seq
    return through


def clean_json(value: Any) -> Any:
    """``value`` made storable as jsonb, for records that are information, not evidence
    (a heartbeat): NUL and lone surrogates replaced by U+FFFD, non-finite floats None."""
    if isinstance(value, str):
        value = value.replace("\x00", "\ufffd")
        try:
            value.encode()
        except UnicodeEncodeError:
            value = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {clean_json(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


# --- an audit chain ------------------------------------------------------------------------


@dataclass
class ChainWalk:
    """What one batch did to a chain: ``chain`` (the state after), the rows to store,
    the rows to quarantine, and whether it broke in this batch."""

    chain: ChainRecord
    accepted: list[wire.AuditEntry] = field(default_factory=list)
    quarantined: list[QuarantineItem] = field(default_factory=list)
    broke: bool = False


def walk_chain(
    start: ChainRecord,
    rows: Sequence[wire.AuditEntry | BadItem],
    held: Mapping[int, str],
    at: float,
    *,
    clean: bool = False,
) -> ChainWalk:
    """Take ``rows`` (in the order sent) onto the chain ``start``.

    ``held``: the hashes the cloud stores for the rows' seqs at or below the head.
    Each row must hash to its ``hash`` (else an edit) and be storable; a row at or below
    the head whose hash is the stored one is a duplicate (taken, not stored again),
    another hash there is a fork; the next row must be ``head + 1`` (else a gap, or a
    reorder when the missing row comes later in the batch) and link to the head's hash.
    The first failure breaks the chain (recorded with its first bad seq and reason); it
    and every later row go to quarantine, and the head stays at the last row verified.
    """
    walk = ChainWalk(start)
    known = dict(held)
    head_seq, head_hash = start.head_seq, start.head_hash

    def brk(seq: int, reason: str, item: wire.AuditEntry | BadItem) -> None:
        walk.chain = replace(
            walk.chain,
            state="broken",
            first_bad_seq=seq,
            reason=reason,
            broken_at=at,
        )
        walk.broke = True
        walk.quarantined.append(_audit_item(item, reason.split(":", 1)[0], reason))

    for i, row in enumerate(rows):
        if walk.chain.state == "broken":
            held_again = isinstance(row, wire.AuditEntry) and known.get(row.seq) == row.hash
            if held_again and isinstance(row, wire.AuditEntry) and _verifies(row):
                continue  # a row the cloud holds, sent again
            walk.quarantined.append(
                _audit_item(row, "chain_broken", f"the chain broke at {walk.chain.first_bad_seq}")
            )
            continue
        if isinstance(row, BadItem):
            brk(row.seq, f"invalid_row: row {row.seq}: {row.message}", row)
            continue
        problem = None if clean else text_problem([row.run_id, row.event, row.step, row.detail])
        if problem:
            brk(row.seq, f"unstorable: row {row.seq} {problem}", row)
            continue
        try:
            computed = _row_hash(row)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            brk(row.seq, f"edit: row {row.seq} cannot be hashed ({exc})", row)
            continue
        if computed != row.hash:
            brk(row.seq, f"edit: row {row.seq}'s content does not match its hash", row)
            continue
        if row.seq <= head_seq:
            if row.seq < start.base_seq:
                continue  # before what the cloud holds: retention's, not ours to judge
            stored = start.base_hash if row.seq == start.base_seq else known.get(row.seq)
            if stored == row.hash:
                continue  # duplicate
            brk(row.seq, f"fork: row {row.seq} differs from the row {row.seq} held", row)
            continue
        if row.seq != head_seq + 1:
            later = any(
                isinstance(r, wire.AuditEntry) and r.seq == head_seq + 1 for r in rows[i + 1 :]
            )
            what = "reorder" if later else "gap"
            brk(
                head_seq + 1,
                f"{what}: row {row.seq} came after row {head_seq}; "
                f"row {head_seq + 1} {'comes later' if later else 'is missing'}",
                row,
            )
            continue
        if row.prev_hash != head_hash:
            brk(
                row.seq,
                f"reorder: row {row.seq}'s prev_hash is not row {head_seq}'s hash "
                "(a row removed, replaced or moved)",
                row,
            )
            continue
        walk.accepted.append(row)
        known[row.seq] = row.hash
        head_seq, head_hash = row.seq, row.hash
    walk.chain = replace(walk.chain, head_seq=head_seq, head_hash=head_hash)
    return walk


def _verifies(row: wire.AuditEntry) -> bool:
    try:
        return _row_hash(row) == row.hash
    except (ValueError, TypeError, OverflowError, RecursionError):
        return False


def _row_hash(row: wire.AuditEntry) -> str:
    return audit_hash(row)


# --- hashing, fast -------------------------------------------------------------------------
#
# ``canonical_json`` (edge.engine.audit) is pure Python and the largest cost of taking a
# batch. For JSON without floats its text is exactly ``json.dumps(sort_keys=True,
# separators=(",", ":"), ensure_ascii=False)`` (the same string escaper, keys in code
# point order, integers as ``str``), which runs in C; a value holding a float takes the
# canonical encoder. tests/unit/test_sync_server.py pins both hashes below to
# ``edge.engine.audit.link`` and ``wire.content_hash``.

_dumps = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def _has_float(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is float:
            return True
        if type(item) is dict:
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
        elif not (item is None or type(item) in (str, int, bool)):
            return True  # anything else: let the canonical encoder judge it
    return False


def canonical(value: Any) -> str:
    """``canonical_json(value)``, by the C encoder when ``value`` holds no float."""
    if not _has_float(value):
        return _dumps(value)
    if type(value) is list:  # one float field does not send the rest the slow way
        return "[" + ",".join(map(canonical, value)) + "]"
    return canonical_json(value)


def audit_hash(row: wire.AuditEntry) -> str:
    """The row's hash as ``edge.engine.audit.link`` computes it (version 2 here, older
    versions by ``link`` itself)."""
    if row.version != 2:
        event = AuditEvent(row.run_id, row.event, row.at, row.step, row.detail)
        return link(row.prev_hash, row.seq, event, stream=row.chain, version=row.version)
    # every field but the detail is an int, a str or None (validated): only the detail
    # can hold a float
    head = ["tillflow.audit", 2, row.chain, row.seq, row.prev_hash, row.run_id, row.event]
    head += [row.step, at_micros(row.at)]
    return hashlib.sha256(f"{_dumps(head)[:-1]},{canonical(row.detail)}]".encode()).hexdigest()


def outbox_hash(entry: wire.OutboxEntry, payload: str | None = None) -> str:
    """``wire.entry_hash(entry)``; ``payload``: the payload's canonical text if known."""
    head = ["tillflow.outbox", 1, entry.message_id, entry.run_id, entry.step, entry.topic]
    body = canonical(entry.payload) if payload is None else payload
    text = f"{_dumps(head)[:-1]},{canonical_json(entry.created_at)},{body}]"
    return hashlib.sha256(text.encode()).hexdigest()


def _audit_item(row: wire.AuditEntry | BadItem, reason: str, detail: str) -> QuarantineItem:
    raw = row.raw if isinstance(row, BadItem) else row
    return quarantine_item("audit", row.seq, reason, detail, raw)
