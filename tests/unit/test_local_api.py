"""The POS app's local API over a Unix socket, on a terminal with simulated hardware."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from carddata_scan import describe, scan, sqlite_files
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter
from pydantic import ValidationError

from edge.engine import FakeClock
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.api import LocalApi, LocalApiServer
from edge.terminal.service.terminal import Terminal

#: The public Visa test number.
TEST_PAN = "4111111111111111"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tf-api-"))  # AF_UNIX paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pos(tmp_path, sock_dir) -> Iterator[tuple[httpx.Client, Terminal, SimCardReader, SimPrinter]]:
    clock = FakeClock(2_000_000_000.0)
    reader, printer, link = SimCardReader(), SimPrinter(), SimNetworkLink(clock)
    with SimAcquirer() as acquirer, HttpAcquirer(acquirer.url, link=link, timeout_s=2) as http:
        cfg = EdgeConfig(
            device_id="T-API",
            data_dir=tmp_path / "data",
            socket_path=sock_dir / "edge.sock",
            risk=RiskLimits(online_random_percent=0),
        )
        terminal = Terminal(cfg, Peripherals(reader, printer, http, link), clock=clock)
        server = LocalApiServer(cfg.socket_path, terminal).start()
        client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(cfg.socket_path)), base_url="http://pos"
        )
        try:
            yield client, terminal, reader, printer
        finally:
            client.close()
            server.stop()
            terminal.close()


def test_api__a_payment_is_approved_and_a_retry_returns_the_same_run(pos):
    client, terminal, reader, _ = pos
    reader.insert(make_card("visa"))
    body = {"amount_minor": 1250, "currency": "EUR", "idempotency_key": "sale-1"}
    first = client.post("/v1/payments", json=body)
    assert first.status_code == 200, first.text
    run = first.json()
    assert (run["status"], run["decision"]) == ("COMPLETED", "approved")
    assert run["masked_pan"] == "411111******1111" and "pan_token" not in first.text
    again = client.post("/v1/payments", json=body)  # no card inserted: a new run would fail
    assert again.json()["run_id"] == run["run_id"]
    assert client.get(f"/v1/runs/{run['run_id']}").json()["decision"] == "approved"
    assert terminal.store.outbox_stats().depth == 1


GOOD = {"amount_minor": 100, "currency": "EUR", "idempotency_key": "k"}


def _with(**changes):
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (_with(idempotency_key=None), 422, "missing_field", "idempotency_key"),
        (_with(amount_minor=-5), 422, "invalid_field", "amount_minor"),
        (_with(currency="euro"), 422, "invalid_field", "currency"),
        (_with(amount_minor="100"), 422, "invalid_field", "amount_minor"),
        (_with(cvv="123"), 422, "unknown_field", "cvv"),
    ],
)
def test_api__malformed_payments_get_a_machine_readable_4xx(pos, body, status, code, field):
    client, terminal, _, _ = pos
    r = client.post("/v1/payments", json=body)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["field"] == field
    assert terminal.engine.list_runs() == []


def test_api__not_json_unknown_route_and_unknown_run(pos):
    client, _, _, _ = pos
    r = client.post(
        "/v1/payments", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "malformed_json")
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert client.get("/v1/runs/nope").status_code == 404
    assert client.get("/v1/payments").status_code == 405


def test_api__paper_out_waits_and_input_resumes_it(pos):
    client, _, reader, printer = pos
    reader.insert(make_card("visa"))
    printer.state = "paper_out"
    run = client.post(
        "/v1/payments", json={"amount_minor": 900, "currency": "EUR", "idempotency_key": "p"}
    ).json()
    assert (run["status"], run["waiting_for"]) == ("WAITING", "await_paper")
    printer.refill()
    done = client.post(f"/v1/runs/{run['run_id']}/input", json={})
    assert done.status_code == 200 and done.json()["status"] == "COMPLETED"
    again = client.post(f"/v1/runs/{run['run_id']}/input", json={})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "not_waiting")


def test_api__health_reports_outbox_exposure_and_budget(pos):
    client, _, reader, _ = pos
    reader.insert(make_card("visa"))
    client.post(
        "/v1/payments", json={"amount_minor": 900, "currency": "EUR", "idempotency_key": "h"}
    )
    health = client.get("/v1/health").json()
    assert health["device_id"] == "T-API" and health["outbox_depth"] == 1
    assert health["db_bytes"] > 0 and health["db_budget_bytes"] == 256 * 1024 * 1024
    assert health["link_up"] is True and health["last_error"] is None


def test_api__a_full_outbox_declines_new_payments_with_its_reason(tmp_path, sock_dir):
    clock = FakeClock(2_000_000_000.0)
    reader, printer, link = SimCardReader(), SimPrinter(), SimNetworkLink(clock)
    with SimAcquirer() as acquirer, HttpAcquirer(acquirer.url, link=link, timeout_s=2) as http:
        cfg = EdgeConfig(
            device_id="T-FULL",
            data_dir=tmp_path / "data",
            socket_path=sock_dir / "edge.sock",
            outbox_max_messages=1,
            risk=RiskLimits(online_random_percent=0),
        )
        terminal = Terminal(cfg, Peripherals(reader, printer, http, link), clock=clock)
        server = LocalApiServer(cfg.socket_path, terminal).start()
        transport = httpx.HTTPTransport(uds=str(cfg.socket_path))
        try:
            with httpx.Client(transport=transport, base_url="http://pos") as client:
                for key in ("a", "b"):
                    reader.insert(make_card("visa"))
                    body = {"amount_minor": 900, "currency": "EUR", "idempotency_key": key}
                    last = client.post("/v1/payments", json=body).json()
                assert (last["status"], last["reason"]) == ("COMPLETED", "outbox_full")
                assert client.get("/v1/health").json()["outbox_depth"] == 1
        finally:
            server.stop()
            terminal.close()


# --- idempotency keys: bound to the request, printable ------------------------------------


def test_api__the_same_key_with_other_parameters_is_409_naming_the_fields(pos):
    client, terminal, reader, _ = pos
    reader.insert(make_card("visa"))
    body = {"amount_minor": 1250, "currency": "EUR", "idempotency_key": "sale-9"}
    first = client.post("/v1/payments", json=body).json()
    r = client.post("/v1/payments", json={**body, "amount_minor": 1350})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("idempotency_key_reused", "amount_minor")
    assert "amount_minor" in error["message"] and "currency" not in error["message"]
    again = client.post("/v1/payments", json=body)  # the same parameters: the same run
    assert (again.status_code, again.json()["run_id"]) == (200, first["run_id"])
    assert [run.run_id for run in terminal.engine.list_runs()] == [first["run_id"]]


def test_api__a_refund_key_reused_for_another_original_payment_is_409(pos):
    client, _, reader, _ = pos
    reader.insert(make_card("visa"))
    body = {"amount_minor": 100, "currency": "EUR", "idempotency_key": "ref-1"}
    assert client.post("/v1/refunds", json=body).status_code == 200
    r = client.post("/v1/refunds", json={**body, "original_run_id": "abc"})
    assert (r.status_code, r.json()["error"]["field"]) == (409, "original_run_id")


@pytest.mark.parametrize(
    "key",
    [" ", "a b", "a\x00b", "a\nb", "tab\t", "caf\u00e9", "\u202eevil", "", "k" * 129],
    ids=["space", "inner-space", "nul", "newline", "tab", "non-ascii", "bidi", "empty", "long"],
)
def test_api__idempotency_keys_are_visible_ascii(pos, key):
    client, terminal, _, _ = pos
    for path, body in (
        ("/v1/payments", {"amount_minor": 100, "currency": "EUR"}),
        ("/v1/voids", {"payment_run_id": "abc"}),
    ):
        r = client.post(path, json={**body, "idempotency_key": key})
        assert r.status_code == 422, r.text
        assert r.json()["error"] == {
            "code": "invalid_field",
            "message": r.json()["error"]["message"],
            "field": "idempotency_key",
        }
    assert terminal.engine.list_runs() == []


def test_api__uuid_ulid_and_path_like_keys_are_accepted(pos):
    client, _, reader, _ = pos
    keys = ["0b1e8a3c-5f7d-4c2e-9a61-3d2f0e8b7c11", "01HZX3K9Q2V7T8M4N6P0R5S1WY", "till/3#42~x"]
    for key in keys:
        reader.insert(make_card("visa"))
        body = {"amount_minor": 100, "currency": "EUR", "idempotency_key": key}
        r = client.post("/v1/payments", json=body)
        assert (r.status_code, r.json()["status"]) == (200, "COMPLETED"), r.text


# --- currencies: the ones this terminal is configured for -----------------------------------


@pytest.mark.parametrize("currency", ["XXX", "ZZZ", "USD"])
@pytest.mark.parametrize("path", ["/v1/payments", "/v1/refunds"])
def test_api__a_currency_the_terminal_does_not_accept_is_422(pos, path, currency):
    client, terminal, reader, _ = pos
    reader.insert(make_card("visa"))
    body = {"amount_minor": 100, "currency": currency, "idempotency_key": "c"}
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("currency_not_accepted", "currency")
    assert "EUR" in error["message"]  # what it does accept
    assert terminal.engine.list_runs() == []


def test_api__the_accepted_currencies_come_from_the_config(tmp_path, sock_dir):
    clock = FakeClock(2_000_000_000.0)
    reader, printer, link = SimCardReader(), SimPrinter(), SimNetworkLink(clock)
    with SimAcquirer() as acquirer, HttpAcquirer(acquirer.url, link=link, timeout_s=2) as http:
        cfg = EdgeConfig(
            device_id="T-CHF",
            data_dir=tmp_path / "data",
            socket_path=sock_dir / "edge.sock",
            currencies=["CHF", "EUR"],
            risk=RiskLimits(online_random_percent=0),
        )
        terminal = Terminal(cfg, Peripherals(reader, printer, http, link), clock=clock)
        try:
            api = LocalApi(terminal)
            for currency, status in (("CHF", 200), ("EUR", 200), ("GBP", 422)):
                reader.insert(make_card("visa"))
                body = {"amount_minor": 100, "currency": currency, "idempotency_key": currency}
                assert api.handle("POST", "/v1/payments", json.dumps(body).encode())[0] == status
            # Both accepted, so the reuse of a key is what is refused: naming each field.
            body = {"amount_minor": 200, "currency": "EUR", "idempotency_key": "CHF"}
            status, answer = api.handle("POST", "/v1/payments", json.dumps(body).encode())
            assert (status, answer["error"]["field"]) == (409, "amount_minor")
            assert "amount_minor, currency" in answer["error"]["message"]
        finally:
            terminal.close()


@pytest.mark.parametrize(
    ("currencies", "message"),
    [
        (["ZZZ"], "not an ISO 4217"),
        (["XXX"], "not an ISO 4217"),
        (["eur"], "not an ISO 4217"),
        (["EUR", "EUR"], "twice"),
        ([], "at least 1"),
    ],
)
def test_config__currencies_are_iso_4217_codes(tmp_path, currencies, message):
    with pytest.raises(ValidationError, match=message):
        EdgeConfig(device_id="T", data_dir=tmp_path, currencies=currencies)


def test_config__currencies_default_to_euro():
    assert EdgeConfig(device_id="T").currencies == ["EUR"]


# --- a WAIT's input over the socket ---------------------------------------------------------


def test_api__card_data_posted_as_wait_input_is_refused_and_not_stored(pos):
    client, terminal, reader, printer = pos
    reader.insert(make_card("mastercard"))
    printer.state = "paper_out"
    body = {"amount_minor": 900, "currency": "EUR", "idempotency_key": "pan-in"}
    run = client.post("/v1/payments", json=body).json()
    printer.refill()
    r = client.post(f"/v1/runs/{run['run_id']}/input", json={"pan": TEST_PAN, "cvv": "123"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "card_data_refused")
    assert TEST_PAN not in r.text
    found = scan(sqlite_files(terminal.cfg.database_path), {"pan": TEST_PAN, "cvv": "cvv"})
    assert found == [], describe(found)
    done = client.post(f"/v1/runs/{run['run_id']}/input", json={})
    assert (done.status_code, done.json()["status"]) == (200, "COMPLETED")
