"""Who holds a run: ``host:pid:process-start:nonce``, and whether that holder is gone.

A terminal must not wait out a lease after a crash: a lease whose owner process no
longer exists on this host is treated as expired at once. The process start time
guards against a recycled pid.
"""

from __future__ import annotations

import os
import socket
import uuid


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            # Field 22 (starttime); the command name in field 2 may hold spaces.
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def make_owner() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True only when we can tell: same host, and that process is gone (or recycled)."""
    try:
        host, pid_s, ticks, _ = owner.rsplit(":", 3)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return ticks != "?" and _start_ticks(pid) not in (ticks, "?")
