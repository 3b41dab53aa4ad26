"""The golden messages of every protocol version the server serves, replayed against the
current server (``sync.server.SyncService`` on the in-memory backend, the golden
files' own keys and time): a terminal still running an older release keeps syncing.

``wire.SUPPORTED_VERSIONS`` is the current version and the previous one (there is no
previous one yet: version 1 is the first); each has its folder ``tests/golden/sync/v<N>``,
and every version served must have one.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from sync_golden import DEVICE_ID, GOLDEN, GROUP, KEY_BYTES, STORE, load
from sync_memory import MemoryBackend

from edge.engine import FakeClock
from sync import signing, wire
from sync.server import SyncService
from sync.server_records import DeviceRecord

VERSIONS = wire.SUPPORTED_VERSIONS


def _service(version: int) -> tuple[SyncService, MemoryBackend, FakeClock]:
    """A server holding the golden device (enrolled with the golden device key), its
    clock at the golden request's time."""
    signed = load("signed_request", version)
    clock = FakeClock(float(signed["time"]))
    backend = MemoryBackend()
    device = signing.load_private(KEY_BYTES["device"])
    with backend.transaction() as tx:
        tx.add_device(
            DeviceRecord(
                device_id=DEVICE_ID,
                store=STORE,
                group=GROUP,
                public_key=signing.public_text(device),
                status="active",
                enrolled_at=clock.now() - 3600,
            )
        )
    cp = signing.load_private(KEY_BYTES["control_plane"])
    return SyncService(backend, clock, cp), backend, clock


def test_every_version_served_has_golden_files() -> None:
    assert VERSIONS[0] == wire.PROTOCOL_VERSION, "the current version is served first"
    assert len(VERSIONS) <= 2, "the current version and the previous one"
    for version in VERSIONS:
        folder = GOLDEN / f"v{version}"
        assert (folder / "sync_request.json").is_file(), folder
        assert (folder / "signed_request.json").is_file(), folder


@pytest.mark.parametrize("version", VERSIONS)
def test_the_golden_signed_request_is_served_byte_for_byte(version: int) -> None:
    svc, _, _ = _service(version)
    g = load("signed_request", version)
    body = base64.urlsafe_b64decode(g["body_b64url"] + "=" * (-len(g["body_b64url"]) % 4))
    status, answer = svc.sync(g["method"], g["path"], dict(g["headers"]), body)
    assert status == 200, answer
    response = wire.decode(answer, wire.SyncResponse)
    assert response.protocol_version == wire.PROTOCOL_VERSION
    # The same bytes again are a replay: its nonce is spent.
    status, again = svc.sync(g["method"], g["path"], dict(g["headers"]), body)
    assert (status, again["error"]["code"]) == (401, "replayed_nonce")


@pytest.mark.parametrize("version", VERSIONS)
def test_the_golden_sync_request_is_applied_and_acknowledged(version: int) -> None:
    svc, _, clock = _service(version)
    message: dict[str, Any] = load("sync_request", version)["message"]
    body = json.dumps(message).encode()
    key = signing.load_private(KEY_BYTES["device"])
    headers = signing.sign_request(key, "POST", "/v1/sync", body, DEVICE_ID, clock.now())
    status, answer = svc.sync("POST", "/v1/sync", headers, body)
    assert status == 200, answer
    response = wire.decode(answer, wire.SyncResponse)
    seqs = [e["seq"] for e in message["outbox"]]
    # The sale is applied; the result of a command this server never sent (the golden
    # file's cmd-0003) is rejected alone, quarantined and acknowledged all the same.
    assert [(r.seq, r.status) for r in response.results] == [(17, "applied"), (18, "rejected")]
    assert response.results[1].reason == "unknown_command"
    assert response.outbox_through == max(seqs)
    assert response.audit_through == message["audit"][-1]["seq"]
    assert response.chain.state == "ok"
    # Sent once more (a lost answer): every entry a duplicate, the marks unchanged.
    headers = signing.sign_request(key, "POST", "/v1/sync", body, DEVICE_ID, clock.now())
    status, answer = svc.sync("POST", "/v1/sync", headers, body)
    again = wire.decode(answer, wire.SyncResponse)
    assert [r.status for r in again.results] == ["duplicate", "rejected"]
    assert (again.outbox_through, again.audit_through) == (
        response.outbox_through,
        response.audit_through,
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_the_golden_key_rotation_is_taken(version: int) -> None:
    svc, _, clock = _service(version)
    message = load("rotate_key", version)["message"]
    body = json.dumps(message).encode()
    old = signing.load_private(KEY_BYTES["device"])
    headers = signing.sign_request(old, "POST", "/v1/rotate-key", body, DEVICE_ID, clock.now())
    status, answer = svc.rotate_key("POST", "/v1/rotate-key", headers, body)
    assert status == 200, answer
    assert wire.decode(answer, wire.RotateKeyResponse).device_id == DEVICE_ID
    # From now on the old key is refused, the new one (the golden next key) taken.
    sync_body = json.dumps(load("sync_request", version)["message"]).encode()
    stale = signing.sign_request(old, "POST", "/v1/sync", sync_body, DEVICE_ID, clock.now())
    assert svc.sync("POST", "/v1/sync", stale, sync_body)[0] == 401
    new = signing.load_private(KEY_BYTES["device_next"])
    fresh = signing.sign_request(new, "POST", "/v1/sync", sync_body, DEVICE_ID, clock.now())
    assert svc.sync("POST", "/v1/sync", fresh, sync_body)[0] == 200
