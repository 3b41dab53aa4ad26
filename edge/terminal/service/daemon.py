"""``tillflow edge run --config FILE``: the terminal daemon's life.

Start: load config, open (migrate) the store, ``recover()`` runs a crash left in
flight, open the POS socket, then tell systemd READY=1 and keep its watchdog fed while
the main loop turns. SIGTERM: STOPPING=1, stop accepting, close idle POS connections,
give requests in flight a bounded time to be answered, checkpoint the WAL, exit 0.
SIGHUP: reload config and policy; runs go on.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge.engine import Clock, SystemClock
from edge.errors import ConfigError, TillflowError
from edge.terminal.carddata import RedactingFilter
from edge.terminal.config import EdgeConfig, load_config
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.api import LocalApiServer
from edge.terminal.service.scheduler import FileSchedulerState, Scheduler
from edge.terminal.service.sdnotify import Notifier, Watchdog
from edge.terminal.service.terminal import Terminal

log = logging.getLogger(__name__)

#: Seconds the main loop waits between turns when nothing is due: short enough to keep
#: the watchdog fed (it pings every WatchdogSec/2 = 15 s) and to run due retries promptly.
LOOP_S = 1.0
#: How long a stop waits for the background services (from the moment it begins, so it
#: overlaps the POS requests' grace): inside the unit's TimeoutStopSec=30 with the rest.
BACKGROUND_JOIN_S = 10.0

#: A background service: runs until ``stop`` is set (``Daemon(background=...)``).
Background = Callable[[Terminal, threading.Event], None]


class JsonFormatter(logging.Formatter):
    """One JSON object per line (journald keeps them as they are)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("action", "run_id", "step", "device_id", "status"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


def configure_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())  # no PAN reaches a log line, whatever the caller
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per device call


def http_peripherals(cfg: EdgeConfig) -> Peripherals:
    """The drivers a config names: device endpoints over HTTP, and the acquirer host."""
    from edge.terminal.drivers.acquirer_http import HttpAcquirer
    from edge.terminal.drivers.devices_http import HttpCardReader, HttpNetworkLink, HttpPrinter

    p = cfg.peripherals
    link = HttpNetworkLink(p.link.url)
    return Peripherals(
        card_reader=HttpCardReader(p.card_reader.url),
        printer=HttpPrinter(p.printer.url),
        acquirer=HttpAcquirer(p.acquirer.url, link=link, timeout_s=p.acquirer.timeout_s),
        link=link,
    )


class Daemon:
    def __init__(
        self,
        config_path: Path,
        *,
        notifier: Notifier | None = None,
        peripherals: Callable[[EdgeConfig], Peripherals] = http_peripherals,
        clock: Clock | None = None,
        turns: Mapping[str, Callable[[Terminal], object]] | None = None,
        background: Sequence[Background] = (),
    ) -> None:
        """``turns``: more work for each turn of the main loop, by name (a store error in
        one is logged and retried next turn, like the loop's own; ``hwsim.killsync``
        puts the kill torture's there).

        ``background``: services that run beside the main loop, each in its own thread,
        as ``service(terminal, stop)``: started after READY, told to stop by ``stop`` (the
        daemon's own stop event, set by SIGTERM), and joined -- for at most
        ``BACKGROUND_JOIN_S`` -- before the terminal closes. The sync client is one
        (``sync.device``); one that raises is logged and recorded in ``last_error``."""
        self.config_path = config_path
        self.notifier = notifier or Notifier.from_environment()
        self.make_peripherals = peripherals
        self.clock = clock or SystemClock()
        self.turns = dict(turns or {})
        self.background = list(background)
        self.stop = threading.Event()
        self.reload = threading.Event()

    def run(self) -> int:
        cfg = load_config(self.config_path)
        configure_logging(cfg.log_format)
        self.notifier.status("starting: opening the database")
        terminal = Terminal(cfg, self.make_peripherals(cfg), clock=self.clock)
        try:
            scheduler = self._scheduler(cfg, terminal)
            recovered = terminal.start()
            fired = scheduler.on_start()  # a trigger missed while we were down runs once
            server = LocalApiServer(cfg.socket_path, terminal).start()
        except BaseException:
            terminal.close()
            raise
        watchdog = Watchdog(self.notifier)
        self._signals()
        self.notifier.ready(
            status=f"serving on {cfg.socket_path}; recovered {len(recovered)} run(s); "
            f"caught up {len(fired)} schedule(s)"
        )
        log.info(
            "terminal %s ready on %s",
            cfg.device_id,
            cfg.socket_path,
            extra={"action": "ready", "device_id": cfg.device_id},
        )
        watchdog.start()
        threads = [self._start_background(terminal, service) for service in self.background]
        next_maintenance = self.clock.now()  # once at start, then every interval
        try:
            while not self.stop.is_set():
                watchdog.alive()
                if self.reload.is_set():
                    self.reload.clear()
                    self._reload(terminal)
                if self.clock.now() >= next_maintenance:
                    next_maintenance = self.clock.now() + terminal.cfg.maintenance_interval_s
                    self._turn(terminal, "maintenance", terminal.maintain)
                # Retries whose backoff ended, WAIT timeouts, runs a full disk interrupted.
                self._turn(terminal, "recover", terminal.engine.recover)
                self._turn(terminal, "schedule", scheduler.tick)
                for name, turn in self.turns.items():
                    self._turn(terminal, name, functools.partial(turn, terminal))
                due = scheduler.next_due()
                wait = LOOP_S if due is None else min(LOOP_S, max(0.0, due - self.clock.now()))
                self.stop.wait(wait)
        finally:
            self.stop.set()  # the background services stop alongside the server
            joined_by = time.monotonic() + BACKGROUND_JOIN_S
            self.notifier.stopping(status="finishing requests in flight")
            watchdog.stop()
            try:
                # Stops accepting and closes idle POS connections at once; requests in
                # flight get httplimits.STOP_GRACE_S (15 s) to be answered, so the
                # checkpoint below runs well inside the unit's TimeoutStopSec=30.
                server.stop()
            finally:
                self._join_background(threads, joined_by)
                terminal.store.checkpoint()
                terminal.close()
            log.info("terminal %s stopped", cfg.device_id, extra={"action": "stopped"})
        return 0

    def _start_background(self, terminal: Terminal, service: Background) -> threading.Thread:
        name = str(getattr(service, "name", None) or getattr(service, "__name__", "background"))

        def run() -> None:
            try:
                service(terminal, self.stop)
            except Exception as exc:  # a background service never takes the daemon down
                terminal.last_error = f"{name} stopped: {type(exc).__name__}: {exc}"
                log.exception("background service %s stopped", name, extra={"action": name})

        thread = threading.Thread(target=run, name=f"tillflow-{name}", daemon=True)
        thread.start()
        return thread

    @staticmethod
    def _join_background(threads: list[threading.Thread], by: float) -> None:
        """Wait for the background services until ``by`` (monotonic); one still running
        then is left (a daemon thread) and named in the log, the stop goes on."""
        for thread in threads:
            thread.join(max(0.0, by - time.monotonic()))
            if thread.is_alive():
                log.warning(
                    "background service %s did not stop within %.0f s; closing anyway",
                    thread.name,
                    BACKGROUND_JOIN_S,
                    extra={"action": "background_join"},
                )

    @staticmethod
    def _turn(terminal: Terminal, what: str, fn: Callable[[], object]) -> None:
        """One part of a loop turn. A store error (a full disk, a busy database) is the
        terminal's state, not a reason to die: health reports it, the next turn retries."""
        try:
            fn()
        except TillflowError as exc:
            terminal.last_error = f"{exc.code}: {exc.message}"
            log.error("%s failed: %s", what, exc.message, extra={"action": what})

    def _scheduler(self, cfg: EdgeConfig, terminal: Terminal) -> Scheduler:
        known = {wf.workflow_type for wf in terminal.workflows}
        for s in cfg.schedules:
            if s.workflow not in known:
                raise ConfigError(
                    f"{self.config_path}: schedule '{s.name}' starts unknown workflow "
                    f"'{s.workflow}'",
                    hint=f"one of: {', '.join(sorted(known))}",
                )
        engine = terminal.engine
        return Scheduler(
            cfg.schedules,
            lambda workflow, run_input, key: engine.start(workflow, run_input, idempotency_key=key),
            self.clock,
            tz=dt.datetime.now().astimezone().tzinfo or dt.UTC,
            state=FileSchedulerState(cfg.data_dir / "schedules.json"),
        )

    def _signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set())

    def _reload(self, terminal: Terminal) -> None:
        self.notifier.reloading()
        try:
            cfg = load_config(self.config_path)
        except Exception as exc:  # a bad edit must not take the terminal down
            terminal.last_error = f"reload failed: {exc}"
            log.error(
                "reload failed, keeping the running config: %s", exc, extra={"action": "reload"}
            )
            self.notifier.reloaded(status="reload failed; old config kept")
            return
        waiting = terminal.reload(cfg)
        if waiting:
            log.warning(
                "config reloaded; these options take effect at the next start: %s",
                ", ".join(waiting),
                extra={"action": "reload"},
            )
        else:
            log.info("config and policy reloaded", extra={"action": "reload"})
        status = f"config reloaded; restart to apply {', '.join(waiting)}" if waiting else None
        self.notifier.reloaded(status=status or "config reloaded")
