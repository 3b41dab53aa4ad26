"""Who holds a run: ``host:pid:process-start:nonce``, and whether that holder is gone.

A terminal must not wait out a lease after a crash: a lease whose owner process no
longer exists on this host is treated as expired at once. The process start time
guards against a recycled pid.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from edge.engine.clock import Clock
from edge.engine.ports import Store
from edge.errors import TillflowError

log = logging.getLogger(__name__)


def _stat(pid: int) -> list[str]:
    """Fields 3.. of /proc/PID/stat (after the command name, which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_ticks(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else "?"  # field 22: starttime


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
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return True  # a zombie nobody reaped yet: it will never renew its lease
    current = fields[19] if len(fields) > 19 else "?"
    return ticks != "?" and current not in (ticks, "?")


class Heartbeat:
    """Renews the leases of the runs this worker is advancing, every third of a lease.

    Real time on purpose: leases protect against wall-clock stalls of this process. The
    thread starts with the first run held, ends when it finds none held (an idle daemon
    keeps no thread waking every ten seconds; a process holding thousands of engines --
    the fleet simulator's terminals -- not thousands of them), and is a daemon, so it
    never blocks exit.
    """

    def __init__(self, store: Store, owner: str, clock: Clock, lease_s: float) -> None:
        self.store = store
        self.owner = owner
        self.clock = clock
        self.lease_s = lease_s
        self._held: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def hold(self, run_id: str) -> None:
        with self._lock:
            self._held.add(run_id)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._beat, name="tillflow-heartbeat", daemon=True
                )
                self._thread.start()

    def release(self, run_id: str) -> None:
        with self._lock:
            self._held.discard(run_id)

    def stop(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        """Whether the renewing thread is alive (it is only while runs are held)."""
        with self._lock:
            return self._thread is not None

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._lock:
                if not self._held:  # nothing to renew: end; the next hold starts another
                    self._thread = None
                    return
            for run_id in list(self._held):
                try:
                    self.store.renew_lease(run_id, self.owner, self.clock.now() + self.lease_s)
                except TillflowError as exc:
                    log.warning(
                        "heartbeat failed for %s: %s",
                        run_id,
                        exc,
                        extra={"action": "heartbeat_failed", "run_id": run_id},
                    )
