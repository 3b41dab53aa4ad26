"""Keys that move money do not depend on YAML step names (issue 11 §4): with the payment's
authorisation step renamed in a copy of payment.yaml, a payment whose outcome is unknown
is reversed, and one whose saga compensates it is reversed, each under exactly the key
the acquirer charged."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

from edge.engine import Engine, FakeClock, InlineExecutor, Status
from edge.engine.context import idempotency_key, operation_key
from edge.engine.loader import load_file
from edge.terminal.carddata import DataKey
from edge.terminal.config import RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.drivers.contracts import AcquirerUnavailable, AuthRequest, AuthResponse
from edge.terminal.sale import WORKFLOWS
from edge.terminal.sale.services import Peripherals, build_services

RENAMED = "charge_the_card"
LIMITS = RiskLimits(floor_limit_minor=2_000, online_random_percent=0)


def _renamed_payment(tmp: Path) -> Path:
    """payment.yaml with its authorisation step renamed (the function stays)."""
    text = (WORKFLOWS / "payment.yaml").read_text(encoding="utf-8")
    renamed = text.replace("name: authorize_online", f"name: {RENAMED}")
    renamed = renamed.replace("next: authorize_online", f"next: {RENAMED}")
    assert renamed.count(RENAMED) == 2 and "payment_steps:authorize_online" in renamed
    path = tmp / "renamed" / "payment.yaml"
    path.parent.mkdir()
    path.write_text(renamed, encoding="utf-8")
    return path


class LosesTheFirstAnswer:
    """The acquirer port: the first authorisation is approved and recorded, its answer
    lost and the link down for ``outage_s``, so its outcome is unknown."""

    def __init__(self, http: HttpAcquirer, link: SimNetworkLink, outage_s: float) -> None:
        self.http, self.link, self.outage_s = http, link, outage_s
        self.lost = False

    def authorize(self, req: AuthRequest) -> AuthResponse:
        if not self.lost:
            self.lost = True
            self.http.authorize(req)
            self.link.down_for(self.outage_s)
            raise AcquirerUnavailable("connection lost", outcome_unknown=True)
        return self.http.authorize(req)

    def reverse(self, original_key: str, idempotency_key: str) -> AuthResponse:
        return self.http.reverse(original_key, idempotency_key)

    def refund(self, req: AuthRequest) -> AuthResponse:
        return self.http.refund(req)


class Till:
    def __init__(self, store: Any, tmp: Path, acquirer: SimAcquirer) -> None:
        self.clock = FakeClock(2_000_000_000.0)  # 2033: the test cards expire 3912
        self.reader, self.printer = SimCardReader(), SimPrinter()
        self.link = SimNetworkLink(self.clock)
        self.http = HttpAcquirer(acquirer.url, link=self.link, timeout_s=2)
        self.port: Any = self.http
        self.engine = Engine(
            store,
            InlineExecutor(),
            clock=self.clock,
            services=build_services(
                Peripherals(self.reader, self.printer, self, self.link),
                store=store,
                data_key=DataKey.load_or_create(tmp / "keys"),
                limits=LIMITS,
                device_id="T-RENAMED",
                rng=random.Random(7),
            ),
        )
        self.engine.register(load_file(_renamed_payment(tmp)))

    # The acquirer port, delegating to whichever the test put in ``port``.
    def authorize(self, req: AuthRequest) -> AuthResponse:
        return self.port.authorize(req)  # type: ignore[no-any-return]

    def reverse(self, original_key: str, idempotency_key: str) -> AuthResponse:
        return self.port.reverse(original_key, idempotency_key)  # type: ignore[no-any-return]

    def refund(self, req: AuthRequest) -> AuthResponse:
        return self.port.refund(req)  # type: ignore[no-any-return]

    def pay(self, amount: int) -> Any:
        self.reader.insert(make_card("visa"))
        run_id = self.engine.start("payment", {"amount_minor": amount, "currency": "EUR"})
        return self.engine.get(run_id)


@pytest.fixture
def till(store, tmp_path) -> Iterator[tuple[Till, SimAcquirer]]:
    with SimAcquirer() as acquirer:
        t = Till(store, tmp_path, acquirer)
        yield t, acquirer
        t.engine.close()
        t.http.close()


def _charged_and_reversed(acquirer: SimAcquirer, run_id: str) -> str:
    """The one key the acquirer charged for ``run_id``'s payment; it was reversed, once."""
    [charge] = acquirer.effects("authorize")
    reversals = [e for e in acquirer.effects("reverse")]
    assert [e.reverses for e in reversals] == [charge.key]
    assert acquirer.net_minor("EUR") == 0
    # The key is the renamed step's operation key, not one rebuilt from the old name.
    assert charge.key == operation_key(run_id, RENAMED)
    assert charge.key != idempotency_key(run_id, "authorize_online", 1)
    return charge.key


def test_renamed_authorisation__an_unknown_outcome_is_reversed_under_the_charged_key(till):
    t, acquirer = till
    t.port = LosesTheFirstAnswer(t.http, t.link, outage_s=600.0)
    run = t.pay(2_500)
    assert run.status is Status.COMPLETED
    assert (run.state["decision"], run.state["reversed"]) == ("declined", True)
    key = _charged_and_reversed(acquirer, run.run_id)
    assert run.state["auth_key"] == key


def test_renamed_authorisation__a_compensated_approval_is_reversed_under_the_charged_key(till):
    t, acquirer = till
    t.printer.state = "jam"  # fails for good after the approval: the saga reverses it
    run = t.pay(2_500)
    assert run.status is Status.ROLLED_BACK and run.state["decision"] == "reversed"
    key = _charged_and_reversed(acquirer, run.run_id)
    [row] = [r for r in t.engine.store.step_history(run.run_id) if r.step == RENAMED
             and r.kind == "step"]  # fmt: skip
    assert row.operation_key == key
