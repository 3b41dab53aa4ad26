"""The fleet simulation's plan and bookkeeping (``hwsim.fleetshard.FleetPlan``,
``hwsim.fleetstats``): the same seed draws the same fleet and day, the draws land near
their shares, CPU of a restarted process is kept, distributions and request timelines
count what they are given, and the checks asked of the terminals name what is wrong."""

from __future__ import annotations

from hwsim import fleetstats
from hwsim.fleetshard import MODELS, FleetPlan
from hwsim.simfleet import TerminalSpec


def _spec(i: int, store: str = "store-001") -> TerminalSpec:
    return TerminalSpec(i, f"T{i:05d}", store, "tills", MODELS[0])


def test_plan__same_seed_same_fleet_and_day_another_seed_another():
    a, b, c = FleetPlan(1000, seed=1), FleetPlan(1000, seed=1), FleetPlan(1000, seed=2)

    def day(p: FleetPlan) -> list[tuple[bool, bool, int]]:
        return [(p.late(i), p.link_up(_spec(i), 4), p.sales(i, 3)) for i in range(1000)]

    assert day(a) == day(b)
    assert day(a) != day(c)


def test_plan__shares_are_near_what_it_says():
    p = FleetPlan(20_000, seed=3)
    late = sum(p.late(i) for i in range(p.terminals)) / p.terminals
    offline = sum(p.long_offline(i) for i in range(p.terminals)) / p.terminals
    sales = sum(p.sales(i, h) for i in range(p.terminals) for h in range(p.hours)) / p.terminals
    assert 0.007 < late < 0.013 and 0.002 < offline < 0.004  # 1% and 0.3%
    assert 1.35 < sales < 1.65  # sales_per_terminal is 1.5


def test_plan__a_long_offline_terminal_is_down_from_its_hour_on():
    p = FleetPlan(5000, seed=1, flaky_share=0.0, outage_store_share=0.0)
    gone = next(i for i in range(p.terminals) if p.long_offline(i))
    assert [p.link_up(_spec(gone), h) for h in range(p.hours)] == [
        h < p.long_offline_hour for h in range(p.hours)
    ]
    stays = next(i for i in range(p.terminals) if not p.long_offline(i))
    assert all(p.link_up(_spec(stays), h) for h in range(p.hours))


def test_cpu_ledger__keeps_what_a_killed_process_used():
    ledger = fleetstats.CpuLedger()
    ledger.see("worker-0", 100, 5.0)
    ledger.see("worker-0", 100, 7.5)
    ledger.see("worker-0", 200, 1.0)  # restarted: a new pid
    ledger.set("postgres", 3.0)
    assert ledger.totals() == {"worker-0": 8.5, "postgres": 3.0}


def test_distribution__quantiles_and_histogram_count_every_value():
    d = fleetstats.distribution([float(x) for x in range(1, 101)], buckets=10)
    assert (d["count"], d["p50"], d["p90"], d["p99"], d["max"]) == (100, 50.0, 90.0, 99.0, 100.0)
    assert sum(b[2] for b in d["histogram"]) == 100 and len(d["histogram"]) == 10
    assert fleetstats.distribution([])["count"] == 0


def test_timeline__rate_latency_and_errors_per_window():
    reqs = [(0.5, 0.010, 200), (1.0, 0.020, 200), (9.9, 0.030, 0), (10.1, 0.040, 503)]
    t = fleetstats.timeline(reqs, step_s=10.0)
    assert [w["t_s"] for w in t] == [10.0, 20.0]
    assert t[0]["requests_per_s"] == 0.3 and t[0]["errors"] == 1 and t[0]["p99_ms"] == 30.0
    assert t[1]["errors"] == 1 and t[1]["p50_ms"] == 40.0


def _rollout(name: str, status: str, expected: str, wave: int | None = None) -> dict:
    view = {"document": {"version": 4}, "abort": None if wave is None else {"wave": wave}}
    return {"name": name, "status": status, "expected": expected, "view": view}


def test_rollout_checks__name_a_wrong_ending_and_a_wrong_wave():
    fine = fleetstats.rollout_checks([_rollout("bad", "rolled_back", "rolled_back", 2),
                                      _rollout("good", "succeeded", "succeeded")])  # fmt: skip
    assert fine[0]["ok"]
    wrong = fleetstats.rollout_checks([_rollout("bad", "rolled_back", "rolled_back", 3),
                                       _rollout("good", "rolled_back", "succeeded")])  # fmt: skip
    assert not wrong[0]["ok"] and wrong[0]["violations"] == 2
    assert any("wave 3" in e for e in wrong[0]["examples"])
    small = fleetstats.rollout_checks([_rollout("bad", "rolled_back", "rolled_back", 3)],
                                      abort_wave=None)  # fmt: skip
    assert small[0]["ok"]  # any wave, for a fleet too small to judge in wave 2


def test_terminal_checks__off_version_failing_and_unrestored_are_named():
    good = _rollout("good", "succeeded", "succeeded")
    policy = {"view": {"document": {"version": 2}}}
    versions = {
        "d1": {"name": "T1", "model": "TF-100", "config": 4, "policy": 2, "failing": False,
               "last_error": None},
        "d2": {"name": "T2", "model": "XR-7", "config": 3, "policy": 2, "failing": True,
               "last_error": "printer_jam: ..."},
    }  # fmt: skip
    bad = {"devices": [
        {"device_id": "d1", "applied_at": 1.0, "restore_status": "restored"},
        {"device_id": "d2", "applied_at": 1.0, "restore_status": "timed_out"},
        {"device_id": "d3", "applied_at": None, "restore_status": "none"},
    ]}  # fmt: skip
    on, restored = fleetstats.terminal_checks(versions, bad, good, policy, baseline=1)
    assert not on["ok"] and on["violations"] == 1 and "T2 (XR-7): config v3" in on["examples"][0]
    assert not restored["ok"] and restored["checked"] == 2
    assert restored["examples"] == ["d2: restore timed_out"]
