"""The plain records the sync service and its storage port (``sync.server.SyncBackend``)
pass each other: devices, chain heads, quarantined items, commands. No I/O, no logic
beyond small derived values; the PostgreSQL backend (``cloud.sync``) and the tests'
in-memory one map them to rows and back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from edge.engine.audit import GENESIS

DeviceStatus = Literal["active", "revoked"]
ChainStateName = Literal["ok", "broken"]
QuarantineKind = Literal["outbox", "audit"]
CommandStatus = Literal["queued", "delivered", "applied", "refused", "expired", "cancelled"]
DocumentKind = Literal["config", "policy", "release"]


@dataclass(frozen=True)
class DeviceRecord:
    """An enrolled terminal: who it is (``public_key``, the key its requests verify
    under), where it belongs (``store``, ``group``), and what the cloud knows of it."""

    device_id: str
    store: str
    group: str | None
    public_key: str
    status: DeviceStatus
    enrolled_at: float
    binary_version: str | None = None
    hardware: Mapping[str, Any] = field(default_factory=dict)
    #: The key a rotation replaced, and when (it no longer verifies anything).
    previous_public_key: str | None = None
    rotated_at: float | None = None
    revoked_at: float | None = None
    #: Outbox entries whose key the cloud held with other content (quarantined).
    conflicts: int = 0
    #: From the latest sync (``device_health``); None before the first.
    last_seen_at: float | None = None
    heartbeat: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TokenGrant:
    """What a consumed enrollment token entitles its bearer to."""

    store: str
    group: str | None
    expires_at: float


@dataclass(frozen=True)
class EnrollToken:
    """A new enrollment token: ``token`` is the clear text, shown once and stored only
    as its SHA-256."""

    token: str
    store: str
    group: str | None
    expires_at: float


@dataclass(frozen=True)
class ChainRecord:
    """The cloud's state of one device audit chain, keyed (device, stream, chain).

    ``base``: where the chain the cloud holds starts (genesis, or the retention base the
    device reported when the cloud held nothing); ``head``: the last row it verified and
    stored. A ``broken`` chain takes no more rows until an operator repairs it."""

    chain: int = 0
    base_seq: int = 0
    base_hash: str = GENESIS
    head_seq: int = 0
    head_hash: str = GENESIS
    state: ChainStateName = "ok"
    first_bad_seq: int | None = None
    reason: str | None = None
    broken_at: float | None = None


@dataclass(frozen=True)
class QuarantineItem:
    """An outbox entry rejected or in conflict, or an audit row the chain could not
    take: kept where an operator can see it and replay or discard it.

    ``entry`` is the entry as JSON *text* (ASCII-escaped), so that even an entry the
    database's JSON type refuses (a NUL character, a lone surrogate, NaN) can be kept
    exactly; ``fingerprint`` (SHA-256 of that text) makes a re-sent entry one row."""

    kind: QuarantineKind
    seq: int
    reason: str
    detail: str
    entry: str
    fingerprint: str


@dataclass(frozen=True)
class NewCommand:
    """A command as queued: ``envelope`` is the sealed ``wire.Envelope`` JSON (what the
    device receives, byte for byte), ``document`` the ``wire.Document`` JSON it carries."""

    command_id: str
    device_id: str
    seq: int
    action: str
    envelope: str
    document: Mapping[str, Any] | None
    created_at: float
    expires_at: float
    #: The send it belongs to (``SyncService.queue_commands``); None: a single command.
    batch_id: str | None = None


@dataclass(frozen=True)
class NewDocument:
    """A config or policy document to send with a command. ``kind`` defaults to the one
    the action takes; ``version`` to the next free one of that kind, fleet-wide."""

    content: Mapping[str, Any]
    kind: DocumentKind | None = None
    version: int | None = None


@dataclass(frozen=True)
class QueuedCommand:
    """What ``SyncService.queue_command`` made."""

    command_id: str
    device_id: str
    seq: int
    action: str
    expires_at: float
    document_kind: DocumentKind | None = None
    document_version: int | None = None


@dataclass(frozen=True)
class CommandTarget:
    """Who a command goes to: one device, every active device of a group or of a store,
    or an explicit list of devices (a rollout's wave: ``device_ids``, its revoked ones
    left out) -- exactly one of the four."""

    device_id: str | None = None
    group: str | None = None
    store: str | None = None
    device_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        given = [
            n for n in ("device_id", "group", "store", "device_ids") if getattr(self, n) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"a command target names one of device_id, group, store, device_ids; got {given}"
            )
        if self.device_ids is not None:
            if not self.device_ids:
                raise ValueError("a device list names at least one device")
            object.__setattr__(self, "device_ids", tuple(sorted(set(self.device_ids))))

    @property
    def scope(self) -> Literal["device", "group", "store", "devices"]:
        if self.device_id is not None:
            return "device"
        if self.device_ids is not None:
            return "devices"
        return "group" if self.group is not None else "store"

    @property
    def value(self) -> str:
        if self.device_ids is not None:
            return f"{len(self.device_ids)} device(s)"
        value = self.device_id or self.group or self.store
        assert value is not None
        return value


@dataclass(frozen=True)
class CommandBatch:
    """What ``SyncService.queue_commands`` made: one command per device, one batch id."""

    batch_id: str
    target: CommandTarget
    action: str
    expires_at: float
    commands: tuple[QueuedCommand, ...]
    document_kind: DocumentKind | None = None
    document_version: int | None = None


@dataclass(frozen=True)
class ChainVerification:
    """One chain re-checked from what the cloud holds (``SyncService.verify_device_audit``)."""

    stream: str
    chain: int
    rows: int
    head_seq: int
    ok: bool
    first_bad_seq: int | None = None
    reason: str | None = None
    #: True when the break is the one recorded at ingest (the rows held verify).
    recorded: bool = False


@dataclass(frozen=True)
class AuditVerification:
    device_id: str
    chains: tuple[ChainVerification, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains)
