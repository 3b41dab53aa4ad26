"""The sync protocol's wire format, pinned: golden files (tests/golden/sync, never edited)
decode to their models and back, their content hashes and audit chain hold, and bad
input is refused with the ``WireError`` code and field a peer is told.

Tolerant of what a newer peer adds (unknown fields, top level and nested), strict on
everything else: types are not coerced (``"17"``, ``17.0`` and ``true`` are not the seq
17), unknown kinds and unsupported versions are refused, lists and strings are bounded.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, get_args

import pytest
from sync_golden import GOLDEN, load

from edge.engine.audit import GENESIS, link
from edge.engine.records import AuditEvent
from sync import wire

#: The golden files as first committed (tests/support/sync_golden.py wrote them). A
#: change of protocol is a new version in a new folder; an edit of one of these fails here
#: on purpose.
PINNED = {
    "v1/command.json": "f5a69ada86724d01c5aef438962177d78be193a3c218271fba847ba1f0e2ef5a",
    "v1/enroll_request.json": "61fb9823490e94a6ff716f101218360a78bcefdac860f91e6a15742b862c6a71",
    "v1/enroll_response.json": "7d3a00573c22b0b79254c4357d10e6a7aa96f1062c658a25837faf196451b34a",
    "v1/error.json": "15c3cd94327cefcccebdb85e4aecd93cecff37931d7223bbe95c6aa1b7619e86",
    "v1/rotate_key.json": "ed6c3602a19061b806a70e03d170ce9ddd21d3906b5d66eb0fe740aa9a1e35e7",
    "v1/rotate_key_response.json": (
        "740a0ac1a4ecddcab53f99469db12d1b10c4acdd9473b6cf06ea53eec9c14617"
    ),
    "v1/signed_request.json": "08052c805719f404247f6519c351a81b20c890257991ed717485e2fb33f34ac6",
    "v1/sync_request.json": "16c7155b341acda95869f52799eb05e0d17b7fc4d843592090eb6a44ddcff7b9",
    "v1/sync_response.json": "3b8450270402028b48bb2fc7e54206bd90952589c4f8b0f6c61d22e1bea6f023",
}

#: The golden files that hold one message under "message", and its model.
MESSAGE_FILES: dict[str, type[wire._Wire]] = {
    "enroll_request": wire.EnrollRequest,
    "enroll_response": wire.EnrollResponse,
    "rotate_key": wire.RotateKeyRequest,
    "rotate_key_response": wire.RotateKeyResponse,
    "sync_request": wire.SyncRequest,
    "sync_response": wire.SyncResponse,
    "error": wire.ErrorBody,
}


def _message(name: str) -> dict[str, Any]:
    message: dict[str, Any] = copy.deepcopy(load(name, 1)["message"])
    return message


def _set(obj: Any, path: str, value: Any) -> Any:
    """``obj`` (a copy) with the value at dotted ``path`` replaced; ``...`` deletes it."""
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    here = obj
    for part in parents:
        here = here[int(part)] if isinstance(here, list) else here[part]
    key: Any = int(last) if isinstance(here, list) else last
    if value is ...:
        del here[key]
    else:
        here[key] = value
    return obj


def _refused(data: Any, expect: type[wire._Wire]) -> wire.WireError:
    body = data if isinstance(data, bytes | str) else json.dumps(data)
    with pytest.raises(wire.WireError) as info:
        wire.decode(body, expect)
    return info.value


# --- the golden files ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PINNED))
def test_golden_files_are_never_edited(name: str) -> None:
    assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == PINNED[name]


def test_every_golden_file_is_pinned_and_every_version_served_has_its_files() -> None:
    found = {str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*.json")}
    assert found == set(PINNED), "pin a new golden file's sha256 in PINNED"
    for version in wire.SUPPORTED_VERSIONS:
        folder = {Path(p).stem for p in found if p.startswith(f"v{version}/")}
        assert set(wire.MESSAGES) | {"command", "error", "signed_request"} <= folder


@pytest.mark.parametrize("name", sorted(MESSAGE_FILES))
def test_golden_message_decodes_and_re_encodes_to_the_same_object(name: str) -> None:
    message = _message(name)
    model = wire.decode(json.dumps(message).encode(), MESSAGE_FILES[name])
    assert json.loads(wire.encode(model)) == message
    # The parsed object decodes the same as its bytes and text.
    assert wire.decode(message, MESSAGE_FILES[name]) == model
    assert wire.decode(json.dumps(message), MESSAGE_FILES[name]) == model


def test_golden_command_and_envelope_decode_and_re_encode() -> None:
    golden = load("command", 1)
    command = wire.decode(json.dumps(golden["command"]), wire.Command)
    assert json.loads(wire.encode(command)) == golden["command"]
    envelope = wire.decode(json.dumps(golden["envelope"]), wire.Envelope)
    assert json.loads(wire.encode(envelope)) == golden["envelope"]
    assert command.document is not None and command.document.version == 7


def test_golden_sync_response_shows_every_status_and_the_command() -> None:
    response = wire.decode(_message("sync_response"), wire.SyncResponse)
    assert [r.status for r in response.results] == list(get_args(wire.EntryStatus))
    assert all(r.reason for r in response.results if r.status in ("conflict", "rejected"))
    assert (response.outbox_through, response.audit_through) == (20, 44)
    assert response.chain.state == "broken" and response.chain.first_bad_seq == 45
    assert [e.model_dump() for e in response.commands] == [load("command", 1)["envelope"]]


def test_golden_outbox_entries_carry_their_content_hash() -> None:
    request = wire.decode(_message("sync_request"), wire.SyncRequest)
    assert len(request.outbox) == 2
    for entry in request.outbox:
        assert wire.entry_hash(entry) == entry.content_hash
        assert entry.content_hash == wire.content_hash(
            entry.message_id, entry.topic, entry.payload, entry.created_at, entry.run_id, entry.step
        )
    sale = request.outbox[0]
    assert sale.payload["amount_minor"] == 4250
    # The hash covers the amount (and each other part of the content).
    base = (sale.message_id, sale.topic, sale.payload, sale.created_at, sale.run_id, sale.step)
    changed = [
        (sale.message_id + "x", *base[1:]),
        (base[0], "other_topic", *base[2:]),
        (*base[:2], {**sale.payload, "amount_minor": 4251}, *base[3:]),
        (*base[:3], sale.created_at + 0.001, *base[4:]),
        (*base[:4], "other-run", base[5]),
        (*base[:5], "other_step"),
    ]
    assert len({wire.content_hash(*c) for c in changed} | {sale.content_hash}) == 7


def test_golden_audit_rows_are_a_version_2_chain_from_the_base() -> None:
    request = wire.decode(_message("sync_request"), wire.SyncRequest)
    assert request.audit_base is not None and request.audit_base.hash != GENESIS
    prev_seq, prev_hash = request.audit_base.seq, request.audit_base.hash
    assert len(request.audit) == 3
    for row in request.audit:
        assert (row.seq, row.prev_hash, row.version, row.chain) == (prev_seq + 1, prev_hash, 2, 0)
        event = AuditEvent(row.run_id, row.event, row.at, row.step, row.detail)
        assert link(row.prev_hash, row.seq, event, stream=row.chain, version=2) == row.hash
        prev_seq, prev_hash = row.seq, row.hash


def test_golden_error_is_what_decode_answers_for_its_input() -> None:
    golden = load("error", 1)
    err = _refused(golden["input"], wire.SyncRequest)
    expected = golden["message"]["error"]
    assert (
        (err.code, err.field)
        == (expected["code"], expected["field"])
        == (
            "invalid_field",
            "outbox.0.seq",
        )
    )
    assert set(err.body()) == {"error"} and set(err.body()["error"]) == set(expected)
    assert err.body()["error"]["message"].startswith("outbox.0.seq:")


# --- tolerant of a newer peer ------------------------------------------------------------

NEW_FIELD = {"added_in_a_later_version": [1, {"nested": True}]}


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("enroll_request", ""),
        ("enroll_request", "hardware"),
        ("enroll_response", ""),
        ("rotate_key", ""),
        ("rotate_key_response", ""),
        ("sync_request", ""),
        ("sync_request", "outbox.0"),
        ("sync_request", "audit.2"),
        ("sync_request", "audit_base"),
        ("sync_request", "heartbeat"),
        ("sync_response", ""),
        ("sync_response", "results.3"),
        ("sync_response", "chain"),
        ("sync_response", "commands.0"),
        ("error", "error"),
    ],
)
def test_unknown_fields_are_ignored_top_level_and_nested(name: str, path: str) -> None:
    message = _message(name)
    here = message
    for part in path.split(".") if path else []:
        here = here[int(part)] if isinstance(here, list) else here[part]
    here.update(NEW_FIELD)
    model = wire.decode(json.dumps(message), MESSAGE_FILES[name])
    assert model == wire.decode(_message(name), MESSAGE_FILES[name])
    assert "added_in_a_later_version" not in wire.encode(model).decode()


def test_unknown_fields_of_a_command_and_its_document_are_ignored() -> None:
    command = copy.deepcopy(load("command", 1)["command"])
    original = wire.decode(command, wire.Command)
    command.update(NEW_FIELD)
    command["document"].update(NEW_FIELD)
    assert wire.decode(json.dumps(command), wire.Command) == original


# --- strict on types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("outbox.0.seq", "17"),
        ("outbox.0.seq", "true"),
        ("outbox.0.seq", True),
        ("outbox.0.seq", 17.0),
        ("outbox.0.seq", None),
        ("outbox.0.seq", 0),
        ("outbox.0.seq", wire.MAX_INT64 + 1),
        ("outbox.1.message_id", 18),
        ("outbox.0.created_at", "1764633610.125"),
        ("outbox.0.content_hash", "4209FB0D" + "0" * 56),
        ("outbox.0.content_hash", "abc"),
        ("audit.1.seq", False),
        ("audit.1.detail", ["not", "an", "object"]),
        ("audit.1.at", True),
        ("audit.0.chain", -1),
        ("audit.0.version", "2"),
        ("audit_base.seq", -1),
        ("heartbeat.outbox_depth", True),
        ("heartbeat.outbox_depth", "2"),
        ("heartbeat.offline_exposure_minor", 4250.0),
        ("heartbeat.storage_state", "overflowing"),
        ("heartbeat.storage_used_percent", "12.5"),
        ("heartbeat", "ok"),
        ("device_id", 7),
        ("stream", "5D0C1E7A9B3F4A6C8E2D0B1F3A5C7E9D"),
        ("stream", "short"),
        ("sent_at", "now"),
        ("commands_through", True),
        ("commands_through", -1),
        ("outbox", {"0": "not a list"}),
    ],
)
def test_wrong_types_are_refused_naming_the_field(path: str, value: Any) -> None:
    err = _refused(_set(_message("sync_request"), path, value), wire.SyncRequest)
    assert (err.code, err.field) == ("invalid_field", path)
    assert err.message.startswith(f"{path}:")


@pytest.mark.parametrize(
    "path", ["device_id", "heartbeat", "heartbeat.binary_version", "outbox.0.topic"]
)
def test_a_missing_required_field_is_named(path: str) -> None:
    err = _refused(_set(_message("sync_request"), path, ...), wire.SyncRequest)
    assert (err.code, err.field) == ("invalid_field", path)


def test_the_seq_true_is_not_one() -> None:
    # JSON true is not the integer 1 (Python's bool is an int; strict mode says no).
    result = {"seq": True, "status": "applied"}
    assert _refused(result, wire.EntryResult).field == "seq"
    assert wire.decode({"seq": 1, "status": "applied"}, wire.EntryResult).seq == 1


def test_the_largest_seq_a_bigint_holds_is_taken() -> None:
    message = _set(_message("sync_request"), "outbox.0.seq", wire.MAX_INT64)
    assert wire.decode(json.dumps(message), wire.SyncRequest).outbox[0].seq == wire.MAX_INT64


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_not_json(text: str) -> None:
    body = json.dumps(_message("sync_request")).replace("1764633630.25", text, 1)
    assert text in body
    err = _refused(body, wire.SyncRequest)
    assert err.code == "malformed_json" and text.lstrip("-") in err.message


def test_a_non_finite_float_in_a_parsed_object_is_refused_naming_the_field() -> None:
    message = _set(_message("sync_request"), "heartbeat.at", float("inf"))
    with pytest.raises(wire.WireError) as info:
        wire.decode(message, wire.SyncRequest)
    assert (info.value.code, info.value.field) == ("invalid_field", "heartbeat.at")


# --- kinds and versions ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync_requests", "SYNC_REQUEST", "", None, 1, ["sync_request"]])
def test_an_unknown_kind_is_refused(kind: Any) -> None:
    err = _refused(_set(_message("sync_request"), "kind", kind), wire.SyncRequest)
    assert (err.code, err.field) == ("unknown_kind", "kind")


def test_a_missing_kind_is_refused() -> None:
    err = _refused(_set(_message("sync_request"), "kind", ...), wire.SyncRequest)
    assert (err.code, err.field) == ("unknown_kind", "kind")


def test_a_huge_unknown_kind_is_not_echoed_whole() -> None:
    err = _refused(_set(_message("sync_request"), "kind", "x" * 100_000), wire.SyncRequest)
    assert err.code == "unknown_kind" and len(err.message) < 200


@pytest.mark.parametrize("name", ["enroll_request", "enroll_response", "sync_response"])
def test_a_known_kind_where_another_is_expected_is_the_wrong_kind(name: str) -> None:
    err = _refused(_message(name), wire.SyncRequest)
    assert (err.code, err.field) == ("wrong_kind", "kind")
    assert "sync_request" in err.message and name in err.message


@pytest.mark.parametrize("version", [2, 0, -1, 1.0, "1", True, None, [1]])
def test_an_unsupported_protocol_version_is_refused(version: Any) -> None:
    for name, model in MESSAGE_FILES.items():
        if name == "error":
            continue
        err = _refused(_set(_message(name), "protocol_version", version), model)
        assert (err.code, err.field) == ("unsupported_protocol_version", "protocol_version")
        assert "supported: 1" in err.message


def test_a_missing_protocol_version_is_refused() -> None:
    err = _refused(_set(_message("sync_request"), "protocol_version", ...), wire.SyncRequest)
    assert err.code == "unsupported_protocol_version"


# --- malformed input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"", b"{", b'{"kind": "sync_request",}', b"\xff\xfe\x00", b"{'kind': 1}", b"nul"]
)
def test_malformed_json_is_refused(body: bytes) -> None:
    err = _refused(body, wire.SyncRequest)
    assert (err.code, err.field) == ("malformed_json", None)


@pytest.mark.parametrize("body", [b"[]", b'"sync_request"', b"17", b"null", b"true"])
def test_json_that_is_not_an_object_is_the_wrong_type(body: bytes) -> None:
    assert _refused(body, wire.SyncRequest).code == "wrong_type"


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_is_bounded_and_what_is_taken_can_be_hashed() -> None:
    # message (1) > outbox (2) > entry (3) > payload: MAX_JSON_DEPTH levels in all.
    deepest = wire.MAX_JSON_DEPTH - 3
    ok = _set(_message("sync_request"), "outbox.0.payload", _nested(deepest))
    entry = wire.decode(json.dumps(ok), wire.SyncRequest).outbox[0]
    assert len(wire.entry_hash(entry)) == 64
    too_deep = _set(_message("sync_request"), "outbox.0.payload", _nested(deepest + 1))
    assert _refused(too_deep, wire.SyncRequest).code == "too_deep"
    # ... also when parsed already, and in an audit row's detail.
    with pytest.raises(wire.WireError, match="nested deeper"):
        wire.decode(too_deep, wire.SyncRequest)
    detail = _set(_message("sync_request"), "audit.0.detail", {"d": _nested(deepest + 1)})
    assert _refused(detail, wire.SyncRequest).code == "too_deep"


@pytest.mark.parametrize("levels", [400, 5_000, 200_000])
def test_absurd_nesting_is_refused_not_a_crash(levels: int) -> None:
    # 400 levels once passed json.loads and then overflowed canonical_json's stack when
    # the entry was hashed; the deeper ones overflowed json.loads itself (RecursionError).
    message = _message("sync_request")
    text = json.dumps(_set(message, "outbox.0.payload", "HERE"))
    body = text.replace('"HERE"', "[" * levels + "]" * levels, 1)
    err = _refused(body, wire.SyncRequest)
    assert (err.code, err.field) == ("too_deep", None)


# --- bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["outbox", "audit"])
def test_a_batch_of_more_than_max_batch_entries_is_refused(field: str) -> None:
    message = _message("sync_request")
    one = message[field][0]
    message[field] = [{**one, "seq": i + 1} for i in range(wire.MAX_BATCH_ENTRIES + 1)]
    err = _refused(message, wire.SyncRequest)
    assert (err.code, err.field) == ("invalid_field", field)
    message[field] = message[field][: wire.MAX_BATCH_ENTRIES]
    assert len(getattr(wire.decode(message, wire.SyncRequest), field)) == wire.MAX_BATCH_ENTRIES


@pytest.mark.parametrize(
    ("name", "path", "limit"),
    [
        ("sync_request", "device_id", wire.MAX_FIELD_CHARS),
        ("sync_request", "outbox.0.message_id", wire.MAX_FIELD_CHARS),
        ("sync_request", "outbox.0.topic", wire.MAX_FIELD_CHARS),
        ("sync_request", "outbox.0.run_id", wire.MAX_FIELD_CHARS),
        ("sync_request", "outbox.0.step", wire.MAX_FIELD_CHARS),
        ("sync_request", "audit.1.event", wire.MAX_FIELD_CHARS),
        ("sync_request", "audit.1.step", wire.MAX_FIELD_CHARS),
        ("sync_request", "audit.1.run_id", wire.MAX_FIELD_CHARS),
        ("sync_request", "heartbeat.binary_version", wire.MAX_FIELD_CHARS),
        ("sync_request", "heartbeat.last_error", 1024),
        ("enroll_request", "token", wire.MAX_FIELD_CHARS),
        ("enroll_request", "hardware.serial", wire.MAX_FIELD_CHARS),
        ("enroll_response", "store", wire.MAX_FIELD_CHARS),
        ("enroll_response", "group", wire.MAX_FIELD_CHARS),
        ("rotate_key", "proof", wire.MAX_PAYLOAD_BYTES * 2),
        ("sync_response", "commands.0.key_id", wire.MAX_FIELD_CHARS),
        ("sync_response", "commands.0.payload", wire.MAX_PAYLOAD_BYTES * 2),
    ],
)
def test_field_lengths_are_capped(name: str, path: str, limit: int) -> None:
    model = MESSAGE_FILES[name]
    assert wire.decode(_set(_message(name), path, "a" * limit), model)
    err = _refused(_set(_message(name), path, "a" * (limit + 1)), model)
    assert (err.code, err.field) == ("invalid_field", path)


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("sync_request", "device_id"),
        ("sync_request", "outbox.0.message_id"),
        ("sync_request", "outbox.0.topic"),
        ("enroll_request", "token"),
    ],
)
def test_an_empty_id_is_refused(name: str, path: str) -> None:
    err = _refused(_set(_message(name), path, ""), MESSAGE_FILES[name])
    assert (err.code, err.field) == ("invalid_field", path)


@pytest.mark.parametrize("length", [42, 45])
def test_a_public_key_is_43_or_44_characters(length: int) -> None:
    err = _refused(_set(_message("enroll_request"), "public_key", "A" * length), wire.EnrollRequest)
    assert (err.code, err.field) == ("invalid_field", "public_key")


# --- the small helpers -------------------------------------------------------------------


def test_base64url_round_trips_without_padding() -> None:
    for data in (b"", b"\x00", b"\xff\xfe", bytes(range(256))):
        text = wire.b64e(data)
        assert "=" not in text and "+" not in text and "/" not in text
        assert wire.b64d(text) == data


@pytest.mark.parametrize("text", ["a", "é", "abcde"])
def test_what_is_not_base64url_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(wire.WireError) as info:
        wire.b64d(text, "proof")
    assert (info.value.code, info.value.field) == ("invalid_field", "proof")


def test_wire_error_body_is_the_error_shape_every_endpoint_answers() -> None:
    body = wire.WireError("bad_gzip", "the body is not gzip", None).body()
    assert body == {"error": {"code": "bad_gzip", "message": "the body is not gzip", "field": None}}
    assert wire.decode(body, wire.ErrorBody).error.code == "bad_gzip"
