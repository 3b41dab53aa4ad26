"""The control plane's commands, as the terminal takes them (DESIGN.md invariants 8, 10).

Each envelope of a sync response is checked, in this order:

1. **signature** with the pinned control-plane key, over the exact bytes carried
   (``signing.open_envelope``): a bad one is *forged*;
2. **sequence**: strictly above every seq taken (``command_high_water``), else *replayed*;
3. **audience** (``device_id`` is this device's), else *misaddressed*;
4. **schema version** one this build reads (``wire.COMMAND_SCHEMA_VERSIONS``), else
   *unsupported_schema*;
5. **expiry** against trusted time -- the later of this terminal's clock and the latest
   time the control plane signed a recorded command at (``trusted_time``) -- else
   *expired*: setting the clock back does not revive an expired command;
6. **the document**: present and of the kind the action needs, valid content, and a
   version above the one in force (versions only grow: a rollback is a new version
   with the old content), else *invalid_document* or *stale_version*;
7. **the outcome** (``resolve_outcome`` only): it names a run of this terminal of the
   operation it says (a payment's authorisation, a refund) under the key that run
   recorded, else *unknown_outcome*; and no truth for that key is recorded yet, else
   *already_resolved* (one truth per key, whatever the seq).

``install_release`` (a ``release`` document, ``wire.ReleaseContent``): refused
*cannot_install* on a terminal that does not run from an installed release tree, and
*install_in_progress* while another install is under way; else recorded applied (the
download is under way) and handed, after its transaction, to the installer
(``sync.device.releases``), which reports ``release_result`` when it is done. A release
already running is answered in the command's own transaction.

A forged or replayed command gets no ledger row: one ``command_refused`` audit row says
why, and nothing else changes (``record_command(seq=None)``). Any other refusal is a
ledger row with status ``refused`` (the seq advances, so one bad command never stalls
those behind it), a ``command_refused`` audit row and a ``command_result`` outbox
message. A valid command's effect -- the document stored, or a ``health`` message
queued -- commits in the same transaction as its ledger row, its ``command_applied``
audit row and its ``command_result``; the terminal then puts the documents in force
(``refresh_documents``).

``resolve_outcome`` (the control plane looked up, at the acquirer, an operation whose
answer this terminal lost) settles what the truth is about, in that same transaction:
the truth is kept (a document of kind ``outcome:<key>``, which also makes a second
truth for the key a refusal), an ``outcome_resolved`` audit row names the run, key and
status, and an open unknown gets its final message: a refund that ended ``unknown`` gets
its ``refund`` message with the acquirer's decision (``resolved: true``). A payment's
unknown authorisation already has its ending under way on the terminal
(``reverse_unknown``, retried until the acquirer answers, then ``record``'s message):
the truth is kept beside it, and ``reverse_unknown``'s next attempt reads it: found
``declined`` or ``reversed`` (no money held) it ends the run without waiting for the
acquirer; ``approved`` or ``not_found``, the reversal goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import ValidationError

from edge.engine.clock import Clock
from edge.engine.records import AuditEvent, CommandRecord, OutboxMessage, RunRecord
from edge.terminal.config import ConfigDocument
from edge.terminal.sale import payment_steps
from edge.terminal.sale.policy import PolicyDocument
from sync import signing, wire
from sync.device import releases
from sync.device.identity import DeviceIdentity
from sync.device.ports import SyncStore, TerminalHooks

log = logging.getLogger(__name__)

#: Why a command was refused (the ledger's ``reason``, the audit row's, the result's).
FORGED = "forged"
REPLAYED = "replayed"
MISADDRESSED = "misaddressed"
UNSUPPORTED_SCHEMA = "unsupported_schema"
EXPIRED = "expired"
INVALID_DOCUMENT = "invalid_document"
STALE_VERSION = "stale_version"
INVALID_COMMAND = "invalid_command"
UNKNOWN_OUTCOME = "unknown_outcome"
ALREADY_RESOLVED = "already_resolved"

RESULT_TOPIC = "command_result"
HEALTH_TOPIC = "health"
#: The document kind each action brings into force.
DOCUMENT_OF = {
    "update_config": "config",
    "activate_policy": "policy",
    "resolve_outcome": "outcome",
    "install_release": "release",
}
INSTALL_RELEASE = "install_release"
RESOLVE_OUTCOME = "resolve_outcome"
#: The document kind a resolve_outcome keeps its truth under: ``outcome:<key>``.
OUTCOME_DOCUMENT_PREFIX = payment_steps.OUTCOME_DOCUMENT_PREFIX
#: The workflow whose run an outcome is about, by operation, and the state field in
#: which that run recorded the operation's key.
_OUTCOME_RUN = {"authorization": ("payment", "auth_key"), "refund": ("refund", "refund_key")}


@runtime_checkable
class RunReads(Protocol):
    """The engine store's reads a resolve_outcome needs (the terminal's store has them)."""

    def get_run(self, run_id: str) -> RunRecord | None: ...


def outcome_document_kind(key: str) -> str:
    """Where a terminal keeps the truth about the operation under ``key``."""
    return OUTCOME_DOCUMENT_PREFIX + key


@dataclass(frozen=True)
class CommandOutcome:
    """What became of one envelope. ``ignored``: forged or replayed, no ledger row."""

    command_id: str | None
    seq: int | None
    action: str | None
    status: Literal["applied", "refused", "ignored"]
    reason: str | None = None
    #: (kind, version) of the document an applied command brought into force.
    document: tuple[str, int] | None = None


class CommandProcessor:
    """Verifies and takes the commands of sync responses for one enrolled device."""

    def __init__(
        self, identity: DeviceIdentity, store: SyncStore, terminal: TerminalHooks, clock: Clock
    ) -> None:
        self.identity = identity
        self.store = store
        self.terminal = terminal
        self.clock = clock
        self._public = identity.control_plane_public()
        #: install_release: fetched and installed off this transaction (``releases``).
        self.releases = releases.ReleaseHooks(identity, store, terminal, clock)

    def handle_all(self, envelopes: Iterable[wire.Envelope]) -> list[CommandOutcome]:
        """Each envelope in order; then, once, the documents applied come into force
        (also when a later envelope's recording failed: what committed is in force)."""
        outcomes: list[CommandOutcome] = []
        self.releases.poll()  # an install that finished is reported once
        try:
            for envelope in envelopes:
                outcomes.append(self.handle(envelope))
        finally:
            if any(o.document is not None for o in outcomes):
                self.terminal.refresh_documents()
        return outcomes

    def handle(self, envelope: wire.Envelope) -> CommandOutcome:
        """Verify one envelope and record it (applied, refused or ignored) in one
        transaction. A store error (a full disk) is raised: nothing was recorded, and
        the command comes again with the next sync."""
        try:
            cmd = signing.open_envelope(self._public, envelope)
        except wire.WireError as exc:
            if exc.code == "bad_signature" or exc.field in ("payload", "signature"):
                digest = hashlib.sha256(envelope.payload.encode()).hexdigest()[:16]
                why = f"{exc.message} (key_id {envelope.key_id}, payload sha256 {digest}…)"
                return self._ignore(None, None, None, FORGED, why)
            return self._undecodable(envelope, exc)  # authentic bytes, not a command we read
        high = self.store.command_high_water()
        if cmd.seq <= high:
            why = f"seq {cmd.seq} is not above the last taken, {high}"
            return self._ignore(cmd.command_id, cmd.seq, cmd.action, REPLAYED, why)
        refusal = self._refusal(cmd)
        if refusal is not None:
            return self._refuse(cmd.seq, cmd.command_id, cmd.action, cmd.issued_at, *refusal)
        return self._apply(cmd)

    # --- checks -----------------------------------------------------------------------

    def _refusal(self, cmd: wire.Command) -> tuple[str, str] | None:
        if cmd.device_id != self.identity.device_id:
            return MISADDRESSED, f"addressed to {cmd.device_id}, this is {self.identity.device_id}"
        if cmd.schema_version not in wire.COMMAND_SCHEMA_VERSIONS:
            known = ", ".join(map(str, wire.COMMAND_SCHEMA_VERSIONS))
            return UNSUPPORTED_SCHEMA, f"schema_version {cmd.schema_version}; this build: {known}"
        now, signed = self.clock.now(), self.store.trusted_time()
        trusted = now if signed is None else max(now, signed)
        if cmd.expires_at <= trusted:
            return EXPIRED, f"expired at {cmd.expires_at:.3f}, trusted time is {trusted:.3f}"
        return (
            self._document_refusal(cmd) or self._outcome_refusal(cmd) or self._release_refusal(cmd)
        )

    def _release_refusal(self, cmd: wire.Command) -> tuple[str, str] | None:
        """install_release: a terminal that can install, and is not installing another."""
        if cmd.action != INSTALL_RELEASE or cmd.document is None:
            return None
        return self.releases.refusal(wire.ReleaseContent.model_validate(cmd.document.content))

    def _outcome_refusal(self, cmd: wire.Command) -> tuple[str, str] | None:
        """resolve_outcome's document is an outcome about a run of ours, not yet
        resolved (``_document_refusal`` checked its kind)."""
        if cmd.action != RESOLVE_OUTCOME or cmd.document is None:
            return None
        try:
            out = wire.Outcome.model_validate(cmd.document.content)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "content"
            return INVALID_DOCUMENT, f"outcome document: {where}: {first['msg']}"
        workflow, key_field = _OUTCOME_RUN[out.operation]
        run = self.store.get_run(out.run_id) if isinstance(self.store, RunReads) else None
        if run is None or run.workflow_type != workflow:
            return UNKNOWN_OUTCOME, f"no {workflow} run {out.run_id} on this terminal"
        if run.state.get(key_field) != out.key:
            return UNKNOWN_OUTCOME, f"{workflow} run {out.run_id} has no operation {out.key}"
        if self.store.active_document(outcome_document_kind(out.key)) is not None:
            return ALREADY_RESOLVED, f"the outcome of {out.key} is already recorded"
        return None

    def _document_refusal(self, cmd: wire.Command) -> tuple[str, str] | None:
        doc, kind = cmd.document, DOCUMENT_OF.get(cmd.action)
        if kind is None:
            if doc is not None:
                return INVALID_DOCUMENT, f"{cmd.action} carries no document, this one has one"
            return None
        if doc is None or doc.kind != kind:
            got = "none" if doc is None else f"a {doc.kind} document"
            return INVALID_DOCUMENT, f"{cmd.action} needs a {kind} document, got {got}"
        if kind == "outcome":
            return None  # no version in force: _outcome_refusal reads it
        try:
            if kind == "config":
                ConfigDocument.model_validate(doc.content)
            elif kind == "release":
                wire.ReleaseContent.model_validate(doc.content)
            else:
                policy = PolicyDocument.model_validate(doc.content)
                if policy.version != doc.version:
                    why = f"the policy says version {policy.version}, its document {doc.version}"
                    return INVALID_DOCUMENT, why
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "content"
            return (
                INVALID_DOCUMENT,
                f"{kind} document version {doc.version}: {where}: {first['msg']}",
            )
        active = self.store.active_document(kind)
        in_force = 0 if active is None else active[0]
        if kind == "policy":
            in_force = max(in_force, self.terminal.active_policy_version() or 0)
        if doc.version <= in_force:
            why = f"{kind} version {doc.version} is not above the one in force, {in_force}"
            return STALE_VERSION, why
        return None

    # --- recording ------------------------------------------------------------------------

    def _apply(self, cmd: wire.Command) -> CommandOutcome:
        at = self.clock.now()
        doc = cmd.document
        detail: dict[str, Any] = {"command_id": cmd.command_id, "seq": cmd.seq}
        detail["action"] = cmd.action
        if doc is not None:
            detail["document"] = {"kind": doc.kind, "version": doc.version}
        outbox = []
        audit = [AuditEvent(None, "command_applied", at, None, detail)]
        document: tuple[str, int, dict[str, Any]] | None = None
        if doc is not None:
            document = (doc.kind, doc.version, dict(doc.content))
        if cmd.action == "request_health":
            health = {"command_id": cmd.command_id, **self.terminal.health()}
            outbox.append(_message(HEALTH_TOPIC, health, at))
        if cmd.action == RESOLVE_OUTCOME and doc is not None:
            out = wire.Outcome.model_validate(doc.content)  # _outcome_refusal read it
            document = self._settle(cmd.command_id, out, at, audit, outbox)
        release = None
        if cmd.action == INSTALL_RELEASE and doc is not None:
            release = wire.ReleaseContent.model_validate(doc.content)
            if self.releases.running(release):  # nothing to fetch: the result goes now
                outbox.append(releases.result_now(release, cmd.command_id, at))
                release = None
        result = wire.CommandResult(
            command_id=cmd.command_id, seq=cmd.seq, status="applied", reason=None, at=at
        )
        outbox.append(_message(RESULT_TOPIC, result.model_dump(mode="json"), at))
        rec = CommandRecord(
            seq=cmd.seq,
            command_id=cmd.command_id,
            action=cmd.action,
            status="applied",
            reason=None,
            issued_at=cmd.issued_at,
            at=at,
            document=document,
            audit=audit,
            outbox=outbox,
        )
        if not self.store.record_command(rec):  # another taker got there first
            why = f"seq {cmd.seq} was taken while this one was checked"
            return self._ignore(cmd.command_id, cmd.seq, cmd.action, REPLAYED, why)
        log.info(
            "command %s (%s, seq %d) applied",
            cmd.command_id,
            cmd.action,
            cmd.seq,
            extra={"action": "command_applied"},
        )
        if release is not None:  # the download starts once the command is recorded
            self.releases.begin(cmd.command_id, release)
        # An outcome's document is kept, not put in force.
        kept = None if doc is None or doc.kind == "outcome" else (doc.kind, doc.version)
        return CommandOutcome(cmd.command_id, cmd.seq, cmd.action, "applied", None, kept)

    def _settle(
        self,
        command_id: str,
        out: wire.Outcome,
        at: float,
        audit: list[AuditEvent],
        outbox: list[OutboxMessage],
    ) -> tuple[str, int, dict[str, Any]]:
        """What a resolve_outcome changes, added to its command's one transaction: the
        audit row, the final message of an open unknown, and the truth as a document."""
        assert isinstance(self.store, RunReads)  # _outcome_refusal checked it
        run = self.store.get_run(out.run_id)
        assert run is not None
        truth = out.model_dump(mode="json")
        settled = "recorded"
        if out.operation == "refund" and run.state.get("decision") == "unknown":
            outbox.append(_refund_final(run, out, self.identity.device_id, at))
            settled = "final_message"
        elif out.operation == "authorization" and not run.status.terminal:
            settled = "reversal_pending"  # reverse_unknown ends it, with record's message
        event = {**truth, "command_id": command_id, "settled": settled}
        audit.append(AuditEvent(out.run_id, "outcome_resolved", at, None, event))
        return outcome_document_kind(out.key), 1, {**truth, "settled": settled}

    def _refuse(
        self, seq: int, command_id: str, action: str, issued_at: float, reason: str, why: str
    ) -> CommandOutcome:
        """A ledger row with status refused, its audit row and its result, together."""
        at = self.clock.now()
        result = wire.CommandResult(
            command_id=command_id, seq=seq, status="refused", reason=f"{reason}: {why}", at=at
        )
        rec = CommandRecord(
            seq=seq,
            command_id=command_id,
            action=action,
            status="refused",
            reason=reason,
            issued_at=issued_at,
            at=at,
            audit=[_refused_event(at, command_id, seq, action, reason, why)],
            outbox=[_message(RESULT_TOPIC, result.model_dump(mode="json"), at)],
        )
        if not self.store.record_command(rec):
            return self._ignore(command_id, seq, action, REPLAYED, f"seq {seq} was taken")
        log.warning(
            "command %s (%s, seq %d) refused: %s: %s",
            command_id,
            action,
            seq,
            reason,
            why,
            extra={"action": "command_refused"},
        )
        return CommandOutcome(command_id, seq, action, "refused", reason)

    def _ignore(
        self, command_id: str | None, seq: int | None, action: str | None, reason: str, why: str
    ) -> CommandOutcome:
        """Forged or replayed: one audit row says so, nothing else changes."""
        at = self.clock.now()
        rec = CommandRecord(
            seq=None,
            command_id=command_id or "",
            action=action or "unknown",
            status="refused",
            reason=reason,
            issued_at=at,
            at=at,
            audit=[_refused_event(at, command_id, seq, action, reason, why)],
        )
        self.store.record_command(rec)
        log.warning(
            "command %s refused (%s): %s",
            command_id or "(unknown)",
            reason,
            why,
            extra={"action": "command_refused"},
        )
        return CommandOutcome(command_id, seq, action, "ignored", reason)

    def _undecodable(self, envelope: wire.Envelope, exc: wire.WireError) -> CommandOutcome:
        """Bytes the control plane signed that this build cannot read as a command (a
        newer schema, say): refused on its seq when it names one, so it stalls nothing."""
        try:
            raw = json.loads(wire.b64d(envelope.payload, "payload"))
        except (ValueError, wire.WireError):
            raw = None
        seq = raw.get("seq") if isinstance(raw, dict) else None
        command_id = raw.get("command_id") if isinstance(raw, dict) else None
        usable_seq = type(seq) is int and seq >= 1
        usable_id = isinstance(command_id, str) and 0 < len(command_id) <= wire.MAX_FIELD_CHARS
        if not (isinstance(raw, dict) and usable_seq and usable_id):
            return self._ignore(None, None, None, INVALID_COMMAND, f"not a command: {exc.message}")
        assert isinstance(seq, int) and isinstance(command_id, str)
        action = str(raw.get("action") or "unknown")[: wire.MAX_FIELD_CHARS]
        high = self.store.command_high_water()
        if seq <= high:
            why = f"seq {seq} is not above the last taken, {high}"
            return self._ignore(command_id, seq, action, REPLAYED, why)
        schema = raw.get("schema_version")
        issued = raw.get("issued_at")
        issued_at = float(issued) if isinstance(issued, int | float) else self.clock.now()
        if schema not in wire.COMMAND_SCHEMA_VERSIONS:
            known = ", ".join(map(str, wire.COMMAND_SCHEMA_VERSIONS))
            why = f"schema_version {schema!r}; this build: {known}"
            return self._refuse(seq, command_id, action, issued_at, UNSUPPORTED_SCHEMA, why)
        return self._refuse(seq, command_id, action, issued_at, INVALID_COMMAND, exc.message)


def _message(topic: str, payload: dict[str, Any], at: float) -> OutboxMessage:
    return OutboxMessage(uuid.uuid4().hex, None, None, topic, payload, at)


def _refund_final(run: RunRecord, out: wire.Outcome, device_id: str, at: float) -> OutboxMessage:
    """The final ``refund`` message of a refund that ended unknown: the decision the
    acquirer took (approved: the customer was refunded; else nothing moved), in the
    shape ``record_refund`` gives, marked ``resolved``."""
    state = run.state
    card = state.get("card") or {}
    decision = "approved" if out.status == "approved" else "declined"
    payload = {
        "device_id": device_id,
        "run_id": run.run_id,
        "amount_minor": state.get("amount_minor"),
        "currency": state.get("currency"),
        "decision": decision,
        "reason": None if decision == "approved" else f"acquirer_{out.status}",
        "original_run_id": state.get("original_run_id"),
        "auth_code": None,
        "acquirer_ref": out.acquirer_ref,
        "acquirer_reason": None,
        "refund_key": out.key,
        "masked_pan": card.get("masked"),
        "resolved": True,
    }
    return OutboxMessage(uuid.uuid4().hex, run.run_id, None, "refund", payload, at)


def _refused_event(
    at: float,
    command_id: str | None,
    seq: int | None,
    action: str | None,
    reason: str,
    why: str,
) -> AuditEvent:
    detail = {"command_id": command_id, "seq": seq, "action": action, "reason": reason}
    return AuditEvent(None, "command_refused", at, None, {**detail, "detail": why})
