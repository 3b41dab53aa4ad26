"""Signed digests of every device chain's head: what makes a later edit of the cloud's
own copy of a device's audit rows detectable, even one that re-chains the rows so the
chain alone verifies.

The hash chain of a device's rows proves the rows agree with each other; it cannot
prove they are the rows the device sent, if whoever edits them recomputes every hash
after the edit (and the head the cloud keeps). A digest records, once a day (one per
AuditAggregation run), each chain's head (seq, hash) as it was then, hashed into one
value and signed by the control plane's Ed25519 key (the key terminals pin, which only
the control plane holds). Re-walking a chain later must arrive at the signed hash at the
signed seq; a re-chained edit at or before it changes that hash.

Version 1, byte for byte
------------------------
``heads_hash`` = lowercase hex SHA-256 of the canonical JSON text
(``edge.engine.audit.canonical_json``, the audit rows' rules) of::

    ["tillflow.audit_digest.heads", 1, [[device_id, stream, chain, head_seq, head_hash], ...]]

the heads sorted by (device_id, stream, chain), strings compared by code point.

The digest's bytes are the canonical JSON text of::

    ["tillflow.audit_digest", 1, seq, run_id, made_at_us, heads, heads_hash, prev_hash]

(``made_at_us``: ``edge.engine.audit.at_micros``; ``heads``: how many; ``prev_hash``: the
previous digest's ``hash``, 64 zeros for the first). ``hash`` is the lowercase hex SHA-256
of those bytes, ``signature`` the base64url Ed25519 signature of them, and ``key_id``
``sync.signing.key_id`` of the signing key's public half.

Checking a digest (``check``): its heads hash to ``heads_hash``, its bytes to ``hash``,
``prev_hash`` is the stored hash of the digest before, the key is the control plane's,
and the signature verifies. A digest that fails is refused: nothing is compared with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloud.control import Conn
from cloud.control._sql import Q
from edge.engine.audit import GENESIS, at_micros, canonical_json
from sync import signing
from sync.wire import WireError, b64d, b64e

VERSION = 1
_DOMAIN = "tillflow.audit_digest"
_HEADS_DOMAIN = "tillflow.audit_digest.heads"
#: Any 64-bit number of ours: one digest made at a time.
_DIGEST_LOCK = 0x7417_D165

#: (device_id, stream, chain): a chain's key.
ChainKey = tuple[str, str, int]


@dataclass(frozen=True)
class Head:
    device_id: str
    stream: str
    chain: int
    head_seq: int
    head_hash: str

    @property
    def key(self) -> ChainKey:
        return (self.device_id, self.stream, self.chain)


@dataclass(frozen=True)
class Digest:
    seq: int
    run_id: str
    made_at: float
    heads: int
    heads_hash: str
    prev_hash: str
    hash: str
    key_id: str
    signature: str


def heads_hash(heads: Iterable[Head]) -> str:
    """The hash of the canonical list of ``heads`` (the module docstring)."""
    rows = sorted(heads, key=lambda h: h.key)
    listed = [[h.device_id, h.stream, h.chain, h.head_seq, h.head_hash] for h in rows]
    text = canonical_json([_HEADS_DOMAIN, VERSION, listed])
    return hashlib.sha256(text.encode()).hexdigest()


def digest_bytes(
    seq: int, run_id: str, made_at: float, heads: int, heads_hash_: str, prev_hash: str
) -> bytes:
    """The exact bytes a digest's hash and signature are over."""
    body = [_DOMAIN, VERSION, seq, run_id, at_micros(made_at), heads, heads_hash_, prev_hash]
    return canonical_json(body).encode()


def make(
    seq: int,
    run_id: str,
    made_at: float,
    heads: Sequence[Head],
    prev_hash: str,
    key: Ed25519PrivateKey,
) -> Digest:
    """A new digest of ``heads``, chained to ``prev_hash`` and signed by ``key``."""
    hh = heads_hash(heads)
    data = digest_bytes(seq, run_id, made_at, len(heads), hh, prev_hash)
    return Digest(
        seq=seq,
        run_id=run_id,
        made_at=made_at,
        heads=len(heads),
        heads_hash=hh,
        prev_hash=prev_hash,
        hash=hashlib.sha256(data).hexdigest(),
        key_id=signing.key_id(signing.public_text(key)),
        signature=b64e(key.sign(data)),
    )


def check(
    digest: Digest, heads: Sequence[Head], prev: Digest | None, public: Ed25519PublicKey
) -> list[str]:
    """What is wrong with ``digest`` (empty: it is the one the control plane signed, over
    ``heads``, after ``prev``)."""
    problems = []
    if len(heads) != digest.heads or heads_hash(heads) != digest.heads_hash:
        problems.append(
            f"its {len(heads)} heads do not hash to the heads_hash it holds (heads changed)"
        )
    data = digest_bytes(
        digest.seq, digest.run_id, digest.made_at, digest.heads, digest.heads_hash,
        digest.prev_hash,
    )  # fmt: skip
    if hashlib.sha256(data).hexdigest() != digest.hash:
        problems.append("its fields do not hash to the hash it holds (edited)")
    expected_prev = prev.hash if prev is not None else GENESIS
    if digest.prev_hash != expected_prev:
        what = f"digest {digest.seq - 1}'s hash" if digest.seq > 1 else "genesis"
        problems.append(f"prev_hash is not {what} (the chain of digests is broken)")
    if digest.key_id != signing.key_id(signing.public_text(public)):
        problems.append(f"it names key {digest.key_id}, not the control plane's")
    try:
        signature = b64d(digest.signature, "signature")
    except WireError:
        signature = b""
    if not signing.verify(public, signature, data):
        problems.append("its signature does not verify with the control plane's key (forged)")
    return problems


# --- stored digests -----------------------------------------------------------------------


def _digest(row: Sequence[Any]) -> Digest:
    return Digest(
        seq=int(row[0]),
        run_id=row[1],
        made_at=float(row[2]),
        heads=int(row[3]),
        heads_hash=row[4],
        prev_hash=row[5],
        hash=row[6],
        key_id=row[7],
        signature=row[8],
    )


def _head(row: Sequence[Any]) -> Head:
    return Head(row[0], row[1], int(row[2]), int(row[3]), row[4])


def latest(conn: Conn) -> Digest | None:
    row = conn.execute(Q["latest_digest"]).fetchone()
    return None if row is None else _digest(row)


def get(conn: Conn, seq: int) -> Digest | None:
    row = conn.execute(Q["digest"], {"seq": seq}).fetchone()
    return None if row is None else _digest(row)


def listed(conn: Conn, *, before: int | None, limit: int) -> list[Digest]:
    """Digests newest first, older than ``before``."""
    return [_digest(r) for r in conn.execute(Q["digests"], {"before": before, "limit": limit})]


def heads_of(conn: Conn, seq: int, device_id: str | None = None) -> list[Head]:
    """The heads digest ``seq`` covers (one device's, given ``device_id``)."""
    params = {"seq": seq, "device_id": device_id}
    return [_head(r) for r in conn.execute(Q["digest_heads"], params)]


def devices_of(
    conn: Conn, seq: int, *, device_id: str | None, after: str | None, limit: int
) -> list[str]:
    """A page of the devices digest ``seq`` covers."""
    params = {"seq": seq, "device_id": device_id, "after": after, "limit": limit}
    return [str(r[0]) for r in conn.execute(Q["digest_devices"], params)]


def current_heads(conn: Conn) -> list[Head]:
    """Every chain's head as the cloud holds it now."""
    return [_head(r) for r in conn.execute(Q["current_heads"])]


def verify_stored(conn: Conn, seq: int, public: Ed25519PublicKey) -> tuple[Digest, list[str]]:
    """Digest ``seq`` and what is wrong with it as stored (``check``); KeyError if none."""
    found = get(conn, seq)
    if found is None:
        raise KeyError(seq)
    prev = get(conn, seq - 1) if seq > 1 else None
    problems = check(found, heads_of(conn, seq), prev, public)
    if seq > 1 and prev is None:
        problems.append(f"digest {seq - 1} is missing (the chain of digests is broken)")
    return found, problems


def record(
    conn: Conn, run_id: str, made_at: float, heads: Sequence[Head], key: Ed25519PrivateKey
) -> tuple[Digest, bool]:
    """Store the digest of ``heads`` for ``run_id`` (in ``conn``'s transaction), chained
    to the newest one; the one already made for ``run_id`` if there is one (a retried
    step). True when this call made it."""
    conn.execute(Q["lock_digests"], {"lock": _DIGEST_LOCK})
    row = conn.execute(Q["digest_by_run"], {"run_id": run_id}).fetchone()
    if row is not None:
        return _digest(row), False
    prev = latest(conn)
    seq = 1 if prev is None else prev.seq + 1
    made = make(seq, run_id, made_at, heads, prev.hash if prev else GENESIS, key)
    conn.execute(Q["add_digest"], made.__dict__)
    with conn.cursor().copy(Q["copy_digest_heads"]) as copy:
        for h in heads:
            copy.write_row((seq, h.device_id, h.stream, h.chain, h.head_seq, h.head_hash))
    return made, True


__all__ = [
    "VERSION",
    "Digest",
    "Head",
    "check",
    "current_heads",
    "devices_of",
    "digest_bytes",
    "get",
    "heads_hash",
    "heads_of",
    "latest",
    "listed",
    "make",
    "record",
    "verify_stored",
]
