"""The terminal within its database budget, as the POS app sees it through the local API:
offline sales stop at the high-water mark, a full budget answers 507 and loses nothing,
health keeps serving, and maintenance (retention) makes room again."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import httpx
import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

from edge.engine import FakeClock
from edge.engine.records import Acknowledgement
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.api import LocalApiServer
from edge.terminal.service.terminal import Terminal

HOUR = 3600.0
ROOMY = RiskLimits(  # risk limits out of the way: storage is what is under test
    online_random_percent=0,
    offline_count_cap=100_000,
    offline_amount_cap_minor=10**9,
    velocity_max=100_000,
)


@dataclass
class Pos:
    client: httpx.Client
    terminal: Terminal
    reader: SimCardReader
    link: SimNetworkLink
    acquirer: SimAcquirer
    clock: FakeClock

    def pay(self, key: str, amount: int = 900) -> httpx.Response:
        self.reader.insert(make_card("visa"))
        body = {"amount_minor": amount, "currency": "EUR", "idempotency_key": key}
        return self.client.post("/v1/payments", json=body)

    def health(self) -> dict[str, Any]:
        r = self.client.get("/v1/health")
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tf-st-"))  # AF_UNIX paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_pos(tmp_path, sock_dir) -> Iterator[Callable[..., Pos]]:
    opened: list[Callable[[], None]] = []

    def make(**options: Any) -> Pos:
        clock = FakeClock(2_000_000_000.0)
        reader, printer, link = SimCardReader(), SimPrinter(), SimNetworkLink(clock)
        acquirer = SimAcquirer().start()
        http = HttpAcquirer(acquirer.url, link=link, timeout_s=2)
        cfg = EdgeConfig(
            device_id="T-ST",
            data_dir=tmp_path / "data",
            socket_path=sock_dir / "edge.sock",
            **{"risk": ROOMY, **options},
        )
        terminal = Terminal(cfg, Peripherals(reader, printer, http, link), clock=clock)
        server = LocalApiServer(cfg.socket_path, terminal).start()
        client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(cfg.socket_path)), base_url="http://pos"
        )

        def close() -> None:
            client.close()
            server.stop()
            terminal.close()
            http.close()
            acquirer.stop()

        opened.append(close)
        return Pos(client, terminal, reader, link, acquirer, clock)

    yield make
    for close in opened:
        close()


def test_above_the_high_water_mark_offline_sales_are_declined_online_ones_approved(make_pos):
    pos = make_pos(db_budget_mb=8, storage_high_water_percent=10)
    assert pos.health()["storage"]["state"] == "ok"
    pos.link.down()
    approved, declined = 0, None
    for i in range(5000):  # offline sales until the mark
        run = pos.pay(f"offline-{i}").json()
        if run["decision"] != "approved":
            declined = run
            break
        approved += 1
        pos.clock.advance(1)
    assert approved > 10 and declined is not None
    assert (declined["decision"], declined["reason"]) == ("declined", "storage_full")
    assert pos.terminal.storage_high()
    assert pos.health()["storage"]["state"] == "high_water"
    pos.link.up()
    online = pos.pay("online", amount=9_000).json()  # over the floor limit: online
    assert online["decision"] == "approved" and pos.acquirer.ledger
    stats = pos.terminal.store.outbox_stats()
    assert pos.terminal.acknowledge(stats.last_seq) == stats.depth  # acks work


def test_a_full_budget_answers_507_keeps_health_and_loses_nothing(make_pos):
    pos = make_pos(db_budget_mb=0.5, storage_high_water_percent=99, retention_hours=1)
    approved: list[str] = []
    refused = None
    for i in range(2000):  # online sales (the mark does not stop those) until the budget
        r = pos.pay(f"sale-{i}", amount=9_000)
        if r.status_code != 200:
            refused = (f"sale-{i}", r)
            break
        assert r.json()["decision"] == "approved", r.text
        approved.append(r.json()["run_id"])
        pos.clock.advance(1)
    assert refused is not None, "the budget never filled"
    key, response = refused
    assert response.status_code == 507
    assert response.json()["error"]["code"] == "storage_full"
    assert "same idempotency key" in response.json()["error"]["message"]
    health = pos.health()
    assert health["storage"]["state"] == "full", health
    assert health["last_error"].startswith("storage_full")
    assert pos.terminal.store.integrity_check() == "ok"
    assert pos.terminal.engine.verify_audit().ok
    charges_before = len(pos.acquirer.effects("authorize"))
    assert charges_before >= len(approved)
    # The cloud acknowledges, time passes, maintenance compacts: there is room again.
    store = pos.terminal.store
    store.acknowledge(Acknowledgement(outbox_through=store.outbox_stats().last_seq))
    head = store.audit_head()
    assert head is not None
    store.acknowledge(Acknowledgement(audit_through=head[0]))
    pos.clock.advance(2 * HOUR)
    done = pos.terminal.maintain()
    assert done["compacted"]["runs"] >= len(approved)
    # The daemon's loop recovers the interrupted run within a second; the customer is
    # asked for the card again if the read was what did not fit.
    pos.reader.insert(make_card("visa"))
    pos.terminal.engine.recover()
    again = pos.pay(key, amount=9_000)
    assert again.status_code == 200 and again.json()["decision"] == "approved"
    keys = [e.key for e in pos.acquirer.effects("authorize")]
    assert len(keys) == len(set(keys))  # nobody was charged twice
    assert len(keys) == len(approved) + 1
    assert pos.health()["storage"]["state"] == "ok"


def test_a_long_reader_shows_in_health_and_maintenance_catches_up(make_pos):
    pos = make_pos(wal_limit_mb=0.25)
    pos.link.down()
    pos.pay("first")
    reader = apsw.Connection(pos.terminal.store.path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM workflow_runs").fetchall()
    for i in range(60):
        pos.pay(f"during-{i}", amount=100)
        pos.clock.advance(30)
    pos.terminal.maintain()
    storage = pos.health()["storage"]
    assert storage["wal_over_limit"] and storage["checkpoint_blocked"]
    reader.execute("COMMIT")
    reader.close()
    pos.terminal.maintain()
    storage = pos.health()["storage"]
    assert not storage["wal_over_limit"] and not storage["checkpoint_blocked"]
    assert storage["wal_bytes"] <= storage["wal_limit_bytes"]


def test_acknowledging_offline_sales_releases_their_exposure_in_the_same_transaction(make_pos):
    pos = make_pos(risk=RiskLimits(online_random_percent=0, offline_count_cap=3))
    pos.link.down()
    for i in range(3):
        assert pos.pay(f"off-{i}").json()["decision"] == "approved"
        pos.clock.advance(700)  # past the velocity window
    capped = pos.pay("off-capped").json()
    assert (capped["decision"], capped["reason"]) == ("declined", "offline_count_cap")
    assert pos.terminal.store.counters()["offline"] == (2700, 3)
    store = pos.terminal.store
    head = store.audit_head()
    assert head is not None
    stats = store.outbox_stats()
    assert pos.terminal.acknowledge(stats.last_seq, audit_through=head[0]) == stats.depth
    assert store.counters()["offline"] == (0, 0)
    assert store.outbox_stats().depth == 0
    kept = store.audit_retention()
    assert kept is not None and kept.acked_seq == head[0]
    pos.clock.advance(700)
    assert pos.pay("off-after-ack").json()["decision"] == "approved"
    assert pos.terminal.acknowledge(0) == 0  # an old ack again changes nothing
    assert store.counters()["offline"] == (900, 1)
