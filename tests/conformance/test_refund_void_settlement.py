"""Refund, void and settlement end to end on a real store, with the payment test's terminal
(simulated hardware, a real HTTP acquirer on loopback); then the database is scanned for
card data."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from carddata_scan import database_secrets, describe, scan, sqlite_files
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import make_card
from test_payment_workflow import Terminal

from edge.engine import Engine, InlineExecutor, Status
from edge.engine.loader import load_file
from edge.engine.records import Acknowledgement
from edge.errors import InputError
from edge.terminal.drivers.contracts import AcquirerUnavailable
from edge.terminal.sale import WORKFLOWS


class Till(Terminal):
    """The payment test's terminal, with the refund, void and settlement workflows."""

    def __init__(self, store: Any, tmp: Path, acquirer: SimAcquirer) -> None:
        super().__init__(store, tmp, acquirer)
        for name in ("refund", "void", "settlement"):
            self.engine.register(load_file(WORKFLOWS / f"{name}.yaml"))

    def refund(
        self, amount: int, card: str = "visa", original: str | None = None, key: str | None = None
    ) -> Any:
        self.reader.insert(make_card(card, cvv="9731"))
        data: dict[str, Any] = {"amount_minor": amount, "currency": "EUR"}
        if original is not None:
            data["original_run_id"] = original
        return self.engine.get(self.engine.start("refund", data, idempotency_key=key))

    def void(self, payment_run_id: str, engine: Engine | None = None) -> Any:
        eng = engine or self.engine
        return eng.get(eng.start("void", {"payment_run_id": payment_run_id}))

    def settle(self, engine: Engine | None = None, **data: Any) -> Any:
        eng = engine or self.engine
        return eng.get(eng.start("settlement", data))

    def engine_with(self, **services: Any) -> Engine:
        """A second engine on the same database whose steps see ``services`` instead."""
        eng = Engine(
            self.store,
            InlineExecutor(),
            clock=self.clock,
            services=dataclasses.replace(self.engine.services, **services),
        )
        for name in ("payment", "refund", "void", "settlement"):
            eng.register(load_file(WORKFLOWS / f"{name}.yaml"))
        return eng

    def messages(self, topic: str) -> list[Any]:
        return [m for m in self.store.outbox(limit=1000) if m.topic == topic]


class LostReply:
    """The acquirer gets the refund, and its answer is lost on the way back."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def refund(self, req: Any) -> Any:
        self.inner.refund(req)
        raise AcquirerUnavailable("acquirer refund: timed out", outcome_unknown=True)


class Interleave:
    """The store as a step sees it, except that the first call of ``method`` returns what
    it read and then runs ``meanwhile``: another workflow commits between the step's read
    and its own commit."""

    def __init__(self, inner: Any, method: str, meanwhile: Callable[[], None]) -> None:
        self.inner, self.method, self.meanwhile = inner, method, meanwhile

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name != self.method or self.meanwhile is None:
            return attr
        meanwhile, self.meanwhile = self.meanwhile, None  # once

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            meanwhile()
            return result

        return call


@pytest.fixture
def acquirer() -> Iterator[SimAcquirer]:
    with SimAcquirer() as acq:
        yield acq


@pytest.fixture
def till(store, tmp_path, acquirer) -> Iterator[Till]:
    t = Till(store, tmp_path, acquirer)
    yield t
    t.engine.close()
    t.http.close()


# --- refund --------------------------------------------------------------------------------


def test_refund__online_approval_is_recorded_once_and_printed(till, acquirer):
    run = till.refund(700, key="pos-r1")
    assert run.status is Status.COMPLETED
    assert (run.state["decision"], run.state["printer"]) == ("approved", "printed")
    assert [e.amount_minor for e in acquirer.effects("refund")] == [700]
    [msg] = till.messages("refund")
    assert msg.payload["decision"] == "approved" and msg.payload["amount_minor"] == 700
    assert msg.payload["masked_pan"] == "411111******1111"
    assert msg.payload["pan_token"].startswith("v1:")
    assert msg.payload["refund_key"] == acquirer.effects("refund")[0].key
    assert till.printer.printed[-1][2] == "REFUND 7.00 EUR"
    assert till.refund(700, key="pos-r1").run_id == run.run_id  # the POS retries: one refund
    assert len(acquirer.effects("refund")) == 1 and len(till.messages("refund")) == 1
    assert acquirer.net_minor("EUR") == -700


def test_refund__declined_when_the_link_is_down(till, acquirer):
    till.link.down()
    run = till.refund(700)
    assert run.status is Status.COMPLETED
    assert (run.state["decision"], run.state["reason"]) == (
        "declined",
        "offline_refund_not_allowed",
    )
    assert acquirer.received == [] and till.printer.printed == []
    [msg] = till.messages("refund")
    assert msg.payload["decision"] == "declined"


def test_refund__an_unknown_outcome_is_recorded_with_its_key_for_reconciliation(till, acquirer):
    lossy = till.engine_with(acquirer=LostReply(till.http))
    till.reader.insert(make_card("visa", cvv="9731"))
    try:
        run = lossy.get(lossy.start("refund", {"amount_minor": 700, "currency": "EUR"}))
    finally:
        lossy.close()
    assert run.status is Status.COMPLETED
    assert (run.state["decision"], run.state["reason"]) == ("unknown", "refund_outcome_unknown")
    [effect] = acquirer.effects("refund")  # it did happen, under the recorded key
    [msg] = till.messages("refund")
    assert (msg.payload["decision"], msg.payload["refund_key"]) == ("unknown", effect.key)
    assert till.printer.printed == []  # no receipt for a refund nobody confirmed
    assert till.settle().state["skipped"] == {"unknown": 1}


def test_refund__paper_out_waits_then_ends_without_a_receipt_when_nobody_comes(till):
    till.printer.state = "paper_out"
    run = till.refund(700)
    assert run.status is Status.WAITING and run.state["decision"] == "approved"
    assert len(till.messages("refund")) == 1  # recorded before printing
    till.clock.advance(301)
    till.engine.recover()
    done = till.engine.get(run.run_id)
    assert (done.status, done.state["printer"]) == (Status.COMPLETED, "paper_out")


def test_refund__input_is_checked_at_start(till):
    with pytest.raises(InputError, match="RefundState"):
        till.engine.start("refund", {"amount_minor": -5, "currency": "EUR"})
    with pytest.raises(InputError, match="RefundState"):
        till.engine.start("refund", {"amount_minor": 5, "currency": "EUR", "cvv": "123"})


def test_refund__a_dead_printer_after_approval_fails_the_run_with_the_refund_recorded(
    till, acquirer
):
    till.printer.state = "jam"
    run = till.refund(700)
    assert run.status is Status.FAILED  # not ROLLED_BACK: the customer was refunded
    assert run.error["compensation_error"]["code"] == "refund_irreversible"
    assert "authorize_refund" in run.error["uncompensated"]
    assert len(acquirer.effects("refund")) == 1 and acquirer.net_minor("EUR") == -700
    [msg] = till.messages("refund")
    assert msg.payload["decision"] == "approved"


def test_refund__against_a_payment_is_capped_by_it_and_excludes_a_void(till, acquirer):
    payment = till.pay(2_500)
    assert till.refund(1_000, original=payment.run_id).state["decision"] == "approved"
    over = till.refund(1_600, original=payment.run_id)
    assert (over.state["decision"], over.state["reason"]) == ("declined", "refund_exceeds_payment")
    other_card = till.refund(100, card="mastercard", original=payment.run_id)
    assert other_card.state["reason"] == "card_mismatch"
    assert till.refund(1_500, original=payment.run_id).state["decision"] == "approved"
    assert till.store.counters()[f"refund:{payment.run_id}"] == (2_500, 2)
    assert till.void(payment.run_id).state["reason"] == "payment_refunded"

    voided = till.pay(2_600)
    assert till.void(voided.run_id).state["decision"] == "approved"
    assert till.refund(100, original=voided.run_id).state["reason"] == "payment_voided"
    assert len(acquirer.effects("refund")) == 2


# --- void ----------------------------------------------------------------------------------


def test_void__of_an_online_payment_reverses_it_once_and_a_second_void_is_declined(till, acquirer):
    payment = till.pay(2_500)
    assert acquirer.net_minor("EUR") == 2_500
    void = till.void(payment.run_id)
    assert void.status is Status.COMPLETED
    assert (void.state["decision"], void.state["reversed"]) == ("approved", True)
    assert acquirer.net_minor("EUR") == 0
    [reversal] = acquirer.effects("reverse")
    assert reversal.reverses == payment.state["auth_key"]
    again = till.void(payment.run_id)
    assert (again.state["decision"], again.state["reason"]) == ("declined", "already_voided")
    assert len(acquirer.effects("reverse")) == 1
    assert [m.payload["decision"] for m in till.messages("void")] == ["approved", "declined"]
    assert till.messages("void")[0].payload["payment_run_id"] == payment.run_id


def test_void__two_concurrent_voids_of_one_payment_cannot_both_succeed(
    till, store, acquirer, caplog
):
    caplog.set_level(logging.INFO, logger="edge.engine.runtime")
    payment = till.pay(2_500)
    rival: list[Any] = []
    # The outer void has read the void counter (0); before it commits its claim, a rival
    # void runs to the end. The outer's claim is refused; it runs again and declines.
    racing = till.engine_with(
        store=Interleave(store, "counters", lambda: rival.append(till.void(payment.run_id)))
    )
    try:
        outer = till.void(payment.run_id, engine=racing)
    finally:
        racing.close()
    assert rival[0].state["decision"] == "approved"
    assert (outer.state["decision"], outer.state["reason"]) == ("declined", "already_voided")
    assert len(acquirer.effects("reverse")) == 1 and acquirer.net_minor("EUR") == 0
    assert store.counters()[f"void:{payment.run_id}"] == (0, 1)
    assert "load_payment refused by guard (already_voided)" in caplog.text


def test_void__of_an_offline_payment_releases_the_offline_counter(till, acquirer):
    till.link.down()
    payment = till.pay(1_500)
    assert payment.state["offline"] is True
    assert till.store.counters()["offline"] == (1_500, 1)
    void = till.void(payment.run_id)
    assert (void.state["decision"], void.state["released"]) == ("approved", True)
    assert till.store.counters()["offline"] == (0, 0)
    assert acquirer.received == []  # never sent, so nothing to reverse
    assert till.void(payment.run_id).state["reason"] == "already_voided"
    assert till.store.counters()["offline"] == (0, 0)


def test_void__of_an_offline_payment_the_cloud_acknowledged_is_declined(till):
    till.link.down()
    payment = till.pay(1_500)
    till.store.acknowledge(Acknowledgement(outbox_through=till.store.outbox_stats().last_seq))
    void = till.void(payment.run_id)
    assert void.state["reason"] == "offline_payment_uploaded"
    assert till.store.counters()["offline"] == (1_500, 1)


def test_void__of_an_unknown_declined_or_non_payment_run_is_declined_with_a_reason(till):
    assert till.void("no-such-run").state["reason"] == "unknown_payment"
    declined = till.pay(100, card="expired")
    assert till.void(declined.run_id).state["reason"] == "payment_not_approved"
    refund = till.refund(100)
    assert till.void(refund.run_id).state["reason"] == "not_a_payment"
    till.printer.state = "jam"
    rolled_back = till.pay(2_500)
    assert rolled_back.status is Status.ROLLED_BACK
    assert till.void(rolled_back.run_id).state["reason"] == "payment_not_completed"
    for v in till.messages("void"):
        assert v.payload["decision"] == "declined"


def test_void__declined_when_the_link_is_down_and_can_be_retried_later(till, acquirer):
    payment = till.pay(2_500)
    till.link.down()
    first = till.void(payment.run_id)
    assert first.state["reason"] == "offline_void_not_allowed"
    till.link.up()
    assert till.void(payment.run_id).state["decision"] == "approved"
    assert acquirer.net_minor("EUR") == 0


# --- settlement ----------------------------------------------------------------------------


def test_settlement__totals_match_the_recorded_transactions_then_nothing_is_new(till):
    online = till.pay(2_500)
    till.pay(100, card="expired")  # declined: not in the totals
    till.refund(700)
    till.link.down()
    offline = till.pay(1_500)
    till.link.up()
    till.void(online.run_id)
    till.void(offline.run_id)

    run = till.settle(business_day="2033-05-18")
    assert run.status is Status.COMPLETED
    [msg] = till.messages("settlement")
    p = msg.payload
    assert p["device_id"] == "T-0001" and p["batch_no"] == 1
    assert p["business_day"] == "2033-05-18"
    assert p["totals"] == {
        "EUR": {
            "payment": {"count": 2, "amount_minor": 4_000},
            "refund": {"count": 1, "amount_minor": 700},
            "void": {"count": 2, "amount_minor": 4_000},
        }
    }
    assert p["net_minor"] == {"EUR": -700}
    assert p["skipped"] == {"declined": 1}
    kinds = [m for m in till.store.outbox(limit=1000) if m.topic in ("payment", "refund", "void")]
    assert (p["first_seq"], p["last_seq"]) == (kinds[0].seq, kinds[-1].seq)
    assert p["gap"] is None

    second = till.settle()
    assert second.status is Status.COMPLETED
    assert second.state["batch_no"] == 2 and second.state["totals"] == {}
    assert second.state["first_seq"] is None and second.state["through_seq"] > p["last_seq"]
    assert till.store.counters()["settlement:last_seq"] == (second.state["through_seq"], 2)


def test_settlement__two_concurrent_settlements_cover_each_message_once(till, store, caplog):
    caplog.set_level(logging.INFO, logger="edge.engine.runtime")
    till.pay(2_500)
    rival: list[Any] = []

    def meanwhile() -> None:  # after the outer settlement read the outbox
        till.pay(2_200)
        rival.append(till.settle())

    racing = till.engine_with(store=Interleave(store, "outbox", meanwhile))
    try:
        outer = till.settle(engine=racing)
    finally:
        racing.close()
    batches = sorted((m.payload for m in till.messages("settlement")), key=lambda p: p["batch_no"])
    assert [b["batch_no"] for b in batches] == [1, 2]
    assert batches[0]["run_id"] == rival[0].run_id and batches[1]["run_id"] == outer.run_id
    assert batches[0]["totals"]["EUR"]["payment"] == {"count": 2, "amount_minor": 4_700}
    assert batches[1]["totals"] == {}  # it ran again after the rival's commit
    assert "settle refused by guard (settlement_raced)" in caplog.text


def test_settlement__acknowledged_messages_before_a_settlement_are_named_as_a_gap(till):
    till.pay(2_500)
    till.pay(2_100)
    till.store.acknowledge(Acknowledgement(outbox_through=till.messages("payment")[0].seq))
    till.pay(2_200)
    p = till.settle().state
    assert p["totals"]["EUR"]["payment"] == {"count": 2, "amount_minor": 4_300}
    assert p["gap"] == [1, till.messages("payment")[0].seq - 1]


def test_settlement__input_names_a_real_day(till):
    with pytest.raises(InputError, match="SettlementState"):
        till.engine.start("settlement", {"business_day": "2033-02-30"})


# --- card data -----------------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_refund_void_settlement__no_card_data_in_clear_anywhere_in_the_database(till, backend):
    payment = till.pay(2_500)
    till.refund(700, original=payment.run_id)
    till.refund(300, card="mastercard")
    till.link.down()
    offline = till.pay(1_000, card="mastercard")
    till.refund(100)  # declined offline, card read all the same
    till.link.up()
    till.void(offline.run_id)
    till.void(till.pay(2_100).run_id)
    till.settle()
    secrets = database_secrets({n: make_card(n, cvv="9731") for n in ("visa", "mastercard")})
    findings = scan(sqlite_files(Path(backend.target)), secrets)
    assert findings == [], describe(findings)


def test_void__a_reversal_whose_answer_was_lost_is_retried_not_declined_when_the_link_drops(
    till, acquirer
):
    """The reversal reaches the acquirer (the payment is released) but its answer is
    lost, and the link is down when the step runs again. A decline would tell the POS
    the payment stands while the acquirer released it; the void must retry under the
    same original key and end approved. (Found by the kill -9 torture, hwsim.killtorture:
    a kill at the acquirer's reply, a restart inside a link-down window.)"""
    payment = till.pay(2_500)

    class LostReversal:
        calls = 0

        def reverse(self, original_key: str, key: str) -> Any:
            self.calls += 1
            answer = till.http.reverse(original_key, key)
            if self.calls == 1:  # applied; the answer is lost and the link drops for 2 s
                elapsed = till.clock.now() - till.link.origin
                till.link.schedule.append((elapsed, elapsed + 2.0))
                raise AcquirerUnavailable("acquirer reverse: timed out", outcome_unknown=True)
            return answer

    voided = till.void(payment.run_id, till.engine_with(acquirer=LostReversal()))
    assert (voided.status, voided.state["decision"]) == (Status.COMPLETED, "approved")
    assert acquirer.net_minor("EUR") == 0
    assert till.void(payment.run_id).state["reason"] == "already_voided"


def test_void__a_lost_reversal_then_an_hour_long_outage_still_ends_approved(till, acquirer):
    """As above, with the link down for an hour: the void's reversal is retried for as
    long as it takes (it used to give up after three attempts and roll the void back,
    telling the POS the payment stood while the acquirer had released it)."""
    from edge.terminal.sale.views import run_view

    payment = till.pay(2_500)
    seen: list[dict[str, Any]] = []

    class LostReversalLongOutage:
        calls = 0

        def reverse(self, original_key: str, key: str) -> Any:
            self.calls += 1
            if self.calls > 1:
                [void_run] = [r for r in till.store.list_runs() if r.workflow_type == "void"]
                seen.append(run_view(void_run))
            answer = till.http.reverse(original_key, key)
            if self.calls == 1:
                elapsed = till.clock.now() - till.link.origin
                till.link.schedule.append((elapsed, elapsed + 3600.0))
                raise AcquirerUnavailable("acquirer reverse: timed out", outcome_unknown=True)
            return answer

    voided = till.void(payment.run_id, till.engine_with(acquirer=LostReversalLongOutage()))
    assert (voided.status, voided.state["decision"]) == (Status.COMPLETED, "approved")
    assert len(seen) > 10 and acquirer.net_minor("EUR") == 0
    assert (seen[0]["decision"], seen[0]["reason"]) == ("unknown", "reversal_pending")
    assert "Do not void or refund" in seen[0]["customer_message"]


def test_refund__not_sent_after_a_request_that_may_have_arrived_is_unknown_not_declined(
    till, acquirer
):
    """A replay of authorize_refund after a crash finds the link down ("not sent") while
    the first execution's request did reach the acquirer and refunded. The step cannot
    tell the two apart, so it must record the outcome unknown under its key (for the
    cloud to settle), never declined. (The void's kill -9 torture finding, in refunds.)"""

    class RefundedThenLinkDown:
        def refund(self, req: Any) -> Any:
            till.http.refund(req)  # the crashed first execution's request
            raise AcquirerUnavailable("acquirer refund not sent: link down", outcome_unknown=False)

    eng = till.engine_with(acquirer=RefundedThenLinkDown())
    till.reader.insert(make_card("visa", cvv="9731"))
    run = eng.get(eng.start("refund", {"amount_minor": 700, "currency": "EUR"}))
    assert (run.state["decision"], run.state["reason"]) == ("unknown", "refund_outcome_unknown")
    assert run.state["refund_key"] in {e.key for e in acquirer.effects("refund")}
    [msg] = till.messages("refund")
    assert msg.payload["decision"] == "unknown" and msg.payload["refund_key"]
