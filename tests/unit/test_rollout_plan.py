"""A rollout's arithmetic (``cloud.rollouts.plan``) and its options, pure: wave sizes from
counts and percentages, seeded membership, the threshold's verdict and figures, windows
and the rate, the selector's parameters; the options refuse what is not one."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from cloud.rollouts import plan
from cloud.rollouts.options import Abort, RolloutOptions, Target, Window


def ts(hh: int, mm: int = 0) -> float:
    return datetime(2027, 1, 15, hh, mm, tzinfo=UTC).timestamp()


# --- waves ------------------------------------------------------------------------------


def test_wave_sizes__percentages_round_up_and_the_last_takes_the_rest():
    assert plan.wave_sizes(["1%", "10%", "50%", "100%"], 1000) == [10, 100, 500, 1000]
    assert plan.wave_sizes(["1%", "10%", "50%", "100%"], 50) == [1, 5, 25, 50]
    assert plan.wave_sizes(["10%", "50%"], 20) == [2, 20]  # the last wave takes the rest
    assert plan.wave_sizes(["10%", "50%", "100%"], 0) == []


def test_wave_sizes__counts_clip_and_empty_waves_are_dropped():
    assert plan.wave_sizes(["5", "20", "100"], 12) == [5, 12]
    assert plan.wave_sizes(["1%", "2%", "100%"], 10) == [1, 10]  # 1% and 2% of 10 are both 1
    assert plan.wave_sizes(["3", "50%"], 4) == [3, 4]


def test_membership__seeded_stable_and_sized():
    ids = [f"d{n:03d}" for n in range(100)]
    sizes = plan.wave_sizes(["10%", "50%", "100%"], 100)
    first = plan.membership(ids, sizes, seed=7)
    assert plan.membership(reversed(ids), sizes, seed=7) == first  # order read: no matter
    counts = [sum(1 for w in first.values() if w == n) for n in (1, 2, 3)]
    assert counts == [10, 40, 50]
    other = plan.membership(ids, sizes, seed=8)
    assert other != first  # another seed, other waves
    wave_one = sorted(d for d, w in first.items() if w == 1)
    assert wave_one != ids[:10]  # not "first enrolled first"


# --- the threshold ----------------------------------------------------------------------


def test_evaluate__wave_rate_counts_only_past_its_minimum_sample():
    abort = Abort(failure_percent=10, min_sample_wave=5, min_sample_total=10)
    small = {"healthy": 2, "failed": 2}
    assert not plan.evaluate(small, small, abort).abort  # 4 sampled < 5
    wave = {"healthy": 3, "failed": 2, "notified": 10}
    verdict = plan.evaluate(wave, wave, abort)
    assert verdict.abort and verdict.criterion == "wave_failure_rate"
    assert verdict.detail(10) == {"failures": 2, "sampled": 5, "failure_percent": 40.0,
                                  "threshold": 10}  # fmt: skip


def test_evaluate__total_rate_and_the_kinds_counted():
    abort = Abort(failure_percent=20, min_sample_wave=50, min_sample_total=10,
                  count=["refused"])  # fmt: skip
    total = {"healthy": 7, "refused": 4, "timed_out": 5}
    verdict = plan.evaluate({"healthy": 1}, total, abort)
    assert verdict.criterion == "total_failure_rate"
    assert verdict.figures == plan.Figures(failures=4, sampled=16)
    # soaking devices are sampled: three quick failures among many still soaking
    soaking = {"applied": 27, "failed": 3}
    assert not plan.evaluate(soaking, soaking, Abort(failure_percent=10)).abort
    # exactly at the threshold is not past it
    at = Abort(failure_percent=20, min_sample_wave=1, min_sample_total=1)
    assert not plan.evaluate({"healthy": 4, "failed": 1}, {"healthy": 4, "failed": 1}, at).abort


# --- windows and rate -------------------------------------------------------------------


def test_in_window__local_hours_and_across_midnight():
    night = Window(tz="Europe/Berlin", start="22:00", end="06:00")
    assert plan.in_window(night, ts(22, 30))  # 23:30 in Berlin
    assert plan.in_window(night, ts(3))  # 04:00 there
    assert not plan.in_window(night, ts(12))  # 13:00 there: trading hours
    day = Window(tz="UTC", start="09:00", end="17:00")
    assert plan.in_window(day, ts(9)) and not plan.in_window(day, ts(17))
    assert plan.in_window(None, ts(12))


def test_open_stores__a_store_without_its_own_window_takes_the_default():
    windows = {
        "s1": Window(start="00:00", end="01:00"),
        "default": Window(start="12:00", end="13:00"),
    }
    assert plan.open_stores(windows, ["s1", "s2", "s2"], ts(12, 30)) == {"s2"}
    assert plan.open_stores(windows, ["s1", "s2"], ts(0, 30)) == {"s1"}
    assert plan.open_stores(None, ["s1"], ts(0)) == {"s1"}


def test_quota__per_minute():
    assert plan.quota(None, 999, 40) == 40
    assert plan.quota(10, 4, 40) == 6
    assert plan.quota(10, 12, 40) == 0


# --- options and the selector -----------------------------------------------------------


def test_options__defaults_filled_and_typos_named():
    o = RolloutOptions.model_validate({"target": {"all": True}})
    assert o.waves == ["10%", "50%", "100%"] and o.soak_s == 300 and o.device_timeout_s == 3600
    assert o.abort.count == ["failed", "refused", "timed_out"] and o.rate_per_minute is None
    with pytest.raises(ValidationError) as err:
        RolloutOptions.model_validate({"target": {"all": True}, "soak": 5})
    assert "soak" in str(err.value)
    with pytest.raises(ValidationError, match="selects nothing"):
        RolloutOptions.model_validate({"target": {}})
    with pytest.raises(ValidationError, match="a wave is a count"):
        RolloutOptions.model_validate({"target": {"all": True}, "waves": ["ten"]})
    with pytest.raises(ValidationError, match="unknown time zone"):
        Window(tz="Mars/Olympus", start="01:00", end="02:00")


def test_selector__bound_lists_and_the_place_finalize_assigns():
    t = Target(stores=["s2", "s1", "s1"], tags=["canary"])
    params = plan.selector_params(t, only=["d1"])
    assert params == {"stores": ["s1", "s2"], "groups": None, "tags": ["canary"],
                      "binary_versions": None, "device_ids": None, "only": ["d1"]}  # fmt: skip
    assert t.scope is None
    assert Target(all=True).scope == ("fleet", None)
    assert Target(groups=["berlin"]).scope == ("group", "berlin")
    assert Target(stores=["s1"]).scope == ("store", "s1")
