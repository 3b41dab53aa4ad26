"""The device's side of one sync exchange (``sync.device.client``): the request it
builds (bounded, gzip'd, signed over the exact bytes sent), what it acknowledges (never
beyond what it sent) and what an error leaves (the queue untouched). The server is a
``httpx.MockTransport`` answering fixed responses; the real one is the lead's to wire."""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from edge.engine import FakeClock
from edge.engine.records import AuditEvent, CommandRecord, OutboxMessage
from edge.store.memory import MemoryStore
from edge.terminal.service.terminal import offline_acknowledgement
from sync import signing, wire
from sync.device.client import SyncClient
from sync.device.errors import SyncRefused, SyncUnavailable
from sync.device.identity import DeviceIdentity

T0 = 1_800_000_000.0
DEVICE_KEY = signing.load_private(bytes(range(100, 132)))
CP_KEY = signing.load_private(bytes(range(32)))
OK_CHAIN = wire.ChainState(state="ok", head_seq=0)


class Terminal:
    """The hooks, over a real store: acknowledge goes through the store as the terminal's."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.last_error: str | None = None
        self.health_error: str | None = "x" * 2000
        self.acks: list[tuple[int, int | None]] = []
        self.refreshed = 0

    def health(self) -> dict[str, Any]:
        return {
            "storage": {"state": "high_water", "used_percent": 81.5},
            "outbox_depth": self.store.outbox_stats().depth,
            "outbox_oldest_age_s": 12.5,
            "offline_exposure_minor": 4200,
            "offline_count": 2,
            "policy_version": 3,
            "config_version": 7,
            "last_error": self.health_error,
        }

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        self.acks.append((outbox_through, audit_through))
        ack = offline_acknowledgement(self.store, outbox_through, audit_through)
        return self.store.acknowledge(ack).messages

    def refresh_documents(self) -> None:
        self.refreshed += 1

    def active_policy_version(self) -> int | None:
        return None


class Cloud:
    """Answers every sync with ``answer(request, decoded)``; keeps what it was sent."""

    def __init__(self, answer: Callable[[httpx.Request, wire.SyncRequest], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[tuple[httpx.Request, wire.SyncRequest]] = []

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            body = request.read()
            decoded = wire.decode(gzip.decompress(body), wire.SyncRequest)
            self.requests.append((request, decoded))
            return self.answer(request, decoded)

        return httpx.MockTransport(handle)


def take_all(request: httpx.Request, sent: wire.SyncRequest, **extra: Any) -> httpx.Response:
    """Every entry applied: marks at the last seq of each list."""
    resp = wire.SyncResponse(
        protocol_version=1,
        server_time=T0,
        results=[wire.EntryResult(seq=e.seq, status="applied") for e in sent.outbox],
        outbox_through=sent.outbox[-1].seq if sent.outbox else None,
        audit_through=sent.audit[-1].seq if sent.audit else None,
        chain=OK_CHAIN,
        **extra,
    )
    return httpx.Response(200, content=wire.encode(resp))


def fill(store: MemoryStore, messages: int, events: int = 0, size: int = 10) -> None:
    """Queue outbox messages and audit rows (as a forged command's would be: no ledger)."""
    store.record_command(
        CommandRecord(
            seq=None,
            command_id="",
            action="fill",
            status="refused",
            reason=None,
            issued_at=T0,
            at=T0,
            audit=[AuditEvent(None, "e", T0 + n, None, {"n": n}) for n in range(events)],
            outbox=[
                OutboxMessage(
                    uuid.uuid4().hex,
                    f"run-{n}",
                    "sale",
                    "payment",
                    {"n": n, "pad": "p" * size},
                    T0 + n,
                )
                for n in range(messages)
            ],
        )
    )


class Rig:
    def __init__(self, answer=take_all, *, url: str = "http://cp.test", **kw: Any) -> None:
        self.store = MemoryStore()
        self.terminal = Terminal(self.store)
        self.cloud = Cloud(answer)
        self.http = httpx.Client(transport=self.cloud.transport())
        identity = DeviceIdentity("dev-1", "S-1", None, signing.public_text(CP_KEY), url, T0)
        self.client = SyncClient(
            identity,
            DEVICE_KEY,
            self.store,
            self.terminal,
            FakeClock(T0 + 100),
            self.http,
            binary_version="1.2.3",
            **kw,
        )


# --- the request ---------------------------------------------------------------------------


def test_request__is_gzip_and_signed_over_the_exact_bytes_sent():
    rig = Rig()
    fill(rig.store, 2, 3)
    rig.client.sync_once()
    ((req, _),) = rig.cloud.requests
    assert (req.method, str(req.url)) == ("POST", "http://cp.test/v1/sync")
    assert req.headers["content-encoding"] == "gzip"
    body = req.content
    device, time, nonce, signature = signing.request_headers(req.headers)
    assert device == "dev-1" and float(time) == T0 + 100 and len(nonce) == 32
    signed = signing.request_bytes("POST", "/v1/sync", body, time, nonce, device)
    assert signing.verify(DEVICE_KEY.public_key(), wire.b64d(signature), signed)
    flipped = body[:-1] + bytes([body[-1] ^ 1])  # one changed byte anywhere fails
    wrong = signing.request_bytes("POST", "/v1/sync", flipped, time, nonce, device)
    assert not signing.verify(DEVICE_KEY.public_key(), wire.b64d(signature), wrong)


def test_request__carries_the_stream_entries_with_content_hashes_heartbeat_and_high_water():
    rig = Rig()
    fill(rig.store, 2, 3)
    rig.client.sync_once()
    ((_, sent),) = rig.cloud.requests
    assert sent.device_id == "dev-1" and sent.stream == rig.store.database_id()
    assert [e.seq for e in sent.outbox] == [1, 2]
    assert all(e.content_hash == wire.entry_hash(e) for e in sent.outbox)
    assert [(a.seq, a.event) for a in sent.audit] == [(1, "e"), (2, "e"), (3, "e")]
    assert [a.hash for a in sent.audit] == [r.hash for r in rig.store.audit_rows()]
    assert sent.audit_base is None and sent.commands_through == 0
    hb = sent.heartbeat
    assert (hb.binary_version, hb.config_version, hb.policy_version) == ("1.2.3", 7, 3)
    assert (hb.storage_state, hb.storage_used_percent, hb.outbox_depth) == ("high_water", 81.5, 2)
    assert (hb.offline_exposure_minor, hb.offline_count, hb.outbox_oldest_age_s) == (4200, 2, 12.5)
    assert hb.last_error == "x" * 1024  # cut to the wire's bound, not refused


def test_request__the_heartbeat_leaves_out_a_sync_failure_the_exchange_itself_disproves():
    rig = Rig()
    rig.terminal.health_error = "sync: sync_unavailable: cannot reach the control plane"
    assert rig.client.heartbeat(T0).last_error is None  # arriving, it proves sync works
    rig.terminal.health_error = "printer_jam: paper out"
    assert rig.client.heartbeat(T0).last_error == "printer_jam: paper out"


def test_request__a_url_with_a_path_signs_that_path():
    rig = Rig(url="http://cp.test/fleet/")
    rig.client.sync_once()
    ((req, _),) = rig.cloud.requests
    assert str(req.url) == "http://cp.test/fleet/v1/sync"
    device, time, nonce, signature = signing.request_headers(req.headers)
    signed = signing.request_bytes("POST", "/fleet/v1/sync", req.content, time, nonce, device)
    assert signing.verify(DEVICE_KEY.public_key(), wire.b64d(signature), signed)


def test_request__is_bounded_in_entries_and_says_more_is_waiting():
    rig = Rig(max_entries=3)
    fill(rig.store, 5, 4)
    outcome = rig.client.sync_once()
    ((_, sent),) = rig.cloud.requests
    assert ([e.seq for e in sent.outbox], [a.seq for a in sent.audit]) == ([1, 2, 3], [1, 2, 3])
    assert outcome.more
    outcome = rig.client.sync_once()
    assert [e.seq for e in rig.cloud.requests[1][1].outbox] == [4, 5]
    assert [a.seq for a in rig.cloud.requests[1][1].audit] == [4]
    assert not outcome.more and rig.store.outbox_stats().depth == 0


def test_request__is_bounded_in_bytes_but_never_below_one_entry():
    rig = Rig(max_bytes=2500)
    fill(rig.store, 4, size=1000)
    outcome = rig.client.sync_once()
    assert [e.seq for e in rig.cloud.requests[0][1].outbox] == [1, 2]
    assert outcome.more
    tiny = Rig(max_bytes=1)
    fill(tiny.store, 2, size=1000)
    assert tiny.client.sync_once().outbox_sent == 1  # one too big still goes


def test_request__audit_resumes_after_the_acknowledged_row_and_names_the_retention_base():
    rig = Rig()
    fill(rig.store, 0, 3)
    rig.client.sync_once()  # rows 1..3 acknowledged
    rig.store.compact(before=T0 + 10_000)  # retention removes what the cloud holds
    fill(rig.store, 0, 2)
    rig.client.sync_once()
    sent = rig.cloud.requests[1][1]
    assert [a.seq for a in sent.audit] == [4, 5]
    kept = rig.store.audit_retention()
    assert kept is not None and kept.base_seq == 3
    assert sent.audit_base == wire.AuditBase(seq=3, hash=kept.base_hash)
    assert sent.audit[0].prev_hash == kept.base_hash


# --- the answer ----------------------------------------------------------------------------


def test_answer__the_marks_are_acknowledged_through_the_terminal():
    rig = Rig()
    fill(rig.store, 3, 2)
    outcome = rig.client.sync_once()
    assert rig.terminal.acks == [(3, 2)]
    assert (outcome.outbox_through, outcome.audit_through, outcome.acknowledged) == (3, 2, 3)
    assert outcome.results == {"applied": 3}
    assert rig.store.outbox_stats().depth == 0
    assert rig.store.audit_retention().acked_seq == 2


def test_answer__a_mark_beyond_what_was_sent_is_capped_at_what_was_sent():
    def overreach(request, sent):
        resp = wire.SyncResponse(
            protocol_version=1,
            server_time=T0,
            outbox_through=999,
            audit_through=999,
            chain=OK_CHAIN,
        )
        return httpx.Response(200, content=wire.encode(resp))

    rig = Rig(overreach, max_entries=2)
    fill(rig.store, 5, 3)
    outcome = rig.client.sync_once()
    assert (outcome.outbox_through, outcome.audit_through) == (2, 2)
    assert [m.seq for m in rig.store.outbox()] == [3, 4, 5]


def test_answer__commands_are_taken_after_the_acknowledgement():
    cmd = wire.Command(
        schema_version=1,
        command_id="c-1",
        device_id="dev-1",
        seq=1,
        action="update_config",
        issued_at=T0,
        expires_at=T0 + 3600,
        document=wire.Document(kind="config", version=1, content={"risk": {"velocity_max": 6}}),
    )

    def with_command(request, sent):
        return take_all(request, sent, commands=[signing.seal(CP_KEY, cmd)])

    rig = Rig(with_command)
    outcome = rig.client.sync_once()
    assert [(c.status, c.seq) for c in outcome.commands] == [("applied", 1)]
    assert rig.store.active_document("config") == (1, {"risk": {"velocity_max": 6}})
    assert rig.terminal.refreshed == 1
    # its result waits in the outbox: the runner is told to sync again at once
    assert outcome.more and "command_result" in [m.topic for m in rig.store.outbox()]
    after = rig.client.sync_once()
    assert rig.cloud.requests[1][1].commands_through == 1
    assert [m.topic for m in rig.store.outbox()] == []  # the result went up, acknowledged
    assert not after.more  # nothing new came: the next sync waits its interval


# --- errors: the queue untouched ------------------------------------------------------------


def _untouched(rig: Rig, depth: int) -> None:
    assert rig.terminal.acks == []
    assert rig.store.outbox_stats().depth == depth
    assert rig.store.audit_retention() is None


@pytest.mark.parametrize("status", [503, 500, 429])
def test_error__a_server_fault_is_retryable(status):
    body = {"error": {"code": "unavailable", "message": "database down", "field": None}}
    rig = Rig(lambda r, s: httpx.Response(status, json=body))
    fill(rig.store, 2, 2)
    with pytest.raises(SyncUnavailable, match=f"{status} unavailable: database down") as info:
        rig.client.sync_once()
    assert info.value.retryable and info.value.server_code == "unavailable"
    _untouched(rig, 2)


@pytest.mark.parametrize(
    "fault",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("cut")],
)
def test_error__unreachable_timed_out_or_cut_is_retryable(fault):
    def fail(request, sent):
        raise fault

    rig = Rig(fail)
    fill(rig.store, 1)
    with pytest.raises(SyncUnavailable, match="cannot reach the control plane"):
        rig.client.sync_once()
    _untouched(rig, 1)


def test_error__a_4xx_is_refused_naming_the_servers_code_and_message():
    body = {"error": {"code": "unknown_device", "message": "no such device", "field": None}}
    rig = Rig(lambda r, s: httpx.Response(401, json=body))
    fill(rig.store, 1, 1)
    with pytest.raises(SyncRefused, match="401 unknown_device: no such device") as info:
        rig.client.sync_once()
    assert not info.value.retryable and info.value.status == 401
    _untouched(rig, 1)


def test_error__a_200_that_is_no_sync_response_acknowledges_nothing():
    rig = Rig(lambda r, s: httpx.Response(200, content=b"<html>proxy</html>"))
    fill(rig.store, 1)
    with pytest.raises(SyncUnavailable, match="not a sync response"):
        rig.client.sync_once()
    _untouched(rig, 1)


def test_request__the_device_key_is_never_sent_nor_logged(caplog):
    import base64
    import logging

    caplog.set_level(logging.DEBUG)
    rig = Rig()
    fill(rig.store, 2, 2)
    rig.client.sync_once()
    raw = signing.private_bytes(DEVICE_KEY)
    forms = [raw.hex(), base64.b64encode(raw).decode()[:40], wire.b64e(raw)[:40]]
    ((req, _),) = rig.cloud.requests
    sent = gzip.decompress(req.content) + req.content + str(req.headers).encode()
    for form in forms:
        assert form not in caplog.text and form.encode() not in sent
    assert raw not in sent
