"""The terminal's payment workflow end to end on a real store, with simulated hardware and
a real HTTP acquirer on loopback; then every byte of the database is scanned for card data."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from carddata_scan import database_secrets, describe, scan, sqlite_files
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

import edge.terminal
from edge.engine import Engine, FakeClock, InlineExecutor, Status
from edge.engine.loader import load_file
from edge.terminal.acquirer_http import HttpAcquirer
from edge.terminal.carddata import DataKey
from edge.terminal.config import RiskLimits

WORKFLOW = Path(edge.terminal.__file__).with_name("workflows") / "payment.yaml"
LIMITS = RiskLimits(
    floor_limit_minor=2_000, offline_amount_cap_minor=3_000, offline_count_cap=5,
    online_random_percent=0,
)  # fmt: skip


class Terminal:
    def __init__(self, store: Any, tmp: Path, acquirer: SimAcquirer) -> None:
        self.clock = FakeClock(2_000_000_000.0)  # 2033: TEST_CARDS expire 3912
        self.reader = SimCardReader()
        self.printer = SimPrinter()
        self.link = SimNetworkLink(self.clock)
        self.acquirer = acquirer
        self.store = store
        self.http = HttpAcquirer(acquirer.url, link=self.link, timeout_s=2)
        self.engine = Engine(
            store,
            InlineExecutor(),
            clock=self.clock,
            services={
                "card_reader": self.reader,
                "printer": self.printer,
                "acquirer": self.http,
                "link": self.link,
                "data_key": DataKey.load_or_create(tmp / "keys"),
                "policy": None,
                "limits": LIMITS,
                "store": store,
                "device_id": "T-0001",
                "rng": random.Random(7),
            },
        )
        self.engine.register(load_file(WORKFLOW))

    def pay(self, amount: int, card: str = "visa", key: str | None = None) -> Any:
        self.reader.insert(make_card(card, cvv="9731"))
        run_id = self.engine.start(
            "payment", {"amount_minor": amount, "currency": "EUR"}, idempotency_key=key
        )
        return self.engine.get(run_id)


@pytest.fixture
def acquirer() -> Iterator[SimAcquirer]:
    with SimAcquirer() as acq:
        yield acq


@pytest.fixture
def terminal(store, tmp_path, acquirer) -> Iterator[Terminal]:
    t = Terminal(store, tmp_path, acquirer)
    yield t
    t.engine.close()
    t.http.close()


def test_payment__online_approval_records_the_sale_once(terminal, acquirer):
    run = terminal.pay(2_500, key="pos-1")  # over the floor limit: online
    assert run.status is Status.COMPLETED
    assert (run.state["channel"], run.state["decision"]) == ("online", "approved")
    assert len(acquirer.effects("authorize")) == 1
    [msg] = terminal.store.outbox()
    assert msg.payload["decision"] == "approved" and msg.payload["masked_pan"].startswith("411111")
    assert terminal.printer.printed[0][1] == "CARD 411111******1111"
    assert terminal.pay(2_500, key="pos-1").run_id == run.run_id  # the POS retries: no 2nd sale
    assert len(acquirer.effects("authorize")) == 1


def test_payment__offline_within_limits_then_declined_over_the_cap(terminal, acquirer):
    terminal.link.down()
    first = terminal.pay(1_500)
    assert (first.state["channel"], first.state["decision"]) == ("offline", "approved")
    second = terminal.pay(1_600, card="mastercard")  # 1500 + 1600 > 3000
    assert second.status is Status.COMPLETED
    assert (second.state["decision"], second.state["reason"]) == ("declined", "offline_amount_cap")
    over_floor = terminal.pay(2_500)
    assert (over_floor.state["decision"], over_floor.state["reason"]) == ("declined", "floor_limit")
    assert terminal.store.counters()["offline"] == (1_500, 1)
    assert acquirer.effects() == []  # the link was down: nothing reached the acquirer


def test_payment__invalid_and_expired_cards_are_declined_with_reasons(terminal):
    assert terminal.pay(100, card="bad_luhn").state["reason"] == "card_invalid"
    assert terminal.pay(100, card="expired").state["reason"] == "card_expired"


def test_payment__a_jammed_printer_after_approval_reverses_the_authorisation(terminal, acquirer):
    terminal.printer.state = "jam"
    run = terminal.pay(2_500)
    assert run.status is Status.ROLLED_BACK
    assert run.state["decision"] == "reversed"
    assert len(acquirer.effects("authorize")) == 1 and len(acquirer.effects("reverse")) == 1
    assert acquirer.net_minor("EUR") == 0
    [msg] = terminal.store.outbox()  # the cloud hears the authorisation was undone
    assert (msg.payload["decision"], msg.payload["channel"]) == ("reversed", "online")


def test_payment__paper_out_waits_for_the_operator_then_prints(terminal):
    terminal.printer.state = "paper_out"
    run = terminal.pay(2_500)
    assert run.status is Status.WAITING
    terminal.printer.refill()
    terminal.engine.resume(run.run_id, {})
    done = terminal.engine.get(run.run_id)
    assert done.status is Status.COMPLETED and done.state["printer"] == "printed"


def test_payment__no_card_data_in_clear_anywhere_in_the_database(terminal, backend):
    if backend.name != "sqlite":
        pytest.skip("the byte scan reads the SQLite files (the terminal's store)")
    terminal.pay(2_500)
    terminal.link.down()
    terminal.pay(1_000, card="mastercard")
    secrets = database_secrets({n: make_card(n, cvv="9731") for n in ("visa", "mastercard")})
    assert len(secrets) == 5  # both cards' PAN and CVV, and the field: nothing shadowed
    findings = scan(sqlite_files(Path(backend.target)), secrets)
    assert findings == [], describe(findings)


def test_payment__a_retry_after_a_lost_answer_is_the_same_request_to_the_acquirer(
    terminal, acquirer
):
    """The first request reaches the acquirer but its answer is lost (timeout); the retry
    must carry the same key, so the acquirer charges once."""
    acquirer.set_mode("timeout")

    class HealsAfterOneTimeout:
        """Lets the first request time out at the acquirer, then lets it answer."""

        calls = 0

        def authorize(self, req):
            self.calls += 1
            if self.calls == 2:
                acquirer.set_mode("approve")
            return terminal.http.authorize(req)

        def reverse(self, original_key, key):
            return terminal.http.reverse(original_key, key)

    terminal.engine.services["acquirer"] = HealsAfterOneTimeout()
    run = terminal.pay(2_500)
    assert run.status is Status.COMPLETED and run.state["decision"] == "approved"
    keys = {key for path, key in acquirer.received if path == "/authorize"}
    assert len(acquirer.effects("authorize")) == 1 and len(keys) == 1


def test_payment__declined_when_the_outbox_is_full(terminal):
    terminal.engine.services["outbox_max_messages"] = 1
    assert terminal.pay(2_500).state["decision"] == "approved"
    full = terminal.pay(2_500, card="mastercard")
    assert (full.state["decision"], full.state["reason"]) == ("declined", "outbox_full")


def test_payment__an_authorisation_whose_answer_was_lost_is_reversed_when_the_run_gives_up(
    terminal, acquirer
):
    """The first request reaches the acquirer (approved) but its answer is lost -- a
    timeout, or the daemon killed before it read the answer -- and the link then stays
    down through every retry. The run gives up; the authorisation it may have left at
    the acquirer must be reversed, or the customer is charged for a failed payment.
    (Found by the kill -9 torture, hwsim.killtorture: the acquirer's lost reply.)"""
    from edge.terminal.ports import AcquirerUnavailable

    class LosesTheAnswerThenTheLink:
        calls = 0

        def authorize(self, req):
            self.calls += 1
            try:
                if self.calls == 1:
                    terminal.http.authorize(req)  # approved and recorded at the acquirer...
                    terminal.link.down()  # ...and the answer never comes back
                    raise AcquirerUnavailable("connection lost", outcome_unknown=True)
                return terminal.http.authorize(req)  # link down: not sent
            finally:
                if self.calls == 3:
                    terminal.link.up()  # back after the last attempt

        def reverse(self, original_key, key):
            return terminal.http.reverse(original_key, key)

    terminal.engine.services["acquirer"] = LosesTheAnswerThenTheLink()
    run = terminal.pay(2_500)
    assert run.status is Status.ROLLED_BACK
    assert len(acquirer.effects("authorize")) == 1  # the lost one
    assert len(acquirer.effects("reverse")) == 1
    assert acquirer.net_minor("EUR") == 0  # not charged for a payment that failed
    [msg] = terminal.store.outbox()  # the cloud hears of the reversal
    assert (msg.payload["decision"], msg.payload["channel"]) == ("reversed", "online")


def test_payment__a_payment_that_never_reached_the_acquirer_still_rolls_back(terminal, acquirer):
    """The same give-up with nothing sent: the reversal is of a key the acquirer never
    saw (no effect; it also refuses that key from now on), and the run rolls back."""

    class LinkDropsAfterScreening:
        def authorize(self, req):
            terminal.link.down()
            return terminal.http.authorize(req)  # not sent

        def reverse(self, original_key, key):
            terminal.link.up()  # back in time for the reversal
            return terminal.http.reverse(original_key, key)

    terminal.engine.services["acquirer"] = LinkDropsAfterScreening()
    run = terminal.pay(2_500)
    assert run.status is Status.ROLLED_BACK
    assert acquirer.effects() == []
    assert acquirer.net_minor("EUR") == 0


def test_payment__a_policy_velocity_rule_counts_every_use_of_the_card(terminal):
    from edge.terminal.policy import PolicyDocument, compile_policy

    doc = {"version": 1, "rules": [
        {"id": "burst", "type": "velocity", "max_count": 2, "window_s": 3600, "action": "decline"},
    ]}  # fmt: skip
    terminal.engine.services["policy"] = compile_policy(PolicyDocument.model_validate(doc))
    first, second = terminal.pay(500), terminal.pay(900, card="visa")
    assert [r.state["decision"] for r in (first, second)] == ["approved", "approved"]
    third = terminal.pay(700)
    assert third.state["decision"] == "declined" and third.state["reason"] == "policy"
    assert third.state["policy_reasons"] == ["velocity:burst"]
    assert terminal.pay(700, card="mastercard").state["decision"] == "approved"  # another card
    terminal.clock.advance(3600)  # the next window
    assert terminal.pay(700).state["decision"] == "approved"
