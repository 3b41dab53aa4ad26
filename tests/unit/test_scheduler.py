"""The on-device scheduler: cron parsing and evaluation (with real DST transitions in
Europe/Berlin), firing, missed triggers after downtime, idempotency keys, and the state
file. Time is a FakeClock: nothing sleeps."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from edge.engine.clock import FakeClock
from edge.errors import ConfigError, StoreError
from edge.terminal.config import Schedule
from edge.terminal.service.scheduler import (
    CronExpr,
    FileSchedulerState,
    MemorySchedulerState,
    Scheduler,
    idempotency_key,
)

BERLIN = ZoneInfo("Europe/Berlin")


def berlin(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=BERLIN)


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return berlin(year, month, day, hour, minute, second).timestamp()


# --- parsing -------------------------------------------------------------------------


def test_a_star_matches_every_value_of_its_field() -> None:
    e = CronExpr.parse("* * * * *")
    assert e.minutes == tuple(range(60))
    assert e.hours == tuple(range(24))
    assert e.days == tuple(range(1, 32))
    assert e.months == tuple(range(1, 13))
    assert e.weekdays == tuple(range(7))


def test_lists_ranges_and_steps_expand_to_the_values_they_name() -> None:
    e = CronExpr.parse("1,5,59 1-5 */10 1-12/5 1-5,0")
    assert e.minutes == (1, 5, 59)
    assert e.hours == (1, 2, 3, 4, 5)
    assert e.days == (1, 11, 21, 31)
    assert e.months == (1, 6, 11)
    assert e.weekdays == (0, 1, 2, 3, 4, 5)


def test_steps_over_ranges_start_at_the_range_start() -> None:
    assert CronExpr.parse("1-30/5 * * * *").minutes == (1, 6, 11, 16, 21, 26)
    assert CronExpr.parse("*/15 * * * *").minutes == (0, 15, 30, 45)
    assert CronExpr.parse("10-20/50 * * * *").minutes == (10,)  # step longer than the range


def test_month_and_weekday_names_are_case_insensitive_and_work_in_lists_and_ranges() -> None:
    e = CronExpr.parse("0 0 * JAN-mar,Dec mon-FRI")
    assert e.months == (1, 2, 3, 12)
    assert e.weekdays == (1, 2, 3, 4, 5)
    assert CronExpr.parse("0 0 * * sat,sun").weekdays == (0, 6)


def test_weekday_0_and_7_are_both_sunday() -> None:
    assert CronExpr.parse("0 0 * * 7").weekdays == (0,)
    assert CronExpr.parse("0 0 * * 0").weekdays == (0,)
    assert CronExpr.parse("0 0 * * 5-7").weekdays == (0, 5, 6)


def test_a_weekday_range_ending_on_sun_runs_to_sunday() -> None:
    assert CronExpr.parse("0 0 * * fri-sun").weekdays == (0, 5, 6)


def test_the_text_is_kept_normalised_for_messages() -> None:
    assert str(CronExpr.parse("  0   23 *\t* * ")) == "0 23 * * *"


@pytest.mark.parametrize(
    ("text", "field", "token"),
    [
        ("60 * * * *", "minute", "'60'"),
        ("* 24 * * *", "hour", "'24'"),
        ("* * 0 * *", "day-of-month", "'0'"),
        ("* * 32 * *", "day-of-month", "'32'"),
        ("* * * 13 *", "month", "'13'"),
        ("* * * foo *", "month", "'foo'"),
        ("* * * * 8", "day-of-week", "'8'"),
        ("* * * * jan", "day-of-week", "'jan'"),
        ("* * * * mon-", "day-of-week", "'mon-'"),
        ("-1 * * * *", "minute", "'-1'"),
        ("5-1 * * * *", "minute", "'5-1'"),
        ("*/0 * * * *", "minute", "'*/0'"),
        ("*/x * * * *", "minute", "'*/x'"),
        ("5/15 * * * *", "minute", "'5/15'"),
        ("1,,2 * * * *", "minute", "'1,,2'"),
        ("* ½ * * *", "hour", "'½'"),
        ("* * 30 2 *", "day-of-month", "'30'"),
        ("0 0 31 apr,jun,sep,nov *", "day-of-month", "'31'"),
    ],
)
def test_a_bad_expression_raises_config_error_naming_the_field_and_the_token(
    text: str, field: str, token: str
) -> None:
    with pytest.raises(ConfigError) as info:
        CronExpr.parse(text)
    message = str(info.value)
    assert f"{field} field" in message
    assert token in message
    assert repr(" ".join(text.split())) in message


@pytest.mark.parametrize("text", ["", "* * * *", "* * * * * *", "@daily"])
def test_anything_but_five_fields_is_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match="expected 5 fields"):
        CronExpr.parse(text)


def test_the_leap_day_is_a_possible_spec_even_across_a_non_leap_century() -> None:
    e = CronExpr.parse("0 0 29 2 *")
    assert e.next_after(berlin(2026, 1, 1)) == berlin(2028, 2, 29)
    assert e.next_after(berlin(2096, 3, 1)) == berlin(2104, 2, 29)  # 2100 is not a leap year


# --- day-of-month / day-of-week ------------------------------------------------------


def test_when_both_day_fields_are_restricted_either_one_matching_is_enough() -> None:
    e = CronExpr.parse("0 12 13 * fri")
    t = berlin(2026, 2, 1)
    got = []
    for _ in range(6):
        t = e.next_after(t)
        got.append(t.date().isoformat())
    # Fridays of February 2026, plus the 13th (itself a Friday), then March.
    assert got == [
        "2026-02-06",
        "2026-02-13",
        "2026-02-20",
        "2026-02-27",
        "2026-03-06",
        "2026-03-13",
    ]


def test_a_day_field_starting_with_star_means_both_must_match() -> None:
    e = CronExpr.parse("0 0 */2 * mon")  # odd days that are Mondays (Vixie: */2 is a star)
    t = berlin(2026, 1, 1)
    got = []
    for _ in range(3):
        t = e.next_after(t)
        got.append(t.date())
    assert all(d.day % 2 == 1 and d.isoweekday() == 1 for d in got)
    assert got[0].isoformat() == "2026-01-05"


def test_a_day_of_month_that_never_occurs_is_fine_when_the_weekday_can_match() -> None:
    e = CronExpr.parse("0 0 30 2 mon")  # Feb 30 OR any Monday in February
    assert e.next_after(berlin(2026, 1, 1)) == berlin(2026, 2, 2)


# --- next_after ----------------------------------------------------------------------


def test_next_after_is_strictly_after_t() -> None:
    e = CronExpr.parse("0 23 * * *")
    assert e.next_after(berlin(2026, 11, 24, 23, 0)) == berlin(2026, 11, 25, 23, 0)
    assert e.next_after(berlin(2026, 11, 24, 22, 59, 59)) == berlin(2026, 11, 24, 23, 0)


def test_next_after_ignores_seconds_of_t() -> None:
    e = CronExpr.parse("* * * * *")
    assert e.next_after(berlin(2026, 5, 1, 10, 0, 30)) == berlin(2026, 5, 1, 10, 1)


def test_next_after_crosses_a_month_end() -> None:
    assert CronExpr.parse("0 0 1 * *").next_after(berlin(2026, 1, 31, 23, 59)) == berlin(2026, 2, 1)
    # April has no 31st: the next 31st is in May.
    assert CronExpr.parse("0 12 31 * *").next_after(berlin(2026, 4, 1)) == berlin(
        2026, 5, 31, 12, 0
    )


def test_next_after_crosses_a_year_end() -> None:
    assert CronExpr.parse("0 0 1 1 *").next_after(berlin(2026, 12, 31, 23, 30)) == berlin(
        2027, 1, 1
    )
    assert CronExpr.parse("59 23 31 12 *").next_after(berlin(2026, 12, 31, 23, 59)) == berlin(
        2027, 12, 31, 23, 59
    )


def test_next_after_answers_in_the_zone_of_t() -> None:
    e = CronExpr.parse("0 23 * * *")
    got = e.next_after(datetime(2026, 7, 1, tzinfo=UTC))
    assert got.tzinfo is UTC
    assert got == datetime(2026, 7, 1, 23, 0, tzinfo=UTC)
    assert e.next_after(berlin(2026, 7, 1)).utcoffset() == timedelta(hours=2)


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        CronExpr.parse("* * * * *").next_after(datetime(2026, 1, 1))


def test_an_impossible_spec_makes_next_after_raise_instead_of_looping() -> None:
    # parse() rejects Feb 30; build one past it to prove the scan is bounded.
    e = dataclasses.replace(CronExpr.parse("0 0 28 2 *"), days=(30,))
    with pytest.raises(ConfigError, match="no matching time"):
        e.next_after(berlin(2026, 1, 1))
    assert e.previous_at_or_before(berlin(2026, 1, 1)) is None


# --- daylight saving time (Europe/Berlin, 2026: forward Mar 29, back Oct 25) ----------


def test_a_job_in_the_spring_forward_gap_runs_at_the_first_minute_after_the_gap() -> None:
    e = CronExpr.parse("30 2 * * *")
    first = e.next_after(berlin(2026, 3, 28, 12, 0))
    assert first.isoformat() == "2026-03-29T03:00:00+02:00"
    assert e.next_after(first).isoformat() == "2026-03-30T02:30:00+02:00"
    assert e.previous_at_or_before(berlin(2026, 3, 29, 3, 10)) == first


def test_several_matches_inside_the_gap_fire_once_together() -> None:
    e = CronExpr.parse("*/30 * * * *")
    t = berlin(2026, 3, 29, 1, 0)
    got = []
    for _ in range(3):
        t = e.next_after(t)
        got.append(t.isoformat())
    assert got == [
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:00, 02:30 (skipped by the clocks) and 03:00
        "2026-03-29T03:30:00+02:00",
    ]


def test_a_job_in_the_repeated_fall_back_hour_runs_once_at_the_first_occurrence() -> None:
    e = CronExpr.parse("30 2 * * *")
    first = e.next_after(berlin(2026, 10, 24, 12, 0))
    assert first.isoformat() == "2026-10-25T02:30:00+02:00"
    assert e.next_after(first).isoformat() == "2026-10-26T02:30:00+01:00"


def test_the_repeated_fall_back_hour_is_not_run_twice() -> None:
    e = CronExpr.parse("*/30 * * * *")
    t = berlin(2026, 10, 25, 1, 45)
    got = []
    for _ in range(3):
        t = e.next_after(t)
        got.append(t.isoformat())
    assert got == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T03:00:00+01:00",  # the second 02:00-02:59 (CET) has no triggers
    ]


def test_previous_at_or_before_in_the_second_pass_of_the_repeated_hour() -> None:
    e = CronExpr.parse("*/15 * * * *")
    # 02:10 CET, the second pass: 02:15, 02:30 and 02:45 CEST already happened.
    t = datetime.fromtimestamp(datetime(2026, 10, 25, 1, 10, tzinfo=UTC).timestamp(), BERLIN)
    assert t.fold == 1
    got = e.previous_at_or_before(t)
    assert got is not None
    # (compare instants: PEP 495 makes == across zones False inside a repeated hour)
    assert got.timestamp() == datetime(2026, 10, 25, 0, 45, tzinfo=UTC).timestamp()
    assert got.isoformat() == "2026-10-25T02:45:00+02:00"
    assert e.next_after(t).isoformat() == "2026-10-25T03:00:00+01:00"


def test_previous_at_or_before_includes_t_itself() -> None:
    e = CronExpr.parse("0 23 * * *")
    assert e.previous_at_or_before(berlin(2026, 11, 24, 23, 0)) == berlin(2026, 11, 24, 23, 0)
    assert e.previous_at_or_before(berlin(2026, 11, 24, 22, 59)) == berlin(2026, 11, 23, 23, 0)
    assert e.previous_at_or_before(berlin(2026, 1, 1, 0, 0, 30)) == berlin(2025, 12, 31, 23, 0)


# --- Scheduler ---------------------------------------------------------------------------


class FakeEngine:
    """``Engine.start``'s contract for the scheduler: one run per idempotency key."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], str]] = []
        self.runs: dict[str, str] = {}
        self.fail_next = 0

    def start(self, workflow: str, input: dict[str, Any], key: str) -> str:
        self.calls.append((workflow, input, key))
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("store unavailable")
        return self.runs.setdefault(key, f"run-{len(self.runs) + 1}")

    @property
    def keys(self) -> list[str]:
        return [key for _, _, key in self.calls]


class Crash(BaseException):
    """The process dies here (not an Exception: nothing catches it)."""


class CrashOnRecord(MemorySchedulerState):
    def __init__(self, inner: FileSchedulerState) -> None:
        super().__init__()
        self.inner = inner

    def last_fired(self, name: str) -> float | None:
        return self.inner.last_fired(name)

    def record_fired(self, name: str, due_ts: float) -> None:
        raise Crash


EOD = Schedule(name="end_of_day", cron="0 23 * * *", workflow="settlement", input={"batch": 1})


def make(
    clock: FakeClock,
    engine: FakeEngine,
    state: Any,
    schedules: list[Schedule] | None = None,
) -> Scheduler:
    return Scheduler(
        [EOD] if schedules is None else schedules, engine.start, clock, tz=BERLIN, state=state
    )


def test_tick_fires_at_the_due_time_exactly_once() -> None:
    clock, engine, state = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine(), MemorySchedulerState()
    s = make(clock, engine, state)
    assert s.on_start() == []
    clock.advance(ts(2026, 11, 24, 22, 59, 59) - clock.now())
    assert s.tick() == []
    clock.advance(1)
    assert s.tick() == ["end_of_day"]
    assert s.tick() == []
    clock.advance(30)
    assert s.tick() == []
    clock.advance(ts(2026, 11, 25, 23, 0) - clock.now())
    assert s.tick() == ["end_of_day"]
    assert engine.keys == [
        "schedule:end_of_day:2026-11-24T23:00+01:00",
        "schedule:end_of_day:2026-11-25T23:00+01:00",
    ]
    assert state.last_fired("end_of_day") == ts(2026, 11, 25, 23, 0)


def test_the_run_gets_the_schedules_workflow_and_a_copy_of_its_input() -> None:
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine()
    s = make(clock, engine, MemorySchedulerState())
    s.on_start()
    clock.advance(ts(2026, 11, 24, 23, 0) - clock.now())
    s.tick()
    workflow, run_input, _ = engine.calls[0]
    assert (workflow, run_input) == ("settlement", {"batch": 1})
    assert run_input is not EOD.input


def test_a_late_tick_fires_the_latest_missed_occurrence_once() -> None:
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine()
    s = make(clock, engine, MemorySchedulerState())
    s.on_start()
    clock.advance(3 * 86_400)  # the loop was stuck for three days
    assert s.tick() == ["end_of_day"]
    assert engine.keys == ["schedule:end_of_day:2026-11-26T23:00+01:00"]


def test_tick_fires_every_due_schedule_in_config_order() -> None:
    hourly = Schedule(name="heartbeat", cron="0 * * * *", workflow="ping")
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0, 30)), FakeEngine()
    s = make(clock, engine, MemorySchedulerState(), [EOD, hourly])
    s.on_start()
    clock.advance(ts(2026, 11, 24, 23, 0) - clock.now())
    assert s.tick() == ["end_of_day", "heartbeat"]


def test_on_start_fires_a_missed_trigger_once_after_downtime_spanning_several() -> None:
    state = MemorySchedulerState({"end_of_day": ts(2026, 11, 20, 23, 0)})
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine()
    s = make(clock, engine, state)
    assert s.on_start() == ["end_of_day"]
    assert engine.keys == ["schedule:end_of_day:2026-11-23T23:00+01:00"]
    assert state.last_fired("end_of_day") == ts(2026, 11, 23, 23, 0)
    assert s.tick() == []
    assert s.next_due() == ts(2026, 11, 24, 23, 0)


def test_on_start_fires_nothing_when_nothing_was_missed() -> None:
    state = MemorySchedulerState({"end_of_day": ts(2026, 11, 23, 23, 0)})
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine()
    assert make(clock, engine, state).on_start() == []
    assert engine.calls == []


def test_on_start_does_not_fire_triggers_from_before_the_first_ever_run() -> None:
    state = MemorySchedulerState()
    clock, engine = FakeClock(ts(2026, 11, 24, 23, 30)), FakeEngine()
    s = make(clock, engine, state)
    assert s.on_start() == []
    assert engine.calls == []
    # The latest past due time is the baseline: the next one fires normally.
    assert state.last_fired("end_of_day") == ts(2026, 11, 24, 23, 0)
    assert s.next_due() == ts(2026, 11, 25, 23, 0)


def test_the_baseline_makes_a_later_downtime_fire_its_missed_trigger() -> None:
    state = MemorySchedulerState()
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine()
    make(clock, engine, state).on_start()
    clock.advance(ts(2026, 11, 26, 8, 0) - clock.now())  # down over two nights
    assert make(clock, engine, state).on_start() == ["end_of_day"]
    assert engine.keys == ["schedule:end_of_day:2026-11-25T23:00+01:00"]


def test_a_trigger_due_exactly_at_the_first_ever_check_fires() -> None:
    clock, engine = FakeClock(ts(2026, 11, 24, 23, 0)), FakeEngine()
    assert make(clock, engine, MemorySchedulerState()).on_start() == ["end_of_day"]


def test_a_crash_before_recording_refires_with_the_same_key_making_one_run(
    tmp_path: Path,
) -> None:
    path = tmp_path / "scheduler.json"
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine()
    make(clock, engine, FileSchedulerState(path)).on_start()  # baseline: 2026-11-23 23:00
    first = make(clock, engine, CrashOnRecord(FileSchedulerState(path)))
    first.on_start()
    clock.advance(ts(2026, 11, 24, 23, 0) - clock.now())
    with pytest.raises(Crash):
        first.tick()  # the run was started; the daemon died before recording it
    clock.advance(20)
    second = make(clock, engine, FileSchedulerState(path))
    assert second.on_start() == ["end_of_day"]
    assert engine.keys == ["schedule:end_of_day:2026-11-24T23:00+01:00"] * 2
    assert len(engine.runs) == 1
    assert FileSchedulerState(path).last_fired("end_of_day") == ts(2026, 11, 24, 23, 0)


def test_two_daemons_firing_one_trigger_use_one_key() -> None:
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine()
    a = make(clock, engine, MemorySchedulerState())
    b = make(clock, engine, MemorySchedulerState())
    a.on_start()
    b.on_start()
    clock.advance(ts(2026, 11, 24, 23, 0, 5) - clock.now())
    assert a.tick() == b.tick() == ["end_of_day"]
    assert len(set(engine.keys)) == 1
    assert len(engine.runs) == 1


def test_a_failed_start_is_not_recorded_and_is_retried_with_the_same_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = MemorySchedulerState()
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine()
    s = make(clock, engine, state)
    s.on_start()
    baseline = state.last_fired("end_of_day")
    clock.advance(ts(2026, 11, 24, 23, 0) - clock.now())
    engine.fail_next = 1
    assert s.tick() == []
    assert "could not be started" in caplog.text
    assert state.last_fired("end_of_day") == baseline
    assert s.next_due() == clock.now() + 60
    clock.advance(60)
    assert s.tick() == ["end_of_day"]
    assert engine.keys == ["schedule:end_of_day:2026-11-24T23:00+01:00"] * 2
    assert state.last_fired("end_of_day") == ts(2026, 11, 24, 23, 0)


def test_a_failed_record_is_logged_and_the_trigger_is_not_fired_again_in_this_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unwritable(MemorySchedulerState):
        def record_fired(self, name: str, due_ts: float) -> None:
            raise OSError("read-only file system")

    clock, engine = FakeClock(ts(2026, 11, 24, 12, 0)), FakeEngine()
    s = make(clock, engine, Unwritable())
    s.on_start()
    clock.advance(ts(2026, 11, 24, 23, 0) - clock.now())
    assert s.tick() == ["end_of_day"]
    assert "could not record" in caplog.text
    clock.advance(60)
    assert s.tick() == []


def test_the_key_on_the_spring_forward_day_names_the_shifted_time() -> None:
    nightly = Schedule(name="nightly", cron="30 2 * * *", workflow="cleanup")
    clock, engine = FakeClock(ts(2026, 3, 28, 12, 0)), FakeEngine()
    s = make(clock, engine, MemorySchedulerState(), [nightly])
    s.on_start()
    clock.advance(ts(2026, 3, 29, 3, 0) - clock.now())
    assert s.tick() == ["nightly"]
    assert engine.keys == ["schedule:nightly:2026-03-29T03:00+02:00"]


def test_idempotency_key_is_stable_for_one_due_time() -> None:
    due = berlin(2026, 11, 24, 23, 0)
    same = datetime.fromtimestamp(due.timestamp(), BERLIN)
    assert idempotency_key("end_of_day", due) == idempotency_key("end_of_day", same)
    assert idempotency_key("end_of_day", due) == "schedule:end_of_day:2026-11-24T23:00+01:00"


def test_next_due_is_the_soonest_trigger_of_all_schedules() -> None:
    hourly = Schedule(name="heartbeat", cron="15 * * * *", workflow="ping")
    clock, engine = FakeClock(ts(2026, 11, 24, 12, 20)), FakeEngine()
    s = make(clock, engine, MemorySchedulerState(), [EOD, hourly])
    s.on_start()
    assert s.next_due() == ts(2026, 11, 24, 13, 15)


def test_next_due_is_none_without_schedules() -> None:
    s = make(FakeClock(), FakeEngine(), MemorySchedulerState(), [])
    assert s.on_start() == []
    assert s.tick() == []
    assert s.next_due() is None


def test_tick_and_next_due_need_on_start_first() -> None:
    s = make(FakeClock(), FakeEngine(), MemorySchedulerState())
    with pytest.raises(RuntimeError, match="on_start"):
        s.tick()
    with pytest.raises(RuntimeError, match="on_start"):
        s.next_due()


def test_a_bad_cron_in_a_schedule_names_the_schedule_and_the_field() -> None:
    bad = Schedule(name="eod", cron="0 25 * * *", workflow="settlement")
    with pytest.raises(ConfigError, match=r"'eod'.*hour field: '25'"):
        make(FakeClock(), FakeEngine(), MemorySchedulerState(), [bad])


def test_duplicate_schedule_names_are_rejected() -> None:
    with pytest.raises(ConfigError, match="'end_of_day' is used twice"):
        make(FakeClock(), FakeEngine(), MemorySchedulerState(), [EOD, EOD])


# --- FileSchedulerState ------------------------------------------------------------------


def test_file_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    state = FileSchedulerState(path)
    assert state.last_fired("end_of_day") is None
    state.record_fired("end_of_day", 1_764_021_600.0)
    state.record_fired("heartbeat", 1_764_000_000.0)
    reopened = FileSchedulerState(path)
    assert reopened.last_fired("end_of_day") == 1_764_021_600.0
    assert reopened.last_fired("heartbeat") == 1_764_000_000.0
    assert json.loads(path.read_text())["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scheduler.json"]  # no temp left


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"[]",
        b'{"version": 2, "last_fired": {}}',
        b'{"version": 1}',
        b'{"version": 1, "last_fired": {"eod": "yesterday"}}',
        b'{"version": 1, "last_fired": {"eod": true}}',
    ],
)
def test_a_corrupt_state_file_raises_config_error_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "scheduler.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="corrupt") as info:
        FileSchedulerState(path)
    assert str(path) in str(info.value)


def test_a_state_file_that_cannot_be_written_raises_store_error_naming_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "missing-dir" / "scheduler.json"
    state = FileSchedulerState(path)
    with pytest.raises(StoreError) as info:
        state.record_fired("end_of_day", 1.0)
    assert str(path) in str(info.value)
    assert state.last_fired("end_of_day") is None
