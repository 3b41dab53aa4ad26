"""The audit hash chains: append-only streams, each row hashing its predecessor.

Written once here and called by every store inside the transaction that appends, so
the rule is the same on SQLite, PostgreSQL and in memory. A database holds one or more
**streams**; every row of a run goes to the run's stream (``stream_of``), and each
stream is its own chain with its own head, so writers on different streams never wait
on one row. A terminal has one stream (0). ``verify_streams`` walks every stream and
reports the first broken link: an edited row (hash mismatch), a removed or reordered
row (gap in ``seq`` or ``prev_hash`` mismatch), a removed tail or a removed run (the
stream's head disagrees, or a gap where its rows were).

Hash version 2 (current), byte for byte
---------------------------------------
``hash = lowercase hex of SHA-256(UTF-8 bytes of T)``, where ``T`` is the canonical
JSON text (below) of the array::

    ["tillflow.audit", 2, stream, seq, prev_hash, run_id, event, step, at_us, detail]

- ``stream``, ``seq``: integers; ``seq`` is the row's position in its stream (1, 2, …).
- ``prev_hash``: the previous row's ``hash`` in the same stream, or 64 zeros (``GENESIS``)
  for the first row (after retention: the last removed row's hash).
- ``run_id``, ``step``: strings or null. ``event``: a string.
- ``at_us``: the event time as an integer count of microseconds since the Unix epoch:
  ``at`` (seconds, an IEEE-754 binary64) multiplied by 1,000,000 in binary64, then
  rounded to the nearest integer (ties to even).
- ``detail``: a JSON object.

Canonical JSON text: no whitespace anywhere; object members sorted by key, comparing
keys by Unicode code point; strings written with ``"``, with ``\\"`` and ``\\\\`` escaped,
U+0008/0009/000A/000C/000D written ``\\b \\t \\n \\f \\r``, every other character below
U+0020 written ``\\u00xx`` (lowercase hex), and every other character as itself (UTF-8,
no ``\\u`` escapes); ``true``, ``false``, ``null``; integers in decimal with no leading
zeros or plus sign; a non-integer number in the ECMAScript ``Number.prototype.toString``
form of the shortest decimal that reads back as the same binary64 (as RFC 8785 JCS); a
float with an integral value below 2**53 in magnitude is written as that integer; NaN
and infinities are refused. This is RFC 8785 except for the key order (code point, not
UTF-16 unit: they differ only for keys with characters beyond U+FFFF).

Version 1 (rows written before version 2; verified, never written): SHA-256 of the
UTF-8 bytes of ``prev_hash + "|" + J``, where ``J`` is Python's
``json.dumps([seq, run_id, event, step, detail, repr(float(at))], sort_keys=True,
separators=(",", ":"), ensure_ascii=False)``. It is frozen as it was: ``repr(float)``
ties it to Python, which is why version 2 exists.

``tests/golden/audit_hash_v1.json`` and ``audit_hash_v2.json`` pin both versions; they
are never edited (a change of rule is a new version and a new file).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from edge.engine.records import AuditEvent, AuditRow

GENESIS = "0" * 64

#: The version new rows are written with.
HASH_VERSION = 2

_DOMAIN = "tillflow.audit"

_v1_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_string = json.JSONEncoder(ensure_ascii=False).encode  # one str: exactly the escapes above


def stream_of(run_id: str | None, streams: int) -> int:
    """The stream a run's rows go to: the first 8 bytes of SHA-256(run_id), big-endian,
    modulo ``streams``. Rows of no run, and every row when ``streams`` is 1, go to 0."""
    if streams <= 1 or run_id is None:
        return 0
    digest = hashlib.sha256(run_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % streams


def at_micros(at: float) -> int:
    """``at`` seconds as integer microseconds, as version 2 hashes it."""
    return round(float(at) * 1_000_000)


def _number(x: float) -> str:
    if not math.isfinite(x):
        raise ValueError(f"audit detail holds a non-finite number ({x!r})")
    if x == int(x) and abs(x) < 2**53:
        return str(int(x))
    # Shortest round-trip digits, then ECMAScript's layout of them.
    sign, digits, exp = Decimal(repr(x)).as_tuple()
    assert isinstance(exp, int)
    s = "".join(map(str, digits)).rstrip("0") or "0"
    n = exp + len(digits)  # value = 0.s * 10**n
    k = len(s)
    if k <= n <= 21:
        text = s + "0" * (n - k)
    elif 0 < n <= 21:
        text = s[:n] + "." + s[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + s
    else:
        e = n - 1
        mantissa = s if k == 1 else s[0] + "." + s[1:]
        text = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return ("-" if sign else "") + text


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (the rules in this module's docstring)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        items = sorted((str(k), v) for k, v in value.items())
        return "{" + ",".join(f"{_string(k)}:{canonical_json(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    raise TypeError(f"audit detail holds a {type(value).__name__}, not JSON")


def hash_input(prev_hash: str, seq: int, event: AuditEvent, *, stream: int = 0) -> bytes:
    """The exact bytes version 2 hashes (see the module docstring)."""
    body = [
        _DOMAIN,
        2,
        stream,
        seq,
        prev_hash,
        event.run_id,
        event.event,
        event.step,
        at_micros(event.at),
        event.detail,
    ]
    return canonical_json(body).encode()


def link(
    prev_hash: str,
    seq: int,
    event: AuditEvent,
    *,
    stream: int = 0,
    version: int = HASH_VERSION,
) -> str:
    """The hash of one audit row (``version`` 2 unless verifying an older row)."""
    if version == 2:
        return hashlib.sha256(hash_input(prev_hash, seq, event, stream=stream)).hexdigest()
    if version == 1:
        body = _v1_canonical(
            [seq, event.run_id, event.event, event.step, event.detail, repr(float(event.at))]
        )
        return hashlib.sha256(f"{prev_hash}|{body}".encode()).hexdigest()
    raise ValueError(f"unknown audit hash version {version}")


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    rows: int
    broken_at: int | None = None
    reason: str | None = None
    stream: int | None = None  # where it broke
    streams: int = 1

    def __str__(self) -> str:
        if self.ok:
            where = f" in {self.streams} streams" if self.streams > 1 else ""
            return f"audit chain ok: {self.rows} rows verified{where}"
        where = f"stream {self.stream} " if self.stream else ""
        return f"audit chain BROKEN at {where}seq {self.broken_at}: {self.reason}"


def verify_chain(
    rows: Iterable[AuditRow],
    head: tuple[int, str] | None,
    base: tuple[int, str] | None = None,
    *,
    stream: int = 0,
) -> ChainReport:
    """Verify one stream. ``rows``: that stream's rows in ``seq`` order; ``head``: the
    stream's (seq, hash) as the store keeps it; ``base``: (seq, hash) of the last row
    retention removed (the kept rows must continue from it; the rows before it are the
    cloud's to keep and verify)."""
    prev_seq, prev_hash = base if base else (0, GENESIS)
    n = 0
    for row in rows:
        n += 1
        if row.stream != stream:
            return ChainReport(False, n, row.seq, f"a row of stream {row.stream} here", stream)
        if row.seq != prev_seq + 1:
            return ChainReport(False, n, prev_seq + 1, f"row {prev_seq + 1} is missing", stream)
        if row.prev_hash != prev_hash:
            why = "prev_hash does not match the row before"
            return ChainReport(False, n, row.seq, why, stream)
        event = AuditEvent(row.run_id, row.event, row.at, row.step, row.detail)
        try:
            expected = link(prev_hash, row.seq, event, stream=stream, version=row.version)
        except (ValueError, TypeError) as exc:
            return ChainReport(False, n, row.seq, f"row cannot be hashed: {exc}", stream)
        if row.hash != expected:
            why = "row content does not match its hash (edited)"
            return ChainReport(False, n, row.seq, why, stream)
        prev_seq, prev_hash = row.seq, row.hash
    head_seq, head_hash = head if head else (0, GENESIS)
    if (head_seq, head_hash) != (prev_seq, prev_hash):
        why = f"head says {head_seq} rows but the log ends at {prev_seq}"
        return ChainReport(False, n, prev_seq + 1, why, stream)
    return ChainReport(True, n, stream=stream)


def verify_streams(
    rows: Iterable[AuditRow],
    heads: Mapping[int, tuple[int, str]],
    bases: Mapping[int, tuple[int, str]] | None = None,
) -> ChainReport:
    """Verify every stream: ``rows`` in (stream, seq) order, ``heads`` every stream's
    head, ``bases`` where retention left each (absent: from genesis). A stream with rows
    but no head, or a head whose rows are gone, is broken."""
    by_stream: dict[int, list[AuditRow]] = {}
    for row in rows:
        by_stream.setdefault(row.stream, []).append(row)
    total = 0
    streams = sorted(set(by_stream) | set(heads))
    for s in streams:
        base = (bases or {}).get(s)
        report = verify_chain(by_stream.get(s, []), heads.get(s), base, stream=s)
        total += report.rows
        if not report.ok:
            return ChainReport(
                False, total, report.broken_at, report.reason, s, max(1, len(streams))
            )
    return ChainReport(True, total, streams=max(1, len(streams)))
