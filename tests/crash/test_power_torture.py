"""Random power cuts under payment load (``hwsim.cuttorture.run``): CI runs 600 of them.

Each cut lands at a seeded random write, truncate or sync of the terminal's database
(half of them tearing the last unsynced write); the terminal reboots, recovers, the POS
retries what it got no answer to, and ``check_invariants`` finds nothing wrong. The last
tests prove the checker can fail: state surgery on a recovered database is reported.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import apsw
import httpx
import pytest
from hwsim import cuttorture
from hwsim.acquirer import LedgerEntry, SimAcquirer

from edge.engine.context import idempotency_key

#: Cuts per seed, and the seeds: 600 cuts in all (the issue asks for at least 500).
CUTS = 200
SEEDS = (11, 12, 13)


@pytest.mark.parametrize("seed", SEEDS)
def test_power_cuts__under_payment_load_break_no_invariant(tmp_path, seed):
    tally = cuttorture.run(CUTS, seed=seed, workdir=tmp_path)
    assert tally["cuts"] >= CUTS
    assert tally["violations"] == [], tally
    # The load really was mixed, and the cuts really landed in recovery too.
    assert tally["torn"] > CUTS // 4
    assert tally["approved"] > CUTS // 2 and tally["declined"] > 0 and tally["reversed"] > 0
    assert tally["refunds_sent"] > 0 and tally["retried"] > 0
    assert tally["recovered_runs"] > 0 and tally["cuts_in_recovery"] > 0
    assert tally["checks"] > CUTS // 2
    # Issue 10 §1: approvals whose answer was lost, then long outages; reversed after,
    # and cuts that found the reversal still pending.
    assert tally["lost_answers"] > 0 and tally["went_unknown"] > 0, tally
    assert tally["released_after_unknown"] > 0 and tally["cuts_reversal_pending"] > 0, tally
    # Issue 11 §5: the cloud acknowledged through Terminal.acknowledge, offline approvals
    # among what it acknowledged (the sweep's "ack" scenario cuts at its every event).
    assert tally["acks"] > 0 and tally["offline_acknowledged"] > 0, tally


def test_power_cuts__the_tally_names_what_make_torture_prints(tmp_path):
    tally = cuttorture.run(3, seed=5, workdir=tmp_path)
    for key in ("kind", "n", "seed", "cuts", "torn", "payments_sent", "approved",
                "declined", "recovered_runs", "lost_answers", "went_unknown",
                "released_after_unknown", "violations", "seconds"):  # fmt: skip
        assert key in tally
    assert (tally["kind"], tally["n"], tally["seed"]) == ("power", 3, 5)
    assert tally["violations"] == []
    assert list(tmp_path.iterdir()) == [] or tally["violations"]  # clean lives are removed


# --- the checker can fail ------------------------------------------------------------------


class Recovered:
    """A terminal that took an online and an offline payment, a refund, and a payment
    whose approval was lost before a ten-minute outage (declined once reversed), cut
    nowhere: the checker's subject before and after surgery."""

    def __init__(self, root: Path, acquirer: SimAcquirer, client: httpx.Client) -> None:
        self.client = client
        self.acquirer = acquirer
        self.rig = cuttorture._Rig(root / "terminal", acquirer, client)
        self.rig.boot(powerloss=False)
        self.pos = cuttorture._Pos(self.rig)
        paid = self.pos.submit(cuttorture.Txn("p1", "payment", 2_500))
        assert paid is not None and paid.approved
        self.paid = paid
        offline = self.pos.submit(cuttorture.Txn("p2", "payment", 1_500, link_up=False))
        assert offline is not None and offline.approved
        refund = cuttorture.Txn("r1", "refund", 1_000, original=paid.run_id)
        assert self.pos.submit(refund) is not None
        lost = self.pos.submit(cuttorture.Txn("p3", "payment", 3_000, lost_outage_s=600.0))
        assert lost is not None and (lost.status, lost.decision) == ("COMPLETED", "declined")
        self.lost = lost

    def check(self, ledger: Mapping[str, LedgerEntry] | None = None) -> list[str]:
        assert self.rig.terminal is not None
        ledger = self.acquirer.ledger if ledger is None else ledger
        return cuttorture.check_invariants(self.rig.terminal, seen=self.pos.seen, ledger=ledger)

    def check_in_flight(self, ledger: Mapping[str, LedgerEntry] | None = None) -> list[str]:
        assert self.rig.terminal is not None
        ledger = self.acquirer.ledger if ledger is None else ledger
        return cuttorture.check_in_flight(self.rig.terminal, ledger=ledger)

    def unreversed(self) -> dict[str, LedgerEntry]:
        """The acquirer's ledger without the reversal of the lost payment: its money held."""
        auth = idempotency_key(self.lost.run_id, "authorize_online", 1)
        ledger = self.acquirer.ledger
        reversal = [k for k, e in ledger.items() if e.operation == "reverse" and e.reverses == auth]
        assert len(reversal) == 1 and ledger[reversal[0]].effect
        return {k: e for k, e in ledger.items() if k != reversal[0]}

    def put_lost_back(self, status: str, step: str, decision: str) -> None:
        """The lost payment as a cut during it could leave it (nothing else changed)."""
        self.surgery(
            "UPDATE workflow_runs SET status = ?, "
            "cursor = json_set(cursor, '$.frames', json_array(json_array(?, NULL))), "
            "state = json_set(state, '$.decision', ?) WHERE run_id = ?",
            status,
            step,
            decision,
            self.lost.run_id,
        )

    def surgery(self, sql: str, *params: object) -> None:
        """Edit the database behind the terminal's back, as a bug would."""
        conn = apsw.Connection(str(self.rig.root / "terminal.db"))
        try:
            conn.execute(sql, params)
        finally:
            conn.close()


@pytest.fixture
def recovered(tmp_path) -> Iterator[Recovered]:
    with httpx.Client(trust_env=False) as client, SimAcquirer() as acquirer:
        subject = Recovered(tmp_path, acquirer, client)
        try:
            yield subject
        finally:
            subject.rig.close()


def test_checker__a_clean_terminal_passes(recovered):
    assert recovered.check() == []


def test_checker__reports_an_approval_recorded_twice(recovered):
    recovered.surgery(
        "INSERT INTO outbox(message_id, run_id, step, topic, payload, created_at) "
        "SELECT message_id || '-dup', run_id, step, topic, payload, created_at "
        "FROM outbox WHERE run_id = ?",
        recovered.paid.run_id,
    )
    found = recovered.check()
    assert any(recovered.paid.run_id in v and "'approved', 'approved'" in v for v in found), found


def test_checker__reports_an_approval_missing_from_the_outbox(recovered):
    recovered.surgery("DELETE FROM outbox WHERE run_id = ?", recovered.paid.run_id)
    found = recovered.check()
    assert any("messages [] (want one approved)" in v for v in found), found


def test_checker__reports_an_approved_payment_that_is_gone(recovered):
    recovered.surgery(
        "UPDATE workflow_runs SET state = json_set(state, '$.decision', 'declined') "
        "WHERE run_id = ?",
        recovered.paid.run_id,
    )
    found = recovered.check()
    assert any("the POS was told approved" in v for v in found), found
    assert any("but the card is charged" in v for v in found), found


def test_checker__reports_an_edited_audit_chain(recovered):
    recovered.surgery(
        "DROP TRIGGER workflow_audit_log_no_update; "
        "UPDATE workflow_audit_log SET detail = '{\"forged\": true}' WHERE seq = 2"
    )
    found = recovered.check()
    assert any("audit chain BROKEN at seq 2" in v for v in found), found


def test_checker__reports_a_charge_no_run_accounts_for(recovered, tmp_path):
    other = cuttorture._Rig(tmp_path / "other", recovered.acquirer, recovered.client)
    try:
        other.boot(powerloss=False)
        stray = cuttorture._Pos(other).submit(cuttorture.Txn("x", "payment", 4_000))
        assert stray is not None and stray.approved
    finally:
        other.close()
    found = recovered.check()
    assert any("moved money for no run in the database" in v for v in found), found


def test_checker__reports_a_run_left_in_flight_and_a_counter_out_of_step(recovered):
    recovered.surgery("UPDATE counters SET amount = amount + 1 WHERE name = 'offline'")
    recovered.surgery(
        "UPDATE workflow_runs SET status = 'RUNNING' WHERE run_id = ?", recovered.paid.run_id
    )
    found = recovered.check()
    assert any("is RUNNING after recovery" in v for v in found), found
    assert any("offline counter" in v for v in found), found


# --- issue 10 §1: a lost answer, a long outage ------------------------------------------


def test_checker__the_lost_answer_went_unknown_and_was_released(recovered):
    messages = [
        m.payload["decision"]
        for m in recovered.rig.terminal.store.outbox()
        if m.run_id == recovered.lost.run_id
    ]
    assert messages == ["unknown", "declined"]
    auth = idempotency_key(recovered.lost.run_id, "authorize_online", 1)
    assert recovered.acquirer.ledger[auth].effect  # charged, then released:
    assert recovered.acquirer.net_minor("EUR") == 2_500 - 1_000  # p1 less r1, nothing of p3
    assert recovered.check_in_flight() == []


def test_checker__reports_money_held_by_a_declined_payment(recovered):
    found = recovered.check(recovered.unreversed())
    assert any("money held with no approved run and no pending reversal" in v for v in found)


def test_checker__in_flight_a_pending_reversal_may_hold_money(recovered):
    recovered.put_lost_back("RUNNING", "reverse_unknown", "unknown")
    assert recovered.check_in_flight(recovered.unreversed()) == []
    found = recovered.check(recovered.unreversed())  # after recovery it may not
    assert any("still has a reversal pending after recovery" in v for v in found), found


def test_checker__in_flight_reports_money_held_with_no_pending_reversal(recovered):
    recovered.put_lost_back("RUNNING", "record", "declined")
    found = recovered.check_in_flight(recovered.unreversed())
    assert any(
        "(RUNNING, declined at record, not voided) holds 1 charge" in v
        and "no pending reversal" in v
        for v in found
    ), found
    recovered.put_lost_back("RUNNING", "approve_offline", "declined")  # decided offline
    found = recovered.check_in_flight(recovered.unreversed())
    assert any("money held with no approved run" in v for v in found), found


def test_checker__reports_an_unknown_outcome_the_cloud_never_heard_of(recovered):
    recovered.surgery(
        "DELETE FROM outbox WHERE run_id = ? AND json_extract(payload, '$.decision') = ?",
        recovered.lost.run_id,
        "unknown",
    )
    found = recovered.check()
    assert any("messages ['declined'] (want ['declined', 'unknown'])" in v for v in found), found
    recovered.put_lost_back("RUNNING", "reverse_unknown", "unknown")
    found = recovered.check_in_flight(recovered.unreversed())
    assert any("no 'unknown' message was recorded" in v for v in found), found


def test_checker__reports_a_final_message_before_the_unknown_one(recovered):
    recovered.surgery(
        "UPDATE outbox SET seq = seq + 1000 WHERE run_id = ? "
        "AND json_extract(payload, '$.decision') = 'unknown'",
        recovered.lost.run_id,
    )
    found = recovered.check()
    assert any("final 'declined' message comes before its 'unknown' one" in v for v in found), found


def test_checker__reports_a_sale_that_finished_unknown(recovered):
    recovered.surgery(
        "UPDATE workflow_runs SET state = json_set(state, '$.decision', 'unknown') "
        "WHERE run_id = ?",
        recovered.lost.run_id,
    )
    found = recovered.check()
    assert any("ended COMPLETED with decision unknown" in v for v in found), found


# --- issue 11 §5: the acknowledgement releases offline exposure exactly once ----------------


def _acknowledged(recovered) -> dict:
    from hwsim.cutcheck import _upload

    cloud: dict = {}
    assert _upload(recovered.rig.terminal, cloud) > 0  # through Terminal.acknowledge
    assert recovered.rig.terminal.store.counters()["offline"] == (0, 0)  # p2 released
    return cloud


def test_checker__an_acknowledgement_releases_the_offline_exposure_once(recovered):
    cloud = _acknowledged(recovered)
    assert cuttorture.check_invariants(
        recovered.rig.terminal, seen=recovered.pos.seen, ledger=recovered.acquirer.ledger,
        cloud=cloud,
    ) == []  # fmt: skip


def test_checker__reports_an_acknowledged_offline_approval_whose_exposure_stayed(recovered):
    cloud = _acknowledged(recovered)
    recovered.surgery(
        "UPDATE counters SET amount = amount + 1500, count = count + 1 WHERE name = 'offline'"
    )
    found = cuttorture.check_invariants(
        recovered.rig.terminal, seen=recovered.pos.seen, ledger=recovered.acquirer.ledger,
        cloud=cloud,
    )  # fmt: skip
    assert any("not released exactly once per acknowledged offline approval" in v for v in found)
