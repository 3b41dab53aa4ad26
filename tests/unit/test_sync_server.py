"""The sync service's logic (sync.server) over the in-memory backend: enrollment, every
auth refusal, per-entry outbox results, audit chains across batches, heartbeat,
commands, rotation, bad bodies, and a backend fault as a 503 that stores nothing."""

from __future__ import annotations

import copy
import gzip
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sync_memory import MemoryBackend, Terminal, outbox_entry

from edge.engine.audit import GENESIS, link
from edge.engine.clock import FakeClock
from edge.engine.records import AuditEvent
from sync import signing, wire
from sync.server import NewDocument, ServiceError, SyncService
from sync.server_ingest import audit_hash, clean_text, outbox_hash, text_problem

SKEW = 300.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def service(backend: MemoryBackend, clock: FakeClock) -> SyncService:
    return SyncService(backend, clock, signing.new_key(), skew_s=SKEW)


def enroll(service: SyncService, clock: FakeClock, store: str = "store-1") -> Terminal:
    term = Terminal(clock)
    token = service.create_enroll_token(store, "north")
    status, body = term.enroll(service, token.token)
    assert status == 200, body
    term.device_id = body["device_id"]
    return term


@pytest.fixture
def term(service: SyncService, clock: FakeClock) -> Terminal:
    return enroll(service, clock)


def sync(service: SyncService, term: Terminal, **fields: Any) -> tuple[int, dict[str, Any]]:
    outbox = fields.pop("outbox", ())
    audit = fields.pop("audit", ())
    return service.sync(*term.signed(term.request(outbox, audit, **fields)))


def ok(service: SyncService, term: Terminal, **fields: Any) -> dict[str, Any]:
    status, body = sync(service, term, **fields)
    assert status == 200, body
    return body


def statuses(body: dict[str, Any]) -> list[tuple[int, str, str | None]]:
    return [(r["seq"], r["status"], r["reason"]) for r in body["results"]]


# --- enrollment ----------------------------------------------------------------------------


def test_enroll__registers_the_key_and_answers_the_control_plane_key(service, backend, clock):
    term = Terminal(clock)
    token = service.create_enroll_token("store-9", "south", ttl_s=60)
    status, body = term.enroll(service, token.token)
    assert status == 200
    response = wire.decode(body, wire.EnrollResponse)
    assert response.device_id.startswith("dev_") and len(response.device_id) == 20
    assert (response.store, response.group) == ("store-9", "south")
    assert response.control_plane_key == service.public_key
    device = backend.state.devices[response.device_id]
    assert (device.public_key, device.status, device.store) == (term.public, "active", "store-9")
    # the clear token is nowhere in the backend: only its SHA-256
    assert token.token not in repr(backend.state)
    assert list(backend.state.tokens) == [signing.body_digest(token.token.encode())]


def test_enroll__asked_again_by_the_same_key_after_a_lost_answer_gets_the_same_device(
    service, backend, clock
):
    term = Terminal(clock)
    token = service.create_enroll_token("s1", "north", ttl_s=60).token
    first = term.enroll(service, token)
    clock.advance(5)
    again = term.enroll(service, token)  # the first answer never reached the terminal
    assert first[0] == again[0] == 200
    assert again[1]["device_id"] == first[1]["device_id"]
    assert (again[1]["store"], again[1]["group"]) == ("s1", "north")
    assert list(backend.state.devices) == [first[1]["device_id"]]
    # Another key with the same token is a stranger: the one answer for a bad token.
    other = Terminal(clock).enroll(service, token)
    assert (other[0], other[1]["error"]["code"]) == (401, "invalid_token")


def test_enroll__the_same_signed_request_twice_is_a_replay(service, clock):
    term = Terminal(clock)
    body = term.enroll_body(service.create_enroll_token("s1", ttl_s=60).token)
    headers = term.enroll_headers(body)
    assert service.enroll(body, headers)[0] == 200
    status, again = service.enroll(body, headers)  # a retry signs anew; a copy does not
    assert (status, again["error"]["code"]) == (401, "replayed_nonce")


def test_enroll__must_be_signed_by_the_key_it_registers(service, backend, clock):
    term, thief = Terminal(clock), Terminal(clock)
    token = service.create_enroll_token("s1", ttl_s=3600).token
    body = term.enroll_body(token)
    unsigned = service.enroll(body, {})
    # Signed by another key (naming the enrolled key, or its own): not the key's holder.
    forged = thief.enroll_headers(body)
    forged_as = dict(forged, **{signing.H_DEVICE: term.public})
    assert (unsigned[0], unsigned[1]["error"]["code"]) == (401, "missing_signature")
    for headers in (forged, forged_as):
        got = service.enroll(body, headers)
        assert (got[0], got[1]["error"]["code"]) == (401, "bad_signature")
    late = term.enroll_headers(body)
    clock.advance(400)  # outside the 300 s window
    stale = service.enroll(body, late)
    assert (stale[0], stale[1]["error"]["code"]) == (401, "clock_skew")
    assert backend.state.devices == {}  # and the token is still good for its holder
    assert term.enroll(service, token)[0] == 200


def test_enroll__the_same_signed_request_twice_is_a_replay_and_a_bad_nonce_is_refused(
    service, backend, clock
):
    term = Terminal(clock)
    token = service.create_enroll_token("s1", ttl_s=60).token
    body = term.enroll_body(token)
    headers = term.enroll_headers(body)
    first = service.enroll(body, headers)
    assert first[0] == 200
    # The very bytes and headers again (a replay, not a retry: a retry signs anew).
    before = copy.deepcopy(backend.state)
    replay = service.enroll(body, headers)
    assert (replay[0], replay[1]["error"]["code"]) == (401, "replayed_nonce")
    assert backend.state == before
    # A retry signs anew: the same device, and the nonce is kept under it.
    again = term.enroll(service, token)
    assert (again[0], again[1]["device_id"]) == (200, first[1]["device_id"])
    assert {d for d, _ in backend.state.nonces} == {first[1]["device_id"]}
    # A nonce that is not one (signed all the same) is refused before the token is used.
    fresh = Terminal(clock)
    other = service.create_enroll_token("s1", ttl_s=60).token
    body = fresh.enroll_body(other)
    time_text = f"{clock.now():.3f}"
    data = signing.request_bytes("POST", "/v1/enroll", body, time_text, "short", fresh.public)
    bad = {
        signing.H_DEVICE: fresh.public,
        signing.H_TIME: time_text,
        signing.H_NONCE: "short",
        signing.H_SIGNATURE: wire.b64e(fresh.key.sign(data)),
    }
    assert service.enroll(body, bad)[1]["error"]["code"] == "bad_nonce"
    assert fresh.enroll(service, other)[0] == 200


def test_enroll__a_time_that_is_not_a_number_is_clock_skew_with_the_servers_time(service, clock):
    term = Terminal(clock)
    body = term.enroll_body(service.create_enroll_token("s1").token)
    headers = dict(term.enroll_headers(body), **{signing.H_TIME: "soon"})
    status, answer = service.enroll(body, headers)
    assert (status, answer["error"]["code"]) == (401, "clock_skew")
    assert answer["error"]["server_time"] == clock.now()


def test_enroll__a_token_is_single_use_expires_and_unknown_is_the_same_answer(service, clock):
    token = service.create_enroll_token("s1", ttl_s=60)
    assert Terminal(clock).enroll(service, token.token)[0] == 200
    used = Terminal(clock).enroll(service, token.token)
    unknown = Terminal(clock).enroll(service, "no-such-token")
    late = service.create_enroll_token("s1", ttl_s=60)
    clock.advance(61)
    expired = Terminal(clock).enroll(service, late.token)
    assert used == unknown == expired
    assert used[0] == 401 and used[1]["error"]["code"] == "invalid_token"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        (b"[]", 400, "wrong_type"),
        (b'{"kind": "nope", "protocol_version": 1}', 400, "unknown_kind"),
        (
            b'{"kind": "enroll_request", "protocol_version": 1, "token": "t", '
            b'"public_key": "' + b"A" * 44 + b'", "binary_version": "1"}',
            422,
            "invalid_field",
        ),
        (b"x" * 70_000, 413, "body_too_large"),
        (
            # a valid key with a stray NUL the lenient base64 decoder would skip
            b'{"kind": "enroll_request", "protocol_version": 1, "token": "t", '
            b'"public_key": "' + b"A" * 43 + b'\\u0000", "binary_version": "1"}',
            422,
            "invalid_field",
        ),
    ],
)
def test_enroll__bad_bodies_are_4xx_with_the_error_shape(service, body, status, code):
    got_status, got = service.enroll(body)
    assert (got_status, got["error"]["code"]) == (status, code)
    assert set(got["error"]) == {"code", "message", "field"}


# --- auth ----------------------------------------------------------------------------------


def refused(service, backend, method, path, headers, body, call=None) -> tuple[int, str]:
    before = copy.deepcopy(backend.state)
    status, answer = (call or service.sync)(method, path, headers, body)
    assert backend.state == before, "a refused request stored something"
    return status, answer["error"]["code"]


def test_auth__every_refusal_has_its_code_stores_nothing_and_is_logged(
    service, backend, term, clock, caplog
):
    caplog.set_level(logging.WARNING, logger="sync.server")
    method, path, headers, body = term.signed(term.request([outbox_entry(1)]))
    unsigned = {k: v for k, v in headers.items() if k != signing.H_SIGNATURE}
    assert refused(service, backend, method, path, unsigned, body) == (401, "missing_signature")
    stranger = Terminal(clock)
    stranger.device_id = "dev_0000000000000000"
    assert refused(service, backend, *stranger.signed(term.request())) == (401, "unknown_device")
    tampered = bytearray(body)
    tampered[-5] ^= 1
    assert refused(service, backend, method, path, headers, bytes(tampered)) == (
        401,
        "bad_signature",
    )
    assert refused(service, backend, method, "/v1/rotate-key", headers, body) == (
        401,
        "bad_signature",
    )
    impostor = Terminal(clock)
    impostor.device_id = term.device_id  # the right id, another key
    assert refused(service, backend, *impostor.signed(term.request())) == (401, "bad_signature")
    assert "the signature does not verify" in caplog.text
    assert headers[signing.H_SIGNATURE] not in caplog.text
    assert any(
        r.levelno == logging.WARNING
        and getattr(r, "code", None) == "bad_signature"
        and getattr(r, "device_id", None) == term.device_id
        for r in caplog.records
    )


@pytest.mark.parametrize("offset", [-SKEW - 1, SKEW + 1])
def test_auth__a_time_outside_the_skew_window_is_refused(service, backend, term, clock, offset):
    method, path, _, body = term.signed(term.request())
    headers = signing.sign_request(
        term.key, method, path, body, term.device_id, clock.now() + offset
    )
    headers["content-encoding"] = "gzip"
    assert refused(service, backend, method, path, headers, body) == (401, "clock_skew")
    inside = signing.sign_request(
        term.key, method, path, body, term.device_id, clock.now() + offset / 2
    )
    assert service.sync(method, path, inside | {"content-encoding": "gzip"}, body)[0] == 200


@pytest.mark.parametrize("bad_time", ["nan", "inf", "soon", "-inf"])
def test_auth__a_time_that_is_not_a_finite_number_is_clock_skew(service, backend, term, bad_time):
    method, path, _, body = term.signed(term.request())
    nonce = "a" * 32
    sig = term.key.sign(signing.request_bytes(method, path, body, bad_time, nonce, term.device_id))
    headers = {
        signing.H_DEVICE: term.device_id,
        signing.H_TIME: bad_time,
        signing.H_NONCE: nonce,
        signing.H_SIGNATURE: wire.b64e(sig),
        "content-encoding": "gzip",
    }
    assert refused(service, backend, method, path, headers, body) == (401, "clock_skew")


def test_auth__a_replayed_nonce_is_refused_and_nonces_are_pruned_after_twice_the_skew(
    service, backend, term, clock
):
    request = term.signed(term.request([outbox_entry(1)]))
    assert service.sync(*request)[0] == 200
    assert refused(service, backend, *request) == (401, "replayed_nonce")
    assert len(backend.state.nonces) == 2  # the enrollment's and this request's
    clock.advance(2 * SKEW + 1)
    ok(service, term)
    assert len(backend.state.nonces) == 1  # the old one pruned, this one kept


def test_auth__a_revoked_device_is_refused_at_once(service, backend, term):
    ok(service, term)
    service.revoke_device(term.device_id)
    assert refused(service, backend, *term.signed(term.request())) == (403, "device_revoked")
    assert service.revoke_device(term.device_id).status == "revoked"  # again: no change


def test_auth__the_body_must_be_for_the_signing_device(service, backend, term, clock):
    other = enroll(service, clock)
    request = term.request(device_id=other.device_id)
    assert refused(service, backend, *term.signed(request)) == (403, "device_mismatch")


# --- key rotation --------------------------------------------------------------------------


def rotation(term: Terminal, new_key: Any, proof_key: Any = None) -> bytes:
    new_public = signing.public_text(new_key)
    proof = (proof_key or new_key).sign(signing.rotation_bytes(term.device_id, new_public))
    req = wire.RotateKeyRequest(
        protocol_version=1, new_public_key=new_public, proof=wire.b64e(proof)
    )
    return wire.encode(req)


def test_rotate_key__the_new_key_signs_from_then_on_and_the_old_is_refused(service, backend, term):
    new_key = signing.new_key()
    status, body = service.rotate_key(
        *term.signed(rotation(term, new_key), "/v1/rotate-key", False)
    )
    assert status == 200 and body["device_id"] == term.device_id
    device = backend.state.devices[term.device_id]
    assert (device.public_key, device.previous_public_key) == (
        signing.public_text(new_key),
        term.public,
    )
    assert refused(service, backend, *term.signed(term.request())) == (401, "bad_signature")
    term.key = new_key
    ok(service, term)


def test_rotate_key__a_proof_not_made_by_the_new_key_is_refused(service, backend, term):
    body = rotation(term, signing.new_key(), proof_key=signing.new_key())
    request = term.signed(body, "/v1/rotate-key", False)
    assert refused(service, backend, *request, call=service.rotate_key) == (401, "bad_proof")


# --- outbox --------------------------------------------------------------------------------


def test_outbox__a_poison_entry_is_rejected_alone_and_those_after_it_are_applied(
    service, backend, term
):
    huge = {"blob": "x" * (wire.MAX_PAYLOAD_BYTES + 1)}
    batch = [
        outbox_entry(1),
        outbox_entry(2, content_hash="0" * 64),  # tampered: the amount changed
        outbox_entry(3, payload=huge),
        outbox_entry(4, topic="command_result", payload={"command_id": "c"}),
        outbox_entry(5, topic="t" * (wire.MAX_FIELD_CHARS + 1)),  # over-long field
        outbox_entry(6, payload={"note": "a\x00b"}),  # PostgreSQL cannot hold it
        outbox_entry(7),
    ]
    body = ok(service, term, outbox=batch)
    assert statuses(body) == [
        (1, "applied", None),
        (2, "rejected", "content_hash_mismatch"),
        (3, "rejected", "payload_too_large"),
        (4, "rejected", "invalid_command_result"),
        (5, "rejected", "invalid_entry"),
        (6, "rejected", "invalid_text"),
        (7, "applied", None),
    ]
    assert body["outbox_through"] == 7
    held = {k[2] for k in backend.state.messages}
    assert held == {1, 7}
    reasons = sorted((k[3], q["item"].reason) for k, q in backend.state.quarantine.items())
    assert [seq for seq, _ in reasons] == [2, 3, 4, 5, 6]
    assert all(
        q["status"] == "open" and k[2] == "outbox" for k, q in backend.state.quarantine.items()
    )
    assert backend.state.marks[(term.device_id, term.stream)] == 7
    # the same batch again: the good ones are duplicates, the quarantine is not doubled
    again = ok(service, term, outbox=batch)
    assert [s for _, s, _ in statuses(again)] == ["duplicate"] + ["rejected"] * 5 + ["duplicate"]
    assert len(backend.state.quarantine) == 5 and again["outbox_through"] == 7


def test_outbox__same_key_other_content_is_a_conflict_quarantined_counted_and_logged(
    service, backend, term, caplog
):
    ok(service, term, outbox=[outbox_entry(1), outbox_entry(2)])
    caplog.set_level(logging.ERROR, logger="sync.server")
    changed = outbox_entry(1, payload={"amount": 999, "currency": "EUR"})
    body = ok(service, term, outbox=[changed, outbox_entry(2), outbox_entry(3)])
    assert statuses(body) == [
        (1, "conflict", "content_conflict"),
        (2, "duplicate", None),
        (3, "applied", None),
    ]
    assert body["outbox_through"] == 3
    assert backend.state.messages[(term.device_id, term.stream, 1)]["payload"]["amount"] == 100
    assert backend.state.devices[term.device_id].conflicts == 1
    [q] = backend.state.quarantine.values()
    assert q["item"].reason == "content_conflict" and '"amount": 999' in q["item"].entry
    assert any(r.levelno == logging.ERROR and "conflict" in r.getMessage() for r in caplog.records)
    ok(service, term, outbox=[changed])  # sent again: one quarantine row, one conflict
    assert backend.state.devices[term.device_id].conflicts == 1


def test_outbox__one_seq_twice_in_a_batch_is_applied_once_then_duplicate_or_conflict(
    service, backend, term
):
    other = outbox_entry(1, payload={"amount": 5, "currency": "EUR"})
    body = ok(service, term, outbox=[outbox_entry(1), outbox_entry(1), other])
    assert [s for _, s, _ in statuses(body)] == ["applied", "duplicate", "conflict"]


def test_outbox__the_mark_is_the_contiguous_settled_prefix_and_never_goes_down(
    service, backend, term
):
    body = ok(service, term, outbox=[outbox_entry(9), outbox_entry(3), outbox_entry(4)])
    assert body["outbox_through"] == 9  # every entry settled: the batch's highest seq
    assert backend.state.marks[(term.device_id, term.stream)] == 9
    body = ok(service, term, outbox=[outbox_entry(2)])
    assert body["outbox_through"] == 2  # never a seq not in the batch
    assert backend.state.marks[(term.device_id, term.stream)] == 9
    assert ok(service, term)["outbox_through"] is None


def test_outbox__a_new_stream_is_a_new_key_space(service, backend, term):
    ok(service, term, outbox=[outbox_entry(1)])
    term.stream = "f" * 32  # a re-flashed database
    changed = outbox_entry(1, payload={"amount": 7, "currency": "EUR"})
    assert statuses(ok(service, term, outbox=[changed])) == [(1, "applied", None)]


def test_outbox__a_command_result_sets_the_command_status_once(service, backend, term, clock):
    queued = service.queue_command(term.device_id, "request_health")
    result = {
        "command_id": queued.command_id,
        "seq": queued.seq,
        "status": "refused",
        "reason": "expired",
        "at": clock.now(),
    }
    body = ok(service, term, outbox=[outbox_entry(1, topic="command_result", payload=result)])
    assert statuses(body) == [(1, "applied", None)]
    command = backend.state.commands[queued.command_id]
    assert (command["status"], command["reason"]) == ("refused", "expired")
    unknown = dict(result, command_id="cmd_nope")
    body = ok(service, term, outbox=[outbox_entry(2, topic="command_result", payload=unknown)])
    assert statuses(body) == [(2, "rejected", "unknown_command")]


# --- audit ---------------------------------------------------------------------------------


def chain_of(body: dict[str, Any]) -> tuple[str, int, int | None]:
    return body["chain"]["state"], body["chain"]["head_seq"], body["chain"]["first_bad_seq"]


def test_audit__the_chain_continues_across_batches_and_duplicates_are_fine(service, backend, term):
    first = ok(service, term, audit=term.grow_audit(3))
    assert (first["audit_through"], chain_of(first)) == (3, ("ok", 3, None))
    second = ok(service, term, audit=term.grow_audit(2))
    assert (second["audit_through"], chain_of(second)) == (5, ("ok", 5, None))
    again = ok(service, term, audit=term.audit_rows)  # all five again (an ack was lost)
    assert (again["audit_through"], chain_of(again)) == (5, ("ok", 5, None))
    assert len(backend.state.audit) == 5 and not backend.state.quarantine
    assert ok(service, term)["audit_through"] is None
    assert service.verify_device_audit(term.device_id).ok


def broken(service, backend, term, rows) -> dict[str, Any]:
    body = ok(service, term, audit=rows)
    assert body["chain"]["state"] == "broken"
    return body


def test_audit__an_edited_row_breaks_the_chain_and_is_not_acknowledged(service, backend, term):
    ok(service, term, audit=term.grow_audit(3))
    rows = term.grow_audit(3)
    rows[0] = rows[0] | {"detail": {"n": 4, "amount": 1}}  # edited after it was hashed
    body = broken(service, backend, term, rows)
    assert chain_of(body) == ("broken", 3, 4) and body["chain"]["reason"].startswith("edit")
    assert body["audit_through"] == 3  # the device keeps rows 4.. for an operator
    assert {k[3] for k, q in backend.state.quarantine.items() if k[2] == "audit"} == {4, 5, 6}
    # the honest rows later: the chain stays broken, they are quarantined, not taken
    body = ok(service, term, audit=term.audit_rows[3:])
    assert chain_of(body) == ("broken", 3, 4) and body["audit_through"] == 3
    assert len(backend.state.audit) == 3
    report = service.verify_device_audit(term.device_id)
    assert not report.ok and report.chains[0].recorded and report.chains[0].first_bad_seq == 4


def test_audit__a_gap_is_a_break_at_the_first_missing_seq(service, backend, term):
    ok(service, term, audit=term.grow_audit(3))
    rows = term.grow_audit(3)
    body = broken(service, backend, term, rows[1:])
    assert chain_of(body) == ("broken", 3, 4) and body["chain"]["reason"].startswith("gap")


def test_audit__a_fork_is_a_break(service, backend, term, clock):
    ok(service, term, audit=term.grow_audit(3))
    forked = Terminal(clock, term.stream)
    forked.audit_rows = [term.audit_rows[0]]
    [other_row_2] = forked.grow_audit(1, tag="other")  # hashes right, links to row 1
    body = broken(service, backend, term, [other_row_2])
    assert chain_of(body) == ("broken", 3, 2) and body["chain"]["reason"].startswith("fork")
    assert body["audit_through"] == 3


def test_audit__rows_out_of_order_are_a_reorder(service, backend, term):
    rows = term.grow_audit(3)
    body = broken(service, backend, term, [rows[0], rows[2], rows[1]])
    assert chain_of(body) == ("broken", 1, 2) and body["chain"]["reason"].startswith("reorder")
    assert body["audit_through"] == 1


def test_audit__a_row_that_does_not_link_to_the_head_is_a_break(service, backend, term, clock):
    ok(service, term, audit=term.grow_audit(2))
    stranger = Terminal(clock)
    stranger.grow_audit(2, tag="elsewhere")
    body = broken(service, backend, term, [stranger.grow_audit(1)[0]])  # seq 3, other chain
    assert chain_of(body) == ("broken", 2, 3) and body["chain"]["reason"].startswith("reorder")


def test_audit__with_nothing_held_the_chain_starts_at_the_reported_base(service, backend, term):
    rows = term.grow_audit(12)
    base = {"seq": 10, "hash": rows[9]["hash"]}
    body = ok(service, term, audit=rows[10:], audit_base=base)
    assert (body["audit_through"], chain_of(body)) == (12, ("ok", 12, None))
    assert service.verify_device_audit(term.device_id).ok
    other = enroll(service, service.clock)  # no base: from genesis, so row 11 is a gap
    other.audit_rows = []
    rows = other.grow_audit(12)
    body = broken(service, backend, other, rows[10:])
    assert chain_of(body) == ("broken", 0, 1)


def test_audit__a_bad_row_breaks_the_chain_but_the_outbox_still_flows(service, backend, term):
    rows = term.grow_audit(2)
    rows[1] = rows[1] | {"event": "e" * (wire.MAX_FIELD_CHARS + 1)}
    body = ok(service, term, audit=rows, outbox=[outbox_entry(1)])
    assert chain_of(body) == ("broken", 1, 2) and body["chain"]["reason"].startswith("invalid_row")
    assert statuses(body) == [(1, "applied", None)]


def test_audit__rows_of_two_chains_in_one_request_are_refused(service, backend, term):
    rows = term.grow_audit(2)
    rows[1] = rows[1] | {"chain": 1}
    status, body = sync(service, term, audit=rows)
    assert (status, body["error"]["code"]) == (422, "mixed_audit_chains")


def test_verify_device_audit__an_edit_in_what_the_cloud_holds_is_found(service, backend, term):
    ok(service, term, audit=term.grow_audit(5))
    key = (term.device_id, term.stream, 0, 3)
    row = backend.state.audit[key]
    backend.state.audit[key] = row.model_copy(update={"detail": {"n": 99}})
    report = service.verify_device_audit(term.device_id)
    assert not report.ok
    [chain] = report.chains
    assert (chain.first_bad_seq, chain.recorded) == (3, False)
    assert "edited" in (chain.reason or "")
    with pytest.raises(ServiceError, match="no device"):
        service.verify_device_audit("dev_nope")


# --- heartbeat -----------------------------------------------------------------------------


def test_heartbeat__the_latest_is_stored_with_last_seen(service, backend, term, clock):
    ok(service, term)
    clock.advance(30)
    hb = term.request()["heartbeat"] | {"outbox_depth": 4, "last_error": "printer \x00jam"}
    ok(service, term, heartbeat=hb)
    device = service.device(term.device_id)
    assert device.last_seen_at == clock.now()
    assert device.heartbeat is not None and device.heartbeat["outbox_depth"] == 4
    assert device.heartbeat["last_error"] == "printer \ufffdjam"  # storable as jsonb


# --- commands ------------------------------------------------------------------------------


def opened(service: SyncService, body: dict[str, Any]) -> list[wire.Command]:
    public = signing.load_public(service.public_key)
    return [signing.open_envelope(public, wire.Envelope(**e)) for e in body["commands"]]


def test_commands__delivered_in_seq_order_until_the_device_has_taken_them(service, backend, term):
    first = service.queue_command(term.device_id, "request_health")
    second = service.queue_command(
        term.device_id, "update_config", NewDocument({"offline_limit_minor": 5000})
    )
    assert (first.seq, second.seq) == (1, 2)
    commands = opened(service, ok(service, term))
    assert [(c.seq, c.action) for c in commands] == [(1, "request_health"), (2, "update_config")]
    assert commands[1].document == wire.Document(
        kind="config", version=1, content={"offline_limit_minor": 5000}
    )
    assert all(c.device_id == term.device_id for c in commands)
    assert backend.state.commands[first.command_id]["status"] == "delivered"
    assert [c.seq for c in opened(service, ok(service, term, commands_through=1))] == [2]
    assert opened(service, ok(service, term, commands_through=2)) == []


def test_commands__an_expired_command_is_never_delivered(service, backend, term, clock):
    gone = service.queue_command(term.device_id, "request_health", ttl_s=10)
    clock.advance(11)
    live = service.queue_command(term.device_id, "request_health")
    assert [c.seq for c in opened(service, ok(service, term))] == [live.seq]
    assert backend.state.commands[gone.command_id]["status"] == "expired"


def test_commands__at_most_fifty_a_time(service, term):
    for _ in range(55):
        service.queue_command(term.device_id, "request_health")
    assert len(ok(service, term)["commands"]) == 50
    assert [c.seq for c in opened(service, ok(service, term, commands_through=50))] == [
        51,
        52,
        53,
        54,
        55,
    ]


def test_queue_command__document_versions_only_grow_per_kind(service, term, clock):
    other = enroll(service, clock)
    q = service.queue_command
    assert q(term.device_id, "update_config", NewDocument({"a": 1})).document_version == 1
    assert q(term.device_id, "update_config", NewDocument({"a": 2})).document_version == 2
    assert q(term.device_id, "activate_policy", NewDocument({"p": 1})).document_version == 1
    # one document to many devices: the version given names the same content
    assert q(other.device_id, "update_config", NewDocument({"a": 2}, version=2)).seq == 1
    with pytest.raises(ServiceError, match="not above the newest") as exc:
        q(term.device_id, "update_config", NewDocument({"a": 3}, version=2))
    assert exc.value.code == "stale_version"
    with pytest.raises(ServiceError, match="exists with other content"):
        q(term.device_id, "update_config", NewDocument({"zzz": 1}, version=1))
    assert (
        q(term.device_id, "update_config", NewDocument({"a": 1}, version=7)).document_version == 7
    )
    # a rollback is a new version with the old content
    assert q(term.device_id, "update_config", NewDocument({"a": 1})).document_version == 8
    # a document stating its own version (a policy) goes under it, and must agree
    policy = {"version": 5, "name": "p", "rules": []}
    assert q(term.device_id, "activate_policy", NewDocument(policy)).document_version == 5
    with pytest.raises(ServiceError, match="says version 6, not 7") as exc:
        q(term.device_id, "activate_policy", NewDocument(policy | {"version": 6}, version=7))
    assert exc.value.code == "bad_document"
    with pytest.raises(ServiceError) as exc:
        q(term.device_id, "activate_policy", NewDocument(policy | {"rules": [1]}))
    assert exc.value.code == "stale_version"


@pytest.mark.parametrize(
    ("action", "document", "code"),
    [
        ("reboot", None, "bad_action"),
        ("request_health", NewDocument({"a": 1}), "bad_document"),
        ("update_config", None, "bad_document"),
        ("update_config", NewDocument({"a": 1}, kind="policy"), "bad_document"),
    ],
)
def test_queue_command__bad_requests_say_what_is_wrong(service, term, action, document, code):
    with pytest.raises(ServiceError) as exc:
        service.queue_command(term.device_id, action, document)
    assert exc.value.code == code


def test_queue_command__unknown_and_revoked_devices_are_refused(service, term):
    with pytest.raises(ServiceError) as exc:
        service.queue_command("dev_nope", "request_health")
    assert exc.value.code == "unknown_device"
    service.revoke_device(term.device_id)
    with pytest.raises(ServiceError) as exc:
        service.queue_command(term.device_id, "request_health")
    assert exc.value.code == "device_revoked"


# --- bad bodies ----------------------------------------------------------------------------


def raw_sync(service, backend, term, body: bytes, gzipped: bool = True, **headers: str):
    method, path, signed, _ = term.signed(b"", gzipped=gzipped)
    signed = term.sign(body, gzipped=gzipped) | headers
    before = copy.deepcopy(backend.state.messages)
    status, answer = service.sync(method, path, signed, body)
    assert backend.state.messages == before
    assert set(answer["error"]) == {"code", "message", "field"}
    return status, answer["error"]["code"]


def test_bad_body__each_is_a_4xx_with_the_error_shape_and_stores_nothing(service, backend, term):
    good = json.dumps(term.request([outbox_entry(1)])).encode()
    bomb = gzip.compress(b" " * (wire.MAX_BATCH_BYTES + 10))
    cases = {
        "truncated gzip": (gzip.compress(good)[:-8], True, {}, (400, "bad_gzip")),
        "not gzip": (b"plain bytes", True, {}, (400, "bad_gzip")),
        "gzip then garbage": (gzip.compress(good) + b"xx", True, {}, (400, "bad_gzip")),
        "gzip bomb": (bomb, True, {}, (413, "batch_too_large")),
        "raw too big": (b" " * (wire.MAX_BATCH_BYTES + 1), False, {}, (413, "batch_too_large")),
        "malformed json": (gzip.compress(b"{oops"), True, {}, (400, "malformed_json")),
        "too deep": (gzip.compress(b"[" * 100_000), True, {}, (400, "too_deep")),
        "unknown kind": (gzip.compress(b'{"kind": "sync_v9"}'), True, {}, (400, "unknown_kind")),
        "not an object": (gzip.compress(b"[1]"), True, {}, (400, "wrong_type")),
        "brotli": (good, False, {"content-encoding": "br"}, (415, "unsupported_encoding")),
    }
    for name, (body, gzipped, extra, expected) in cases.items():
        assert raw_sync(service, backend, term, body, gzipped, **extra) == expected, name


def test_bad_body__too_many_entries_or_an_unkeyable_entry_refuse_the_request(
    service, backend, term
):
    many = term.request([outbox_entry(i) for i in range(1, wire.MAX_BATCH_ENTRIES + 2)])
    assert raw_sync(service, backend, term, gzip.compress(json.dumps(many).encode())) == (
        413,
        "batch_too_large",
    )
    no_seq = term.request([outbox_entry(1), {"topic": "sale"}])
    assert raw_sync(service, backend, term, gzip.compress(json.dumps(no_seq).encode())) == (
        422,
        "invalid_field",
    )
    bad_heartbeat = term.request(heartbeat={"at": "now"})
    assert (
        raw_sync(service, backend, term, gzip.compress(json.dumps(bad_heartbeat).encode()))[0]
        == 422
    )


# --- server faults -------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["device", "insert_messages", "insert_audit", "take_commands"])
def test_fault__a_backend_fault_is_503_with_retry_after_and_nothing_of_the_sync_is_kept(
    service, backend, term, op
):
    service.queue_command(term.device_id, "request_health")
    before = copy.deepcopy(backend.state)
    backend.fail_on = op
    request = term.signed(term.request([outbox_entry(1)], term.grow_audit(2)))
    status, body = service.sync(*request)
    assert status == 503 and body["error"]["code"] == "unavailable" and body["retry_after"] > 0
    assert backend.state == before
    # the device sends it again (a new signature): taken whole
    body = ok(service, term, outbox=[outbox_entry(1)], audit=term.audit_rows)
    assert statuses(body) == [(1, "applied", None)] and body["audit_through"] == 2
    assert len(body["commands"]) == 1


def test_fault__enroll_on_a_backend_fault_is_503_and_the_token_stays_usable(
    service, backend, clock
):
    token = service.create_enroll_token("s")
    backend.fail_on = "add_device"
    status, body = Terminal(clock).enroll(service, token.token)
    assert status == 503 and body["error"]["code"] == "unavailable"
    assert Terminal(clock).enroll(service, token.token)[0] == 200


def test_service__without_a_signing_key_enroll_and_commands_say_so(backend, clock):
    service = SyncService(backend, clock, None)
    with pytest.raises(ServiceError, match="signing key"):
        service.queue_command("dev_x", "request_health")
    assert service.list_devices() == []


def test_chain_record_defaults_are_genesis():
    from sync.server import ChainRecord

    record = ChainRecord()
    assert (record.head_seq, record.head_hash, record.state) == (0, GENESIS, "ok")
    assert replace(record, head_seq=3).head_seq == 3


# --- the fast hashes are the canonical ones -------------------------------------------------

GOLDEN = Path(__file__).parents[1] / "golden"

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _row(detail: dict[str, Any], at: float, seq: int = 7, chain: int = 0) -> wire.AuditEntry:
    event = AuditEvent('run-é"\\', "step_completed", at, "charge", detail)
    h = link("a" * 64, seq, event, stream=chain)
    return wire.AuditEntry(
        seq=seq, chain=chain, run_id=event.run_id, event=event.event, step=event.step,
        detail=detail, at=at, prev_hash="a" * 64, hash=h,
    )  # fmt: skip


@given(
    st.dictionaries(st.text(max_size=6), _json, max_size=5), st.floats(0, 4e9), st.integers(0, 9)
)
def test_fast_audit_hash__is_edge_engine_audit_link(detail, at, chain):
    row = _row(detail, at, chain=chain)
    assert audit_hash(row) == row.hash


@given(_json, st.floats(0, 4e9))
def test_fast_outbox_hash__is_wire_content_hash(payload, created_at):
    entry = wire.OutboxEntry(
        seq=1, message_id="m\u2028", run_id=None, step="s", topic="t", payload=payload,
        created_at=created_at, content_hash="0" * 64,
    )  # fmt: skip
    assert outbox_hash(entry) == wire.entry_hash(entry)


def test_fast_audit_hash__matches_the_golden_vectors():
    vectors = json.loads((GOLDEN / "audit_hash_v2.json").read_text())["vectors"]
    for v in vectors:
        e = v["event"]
        row = wire.AuditEntry(
            seq=v["seq"], chain=v["stream"], run_id=e["run_id"], event=e["event"],
            step=e["step"], detail=e["detail"], at=e["at"], prev_hash=v["prev_hash"],
            hash=v["hash"],
        )  # fmt: skip
        assert audit_hash(row) == v["hash"], v["name"]


_risky = st.sampled_from(["\x00", "\ud800", "\udbff", "\udfff", "\\", "u", "0", "\u00ed"])


@given(st.text(alphabet=st.characters() | _risky))
def test_clean_text__never_passes_a_string_that_cannot_be_stored(text):
    for body in (
        json.dumps({"s": text}).encode("utf-8", "surrogatepass"),
        json.dumps({"s": text}, ensure_ascii=False).encode("utf-8", "surrogatepass"),
    ):
        if clean_text(body):
            assert text_problem(json.loads(body)) is None
