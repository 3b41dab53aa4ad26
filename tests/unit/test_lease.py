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
