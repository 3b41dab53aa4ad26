"""The cloud's sync service: enrollment, the signed sync exchange, key rotation and
command creation, as I/O-free logic over a storage port (``SyncBackend``).

Every method a device calls returns ``(http_status, body)``; the HTTP route
(``cloud.api``) only moves bytes. One call is one backend transaction: a refusal (4xx)
rolls it back, so a refused request stores nothing, and a server-side fault
(``BackendUnavailable``: the database down, a deadlock, a serialization failure, a pool
timeout) is a 503 with a ``retry_after`` hint, never a rejection and never a partial
result.

Enrollment (``SyncService.enroll``) is signed too, by the key it registers (the
device id signed is that key's text): a retry after a lost answer, by the same key, gets
the same device again; any other use of a spent token is ``invalid_token``.

The exchange (``SyncService.sync``), in order:

1. **Auth**, before the body is parsed: the four signature headers
   (``missing_signature``), a known device (``unknown_device``), not revoked
   (``device_revoked``, 403), a time inside ``skew_s`` (``clock_skew``), the signature
   over ``signing.request_bytes`` under the device's current key (``bad_signature``), a
   nonce not seen before (``replayed_nonce``; nonces are kept ``2 * skew_s``).
2. **Body**: gunzip with a cap, then the request, each outbox entry and audit row
   validated on its own (``sync.server_ingest``).
3. **Outbox**: each entry alone is applied, a duplicate (same content hash), a conflict
   (same key, other content: quarantined, logged at ERROR, counted on the device) or
   rejected (quarantined). All four are acknowledged: ``outbox_through`` is the batch's
   contiguous settled prefix, so a poison entry never blocks what follows it.
4. **Audit**: the rows must continue the chain the cloud holds (``walk_chain``). An edit,
   gap, fork or reorder breaks the chain (recorded with its first bad seq); from there
   the rows are quarantined and *not* acknowledged: ``audit_through`` stays at the last
   row that verified, so the device keeps the rest until an operator repairs the chain.
5. **Heartbeat** stored as the device's latest health; **commands** pending after the
   device's ``commands_through`` returned, sealed, at most ``MAX_COMMANDS`` a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.engine.audit import verify_chain
from edge.engine.clock import Clock
from edge.engine.records import AuditRow
from edge.errors import TillflowError
from sync import signing, wire
from sync.server_ingest import (
    COMMAND_RESULT_TOPIC,
    BadItem,
    ChainWalk,
    ParsedSync,
    Refusal,
    clean_json,
    clean_text,
    contiguous_through,
    header,
    outbox_problem,
    parse_json,
    parse_sync,
    quarantine_item,
    read_body,
    text_problem,
    walk_chain,
)
from sync.server_records import (
    AuditVerification,
    ChainRecord,
    ChainVerification,
    CommandBatch,
    CommandTarget,
    DeviceRecord,
    DocumentKind,
    EnrollToken,
    NewCommand,
    NewDocument,
    QuarantineItem,
    QueuedCommand,
    TokenGrant,
)

log = logging.getLogger(__name__)

#: Commands returned in one exchange, at most.
MAX_COMMANDS = 50
#: An enrollment request is small; more is refused before it is parsed.
MAX_ENROLL_BYTES = 64 * 1024
#: The enroll route, as its signature covers it.
ENROLL_PATH = "/v1/enroll"
DEFAULT_TOKEN_TTL_S = 600.0
DEFAULT_COMMAND_TTL_S = 3600.0
#: What a 503 tells the device to wait before it tries again (seconds).
RETRY_AFTER_S = 2
#: Rows read per query when re-verifying a stored chain.
VERIFY_PAGE = 5000

#: The document kind each action carries (request_health carries none).
ACTION_DOCUMENT: dict[str, DocumentKind | None] = {
    "update_config": "config",
    "activate_policy": "policy",
    "request_health": None,
    "install_release": "release",
}

_NONCE = re.compile(r"^[0-9A-Za-z_-]{16,64}$")


class BackendUnavailable(TillflowError):
    """The storage behind the sync service failed for a reason of its own (database down,
    deadlock, serialization failure, pool timeout): nothing of the transaction committed,
    and the same request may simply be sent again."""

    code = "unavailable"
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float = RETRY_AFTER_S) -> None:
        super().__init__(message, hint="retry after a short wait")
        self.retry_after_s = retry_after_s


class ServiceError(TillflowError):
    """An operator's request the service cannot do: ``code`` says which
    (``unknown_device``, ``device_revoked``, ``bad_document``, ``stale_version``, ...)."""

    def __init__(self, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


# --- the storage port ----------------------------------------------------------------------


class SyncTransaction(Protocol):
    """The storage operations, all inside one transaction (``SyncBackend.transaction``):
    together they commit or not at all. Each is a single statement (or a few with no
    round trip per row) on PostgreSQL."""

    # enrollment
    def add_token(
        self, token_hash: str, store: str, group: str | None, created_at: float, expires_at: float
    ) -> None:
        """Store a new enrollment token (by its SHA-256 only)."""

    def consume_token(self, token_hash: str, now: float, device_id: str) -> TokenGrant | None:
        """Take the token for ``device_id`` if it is unused and unexpired, else None. A
        single compare-and-set: of two racing takers exactly one gets the grant."""

    def token_holder(self, token_hash: str) -> str | None:
        """The device a used token enrolled, or None (unknown or unused token)."""

    def add_device(self, device: DeviceRecord) -> None: ...

    # devices
    def device(self, device_id: str, *, lock: bool = False) -> DeviceRecord | None:
        """The device, or None. ``lock``: hold its row until the transaction ends, so
        one device's exchanges (and a revocation) happen one after the other."""

    def devices(self) -> list[DeviceRecord]:
        """Every device, with its latest health, by store then id."""

    def revoke_device(self, device_id: str, at: float) -> bool:
        """Mark an active device revoked; False if it was not active."""

    def replace_key(self, device_id: str, public_key: str, at: float) -> None:
        """Make ``public_key`` the device's key; the old one becomes its previous key."""

    def add_conflicts(self, device_id: str, count: int) -> None: ...

    def record_nonce(self, device_id: str, nonce: str, at: float, prune_before: float) -> bool:
        """Remember a request nonce; False when the device used it before. Nonces seen
        before ``prune_before`` are forgotten."""

    # outbox
    def insert_messages(
        self, device_id: str, stream: str, entries: Sequence[wire.OutboxEntry], at: float
    ) -> dict[int, str]:
        """Insert the entries (unique seqs) whose key is new, in one statement; return
        ``{seq: content_hash held}`` for those whose key the cloud already held."""

    def mark_outbox(self, device_id: str, stream: str, through: int, at: float) -> None:
        """Raise the stream's acknowledged mark to ``through`` (never lower it)."""

    def quarantine(
        self, device_id: str, stream: str, items: Sequence[QuarantineItem], at: float
    ) -> int:
        """Keep the items (status 'open'); one already kept (same fingerprint) is not
        kept twice. Returns how many were new."""

    # audit
    def chain(self, device_id: str, stream: str, chain: int) -> ChainRecord | None: ...

    def chains(self, device_id: str) -> list[tuple[str, ChainRecord]]:
        """Every chain of the device, as (stream, record), in order."""

    def audit_hashes(
        self, device_id: str, stream: str, chain: int, seqs: Collection[int]
    ) -> dict[int, str]:
        """``{seq: hash}`` of the stored rows among ``seqs``."""

    def insert_audit(
        self, device_id: str, stream: str, rows: Sequence[wire.AuditEntry], at: float
    ) -> None:
        """Store verified rows (one chain, consecutive seqs), in one statement."""

    def save_chain(self, device_id: str, stream: str, record: ChainRecord, at: float) -> None:
        """Create or update the chain's state."""

    def audit_rows(
        self, device_id: str, stream: str, chain: int, after_seq: int, through_seq: int, limit: int
    ) -> list[AuditRow]:
        """Stored rows with ``after_seq < seq <= through_seq``, in seq order, at most
        ``limit`` (``AuditRow.stream`` is the chain number)."""

    # health
    def save_heartbeat(
        self, device_id: str, stream: str, heartbeat: Mapping[str, Any], at: float
    ) -> None:
        """The device's latest heartbeat, and ``at`` as its last-seen time."""

    # commands and documents
    def find_commands(
        self, device_id: str, keys: Collection[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        """Which of the (command_id, seq) pairs are commands of this device."""

    def record_command_results(
        self, device_id: str, results: Sequence[wire.CommandResult], at: float
    ) -> None:
        """Set each command's status (applied/refused) and reason, unless it already has
        a result."""

    def take_commands(self, device_id: str, after_seq: int, now: float, limit: int) -> list[str]:
        """The envelopes (JSON text) of the device's commands with seq > ``after_seq``,
        queued or delivered and not expired, by seq, at most ``limit``; marks them
        delivered (the first delivery time kept). Queued commands past their expiry
        become 'expired'."""

    def next_command_seq(self, device_id: str) -> int:
        """Allocate the device's next command seq (1, 2, ...), atomically."""

    def add_command(self, command: NewCommand) -> None: ...

    def target_devices(self, group: str | None, store: str | None) -> list[str]:
        """The active devices of ``group`` or of ``store`` (the one given), by id, their
        rows locked until the transaction ends (as ``device(lock=True)``, in id order, so
        two sends never wait on each other in a circle)."""

    def lock_devices(self, device_ids: Sequence[str]) -> list[str]:
        """Which of ``device_ids`` are active devices, by id, their rows locked as
        ``target_devices`` locks them."""

    def cancel_commands(self, command_ids: Sequence[str]) -> list[str]:
        """Cancel those of ``command_ids`` still ``queued`` (never sent) in one
        statement; returns the ids cancelled. A cancelled command is never sent; a
        result the device reports for it later is still recorded."""

    def next_command_seqs(self, device_ids: Sequence[str]) -> dict[str, int]:
        """Allocate each device's next command seq, atomically, in one statement."""

    def add_commands(self, commands: Sequence[NewCommand]) -> None:
        """Queue many sealed commands (a batch), without a round trip per command."""

    def documents_head(self, kind: str) -> int:
        """The highest version of ``kind`` (0 if none), holding the kind's lock until
        the transaction ends, so two new versions are never the same number."""

    def document(self, kind: str, version: int) -> dict[str, Any] | None: ...

    def add_document(
        self, kind: str, version: int, content: Mapping[str, Any], at: float
    ) -> None: ...


class SyncBackend(Protocol):
    """Where the sync service keeps its state (``cloud.sync.PostgresSyncBackend``; the
    tests' ``sync_memory.MemoryBackend``)."""

    def transaction(self) -> AbstractContextManager[SyncTransaction]:
        """One transaction: committed when the block ends, rolled back when it raises.
        Server-side faults surface as ``BackendUnavailable`` (nothing committed)."""

    def schema_versions(self) -> dict[str, int]:
        """The schema versions this backend's database is at, by component."""


# --- the service ---------------------------------------------------------------------------


class SyncService:
    """The control plane's half of the sync protocol (module docstring).

    ``signing_key``: the control plane's command-signing key (its public half is what
    terminals pin at enrollment). None gives a service that cannot enroll or seal, for
    the operator commands that need neither."""

    def __init__(
        self,
        backend: SyncBackend,
        clock: Clock,
        signing_key: Ed25519PrivateKey | None,
        skew_s: float = 300.0,
    ) -> None:
        if not skew_s > 0:
            raise ValueError(f"skew_s must be positive, not {skew_s}")
        self.backend = backend
        self.clock = clock
        self._key = signing_key
        self.skew_s = skew_s

    @property
    def public_key(self) -> str:
        """The control plane's public key (base64url), as terminals pin it."""
        return signing.public_text(self._signing_key())

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            raise ServiceError(
                "no_signing_key",
                "this service was made without the control plane's signing key",
                hint="pass --signing-key FILE (the key `tillflow cloud serve` uses)",
            )
        return self._key

    # --- device calls ------------------------------------------------------------------

    def enroll(
        self, body: bytes, headers: Mapping[str, str] | None = None, path: str = ENROLL_PATH
    ) -> tuple[int, dict[str, Any]]:
        """Consume a one-time token and register the device's public key (module doc).

        The request is signed like every device request, by the key it registers. The
        signed bytes are ``signing.request_bytes("POST", path, body, time, nonce,
        public_key)``::

            tillflow-request-v1 \\n POST \\n /v1/enroll \\n sha256-hex(body)
                \\n time \\n nonce \\n public_key

        ``body`` the request's bytes as sent, ``public_key`` the request's own
        ``public_key`` text, which ``Tillflow-Device`` carries: proof that the caller
        holds the key. No signature is 401 ``missing_signature``; another key's, or a
        ``Tillflow-Device`` that is not the key enrolled, ``bad_signature``; the time
        window (``clock_skew``, with the server's time) and the nonce rules
        (``bad_nonce``; ``replayed_nonce``, the nonce kept under the device) are the
        sync exchange's.

        A retry by the same key of an enrollment that went through (its answer was
        lost) gets the same answer again -- the same device id -- and nothing new is
        stored but the nonce; unknown, expired and used tokens (by another key, or by a
        device since revoked or rotated to another key) are one answer
        (``invalid_token``): no oracle."""
        try:
            key = self._signing_key()
            if len(body) > MAX_ENROLL_BYTES:
                raise Refusal(
                    413, "body_too_large", f"an enroll request is at most {MAX_ENROLL_BYTES} bytes"
                )
            try:
                request = wire.decode(parse_json(body), wire.EnrollRequest)
                public = _public_key(request.public_key, "public_key")
            except wire.WireError as exc:
                raise Refusal.from_wire(exc) from None
            nonce = self._proof_of_key(headers or {}, path, body, request.public_key, public)
            hardware = request.hardware.model_dump()
            problem = text_problem([request.token, request.binary_version, hardware])
            if problem:
                raise Refusal(400, "invalid_field", f"the enroll request {problem}")
            now = self.clock.now()
            device_id = "dev_" + secrets.token_hex(8)
            token_hash = _token_hash(request.token)
            again = False
            with self.backend.transaction() as tx:
                grant = tx.consume_token(token_hash, now, device_id)
                if grant is None:
                    known = self._enrolled_by(tx, token_hash, request.public_key)
                    if known is None:
                        raise Refusal(401, "invalid_token", "the enrollment token is not valid")
                    again = True
                    device_id = known.device_id
                    grant = TokenGrant(known.store, known.group, 0.0)
                else:
                    tx.add_device(
                        DeviceRecord(
                            device_id=device_id,
                            store=grant.store,
                            group=grant.group,
                            public_key=request.public_key,
                            status="active",
                            enrolled_at=now,
                            binary_version=request.binary_version,
                            hardware=hardware,
                        )
                    )
                # Kept under the device the key now is (nonces are per device): the same
                # signed request twice is a replay, a retry signs anew.
                if not tx.record_nonce(device_id, nonce, now, now - 2 * self.skew_s):
                    raise Refusal(401, "replayed_nonce", "this request was seen before")
        except Refusal as refusal:
            return self._refused("enroll", None, refusal)
        except BackendUnavailable as exc:
            return self._unavailable("enroll", None, exc)
        log.info(
            "device %s %s in store %s",
            device_id,
            "asked again for its enrollment" if again else "enrolled",
            grant.store,
            extra={"action": "device_enrolled", "device_id": device_id, "store": grant.store},
        )
        response = wire.EnrollResponse(
            protocol_version=request.protocol_version,
            device_id=device_id,
            store=grant.store,
            group=grant.group,
            control_plane_key=signing.public_text(key),
            server_time=now,
        )
        return 200, response.model_dump(mode="json")

    def _proof_of_key(
        self,
        headers: Mapping[str, str],
        path: str,
        body: bytes,
        public_text: str,
        public: Ed25519PublicKey,
    ) -> str:
        """An enroll request must be signed by the key it registers, recently, under a
        well-formed nonce (returned: ``enroll`` records it under the device, so the same
        signed request sent twice is a replay)."""
        got = signing.request_headers(headers)
        if got is None:
            raise Refusal(401, "missing_signature", "an enroll request is signed by its key")
        if got[0] != public_text:
            raise Refusal(401, "bad_signature", "Tillflow-Device must be the key enrolled")
        self._verify_signed(public, "POST", path, body, got)
        return got[2]

    def _verify_signed(
        self,
        public: Ed25519PublicKey,
        method: str,
        path: str,
        body: bytes,
        got: tuple[str, str, str, str],
    ) -> float:
        """The request's time inside the skew window (else ``clock_skew``, with the
        server's time) and its signature over ``signing.request_bytes`` under ``public``
        (else ``bad_signature``). Returns the server's time."""
        claimed, time_text, nonce, signature = got
        try:
            sent_at = float(time_text)
        except ValueError:
            sent_at = math.nan
        now = self.clock.now()
        if not math.isfinite(sent_at) or abs(sent_at - now) > self.skew_s:
            raise Refusal(
                401,
                "clock_skew",
                f"Tillflow-Time {time_text[:40]!r} is not within {self.skew_s:g} s of the "
                f"server's {now:.3f}",
                server_time=now,
            )
        try:
            sig = wire.b64d(signature, "signature")
        except wire.WireError:
            raise Refusal(401, "bad_signature", "the signature does not verify") from None
        signed = signing.request_bytes(method, path, body, time_text, nonce, claimed)
        if not signing.verify(public, sig, signed):
            raise Refusal(401, "bad_signature", "the signature does not verify")
        if not _NONCE.match(nonce):
            raise Refusal(401, "bad_nonce", "Tillflow-Nonce must be 16-64 of [0-9A-Za-z_-]")
        return now

    @staticmethod
    def _enrolled_by(tx: SyncTransaction, token_hash: str, public_key: str) -> DeviceRecord | None:
        """The device this token enrolled, if it holds ``public_key`` (an enrollment whose
        answer was lost, asked again)."""
        holder = tx.token_holder(token_hash)
        device = None if holder is None else tx.device(holder)
        if device is None or device.public_key != public_key or device.status != "active":
            return None
        return device

    def sync(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """One signed exchange: the outbox and audit rows up, the heartbeat, the pending
        commands down (module docstring)."""
        device_id = _claimed_device(headers)
        try:
            _cap_raw(headers, body)
            with self.backend.transaction() as tx:
                device = self._authenticate(tx, method, path, headers, body)
                device_id = device.device_id
                raw = read_body(headers, body)
                parsed = parse_sync(parse_json(raw), clean=clean_text(raw))
                response = self._exchange(tx, device, parsed)
        except Refusal as refusal:
            return self._refused("sync", device_id, refusal)
        except BackendUnavailable as exc:
            return self._unavailable("sync", device_id, exc)
        return 200, response.model_dump(mode="json")

    def rotate_key(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """Replace the device's key with the one ``proof`` shows it holds; the request is
        signed by the current key. From then on the old key is refused."""
        device_id = _claimed_device(headers)
        try:
            _cap_raw(headers, body)
            with self.backend.transaction() as tx:
                device = self._authenticate(tx, method, path, headers, body)
                device_id = device.device_id
                try:
                    request = wire.decode(
                        parse_json(read_body(headers, body)), wire.RotateKeyRequest
                    )
                    new_key = _public_key(request.new_public_key, "new_public_key")
                    proof = wire.b64d(request.proof, "proof")
                except wire.WireError as exc:
                    raise Refusal.from_wire(exc) from None
                if request.new_public_key == device.public_key:
                    raise Refusal(
                        422, "same_key", "new_public_key is the key in use", "new_public_key"
                    )
                message = signing.rotation_bytes(device.device_id, request.new_public_key)
                if not signing.verify(new_key, proof, message):
                    raise Refusal(401, "bad_proof", "proof is not the new key's signature", "proof")
                now = self.clock.now()
                tx.replace_key(device.device_id, request.new_public_key, now)
        except Refusal as refusal:
            return self._refused("rotate_key", device_id, refusal)
        except BackendUnavailable as exc:
            return self._unavailable("rotate_key", device_id, exc)
        log.info(
            "device %s rotated its key",
            device.device_id,
            extra={"action": "key_rotated", "device_id": device.device_id},
        )
        response = wire.RotateKeyResponse(
            protocol_version=request.protocol_version, device_id=device.device_id, rotated_at=now
        )
        return 200, response.model_dump(mode="json")

    # --- auth --------------------------------------------------------------------------

    def _authenticate(
        self,
        tx: SyncTransaction,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> DeviceRecord:
        got = signing.request_headers(headers)
        if got is None:
            raise Refusal(401, "missing_signature", "the request is not signed")
        device_id, _, nonce, _ = got
        if len(device_id) > wire.MAX_FIELD_CHARS or text_problem(device_id):
            raise Refusal(401, "unknown_device", "no such device")
        device = tx.device(device_id, lock=True)
        if device is None:
            raise Refusal(401, "unknown_device", f"no device {device_id}")
        if device.status != "active":
            raise Refusal(403, "device_revoked", f"device {device_id} is revoked")
        try:
            public = signing.load_public(device.public_key)
        except wire.WireError:
            raise Refusal(401, "bad_signature", "the signature does not verify") from None
        now = self._verify_signed(public, method, path, body, got)
        if not tx.record_nonce(device_id, nonce, now, now - 2 * self.skew_s):
            raise Refusal(401, "replayed_nonce", "this request was seen before")
        return device

    # --- the exchange ------------------------------------------------------------------

    def _exchange(
        self, tx: SyncTransaction, device: DeviceRecord, parsed: ParsedSync
    ) -> wire.SyncResponse:
        request = parsed.request
        if request.device_id != device.device_id:
            raise Refusal(
                403,
                "device_mismatch",
                f"the request is for {request.device_id[:80]!r} but signed by {device.device_id}",
                "device_id",
            )
        chains = {row.chain for row in parsed.audit}
        if len(chains) > 1:
            raise Refusal(
                422, "mixed_audit_chains", "a request carries the rows of one audit chain", "audit"
            )
        now = self.clock.now()
        results, outbox_through = self._take_outbox(
            tx, device, request.stream, parsed.outbox, now, parsed.clean
        )
        chain = chains.pop() if chains else 0
        walk = self._take_audit(tx, device, request, chain, parsed.audit, now, parsed.clean)
        heartbeat = _clean_heartbeat(request.heartbeat)
        tx.save_heartbeat(device.device_id, request.stream, heartbeat, now)
        envelopes = tx.take_commands(device.device_id, request.commands_through, now, MAX_COMMANDS)
        state = walk.chain
        audit_through = state.head_seq if parsed.audit and state.head_seq > 0 else None
        return wire.SyncResponse(
            protocol_version=request.protocol_version,
            server_time=now,
            results=results,
            outbox_through=outbox_through,
            audit_through=audit_through,
            chain=wire.ChainState(
                state=state.state,
                head_seq=state.head_seq,
                first_bad_seq=state.first_bad_seq,
                reason=state.reason,
            ),
            commands=[wire.Envelope.model_validate_json(e) for e in envelopes],
        )

    def _take_outbox(
        self,
        tx: SyncTransaction,
        device: DeviceRecord,
        stream: str,
        entries: Sequence[wire.OutboxEntry | BadItem],
        now: float,
        clean: bool,
    ) -> tuple[list[wire.EntryResult], int | None]:
        """Judge each entry alone; insert the good ones in one statement; quarantine the
        rest; acknowledge all of them."""
        if not entries:
            return [], None
        device_id = device.device_id
        verdicts: list[tuple[int, str, str | None]] = []  # (seq, status, reason) per entry
        quarantined: list[QuarantineItem] = []
        conflicts: list[QuarantineItem] = []
        candidates: dict[int, wire.OutboxEntry] = {}  # first good entry per seq
        pending: list[tuple[int, wire.OutboxEntry]] = []  # (index in verdicts, entry)
        results_wanted: dict[int, wire.CommandResult] = {}
        for item in entries:
            if isinstance(item, BadItem):
                verdicts.append((item.seq, "rejected", "invalid_entry"))
                quarantined.append(
                    quarantine_item("outbox", item.seq, "invalid_entry", item.message, item.raw)
                )
                continue
            problem = outbox_problem(item, clean=clean)
            if problem:
                reason, detail = problem
                verdicts.append((item.seq, "rejected", reason))
                quarantined.append(quarantine_item("outbox", item.seq, reason, detail, item))
                continue
            if item.topic == COMMAND_RESULT_TOPIC:
                results_wanted[item.seq] = wire.decode(item.payload, wire.CommandResult)
            pending.append((len(verdicts), item))
            verdicts.append((item.seq, "", None))
        if results_wanted:
            keys = {(r.command_id, r.seq) for r in results_wanted.values()}
            known = tx.find_commands(device_id, keys)
            kept = []
            for index, item in pending:
                result = results_wanted.get(item.seq)
                if result is not None and (result.command_id, result.seq) not in known:
                    verdicts[index] = (item.seq, "rejected", "unknown_command")
                    detail = f"entry {item.seq}: no command {result.command_id} seq {result.seq}"
                    quarantined.append(
                        quarantine_item("outbox", item.seq, "unknown_command", detail, item)
                    )
                    del results_wanted[item.seq]
                else:
                    kept.append((index, item))
            pending = kept
        for _, item in pending:
            candidates.setdefault(item.seq, item)
        held = (
            tx.insert_messages(device_id, stream, list(candidates.values()), now)
            if candidates
            else {}
        )
        first_of: dict[int, wire.OutboxEntry] = {}
        for index, item in pending:
            first = first_of.setdefault(item.seq, item)
            if first is item and item.seq not in held:
                verdicts[index] = (item.seq, "applied", None)
                continue
            held_hash = held.get(item.seq, first.content_hash)
            if held_hash == item.content_hash:
                verdicts[index] = (item.seq, "duplicate", None)
                continue
            verdicts[index] = (item.seq, "conflict", "content_conflict")
            detail = f"entry {item.seq}: the cloud holds other content under this key"
            conflicts.append(quarantine_item("outbox", item.seq, "content_conflict", detail, item))
            log.error(
                "outbox conflict: device %s stream %s seq %d holds other content",
                device_id,
                stream,
                item.seq,
                extra={
                    "action": "sync_conflict",
                    "device_id": device_id,
                    "stream": stream,
                    "seq": item.seq,
                },
            )
        applied_results = [
            wire.decode(item.payload, wire.CommandResult)
            for index, item in pending
            if item.topic == COMMAND_RESULT_TOPIC and verdicts[index][1] == "applied"
        ]
        if applied_results:
            tx.record_command_results(device_id, applied_results, now)
        if quarantined:
            tx.quarantine(device_id, stream, quarantined, now)
        if conflicts:
            new = tx.quarantine(device_id, stream, conflicts, now)
            if new:
                tx.add_conflicts(device_id, new)
        settled = {seq for seq, status, _ in verdicts if status}
        through = contiguous_through(sorted({seq for seq, _, _ in verdicts}), settled)
        if through is not None:
            tx.mark_outbox(device_id, stream, through, now)
        if quarantined:
            log.warning(
                "device %s: %d outbox entries rejected (quarantined)",
                device_id,
                len(quarantined),
                extra={"action": "sync_rejected", "device_id": device_id, "stream": stream},
            )
        results = [wire.EntryResult(seq=s, status=st, reason=r) for s, st, r in verdicts]  # type: ignore[arg-type]
        return results, through

    def _take_audit(
        self,
        tx: SyncTransaction,
        device: DeviceRecord,
        request: wire.SyncRequest,
        chain: int,
        rows: Sequence[wire.AuditEntry | BadItem],
        now: float,
        clean: bool,
    ) -> ChainWalk:
        device_id, stream = device.device_id, request.stream
        start = tx.chain(device_id, stream, chain)
        if not rows:
            return ChainWalk(start or ChainRecord(chain=chain))
        if start is None:
            base = request.audit_base
            start = ChainRecord(chain=chain)
            if base is not None:
                start = replace(
                    start,
                    base_seq=base.seq,
                    base_hash=base.hash,
                    head_seq=base.seq,
                    head_hash=base.hash,
                )
        at_or_below = {
            r.seq
            for r in rows
            if start.base_seq < r.seq <= start.head_seq and not isinstance(r, BadItem)
        }
        held = tx.audit_hashes(device_id, stream, chain, at_or_below) if at_or_below else {}
        walk = walk_chain(start, rows, held, now, clean=clean)
        if walk.accepted:
            tx.insert_audit(device_id, stream, walk.accepted, now)
        if walk.quarantined:
            tx.quarantine(device_id, stream, walk.quarantined, now)
        tx.save_chain(device_id, stream, walk.chain, now)
        if walk.broke:
            log.error(
                "audit chain break: device %s stream %s chain %d at seq %s: %s",
                device_id,
                stream,
                chain,
                walk.chain.first_bad_seq,
                walk.chain.reason,
                extra={
                    "action": "audit_chain_break",
                    "device_id": device_id,
                    "stream": stream,
                    "first_bad_seq": walk.chain.first_bad_seq,
                },
            )
        return walk

    # --- answers -----------------------------------------------------------------------

    def _refused(
        self, what: str, device_id: str | None, refusal: Refusal
    ) -> tuple[int, dict[str, Any]]:
        log.warning(
            "%s refused (%d %s) for device %s: %s",
            what,
            refusal.status,
            refusal.code,
            device_id or "-",
            refusal.message,
            extra={
                "action": f"{what}_refused",
                "code": refusal.code,
                "device_id": device_id,
                "status": refusal.status,
            },
        )
        return refusal.status, refusal.body()

    def _unavailable(
        self, what: str, device_id: str | None, exc: BackendUnavailable
    ) -> tuple[int, dict[str, Any]]:
        log.warning(
            "%s unavailable for device %s: %s",
            what,
            device_id or "-",
            exc.message,
            extra={"action": f"{what}_unavailable", "device_id": device_id},
        )
        body = wire.WireError("unavailable", f"the service is unavailable: {exc.message}").body()
        body["retry_after"] = exc.retry_after_s
        return 503, body

    # --- operator calls ----------------------------------------------------------------

    def create_enroll_token(
        self, store: str, group: str | None = None, ttl_s: float = DEFAULT_TOKEN_TTL_S
    ) -> EnrollToken:
        """A one-time enrollment token for ``store`` (and ``group``), valid ``ttl_s``.
        The clear token is in the result only; the backend keeps its SHA-256."""
        for name, value in (("store", store), ("group", group)):
            if value is not None and (
                not value or len(value) > wire.MAX_FIELD_CHARS or text_problem(value)
            ):
                raise ServiceError(
                    "bad_argument", f"{name} must be 1-{wire.MAX_FIELD_CHARS} characters"
                )
        if not ttl_s > 0:
            raise ServiceError(
                "bad_argument", f"the token's lifetime must be positive, not {ttl_s}"
            )
        token = secrets.token_urlsafe(24)
        now = self.clock.now()
        with self.backend.transaction() as tx:
            tx.add_token(_token_hash(token), store, group, now, now + ttl_s)
        log.info(
            "enrollment token made for store %s",
            store,
            extra={"action": "enroll_token_created", "store": store},
        )
        return EnrollToken(token, store, group, now + ttl_s)

    def revoke_device(self, device_id: str) -> DeviceRecord:
        """Revoke a device: its next request is refused (403 ``device_revoked``).
        Revoking a revoked device changes nothing."""
        with self.backend.transaction() as tx:
            device = tx.device(device_id, lock=True)
            if device is None:
                raise ServiceError("unknown_device", f"no device {device_id}")
            if device.status == "active":
                now = self.clock.now()
                tx.revoke_device(device_id, now)
                device = replace(device, status="revoked", revoked_at=now)
        log.warning(
            "device %s revoked",
            device_id,
            extra={"action": "device_revoked", "device_id": device_id},
        )
        return device

    def list_devices(self) -> list[DeviceRecord]:
        with self.backend.transaction() as tx:
            return tx.devices()

    def device(self, device_id: str) -> DeviceRecord:
        with self.backend.transaction() as tx:
            device = tx.device(device_id)
        if device is None:
            raise ServiceError("unknown_device", f"no device {device_id}")
        return device

    def queue_command(
        self,
        device_id: str,
        action: str,
        document: NewDocument | None = None,
        ttl_s: float = DEFAULT_COMMAND_TTL_S,
        group: str | None = None,
    ) -> QueuedCommand:
        """Seal a command for ``device_id`` under the device's next command seq; it goes
        down with the device's next sync. ``document`` (config for update_config, policy
        for activate_policy) is stored under a version that only grows per kind,
        fleet-wide: the one given, else the content's own ``version`` (a policy states
        one), else the next free one. A version given must be higher than every other,
        or name an existing version with the same content (one document sent to many
        devices)."""
        key = self._signing_key()
        wanted = self._check_command(action, document, ttl_s)
        now = self.clock.now()
        with self.backend.transaction() as tx:
            device = tx.device(device_id, lock=True)
            if device is None:
                raise ServiceError("unknown_device", f"no device {device_id}")
            if device.status != "active":
                raise ServiceError("device_revoked", f"device {device_id} is revoked")
            if group is not None and group != device.group:
                raise ServiceError(
                    "bad_group", f"device {device_id} is in group {device.group!r}, not {group!r}"
                )
            doc = None
            if document is not None and wanted is not None:
                doc = self._document(tx, document, wanted, now)
            seq = tx.next_command_seq(device_id)
            new = _sealed(key, device_id, seq, action, group, now, ttl_s, doc, None)
            tx.add_command(new)
        _log_queued(new)
        return _queued(new, doc)

    def queue_commands(
        self,
        target: CommandTarget,
        action: str,
        document: NewDocument | None = None,
        ttl_s: float = DEFAULT_COMMAND_TTL_S,
    ) -> CommandBatch:
        """One call, one transaction: a sealed command for ``target`` -- one device,
        every active device of a group or a store, or those of a list of devices that are
        active (revoked ones are left out: the batch's commands say which got one) -- each
        under its own device's next seq, all sharing a batch id (``commands.batch_id``)
        and one document version (stored once, as ``queue_command`` says). A group or
        store with no active device is ``no_devices``; a device target is refused as
        ``queue_command`` refuses it."""
        key = self._signing_key()
        wanted = self._check_command(action, document, ttl_s)
        for name, value in (("group", target.group), ("store", target.store)):
            if value is not None and (not value or len(value) > wire.MAX_FIELD_CHARS):
                raise ServiceError(
                    "bad_argument", f"{name} must be 1-{wire.MAX_FIELD_CHARS} characters"
                )
        now = self.clock.now()
        batch_id = "bat_" + uuid.uuid4().hex
        with self.backend.transaction() as tx:
            if target.device_ids is not None:
                device_ids = tx.lock_devices(target.device_ids)
                if not device_ids:
                    raise ServiceError("no_devices", "no active device in the list")
            elif target.device_id is not None:
                device = tx.device(target.device_id, lock=True)
                if device is None:
                    raise ServiceError("unknown_device", f"no device {target.device_id}")
                if device.status != "active":
                    raise ServiceError("device_revoked", f"device {target.device_id} is revoked")
                device_ids = [target.device_id]
            else:
                device_ids = tx.target_devices(target.group, target.store)
                if not device_ids:
                    raise ServiceError(
                        "no_devices", f"no active device in {target.scope} {target.value!r}"
                    )
            doc = None
            if document is not None and wanted is not None:
                doc = self._document(tx, document, wanted, now)
            seqs = tx.next_command_seqs(device_ids)
            made = [
                _sealed(key, d, seqs[d], action, target.group, now, ttl_s, doc, batch_id)
                for d in device_ids
            ]
            tx.add_commands(made)
        log.info(
            "batch %s: %s queued for %d device(s) of %s %s",
            batch_id,
            action,
            len(made),
            target.scope,
            target.value,
            extra={"action": "commands_queued", "batch_id": batch_id, "count": len(made)},
        )
        return CommandBatch(
            batch_id,
            target,
            action,
            now + ttl_s,
            tuple(_queued(c, doc) for c in made),
            doc.kind if doc else None,
            doc.version if doc else None,
        )

    def cancel_commands(self, command_ids: Sequence[str]) -> list[str]:
        """Take back the commands of ``command_ids`` not yet sent (``queued``), in one
        transaction and one UPDATE; returns those cancelled (the others were delivered,
        answered or expired already, or are not commands). A cancelled command is never
        sent; a result the device reports for it anyway is still recorded."""
        if not command_ids:
            return []
        with self.backend.transaction() as tx:
            cancelled = tx.cancel_commands(sorted(set(command_ids)))
        log.info(
            "%d of %d command(s) cancelled",
            len(cancelled),
            len(command_ids),
            extra={"action": "commands_cancelled", "count": len(cancelled)},
        )
        return cancelled

    def _check_command(
        self, action: str, document: NewDocument | None, ttl_s: float
    ) -> DocumentKind | None:
        """The document kind ``action`` carries, once the request is known to be sound."""
        if action not in ACTION_DOCUMENT:
            known = ", ".join(sorted(ACTION_DOCUMENT))
            raise ServiceError("bad_action", f"unknown action {action!r}; one of: {known}")
        wanted = ACTION_DOCUMENT[action]
        if not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ServiceError(
                "bad_argument", f"the command's lifetime must be positive, not {ttl_s}"
            )
        if wanted is None and document is not None:
            raise ServiceError("bad_document", f"{action} carries no document")
        if wanted is not None and document is None:
            raise ServiceError("bad_document", f"{action} needs a {wanted} document")
        return wanted

    def _document(
        self, tx: SyncTransaction, document: NewDocument, wanted: DocumentKind, now: float
    ) -> wire.Document:
        kind = document.kind or wanted
        if kind != wanted:
            raise ServiceError(
                "bad_document", f"this action carries a {wanted} document, not {kind}"
            )
        content = dict(document.content)
        try:
            candidate = wire.Document(kind=kind, version=document.version or 1, content=content)
            wire.decode(candidate.model_dump(mode="json"), wire.Document)
        except (wire.WireError, ValueError) as exc:
            raise ServiceError("bad_document", f"the {kind} document is not valid: {exc}") from None
        if text_problem(content):
            raise ServiceError("bad_document", f"the {kind} document {text_problem(content)}")
        # A document that states its own version (a fraud policy does, and the terminal
        # holds the two equal) is sent under that version.
        own = content.get("version")
        own = own if type(own) is int and own >= 1 else None
        if own is not None and document.version is not None and own != document.version:
            raise ServiceError(
                "bad_document", f"the {kind} says version {own}, not {document.version}"
            )
        head = tx.documents_head(kind)
        version = document.version if document.version is not None else own
        if version is None:
            version = head + 1
        elif version <= head:
            existing = tx.document(kind, version)
            if existing != content:
                raise ServiceError(
                    "stale_version",
                    f"{kind} version {version} is not above the newest ({head})"
                    + (" and exists with other content" if existing is not None else ""),
                    hint="leave the version out to take the next one; a rollback is a new "
                    "version with the old content",
                )
            return wire.Document(kind=kind, version=version, content=content)
        tx.add_document(kind, version, content, now)
        return wire.Document(kind=kind, version=version, content=content)

    def verify_device_audit(self, device_id: str) -> AuditVerification:
        """Re-check every audit chain the cloud holds for the device from its base, row
        by row (``edge.engine.audit.verify_chain``), and report the first broken link;
        a break recorded at ingest is reported too (its rows never reached the store)."""
        with self.backend.transaction() as tx:
            if tx.device(device_id) is None:
                raise ServiceError("unknown_device", f"no device {device_id}")
            out = []
            for stream, record in tx.chains(device_id):
                rows = _paged_rows(tx, device_id, stream, record)
                report = verify_chain(
                    rows,
                    (record.head_seq, record.head_hash),
                    (record.base_seq, record.base_hash),
                    stream=record.chain,
                )
                if not report.ok:
                    out.append(
                        ChainVerification(
                            stream,
                            record.chain,
                            report.rows,
                            record.head_seq,
                            False,
                            report.broken_at,
                            report.reason,
                        )
                    )
                elif record.state == "broken":
                    out.append(
                        ChainVerification(
                            stream,
                            record.chain,
                            report.rows,
                            record.head_seq,
                            False,
                            record.first_bad_seq,
                            record.reason,
                            recorded=True,
                        )
                    )
                else:
                    out.append(
                        ChainVerification(stream, record.chain, report.rows, record.head_seq, True)
                    )
        return AuditVerification(device_id, tuple(out))


def _paged_rows(
    tx: SyncTransaction, device_id: str, stream: str, record: ChainRecord
) -> Iterator[AuditRow]:
    after = record.base_seq
    while True:
        page = tx.audit_rows(device_id, stream, record.chain, after, record.head_seq, VERIFY_PAGE)
        yield from page
        if len(page) < VERIFY_PAGE:
            return
        after = page[-1].seq


def _sealed(
    key: Ed25519PrivateKey,
    device_id: str,
    seq: int,
    action: str,
    group: str | None,
    now: float,
    ttl_s: float,
    doc: wire.Document | None,
    batch_id: str | None,
) -> NewCommand:
    """A command for one device, sealed (signed over the bytes it will carry)."""
    command = wire.Command(
        schema_version=1,
        command_id="cmd_" + uuid.uuid4().hex,
        device_id=device_id,
        group=group,
        seq=seq,
        action=action,  # type: ignore[arg-type]
        issued_at=now,
        expires_at=now + ttl_s,
        document=doc,
    )
    envelope = signing.seal(key, command)
    return NewCommand(
        command_id=command.command_id,
        device_id=device_id,
        seq=seq,
        action=action,
        envelope=wire.encode(envelope).decode(),
        document=doc.model_dump(mode="json") if doc else None,
        created_at=now,
        expires_at=command.expires_at,
        batch_id=batch_id,
    )


def _queued(new: NewCommand, doc: wire.Document | None) -> QueuedCommand:
    return QueuedCommand(
        new.command_id,
        new.device_id,
        new.seq,
        new.action,
        new.expires_at,
        doc.kind if doc else None,
        doc.version if doc else None,
    )


def _log_queued(new: NewCommand) -> None:
    log.info(
        "command %s (%s) queued for device %s as seq %d",
        new.command_id,
        new.action,
        new.device_id,
        new.seq,
        extra={
            "action": "command_queued",
            "device_id": new.device_id,
            "command_id": new.command_id,
        },
    )


def _public_key(text: str, field: str) -> Ed25519PublicKey:
    """The key ``text`` names, which must be written the one way keys are written
    (``signing.public_text``): the lenient base64 decoder would take stray characters
    (a NUL among them) that the database then cannot store."""
    key = signing.load_public(text)
    if signing.public_text(key) != text:
        raise wire.WireError("invalid_field", f"{field}: not a canonical base64url key", field)
    return key


def _claimed_device(headers: Mapping[str, str]) -> str | None:
    """The device a request says it is from (for logs: at most 80 characters)."""
    claimed = header(headers, signing.H_DEVICE)
    return None if claimed is None else claimed[:80]


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _cap_raw(headers: Mapping[str, str], body: bytes) -> None:
    """A body over the compressed cap is refused before anything reads it."""
    gzipped = (header(headers, "content-encoding") or "").strip().lower() == "gzip"
    cap = wire.MAX_COMPRESSED_BYTES if gzipped else wire.MAX_BATCH_BYTES
    if len(body) > cap:
        raise Refusal(413, "batch_too_large", f"the body is {len(body)} bytes; the limit is {cap}")


def _clean_heartbeat(heartbeat: wire.Heartbeat) -> dict[str, Any]:
    cleaned: dict[str, Any] = clean_json(heartbeat.model_dump(mode="python"))
    return cleaned


__all__ = [
    "ACTION_DOCUMENT",
    "MAX_COMMANDS",
    "AuditVerification",
    "BackendUnavailable",
    "ChainRecord",
    "ChainVerification",
    "CommandBatch",
    "CommandTarget",
    "DeviceRecord",
    "EnrollToken",
    "NewCommand",
    "NewDocument",
    "QuarantineItem",
    "QueuedCommand",
    "ServiceError",
    "SyncBackend",
    "SyncService",
    "SyncTransaction",
    "TokenGrant",
]
