"""The demo's rig: the terminal daemon as its own process (``Terminal``: config, start,
POS requests over its socket, kill -9, SIGTERM) and the simulated hardware's control
endpoints (``Hardware``). ``hwsim.demo`` tells the story with them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from hwsim.devices import SimDeviceServer

#: Risk limits small enough to reach a cap in a few payments (minor units: cents).
FLOOR_LIMIT = 2_500
OFFLINE_CAP = 4_000
#: Bounded waits (seconds): nothing in the demo waits for ever.
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
RUN_TIMEOUT_S = 20.0
#: The daemon trusts one link check for 1 s (``DEFAULT_LINK_CACHE_S``): wait a bit longer
#: after switching the link, so the next payment sees the change.
LINK_SETTLE_S = 1.2
#: AF_UNIX paths must stay under ~108 bytes.
MAX_SOCKET_PATH = 100

CURRENCY = "EUR"


class DemoError(Exception):
    """Something the demo needed did not happen (in time)."""


class Terminal:
    """The daemon process, its notify socket, and the POS side of its local API."""

    #: The program that runs the daemon (``hwsim.syncrig`` runs ``tillflow-edge``'s, with sync).
    PROGRAM = ("edge.cli", "edge")

    def __init__(
        self,
        work: Path,
        sock_dir: Path,
        devices: str,
        acquirer: str,
        extra_config: str = "",
        risk: dict[str, int] | None = None,
    ) -> None:
        """``risk``: more ``risk:`` options (or other values), ``extra_config``: more
        top-level config text."""
        limits = {
            "floor_limit_minor": FLOOR_LIMIT,
            "offline_amount_cap_minor": OFFLINE_CAP,
            "online_random_percent": 0,
            **(risk or {}),
        }
        self.work = work
        self.data_dir = work / "data"
        self.socket_path = sock_dir / "edge.sock"
        self.notify_path = sock_dir / "notify"
        self.config = work / "edge.yaml"
        self.log = work / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config.write_text(
            "# Written by the demo (hwsim.demo): a terminal beside simulated hardware.\n"
            "device_id: T-DEMO\n"
            f"data_dir: {self.data_dir}\n"
            f"socket_path: {self.socket_path}\n"
            "log_format: text\n"
            "risk:\n"
            + "".join(f"  {name}: {value}\n" for name, value in limits.items())
            + "peripherals:\n"
            f"  card_reader: {{url: '{devices}', timeout_s: 5}}\n"
            f"  printer: {{url: '{devices}'}}\n"
            f"  link: {{url: '{devices}/link'}}\n"
            f"  acquirer: {{url: '{acquirer}', timeout_s: 5}}\n" + extra_config,
            encoding="utf-8",
        )
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)

    # --- the process ----------------------------------------------------------------------

    def start(self) -> str:
        """Start the daemon; return the STATUS it sent with READY=1."""
        self._drain()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        module, *prefix = self.PROGRAM
        cmd = [sys.executable, "-m", module, *prefix, "run", "--config", str(self.config)]
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        message = self.wait_notify("READY=1", READY_TIMEOUT_S)
        return _field(message, "STATUS") or ""

    def wait_notify(self, wanted: str, timeout_s: float) -> str:
        """The first sd_notify message holding ``wanted`` (e.g. ``READY=1``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise DemoError(
                        f"the daemon exited with code {self.proc.returncode} before "
                        f"{wanted}; see {self.log}"
                    ) from None
                continue
            if wanted in message.splitlines():
                return message
        raise DemoError(f"no {wanted} from the daemon within {timeout_s:g}s; see {self.log}")

    def _drain(self) -> None:
        while True:
            try:
                self.notify.recv(4096)
            except TimeoutError:
                return

    def kill9(self) -> int | None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no goodbye, no checkpoint
        return self.proc.wait(10)

    def terminate(self) -> int | None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.wait_notify("STOPPING=1", STOP_TIMEOUT_S)
        return self.proc.wait(STOP_TIMEOUT_S)

    def close(self) -> None:
        """Whatever happened: no daemon left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.notify.close()

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no daemon log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- the POS app's requests -----------------------------------------------------------

    def client(self, timeout_s: float = 20.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(transport=transport, timeout=timeout_s, base_url="http://pos")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self.client() as c:
            r = c.request(method, path, json=body)
        if r.status_code != 200:
            raise DemoError(f"{method} {path} answered {r.status_code}: {r.text}")
        return r.json()

    def pay(self, amount: int, key: str) -> dict[str, Any]:
        body = {"amount_minor": amount, "currency": CURRENCY, "idempotency_key": key}
        return dict(self.request("POST", "/v1/payments", body))

    def run(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/runs/{run_id}"))

    def settle(self, run_id: str) -> dict[str, Any]:
        """Poll the run until it ends (its retries are picked up by the daemon's loop)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            view = self.run(run_id)
            if view["status"] in ("COMPLETED", "FAILED", "ROLLED_BACK", "CANCELLED"):
                return view
            time.sleep(0.2)
        raise DemoError(f"run {run_id} did not end within {RUN_TIMEOUT_S:g}s")


def _field(message: str, name: str) -> str | None:
    for line in message.splitlines():
        if line.startswith(f"{name}="):
            return line[len(name) + 1 :]
    return None


class Hardware:
    """The simulators' control endpoints, as an operator (or a test rig) uses them."""

    def __init__(self, devices: SimDeviceServer) -> None:
        self.devices = devices

    def control(self, path: str, body: dict[str, Any]) -> None:
        r = httpx.post(f"{self.devices.url}/control/{path}", json=body, timeout=5)
        if r.status_code != 200:
            raise DemoError(f"control/{path} answered {r.status_code}: {r.text}")

    def insert(self, card: str) -> None:
        self.control("insert", {"card": card})

    def link(self, up: bool) -> None:
        self.control("link", {"up": up})
        time.sleep(LINK_SETTLE_S)

    def printer(self, state: str) -> None:
        self.control("printer", {"state": state})
