"""Disk full through ``hwsim.powerloss``: the flash fills at every write of one payment in
turn. The payment is refused with StorageFull or completes; the database is never corrupt;
once there is room, the same idempotency key finishes it, charged at most once."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.powerloss import PowerLossVFS
from hwsim.printer import SimPrinter

from edge.engine import FakeClock, Status
from edge.errors import StorageFull
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.terminal import Terminal

_names = itertools.count()


@pytest.fixture
def acquirer() -> Iterator[SimAcquirer]:
    with SimAcquirer() as sim:
        yield sim


def _terminal(data: Path, acquirer: SimAcquirer, vfs: str | None, online: bool) -> Terminal:
    clock = FakeClock(2_000_000_000.0)
    link = SimNetworkLink(clock)
    if not online:
        link.down()
    cfg = EdgeConfig(
        device_id="T-FULL",
        data_dir=data,
        socket_path=data / "unused.sock",
        risk=RiskLimits(online_random_percent=100 if online else 0),
    )
    http = HttpAcquirer(acquirer.url, link=link, timeout_s=2)
    return Terminal(
        cfg, Peripherals(SimCardReader(), SimPrinter(), http, link), clock=clock, vfs=vfs
    )


def _pay(terminal: Terminal, key: str) -> str:
    reader = terminal.peripherals.card_reader
    assert isinstance(reader, SimCardReader)
    reader.insert(make_card("visa"))
    return terminal.engine.start(
        "payment", {"amount_minor": 700, "currency": "EUR"}, idempotency_key=key
    )


def _events_of_one_payment(template: Path, tmp: Path, acquirer: SimAcquirer, online: bool) -> int:
    data = tmp / "count"
    shutil.copytree(template, data)
    vfs = PowerLossVFS(f"full-count-{next(_names)}")
    try:
        t = _terminal(data, acquirer, vfs.vfs_name, online)
        start = vfs.events
        _pay(t, "count")
        n = vfs.events - start
        t.close()
    finally:
        vfs.unregister()
    return n


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
def test_disk_full_at_every_write_of_a_payment_corrupts_nothing_and_charges_once(
    tmp_path, acquirer, online
):
    template = tmp_path / "template"
    _terminal(template, acquirer, None, online).close()  # migrated, keys made
    total = _events_of_one_payment(template, tmp_path, acquirer, online)
    assert total > 10
    outcomes: dict[str, int] = {"refused": 0, "completed": 0, "approved": 0}
    for i in range(1, total + 1):
        data = tmp_path / f"at-{i}"
        shutil.copytree(template, data)
        key = f"full-{online}-{i}"
        vfs = PowerLossVFS(f"full-{next(_names)}")
        state: dict[str, Any] = {"base": None}

        def fill_at(kind: str, path: str, event: int, i: int = i, state=state, vfs=vfs) -> None:
            if state["base"] is not None and event - state["base"] == i:
                vfs.free_bytes = 0  # the flash is full from here on

        vfs.on_event = fill_at
        try:
            t = _terminal(data, acquirer, vfs.vfs_name, online)
            state["base"] = vfs.events
            try:
                _pay(t, key)
                outcomes["completed"] += 1
            except StorageFull:
                outcomes["refused"] += 1
            assert t.store.integrity_check() == "ok", i
            vfs.free_bytes = None  # room again (the cloud acked, retention ran)
            reader = t.peripherals.card_reader
            assert isinstance(reader, SimCardReader)
            reader.insert(make_card("visa"))  # asked again if the read did not fit
            t.engine.recover()
            run = t.engine.get(_pay(t, key))
            assert run.status.terminal, (i, run.status)
            assert t.engine.verify_audit().ok, i
            if run.status is Status.COMPLETED and run.state.get("decision") == "approved":
                outcomes["approved"] += 1
                payments = [m for m in t.store.outbox(limit=100) if m.topic == "payment"]
                assert [m.payload["run_id"] for m in payments] == [run.run_id], i
            t.close()
        finally:
            vfs.unregister()
        conn = apsw.Connection(str(data / "terminal.db"))  # reopened from "the disk"
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], i
        conn.close()
    assert outcomes["refused"] > total / 2
    assert outcomes["approved"] == total  # each one finished once there was room
    charged = [e.key for e in acquirer.effects("authorize")]
    assert len(charged) == len(set(charged))
    assert len(charged) == (total + 1 if online else 0)  # + the run that counted events
