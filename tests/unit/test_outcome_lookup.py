"""The control plane's acquirer port (``cloud.outcomes.acquirer``) against hwsim's
acquirer over real loopback HTTP: the status of every kind of operation under its key,
answered from the ledger without changing it; an acquirer away is retryable, a refusal
or a strange answer is not."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import make_card

from cloud.outcomes.acquirer import (
    AcquirerUnreachable,
    HttpAcquirerLookup,
    LookupRefused,
)
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.drivers.contracts import AuthRequest


@pytest.fixture
def sim() -> Iterator[SimAcquirer]:
    with SimAcquirer() as acq:
        yield acq


@pytest.fixture
def pos(sim: SimAcquirer) -> Iterator[HttpAcquirer]:
    with HttpAcquirer(sim.url, timeout_s=5) as http:
        yield http


@pytest.fixture
def lookup(sim: SimAcquirer) -> Iterator[HttpAcquirerLookup]:
    with HttpAcquirerLookup(sim.url, timeout_s=5) as port:
        yield port


def _req(key: str, amount: int = 1000) -> AuthRequest:
    card = make_card("visa")
    return AuthRequest(
        pan=card.pan,
        expiry=card.expiry,
        amount_minor=amount,
        currency="EUR",
        idempotency_key=key,
        terminal_id="T-1",
    )


def test_an_approved_authorisation__then_reversed(
    sim: SimAcquirer, pos: HttpAcquirer, lookup: HttpAcquirerLookup
) -> None:
    answer = pos.authorize(_req("a-1", 4200))
    found = lookup.lookup("a-1")
    assert (found.found, found.operation, found.status) == (True, "authorize", "approved")
    assert (found.amount_minor, found.currency, found.acquirer_ref) == (
        4200,
        "EUR",
        answer.acquirer_ref,
    )
    pos.reverse("a-1", "r-1")
    again = lookup.lookup("a-1")
    assert (again.status, again.reversed_by) == ("reversed", "r-1")
    assert sim.ledger["a-1"].replays == 0  # a lookup is no request under the key
    assert sim.lookups == 2


def test_a_declined_authorisation_and_a_refund(
    sim: SimAcquirer, pos: HttpAcquirer, lookup: HttpAcquirerLookup
) -> None:
    sim.decline_over(5000)
    pos.authorize(_req("a-2", 9000))
    assert lookup.lookup("a-2").status == "declined"
    pos.refund(_req("f-1", 300))
    found = lookup.lookup("f-1")
    assert (found.operation, found.status, found.amount_minor) == ("refund", "approved", 300)


def test_a_key_never_seen__is_not_found_and_fenced_once_reversed(
    pos: HttpAcquirer, lookup: HttpAcquirerLookup
) -> None:
    found = lookup.lookup("never")
    assert (found.found, found.status, found.fenced) == (False, "not_found", False)
    pos.reverse("never", "r-2")  # a reversal overtook it: a late authorisation is declined
    assert lookup.lookup("never").fenced is True


@pytest.mark.parametrize("mode", ["drop", "error"])
def test_an_acquirer_away__is_retryable(
    sim: SimAcquirer, lookup: HttpAcquirerLookup, mode: str
) -> None:
    sim.set_mode(mode)  # type: ignore[arg-type]
    with pytest.raises(AcquirerUnreachable) as err:
        lookup.lookup("a-3")
    assert err.value.retryable and err.value.code == "acquirer_unreachable"


def test_no_server__is_retryable(sim: SimAcquirer) -> None:
    url = sim.url
    sim.stop()
    with HttpAcquirerLookup(url, timeout_s=2) as port, pytest.raises(AcquirerUnreachable):
        port.lookup("a-4")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b'{"error": "missing_idempotency_key"}'),
        (200, b'{"nothing": true}'),
        (200, b'{"key": "another", "found": false}'),
    ],
)
def test_a_refusal_or_a_strange_answer__is_not_retried(status: int, body: bytes) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    port = HttpAcquirerLookup("http://acq", transport=transport)
    with port, pytest.raises(LookupRefused) as err:
        port.lookup("a-5")
    assert not err.value.retryable
