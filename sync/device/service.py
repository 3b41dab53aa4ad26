"""The sync client as one of the daemon's background services (``Daemon(background=)``).

``SyncService()(terminal, stop)`` does nothing when the config has no ``cloud:``. Else it
enrolls first if the terminal is not enrolled and the config gives ``cloud.enroll_token``
-- in the background, with backoff, so a terminal first started offline serves payments
at once and enrolls when the cloud answers; a token the cloud refuses is reported
(``last_error``) and not tried again -- then runs the ``SyncRunner`` until ``stop``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable

import httpx

from edge.terminal.service.terminal import Terminal
from sync.device import runner as runner_mod
from sync.device.client import SyncClient
from sync.device.errors import EnrollError
from sync.device.identity import DeviceIdentity, enroll, load_identity, load_key
from sync.device.runner import SyncRunner

log = logging.getLogger(__name__)

NOT_ENROLLED = (
    "sync: not enrolled: run `tillflow-edge enroll --config FILE --url URL --token T`, "
    "or set cloud.enroll_token"
)


class SyncService:
    """Enroll (if asked to) and sync, for the daemon's life."""

    #: The daemon names the service's thread and log lines by it.
    name = "sync"

    def __init__(
        self,
        binary_version: str | None = None,
        *,
        http: Callable[[float], httpx.Client] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``http(timeout_s)`` makes the HTTP client (tests: one on a mock transport)."""
        self.binary_version = binary_version
        self.make_http = http or (lambda timeout: httpx.Client(timeout=timeout, trust_env=False))
        self.rng = rng or random.Random()

    def __call__(self, terminal: Terminal, stop: threading.Event) -> None:
        cloud = terminal.cfg.cloud
        if cloud is None:
            return
        version = self.binary_version or _binary_version()
        with self.make_http(cloud.timeout_s) as http:
            identity = load_identity(terminal.cfg.data_dir)
            if identity is None:
                if not cloud.enroll_token:
                    terminal.last_error = NOT_ENROLLED
                    log.warning(NOT_ENROLLED, extra={"action": "sync_not_enrolled"})
                    return
                identity = self._enroll(terminal, http, version, stop)
                if identity is None:
                    return
            if identity.url != cloud.url.rstrip("/"):
                log.warning(
                    "enrolled at %s, the config names %s: syncing with the config's",
                    identity.url,
                    cloud.url,
                    extra={"action": "sync_url_changed"},
                )
                identity = dataclasses.replace(identity, url=cloud.url.rstrip("/"))
            client = SyncClient(
                identity,
                load_key(terminal.cfg.data_dir),
                terminal.store,
                terminal,
                terminal.clock,
                http,
                binary_version=version,
                max_entries=cloud.batch_max_entries,
                max_bytes=cloud.batch_max_bytes,
                key_dir=terminal.cfg.data_dir,
            )
            log.info(
                "syncing as device %s with %s every %g s",
                identity.device_id,
                identity.url,
                cloud.sync_interval_s,
                extra={"action": "sync_start", "device_id": identity.device_id},
            )
            SyncRunner(
                client,
                terminal,
                clock=terminal.clock,
                interval_s=cloud.sync_interval_s,
                newest=lambda: terminal.store.outbox_stats().last_seq,
                rng=self.rng,
            ).run(stop)

    def _enroll(
        self, terminal: Terminal, http: httpx.Client, version: str, stop: threading.Event
    ) -> DeviceIdentity | None:
        cloud = terminal.cfg.cloud
        assert cloud is not None and cloud.enroll_token
        failures = 0
        while not stop.is_set():
            try:
                return enroll(
                    cloud.url,
                    cloud.enroll_token,
                    terminal.cfg.data_dir,
                    version,
                    http,
                    clock=terminal.clock.now,
                )
            except EnrollError as exc:
                terminal.last_error = f"{runner_mod.ERROR_PREFIX}{exc.code}: {exc.message}"
                if not exc.retryable:
                    log.error("enrollment refused, not retried: %s", exc.message)
                    return None
                failures += 1
                top = min(runner_mod.MAX_BACKOFF_S, runner_mod.MIN_BACKOFF_S * 2 ** (failures - 1))
                delay = max(runner_mod.MIN_BACKOFF_S, self.rng.uniform(top / 2, top))
                log.warning("enrollment failed, again in %.0f s: %s", delay, exc.message)
                stop.wait(delay)
        return None


def _binary_version() -> str:
    from edge.terminal.service.main import build_info

    return build_info()["version"] or "unknown"
