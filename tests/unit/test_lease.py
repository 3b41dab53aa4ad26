"""Who holds a run, and when a holder counts as gone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from edge.engine.lease import _start_ticks, make_owner, owner_is_dead


def _owner_of(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}:0000abcd"


def test_owner__of_this_live_process_is_not_dead():
    assert not owner_is_dead(make_owner())


def test_owner__on_another_host_is_never_judged_dead():
    assert not owner_is_dead("some-other-terminal:1:1:0000abcd")


def test_owner__whose_process_exited_is_dead():
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert owner_is_dead(f"{socket.gethostname()}:{int(proc.stdout)}:1:0000abcd")


def test_owner__that_is_an_unreaped_zombie_is_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = _owner_of(child.pid)
    deadline = time.monotonic() + 10
    state = ""
    while time.monotonic() < deadline:  # polls /proc for an external process's exit
        with open(f"/proc/{child.pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.01)
    assert state == "Z"
    assert owner_is_dead(owner)
    child.wait()


def test_owner__with_a_recycled_pid_is_dead():
    """Same pid, different process start time: the holder is gone."""
    me = os.getpid()
    assert owner_is_dead(f"{socket.gethostname()}:{me}:{int(_start_ticks(me)) + 1}:0000abcd")


class _Renewals:
    """The one store call the heartbeat makes, counted."""

    def __init__(self) -> None:
        self.renewed: list[str] = []

    def renew_lease(self, run_id: str, owner: str, until: float) -> None:
        self.renewed.append(run_id)


def _until(cond, timeout_s: float = 5.0) -> bool:
    """Poll a real thread's state (no clock can stand in for a thread's own wait)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_heartbeat__renews_while_a_run_is_held_and_keeps_no_thread_when_none_is():
    from edge.engine.clock import SystemClock
    from edge.engine.lease import Heartbeat

    store = _Renewals()
    beat = Heartbeat(store, make_owner(), SystemClock(), lease_s=0.03)  # type: ignore[arg-type]
    assert not beat.running  # nothing held: no thread
    beat.hold("r1")
    assert beat.running
    assert _until(lambda: store.renewed.count("r1") >= 2)
    beat.release("r1")
    assert _until(lambda: not beat.running)  # it ended by itself
    seen = len(store.renewed)
    beat.hold("r2")  # the next hold starts another
    assert beat.running and _until(lambda: "r2" in store.renewed)
    assert "r1" not in store.renewed[seen:]
    thread = beat._thread
    beat.stop()
    assert thread is not None and _until(lambda: not thread.is_alive())
