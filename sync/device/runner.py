"""The sync client in the background: when to sync, and what to do when it fails.

``SyncRunner.run(stop)`` is a loop for one thread of the daemon (``Daemon(background=)``):

- it syncs at once, then every ``interval_s`` while all is well;
- **sooner** -- ``soon_s`` (2 s) after it sees new outbox messages (a new offline sale
  wants to reach the cloud, and release its exposure, without waiting out the interval);
  it looks every ``poll_s`` with one cheap read (``newest``, the outbox's last seq);
- **at once again** while a batch came back full (a bound cut it: more is waiting);
- while the cloud is unreachable or refuses, it **backs off**: 1 s, 2 s, 4 s ... up to
  60 s, each drawn in its upper half ([d/2, d], never below 1 s) from a seeded ``rng``
  so a fleet that lost its cloud together does not come back in step. New sales do not
  cut a backoff short (that would hammer a cloud that is down).

It never raises out of the thread: every failure is logged and put in the terminal's
``last_error`` (``sync: CODE: message``), which the next good sync clears (only an error
of its own). It stops promptly: every wait is ``stop.wait`` (or the injected ``wait``),
which returns as soon as ``stop`` is set. Time comes from the injected clock, so tests
drive it with a ``FakeClock`` and a ``wait`` that moves it.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Protocol

from edge.engine.clock import Clock
from edge.errors import TillflowError
from sync.device.client import SyncOutcome
from sync.device.errors import SYNC_ERROR_PREFIX

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
#: How soon after new outbox messages a sync is brought forward to (s).
SOON_S = 2.0
#: How often the outbox is looked at between syncs (s).
POLL_S = 1.0
#: What the runner's errors in ``last_error`` start with (so it clears only its own).
ERROR_PREFIX = SYNC_ERROR_PREFIX


class Syncs(Protocol):
    def sync_once(self) -> SyncOutcome: ...


class HasLastError(Protocol):
    last_error: str | None


class SyncRunner:
    def __init__(
        self,
        client: Syncs,
        terminal: HasLastError,
        *,
        clock: Clock,
        interval_s: float = DEFAULT_INTERVAL_S,
        newest: Callable[[], int] | None = None,
        rng: random.Random | None = None,
        min_backoff_s: float = MIN_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        soon_s: float = SOON_S,
        poll_s: float = POLL_S,
    ) -> None:
        """``newest``: the outbox's last seq (``store.outbox_stats().last_seq``), looked
        at between syncs; None: syncs only on the interval."""
        self.client = client
        self.terminal = terminal
        self.clock = clock
        self.interval_s = interval_s
        self.newest = newest
        self.rng = rng or random.Random()
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.soon_s = soon_s
        self.poll_s = poll_s
        #: Failed syncs in a row (0: the last one succeeded).
        self.failures = 0
        self.last_outcome: SyncOutcome | None = None

    def backoff(self) -> float:
        """The wait after the ``failures``-th failure in a row: doubling from the minimum
        to the maximum, drawn in its upper half, never below the minimum."""
        top = min(self.max_backoff_s, self.min_backoff_s * 2 ** max(0, self.failures - 1))
        return max(self.min_backoff_s, self.rng.uniform(top / 2, top))

    def turn(self) -> float:
        """One sync; the seconds until the next one. Never raises."""
        try:
            outcome = self.client.sync_once()
        except TillflowError as exc:
            self.failures += 1
            self._report(f"{exc.code}: {exc.message}")
            log.log(
                logging.WARNING if exc.retryable else logging.ERROR,
                "sync failed (%d in a row): %s: %s",
                self.failures,
                exc.code,
                exc.message,
                extra={"action": "sync_failed"},
            )
            return self.backoff()
        except Exception as exc:  # a bug must not end the thread: log it, back off
            self.failures += 1
            self._report(f"{type(exc).__name__}: {exc}")
            log.exception("sync failed unexpectedly", extra={"action": "sync_failed"})
            return self.backoff()
        if self.failures:
            log.info("sync works again after %d failure(s)", self.failures)
        self.failures = 0
        self.last_outcome = outcome
        last = self.terminal.last_error
        if last is not None and last.startswith(ERROR_PREFIX):
            self.terminal.last_error = None
        return 0.0 if outcome.more else self.interval_s

    def run(self, stop: threading.Event, wait: Callable[[float], bool] | None = None) -> None:
        """Sync until ``stop`` is set. ``wait(seconds)`` sleeps, returning True once
        stopped (default ``stop.wait``)."""
        sleep = wait or stop.wait
        seen = self._newest()
        next_at = self.clock.now()
        while not stop.is_set():
            now = self.clock.now()
            if now >= next_at:
                next_at = self.clock.now() + self.turn()
                seen = self._newest()
            else:
                latest = self._newest()
                if latest > seen and self.failures == 0:
                    next_at = min(next_at, now + self.soon_s)  # a new sale: sync soon
                seen = max(seen, latest)
            if sleep(max(0.0, min(self.poll_s, next_at - self.clock.now()))):
                break

    def _newest(self) -> int:
        if self.newest is None:
            return 0
        try:
            return int(self.newest())
        except Exception as exc:  # a busy or closing store: look again next time
            log.debug("sync: cannot read the outbox: %s", exc)
            return 0

    def _report(self, what: str) -> None:
        self.terminal.last_error = ERROR_PREFIX + what
