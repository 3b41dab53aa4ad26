"""The hardware simulators, and the HTTP acquirer driver against the simulated acquirer.

Everything runs on loopback and virtual time; no test sleeps to wait for a clock.
"""

from __future__ import annotations

import json
import logging
import random
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.clock import VirtualClock
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

from edge.engine.clock import FakeClock
from edge.errors import ConfigError, TillflowError
from edge.terminal.carddata import TEST_CARDS, Sensitive
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.drivers.contracts import (
    Acquirer,
    AcquirerError,
    AcquirerUnavailable,
    AuthRequest,
    CardReader,
    CardReadError,
    DeviceError,
    NetworkLink,
    PaperOut,
    Printer,
    PrinterJam,
)

VISA = "4111111111111111"
BAD_LUHN = "4111111111111112"
T0 = 1_700_000_000.0  # 2023-11-14, FakeClock's default start


def request(
    key: str = "run-1/charge/1", amount: int = 1250, pan: str = VISA, expiry: str = "3912"
) -> AuthRequest:
    return AuthRequest(
        pan=Sensitive(pan),
        expiry=expiry,
        amount_minor=amount,
        currency="EUR",
        idempotency_key=key,
        terminal_id="T-0001",
    )


def assert_no_clear_pan(text: str) -> None:
    for pan in (VISA, BAD_LUHN, *(p for p, _ in TEST_CARDS.values())):
        assert pan not in text


@pytest.fixture
def sim() -> Iterator[SimAcquirer]:
    with SimAcquirer() as server:
        yield server


@pytest.fixture
def acquirer(sim: SimAcquirer) -> Iterator[HttpAcquirer]:
    with HttpAcquirer(sim.url, timeout_s=2.0) as client:
        yield client


# --- the seams ------------------------------------------------------------------------------


def test_simulators__implement_the_ports(sim):
    assert isinstance(SimCardReader(), CardReader)
    assert isinstance(SimPrinter(), Printer)
    assert isinstance(SimNetworkLink(FakeClock()), NetworkLink)
    with HttpAcquirer(sim.url) as client:
        assert isinstance(client, Acquirer)


def test_device_errors__have_stable_codes_and_say_whether_retrying_helps():
    cases = [
        (CardReadError("timeout"), "card_read_failed", True),
        (CardReadError("removed"), "card_read_failed", True),
        (CardReadError("unreadable"), "card_read_failed", False),
        (PaperOut(), "printer_paper_out", False),
        (PrinterJam(), "printer_jam", True),
        (AcquirerUnavailable("down", outcome_unknown=False), "acquirer_unavailable", True),
        (AcquirerError("bad"), "acquirer_error", False),
    ]
    for err, code, retryable in cases:
        assert isinstance(err, DeviceError) and isinstance(err, TillflowError)
        assert (err.code, err.retryable) == (code, retryable)
    assert "load paper" in str(PaperOut())


def test_auth_request__rejects_malformed_values_and_never_shows_the_pan():
    assert_no_clear_pan(repr(request()))
    with pytest.raises(ValueError, match="amount_minor"):
        request(amount=0)
    with pytest.raises(ValueError, match="expiry"):
        request(expiry="12/39")
    with pytest.raises(ValueError, match="idempotency_key"):
        request(key="")


# --- clock ----------------------------------------------------------------------------------


def test_virtual_clock__fires_callbacks_in_time_order_reading_their_own_time():
    clock = VirtualClock(start=T0)
    fired: list[tuple[str, float]] = []
    clock.at(T0 + 5, lambda: fired.append(("b", clock.now())))
    clock.at(T0 + 2, lambda: fired.append(("a", clock.now())))
    clock.after(5, lambda: fired.append(("c", clock.now())))  # same time as b: after it
    clock.advance(1)
    assert fired == [] and clock.pending == 3
    clock.advance(10)
    assert fired == [("a", T0 + 2), ("b", T0 + 5), ("c", T0 + 5)]
    assert clock.now() == T0 + 11 and clock.pending == 0


def test_virtual_clock__sleep_fires_due_callbacks_and_callbacks_may_schedule_more():
    clock = VirtualClock(start=T0)
    fired: list[float] = []

    def tick() -> None:
        fired.append(clock.now() - T0)
        if len(fired) < 3:
            clock.after(1, tick)

    clock.at(T0 + 1, tick)
    clock.sleep(10)
    assert fired == [1, 2, 3]
    with pytest.raises(ValueError, match="already reads"):
        clock.at(T0, tick)
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)


# --- card reader ----------------------------------------------------------------------------


def test_card_reader__hands_over_queued_cards_in_order_then_times_out():
    reader = SimCardReader([make_card("visa")])
    mc = reader.insert_test_card("mastercard", entry_mode="contactless")
    assert reader.read(timeout_s=30).pan.reveal() == VISA
    second = reader.read(timeout_s=30)
    assert second is mc and second.entry_mode == "contactless" and second.expiry == "3912"
    with pytest.raises(CardReadError) as caught:
        reader.read(timeout_s=30)
    assert caught.value.reason == "timeout" and caught.value.retryable
    assert reader.reads == 3 and reader.queued == 0


def test_card_reader__a_timeout_spends_the_time_on_the_clock():
    clock = FakeClock(start=T0)
    reader = SimCardReader(clock=clock)
    with pytest.raises(CardReadError):
        reader.read(timeout_s=30)
    assert clock.now() == T0 + 30


def test_card_reader__reads_a_bad_luhn_card__judging_it_is_the_runtimes_job():
    reader = SimCardReader()
    reader.insert_test_card("bad_luhn", cvv=None)
    card = reader.read(timeout_s=1)
    assert card.pan.reveal() == BAD_LUHN and card.cvv is None


def test_card_reader__injected_failures_come_in_queue_order():
    reader = SimCardReader()
    reader.fail_next("removed")
    reader.insert_test_card("amex", cvv="1234")
    with pytest.raises(CardReadError) as caught:
        reader.read(timeout_s=1)
    assert caught.value.reason == "removed"
    assert reader.read(timeout_s=1).cvv == Sensitive("1234")
    with pytest.raises(ValueError, match="no test card named 'visaa'"):
        reader.insert_test_card("visaa")


# --- printer --------------------------------------------------------------------------------


def test_printer__keeps_what_it_printed():
    printer = SimPrinter()
    printer.print_receipt(["TILLFLOW", "TOTAL 12.50 EUR"])
    assert printer.printed == [["TILLFLOW", "TOTAL 12.50 EUR"]]


def test_printer__out_of_paper_fails_every_print_until_refilled():
    printer = SimPrinter()
    printer.state = "paper_out"
    for _ in range(2):
        with pytest.raises(PaperOut):
            printer.print_receipt(["x"])
    printer.refill()
    printer.print_receipt(["x"])
    assert printer.state == "ok" and printer.printed == [["x"]] and printer.attempts == 3


def test_printer__fail_next_fails_one_print_only():
    printer = SimPrinter()
    printer.fail_next("jam")
    with pytest.raises(PrinterJam):
        printer.print_receipt(["a"])
    printer.print_receipt(["b"])
    assert printer.printed == [["b"]] and printer.state == "ok"
    with pytest.raises(ValueError, match="printer state"):
        printer.state = "on_fire"  # type: ignore[assignment]


# --- network --------------------------------------------------------------------------------


def test_network__follows_the_down_windows_of_its_schedule():
    clock = FakeClock(start=T0)
    link = SimNetworkLink(clock, schedule=[(10, 20), (30, 31)])
    seen = []
    for _ in range(35):
        seen.append(link.is_up())
        clock.advance(1)
    down = [t for t, up in enumerate(seen) if not up]
    assert down == [*range(10, 20), 30]


def test_network__manual_switch_overrides_an_up_link():
    link = SimNetworkLink(FakeClock())
    link.down()
    assert not link.is_up()
    link.up()
    assert link.is_up()


def test_network__an_outage_outlives_the_manual_switch_and_then_ends():
    clock = FakeClock(start=T0)
    link = SimNetworkLink(clock)
    clock.advance(5)
    link.down_for(60)
    link.up()  # the weather says up; the outage says otherwise
    assert not link.is_up()
    clock.advance(59.9)
    assert not link.is_up()
    clock.advance(0.1)
    assert link.is_up()
    with pytest.raises(ValueError, match="positive"):
        link.down_for(0)


def test_network__loss_is_deterministic_by_seed():
    def pattern(seed: int) -> list[bool]:
        link = SimNetworkLink(FakeClock(), loss=0.3, rng=random.Random(seed))
        return [link.is_up() for _ in range(200)]

    assert pattern(7) == pattern(7)
    assert pattern(7) != pattern(8)
    assert 30 < pattern(7).count(False) < 90


def test_network__each_check_spends_the_latency_on_the_clock():
    clock = VirtualClock(start=T0)
    link = SimNetworkLink(clock, schedule=[(1, 2)], latency_s=0.5)
    assert [link.is_up() for _ in range(4)] == [True, False, False, True]
    assert clock.now() == T0 + 2


# --- acquirer over loopback -----------------------------------------------------------------


def test_acquirer__approves_and_records_a_masked_pan(sim, acquirer):
    response = acquirer.authorize(request())
    assert response.approved and response.auth_code and response.acquirer_ref
    assert response.reason is None
    (entry,) = sim.ledger.values()
    assert (entry.key, entry.operation, entry.amount_minor, entry.currency) == (
        "run-1/charge/1",
        "authorize",
        1250,
        "EUR",
    )
    assert entry.masked_pan == "411111******1111" and entry.effect
    assert sim.received == [("/authorize", "run-1/charge/1")]
    assert sim.net_minor("EUR") == 1250


def test_acquirer__declines_with_the_reason_configured(sim, acquirer):
    sim.set_mode("decline", reason="insufficient_funds")
    response = acquirer.authorize(request())
    assert not response.approved and response.auth_code is None
    assert response.reason == "insufficient_funds"
    assert sim.effects() == [] and sim.net_minor() == 0


def test_acquirer__declines_by_bin_amount_luhn_and_expiry(sim, acquirer):
    sim.decline_bin("555555", reason="bin_blocked")
    sim.decline_over(100_00, reason="exceeds_limit")
    mastercard, _ = TEST_CARDS["mastercard"]
    assert acquirer.authorize(request("k1", pan=mastercard)).reason == "bin_blocked"
    assert acquirer.authorize(request("k2", amount=100_01)).reason == "exceeds_limit"
    assert acquirer.authorize(request("k3", amount=100_00)).approved
    assert acquirer.authorize(request("k4", pan=BAD_LUHN)).reason == "invalid_card"
    with SimAcquirer(clock=FakeClock(start=T0)) as dated, HttpAcquirer(dated.url) as client:
        assert client.authorize(request("k5", expiry="2310")).reason == "expired_card"
        assert client.authorize(request("k6", expiry="2311")).approved  # good through Nov


def test_acquirer__same_idempotency_key_twice__one_effect_same_answer(sim, acquirer):
    first = acquirer.authorize(request("run-7/charge/1"))
    again = acquirer.authorize(request("run-7/charge/1"))
    assert again == first
    assert len(sim.received) == 2
    assert [e.key for e in sim.effects("authorize")] == ["run-7/charge/1"]
    assert sim.ledger["run-7/charge/1"].replays == 1
    assert sim.net_minor() == 1250


def test_acquirer__a_key_reused_for_another_request_is_refused(sim, acquirer):
    acquirer.authorize(request("k"))
    with pytest.raises(AcquirerError) as caught:
        acquirer.authorize(request("k", amount=9999))
    assert caught.value.status == 422 and not caught.value.retryable
    assert "idempotency_key_reused" in str(caught.value)
    assert sim.net_minor() == 1250


def test_acquirer__timeout_is_unavailable_with_unknown_outcome__retry_finds_it_done(sim):
    sim.set_mode("timeout")
    # The server holds the reply until stop(): returning at all proves the client timed out.
    with HttpAcquirer(sim.url, timeout_s=0.2) as client:
        with pytest.raises(AcquirerUnavailable) as caught:
            client.authorize(request("run-9/charge/1"))
        assert caught.value.outcome_unknown and caught.value.retryable
        assert "0.2s" in str(caught.value)
        sim.set_mode("approve")
        retried = client.authorize(request("run-9/charge/1"))
    assert retried.approved
    assert retried == sim.ledger["run-9/charge/1"].response
    assert len(sim.effects()) == 1


def test_acquirer__a_lost_reply_is_released_by_reversing_it(sim):
    sim.set_mode("timeout")
    with HttpAcquirer(sim.url, timeout_s=0.1) as client:
        with pytest.raises(AcquirerUnavailable):
            client.authorize(request("lost"))
        sim.set_mode("approve")
        assert sim.net_minor() == 1250  # it did happen, the terminal just never heard
        assert client.reverse("lost", "lost:rev").approved
    assert sim.net_minor() == 0


def test_acquirer__a_lost_reply_takes_effect_and_the_client_knows_at_once(sim, acquirer):
    sim.lose_reply("run-5/charge/1")
    with pytest.raises(AcquirerUnavailable) as caught:
        acquirer.authorize(request("run-5/charge/1"))
    assert caught.value.outcome_unknown  # a connection lost, not a timeout to sit out
    assert sim.lost_replies == 1 and sim.net_minor() == 1250  # charged all the same
    again = acquirer.authorize(request("run-5/charge/1"))  # one reply lost, not the next
    assert again.approved and again == sim.ledger["run-5/charge/1"].response
    assert sim.ledger["run-5/charge/1"].replays == 1


def test_acquirer__drop_mode_answers_nothing_and_does_nothing(sim, acquirer):
    sim.set_mode("drop")
    with pytest.raises(AcquirerUnavailable) as caught:
        acquirer.authorize(request("run-6/charge/1"))
    assert caught.value.outcome_unknown  # the terminal cannot tell it never arrived
    with pytest.raises(AcquirerUnavailable):
        acquirer.reverse("run-6/charge/1", "run-6/reverse/1")
    assert sim.ledger == {} and sim.dropped == 2
    sim.set_mode("approve")
    assert acquirer.authorize(request("run-6/charge/1")).approved


def test_acquirer__concurrent_requests_with_one_key_take_effect_once(sim, acquirer):
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: acquirer.authorize(request("race")), range(8)))
    assert all(a == answers[0] for a in answers) and answers[0].approved
    assert len(sim.effects()) == 1 and sim.ledger["race"].replays == 7


def test_acquirer__link_down__nothing_is_sent(sim):
    link = SimNetworkLink(FakeClock())
    link.down()
    with HttpAcquirer(sim.url, link=link) as client:
        with pytest.raises(AcquirerUnavailable) as caught:
            client.authorize(request())
        assert not caught.value.outcome_unknown
        with pytest.raises(AcquirerUnavailable):
            client.reverse("run-1/charge/1", "run-1/charge/1:reverse")
        link.up()
        assert client.authorize(request()).approved
    assert sim.received == [("/authorize", "run-1/charge/1")]


def test_acquirer__nobody_listening__unavailable_and_nothing_sent():
    with SimAcquirer() as gone:
        url = gone.url
    with HttpAcquirer(url, timeout_s=1.0) as client, pytest.raises(AcquirerUnavailable) as caught:
        client.authorize(request())
    assert not caught.value.outcome_unknown


def test_acquirer__reversal_releases_the_auth_once(sim, acquirer):
    acquirer.authorize(request("auth"))
    reversal = acquirer.reverse("auth", "auth:rev")
    assert reversal.approved and reversal.reason is None
    assert sim.net_minor() == 0
    assert acquirer.reverse("auth", "auth:rev") == reversal  # replay
    second = acquirer.reverse("auth", "auth:rev-again")
    assert second.approved and second.reason == "already_reversed"
    assert [e.key for e in sim.effects("reverse")] == ["auth:rev"]
    entry = sim.ledger["auth:rev"]
    assert (entry.reverses, entry.amount_minor, entry.masked_pan) == (
        "auth",
        1250,
        "411111******1111",
    )


def test_acquirer__reversal_that_overtakes_its_auth_voids_it(sim, acquirer):
    reversal = acquirer.reverse("late", "late:rev")
    assert reversal.approved and reversal.reason == "original_not_found"
    late = acquirer.authorize(request("late"))
    assert not late.approved and late.reason == "reversed"
    assert sim.effects() == [] and sim.net_minor() == 0


def test_acquirer__declined_or_refund_originals_are_not_reversed(sim, acquirer):
    sim.set_mode("decline")
    acquirer.authorize(request("declined"))
    sim.set_mode("approve")
    assert acquirer.reverse("declined", "r1").reason == "original_declined"
    refund = acquirer.refund(request("refund-1", amount=500))
    assert refund.approved and sim.net_minor() == -500
    not_reversible = acquirer.reverse("refund-1", "r2")
    assert not not_reversible.approved and not_reversible.reason == "not_reversible"
    assert [e.operation for e in sim.effects()] == ["refund"]


def test_acquirer__slow_mode_answers_after_its_latency(sim, acquirer):
    sim.set_mode("slow", latency_s=0.01)
    assert acquirer.authorize(request()).approved


def test_acquirer__server_errors_are_acquirer_errors_retryable_only_when_transient(sim, acquirer):
    sim.set_mode("error")
    with pytest.raises(AcquirerError) as caught:
        acquirer.authorize(request())
    assert caught.value.status == 500 and not caught.value.retryable
    sim.error_status = 503
    with pytest.raises(AcquirerError) as caught:
        acquirer.authorize(request())
    assert caught.value.status == 503 and caught.value.retryable
    assert sim.ledger == {}


def test_acquirer__malformed_response_is_an_acquirer_error_naming_the_fields():
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.headers["Idempotency-Key"] == "k"
        assert json.loads(req.content)["pan"] == VISA  # the clear PAN: in the body only
        assert VISA not in str(req.url) and VISA not in str(req.headers)
        return httpx.Response(200, json={"approved": "yes", "auth_code": VISA})

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = HttpAcquirer("https://acquirer.test", client=http)
        with pytest.raises(AcquirerError) as caught:
            client.authorize(request("k"))
    assert "approved" in str(caught.value)
    assert_no_clear_pan("".join(traceback.format_exception(caught.value)))


def test_acquirer__no_clear_pan_in_ledger_errors_or_logs(sim, acquirer, caplog):
    caplog.set_level(logging.DEBUG)
    acquirer.authorize(request("a"))
    acquirer.refund(request("r", pan=BAD_LUHN))
    errors: list[BaseException] = []
    with pytest.raises(AcquirerError) as reused:
        acquirer.authorize(request("a", amount=1))
    errors.append(reused.value)
    sim.set_mode("timeout")
    with HttpAcquirer(sim.url, timeout_s=0.1) as fast, pytest.raises(AcquirerUnavailable) as lost:
        fast.authorize(request("b"))
    errors.append(lost.value)
    # The server refuses a bad body without quoting it either.
    sim.set_mode("approve")
    bad = {"pan": VISA, "expiry": "3912", "amount_minor": -1, "currency": "EUR"}
    with httpx.Client(trust_env=False) as raw:
        refused = raw.post(f"{sim.url}/authorize", json=bad, headers={"Idempotency-Key": "x"})
    assert refused.status_code == 400
    assert "amount_minor" in refused.text and "terminal_id" in refused.text
    assert_no_clear_pan(refused.text)
    assert_no_clear_pan(repr(sim.ledger) + repr(sim.received))
    for err in errors:
        assert_no_clear_pan("".join(traceback.format_exception(err)))
    assert any(r.name == "edge.terminal.drivers.acquirer_http" for r in caplog.records)
    assert_no_clear_pan(caplog.text + repr([r.__dict__ for r in caplog.records]))


def test_http_acquirer__refuses_an_unusable_url():
    with pytest.raises(ConfigError):
        HttpAcquirer("ftp://acquirer.test")
    with pytest.raises(ConfigError):
        HttpAcquirer("http://acquirer.test", timeout_s=0)
