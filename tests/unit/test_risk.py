"""Offline risk limits: each decline names its limit; guards hold the caps under races."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from edge.engine import Engine, FakeClock, InlineExecutor, Status
from edge.engine.loader import load_text
from edge.store.sqlite import SqliteStore
from edge.terminal.config import RiskLimits
from edge.terminal.sale import risk

LIMITS = RiskLimits(
    floor_limit_minor=2_000,
    offline_amount_cap_minor=5_000,
    offline_count_cap=3,
    max_offline_age_s=3_600,
    velocity_window_s=600,
    velocity_max=2,
)
NOW = 1_700_000_000.0


def decide(amount=1_000, counters=None, oldest=None, pan_hash="h1", now=NOW):
    return risk.check_offline(
        LIMITS, amount_minor=amount, pan_hash=pan_hash, now=now,
        counters=counters or {}, oldest_unsent=oldest,
    )  # fmt: skip


def test_check__within_every_limit_approves():
    assert decide() == risk.OfflineDecision(True)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"amount": 2_001}, risk.FLOOR_LIMIT),
        ({"oldest": NOW - 3_601}, risk.OFFLINE_AGE),
        ({"counters": {risk.OFFLINE: (4_500, 1)}}, risk.OFFLINE_AMOUNT_CAP),
        ({"counters": {risk.OFFLINE: (100, 3)}}, risk.OFFLINE_COUNT_CAP),
        ({"counters": {risk.velocity_counter("h1", NOW, 600): (0, 2)}}, risk.VELOCITY),
    ],
)
def test_check__each_limit_declines_with_its_reason(kwargs, reason):
    assert decide(**kwargs) == risk.OfflineDecision(False, reason)


def test_check__velocity_counts_per_card_and_per_window():
    used = {risk.velocity_counter("h1", NOW, 600): (0, 2)}
    assert decide(counters=used, pan_hash="h2").approved  # another card
    assert decide(counters=used, now=NOW + 600).approved  # the next window


class _Ctx:
    def __init__(self) -> None:
        self.guards: list[tuple] = []

    def guard(self, name, **kw):
        self.guards.append((name, kw))


def test_guards__restate_the_caps_for_the_commit():
    ctx = _Ctx()
    risk.apply_guards(ctx, LIMITS, amount_minor=1_000, pan_hash="h1", now=NOW)
    names = [g[0] for g in ctx.guards]
    assert names == [risk.OFFLINE, risk.OFFLINE, risk.velocity_counter("h1", NOW, 600)]
    assert ctx.guards[0][1]["max_amount"] == 5_000 and ctx.guards[1][1]["max_count"] == 3
    assert ctx.guards[2][1] == {"count": 1, "max_count": 2, "reason": risk.VELOCITY}


APPROVE = """
workflow_type: offline
version: 1
steps:
  - {name: approve, type: STANDARD, function: "test_risk:approve_offline"}
"""


def approve_offline(state, ctx):
    store, limits = ctx.services.store, ctx.services.limits
    now = ctx.clock.now()
    decision = risk.check_offline(
        limits, amount_minor=state["amount"], pan_hash=state["card"], now=now,
        counters=store.counters(), oldest_unsent=store.outbox_stats().oldest,
    )  # fmt: skip
    if not decision.approved:
        return {"approved": False, "reason": decision.reason}
    risk.apply_guards(ctx, limits, amount_minor=state["amount"], pan_hash=state["card"], now=now)
    return {"approved": True}


def test_offline_approvals__stop_at_the_caps_in_the_database(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # steps: test_risk:approve_offline
    store = SqliteStore(tmp_path / "t.db")
    eng = Engine(store, InlineExecutor(), clock=FakeClock(NOW),
                 services=SimpleNamespace(store=store, limits=LIMITS))  # fmt: skip
    eng.register(load_text(APPROVE))
    results = []
    for i, amount in enumerate([1_500, 1_500, 1_500, 1_500]):
        run = eng.get(eng.start("offline", {"amount": amount, "card": f"card{i}"}))
        assert run.status is Status.COMPLETED
        results.append(run.state.get("reason") or "approved")
    assert results == ["approved", "approved", "approved", risk.OFFLINE_AMOUNT_CAP]
    assert store.counters()[risk.OFFLINE] == (4_500, 3)
    store.close()
