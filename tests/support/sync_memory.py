"""An in-memory ``sync.server.SyncBackend`` for the service's unit tests: dicts, one lock.

A transaction works on a deep copy of the state and swaps it in when the block ends
without an exception, so a refusal or an injected fault leaves the state exactly as it
was (as a rolled-back PostgreSQL transaction does). ``fail_on`` names an operation that
raises ``BackendUnavailable`` (a database fault) when called, ``fail_times`` how often.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edge.engine.records import AuditRow
from sync import wire
from sync.server import BackendUnavailable
from sync.server_records import ChainRecord, DeviceRecord, NewCommand, QuarantineItem, TokenGrant


@dataclass
class State:
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    command_seq: dict[str, int] = field(default_factory=dict)
    nonces: dict[tuple[str, str], float] = field(default_factory=dict)
    messages: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    marks: dict[tuple[str, str], int] = field(default_factory=dict)
    quarantine: dict[tuple[str, str, str, int, str], dict[str, Any]] = field(default_factory=dict)
    chains: dict[tuple[str, str, int], ChainRecord] = field(default_factory=dict)
    audit: dict[tuple[str, str, int, int], wire.AuditEntry] = field(default_factory=dict)
    health: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)
    documents: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)


class MemoryBackend:
    def __init__(self) -> None:
        self.state = State()
        self._lock = threading.Lock()
        self.fail_on: str | None = None
        self.fail_times = 1
        self.commits = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[MemoryTx]:
        with self._lock:
            work = copy.deepcopy(self.state)
            yield MemoryTx(work, self)
            self.state = work
            self.commits += 1

    def schema_versions(self) -> dict[str, int]:
        return {"sync": 1}

    def _maybe_fail(self, op: str) -> None:
        if self.fail_on == op and self.fail_times > 0:
            self.fail_times -= 1
            raise BackendUnavailable(f"injected fault in {op}")


class MemoryTx:
    def __init__(self, state: State, backend: MemoryBackend) -> None:
        self.s = state
        self._b = backend

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_") and name != "s":
            object.__getattribute__(self, "_b")._maybe_fail(name)
        return object.__getattribute__(self, name)

    # enrollment
    def add_token(
        self, token_hash: str, store: str, group: str | None, created_at: float, expires_at: float
    ) -> None:
        self.s.tokens[token_hash] = {
            "store": store,
            "group": group,
            "created_at": created_at,
            "expires_at": expires_at,
            "used_at": None,
            "device_id": None,
        }

    def consume_token(self, token_hash: str, now: float, device_id: str) -> TokenGrant | None:
        t = self.s.tokens.get(token_hash)
        if t is None or t["used_at"] is not None or t["expires_at"] <= now:
            return None
        t["used_at"], t["device_id"] = now, device_id
        return TokenGrant(t["store"], t["group"], t["expires_at"])

    def token_holder(self, token_hash: str) -> str | None:
        t = self.s.tokens.get(token_hash)
        return None if t is None or t["used_at"] is None else t["device_id"]

    def add_device(self, device: DeviceRecord) -> None:
        assert device.device_id not in self.s.devices
        self.s.devices[device.device_id] = device
        self.s.command_seq[device.device_id] = 0

    # devices
    def device(self, device_id: str, *, lock: bool = False) -> DeviceRecord | None:
        d = self.s.devices.get(device_id)
        if d is None:
            return None
        h = self.s.health.get(device_id)
        if h:
            d = replace(d, last_seen_at=h["last_seen_at"], heartbeat=h["heartbeat"])
        return d

    def devices(self) -> list[DeviceRecord]:
        found = [self.device(i) for i in self.s.devices]
        return sorted((d for d in found if d), key=lambda d: (d.store, d.device_id))

    def revoke_device(self, device_id: str, at: float) -> bool:
        d = self.s.devices[device_id]
        if d.status != "active":
            return False
        self.s.devices[device_id] = replace(d, status="revoked", revoked_at=at)
        return True

    def replace_key(self, device_id: str, public_key: str, at: float) -> None:
        d = self.s.devices[device_id]
        self.s.devices[device_id] = replace(
            d, public_key=public_key, previous_public_key=d.public_key, rotated_at=at
        )

    def add_conflicts(self, device_id: str, count: int) -> None:
        d = self.s.devices[device_id]
        self.s.devices[device_id] = replace(d, conflicts=d.conflicts + count)

    def record_nonce(self, device_id: str, nonce: str, at: float, prune_before: float) -> bool:
        for key in [k for k, seen in self.s.nonces.items() if k[0] == device_id]:
            if self.s.nonces[key] < prune_before:
                del self.s.nonces[key]
        if (device_id, nonce) in self.s.nonces:
            return False
        self.s.nonces[(device_id, nonce)] = at
        return True

    # outbox
    def insert_messages(
        self, device_id: str, stream: str, entries: Sequence[wire.OutboxEntry], at: float
    ) -> dict[int, str]:
        held = {}
        for e in entries:
            key = (device_id, stream, e.seq)
            if key in self.s.messages:
                held[e.seq] = self.s.messages[key]["content_hash"]
            else:
                self.s.messages[key] = e.model_dump() | {"received_at": at}
        return held

    def mark_outbox(self, device_id: str, stream: str, through: int, at: float) -> None:
        key = (device_id, stream)
        self.s.marks[key] = max(self.s.marks.get(key, 0), through)

    def quarantine(
        self, device_id: str, stream: str, items: Sequence[QuarantineItem], at: float
    ) -> int:
        new = 0
        for q in items:
            key = (device_id, stream, q.kind, q.seq, q.fingerprint)
            if key not in self.s.quarantine:
                new += 1
                self.s.quarantine[key] = {"item": q, "received_at": at, "status": "open"}
        return new

    # audit
    def chain(self, device_id: str, stream: str, chain: int) -> ChainRecord | None:
        return self.s.chains.get((device_id, stream, chain))

    def chains(self, device_id: str) -> list[tuple[str, ChainRecord]]:
        return sorted(
            ((k[1], c) for k, c in self.s.chains.items() if k[0] == device_id),
            key=lambda sc: (sc[0], sc[1].chain),
        )

    def audit_hashes(
        self, device_id: str, stream: str, chain: int, seqs: Collection[int]
    ) -> dict[int, str]:
        out = {}
        for seq in seqs:
            row = self.s.audit.get((device_id, stream, chain, seq))
            if row is not None:
                out[seq] = row.hash
        return out

    def insert_audit(
        self, device_id: str, stream: str, rows: Sequence[wire.AuditEntry], at: float
    ) -> None:
        for r in rows:
            self.s.audit.setdefault((device_id, stream, r.chain, r.seq), r)

    def save_chain(self, device_id: str, stream: str, record: ChainRecord, at: float) -> None:
        self.s.chains[(device_id, stream, record.chain)] = record

    def audit_rows(
        self, device_id: str, stream: str, chain: int, after_seq: int, through_seq: int, limit: int
    ) -> list[AuditRow]:
        rows = sorted(
            (
                r
                for (d, s, c, seq), r in self.s.audit.items()
                if (d, s, c) == (device_id, stream, chain) and after_seq < seq <= through_seq
            ),
            key=lambda r: r.seq,
        )[:limit]
        return [
            AuditRow(
                r.seq,
                r.run_id,
                r.event,
                r.step,
                r.detail,
                r.at,
                r.prev_hash,
                r.hash,
                r.chain,
                r.version,
            )
            for r in rows
        ]

    # health
    def save_heartbeat(
        self, device_id: str, stream: str, heartbeat: Mapping[str, Any], at: float
    ) -> None:
        self.s.health[device_id] = {
            "heartbeat": dict(heartbeat),
            "stream": stream,
            "last_seen_at": at,
        }

    # commands
    def find_commands(
        self, device_id: str, keys: Collection[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        return {
            (c["command_id"], c["seq"])
            for c in self.s.commands.values()
            if c["device_id"] == device_id and (c["command_id"], c["seq"]) in keys
        }

    def record_command_results(
        self, device_id: str, results: Sequence[wire.CommandResult], at: float
    ) -> None:
        for r in results:
            c = self.s.commands.get(r.command_id)
            if c and c["device_id"] == device_id and c["status"] not in ("applied", "refused"):
                c.update(status=r.status, reason=r.reason, result_at=r.at)

    def take_commands(self, device_id: str, after_seq: int, now: float, limit: int) -> list[str]:
        mine = sorted(
            (c for c in self.s.commands.values() if c["device_id"] == device_id),
            key=lambda c: c["seq"],
        )
        for c in mine:
            if c["status"] == "queued" and c["expires_at"] <= now:
                c["status"] = "expired"
        out = []
        for c in mine:
            if (
                c["seq"] > after_seq
                and c["status"] in ("queued", "delivered")
                and c["expires_at"] > now
                and len(out) < limit
            ):
                c["status"] = "delivered"
                c["delivered_at"] = c["delivered_at"] or now
                out.append(c["envelope"])
        return out

    def next_command_seq(self, device_id: str) -> int:
        self.s.command_seq[device_id] += 1
        return self.s.command_seq[device_id]

    def add_command(self, command: NewCommand) -> None:
        self.s.commands[command.command_id] = {
            "command_id": command.command_id,
            "device_id": command.device_id,
            "seq": command.seq,
            "action": command.action,
            "envelope": command.envelope,
            "document": command.document,
            "status": "queued",
            "reason": None,
            "created_at": command.created_at,
            "expires_at": command.expires_at,
            "delivered_at": None,
            "result_at": None,
        }

    def documents_head(self, kind: str) -> int:
        return max((v for k, v in self.s.documents if k == kind), default=0)

    def document(self, kind: str, version: int) -> dict[str, Any] | None:
        doc = self.s.documents.get((kind, version))
        return None if doc is None else dict(doc)

    def add_document(self, kind: str, version: int, content: Mapping[str, Any], at: float) -> None:
        assert (kind, version) not in self.s.documents
        self.s.documents[(kind, version)] = dict(content)


# --- a simulated terminal, for building signed requests ---------------------------------------


def outbox_entry(
    seq: int, payload: Any = None, topic: str = "sale", **fields: Any
) -> dict[str, Any]:
    """The wire JSON of an outbox entry with its right content hash (``fields`` override
    anything, the hash included, after it is computed)."""
    body: dict[str, Any] = {
        "seq": seq,
        "message_id": f"msg-{seq}",
        "run_id": f"run-{seq}",
        "step": "record_sale",
        "topic": topic,
        "payload": {"amount": 100 * seq, "currency": "EUR"} if payload is None else payload,
        "created_at": 1_700_000_000.0 + seq,
    }
    body["content_hash"] = wire.content_hash(
        body["message_id"],
        body["topic"],
        body["payload"],
        body["created_at"],
        body["run_id"],
        body["step"],
    )
    return body | fields


class Terminal:
    """A device's key, id, stream and audit chain, making signed sync requests."""

    def __init__(self, clock: Any, stream: str | None = None) -> None:
        import secrets

        from sync import signing

        self.key = signing.new_key()
        self.public = signing.public_text(self.key)
        self.device_id = ""
        self.clock = clock
        self.stream = stream or secrets.token_hex(16)
        self.audit_rows: list[dict[str, Any]] = []

    def enroll_body(self, token: str) -> bytes:
        req = wire.EnrollRequest(
            protocol_version=1, token=token, public_key=self.public, binary_version="1.0.0"
        )
        return wire.encode(req)

    def enroll_headers(self, body: bytes, path: str = "/v1/enroll") -> dict[str, str]:
        """An enroll request's signature: by the key it enrolls, named by its text."""
        from sync import signing

        return signing.sign_request(self.key, "POST", path, body, self.public, self.clock.now())

    def enroll_request(self, token: str) -> dict[str, Any]:
        """``content`` and ``headers`` of a signed enroll request (for an HTTP client)."""
        body = self.enroll_body(token)
        return {"content": body, "headers": self.enroll_headers(body)}

    def enroll(self, service: Any, token: str) -> tuple[int, dict[str, Any]]:
        """Enroll through ``service`` (a ``SyncService``), signed."""
        body = self.enroll_body(token)
        result: tuple[int, dict[str, Any]] = service.enroll(body, self.enroll_headers(body))
        return result

    def grow_audit(self, n: int, chain: int = 0, tag: str | None = None) -> list[dict[str, Any]]:
        """Append ``n`` rows to this terminal's chain; returns them (wire JSON). ``tag``
        goes into each row's detail (other content at the same seqs)."""
        from edge.engine.audit import GENESIS, link
        from edge.engine.records import AuditEvent

        made = []
        for _ in range(n):
            prev = self.audit_rows[-1] if self.audit_rows else None
            seq = prev["seq"] + 1 if prev else 1
            prev_hash = prev["hash"] if prev else GENESIS
            detail: dict[str, Any] = {"n": seq} if tag is None else {"n": seq, "tag": tag}
            event = AuditEvent(
                f"run-{seq}", "step_completed", 1_700_000_000.0 + seq, "charge", detail
            )
            row = {
                "seq": seq,
                "chain": chain,
                "run_id": event.run_id,
                "event": event.event,
                "step": event.step,
                "detail": event.detail,
                "at": event.at,
                "prev_hash": prev_hash,
                "hash": link(prev_hash, seq, event, stream=chain),
                "version": 2,
            }
            self.audit_rows.append(row)
            made.append(row)
        return made

    def request(
        self,
        outbox: Sequence[Mapping[str, Any]] = (),
        audit: Sequence[Mapping[str, Any]] = (),
        **fields: Any,
    ) -> dict[str, Any]:
        req: dict[str, Any] = {
            "kind": "sync_request",
            "protocol_version": 1,
            "device_id": self.device_id,
            "stream": self.stream,
            "sent_at": self.clock.now(),
            "outbox": list(outbox),
            "audit": list(audit),
            "heartbeat": {
                "at": self.clock.now(),
                "binary_version": "1.0.0",
                "config_version": 3,
                "policy_version": None,
                "storage_state": "ok",
                "storage_used_percent": 12.5,
                "outbox_depth": len(outbox),
                "outbox_oldest_age_s": None,
                "offline_exposure_minor": 0,
                "offline_count": 0,
                "last_error": None,
            },
            "commands_through": 0,
        }
        return req | fields

    def sign(
        self, body: bytes, path: str = "/v1/sync", gzipped: bool = True, method: str = "POST"
    ) -> dict[str, str]:
        from sync import signing

        headers = signing.sign_request(
            self.key, method, path, body, self.device_id, self.clock.now()
        )
        headers["content-type"] = "application/json"
        if gzipped:
            headers["content-encoding"] = "gzip"
        return headers

    def signed(
        self, request: Mapping[str, Any] | bytes, path: str = "/v1/sync", gzipped: bool = True
    ) -> tuple[str, str, dict[str, str], bytes]:
        """(method, path, headers, body) of ``request``, gzip'd and signed."""
        import gzip
        import json

        raw = request if isinstance(request, bytes) else json.dumps(request).encode()
        body = gzip.compress(raw) if gzipped else raw
        return "POST", path, self.sign(body, path, gzipped), body
