"""A terminal whose authorisation answer was lost, through a long outage: health counts
the pending reversal, the POS's view says so, and the daemon's loop (recover) finishes
it once the acquirer answers again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

from edge.engine import FakeClock, Status
from edge.engine.records import CommandRecord
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.drivers.contracts import AcquirerUnavailable
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.api import LocalApi
from edge.terminal.service.terminal import Terminal


class AnswerLostThenLinkDown:
    """Approves at the acquirer, loses the answer, and takes the link down with it."""

    def __init__(self, http: HttpAcquirer, link: SimNetworkLink) -> None:
        self.http, self.link, self.lost = http, link, False

    def authorize(self, req: Any) -> Any:
        if not self.lost:
            self.lost = True
            self.http.authorize(req)
            self.link.down()
            raise AcquirerUnavailable("no answer within 2s; outcome unknown", outcome_unknown=True)
        return self.http.authorize(req)

    def reverse(self, original_key: str, key: str) -> Any:
        return self.http.reverse(original_key, key)

    def refund(self, req: Any) -> Any:
        return self.http.refund(req)


@pytest.fixture
def till(tmp_path) -> Iterator[tuple[Terminal, SimAcquirer, SimNetworkLink, FakeClock]]:
    clock = FakeClock(2_000_000_000.0)
    reader, printer, link = SimCardReader(), SimPrinter(), SimNetworkLink(clock)
    reader.insert(make_card("visa"))
    with SimAcquirer() as acquirer, HttpAcquirer(acquirer.url, link=link, timeout_s=2) as http:
        cfg = EdgeConfig(
            device_id="T-REV",
            data_dir=tmp_path / "data",
            socket_path=tmp_path / "edge.sock",
            risk=RiskLimits(online_random_percent=0),
        )
        lossy = AnswerLostThenLinkDown(http, link)
        terminal = Terminal(cfg, Peripherals(reader, printer, lossy, link), clock=clock)
        try:
            yield terminal, acquirer, link, clock
        finally:
            terminal.close()


def _drive(terminal: Terminal, clock: FakeClock, seconds: float, step: float = 30) -> None:
    """The daemon's main loop for ``seconds`` of virtual time: due retries run."""
    end = clock.now() + seconds
    while clock.now() < end:
        clock.advance(step)
        terminal.engine.recover()


def test_terminal__a_pending_reversal_shows_in_health_and_the_pos_view_until_done(till):
    terminal, acquirer, link, clock = till
    api = LocalApi(terminal)
    body = b'{"amount_minor": 5000, "currency": "EUR", "idempotency_key": "sale-1"}'
    status, view = api.handle("POST", "/v1/payments", body)
    assert status == 200 and view["status"] == "RUNNING"  # still retrying the auth
    _drive(terminal, clock, 60)
    _, view = api.handle("GET", f"/v1/runs/{view['run_id']}", b"")
    assert (view["decision"], view["reason"]) == ("unknown", "reversal_pending")
    assert view["customer_message"] and view["auth_code"] is None
    assert terminal.health()["reversals_pending"] == 1
    _drive(terminal, clock, 4 * 3600)  # a four-hour outage: still pending, never given up
    assert terminal.health()["reversals_pending"] == 1
    assert acquirer.net_minor("EUR") == 5000  # the customer's money is still held
    link.up()
    _drive(terminal, clock, 300)
    _, done = api.handle("GET", f"/v1/runs/{view['run_id']}", b"")
    assert (done["status"], done["decision"], done["reason"]) == (
        str(Status.COMPLETED), "declined", "acquirer_unreachable",
    )  # fmt: skip
    assert terminal.health()["reversals_pending"] == 0
    assert acquirer.net_minor("EUR") == 0
    decisions = [m.payload["decision"] for m in terminal.store.outbox()]
    assert decisions == ["unknown", "declined"]  # the cloud heard of both


def test_terminal__a_truth_from_the_cloud_that_nothing_is_held_settles_the_run_offline(till):
    """The acquirer declined the authorisation whose answer was lost; the control plane
    looked it up and told the terminal (its resolve_outcome command keeps the truth as
    an ``outcome:<key>`` document, as below). The link stays down, yet the run ends: no
    money is held, so no reversal need reach the acquirer first."""
    terminal, acquirer, _link, clock = till
    acquirer.decline_over(1000)
    api = LocalApi(terminal)
    body = b'{"amount_minor": 5000, "currency": "EUR", "idempotency_key": "sale-2"}'
    _, view = api.handle("POST", "/v1/payments", body)
    _drive(terminal, clock, 600)
    run = terminal.store.get_run(view["run_id"])
    assert run is not None and run.status == Status.RUNNING  # still reversing, link down
    key = run.state["auth_key"]
    assert acquirer.lookup_body(key)["status"] == "declined"  # what the cloud's lookup finds
    truth = {"operation": "authorization", "run_id": run.run_id, "key": key, "status": "declined"}
    terminal.store.record_command(
        CommandRecord(
            seq=1, command_id="c-1", action="resolve_outcome", status="applied", reason=None,
            issued_at=clock.now(), at=clock.now(), document=("outcome:" + key, 1, truth),
        )
    )  # fmt: skip
    _drive(terminal, clock, 300)  # the reversal's next attempt reads the truth
    _, done = api.handle("GET", f"/v1/runs/{view['run_id']}", b"")
    assert (done["status"], done["decision"]) == (str(Status.COMPLETED), "declined")
    assert terminal.health()["reversals_pending"] == 0
    assert acquirer.net_minor("EUR") == 0
    assert [path for path, _ in acquirer.received] == ["/authorize"]  # no reversal needed
    assert terminal.store.get_run(run.run_id).state["reversal_reason"] == "acquirer_lookup_declined"
