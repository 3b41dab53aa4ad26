"""The sync protocol's messages: versioned pydantic models, no I/O.

Every message is a JSON object with a ``kind`` (what it is) and a ``protocol_version``.
Models are strict on types (a string where a number belongs is an error naming the
field) and tolerant of unknown fields (a newer peer may add some: they are ignored, never
an error). An unknown ``kind`` is an error: a peer that cannot tell what a message is
must not guess.

``decode(data, expect)`` turns bytes into the model of ``expect``'s kind and raises
``WireError`` (code, message, field) for anything else; ``encode(model)`` gives the JSON
bytes. What is *signed* is never re-encoded: a signed document travels as the exact
bytes its signature covers (``Envelope.payload``, base64url), and the receiver verifies
those bytes before it decodes them (``sync.signing``).

Protocol version 1 is the first and only one so far: ``SUPPORTED_VERSIONS`` is what a
server serves (the current version and, once there is one, the previous); the golden
files of every supported version in ``tests/golden/sync/v<N>/`` are replayed against the
current server by the tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.engine.audit import canonical_json

PROTOCOL_VERSION = 1
#: What a server accepts: the current version and the previous one (none yet).
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

#: Bounds a server enforces and a client keeps to (entries and bytes per batch).
MAX_BATCH_ENTRIES = 2000
MAX_BATCH_BYTES = 4 * 1024 * 1024  # decompressed body
MAX_COMPRESSED_BYTES = 1024 * 1024
MAX_FIELD_CHARS = 256  # ids, topics, names, reasons
MAX_PAYLOAD_BYTES = 64 * 1024  # one outbox payload or audit detail, as canonical JSON
#: How deep objects and arrays may nest in a message (the whole message, its own
#: structure included): deeper is refused at decode, before anything recurses over it
#: (``canonical_json`` would run out of stack a few hundred levels down).
MAX_JSON_DEPTH = 32
#: The largest integer a seq or count may be: what a signed 64-bit column holds.
MAX_INT64 = 2**63 - 1

Id = Annotated[str, Field(min_length=1, max_length=MAX_FIELD_CHARS)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
B64 = Annotated[str, Field(min_length=1, max_length=MAX_PAYLOAD_BYTES * 2)]
Seq = Annotated[int, Field(ge=1, le=MAX_INT64)]


class WireError(ValueError):
    """A message that cannot be taken: what was wrong (``code``), said plainly, and the
    field it was in (``field``, dotted, or None)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field

    def body(self) -> dict[str, Any]:
        """The 4xx body every endpoint answers with: ``{"error": {code, message, field}}``."""
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class _Wire(BaseModel):
    # strict: no coercion ("5" is not 5); ignore: a newer peer's extra fields are dropped.
    # allow_inf_nan=False: NaN and infinities have no canonical JSON form (nor a JSON one).
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)


class _Message(_Wire):
    protocol_version: int = Field(ge=1)


# --- enrollment ------------------------------------------------------------------------


class Hardware(_Wire):
    model: str | None = Field(None, max_length=MAX_FIELD_CHARS)
    serial: str | None = Field(None, max_length=MAX_FIELD_CHARS)


class EnrollRequest(_Message):
    """The terminal's first call: the one-time token and the public half of the key it
    made. Not signed by a device key (it has none registered yet): the token is the proof."""

    kind: Literal["enroll_request"] = "enroll_request"
    token: Id
    public_key: Annotated[str, Field(min_length=43, max_length=44)]  # Ed25519, base64url
    binary_version: Id
    hardware: Hardware = Hardware()


class EnrollResponse(_Message):
    kind: Literal["enroll_response"] = "enroll_response"
    device_id: Id
    store: Id
    group: str | None = Field(None, max_length=MAX_FIELD_CHARS)
    #: The control plane's command-signing key (Ed25519, base64url): the terminal pins it.
    control_plane_key: Annotated[str, Field(min_length=43, max_length=44)]
    server_time: float


class RotateKeyRequest(_Message):
    """Signed (as every device request) by the current key; ``proof`` is the new key's
    signature over ``signing.rotation_bytes(device_id, new_public_key)``, so the server
    knows the device holds it."""

    kind: Literal["rotate_key"] = "rotate_key"
    new_public_key: Annotated[str, Field(min_length=43, max_length=44)]
    proof: B64


class RotateKeyResponse(_Message):
    kind: Literal["rotate_key_response"] = "rotate_key_response"
    device_id: Id
    rotated_at: float


# --- upload ----------------------------------------------------------------------------


class OutboxEntry(_Wire):
    """One outbox message. ``content_hash`` is ``content_hash(entry)``: the server holds
    it per ``(device_id, stream, seq)`` and tells a duplicate (same hash) from a conflict."""

    seq: Seq
    message_id: Id
    run_id: str | None = Field(None, max_length=MAX_FIELD_CHARS)
    step: str | None = Field(None, max_length=MAX_FIELD_CHARS)
    topic: Id
    payload: Any
    created_at: float
    content_hash: Hex64


class AuditEntry(_Wire):
    """One audit row, with every field its hash covers (``edge.engine.audit``)."""

    seq: Seq
    #: The row's audit stream on the device (a terminal: 0).
    chain: int = Field(0, ge=0, le=MAX_INT64)
    run_id: str | None = Field(None, max_length=MAX_FIELD_CHARS)
    event: Id
    step: str | None = Field(None, max_length=MAX_FIELD_CHARS)
    detail: dict[str, Any]
    at: float
    prev_hash: Hex64
    hash: Hex64
    version: int = Field(2, ge=1)


class AuditBase(_Wire):
    """Where the device's kept audit chain starts (retention removed what is before)."""

    seq: int = Field(ge=0, le=MAX_INT64)
    hash: Hex64


class Heartbeat(_Wire):
    at: float
    binary_version: Id
    config_version: int | None = None
    policy_version: int | None = None
    storage_state: Literal["ok", "high_water", "full"]
    storage_used_percent: float = Field(ge=0)
    outbox_depth: int = Field(ge=0)
    outbox_oldest_age_s: float | None = None
    offline_exposure_minor: int = Field(ge=0)
    offline_count: int = Field(ge=0)
    last_error: str | None = Field(None, max_length=1024)


class SyncRequest(_Message):
    """One exchange: what the device has not had acknowledged, and its health. Sent
    signed by the device key (``signing.request_bytes``), gzip'd."""

    kind: Literal["sync_request"] = "sync_request"
    device_id: Id
    #: The database's own id, drawn when it was created: a re-flashed or replaced
    #: database is a new stream, whose seqs never collide with the old one's.
    stream: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    sent_at: float
    outbox: list[OutboxEntry] = Field(default_factory=list, max_length=MAX_BATCH_ENTRIES)
    audit: list[AuditEntry] = Field(default_factory=list, max_length=MAX_BATCH_ENTRIES)
    audit_base: AuditBase | None = None
    heartbeat: Heartbeat
    #: The highest command seq the device has taken (applied or refused): the server
    #: sends only commands after it.
    commands_through: int = Field(0, ge=0, le=MAX_INT64)


EntryStatus = Literal["applied", "duplicate", "conflict", "rejected"]


class EntryResult(_Wire):
    seq: Seq
    status: EntryStatus
    reason: str | None = None


class ChainState(_Wire):
    state: Literal["ok", "broken"]
    head_seq: int = Field(ge=0, le=MAX_INT64)
    first_bad_seq: int | None = None
    reason: str | None = None


class Envelope(_Wire):
    """A document signed by the control plane: ``payload`` is base64url of the exact
    bytes signed (canonical JSON of a ``Command``), ``signature`` Ed25519 over them."""

    payload: B64
    signature: B64
    key_id: Id


class SyncResponse(_Message):
    kind: Literal["sync_response"] = "sync_response"
    server_time: float
    results: list[EntryResult] = Field(default_factory=list)
    #: Contiguous acknowledged high-water marks: every entry at or below was taken
    #: (applied, duplicate, or quarantined). None: nothing new is acknowledged.
    outbox_through: int | None = None
    audit_through: int | None = None
    chain: ChainState
    commands: list[Envelope] = Field(default_factory=list)


# --- download: signed commands -----------------------------------------------------------

CommandAction = Literal[
    "update_config", "activate_policy", "request_health", "resolve_outcome", "install_release"
]


class Document(_Wire):
    """A config, fraud-policy or release document a command carries: its kind, a version
    that only grows (a rollback is a new version with the old content), and the content
    (a release's: ``ReleaseContent``)."""

    kind: Literal["config", "policy", "release"]
    version: int = Field(ge=1, le=MAX_INT64)
    content: dict[str, Any]


class ReleaseContent(_Wire):
    """The content of a ``release`` document (``install_release``): which terminal
    release to run, named as the binary reports itself (``binary_version``), and the
    SHA-256 of its signed file list (``SHA256SUMS``), which the terminal fetches from
    the control plane with the files it lists and verifies with its pinned release key
    before anything is installed. ``files``/``bytes``: the whole release's, for the
    record (a terminal downloads only the files it does not hold)."""

    release: Id
    manifest_sha256: Hex64
    files: int = Field(ge=1, le=MAX_INT64)
    bytes: int = Field(ge=0, le=MAX_INT64)


class OutcomeDocument(_Wire):
    """The document a ``resolve_outcome`` carries: the truth about an operation whose
    answer the terminal lost (``content`` an ``Outcome``). Not a document in force, so
    its own model: kept by the terminal, never compared by version."""

    kind: Literal["outcome"]
    version: int = Field(ge=1, le=MAX_INT64)
    content: dict[str, Any]


class Outcome(_Wire):
    """What the acquirer says became of an operation whose answer a terminal lost: the
    content of ``resolve_outcome``'s document (kind ``outcome``). The operation's
    idempotency key, the run it belongs to, and its status at the acquirer
    (``not_found``: the acquirer never saw the key)."""

    operation: Literal["authorization", "refund"]
    run_id: Id
    key: Id
    status: Literal["approved", "declined", "reversed", "not_found"]
    amount_minor: int | None = Field(None, ge=0, le=MAX_INT64)
    currency: str | None = Field(None, max_length=MAX_FIELD_CHARS)
    acquirer_ref: str | None = Field(None, max_length=MAX_FIELD_CHARS)
    looked_up_at: float


class Command(_Wire):
    """What a command says, decoded from the bytes its envelope signs."""

    kind: Literal["command"] = "command"
    schema_version: int = Field(ge=1)
    command_id: Id
    device_id: Id  # audience: this device (a group command is one per device)
    group: str | None = Field(None, max_length=MAX_FIELD_CHARS)
    seq: Seq  # per device, strictly increasing
    action: CommandAction
    issued_at: float
    expires_at: float
    document: Document | OutcomeDocument | None = None


#: Command schema versions a terminal understands.
COMMAND_SCHEMA_VERSIONS: tuple[int, ...] = (1,)


class CommandResult(_Wire):
    """A command's outcome, reported upward through the outbox (topic ``command_result``)
    in the transaction that applied or refused it."""

    command_id: Id
    seq: Seq
    status: Literal["applied", "refused"]
    reason: str | None = None
    at: float


class ErrorDetail(_Wire):
    code: str
    message: str
    field: str | None = None
    #: With ``clock_skew``: the server's time, so the device can sign with it. Left out
    #: of the encoding when absent (version 1's error body, as its golden file has it).
    server_time: float | None = Field(None, exclude_if=lambda v: v is None)


class ErrorBody(_Wire):
    error: ErrorDetail


# --- encode / decode ---------------------------------------------------------------------

MESSAGES: dict[str, type[_Message]] = {
    m.model_fields["kind"].default: m
    for m in (
        EnrollRequest,
        EnrollResponse,
        RotateKeyRequest,
        RotateKeyResponse,
        SyncRequest,
        SyncResponse,
    )
}

M = TypeVar("M", bound=_Wire)


def encode(message: _Wire) -> bytes:
    """The JSON bytes of ``message`` (compact; not canonical: nothing signs these)."""
    return message.model_dump_json(exclude_none=False).encode()


def decode(data: bytes | str | Any, expect: type[M]) -> M:
    """``data`` (JSON bytes/text, or an already parsed object) as ``expect``; a
    ``WireError`` naming the field for anything else. For a message, the ``kind`` must be
    a known one and be ``expect``'s, and ``protocol_version`` one this side speaks."""
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WireError("malformed_json", f"the body is not JSON: {exc}") from None
        except RecursionError:
            raise WireError("too_deep", f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise WireError("wrong_type", f"expected a JSON object, got {type(data).__name__}")
    if _too_deep(data, MAX_JSON_DEPTH):
        raise WireError("too_deep", f"nested deeper than {MAX_JSON_DEPTH} levels")
    if issubclass(expect, _Message):
        kind = data.get("kind")
        if not isinstance(kind, str) or kind not in MESSAGES:
            raise WireError("unknown_kind", f"unknown message kind {kind!r:.80}", "kind")
        if MESSAGES[kind] is not expect:
            want = expect.model_fields["kind"].default
            raise WireError("wrong_kind", f"expected a {want}, got a {kind}", "kind")
        version = data.get("protocol_version")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise WireError(
                "unsupported_protocol_version",
                f"protocol_version {version!r:.40} is not served here; supported: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
                "protocol_version",
            )
    try:
        return expect.model_validate(data)
    except ValidationError as exc:
        raise _wire_error(exc) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text[:40]} is out of range")
    return number


def _too_deep(value: Any, room: int) -> bool:
    """True when ``value`` nests objects/arrays more than ``room`` levels deep."""
    if type(value) is dict:
        items: Any = value.values()
    elif type(value) is list:
        items = value
    else:
        return False
    if room == 0:
        return True
    for item in items:
        if (type(item) is dict or type(item) is list) and _too_deep(item, room - 1):
            return True
    return False


def _wire_error(exc: ValidationError) -> WireError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or None
    return WireError("invalid_field", f"{where or 'message'}: {first['msg']}", where)


def content_hash(
    message_id: str,
    topic: str,
    payload: Any,
    created_at: float,
    run_id: str | None,
    step: str | None,
) -> str:
    """SHA-256 (hex) of the canonical JSON of an outbox message's content: the same
    content gives the same hash on every side and every Python (``canonical_json``)."""
    body = ["tillflow.outbox", 1, message_id, run_id, step, topic, created_at, payload]
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def entry_hash(entry: OutboxEntry) -> str:
    """``content_hash`` recomputed from what ``entry`` carries."""
    return content_hash(
        entry.message_id, entry.topic, entry.payload, entry.created_at, entry.run_id, entry.step
    )


def b64e(data: bytes) -> str:
    """base64url without padding (what keys, signatures and payloads travel as)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str, field: str | None = None) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise WireError("invalid_field", f"{field or 'value'}: not base64url", field) from None
