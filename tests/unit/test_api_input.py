"""What the local API accepts as the answer to a WAIT, and how it refuses the rest: the
step's schema strictly, no card data, small; errors that never echo what was sent; and a
body that is not a sane JSON object answered 400, never an exception.

The terminal runs with simulated hardware; the routes are called through
``LocalApi.handle`` (the socket transport is covered by test_local_api.py)."""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from carddata_scan import describe, scan, sqlite_files
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter
from pydantic import BaseModel, ConfigDict, ValidationError

from edge.engine import Engine, FakeClock, InlineExecutor, Status
from edge.engine.loader import load_text
from edge.errors import InputError
from edge.store.sqlite import SqliteStore
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.api import (
    MAX_BODY_BYTES,
    MAX_INPUT_BYTES,
    ApiError,
    LocalApi,
    PaymentRequest,
    parse_request,
)
from edge.terminal.service.terminal import Terminal

#: The public Visa test number: what a careless POS app might send.
TEST_PAN = "4111111111111111"


class Api:
    """``LocalApi`` with JSON in and out, on a terminal with simulated hardware."""

    def __init__(self, terminal: Terminal, reader: SimCardReader, printer: SimPrinter) -> None:
        self.terminal, self.reader, self.printer = terminal, reader, printer
        self.api = LocalApi(terminal)

    def post(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.api.handle("POST", path, raw)

    def waiting_payment(self, key: str = "w") -> str:
        """A payment waiting at ``await_paper`` (the printer ran out of paper)."""
        self.reader.insert(make_card("mastercard"))  # not TEST_PAN: that one is sent as input
        self.printer.state = "paper_out"
        status, run = self.post(
            "/v1/payments", {"amount_minor": 900, "currency": "EUR", "idempotency_key": key}
        )
        assert status == 200 and (run["status"], run["waiting_for"]) == ("WAITING", "await_paper")
        self.printer.refill()
        return str(run["run_id"])

    def database_files(self) -> list[Path]:
        return sqlite_files(self.terminal.cfg.database_path)


@pytest.fixture
def api(tmp_path) -> Iterator[Api]:
    clock = FakeClock(2_000_000_000.0)
    reader, printer, link = SimCardReader(), SimPrinter(), SimNetworkLink(clock)
    with SimAcquirer() as acquirer, HttpAcquirer(acquirer.url, link=link, timeout_s=2) as http:
        cfg = EdgeConfig(
            device_id="T-INPUT",
            data_dir=tmp_path / "data",
            socket_path=tmp_path / "unused.sock",
            risk=RiskLimits(online_random_percent=0),
        )
        terminal = Terminal(cfg, Peripherals(reader, printer, http, link), clock=clock)
        try:
            yield Api(terminal, reader, printer)
        finally:
            terminal.close()


# --- the WAIT's schema, strictly ------------------------------------------------------------


def test_input__an_empty_object_answers_await_paper(api):
    run_id = api.waiting_payment()
    status, run = api.post(f"/v1/runs/{run_id}/input", {})
    assert (status, run["status"]) == (200, "COMPLETED")


@pytest.mark.parametrize(
    "body",
    [
        {"pan": TEST_PAN, "cvv": "123"},
        {"card_number": TEST_PAN},
        {"CVV2": "987"},
        {"track2": ";" + TEST_PAN + "=39121011000012300000?"},
        {"pinBlock": "0412AC89ABCDEF67"},
        {"note": TEST_PAN},
        {"note": "4111 1111 1111 1111"},
        {"note": "%B" + TEST_PAN + "^TEST/CARD^3912101?"},
        {"note": int(TEST_PAN)},
        {TEST_PAN: True},
        {"nested": [{"ok": 1}, {"cvc": "987"}]},
    ],
    ids=[
        "pan-cvv",
        "card_number",
        "CVV2",
        "track2",
        "pinBlock",
        "pan-value",
        "grouped-pan-value",
        "track1-value",
        "pan-integer",
        "pan-as-key",
        "nested-cvc",
    ],
)
def test_input__card_data_is_refused_422_without_echo_and_never_stored(api, body):
    run_id = api.waiting_payment()
    status, answer = api.post(f"/v1/runs/{run_id}/input", body)
    assert (status, answer["error"]["code"]) == (422, "card_data_refused"), answer
    text = json.dumps(answer)
    assert TEST_PAN not in text and "4111 1111" not in text and "987" not in text
    assert api.terminal.engine.get(run_id).status is Status.WAITING
    found = scan(api.database_files(), {"visa pan": TEST_PAN, "cvv field": "cvv"})
    assert found == [], describe(found)


@pytest.mark.parametrize(
    "body",
    [{"paper": True}, {"amount_minor": 1}, {"decision": "approved", "auth_code": "X"}],
    ids=["paper", "amount_minor", "decision"],
)
def test_input__fields_the_wait_does_not_declare_are_refused(api, body):
    run_id = api.waiting_payment()
    before = api.terminal.engine.get(run_id).state
    status, answer = api.post(f"/v1/runs/{run_id}/input", body)
    assert (status, answer["error"]["code"]) == (422, "unknown_field")
    assert answer["error"]["field"] == next(iter(body))
    run = api.terminal.engine.get(run_id)
    assert (run.status, run.state) == (Status.WAITING, before)


def test_input__a_refund_waiting_for_paper_takes_no_fields_either(api):
    api.reader.insert(make_card("mastercard"))
    api.printer.state = "paper_out"
    body = {"amount_minor": 500, "currency": "EUR", "idempotency_key": "r"}
    status, run = api.post("/v1/refunds", body)
    assert (status, run["waiting_for"]) == (200, "await_paper"), run
    status, answer = api.post(f"/v1/runs/{run['run_id']}/input", {"printer": "printed"})
    assert (status, answer["error"]["code"]) == (422, "unknown_field")
    api.printer.refill()
    assert api.post(f"/v1/runs/{run['run_id']}/input", {})[0] == 200


def test_input__is_capped_far_below_the_body_cap(api):
    run_id = api.waiting_payment()
    big = json.dumps({"note": "x" * MAX_INPUT_BYTES}).encode()
    assert MAX_INPUT_BYTES < len(big) < MAX_BODY_BYTES
    status, answer = api.post(f"/v1/runs/{run_id}/input", big)
    assert (status, answer["error"]["code"]) == (413, "input_too_large")
    assert api.terminal.engine.get(run_id).status is Status.WAITING


def test_api__a_body_over_the_cap_is_refused_by_the_routes_too(api):
    # The transport caps Content-Length; the routes do not trust that they sit behind it.
    huge = b'{"note": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    for path in ("/v1/payments", "/v1/runs/r1/input"):
        status, answer = api.post(path, huge)
        assert (status, answer["error"]["code"]) == (413, "body_too_large")


# --- a WAIT with no schema, at this API ----------------------------------------------------


NO_SCHEMA = """
workflow_type: approval
version: 1
steps:
  - name: ask
    type: WAIT
"""


def test_input__a_wait_without_a_schema_accepts_only_an_empty_object(api):
    engine = api.terminal.engine
    engine.register(load_text(NO_SCHEMA))
    run_id = engine.start("approval", {})
    status, answer = api.post(f"/v1/runs/{run_id}/input", {"ok": True})
    assert (status, answer["error"]["code"], answer["error"]["field"]) == (
        422,
        "unknown_field",
        "ok",
    )
    assert "takes no input" in answer["error"]["message"]
    status, run = api.post(f"/v1/runs/{run_id}/input", {})
    assert (status, run["status"]) == (200, "COMPLETED")


# --- errors never echo the input ------------------------------------------------------------


class Approval(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    approver: int


WITH_SCHEMA = """
workflow_type: approved
version: 1
steps:
  - name: ask
    type: WAIT
    input_schema: test_api_input:Approval
"""


def test_engine__resume_input_errors_name_the_field_not_the_value(tmp_path):
    store = SqliteStore(tmp_path / "e.db")
    try:
        engine = Engine(store, InlineExecutor(), clock=FakeClock(1.0))
        engine.register(load_text(WITH_SCHEMA))
        run_id = engine.start("approved", {})
        with pytest.raises(InputError) as err:
            engine.resume(run_id, {"approver": TEST_PAN})
        assert "approver" in err.value.message
        _assert_nowhere(err.value)
    finally:
        store.close()


class Sale(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    amount_minor: int


STATE_MODEL = """
workflow_type: sale
version: 1
state_model: test_api_input:Sale
steps:
  - name: ask
    type: WAIT
"""


def test_engine__start_input_errors_name_the_field_not_the_value(tmp_path):
    store = SqliteStore(tmp_path / "e.db")
    try:
        engine = Engine(store, InlineExecutor(), clock=FakeClock(1.0))
        engine.register(load_text(STATE_MODEL))
        with pytest.raises(InputError) as err:
            engine.start("sale", {"amount_minor": TEST_PAN})
        assert "amount_minor" in err.value.message and "Sale" in err.value.message
        _assert_nowhere(err.value)
        run_id = engine.start("sale", {"amount_minor": 1})
        with pytest.raises(InputError) as err:  # no schema: the state model refuses it
            engine.resume(run_id, {"amount_minor": TEST_PAN})
        assert "amount_minor" in err.value.message
        _assert_nowhere(err.value)
    finally:
        store.close()


def _assert_nowhere(exc: BaseException) -> None:
    """Not in the message, the chain, or the traceback a log line would print."""
    printed = "".join(traceback.format_exception(exc))
    assert TEST_PAN not in printed and "input_value" not in printed, printed
    assert exc.__cause__ is None and exc.__suppress_context__


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/payments", {"amount_minor": TEST_PAN, "currency": "EUR", "idempotency_key": "a"}),
        ("/v1/payments", {"amount_minor": 1, "currency": TEST_PAN, "idempotency_key": "a"}),
        (
            "/v1/payments",
            {"amount_minor": 1, "currency": "EUR", "idempotency_key": "a", TEST_PAN: 1},
        ),
        ("/v1/voids", {"payment_run_id": int(TEST_PAN), "idempotency_key": "a"}),
        ("/v1/refunds", {"amount_minor": 1, "currency": "EUR", "idempotency_key": [TEST_PAN]}),
    ],
    ids=["amount", "currency", "pan-as-key", "run-id", "key"],
)
def test_api__validation_errors_never_echo_the_value(api, caplog, path, body):
    caplog.set_level(logging.DEBUG)
    status, answer = api.post(path, body)
    assert status == 422, answer
    assert TEST_PAN not in json.dumps(answer)
    assert TEST_PAN not in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        {"amount_minor": TEST_PAN, "currency": "EUR", "idempotency_key": "a"},
        {"amount_minor": 1, "currency": "EUR", "idempotency_key": "a", TEST_PAN: 1},
    ],
    ids=["value", "pan-as-key"],
)
def test_api__the_exception_behind_a_422_does_not_carry_the_value(body):
    # What a ``log.exception`` anywhere above would print: the ApiError and its chain.
    with pytest.raises(ApiError) as err:
        parse_request(json.dumps(body).encode(), PaymentRequest)
    assert err.value.status == 422
    printed = "".join(traceback.format_exception(err.value))
    assert TEST_PAN not in printed and "input_value" not in printed, printed
    assert err.value.__cause__ is None and err.value.__context__ is None


def test_api__pydantic_errors_are_what_the_models_hide():
    # The request models hide input in their own str() too, for any caller that logs one.
    with pytest.raises(ValidationError) as err:
        PaymentRequest.model_validate({"amount_minor": TEST_PAN})
    assert TEST_PAN not in str(err.value)


# --- bodies that are not a sane JSON object --------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"a": "\xe9"}', "UTF-8"),
        (b"[" * 4_000, "nested"),
        (b"[" * 60_000, "nested"),
        (b'{"amount_minor": ' + b"9" * 5_000 + b"}", "digits"),
        (b'{"amount_minor": NaN}', "NaN"),
        (b'{"amount_minor": -Infinity}', "Infinity"),
        (b'{"amount_minor": 1, "amount_minor": 2}', "twice"),
        (b"{not json", "not JSON"),
        (b"[]", "object"),
    ],
    ids=[
        "utf16-bom",
        "latin1",
        "deep",
        "deeper",
        "long-int",
        "nan",
        "infinity",
        "duplicate-key",
        "garbage",
        "array",
    ],
)
@pytest.mark.parametrize("path", ["/v1/payments", "/v1/refunds", "/v1/voids", "/v1/runs/r1/input"])
def test_api__a_body_that_is_not_a_json_object_is_400_never_an_exception(api, path, raw, message):
    status, answer = api.api.handle("POST", path, raw)
    if path.endswith("/input") and len(raw) > MAX_INPUT_BYTES:
        assert (status, answer["error"]["code"]) == (413, "input_too_large")
        return
    assert status == 400, answer
    assert answer["error"]["code"] in ("malformed_json", "malformed_request")
    assert message in answer["error"]["message"]
