"""Signatures of the sync protocol, over exact bytes: the golden command's envelope and the
golden signed request verify with the fixed test keys in their files, and a change of any
part they cover (each field of a command, each byte of a request body, the method, path,
time, nonce, device) is refused, as is a flipped signature byte or another key."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sync_golden import load

from edge.engine.audit import canonical_json
from sync import signing, wire

COMMAND = load("command", 1)
REQUEST = load("signed_request", 1)
ROTATE = load("rotate_key", 1)


def _private(file: dict[str, Any], name: str) -> Ed25519PrivateKey:
    return signing.load_private(bytes.fromhex(file["keys"][name]["private_raw_hex"]))


CP_KEY = _private(COMMAND, "control_plane")
CP_PUBLIC = signing.load_public(COMMAND["keys"]["control_plane"]["public_key"])
DEVICE_KEY = _private(REQUEST, "device")
DEVICE_PUBLIC = signing.load_public(REQUEST["keys"]["device"]["public_key"])
ENVELOPE = wire.Envelope.model_validate(COMMAND["envelope"])


def _refused(envelope: wire.Envelope, public: Any = CP_PUBLIC) -> wire.WireError:
    with pytest.raises(wire.WireError) as info:
        signing.open_envelope(public, envelope)
    return info.value


def _set(obj: Any, path: str, value: Any) -> Any:
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    here = obj
    for part in parents:
        here = here[part]
    here[last] = value
    return obj


# --- the fixed keys ----------------------------------------------------------------------


def test_the_fixed_keys_are_the_files_and_round_trip() -> None:
    assert COMMAND["keys"]["control_plane"]["private_raw_hex"] == bytes(range(32)).hex()
    for file in (COMMAND, REQUEST, ROTATE, load("enroll_request", 1)):
        for name, key in file["keys"].items():
            private = _private(file, name)
            assert signing.public_text(private) == key["public_key"]
            assert signing.public_text(private.public_key()) == key["public_key"]
            assert signing.key_id(key["public_key"]) == key["key_id"]
            assert signing.private_bytes(private).hex() == key["private_raw_hex"]


def test_enrollment_carries_the_device_key_and_pins_the_control_plane_key() -> None:
    assert load("enroll_request", 1)["message"]["public_key"] == signing.public_text(DEVICE_KEY)
    assert load("enroll_response", 1)["message"]["control_plane_key"] == signing.public_text(CP_KEY)


@pytest.mark.parametrize("raw", [b"\x00" * 31, b"\x00" * 33, b""])
def test_a_public_key_that_is_not_32_bytes_is_refused(raw: bytes) -> None:
    with pytest.raises(wire.WireError) as info:
        signing.load_public(wire.b64e(raw))
    assert (info.value.code, info.value.field) == ("invalid_field", "public_key")


# --- command envelopes -------------------------------------------------------------------


def test_the_golden_envelope_verifies_with_the_fixed_keys_public_half() -> None:
    command = signing.open_envelope(CP_PUBLIC, ENVELOPE)
    assert command == wire.decode(COMMAND["command"], wire.Command)
    assert ENVELOPE.key_id == signing.key_id(signing.public_text(CP_PUBLIC))


def test_the_signed_bytes_are_the_canonical_bytes_and_sealing_is_deterministic() -> None:
    command = wire.decode(COMMAND["command"], wire.Command)
    canonical = COMMAND["canonical_bytes"].encode()
    assert signing.command_bytes(command) == canonical
    assert canonical == canonical_json(COMMAND["command"]).encode()
    assert wire.b64d(ENVELOPE.payload) == canonical
    assert signing.verify(CP_PUBLIC, wire.b64d(ENVELOPE.signature), canonical)
    assert signing.seal(CP_KEY, command) == ENVELOPE  # Ed25519 is deterministic


def test_the_sync_responses_command_is_the_golden_envelope() -> None:
    response = wire.decode(load("sync_response", 1)["message"], wire.SyncResponse)
    assert response.commands == [ENVELOPE]
    assert signing.open_envelope(CP_PUBLIC, response.commands[0]).seq == 4


EXPIRES = COMMAND["command"]["expires_at"]

#: One change of each field of a signed command (dotted path into its JSON, new value).
FLIPS: list[tuple[str, Any]] = [
    ("kind", "commands"),
    ("schema_version", 2),
    ("command_id", "cmd-0005"),
    ("device_id", "dev-00000000"),
    ("group", None),
    ("group", "another-group"),
    ("seq", 5),
    ("seq", 3),
    ("action", "activate_policy"),
    ("action", "request_health"),
    ("issued_at", COMMAND["command"]["issued_at"] + 0.001),
    ("expires_at", EXPIRES + 86400),
    ("expires_at", EXPIRES + 0.001),
    ("document", None),
    ("document.kind", "policy"),
    ("document.version", 8),
    ("document.version", 6),
    ("document.content", {}),
    ("document.content.currency", "USD"),
    ("document.content.offline.max_amount_minor", 15001),
    ("document.content.offline.max_amount_minor", 1_500_000),
    ("document.content.offline.max_count", 21),
    ("document.content.offline.max_total_minor", 100001),
    ("document.content.sync_interval_s", 31),
    ("document.content.added", True),
]


def _leaves(value: Any, prefix: str) -> set[str]:
    if not isinstance(value, dict):
        return {prefix}
    return {leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}.{k}")}


def test_the_flips_cover_every_field_of_a_command_and_its_document() -> None:
    flipped = {path for path, _ in FLIPS}
    assert set(wire.Command.model_fields) <= {p.split(".")[0] for p in flipped}
    assert {f"document.{f}" for f in wire.Document.model_fields} <= {
        ".".join(p.split(".")[:2]) for p in flipped
    }
    assert _leaves(COMMAND["command"]["document"]["content"], "document.content") <= flipped


@pytest.mark.parametrize(("path", "value"), FLIPS, ids=[f"{p}={v!r}" for p, v in FLIPS])
def test_a_command_with_any_field_changed_is_refused(path: str, value: Any) -> None:
    tampered = _set(COMMAND["command"], path, value)
    data = canonical_json(tampered).encode()
    if path != "kind":  # a valid, different command: only the signature tells
        assert wire.decode(data, wire.Command) != wire.decode(COMMAND["command"], wire.Command)
    forged = ENVELOPE.model_copy(update={"payload": wire.b64e(data)})
    err = _refused(forged)
    assert (err.code, err.field) == ("bad_signature", "signature")
    # The control plane sealing the same change is taken: the refusal was the signature's.
    if path != "kind":
        resealed = signing.seal(CP_KEY, wire.decode(data, wire.Command))
        assert signing.open_envelope(CP_PUBLIC, resealed).model_dump(mode="json") == tampered


def test_the_same_command_in_other_bytes_is_refused() -> None:
    # Verified are the exact bytes signed: the same content re-encoded is not them.
    for data in (
        json.dumps(COMMAND["command"]).encode(),
        json.dumps(COMMAND["command"], separators=(",", ":")).encode(),  # keys unsorted
        COMMAND["canonical_bytes"].encode() + b" ",
    ):
        assert wire.decode(data, wire.Command) == wire.decode(COMMAND["command"], wire.Command)
        assert _refused(ENVELOPE.model_copy(update={"payload": wire.b64e(data)})).code == (
            "bad_signature"
        )


@pytest.mark.parametrize("index", range(64))
def test_a_flipped_signature_byte_is_refused(index: int) -> None:
    signature = bytearray(wire.b64d(ENVELOPE.signature))
    signature[index] ^= 0x01
    forged = ENVELOPE.model_copy(update={"signature": wire.b64e(bytes(signature))})
    assert _refused(forged).code == "bad_signature"


@pytest.mark.parametrize("change", ["truncated", "extended", "zeros"])
def test_a_signature_of_the_wrong_shape_is_refused(change: str) -> None:
    signature = wire.b64d(ENVELOPE.signature)
    bad = {"truncated": signature[:-1], "extended": signature + b"\x00", "zeros": bytes(64)}
    forged = ENVELOPE.model_copy(update={"signature": wire.b64e(bad[change])})
    assert _refused(forged).code == "bad_signature"


def test_another_key_is_refused_both_ways() -> None:
    assert _refused(ENVELOPE, DEVICE_PUBLIC).code == "bad_signature"
    command = wire.decode(COMMAND["command"], wire.Command)
    by_device = signing.seal(DEVICE_KEY, command)
    assert by_device.payload == ENVELOPE.payload and by_device.key_id != ENVELOPE.key_id
    assert _refused(by_device).code == "bad_signature"


# --- device requests ---------------------------------------------------------------------

BODY = wire.b64d(REQUEST["body_b64url"])
SIGNATURE = wire.b64d(REQUEST["signature"])
PARTS = {
    "method": REQUEST["method"],
    "path": REQUEST["path"],
    "body": BODY,
    "time": REQUEST["time"],
    "nonce": REQUEST["nonce"],
    "device_id": REQUEST["device_id"],
}


def _verifies(public: Any = DEVICE_PUBLIC, **change: Any) -> bool:
    parts = {**PARTS, **change}
    return signing.verify(public, SIGNATURE, signing.request_bytes(**parts))


def test_the_golden_request_signature_verifies_over_the_bytes_in_the_file() -> None:
    assert signing.request_bytes(**PARTS) == REQUEST["request_bytes"].encode()
    assert signing.body_digest(BODY) == REQUEST["body_sha256"]
    assert _verifies()
    # The body is sync_request.json's message.
    assert wire.decode(BODY, wire.SyncRequest) == wire.decode(
        load("sync_request", 1)["message"], wire.SyncRequest
    )


def test_the_golden_headers_are_read_back_whatever_their_case() -> None:
    expected = (REQUEST["device_id"], REQUEST["time"], REQUEST["nonce"], REQUEST["signature"])
    headers = REQUEST["headers"]
    assert signing.request_headers(headers) == expected
    assert signing.request_headers({k.upper(): v for k, v in headers.items()}) == expected
    assert signing.request_headers({k.title(): v for k, v in headers.items()}) == expected


@pytest.mark.parametrize("name", sorted(load("signed_request", 1)["headers"]))
def test_a_missing_or_empty_signing_header_is_none(name: str) -> None:
    headers = dict(REQUEST["headers"])
    assert signing.request_headers({k: v for k, v in headers.items() if k != name}) is None
    assert signing.request_headers({**headers, name: ""}) is None


@pytest.mark.parametrize("method", ["PUT", "GET", "POS", "POSTX"])
def test_the_signature_covers_the_method(method: str) -> None:
    assert not _verifies(method=method)
    assert _verifies(method="post")  # the method is compared upper-cased, as HTTP does


@pytest.mark.parametrize("path", ["/v1/sync/", "/v1/enroll", "/v1/rotate-key", "/v2/sync", ""])
def test_the_signature_covers_the_path(path: str) -> None:
    assert not _verifies(path=path)


def test_the_signature_covers_the_amount_in_the_body() -> None:
    # The sale's amount is in the outbox payload and in its audit row: change either.
    amount = b'"amount_minor":4250'
    assert BODY.count(amount) == 2
    first = BODY.index(amount)
    second = BODY.index(amount, first + 1)
    for at in (first, second):
        for other in (b'"amount_minor":4251', b'"amount_minor":42500'):
            assert not _verifies(body=BODY[:at] + other + BODY[at + len(amount) :])


def test_the_signature_covers_every_byte_of_the_body() -> None:
    for i in range(len(BODY)):
        tampered = bytearray(BODY)
        tampered[i] ^= 0x01
        assert not _verifies(body=bytes(tampered)), f"byte {i} of the body is not covered"
    assert not _verifies(body=BODY[:-1])
    assert not _verifies(body=BODY + b"\n")
    # The same content re-encoded is other bytes: the server must verify what it received.
    assert not _verifies(body=json.dumps(json.loads(BODY)).encode())


@pytest.mark.parametrize("time", ["1764633630.251", "1764633630.25", "1764633631.250", ""])
def test_the_signature_covers_the_time(time: str) -> None:
    assert not _verifies(time=time)


def test_the_signature_covers_the_nonce() -> None:
    assert not _verifies(nonce="f" * 32)
    assert not _verifies(nonce=REQUEST["nonce"][:-1] + "1")


@pytest.mark.parametrize("device", ["dev-7f3a9c2f", "dev-7f3a9c2e ", "DEV-7F3A9C2E", ""])
def test_the_signature_covers_the_device_id(device: str) -> None:
    assert not _verifies(device_id=device)


def test_another_key_does_not_verify_a_request() -> None:
    assert not _verifies(public=CP_PUBLIC)


def test_sign_request_gives_headers_that_verify() -> None:
    now = 1764633630.25
    first = signing.sign_request(DEVICE_KEY, "POST", "/v1/sync", BODY, "dev-7f3a9c2e", now)
    second = signing.sign_request(DEVICE_KEY, "POST", "/v1/sync", BODY, "dev-7f3a9c2e", now)
    for headers in (first, second):
        device, time, nonce, signature = signing.request_headers(headers) or ("", "", "", "")
        assert (device, time) == ("dev-7f3a9c2e", REQUEST["time"])
        assert re.fullmatch(r"[0-9a-f]{32}", nonce)
        data = signing.request_bytes("POST", "/v1/sync", BODY, time, nonce, device)
        assert signing.verify(DEVICE_PUBLIC, wire.b64d(signature), data)
    assert first[signing.H_NONCE] != second[signing.H_NONCE]  # a fresh nonce each time


# --- key rotation ------------------------------------------------------------------------


def test_rotation_bytes_differ_per_device_and_per_key() -> None:
    keys = [signing.public_text(DEVICE_KEY), signing.public_text(CP_KEY)]
    combos = {signing.rotation_bytes(d, k) for d in ("dev-a", "dev-b") for k in keys}
    assert len(combos) == 4
    assert all(c.startswith(signing.ROTATION_DOMAIN + b"\n") for c in combos)
    # Never the bytes of a request: one signature cannot stand for the other.
    assert not any(c.startswith(signing.REQUEST_DOMAIN) for c in combos)


def test_the_golden_rotation_proof_is_the_new_keys_signature() -> None:
    message = wire.decode(ROTATE["message"], wire.RotateKeyRequest)
    new_public = signing.load_public(message.new_public_key)
    assert message.new_public_key == signing.public_text(_private(ROTATE, "device_next"))
    data = signing.rotation_bytes(ROTATE["device_id"], message.new_public_key)
    assert data == ROTATE["rotation_bytes"].encode()
    proof = wire.b64d(message.proof)
    assert signing.verify(new_public, proof, data)
    # Not for another device, not another key, not signed by the old key.
    assert not signing.verify(
        new_public, proof, signing.rotation_bytes("dev-other", message.new_public_key)
    )
    other_key = signing.public_text(CP_KEY)
    assert not signing.verify(
        new_public, proof, signing.rotation_bytes(ROTATE["device_id"], other_key)
    )
    assert not signing.verify(DEVICE_PUBLIC, proof, data)
