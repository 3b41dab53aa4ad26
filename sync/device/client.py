"""One sync exchange, device side: upload what the cloud has not acknowledged, take its
acknowledgement and its commands (DESIGN.md invariant 9).

``SyncClient.sync_once``:

1. reads, each in its own short read (the writer is never held across the network): up
   to ``max_entries`` outbox messages from the lowest unacknowledged seq, the audit rows
   after the last acknowledged one (``audit_retention().acked_seq``), each list cut at
   ``max_bytes`` of encoded entries (never below one entry, so nothing can wedge the
   queue), the heartbeat (``health()``), the command high water;
2. builds a ``wire.SyncRequest``, gzips it, signs the exact bytes sent
   (``signing.sign_request``) and POSTs it to ``{url}/v1/sync``;
3. on 200: hands the acknowledged marks to ``terminal.acknowledge`` -- never beyond what
   this request carried -- which releases the offline exposure of the sales among
   them, then takes each command (``commands.CommandProcessor``).

A connection error, a timeout, 429 or 5xx raise ``SyncUnavailable`` (retryable); any
other 4xx ``SyncRefused`` naming the server's code and message. Either way nothing was
acknowledged: the queue is exactly as it was.

An entry that does not fit the wire model (an over-long field written by an older build)
is sent as it is rather than dropped or left to block the queue: the server rejects it
alone, quarantines it and acknowledges it.
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError

from edge.engine.clock import Clock
from edge.engine.records import AuditRow, OutboxMessage
from sync import signing, wire
from sync.device.commands import CommandOutcome, CommandProcessor
from sync.device.errors import (
    SYNC_ERROR_PREFIX,
    SyncRefused,
    SyncUnavailable,
    server_said,
    server_time_of,
)
from sync.device.identity import DeviceIdentity, load_key, promote_next_key
from sync.device.ports import SyncStore, TerminalHooks

log = logging.getLogger(__name__)

SYNC_PATH = "/v1/sync"
DEFAULT_MAX_ENTRIES = 500
DEFAULT_MAX_BYTES = 512 * 1024
DEFAULT_TIMEOUT_S = 10.0
#: The heartbeat's ``last_error`` is at most this long (the wire's bound).
LAST_ERROR_CHARS = 1024
#: gzip level: 6 is zlib's default, most of level 9's ratio at a fraction of its CPU.
GZIP_LEVEL = 6

W = TypeVar("W", bound=BaseModel)


@dataclass(frozen=True)
class SyncOutcome:
    """What one exchange did."""

    outbox_sent: int
    audit_sent: int
    #: The marks the terminal acknowledged (the server's, capped at what was sent).
    outbox_through: int | None
    audit_through: int | None
    #: Outbox messages the acknowledgement removed.
    acknowledged: int
    #: Entries by the server's answer: applied, duplicate, conflict, rejected.
    results: dict[str, int]
    chain: wire.ChainState
    commands: list[CommandOutcome] = field(default_factory=list)
    #: A bound cut the batch, or commands brought results to send: sync again at once.
    more: bool = False


@dataclass(frozen=True)
class Batch:
    """A request ready to send: its model, the gzip'd bytes, and what it carried."""

    request: wire.SyncRequest
    body: bytes
    outbox_max_seq: int | None
    audit_max_seq: int | None
    more: bool


class SyncClient:
    """Syncs one enrolled terminal with its control plane."""

    def __init__(
        self,
        identity: DeviceIdentity,
        key: Ed25519PrivateKey,
        store: SyncStore,
        terminal: TerminalHooks,
        clock: Clock,
        http: httpx.Client | None = None,
        *,
        binary_version: str,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        key_dir: Path | None = None,
    ) -> None:
        """``http``: the client to send with (the caller's, kept open); None: one of
        our own, closed by ``close``. ``max_entries`` bounds each of the outbox and the
        audit list of a request, ``max_bytes`` their encoded entries (before gzip)."""
        if not 1 <= max_entries <= wire.MAX_BATCH_ENTRIES:
            raise ValueError(f"max_entries must be 1..{wire.MAX_BATCH_ENTRIES}, not {max_entries}")
        self.identity = identity
        self._key = key
        #: The data dir the key lives in: when the cloud refuses the key, a rotation
        #: (``tillflow-edge rotate-key``) may have replaced it there, or left one pending.
        self.key_dir = key_dir
        self.store = store
        self.terminal = terminal
        self.clock = clock
        self._own_http = http is None
        self.http = httpx.Client(timeout=timeout_s, trust_env=False) if http is None else http
        self.binary_version = binary_version
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        base = identity.url.rstrip("/")
        self.url = base + SYNC_PATH
        #: The path the signature covers: the URL's own path (a prefix included).
        self.path = urlsplit(base).path + SYNC_PATH
        self.commands = CommandProcessor(identity, store, terminal, clock)
        #: Seconds the server's clock is ahead of ours, learnt from its answers: requests
        #: are signed with our clock plus this, so a terminal whose clock is off (no
        #: NTP in the shop, a flat RTC battery) still syncs. Command expiry does not use
        #: it (trusted time: ``commands.py``).
        self.clock_offset = 0.0

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    # --- the request ------------------------------------------------------------------

    def build(self) -> Batch:
        """The next request: reads only, no write and no network."""
        outbox_rows = self.store.outbox(after_seq=0, limit=self.max_entries)
        kept = self.store.audit_retention()
        acked = 0 if kept is None else kept.acked_seq
        audit_rows = self.store.audit_after(acked, self.max_entries)
        outbox, cut_outbox = _bounded([_outbox_entry(m) for m in outbox_rows], self.max_bytes)
        audit, cut_audit = _bounded([_audit_entry(r) for r in audit_rows], self.max_bytes)
        base = None
        if kept is not None and kept.base_seq > 0:
            base = wire.AuditBase(seq=kept.base_seq, hash=kept.base_hash)
        now = self.clock.now()
        request = wire.SyncRequest(
            protocol_version=wire.PROTOCOL_VERSION,
            device_id=self.identity.device_id,
            stream=self.store.database_id(),
            sent_at=now,
            outbox=outbox,
            audit=audit,
            audit_base=base,
            heartbeat=self.heartbeat(now),
            commands_through=self.store.command_high_water(),
        )
        more = (
            cut_outbox
            or cut_audit
            or len(outbox_rows) == self.max_entries
            or len(audit_rows) == self.max_entries
        )
        return Batch(
            request=request,
            body=gzip.compress(wire.encode(request), compresslevel=GZIP_LEVEL),
            outbox_max_seq=outbox[-1].seq if outbox else None,
            audit_max_seq=audit[-1].seq if audit else None,
            more=more,
        )

    def heartbeat(self, now: float) -> wire.Heartbeat:
        """The terminal's health, as the wire's heartbeat carries it."""
        h = self.terminal.health()
        storage = h.get("storage") or {}
        last_error = h.get("last_error")
        if last_error is not None and str(last_error).startswith(SYNC_ERROR_PREFIX):
            # The sync's own failure: a heartbeat that arrives proves sync works again
            # (the runner clears it after this exchange). Sent, a cloud restart would
            # read as every device unhealthy, and fail their rollouts' health checks.
            last_error = None
        return wire.Heartbeat(
            at=now,
            binary_version=self.binary_version,
            config_version=h.get("config_version"),
            policy_version=h.get("policy_version"),
            storage_state=storage.get("state", "ok"),
            storage_used_percent=float(storage.get("used_percent", 0.0)),
            outbox_depth=int(h.get("outbox_depth", 0)),
            outbox_oldest_age_s=_float_or_none(h.get("outbox_oldest_age_s")),
            offline_exposure_minor=int(h.get("offline_exposure_minor", 0)),
            offline_count=int(h.get("offline_count", 0)),
            last_error=None if last_error is None else str(last_error)[:LAST_ERROR_CHARS],
        )

    def headers(self, body: bytes) -> dict[str, str]:
        signed = signing.sign_request(
            self._key,
            "POST",
            self.path,
            body,
            self.identity.device_id,
            self.clock.now() + self.clock_offset,
        )
        return {"content-type": "application/json", "content-encoding": "gzip", **signed}

    # --- the exchange -----------------------------------------------------------------

    def sync_once(self) -> SyncOutcome:
        batch = self.build()
        try:
            response = self._post(batch.body)
        except SyncRefused as exc:
            if exc.server_code == "bad_signature" and self._key_changed():
                return self.sync_once()
            if exc.server_code != "clock_skew" or exc.server_time is None:
                raise
            # Our clock is off by more than the server's window: sign with its time.
            self.clock_offset = exc.server_time - self.clock.now()
            log.warning(
                "the control plane's clock is %+.0f s from ours: signing with its time",
                self.clock_offset,
                extra={"action": "sync_clock_offset"},
            )
            response = self._post(batch.body)
        if self.clock_offset:  # keep up with our clock's drift
            self.clock_offset = response.server_time - self.clock.now()
        outbox_through = _capped(response.outbox_through, batch.outbox_max_seq)
        audit_through = _capped(response.audit_through, batch.audit_max_seq)
        removed = 0
        if outbox_through is not None or audit_through is not None:
            removed = self.terminal.acknowledge(outbox_through or 0, audit_through)
        outcomes = self.commands.handle_all(response.commands)
        results: Counter[str] = Counter(r.status for r in response.results)
        if response.chain.state != "ok":
            log.error(
                "the cloud reports this terminal's audit chain broken at seq %s: %s",
                response.chain.first_bad_seq,
                response.chain.reason,
                extra={"action": "chain_broken"},
            )
        if results.get("conflict") or results.get("rejected"):
            log.warning(
                "sync: the cloud quarantined %d entr(ies): %s",
                results.get("conflict", 0) + results.get("rejected", 0),
                [(r.seq, r.status, r.reason) for r in response.results if r.status in _BAD][:10],
                extra={"action": "sync_quarantined"},
            )
        return SyncOutcome(
            outbox_sent=len(batch.request.outbox),
            audit_sent=len(batch.request.audit),
            outbox_through=outbox_through,
            audit_through=audit_through,
            acknowledged=removed,
            results=dict(results),
            chain=response.chain,
            commands=outcomes,
            # Commands applied or refused wrote their results to the outbox: send them
            # now, not an interval later (a rollout waits on them).
            more=batch.more or any(o.status != "ignored" for o in outcomes),
        )

    def _key_changed(self) -> bool:
        """After a refused signature: the key on disk (a pending rotation's, promoted
        first) if it differs from ours; then True, and the next request uses it."""
        if self.key_dir is None:
            return False
        promote_next_key(self.key_dir)
        disk = load_key(self.key_dir)
        if signing.public_text(disk) == signing.public_text(self._key):
            return False
        self._key = disk
        log.warning("signing with the device key a rotation put in place",
                    extra={"action": "key_rotated"})  # fmt: skip
        return True

    def _post(self, body: bytes) -> wire.SyncResponse:
        try:
            resp = self.http.post(self.url, content=body, headers=self.headers(body))
        except httpx.HTTPError as exc:
            raise SyncUnavailable(
                f"cannot reach the control plane at {self.url}: {type(exc).__name__}: {exc}"
            ) from None
        if resp.status_code == 200:
            try:
                return wire.decode(resp.content, wire.SyncResponse)
            except wire.WireError as exc:
                # The server may have taken the batch: sending it again is harmless (its
                # entries come back duplicates), dropping it is not.
                raise SyncUnavailable(
                    f"the answer of {self.url} is not a sync response: {exc.message}",
                    server_code=exc.code,
                    status=200,
                ) from None
        code, message = server_said(resp.status_code, resp.content)
        text = f"{self.url} answered {resp.status_code} {code}: {message}"
        if resp.status_code == 429 or resp.status_code >= 500:
            raise SyncUnavailable(text, server_code=code, status=resp.status_code)
        refused = SyncRefused(text, server_code=code, status=resp.status_code)
        refused.server_time = server_time_of(resp.content)
        raise refused


_BAD = ("conflict", "rejected")


def _capped(mark: int | None, sent: int | None) -> int | None:
    """An acknowledged mark never beyond what this request carried: a server cannot make
    the terminal drop what it never sent (it comes again next time: a duplicate)."""
    if mark is None or sent is None:
        return None
    return min(mark, sent)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _bounded(entries: Sequence[W], max_bytes: int) -> tuple[list[W], bool]:
    """The longest prefix of ``entries`` within ``max_bytes`` encoded (at least one), and
    whether the bound cut it."""
    out: list[W] = []
    size = 0
    for entry in entries:
        size += len(entry.model_dump_json().encode()) + 1  # as wire.encode writes it, a comma
        if out and size > max_bytes:
            return out, True
        out.append(entry)
    return out, False


def _checked(model: type[W], fields: dict[str, Any]) -> W:
    try:
        return model(**fields)
    except ValidationError as exc:
        log.warning(
            "sync: %s seq %s does not fit the wire model, sent as it is for the cloud to "
            "reject alone: %s",
            model.__name__,
            fields.get("seq"),
            exc.errors()[0]["msg"],
            extra={"action": "sync_entry_unfit"},
        )
        return model.model_construct(**fields)


def _outbox_entry(m: OutboxMessage) -> wire.OutboxEntry:
    digest = wire.content_hash(m.message_id, m.topic, m.payload, m.created_at, m.run_id, m.step)
    return _checked(
        wire.OutboxEntry,
        {
            "seq": m.seq,
            "message_id": m.message_id,
            "run_id": m.run_id,
            "step": m.step,
            "topic": m.topic,
            "payload": m.payload,
            "created_at": m.created_at,
            "content_hash": digest,
        },
    )


def _audit_entry(r: AuditRow) -> wire.AuditEntry:
    return _checked(
        wire.AuditEntry,
        {
            "seq": r.seq,
            "chain": r.stream,
            "run_id": r.run_id,
            "event": r.event,
            "step": r.step,
            "detail": r.detail,
            "at": r.at,
            "prev_hash": r.prev_hash,
            "hash": r.hash,
            "version": r.version,
        },
    )
