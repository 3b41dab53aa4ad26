"""Enrollment and the device identity (``sync.device.identity``): the key is made here,
mode 0600 in a 0700 directory, never sent and never logged; the control plane's key is
pinned; a refusal names what the server said and leaves no identity."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sync import signing, wire
from sync.device.errors import EnrollError, IdentityError
from sync.device.identity import (
    enroll,
    identity_path,
    is_enrolled,
    key_path,
    load_identity,
    load_key,
    sync_dir,
)

CP_PUBLIC = signing.public_text(signing.load_private(bytes(range(32))))
TOKEN = "tok-one-time-7f3a"


class Cloud:
    """An enrollment endpoint on httpx's mock transport: records what it was sent."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = answer or self.accept

    @staticmethod
    def accept(request: httpx.Request) -> httpx.Response:
        body = wire.EnrollResponse(
            protocol_version=1,
            device_id="dev-42",
            store="S-1",
            group="north",
            control_plane_key=CP_PUBLIC,
            server_time=1.0,
        )
        return httpx.Response(201, content=wire.encode(body))

    def client(self) -> httpx.Client:
        def handle(request: httpx.Request) -> httpx.Response:
            request.read()
            self.requests.append(request)
            return self.answer(request)

        return httpx.Client(transport=httpx.MockTransport(handle))


def _enroll(tmp_path: Path, cloud: Cloud):
    with cloud.client() as http:
        return enroll("http://cp.test/", TOKEN, tmp_path / "data", "1.2.3", http, clock=lambda: 5.0)


def test_enroll__sends_the_token_and_public_key_and_pins_the_control_plane_key(tmp_path):
    cloud = Cloud()
    identity = _enroll(tmp_path, cloud)
    (req,) = cloud.requests
    assert (req.method, str(req.url)) == ("POST", "http://cp.test/v1/enroll")
    sent = wire.decode(req.content, wire.EnrollRequest)
    key = load_key(tmp_path / "data")
    assert (sent.token, sent.binary_version) == (TOKEN, "1.2.3")
    assert sent.public_key == signing.public_text(key)
    assert (identity.device_id, identity.store, identity.group) == ("dev-42", "S-1", "north")
    assert (identity.control_plane_key, identity.url, identity.enrolled_at) == (
        CP_PUBLIC,
        "http://cp.test",
        5.0,
    )
    assert load_identity(tmp_path / "data") == identity
    assert is_enrolled(tmp_path / "data")


def test_enroll__the_key_is_0600_in_a_0700_directory_and_32_raw_bytes(tmp_path):
    _enroll(tmp_path, Cloud())
    data = tmp_path / "data"
    assert stat.S_IMODE(os.stat(sync_dir(data)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(key_path(data)).st_mode) == 0o600
    assert len(key_path(data).read_bytes()) == 32
    assert not [p for p in sync_dir(data).iterdir() if p.name.endswith(".tmp")]


def test_enroll__the_private_key_is_never_sent_nor_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, httpx's included
    cloud = Cloud()
    _enroll(tmp_path, cloud)
    raw = key_path(tmp_path / "data").read_bytes()
    forms = {
        raw.hex(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }
    sent = b"".join(r.content + str(r.headers).encode() for r in cloud.requests)
    for form in forms:
        assert form not in caplog.text
        assert form.encode() not in sent
    assert raw not in sent
    assert TOKEN not in caplog.text  # the token goes to the server only
    assert "enrolled as device dev-42" in caplog.text


def test_enroll__a_refusal_names_the_servers_code_and_message_and_stores_no_identity(tmp_path):
    def refuse(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "token_used", "message": "the token was used", "field": "token"}}
        return httpx.Response(403, json=body)

    with pytest.raises(EnrollError) as info:
        _enroll(tmp_path, Cloud(refuse))
    err = info.value
    assert (err.server_code, err.status, err.retryable) == ("token_used", 403, False)
    assert "403 token_used: the token was used (field token)" in err.message
    assert not identity_path(tmp_path / "data").exists()


def test_enroll__a_retry_after_a_failure_sends_the_same_key(tmp_path):
    busy = {"error": {"code": "unavailable", "message": "db down"}}
    down = Cloud(lambda r: httpx.Response(503, json=busy))
    with pytest.raises(EnrollError) as info:
        _enroll(tmp_path, down)
    assert info.value.retryable
    cloud = Cloud()
    _enroll(tmp_path, cloud)
    first = wire.decode(down.requests[0].content, wire.EnrollRequest).public_key
    assert wire.decode(cloud.requests[0].content, wire.EnrollRequest).public_key == first


def test_enroll__a_replayed_nonce_is_retried_signed_anew(tmp_path):
    # A middlebox sent the request twice and we got the second copy's answer.
    replayed = {"error": {"code": "replayed_nonce", "message": "this request was seen before"}}
    twice = Cloud(lambda r: httpx.Response(401, json=replayed))
    with pytest.raises(EnrollError) as info:
        _enroll(tmp_path, twice)
    assert info.value.retryable and info.value.server_code == "replayed_nonce"
    cloud = Cloud()
    _enroll(tmp_path, cloud)
    nonces = [c.requests[0].headers["tillflow-nonce"] for c in (twice, cloud)]
    assert nonces[0] != nonces[1]


def test_enroll__a_clock_far_off_signs_again_with_the_servers_time(tmp_path):
    skew = {"error": {"code": "clock_skew", "message": "off", "server_time": 86_405.0}}

    def answer(request: httpx.Request) -> httpx.Response:
        if float(request.headers["tillflow-time"]) < 80_000:
            return httpx.Response(401, json=skew)
        return Cloud.accept(request)

    cloud = Cloud(answer)
    assert _enroll(tmp_path, cloud).device_id == "dev-42"
    times = [float(r.headers["tillflow-time"]) for r in cloud.requests]
    assert times == [5.0, 86_405.0]  # our clock says 5.0; the server's said 86,405


def test_enroll__unreachable_is_retryable(tmp_path):
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(EnrollError, match="cannot reach the control plane") as info:
        _enroll(tmp_path, Cloud(unreachable))
    assert info.value.retryable
    assert not is_enrolled(tmp_path / "data")


def test_enroll__an_answer_that_is_not_an_enrollment_is_refused(tmp_path):
    with pytest.raises(EnrollError, match="not an enrollment"):
        _enroll(tmp_path, Cloud(lambda r: httpx.Response(200, json={"kind": "sync_response"})))
    assert not is_enrolled(tmp_path / "data")


def test_enroll__twice_is_refused_naming_the_device(tmp_path):
    _enroll(tmp_path, Cloud())
    cloud = Cloud()
    with pytest.raises(EnrollError, match="already enrolled as device dev-42"):
        _enroll(tmp_path, cloud)
    assert cloud.requests == []


def test_load_key__refuses_a_key_others_can_read(tmp_path):
    _enroll(tmp_path, Cloud())
    os.chmod(key_path(tmp_path / "data"), 0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        load_key(tmp_path / "data")


def test_load_key__missing_or_short_is_a_clear_error(tmp_path):
    with pytest.raises(IdentityError, match="missing"):
        load_key(tmp_path)
    sync_dir(tmp_path).mkdir(mode=0o700)
    fd = os.open(key_path(tmp_path), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"short")
    os.close(fd)
    with pytest.raises(IdentityError, match="5 bytes, not 32"):
        load_key(tmp_path)


def test_load_identity__a_damaged_file_is_a_clear_error(tmp_path):
    _enroll(tmp_path, Cloud())
    path = identity_path(tmp_path / "data")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "control_plane_key": "not-a-key"}))
    with pytest.raises(IdentityError, match="not a device identity"):
        load_identity(tmp_path / "data")
