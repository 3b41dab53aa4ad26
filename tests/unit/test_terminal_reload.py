"""SIGHUP as the terminal takes it (``Terminal.reload``): a live option is enforced by the
next payment; a restart-only one keeps its running value, health reports that value (what
the store enforces, not what the file now says) and lists it as waiting for a restart.
And a terminal runs on the store it is given."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

from edge.engine import FakeClock
from edge.store.sqlite import SqliteStore
from edge.terminal.config import EdgeConfig
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.terminal import MIB, Terminal, open_store


class Till:
    def __init__(self, cfg: EdgeConfig, acquirer: SimAcquirer, **kw: Any) -> None:
        self.clock = FakeClock(2_000_000_000.0)  # 2033: the test cards expire 3912
        self.reader, self.link = SimCardReader(), SimNetworkLink(self.clock)
        self.http = HttpAcquirer(acquirer.url, link=self.link, timeout_s=2)
        peripherals = Peripherals(self.reader, SimPrinter(), self.http, self.link)
        self.terminal = Terminal(cfg, peripherals, clock=self.clock, **kw)

    def pay(self, amount: int) -> dict[str, Any]:
        self.reader.insert(make_card("visa"))
        engine = self.terminal.engine
        run = engine.get(engine.start("payment", {"amount_minor": amount, "currency": "EUR"}))
        return dict(run.state)

    def close(self) -> None:
        self.terminal.close()
        self.http.close()


@pytest.fixture
def till(tmp_path: Path) -> Iterator[Callable[..., Till]]:
    opened: list[Till] = []
    with SimAcquirer() as acquirer:

        def make(cfg: EdgeConfig, **kw: Any) -> Till:
            opened.append(Till(cfg, acquirer, **kw))
            return opened[-1]

        yield make
        for t in opened:
            t.close()


def _cfg(tmp_path: Path, **options: Any) -> EdgeConfig:
    risk = {"online_random_percent": 0, **options.pop("risk", {})}
    return EdgeConfig(device_id="T-HUP", data_dir=tmp_path / "data", risk=risk, **options)


def test_reload__a_live_option_is_enforced_by_the_next_payment(till, tmp_path):
    t = till(_cfg(tmp_path, storage_high_water_percent=80))
    t.link.down()  # offline: the floor limit decides
    assert t.pay(3_000)["reason"] == "floor_limit"  # the default floor is 2500
    waiting = t.terminal.reload(
        _cfg(tmp_path, storage_high_water_percent=50, risk={"floor_limit_minor": 5_000})
    )
    assert waiting == [] and t.terminal.health()["restart_pending"] == []
    state = t.pay(3_000)
    assert (state["decision"], state["channel"]) == ("approved", "offline")
    assert t.terminal.health()["storage"]["high_water_percent"] == 50


def test_reload__a_restart_only_option_keeps_its_value_and_health_reports_what_is_enforced(
    till, tmp_path
):
    t = till(_cfg(tmp_path, db_budget_mb=8))
    assert t.terminal.reload(_cfg(tmp_path, db_budget_mb=16)) == ["db_budget_mb"]
    health = t.terminal.health()
    enforced = t.terminal.store.storage()
    assert health["db_budget_bytes"] == 8 * MIB == enforced.max_pages * enforced.page_size
    assert health["storage"]["budget_bytes"] == 8 * MIB
    assert health["restart_pending"] == ["db_budget_mb"]
    t.close()
    restarted = till(_cfg(tmp_path, db_budget_mb=16))  # the next start applies it
    health = restarted.terminal.health()
    assert health["db_budget_bytes"] == 16 * MIB and health["restart_pending"] == []


def test_terminal__runs_on_the_store_it_is_given(till, tmp_path):
    cfg = _cfg(tmp_path)
    given = SqliteStore(tmp_path / "elsewhere.db")
    t = till(cfg, store=given)
    assert t.terminal.store is given
    assert t.pay(1_000)["decision"] == "approved"
    [msg] = given.outbox()
    assert msg.payload["decision"] == "approved"
    assert not cfg.database_path.exists()  # the config's database was never opened
    default = open_store(cfg)  # what a terminal given none opens
    assert default.storage().max_pages * default.storage().page_size == cfg.db_budget_mb * MIB
    default.close()
