"""The terminal's ``resolve_outcome`` command (``sync.device.commands``): the acquirer's
truth about an operation whose answer the terminal lost, applied once in the
transaction of its ledger row (kept, audited, and a refund that ended unknown gets its
final message); a replay, a second truth for the key, or a truth about a run that is
not ours is refused and changes nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from edge.engine import FakeClock
from edge.engine.records import Commit, RunRecord, Status
from edge.store.memory import MemoryStore
from edge.store.sqlite import SqliteStore
from sync import signing, wire
from sync.device.commands import CommandProcessor, outcome_document_kind
from sync.device.identity import DeviceIdentity

T0 = 1_800_000_000.0
DEVICE = "dev-1"
CP_KEY = signing.load_private(bytes(range(32)))  # the control plane's (a fixed test key)
REFUND_KEY = "refund-key-1"
AUTH_KEY = "auth-key-1"


class FakeTerminal:
    last_error: str | None = None

    def __init__(self) -> None:
        self.refreshed = 0

    def health(self) -> dict[str, Any]:
        return {"device_id": DEVICE}

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        raise AssertionError("commands never acknowledge")

    def refresh_documents(self) -> None:
        self.refreshed += 1

    def active_policy_version(self) -> int | None:
        return None


def _run(run_id: str, workflow: str, status: Status, state: dict[str, Any]) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        workflow_type=workflow,
        definition_hash=f"def-{workflow}",
        fingerprints={},
        status=status,
        state=state,
        input={},
        cursor={},
        revision=1,
        created_at=T0,
        updated_at=T0,
    )


def outcome(**changes: Any) -> dict[str, Any]:
    base = {
        "operation": "refund",
        "run_id": "refund-1",
        "key": REFUND_KEY,
        "status": "approved",
        "amount_minor": 1250,
        "currency": "EUR",
        "acquirer_ref": "SIM000000007",
        "looked_up_at": T0 - 5,
    }
    return {**base, **changes}


def envelope(seq: int, content: dict[str, Any], *, key: Any = CP_KEY) -> wire.Envelope:
    cmd = wire.Command(
        schema_version=1,
        command_id=f"c-{seq}",
        device_id=DEVICE,
        seq=seq,
        action="resolve_outcome",
        issued_at=T0,
        expires_at=T0 + 3600,
        document=wire.OutcomeDocument(kind="outcome", version=1, content=content),
    )
    return signing.seal(key, cmd)


class Rig:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.terminal = FakeTerminal()
        ident = DeviceIdentity(DEVICE, "S-1", "g-1", signing.public_text(CP_KEY), "http://cp", T0)
        self.processor = CommandProcessor(ident, store, self.terminal, FakeClock(T0 + 10))
        refund = {
            "amount_minor": 1250,
            "currency": "EUR",
            "decision": "unknown",
            "reason": "refund_outcome_unknown",
            "refund_key": REFUND_KEY,
            "original_run_id": None,
            "card": {"masked": "411111******1111", "pan_token": "tok"},
        }
        payment = {"amount_minor": 4200, "currency": "EUR", "decision": "unknown"}
        payment["auth_key"] = AUTH_KEY
        for run in (
            _run("refund-1", "refund", Status.COMPLETED, refund),
            _run("pay-1", "payment", Status.RUNNING, payment),
        ):
            # the runs' definitions stand in for the terminal's (only their rows matter)
            store.save_definition(run.definition_hash, run.workflow_type, "1", "{}", T0)
            store.start(Commit(run=run, expected_revision=0))

    def take(self, *envelopes: wire.Envelope) -> list[Any]:
        return self.processor.handle_all(envelopes)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r.detail for r in self.store.audit_rows() if r.event == name]

    def outbox(self, topic: str) -> list[Any]:
        return [m for m in self.store.outbox(limit=1000) if m.topic == topic]


@pytest.fixture(params=["memory", "sqlite"])
def rig(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "memory":
        yield Rig(MemoryStore())
        return
    store = SqliteStore(tmp_path / "t.db")
    store.migrate()
    try:
        yield Rig(store)
    finally:
        store.close()


def test_a_refund_truth__is_kept_audited_and_gives_the_refund_its_final_message(rig: Rig) -> None:
    (out,) = rig.take(envelope(1, outcome()))
    assert (out.status, out.action, out.document) == ("applied", "resolve_outcome", None)
    assert rig.terminal.refreshed == 0  # nothing to put in force
    kept = rig.store.active_document(outcome_document_kind(REFUND_KEY))
    assert kept is not None and kept[0] == 1
    assert (kept[1]["status"], kept[1]["settled"]) == ("approved", "final_message")
    ((final,),) = [[m for m in rig.outbox("refund")]]
    assert final.run_id == "refund-1"
    assert final.payload["decision"] == "approved" and final.payload["resolved"] is True
    assert final.payload["refund_key"] == REFUND_KEY
    assert final.payload["masked_pan"] == "411111******1111"
    assert "pan_token" not in final.payload  # the outcome's message carries no token
    (resolved,) = rig.events("outcome_resolved")
    assert (resolved["key"], resolved["status"], resolved["command_id"]) == (
        REFUND_KEY,
        "approved",
        "c-1",
    )
    (result,) = rig.outbox("command_result")
    assert result.payload["status"] == "applied"


def test_a_declined_refund_truth__ends_it_declined(rig: Rig) -> None:
    rig.take(envelope(1, outcome(status="not_found", acquirer_ref=None)))
    (final,) = rig.outbox("refund")
    assert (final.payload["decision"], final.payload["reason"]) == (
        "declined",
        "acquirer_not_found",
    )


def test_a_payment_truth__is_kept_beside_the_pending_reversal(rig: Rig) -> None:
    truth = outcome(operation="authorization", run_id="pay-1", key=AUTH_KEY, amount_minor=4200)
    (out,) = rig.take(envelope(1, truth))
    assert out.status == "applied"
    kept = rig.store.active_document(outcome_document_kind(AUTH_KEY))
    assert kept is not None and kept[1]["settled"] == "reversal_pending"
    assert rig.outbox("payment") == []  # the run's own record step sends the final one
    assert rig.store.get_run("pay-1").status is Status.RUNNING


def test_replayed__the_same_envelope_again_changes_nothing(rig: Rig) -> None:
    env = envelope(1, outcome())
    rig.take(env)
    (again,) = rig.take(env)
    assert (again.status, again.reason) == ("ignored", "replayed")
    assert len(rig.outbox("refund")) == 1
    assert len(rig.events("outcome_resolved")) == 1


def test_a_second_truth_for_the_key__is_refused_under_a_new_seq(rig: Rig) -> None:
    rig.take(envelope(1, outcome()))
    (second,) = rig.take(envelope(2, outcome(status="declined")))
    assert (second.status, second.reason) == ("refused", "already_resolved")
    assert rig.store.command_high_water() == 2  # refused on its seq: it stalls nothing
    assert len(rig.outbox("refund")) == 1
    kept = rig.store.active_document(outcome_document_kind(REFUND_KEY))
    assert kept is not None and kept[1]["status"] == "approved"


@pytest.mark.parametrize(
    "changes",
    [
        {"run_id": "nobody"},  # no such run
        {"key": "another-key"},  # the run recorded another key
        {"operation": "authorization"},  # refund-1 is not a payment
        {"run_id": "pay-1"},  # a payment is not a refund
    ],
)
def test_a_truth_about_no_operation_of_ours__is_refused(rig: Rig, changes: dict[str, Any]) -> None:
    (out,) = rig.take(envelope(1, outcome(**changes)))
    assert (out.status, out.reason) == ("refused", "unknown_outcome")
    assert rig.outbox("refund") == []
    assert rig.events("outcome_resolved") == []


def test_an_outcome_document_that_is_not_an_outcome__is_refused(rig: Rig) -> None:
    (out,) = rig.take(envelope(1, {"status": "approved"}))
    assert (out.status, out.reason) == ("refused", "invalid_document")


def test_forged__a_truth_not_signed_by_the_control_plane_is_ignored(rig: Rig) -> None:
    other = signing.load_private(bytes(range(1, 33)))
    (out,) = rig.take(envelope(1, outcome(), key=other))
    assert (out.status, out.reason) == ("ignored", "forged")
    assert rig.store.active_document(outcome_document_kind(REFUND_KEY)) is None
    assert rig.outbox("refund") == []
