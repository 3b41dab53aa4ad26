"""The sd_notify protocol, spoken directly: readiness, status, watchdog, stopping.

systemd passes a datagram socket in ``NOTIFY_SOCKET`` (a filesystem path, or ``@name``
for the abstract namespace) and, when ``WatchdogSec=`` is set, the watchdog period in
``WATCHDOG_USEC`` for the process named by ``WATCHDOG_PID``. A message is one datagram
of newline-separated ``KEY=value`` assignments. See sd_notify(3) and systemd.service(5).

This is stdlib only on purpose (no libsystemd binding): the frozen terminal binary
stays small, and a terminal that is not under systemd (a developer's laptop, the
hardware simulator) gets a disabled :class:`Notifier` whose methods cost nothing.

:class:`Watchdog` pings only while the main loop keeps proving it is alive, so a hung
loop stops the pings and systemd restarts the service (``Restart=on-failure``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "Watchdog"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# Repeated send failures (socket gone, systemd restarting) are logged at most this
# often, so a dead socket does not flood the journal from the watchdog thread.
SEND_FAILURE_LOG_INTERVAL_S = 60.0

# Assignment names are upper-case identifiers (READY, STATUS, WATCHDOG_USEC, ...).
_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")
# A newline would start a new assignment (status text could forge READY=1) and systemd
# drops a whole message that contains a NUL byte: both become spaces in values.
_UNSAFE_IN_VALUE = str.maketrans({"\n": " ", "\0": " "})


def _parse_address(value: str) -> bytes | None:
    """The sendto() address for a NOTIFY_SOCKET value, or None when unsupported."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])  # abstract namespace: leading NUL, no padding
    return None


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify messages to systemd; a cheap no-op when not under systemd.

    Every send is best effort: a failure returns ``False`` and is logged (rate-limited),
    never raised, because losing a status line must not take a payment down. Safe to
    call from several threads (the main loop and the :class:`Watchdog` thread).
    """

    def __init__(
        self,
        notify_socket: str | None = None,
        *,
        watchdog_usec: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        """``notify_socket`` is a ``NOTIFY_SOCKET`` value (``/path`` or ``@abstract``);
        ``None`` or ``""`` gives a disabled notifier. ``watchdog_usec`` is the watchdog
        period systemd enforces for this process, ``None`` when there is no watchdog."""
        self._address = _parse_address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            log.warning(
                "NOTIFY_SOCKET=%r is neither an absolute path nor '@abstract'; "
                "systemd notifications are disabled",
                notify_socket,
                extra={"action": "sd_notify_unsupported_socket"},
            )
        self.enabled: bool = self._address is not None
        # systemd advises pinging at half the period, so one late ping is not fatal.
        self.watchdog_interval_s: float | None = (
            watchdog_usec / 2 / 1_000_000
            if self.enabled and watchdog_usec is not None and watchdog_usec > 0
            else None
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failures_unlogged = 0
        self._last_failure_log: float | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd set up for this process (disabled when there is none).

        ``environ=None`` reads ``os.environ``: call this once, at the entry point.
        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is absent or names this
        process; it may have been inherited from a parent that systemd watches.
        """
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=_watchdog_usec(env))

    def notify(self, **fields: str) -> bool:
        """Send one message of ``KEY=value`` lines; return whether it was sent."""
        if self._address is None:
            return False
        if not fields:
            raise ValueError("notify() needs at least one KEY=value field")
        for key in fields:
            if not _KEY.match(key):
                raise ValueError(f"sd_notify field {key!r} is not an upper-case name")
        message = "".join(
            f"{key}={value.translate(_UNSAFE_IN_VALUE)}\n" for key, value in fields.items()
        ).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(message, self._address)
            except OSError as exc:
                self._log_send_failure(exc)
                return False
            if self._failures_unlogged or self._last_failure_log is not None:
                log.info(
                    "sd_notify sends work again",
                    extra={"action": "sd_notify_recovered"},
                )
                self._failures_unlogged = 0
                self._last_failure_log = None
            return True

    def ready(self, status: str | None = None) -> bool:
        """Startup is complete: ``READY=1`` (systemd then starts dependent units)."""
        return self._with_status({"READY": "1"}, status)

    def status(self, text: str) -> bool:
        """A one-line status, shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """Graceful shutdown has begun: ``STOPPING=1``."""
        return self._with_status({"STOPPING": "1"}, status)

    def reloading(self) -> bool:
        """A reload has begun: ``RELOADING=1`` with the ``MONOTONIC_USEC`` systemd
        uses to match it to the ``SIGHUP`` it sent. Follow with :meth:`reloaded`."""
        return self.notify(RELOADING="1", MONOTONIC_USEC=str(_monotonic_usec()))

    def reloaded(self, status: str | None = None) -> bool:
        """The reload finished: ``READY=1`` again."""
        return self._with_status({"READY": "1"}, status)

    def watchdog_ping(self) -> bool:
        """``WATCHDOG=1``. Prefer :class:`Watchdog`, which pings only while alive."""
        return self.notify(WATCHDOG="1")

    def close(self) -> None:
        """Close the socket (reopened by the next send). For tests and clean exits."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _with_status(self, fields: dict[str, str], status: str | None) -> bool:
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def _log_send_failure(self, exc: OSError) -> None:
        """Log the first failure, then at most one line per interval with a count."""
        now = self._clock()
        last = self._last_failure_log
        if last is not None and now - last < SEND_FAILURE_LOG_INTERVAL_S:
            self._failures_unlogged += 1
            return
        log.warning(
            "sd_notify send failed: %s (%d more failure(s) since the last report)",
            exc,
            self._failures_unlogged,
            extra={"action": "sd_notify_send_failed"},
        )
        self._failures_unlogged = 0
        self._last_failure_log = now


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """The watchdog period meant for this process, as sd_watchdog_enabled(3) decides."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    try:
        period = int(usec)
        watched = int(pid) if pid else os.getpid()
    except ValueError:
        log.warning(
            "ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r",
            usec,
            pid,
            extra={"action": "sd_watchdog_malformed"},
        )
        return None
    if watched != os.getpid() or period <= 0:
        return None
    return period


class Watchdog:
    """Pings systemd's watchdog only while the main loop proves it is alive.

    The main loop calls :meth:`alive` on every turn. A daemon thread wakes every
    ``interval_s`` and sends ``WATCHDOG=1`` if :meth:`alive` was called within the last
    ``stale_after_s`` (default: ``interval_s``). When the loop hangs, the pings stop
    and systemd kills the process ``WatchdogSec`` after the last one.

    The main loop must therefore call :meth:`alive` at least every ``stale_after_s``:
    a turn that can legitimately block longer (a slow step) needs a larger
    ``stale_after_s`` *and* ``WatchdogSec >= stale_after_s + interval_s`` plus a margin,
    or systemd may kill a healthy process.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float | None = None,
        *,
        stale_after_s: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        """``interval_s=None`` takes the notifier's (half of ``WATCHDOG_USEC``); when
        that is None too, there is no watchdog and :meth:`start` does nothing."""
        self._notifier = notifier
        self.interval_s = notifier.watchdog_interval_s if interval_s is None else interval_s
        if self.interval_s is not None and self.interval_s <= 0:
            raise ValueError(f"watchdog interval must be positive, got {self.interval_s}")
        self.stale_after_s = self.interval_s if stale_after_s is None else stale_after_s
        if self.stale_after_s is not None and self.stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, got {self.stale_after_s}")
        self._clock = clock
        self._last_alive: float | None = None
        self._started_at = 0.0
        self._starved = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self._notifier.enabled and self.interval_s is not None

    def alive(self) -> None:
        """The main loop is turning. One attribute store: cheap enough for every turn."""
        self._last_alive = self._clock()

    def start(self) -> None:
        """Start pinging in a daemon thread; a no-op without a watchdog or if running."""
        if not self.enabled or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop = threading.Event()
        self._started_at = self._clock()
        self._starved = False
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="sd-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging and wait for the thread (at most one send) to finish."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, stop: threading.Event) -> None:
        assert self.interval_s is not None
        while True:
            self._tick()
            if stop.wait(self.interval_s):
                return

    def _tick(self) -> None:
        assert self.stale_after_s is not None
        now = self._clock()
        last = self._last_alive
        silent_for = now - (self._started_at if last is None else last)
        if last is not None and silent_for <= self.stale_after_s:
            if self._starved:
                log.info(
                    "main loop is alive again; watchdog pings resume",
                    extra={"action": "watchdog_resumed"},
                )
                self._starved = False
            self._notifier.watchdog_ping()
        elif silent_for > self.stale_after_s and not self._starved:
            log.error(
                "main loop silent for %.1f s (limit %.1f s): withholding watchdog pings "
                "so systemd restarts the service",
                silent_for,
                self.stale_after_s,
                extra={"action": "watchdog_starved"},
            )
            self._starved = True
