"""When the terminal syncs (``sync.device.runner``): on the interval, soon after new
sales, at once while batches come back full, backing off with jitter while the cloud is
away; never raising out of its thread, and stopping promptly. Time is a ``FakeClock``
moved by the runner's own waits: nothing here sleeps."""

from __future__ import annotations

import random
import threading

import pytest

from edge.engine import FakeClock
from sync import wire
from sync.device.client import SyncOutcome
from sync.device.errors import SyncRefused, SyncUnavailable
from sync.device.runner import SyncRunner

T0 = 1_800_000_000.0


def outcome(more: bool = False) -> SyncOutcome:
    chain = wire.ChainState(state="ok", head_seq=0)
    return SyncOutcome(0, 0, None, None, 0, {}, chain, [], more)


class Script:
    """A client whose syncs go as scripted (an outcome, or an exception to raise); it
    notes the clock at each call."""

    def __init__(self, clock: FakeClock, steps: list[object]) -> None:
        self.clock, self.steps, self.calls = clock, list(steps), []

    def sync_once(self) -> SyncOutcome:
        self.calls.append(self.clock.now() - T0)
        step = self.steps.pop(0) if self.steps else outcome()
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, SyncOutcome)
        return step


class Term:
    last_error: str | None = None


def drive(runner: SyncRunner, clock: FakeClock, until: float, on_wait=None) -> None:
    """Run the loop until the fake clock passes ``until``: each wait moves the clock."""
    stop = threading.Event()

    def wait(seconds: float) -> bool:
        clock.advance(max(seconds, 0.001))
        if on_wait is not None:
            on_wait(clock.now() - T0)
        if clock.now() - T0 >= until:
            stop.set()
        return stop.is_set()

    runner.run(stop, wait)


def rig(steps: list[object], **kw) -> tuple[SyncRunner, Script, FakeClock, Term]:
    clock = FakeClock(T0)
    script, term = Script(clock, steps), Term()
    opts = {"interval_s": 30.0, "rng": random.Random(7), **kw}
    return SyncRunner(script, term, clock=clock, **opts), script, clock, term


def test_backoff__doubles_from_1_s_to_60_s_in_the_upper_half_seeded():
    runner, *_ = rig([])
    seen = []
    for failures in range(1, 10):
        runner.failures = failures
        top = min(60.0, 2.0 ** (failures - 1))
        delay = runner.backoff()
        assert max(1.0, top / 2) <= delay <= top, (failures, delay)
        seen.append(delay)
    again, *_ = rig([])
    replay = []
    for failures in range(1, 10):
        again.failures = failures
        replay.append(again.backoff())
    assert replay == seen  # the same seed, the same jitter
    assert seen[-1] >= 30.0  # capped at 60, never below half of it


def test_run__syncs_at_once_then_on_the_interval():
    runner, script, clock, _ = rig([])
    drive(runner, clock, until=95)
    assert [round(t) for t in script.calls] == [0, 30, 60, 90]


def test_run__while_batches_come_back_full_it_syncs_again_at_once():
    runner, script, clock, _ = rig([outcome(more=True), outcome(more=True), outcome()])
    drive(runner, clock, until=40)
    assert [round(t, 1) for t in script.calls] == [0.0, 0.0, 0.0, 30.0]


def test_run__backs_off_while_unreachable_and_resumes_the_interval_after():
    down = SyncUnavailable("cannot reach the control plane")
    runner, script, clock, term = rig([down, down, down, down, outcome()])
    errors: list[str | None] = []
    drive(runner, clock, until=60, on_wait=lambda t: errors.append(term.last_error))
    gaps = [b - a for a, b in zip(script.calls, script.calls[1:], strict=False)]
    assert len(gaps) >= 5
    for n, gap in enumerate(gaps[:4], start=1):  # after the n-th failure
        top = min(60.0, 2.0 ** (n - 1))
        assert max(1.0, top / 2) <= gap <= top + 0.01, (n, gap)
    assert gaps[4] == pytest.approx(30.0, abs=0.01)  # well again: the interval
    assert "sync: sync_unavailable: cannot reach the control plane" in errors
    assert term.last_error is None  # the good sync cleared its own error


def test_run__a_refusal_backs_off_too_and_is_reported():
    refused = SyncRefused("401 unknown_device: no such device")
    runner, script, clock, _ = rig([refused, refused])
    drive(runner, clock, until=2.5)
    assert len(script.calls) == 3 and runner.failures == 0
    runner2, _, clock2, term2 = rig([refused])
    drive(runner2, clock2, until=0.5)
    assert term2.last_error == "sync: sync_refused: 401 unknown_device: no such device"


def test_run__new_outbox_messages_bring_the_next_sync_forward():
    newest = {"seq": 0}
    runner, script, clock, _ = rig([], newest=lambda: newest["seq"])

    def sale_at_10(t: float) -> None:
        if 10 <= t < 11:
            newest["seq"] = 5  # an offline sale was queued

    drive(runner, clock, until=35, on_wait=sale_at_10)
    assert len(script.calls) == 2  # the one at 30 came forward; the next is at ~42
    assert 11 <= script.calls[1] <= 13.1  # about 2 s after the sale was seen, not at 30


def test_run__new_sales_do_not_cut_a_backoff_short():
    newest = {"seq": 0}
    down = SyncUnavailable("down")
    runner, script, clock, _ = rig([down] * 10, newest=lambda: newest["seq"])

    def sales(t: float) -> None:
        newest["seq"] += 1  # a sale every poll

    drive(runner, clock, until=40, on_wait=sales)
    gaps = [b - a for a, b in zip(script.calls, script.calls[1:], strict=False)]
    for n, gap in enumerate(gaps, start=1):
        assert gap >= max(1.0, min(60.0, 2.0 ** (n - 1)) / 2), (n, gap)


def test_run__an_unexpected_error_never_leaves_the_thread():
    runner, script, clock, term = rig([RuntimeError("bug"), outcome()])
    errors: list[str | None] = []
    drive(runner, clock, until=3, on_wait=lambda t: errors.append(term.last_error))
    assert "sync: RuntimeError: bug" in errors
    assert len(script.calls) == 2 and term.last_error is None


def test_run__an_error_not_its_own_is_left_in_last_error():
    runner, _, clock, term = rig([])
    term.last_error = "storage_full: the database is full"
    drive(runner, clock, until=1)
    assert term.last_error == "storage_full: the database is full"


def test_run__stops_promptly_in_a_thread_with_a_real_event():
    blocked = threading.Event()

    class Slow:
        def sync_once(self) -> SyncOutcome:
            blocked.set()
            return outcome()

    runner = SyncRunner(Slow(), Term(), clock=FakeClock(T0), interval_s=3600.0)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,))
    thread.start()
    assert blocked.wait(5)
    stop.set()  # it is waiting out a one-hour interval: the wait returns at once
    thread.join(5)
    assert not thread.is_alive()
