"""Records <-> row parameters, shared by every store. A dialect only says how it encodes
a JSON document for the driver (``enc``) and decodes one it reads back (``dec``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge.engine.records import AuditEvent, AuditRow, OutboxMessage, RunRecord, Status, StepRecord

Codec = Callable[[Any], Any]


def _opt(enc: Codec, value: Any) -> Any:
    return None if value is None else enc(value)


def run_params(run: RunRecord, enc: Codec) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "workflow_type": run.workflow_type,
        "definition_hash": run.definition_hash,
        "fingerprints": enc(run.fingerprints),
        "status": str(run.status),
        "state": enc(run.state),
        "cursor": enc(run.cursor),
        "revision": run.revision,
        "idempotency_key": run.idempotency_key,
        "parent_run_id": run.parent_run_id,
        "parent_step": run.parent_step,
        "lease_owner": run.lease_owner,
        "lease_expires_at": run.lease_expires_at,
        "next_attempt_at": run.next_attempt_at,
        "error": _opt(enc, run.error),
        "created_at": run.created_at,
        "updated_at": run.updated_at,
    }


def run_from_row(r: dict[str, Any], dec: Codec) -> RunRecord:
    return RunRecord(
        run_id=r["run_id"],
        workflow_type=r["workflow_type"],
        definition_hash=r["definition_hash"],
        fingerprints=dec(r["fingerprints"]),
        status=Status(r["status"]),
        state=dec(r["state"]),
        input=_opt(dec, r["input"]) or {},
        cursor=dec(r["cursor"]),
        revision=r["revision"],
        idempotency_key=r["idempotency_key"],
        parent_run_id=r["parent_run_id"],
        parent_step=r["parent_step"],
        lease_owner=r["lease_owner"],
        lease_expires_at=r["lease_expires_at"],
        next_attempt_at=r["next_attempt_at"],
        error=_opt(dec, r["error"]),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


def step_params(s: StepRecord, enc: Codec) -> dict[str, Any]:
    return {
        "run_id": s.run_id,
        "step": s.step,
        "step_name": s.step_name,
        "kind": s.kind,
        "status": s.status,
        "attempt": s.attempt,
        "started_at": s.started_at,
        "finished_at": s.finished_at,
        "output": _opt(enc, s.output),
        "error": _opt(enc, s.error),
        "ref_seq": s.ref_seq,
        "operation_key": s.operation_key,
    }


def step_from_row(r: dict[str, Any], dec: Codec) -> StepRecord:
    return StepRecord(
        run_id=r["run_id"],
        step=r["step"],
        step_name=r["step_name"],
        kind=r["kind"],
        status=r["status"],
        attempt=r["attempt"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        output=_opt(dec, r["output"]),
        error=_opt(dec, r["error"]),
        ref_seq=r["ref_seq"],
        seq=r["seq"],
        operation_key=r.get("operation_key"),
    )


def audit_params(
    seq: int, ev: AuditEvent, prev: str, digest: str, enc: Codec, *, stream: int, version: int
) -> dict[str, Any]:
    return {
        "stream": stream,
        "version": version,
        "seq": seq,
        "run_id": ev.run_id,
        "event": ev.event,
        "step": ev.step,
        "detail": enc(ev.detail),
        "at": ev.at,
        "prev_hash": prev,
        "hash": digest,
    }


def audit_from_row(r: dict[str, Any], dec: Codec) -> AuditRow:
    return AuditRow(
        seq=r["seq"],
        run_id=r["run_id"],
        event=r["event"],
        step=r["step"],
        detail=dec(r["detail"]),
        at=r["at"],
        prev_hash=r["prev_hash"],
        hash=r["hash"],
        stream=r["stream"],
        version=r["version"],
    )


def outbox_params(msg: OutboxMessage, enc: Codec) -> dict[str, Any]:
    return {
        "message_id": msg.message_id,
        "run_id": msg.run_id,
        "step": msg.step,
        "topic": msg.topic,
        "payload": enc(msg.payload),
        "created_at": msg.created_at,
    }


def outbox_from_row(r: dict[str, Any], dec: Codec) -> OutboxMessage:
    return OutboxMessage(
        message_id=r["message_id"],
        run_id=r["run_id"],
        step=r["step"],
        topic=r["topic"],
        payload=dec(r["payload"]),
        created_at=r["created_at"],
        seq=r["seq"],
    )
