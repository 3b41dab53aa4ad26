"""The HTTP device drivers against the simulated device server, over loopback.

Every server is stopped in teardown; every wait is bounded and short.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hwsim.card_reader import SimCardReader
from hwsim.clock import VirtualClock
from hwsim.devices import SimDeviceServer
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

from edge.engine.clock import FakeClock
from edge.errors import ConfigError
from edge.terminal.carddata import TEST_CARDS, CardRead
from edge.terminal.drivers.contracts import (
    CardReader,
    CardReadError,
    NetworkLink,
    PaperOut,
    Printer,
    PrinterError,
    PrinterJam,
)
from edge.terminal.drivers.devices_http import (
    HttpCardReader,
    HttpNetworkLink,
    HttpPrinter,
    PrinterUnavailable,
)

VISA = TEST_CARDS["visa"][0]
CVV = "737"


def assert_no_card_data(text: str, *, cvv: bool = True) -> None:
    """No clear PAN in ``text``; nor the CVV, unless ``cvv=False`` (three digits turn up
    by chance in timestamps and thread ids)."""
    for pan, _ in TEST_CARDS.values():
        assert pan not in text
    if cvv:
        assert CVV not in text


def failure_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(vars(exc))


@pytest.fixture
def devices() -> Iterator[SimDeviceServer]:
    with SimDeviceServer() as server:
        yield server


@pytest.fixture
def control(devices: SimDeviceServer) -> Iterator[Callable[..., httpx.Response]]:
    """What the simulated POS does: call the server's control endpoints."""
    with httpx.Client(base_url=devices.url, trust_env=False, timeout=2.0) as http:

        def call(path: str, body: dict[str, Any] | None = None) -> httpx.Response:
            if body is None:
                return http.get(path)
            return http.post(path, json=body)

        yield call


@pytest.fixture
def reader(devices: SimDeviceServer) -> Iterator[HttpCardReader]:
    with HttpCardReader(devices.url, timeout_s=1.0) as driver:
        yield driver


@pytest.fixture
def printer(devices: SimDeviceServer) -> Iterator[HttpPrinter]:
    with HttpPrinter(devices.url, timeout_s=1.0) as driver:
        yield driver


@pytest.fixture
def gone_url() -> str:
    """A loopback URL nobody listens on any more."""
    with SimDeviceServer() as server:
        return server.url


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


# --- the seams -------------------------------------------------------------------------------


def test_drivers__implement_the_ports(devices):
    with (
        HttpCardReader(devices.url) as reader,
        HttpPrinter(devices.url) as printer,
        HttpNetworkLink(devices.url + "/link") as link,
    ):
        assert isinstance(reader, CardReader)
        assert isinstance(printer, Printer)
        assert isinstance(link, NetworkLink)
        assert repr(reader) == f"HttpCardReader({devices.url!r})"


def test_drivers__refuse_unusable_configuration():
    for make in (HttpCardReader, HttpPrinter, HttpNetworkLink):
        with pytest.raises(ConfigError):
            make("ftp://devices.test")
        with pytest.raises(ConfigError):
            make("not a url")
    with pytest.raises(ConfigError):
        HttpCardReader("http://devices.test", timeout_s=0)
    with pytest.raises(ConfigError):
        HttpNetworkLink("http://devices.test/link", cache_s=-1)


# --- card reader -----------------------------------------------------------------------------


def test_card_reader__reads_a_card_inserted_through_control(devices, control, reader, caplog):
    caplog.set_level(logging.DEBUG)
    inserted = control("/control/insert", {"card": "visa", "cvv": CVV, "entry_mode": "contactless"})
    assert inserted.status_code == 200
    assert inserted.json()["inserted"] == "411111******1111"

    card = reader.read(1.0)

    assert isinstance(card, CardRead)
    assert card.masked == "411111******1111" and card.expiry == "3912"
    assert card.entry_mode == "contactless"
    assert card.pan.reveal() == VISA and card.cvv is not None and card.cvv.reveal() == CVV
    assert card.track2 is None and card.pin_block is None
    assert any(r.name == "edge.terminal.drivers.devices_http" for r in caplog.records)
    assert_no_card_data(repr(card) + repr(reader) + repr(devices.received))
    assert_no_card_data("\n".join(r.getMessage() for r in caplog.records))
    assert_no_card_data(caplog.text + repr([r.__dict__ for r in caplog.records]), cvv=False)


def test_card_reader__a_card_without_cvv_reads_as_none(control, reader):
    control("/control/insert", {"card": "amex", "cvv": None})
    card = reader.read(1.0)
    assert card.masked == "378282*****0005" and card.cvv is None


def test_card_reader__long_polls_until_a_card_is_inserted(devices, reader):
    threading.Timer(0.1, devices.insert_test_card, args=("mastercard",)).start()
    started = time.monotonic()
    card = reader.read(3.0)
    assert card.last4 == "4444"
    assert time.monotonic() - started < 1.5  # answered on insert, not at the deadline


def test_card_reader__no_card__times_out_promptly(devices, reader):
    started = time.monotonic()
    with pytest.raises(CardReadError) as caught:
        reader.read(0.2)
    elapsed = time.monotonic() - started
    assert caught.value.reason == "timeout" and caught.value.retryable
    assert 0.15 <= elapsed < 1.5
    assert devices.reader.reads == 1


def test_card_reader__reports_removed_and_unreadable_in_queue_order(control, reader):
    assert control("/control/insert", {"fail": "removed"}).status_code == 200
    control("/control/insert", {"card": "visa"})
    assert control("/control/insert", {"fail": "unreadable"}).status_code == 200
    with pytest.raises(CardReadError) as removed:
        reader.read(1.0)
    assert removed.value.reason == "removed"
    assert reader.read(1.0).last4 == "1111"
    with pytest.raises(CardReadError) as unreadable:
        reader.read(1.0)
    assert unreadable.value.reason == "unreadable" and not unreadable.value.retryable


def test_card_reader__stop_releases_a_waiting_read():
    server = SimDeviceServer().start()
    errors: list[BaseException] = []
    try:
        with HttpCardReader(server.url, timeout_s=1.0) as reader:

            def read() -> None:
                try:
                    reader.read(10.0)
                except CardReadError as exc:
                    errors.append(exc)

            waiting = threading.Thread(target=read)
            waiting.start()
            deadline = time.monotonic() + 2.0
            while not server.received and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            server.stop()
            waiting.join(timeout=3.0)
            assert not waiting.is_alive()
            assert time.monotonic() - started < 1.5
    finally:
        server.stop()
    assert len(errors) == 1 and isinstance(errors[0], CardReadError)
    assert errors[0].reason == "unreadable"


def test_card_reader__unreachable__unreadable_naming_the_url_without_hanging(gone_url):
    started = time.monotonic()
    with HttpCardReader(gone_url, timeout_s=1.0) as reader, pytest.raises(CardReadError) as caught:
        reader.read(5.0)
    assert time.monotonic() - started < 2.0
    assert caught.value.reason == "unreadable"
    assert gone_url in str(caught.value)


def test_card_reader__a_service_that_hangs_is_unreadable_after_the_grace():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with mock_client(handler) as http:
        reader = HttpCardReader("http://reader.test", client=http, timeout_s=0.5)
        with pytest.raises(CardReadError) as caught:
            reader.read(1.0)
    assert caught.value.reason == "unreadable" and "1.5s" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, {"pan": VISA, "expiry": "13/99", "entry_mode": "chip", "cvv": CVV}, "expiry"),
        (200, {"pan": VISA + "0000", "expiry": "3912", "entry_mode": "chip"}, "pan"),
        (200, {"pan": VISA, "expiry": "3912", "entry_mode": "telepathy"}, "entry_mode"),
        (200, {"pan": VISA, "expiry": "3912"}, "without entry_mode"),
        (200, [VISA], "not a JSON object"),
        (500, {"detail": VISA}, "HTTP 500"),
        (409, {"error": {"reason": "melted"}}, "'melted'"),
        (409, {"error": {"reason": VISA}}, "unnamed error"),
        (409, {"error": {"reason": "card" + VISA}}, "unnamed error"),
    ],
)
def test_card_reader__an_unusable_answer_is_unreadable_and_never_quotes_it(status, body, expected):
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/devices/card/read"
        return httpx.Response(status, json=body)

    with mock_client(handler) as http:
        reader = HttpCardReader("http://reader.test/devices/", client=http)
        with pytest.raises(CardReadError) as caught:
            reader.read(1.0)
    assert caught.value.reason == "unreadable"
    assert expected in str(caught.value)
    assert_no_card_data(failure_text(caught.value))


def test_card_reader__tolerates_fields_a_newer_service_adds():
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"pan": VISA, "expiry": "3912", "entry_mode": "swipe", "aid": "A0000000031010"}
        return httpx.Response(200, json=body)

    with mock_client(handler) as http:
        card = HttpCardReader("http://reader.test", client=http).read(1.0)
    assert card.entry_mode == "swipe" and card.cvv is None


def test_card_reader__refuses_a_negative_timeout(reader):
    with pytest.raises(ValueError):
        reader.read(-1)


# --- printer ---------------------------------------------------------------------------------


def test_printer__prints_and_control_lists_the_receipts(control, printer):
    printer.print_receipt(["TERMINAL T-1", "AMOUNT 12.50 EUR"])
    printer.print_receipt(["second"])
    assert control("/control/printed").json() == {
        "printed": [["TERMINAL T-1", "AMOUNT 12.50 EUR"], ["second"]]
    }


def test_printer__paper_out_and_jam_as_the_printer_reports_them(devices, control, printer):
    assert control("/control/printer", {"state": "paper_out"}).status_code == 200
    with pytest.raises(PaperOut) as paper_out:
        printer.print_receipt(["a"])
    assert not paper_out.value.retryable
    control("/control/printer", {"state": "jam"})
    with pytest.raises(PrinterJam) as jam:
        printer.print_receipt(["b"])
    assert type(jam.value) is PrinterJam and jam.value.retryable
    control("/control/printer", {"state": "ok"})
    control("/control/printer", {"fail_next": "jam"})
    with pytest.raises(PrinterJam):
        printer.print_receipt(["c"])
    printer.print_receipt(["d"])
    assert devices.printed == [["d"]]


def test_printer__unreachable__retryable_unavailable_not_paper_out(gone_url):
    started = time.monotonic()
    with HttpPrinter(gone_url, timeout_s=1.0) as printer, pytest.raises(PrinterJam) as caught:
        printer.print_receipt(["a"])
    assert time.monotonic() - started < 2.0
    err = caught.value
    assert isinstance(err, PrinterUnavailable) and not isinstance(err, PaperOut)
    assert err.retryable and not err.outcome_unknown and err.code == "printer_unavailable"
    assert gone_url in str(err)


@pytest.mark.parametrize(
    ("answer", "outcome_unknown", "expected"),
    [
        (httpx.ReadTimeout("timed out"), True, "may have printed"),
        (httpx.RemoteProtocolError("closed"), True, "may have printed"),
        (httpx.Response(503), False, "HTTP 503"),
        (httpx.Response(409, json={"error": {"code": "cover_open"}}), False, "'cover_open'"),
    ],
)
def test_printer__failures_that_may_pass_are_unavailable(answer, outcome_unknown, expected):
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    with mock_client(handler) as http:
        printer = HttpPrinter("http://printer.test", client=http)
        with pytest.raises(PrinterUnavailable) as caught:
            printer.print_receipt(["a"])
    assert caught.value.outcome_unknown is outcome_unknown and caught.value.retryable
    assert expected in str(caught.value)


def test_printer__a_4xx_without_a_device_code_is_a_configuration_error():
    with mock_client(lambda request: httpx.Response(404)) as http:
        printer = HttpPrinter("http://printer.test", client=http)
        with pytest.raises(PrinterError) as caught:
            printer.print_receipt(["a"])
    assert not isinstance(caught.value, PrinterJam) and not caught.value.retryable
    assert "printer URL" in str(caught.value)


# --- network link ----------------------------------------------------------------------------


class Ticks:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def link_checks(devices: SimDeviceServer) -> int:
    return devices.received.count(("GET", "/link"))


def test_link__follows_control_within_the_cache_period(devices, control):
    ticks = Ticks()
    with HttpNetworkLink(devices.url + "/link", cache_s=1.0, clock=ticks) as link:
        assert link.is_up()
        control("/control/link", {"up": False})
        ticks.now += 0.5
        assert link.is_up()  # cached: no round trip
        assert link_checks(devices) == 1
        ticks.now += 0.5
        assert not link.is_up()
        assert not link.is_up()
        assert link_checks(devices) == 2
        control("/control/link", {"up": True})
        link.invalidate()
        assert link.is_up()
        assert link_checks(devices) == 3 and link.checks == 3


def test_link__drives_a_simulated_network_link():
    sim_link = SimNetworkLink(FakeClock())
    with (
        SimDeviceServer(link=sim_link) as devices,
        HttpNetworkLink(devices.url + "/link", cache_s=0) as link,
        httpx.Client(trust_env=False) as http,
    ):
        assert link.is_up()
        sim_link.down()
        assert not link.is_up()
        assert http.get(devices.url + "/link").status_code == 503
        http.post(devices.url + "/control/link", json={"up": True})
        assert link.is_up() and sim_link.checks == 4  # three by the driver, one by hand


def test_link__unreachable_or_broken_is_down_and_never_raises(gone_url):
    started = time.monotonic()
    with HttpNetworkLink(gone_url + "/link", timeout_s=0.5) as link:
        assert not link.is_up()
    assert time.monotonic() - started < 1.5

    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("transport bug")

    with mock_client(broken) as http:
        assert not HttpNetworkLink("http://acquirer.test/health", client=http).is_up()
    with mock_client(lambda request: httpx.Response(302)) as http:
        assert not HttpNetworkLink("http://acquirer.test/health", client=http).is_up()


# --- the simulator ---------------------------------------------------------------------------


def test_sim__refuses_bad_control_requests(control):
    assert control("/control/insert", {"card": "diners"}).status_code == 400
    assert control("/control/insert", {"fail": "timeout"}).status_code == 400
    assert control("/control/printer", {"state": "smoking"}).status_code == 400
    assert control("/control/link", {"up": "yes"}).status_code == 400
    assert control("/card/read").status_code == 405
    missing = control("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_sim__with_a_virtual_clock_nothing_waits_on_the_wall_clock():
    clock = VirtualClock()
    reader = SimCardReader()
    start = clock.now()
    with (
        SimDeviceServer(reader, SimPrinter(), clock=clock) as devices,
        HttpCardReader(devices.url) as driver,
    ):
        started = time.monotonic()
        with pytest.raises(CardReadError) as caught:
            driver.read(30.0)
        assert caught.value.reason == "timeout"
        assert clock.now() == start + 30.0
        clock.after(3.0, lambda: devices.insert_test_card("visa"))
        assert driver.read(30.0).last4 == "1111"  # presented at second 3 of the wait
        assert time.monotonic() - started < 1.0


def test_drivers__share_one_tls_context_that_verifies_certificates():
    from edge.terminal.drivers._http import tls_context

    reader, printer = HttpCardReader("https://127.0.0.1:9"), HttpPrinter("https://127.0.0.1:9")
    link = HttpNetworkLink("https://127.0.0.1:9/link")
    try:
        contexts = {
            id(d._client._transport._pool._ssl_context)  # type: ignore[attr-defined]
            for d in (reader, printer, link)
        }
        assert contexts == {id(tls_context())}
        assert tls_context().verify_mode == ssl.CERT_REQUIRED and tls_context().check_hostname
    finally:
        for d in (reader, printer, link):
            d.close()
