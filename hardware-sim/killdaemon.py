"""The kill -9 torture's daemon: the ``edge run`` process, its notify socket, its gate.

``_Daemon`` spawns the terminal daemon as systemd would (``NOTIFY_SOCKET``), waits for
its notify lines (``STATUS=starting...``, ``READY=1``), SIGKILLs it from any thread and
reaps it, or stops it with SIGTERM. ``_Gate`` is open while a daemon is serving: the
POS waits there to retry after a kill.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

# Bounded waits, in seconds. Reached only when something is broken.
READY_TIMEOUT_S = 30.0
#: How often the POS polls a run that is not final, and the settling phase the database.
POLL_S = 0.05


class DaemonDied(Exception):
    """The daemon exited by itself."""


class _Daemon:
    """The daemon process and its notify socket."""

    def __init__(
        self, config: Path, sock_dir: Path, log_path: Path, command: list[str] | None = None
    ) -> None:
        self.config = config
        #: What is started: ``edge run`` (the default), or a wrapper of the same daemon.
        self.command = command or [
            sys.executable, "-m", "edge.cli", "edge", "run", "--config", str(config)
        ]  # fmt: skip
        self.log_path = log_path
        self.notify_path = sock_dir / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(POLL_S)
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def spawn(self) -> None:
        self._drain()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        cmd = self.command
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        with self._lock:
            self.proc = proc

    def wait_for(self, wanted: Callable[[str], bool], timeout_s: float) -> bool:
        """True once a notify line satisfies ``wanted``; False after ``timeout_s``.
        DaemonDied if the process ends first."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.notify.settimeout(min(POLL_S, remaining))
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                proc = self.proc
                if proc is not None and proc.poll() is not None:
                    raise DaemonDied(f"exit code {proc.returncode}") from None
                continue
            if any(wanted(line) for line in message.splitlines()):
                return True

    def _drain(self) -> None:
        self.notify.settimeout(0)
        with contextlib.suppress(BlockingIOError, TimeoutError):
            while True:
                self.notify.recv(4096)

    def kill(self) -> None:
        """SIGKILL (from any thread): no goodbye, no checkpoint. Reaped by ``reap``."""
        with self._lock:
            if self.proc is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)  # unreaped: the pid is still ours

    def reap(self) -> int:
        assert self.proc is not None
        return self.proc.wait(READY_TIMEOUT_S)

    def alive_for(self, seconds: float) -> bool:
        """Wait ``seconds`` of the daemon's life; False if it ended meanwhile."""
        assert self.proc is not None
        try:
            self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(READY_TIMEOUT_S)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(READY_TIMEOUT_S)
        self.notify.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no daemon log)"
        return "\n".join(text.splitlines()[-lines:])


class _Gate:
    """Open while a daemon is serving: the POS waits here to retry after a kill."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = False

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False

    def wait(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._open, timeout_s)
