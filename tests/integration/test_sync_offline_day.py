"""A terminal offline for a simulated day, whose clock is a day off, then back: the real
``Terminal`` on a virtual clock (``FakeClock``) with simulated card reader, printer,
link and acquirer, its ``SyncClient`` against the real server (``tillflow cloud serve``
on PostgreSQL) through ``hwsim.faultproxy``.

For 24 virtual hours the shop sells offline (no acquirer, no cloud) within generous
limits, and the client's syncs fail (cloud down) and change nothing. Then the network
comes back: the server refuses the first request (``clock_skew``: the terminal's clock
is a day ahead), the client signs with the server's time from then on, and the queue
drains to zero in bounded batches. Every offline sale is in the cloud exactly once, the
offline exposure is released, the cloud's chain ends at the terminal's head.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.faultproxy import FaultPlan, FaultProxy
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter
from hwsim.syncrig import Cloud

from edge.engine import FakeClock
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.terminal import Terminal
from sync.device.client import SyncClient
from sync.device.errors import SyncUnavailable
from sync.device.identity import enroll, load_key

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

HOUR = 3600.0
SALES_PER_HOUR = 6
#: How far ahead of the server the terminal's clock runs (more than the 300 s window).
SKEW_S = 86_400.0


def test_a_day_offline_with_a_skewed_clock_drains_once_back(cloud: Cloud, tmp_path: Path) -> None:
    clock = FakeClock(time.time() + SKEW_S)
    reader, printer, link = SimCardReader(), SimPrinter(), SimNetworkLink(clock)
    cfg = EdgeConfig(
        device_id="T-DAY",
        data_dir=tmp_path / "data",
        socket_path=tmp_path / "t.sock",
        risk=RiskLimits(
            online_random_percent=0,
            offline_count_cap=1_000,
            offline_amount_cap_minor=10**8,
            max_offline_age_s=2 * 86_400,
            velocity_max=1_000,
        ),
    )
    with (
        SimAcquirer() as acquirer,
        HttpAcquirer(acquirer.url, link=link, timeout_s=5) as http,
        FaultProxy(upstream=("127.0.0.1", cloud.port), plan=FaultPlan(rates={}, seed=3)) as proxy,
    ):
        terminal = Terminal(cfg, Peripherals(reader, printer, http, link), clock=clock)
        try:
            identity = enroll(proxy.url, cloud.enroll_token("store-day"), cfg.data_dir, "test")
            client = SyncClient(
                identity, load_key(cfg.data_dir), terminal.store, terminal, clock,
                binary_version="test", max_entries=50,
            )  # fmt: skip
            link.down()
            proxy.down()
            approved: set[str] = set()
            for hour in range(24):
                for i in range(SALES_PER_HOUR):
                    reader.insert(make_card(("visa", "mastercard", "amex")[i % 3]))
                    run_id = terminal.engine.start(
                        "payment",
                        {"amount_minor": 300 + 7 * i, "currency": "EUR"},
                        idempotency_key=f"day-{hour}-{i}",
                    )
                    state = terminal.engine.get(run_id).state
                    assert (state.get("decision"), state.get("channel")) == (
                        "approved",
                        "offline",
                    ), state
                    approved.add(run_id)
                    clock.advance(HOUR / SALES_PER_HOUR)
                with pytest.raises(SyncUnavailable):
                    client.sync_once()  # the cloud is away: nothing changes
            health = terminal.health()
            assert health["outbox_depth"] == len(approved) == 24 * SALES_PER_HOUR
            assert health["offline_count"] == len(approved)

            proxy.up()
            rounds = 0
            # Until the outbox and the audit log are all acknowledged (50 a request).
            while terminal.store.outbox_stats().depth or client.build().request.audit:
                rounds += 1
                assert rounds <= 40, "the queue does not drain"
                client.sync_once()
            assert abs(client.clock_offset + SKEW_S + 24 * HOUR) < 120
            health = terminal.health()
            assert (health["offline_exposure_minor"], health["offline_count"]) == (0, 0)
            head = terminal.store.audit_head()
            client.close()
        finally:
            terminal.close()

    with psycopg.connect(cloud.database_url) as conn:
        rows = conn.execute(
            "SELECT payload->>'run_id', count(*) FROM sync_messages WHERE device_id = %s "
            "AND topic = 'payment' AND payload->>'decision' = 'approved' GROUP BY 1",
            (identity.device_id,),
        ).fetchall()
        (chain,) = conn.execute(
            "SELECT head_seq, head_hash, state FROM audit_chains WHERE device_id = %s",
            (identity.device_id,),
        ).fetchall()
    assert {r: n for r, n in rows} == dict.fromkeys(approved, 1)
    assert head is not None and (chain[0], chain[1], chain[2]) == (head[0], head[1], "ok")
