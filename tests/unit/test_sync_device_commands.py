"""The control plane's commands on the terminal (``sync.device.commands``): each refusal
reason, each action's effect in the transaction of its ledger row, and a replay after a
restart refused (DESIGN.md invariants 8 and 10)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge.engine import FakeClock
from edge.engine.records import Acknowledgement
from edge.errors import LimitExceeded
from edge.store.memory import MemoryStore
from edge.store.sqlite import SqliteStore
from sync import signing, wire
from sync.device.commands import CommandProcessor
from sync.device.identity import DeviceIdentity

T0 = 1_800_000_000.0
DEVICE = "dev-1"
CP_KEY = signing.load_private(bytes(range(32)))  # the control plane's (a fixed test key)
POLICY = {
    "version": 4,
    "name": "cloud",
    "rules": [{"id": "big", "type": "amount_over", "max_minor": 90_000, "action": "decline"}],
}


class FakeTerminal:
    def __init__(self) -> None:
        self.last_error: str | None = None
        self.refreshed = 0
        self.policy_version: int | None = None

    def health(self) -> dict[str, Any]:
        return {"device_id": DEVICE, "outbox_depth": 3, "policy_version": self.policy_version}

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        raise AssertionError("commands never acknowledge")

    def refresh_documents(self) -> None:
        self.refreshed += 1

    def active_policy_version(self) -> int | None:
        return self.policy_version


def identity() -> DeviceIdentity:
    return DeviceIdentity(DEVICE, "S-1", "g-1", signing.public_text(CP_KEY), "http://cp", T0)


def envelope(
    seq: int,
    action: str = "request_health",
    document: dict[str, Any] | None = None,
    *,
    key=CP_KEY,
    device_id: str = DEVICE,
    schema_version: int = 1,
    issued_at: float = T0,
    expires_at: float = T0 + 3600,
    command_id: str | None = None,
) -> wire.Envelope:
    cmd = wire.Command(
        schema_version=schema_version,
        command_id=command_id or f"c-{seq}",
        device_id=device_id,
        seq=seq,
        action=action,  # type: ignore[arg-type]
        issued_at=issued_at,
        expires_at=expires_at,
        document=None if document is None else wire.Document(**document),
    )
    return signing.seal(key, cmd)


def config_doc(version: int, **risk: Any) -> dict[str, Any]:
    return {"kind": "config", "version": version, "content": {"risk": risk}}


def policy_doc(version: int = 4, **changes: Any) -> dict[str, Any]:
    return {
        "kind": "policy",
        "version": version,
        "content": {**POLICY, "version": version, **changes},
    }


class Rig:
    def __init__(self, store: Any, clock: FakeClock | None = None) -> None:
        self.store = store
        self.clock = clock or FakeClock(T0 + 10)
        self.terminal = FakeTerminal()
        self.processor = CommandProcessor(identity(), store, self.terminal, self.clock)

    def take(self, *envelopes: wire.Envelope) -> list[Any]:
        return self.processor.handle_all(envelopes)

    def audit(self) -> list[tuple[str, dict[str, Any]]]:
        return [(r.event, r.detail) for r in self.store.audit_rows()]

    def outbox(self, topic: str | None = None) -> list[Any]:
        return [m for m in self.store.outbox(limit=1000) if topic in (None, m.topic)]

    def results(self) -> list[wire.CommandResult]:
        return [wire.CommandResult.model_validate(m.payload) for m in self.outbox("command_result")]


@pytest.fixture
def rig() -> Rig:
    return Rig(MemoryStore())


def _nothing_but_one_refusal(rig: Rig, reason: str) -> None:
    assert rig.store.command_high_water() == 0
    assert rig.outbox() == []
    assert rig.store.active_document("config") is None
    ((event, detail),) = rig.audit()
    assert event == "command_refused" and detail["reason"] == reason


# --- applied ---------------------------------------------------------------------------


def test_update_config__stores_the_document_with_its_ledger_row_result_and_audit(rig):
    (out,) = rig.take(envelope(1, "update_config", config_doc(3, floor_limit_minor=1000)))
    assert (out.status, out.seq, out.document) == ("applied", 1, ("config", 3))
    assert rig.store.active_document("config") == (3, {"risk": {"floor_limit_minor": 1000}})
    assert rig.store.command_high_water() == 1
    assert rig.store.trusted_time() == T0
    ((event, detail),) = rig.audit()
    assert event == "command_applied"
    assert detail == {
        "command_id": "c-1",
        "seq": 1,
        "action": "update_config",
        "document": {"kind": "config", "version": 3},
    }
    (result,) = rig.results()
    assert (result.command_id, result.seq, result.status, result.reason) == (
        "c-1",
        1,
        "applied",
        None,
    )
    assert rig.terminal.refreshed == 1


def test_activate_policy__stores_the_policy_document(rig):
    (out,) = rig.take(envelope(1, "activate_policy", policy_doc(4)))
    assert (out.status, out.document) == ("applied", ("policy", 4))
    assert rig.store.active_document("policy") == (4, policy_doc(4)["content"])
    assert rig.terminal.refreshed == 1


def test_request_health__queues_the_health_with_the_result_and_no_document(rig):
    (out,) = rig.take(envelope(1))
    assert (out.status, out.document) == ("applied", None)
    (health,) = rig.outbox("health")
    assert health.payload == {"command_id": "c-1", **rig.terminal.health()}
    assert [r.status for r in rig.results()] == ["applied"]
    assert rig.terminal.refreshed == 0  # no document: nothing to put in force


# --- ignored: no ledger row -------------------------------------------------------------


def test_forged__signed_by_another_key_changes_nothing_but_one_audit_row(rig):
    other = signing.load_private(bytes(range(1, 33)))
    (out,) = rig.take(envelope(1, "update_config", config_doc(1), key=other))
    assert (out.status, out.reason, out.seq, out.command_id) == ("ignored", "forged", None, None)
    _nothing_but_one_refusal(rig, "forged")


def test_forged__a_changed_byte_in_the_signed_payload_changes_nothing(rig):
    good = envelope(1, "update_config", config_doc(1, floor_limit_minor=100))
    data = bytearray(wire.b64d(good.payload))
    data[data.index(b"100")] = ord("9")  # the amount, as an attacker would change it
    tampered = good.model_copy(update={"payload": wire.b64e(bytes(data))})
    (out,) = rig.take(tampered)
    assert (out.status, out.reason) == ("ignored", "forged")
    _nothing_but_one_refusal(rig, "forged")


def test_replayed__the_same_envelope_again_and_an_older_seq_are_ignored(rig):
    first = envelope(5, "update_config", config_doc(1))
    rig.take(first)
    before = (
        rig.store.command_high_water(),
        len(rig.outbox()),
        rig.store.active_document("config"),
    )
    (again, older) = rig.take(first, envelope(4, "update_config", config_doc(2)))
    assert (again.status, again.reason) == ("ignored", "replayed")
    assert (older.status, older.reason) == ("ignored", "replayed")
    after = (rig.store.command_high_water(), len(rig.outbox()), rig.store.active_document("config"))
    assert after == before == (5, 1, (1, {"risk": {}}))
    assert [e for e, _ in rig.audit()] == ["command_applied", "command_refused", "command_refused"]


def test_replayed__after_a_restart_of_the_terminal(tmp_path: Path):
    env = envelope(2, "update_config", config_doc(1, velocity_max=5))
    first = Rig(SqliteStore(tmp_path / "t.db"))
    assert first.take(env)[0].status == "applied"
    first.store.close()
    again = Rig(SqliteStore(tmp_path / "t.db"))  # a new process on the same database
    try:
        (out,) = again.take(env)
        assert (out.status, out.reason) == ("ignored", "replayed")
        assert again.store.command_high_water() == 2
        assert len(again.outbox("command_result")) == 1
        assert again.store.active_document("config") == (1, {"risk": {"velocity_max": 5}})
    finally:
        again.store.close()


# --- refused: a ledger row, the seq advances ------------------------------------------------


def _refused(rig: Rig, env: wire.Envelope, reason: str) -> None:
    high = rig.store.command_high_water()
    (out,) = rig.take(env)
    assert (out.status, out.reason) == ("refused", reason), out
    assert rig.store.command_high_water() > high  # the next command is not held up
    result = rig.results()[-1]
    assert result.status == "refused" and result.reason.startswith(reason + ": ")
    event, detail = rig.audit()[-1]
    assert (event, detail["reason"], detail["seq"]) == ("command_refused", reason, out.seq)
    assert rig.terminal.refreshed == 0


def test_misaddressed__refused(rig):
    _refused(rig, envelope(1, "update_config", config_doc(1), device_id="dev-2"), "misaddressed")
    assert rig.store.active_document("config") is None


def test_unsupported_schema__refused(rig):
    _refused(rig, envelope(1, schema_version=2), "unsupported_schema")


def test_expired__refused_by_this_terminals_clock(rig):
    _refused(rig, envelope(1, expires_at=rig.clock.now() - 1), "expired")


def test_expired__trusted_time_is_not_set_back_with_the_clock(rig):
    rig.take(envelope(1, issued_at=T0 + 1000, expires_at=T0 + 5000))
    rig.clock = FakeClock(T0)  # the clock was set back an hour... or an attacker did it
    rig.processor.clock = rig.clock
    _refused(rig, envelope(2, expires_at=T0 + 500), "expired")  # still valid by the clock


@pytest.mark.parametrize(
    "action, document, why",
    [
        ("update_config", None, "needs a config document, got none"),
        ("update_config", policy_doc(1), "needs a config document, got a policy document"),
        ("update_config", config_doc(1, floor_limit_minor=-1), "greater than or equal to 0"),
        ("update_config", config_doc(1, no_such_limit=1), "no_such_limit"),
        ("activate_policy", policy_doc(4, rules=[{"id": "x", "type": "nope"}]), "policy document"),
        ("activate_policy", {**policy_doc(4), "version": 5}, "the policy says version 4"),
        ("request_health", config_doc(1), "carries no document"),
    ],
)
def test_invalid_document__refused(rig, action, document, why):
    _refused(rig, envelope(1, action, document), "invalid_document")
    assert why in rig.results()[-1].reason
    assert rig.store.active_document("config") is None
    assert rig.store.active_document("policy") is None


def test_stale_version__an_equal_or_lower_version_is_refused_a_higher_one_applies(rig):
    rig.take(envelope(1, "update_config", config_doc(2, velocity_max=4)))
    rig.terminal.refreshed = 0
    _refused(rig, envelope(2, "update_config", config_doc(2, velocity_max=9)), "stale_version")
    _refused(rig, envelope(3, "update_config", config_doc(1, velocity_max=9)), "stale_version")
    assert rig.store.active_document("config") == (2, {"risk": {"velocity_max": 4}})
    # A rollback is a new version with the old content.
    (out,) = rig.take(envelope(4, "update_config", config_doc(3)))
    assert out.status == "applied" and rig.store.active_document("config") == (3, {"risk": {}})


def test_stale_version__a_policy_not_above_the_terminals_own_is_refused(rig):
    rig.terminal.policy_version = 4  # the policy file's, activated on the terminal
    _refused(rig, envelope(1, "activate_policy", policy_doc(4)), "stale_version")
    assert rig.take(envelope(2, "activate_policy", policy_doc(5)))[0].status == "applied"


def test_undecodable__authentic_bytes_of_an_unknown_action_are_refused_on_their_seq(rig):
    raw = {
        "kind": "command",
        "schema_version": 1,
        "command_id": "c-7",
        "device_id": DEVICE,
        "seq": 7,
        "action": "reboot",
        "issued_at": T0,
        "expires_at": T0 + 60,
    }
    data = json.dumps(raw).encode()
    env = wire.Envelope(payload=wire.b64e(data), signature=wire.b64e(CP_KEY.sign(data)), key_id="k")
    _refused(rig, env, "invalid_command")
    assert rig.store.command_high_water() == 7
    newer = {**raw, "schema_version": 2, "seq": 8, "command_id": "c-8", "new_field": [1]}
    data = json.dumps(newer).encode()
    env = wire.Envelope(payload=wire.b64e(data), signature=wire.b64e(CP_KEY.sign(data)), key_id="k")
    _refused(rig, env, "unsupported_schema")


# --- atomic ----------------------------------------------------------------------------------


def test_atomic__a_result_that_cannot_be_queued_records_nothing_and_the_command_comes_again():
    """The outbox is full: the command_result cannot be queued, so neither the ledger row
    nor the document nor the audit row commits; once there is room the same command
    applies."""
    store = MemoryStore(outbox_max_messages=1)
    rig = Rig(store)
    assert rig.take(envelope(1, "update_config", config_doc(1)))[0].status == "applied"
    before = (store.command_high_water(), rig.audit(), len(rig.outbox()))
    second = envelope(2, "update_config", config_doc(2, velocity_max=9))
    with pytest.raises(LimitExceeded, match="outbox"):
        rig.take(second)
    assert (store.command_high_water(), rig.audit(), len(rig.outbox())) == before
    assert store.active_document("config") == (1, {"risk": {}})
    store.acknowledge(Acknowledgement(outbox_through=rig.outbox()[-1].seq))  # the cloud took it
    assert rig.take(second)[0].status == "applied"
    assert store.active_document("config") == (2, {"risk": {"velocity_max": 9}})


def test_atomic__request_health_queues_its_health_and_result_together_or_neither():
    store = MemoryStore(outbox_max_messages=1)  # room for one message, not the two
    rig = Rig(store)
    with pytest.raises(LimitExceeded):
        rig.take(envelope(1))
    assert (store.command_high_water(), rig.outbox(), rig.audit()) == (0, [], [])
