"""An offline approval's exposure is given back once: by the cloud's acknowledgement of
its message or by a void, whichever commits first (the release marker), never both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hwsim.acquirer import SimAcquirer
from test_refund_void_settlement import Interleave, Till

from edge.terminal.sale import risk
from edge.terminal.service.terminal import offline_acknowledgement


@pytest.fixture
def till(store: Any, tmp_path: Path) -> Iterator[Till]:
    with SimAcquirer() as acquirer:
        t = Till(store, tmp_path, acquirer)
        yield t
        t.engine.close()
        t.http.close()


def _ack_all(till: Till) -> Any:
    store = till.store
    return store.acknowledge(offline_acknowledgement(store, store.outbox_stats().last_seq))


def test_offline__acknowledged_once_gives_the_exposure_back_once(till):
    till.link.down()
    payment = till.pay(1_500)
    assert till.store.counters()[risk.OFFLINE] == (1_500, 1)
    result = _ack_all(till)
    assert [g.name for g in result.released] == [risk.released_marker(payment.run_id), "offline"]
    assert till.store.counters()[risk.OFFLINE] == (0, 0)
    assert till.store.counters()[risk.released_marker(payment.run_id)] == (0, 1)


def test_offline__voided_then_acknowledged_is_given_back_once(till):
    till.link.down()
    payment = till.pay(1_500)
    other = till.pay(700)  # acknowledged with it, released normally
    ack = offline_acknowledgement(till.store, till.store.outbox_stats().last_seq)
    void = till.void(payment.run_id)
    assert (void.state["decision"], void.state["released"]) == ("approved", True)
    assert till.store.counters()[risk.OFFLINE] == (700, 1)
    result = till.store.acknowledge(ack)  # built before the void: still names the sale
    assert {g.name for g in result.released} == {risk.released_marker(other.run_id), "offline"}
    assert till.store.counters()[risk.OFFLINE] == (0, 0)


def test_offline__acknowledged_while_a_void_runs_declines_the_void_and_releases_once(till, store):
    till.link.down()
    payment = till.pay(1_500)
    # The void has seen the payment still in the outbox; before it releases, the cloud
    # acknowledges the sale (and takes the marker). The void must not release again.
    racing = till.engine_with(store=Interleave(store, "outbox", lambda: _ack_all(till)))
    try:
        void = till.void(payment.run_id, engine=racing)
    finally:
        racing.close()
    assert (void.state["decision"], void.state["reason"]) == (
        "declined",
        "offline_payment_uploaded",
    )
    assert store.counters()[risk.OFFLINE] == (0, 0)
    assert store.counters()[f"void:{payment.run_id}"] == (0, 0)  # the claim given back
    assert till.void(payment.run_id).state["reason"] == "offline_payment_uploaded"
