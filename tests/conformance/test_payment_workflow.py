"""The terminal's payment workflow end to end on a real store, with simulated hardware and
a real HTTP acquirer on loopback; then every byte of the database is scanned for card data."""

from __future__ import annotations

import dataclasses
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

from edge.engine import Engine, FakeClock, InlineExecutor, Status
from edge.engine.loader import load_file
from edge.engine.runtime import DEFAULT_LEASE_S
from edge.terminal.carddata import DataKey
from edge.terminal.config import RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale import WORKFLOWS
from edge.terminal.sale.services import Peripherals, build_services

WORKFLOW = WORKFLOWS / "payment.yaml"
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
            services=build_services(
                Peripherals(self.reader, self.printer, self.http, self.link),
                store=store,
                data_key=DataKey.load_or_create(tmp / "keys"),
                limits=LIMITS,
                device_id="T-0001",
                rng=random.Random(7),
            ),
        )
        self.engine.register(load_file(WORKFLOW))

    def use(self, **changes: Any) -> None:
        """The steps from now on see these services changed (an acquirer that fails...)."""
        self.engine.services = dataclasses.replace(self.engine.services, **changes)

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


@pytest.mark.sqlite_only
def test_payment__no_card_data_in_clear_anywhere_in_the_database(terminal, backend):
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

    terminal.use(acquirer=HealsAfterOneTimeout())
    run = terminal.pay(2_500)
    assert run.status is Status.COMPLETED and run.state["decision"] == "approved"
    keys = {key for path, key in acquirer.received if path == "/authorize"}
    assert len(acquirer.effects("authorize")) == 1 and len(keys) == 1


def test_payment__declined_when_the_outbox_is_full(terminal):
    terminal.use(outbox_max_messages=1)
    assert terminal.pay(2_500).state["decision"] == "approved"
    full = terminal.pay(2_500, card="mastercard")
    assert (full.state["decision"], full.state["reason"]) == ("declined", "outbox_full")


class LosesTheAnswerThenTheLink:
    """The first request reaches the acquirer (approved) but its answer is lost -- a
    timeout, or the daemon killed before it read the answer -- and the link then stays
    down for ``outage_s`` of virtual time: every later attempt is "not sent"."""

    def __init__(self, terminal: Terminal, outage_s: float) -> None:
        self.t, self.outage_s = terminal, outage_s
        self.calls = self.reversals_tried = 0
        self.down_since: float | None = None
        self.seen_while_pending: list[dict[str, Any]] = []

    def _link(self) -> None:
        if self.down_since is not None and self.t.clock.now() - self.down_since >= self.outage_s:
            self.t.link.up()

    def authorize(self, req):
        from edge.terminal.drivers.contracts import AcquirerUnavailable

        self.calls += 1
        if self.calls == 1:
            self.t.http.authorize(req)  # approved and recorded at the acquirer...
            self.t.link.down()  # ...and the answer never comes back
            self.down_since = self.t.clock.now()
            raise AcquirerUnavailable("connection lost", outcome_unknown=True)
        self._link()
        return self.t.http.authorize(req)  # link down: not sent

    def reverse(self, original_key, key):
        from edge.terminal.sale.views import run_view

        self.reversals_tried += 1
        [run] = self.t.engine.list_runs()
        self.seen_while_pending.append(run_view(run))  # what the POS is told meanwhile
        self._link()
        return self.t.http.reverse(original_key, key)


def test_payment__a_lost_answer_then_a_long_outage_is_reversed_when_the_link_returns(
    terminal, acquirer
):
    """Issue 10: the customer was charged, the retries ran out with the link down, the
    reversal failed five times and the run ended FAILED with nothing in the outbox. Now
    the unknown outcome is recorded for the cloud at once, the reversal is retried for as
    long as the outage lasts (an hour here), and the POS is told the truth meanwhile."""
    flaky = LosesTheAnswerThenTheLink(terminal, outage_s=3600)
    terminal.use(acquirer=flaky)
    run = terminal.pay(2_500)
    assert run.status is Status.COMPLETED
    assert (run.state["decision"], run.state["reason"]) == ("declined", "acquirer_unreachable")
    assert run.state["reversed"] is True
    assert flaky.reversals_tried > 10  # many more than the five it used to give up after
    assert len(acquirer.effects("authorize")) == 1 and len(acquirer.effects("reverse")) == 1
    assert acquirer.net_minor("EUR") == 0  # not charged for a payment that failed
    pending = flaky.seen_while_pending[0]
    assert (pending["status"], pending["decision"], pending["reason"]) == (
        "RUNNING", "unknown", "reversal_pending",
    )  # fmt: skip
    assert "releasing it automatically" in pending["customer_message"]
    unknown, final = terminal.store.outbox()  # the cloud heard of it before the reversal
    assert (unknown.payload["decision"], unknown.payload["reason"]) == (
        "unknown", "reversal_pending",
    )  # fmt: skip
    assert unknown.payload["auth_key"] == run.state["auth_key"]
    assert (final.payload["decision"], final.payload["reversed"]) == ("declined", True)


def test_payment__a_pending_reversal_survives_a_restart_and_completes_on_the_next_engine(
    terminal, acquirer, store, tmp_path
):
    """The daemon's executor leaves a sleeping retry in the database; another process
    (a new Engine with another owner) picks the reversal up once it is due."""
    flaky = LosesTheAnswerThenTheLink(terminal, outage_s=float("inf"))
    services = dataclasses.replace(terminal.engine.services, acquirer=flaky)
    first = Engine(store, InlineExecutor(sleep=False), clock=terminal.clock, services=services)
    first.register(load_file(WORKFLOW))
    terminal.reader.insert(make_card("visa"))
    run_id = first.start("payment", {"amount_minor": 2_500, "currency": "EUR"})
    for _ in range(3):  # the daemon's loop: retries are picked up when due
        terminal.clock.advance(10)
        first.recover()
    run = first.get(run_id)
    assert run.status is Status.RUNNING and run.state["decision"] == "unknown"
    assert run.cursor["frames"][-1][0] == "reverse_unknown" and run.next_attempt_at
    first.close()  # the process is gone; its retry is durable
    terminal.link.up()
    terminal.clock.advance(3600)
    second = Engine(store, InlineExecutor(), clock=terminal.clock, services=services)
    second.register(load_file(WORKFLOW))
    assert run_id in second.recover()
    done = second.get(run_id)
    assert (done.status, done.state["decision"]) == (Status.COMPLETED, "declined")
    assert acquirer.net_minor("EUR") == 0
    second.close()


class _Crash(BaseException):
    """The process dies here: nothing after it commits (not catchable as Exception)."""


def test_payment__a_replayed_authorisation_that_sees_the_link_down_is_unknown_not_offline(
    terminal, acquirer, store
):
    """The daemon died after its request reached the acquirer; the process that takes the
    run over finds the link down. "Not sent" from this incarnation proves nothing about
    the one that died, so the outcome is unknown and reversed -- never decided offline
    (which could charge the customer twice)."""

    class SentThenDied:
        def authorize(self, req):
            terminal.http.authorize(req)  # approved at the acquirer...
            terminal.link.down()
            raise _Crash  # ...and the daemon is killed before it reads the answer

        def reverse(self, original_key, key):
            return terminal.http.reverse(original_key, key)

    limits = LIMITS.model_copy(update={"online_random_percent": 100})  # online, even if small
    services = dataclasses.replace(terminal.engine.services, limits=limits)
    dying = Engine(
        store,
        InlineExecutor(),
        clock=terminal.clock,
        services=dataclasses.replace(services, acquirer=SentThenDied()),
    )
    dying.register(load_file(WORKFLOW))
    terminal.reader.insert(make_card("visa"))
    with pytest.raises(_Crash):
        dying.start("payment", {"amount_minor": 1_000, "currency": "EUR"})
    terminal.clock.advance(DEFAULT_LEASE_S + 1)  # its lease runs out: the run is taken over
    heir = Engine(store, InlineExecutor(sleep=False), clock=terminal.clock, services=services)
    heir.register(load_file(WORKFLOW))
    [run_id] = heir.recover()
    for _ in range(3):  # its retries, as the daemon's loop picks them up
        terminal.clock.advance(10)
        heir.recover()
    mid = heir.get(run_id)  # the link is still down: the reversal waits
    assert mid.state["decision"] == "unknown" and mid.status is Status.RUNNING
    terminal.link.up()
    terminal.clock.advance(600)
    assert heir.recover() == [run_id]
    done = heir.get(run_id)
    assert done.state["decision"] == "declined" and done.state.get("offline") is None
    assert acquirer.net_minor("EUR") == 0 and len(acquirer.effects("reverse")) == 1
    heir.close()


def test_payment__nothing_sent_is_decided_offline_within_the_limits(terminal, acquirer):
    """The link drops between screening and the authorisation (its check is cached): no
    request leaves the terminal, so the sale is decided offline -- approved within the
    limits, or declined naming why -- instead of a bare failure."""

    class LinkDropsAfterScreening:
        def authorize(self, req):
            terminal.link.down()
            return terminal.http.authorize(req)  # not sent

        def reverse(self, original_key, key):
            raise AssertionError("nothing was sent: nothing to reverse")

    terminal.use(acquirer=LinkDropsAfterScreening())
    over_floor = terminal.pay(2_500)
    assert over_floor.status is Status.COMPLETED
    assert (over_floor.state["decision"], over_floor.state["reason"]) == (
        "declined", "acquirer_unreachable",
    )  # fmt: skip
    assert over_floor.state["offline_reason"] == "floor_limit"
    terminal.link.up()
    terminal.use(limits=LIMITS.model_copy(update={"online_random_percent": 100}))
    sampled = terminal.pay(1_000, card="mastercard")  # would have gone online
    assert (sampled.state["decision"], sampled.state["channel"]) == ("approved", "offline")
    assert acquirer.effects() == []
    assert [m.payload["decision"] for m in terminal.store.outbox()] == ["declined", "approved"]


def test_payment__a_reversal_after_a_jam_is_retried_through_an_outage(terminal, acquirer):
    """A jammed printer after approval reverses the authorisation (saga); with the link
    down the compensation waits -- the POS sees reversal_pending -- instead of ending
    FAILED with the customer charged."""
    from edge.terminal.sale.views import run_view

    seen: list[dict[str, Any]] = []

    class DownForAWhile:
        tries = 0

        def authorize(self, req):
            return terminal.http.authorize(req)

        def reverse(self, original_key, key):
            self.tries += 1
            [run] = terminal.engine.list_runs()
            seen.append(run_view(run))
            if self.tries == 1:
                terminal.link.down()
            if self.tries == 20:
                terminal.link.up()
            return terminal.http.reverse(original_key, key)

    terminal.use(acquirer=DownForAWhile())
    terminal.printer.state = "jam"
    run = terminal.pay(2_500)
    assert run.status is Status.ROLLED_BACK and run.state["decision"] == "reversed"
    assert acquirer.net_minor("EUR") == 0
    assert (seen[5]["status"], seen[5]["decision"], seen[5]["reason"]) == (
        "COMPENSATING", "unknown", "reversal_pending",
    )  # fmt: skip


def test_payment__a_policy_velocity_rule_counts_every_use_of_the_card(terminal):
    from edge.terminal.sale.policy import PolicyDocument, compile_policy

    doc = {"version": 1, "rules": [
        {"id": "burst", "type": "velocity", "max_count": 2, "window_s": 3600, "action": "decline"},
    ]}  # fmt: skip
    terminal.use(policy=compile_policy(PolicyDocument.model_validate(doc)))
    first, second = terminal.pay(500), terminal.pay(900, card="visa")
    assert [r.state["decision"] for r in (first, second)] == ["approved", "approved"]
    third = terminal.pay(700)
    assert third.state["decision"] == "declined" and third.state["reason"] == "policy"
    assert third.state["policy_reasons"] == ["velocity:burst"]
    assert terminal.pay(700, card="mastercard").state["decision"] == "approved"  # another card
    terminal.clock.advance(3600)  # the next window
    assert terminal.pay(700).state["decision"] == "approved"
