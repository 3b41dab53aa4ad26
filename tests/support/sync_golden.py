"""Writes the sync protocol's golden files, once: ``tests/golden/sync/v<N>/*.json``.

One file per message type of protocol version 1 (enroll_request, enroll_response,
rotate_key, rotate_key_response, sync_request, sync_response, command, error,
signed_request). Each is a JSON object with an ``about`` that says what it shows; a
message file holds the message, exactly as ``sync.wire.encode`` wrote it, under
``message``; files with a signature hold the fixed test keys that made it (raw private
bytes, hex) under ``keys``, so anyone can recompute every byte.

The files are committed and **never edited**: ``tests/unit/test_sync_wire.py`` pins each
by SHA-256, so a change fails on purpose. A new protocol version gets a new folder,
written by a new run of this script (``--version``); the old folder stays and is replayed
against the current server. This script refuses to overwrite a file that exists.

Everything is fixed (keys, ids, times, nonces) so a run gives the same bytes; Ed25519
signatures are deterministic. There is no card data: amounts and a masked test PAN.

    .venv/bin/python tests/support/sync_golden.py [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.engine.audit import link
from edge.engine.records import AuditEvent
from sync import signing, wire

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sync"

#: The fixed test keys (raw Ed25519 private bytes). Never used outside tests.
KEY_BYTES = {
    "control_plane": bytes(range(32)),
    "device": bytes(range(32, 64)),
    "device_next": bytes(range(64, 96)),
}

T0 = 1764633600.0  # 2025-12-02T00:00:00Z
DEVICE_ID = "dev-7f3a9c2e"
STREAM = "5d0c1e7a9b3f4a6c8e2d0b1f3a5c7e9d"
STORE, GROUP = "store-0042", "berlin-mitte"
BINARY_VERSION = "1.4.0"
AUDIT_BASE_HASH = hashlib.sha256(b"tillflow golden: the last row retention removed").hexdigest()


def load(name: str, version: int = wire.PROTOCOL_VERSION) -> dict[str, Any]:
    """The committed golden file ``name`` (without ``.json``) of protocol ``version``."""
    content: dict[str, Any] = json.loads((GOLDEN / f"v{version}" / f"{name}.json").read_text())
    return content


def _key(name: str) -> Ed25519PrivateKey:
    return signing.load_private(KEY_BYTES[name])


def _keys(*names: str) -> dict[str, dict[str, str]]:
    return {
        n: {
            "private_raw_hex": KEY_BYTES[n].hex(),
            "public_key": signing.public_text(_key(n)),
            "key_id": signing.key_id(signing.public_text(_key(n))),
        }
        for n in names
    }


def _json(model: wire._Wire) -> Any:
    return json.loads(wire.encode(model))


def command() -> wire.Command:
    """The signed command every file that carries one uses."""
    content = {
        "currency": "EUR",
        "offline": {"max_amount_minor": 15000, "max_count": 20, "max_total_minor": 100000},
        "sync_interval_s": 30,
    }
    return wire.Command(
        schema_version=1,
        command_id="cmd-0004",
        device_id=DEVICE_ID,
        group=GROUP,
        seq=4,
        action="update_config",
        issued_at=T0 + 20.5,
        expires_at=T0 + 20.5 + 86400,
        document=wire.Document(kind="config", version=7, content=content),
    )


def sync_request() -> wire.SyncRequest:
    sale = {
        "amount_minor": 4250,
        "approval_code": "A1B2C3",
        "currency": "EUR",
        "offline": True,
        "pan_masked": "411111******1111",
    }
    result = wire.CommandResult(command_id="cmd-0003", seq=3, status="applied", at=T0 + 12.0)
    bodies: list[dict[str, Any]] = [
        {
            "seq": 17,
            "message_id": "msg-0017-3c1d",
            "run_id": "run-8b2e4f60",
            "step": "record_sale",
            "topic": "payment_approved",
            "payload": sale,
            "created_at": T0 + 10.125,
        },
        {
            "seq": 18,
            "message_id": "msg-0018-9a7e",
            "run_id": None,
            "step": None,
            "topic": "command_result",
            "payload": result.model_dump(mode="json"),
            "created_at": T0 + 12.0,
        },
    ]
    outbox = [
        wire.OutboxEntry(
            **b,
            content_hash=wire.content_hash(
                b["message_id"], b["topic"], b["payload"], b["created_at"], b["run_id"], b["step"]
            ),
        )
        for b in bodies
    ]
    events = [
        AuditEvent("run-8b2e4f60", "run_started", T0 + 9.0, None, {"workflow_type": "payment"}),
        AuditEvent(
            "run-8b2e4f60",
            "step_completed",
            T0 + 10.125,
            "authorize_offline",
            {"amount_minor": 4250, "pan_masked": "411111******1111"},
        ),
        AuditEvent("run-8b2e4f60", "run_completed", T0 + 10.5, None, {"status": "COMPLETED"}),
    ]
    audit, prev = [], AUDIT_BASE_HASH
    for seq, ev in enumerate(events, start=42):
        digest = link(prev, seq, ev, stream=0)
        audit.append(
            wire.AuditEntry(
                seq=seq,
                chain=0,
                run_id=ev.run_id,
                event=ev.event,
                step=ev.step,
                detail=ev.detail,
                at=ev.at,
                prev_hash=prev,
                hash=digest,
                version=2,
            )
        )
        prev = digest
    heartbeat = wire.Heartbeat(
        at=T0 + 30.0,
        binary_version=BINARY_VERSION,
        config_version=6,
        policy_version=2,
        storage_state="ok",
        storage_used_percent=12.5,
        outbox_depth=2,
        outbox_oldest_age_s=19.875,
        offline_exposure_minor=4250,
        offline_count=1,
        last_error="sync: connection refused",
    )
    return wire.SyncRequest(
        protocol_version=1,
        device_id=DEVICE_ID,
        stream=STREAM,
        sent_at=T0 + 30.25,
        outbox=outbox,
        audit=audit,
        audit_base=wire.AuditBase(seq=41, hash=AUDIT_BASE_HASH),
        heartbeat=heartbeat,
        commands_through=3,
    )


def build() -> dict[str, dict[str, Any]]:
    """Every file's content, by file name (without ``.json``)."""
    cp, device, device_next = _key("control_plane"), _key("device"), _key("device_next")
    new_public = signing.public_text(device_next)
    rotation = signing.rotation_bytes(DEVICE_ID, new_public)
    cmd = command()
    envelope = signing.seal(cp, cmd)
    request = sync_request()
    body = wire.encode(request)
    time, nonce = f"{T0 + 30.25:.3f}", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    signed = signing.request_bytes("POST", "/v1/sync", body, time, nonce, DEVICE_ID)
    signature = wire.b64e(device.sign(signed))
    bad = _json(request)
    bad["outbox"][0]["seq"] = "17"
    try:
        wire.decode(bad, wire.SyncRequest)
    except wire.WireError as exc:
        error = exc
    else:  # pragma: no cover - the generator's own check
        raise SystemExit("the error example decoded: it must not")
    return {
        "enroll_request": {
            "about": "POST /v1/enroll: the one-time token and the device key's public half "
            "(keys.device). Not signed: the token is the proof.",
            "keys": _keys("device"),
            "message": _json(
                wire.EnrollRequest(
                    protocol_version=1,
                    token="enr_Q2xvdWRUb2tlbkZvclRlc3Rz",
                    public_key=signing.public_text(device),
                    binary_version=BINARY_VERSION,
                    hardware=wire.Hardware(model="TF-200", serial="SN-000123"),
                )
            ),
        },
        "enroll_response": {
            "about": "The answer to enroll_request: the device id and the control plane's "
            "command-signing key (keys.control_plane), which the terminal pins.",
            "keys": _keys("control_plane"),
            "message": _json(
                wire.EnrollResponse(
                    protocol_version=1,
                    device_id=DEVICE_ID,
                    store=STORE,
                    group=GROUP,
                    control_plane_key=signing.public_text(cp),
                    server_time=T0 + 1.5,
                )
            ),
        },
        "rotate_key": {
            "about": "POST /v1/rotate-key, signed as every device request by the current key "
            "(keys.device); proof is the new key's (keys.device_next) signature over "
            "rotation_bytes (given as text).",
            "keys": _keys("device", "device_next"),
            "device_id": DEVICE_ID,
            "rotation_bytes": rotation.decode(),
            "message": _json(
                wire.RotateKeyRequest(
                    protocol_version=1,
                    new_public_key=new_public,
                    proof=wire.b64e(device_next.sign(rotation)),
                )
            ),
        },
        "rotate_key_response": {
            "about": "The answer to rotate_key: from now on the device signs with the new key.",
            "message": _json(
                wire.RotateKeyResponse(
                    protocol_version=1, device_id=DEVICE_ID, rotated_at=T0 + 40.0
                )
            ),
        },
        "sync_request": {
            "about": "POST /v1/sync: two outbox entries (content_hash = wire.content_hash of "
            "each), three audit rows chained (hash version 2) from audit_base, a heartbeat.",
            "message": _json(request),
        },
        "sync_response": {
            "about": "The answer to a sync: one entry result of every status, the "
            "acknowledged marks, a broken chain's state, one command envelope (command.json's, "
            "signed by keys.control_plane). Not the answer to sync_request.json's entries.",
            "keys": _keys("control_plane"),
            "message": _json(
                wire.SyncResponse(
                    protocol_version=1,
                    server_time=T0 + 31.0,
                    results=[
                        wire.EntryResult(seq=17, status="applied"),
                        wire.EntryResult(seq=18, status="duplicate"),
                        wire.EntryResult(seq=19, status="conflict", reason="content_hash_differs"),
                        wire.EntryResult(seq=20, status="rejected", reason="payload_too_large"),
                    ],
                    outbox_through=20,
                    audit_through=44,
                    chain=wire.ChainState(
                        state="broken",
                        head_seq=44,
                        first_bad_seq=45,
                        reason="seq 45: prev_hash is not the hash of seq 44",
                    ),
                    commands=[envelope],
                )
            ),
        },
        "command": {
            "about": "A command as the control plane signs it: canonical_bytes is the text "
            "of signing.command_bytes(command), envelope.payload its base64url, "
            "envelope.signature keys.control_plane's Ed25519 signature over those bytes.",
            "keys": _keys("control_plane"),
            "command": _json(cmd),
            "canonical_bytes": signing.command_bytes(cmd).decode(),
            "envelope": _json(envelope),
        },
        "error": {
            "about": "The 4xx body of every endpoint, for input: a sync_request whose "
            "outbox.0.seq is a string.",
            "expect": "SyncRequest",
            "input": bad,
            "message": error.body(),
        },
        "signed_request": {
            "about": "A device request's signature: request_bytes (as text) over method, "
            "path, sha256 of the body exactly as sent (here not gzip'd: sync_request.json's "
            "message as wire.encode wrote it, base64url), time, nonce, device; signature "
            "by keys.device; headers as sent.",
            "keys": _keys("device"),
            "method": "POST",
            "path": "/v1/sync",
            "body_b64url": wire.b64e(body),
            "body_sha256": signing.body_digest(body),
            "time": time,
            "nonce": nonce,
            "device_id": DEVICE_ID,
            "request_bytes": signed.decode(),
            "signature": signature,
            "headers": {
                signing.H_DEVICE: DEVICE_ID,
                signing.H_TIME: time,
                signing.H_NONCE: nonce,
                signing.H_SIGNATURE: signature,
            },
        },
    }


def text(content: dict[str, Any]) -> str:
    """How a golden file is written: two-space indent, UTF-8, a final newline."""
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder (default: tests/golden/sync/v1)")
    args = parser.parse_args(argv)
    out: Path = args.out or GOLDEN / f"v{wire.PROTOCOL_VERSION}"
    files = {out / f"{name}.json": text(content) for name, content in build().items()}
    there = [str(path) for path in files if path.exists()]
    if there:
        print(f"golden files are never rewritten; these exist: {', '.join(there)}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        with path.open("x", encoding="utf-8") as f:  # "x": never over a file made meanwhile
            f.write(content)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
