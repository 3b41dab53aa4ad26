"""A terminal that syncs, and the cloud it syncs with, as processes (tests, benches).

* ``Cloud``: ``tillflow cloud serve`` on a database, as its own process (start, kill -9,
  restart on the same port), and the ``tillflow cloud`` commands an operator runs
  (enrollment tokens, commands, audit verify). hwsim reaches the cloud only this way:
  through its processes, its HTTP API and its CLI.
* ``SyncTerminal``: the demo rig's daemon (``hwsim.demorig.Terminal``) run as
  ``tillflow-edge run`` (``sync.device.main``), whose config has a ``cloud:`` section, so
  it enrolls with the token given and syncs in the background.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hwsim.demorig import DemoError, Terminal

#: Bounded waits (seconds).
SERVE_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 60.0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}


class Cloud:
    """``tillflow cloud serve --database-url DB`` and the operator's CLI on DB."""

    def __init__(self, database_url: str, work: Path) -> None:
        self.database_url = database_url
        self.work = work
        self.signing_key = work / "control-plane.key"
        self.log = work / "cloud.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start the server (on the port it had, after the first start); its URL."""
        cmd = [sys.executable, "-m", "edge.cli", "cloud", "serve"]
        cmd += ["--database-url", self.database_url, "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--signing-key", str(self.signing_key)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise DemoError(f"cloud serve exited before listening; see {self.log}")
            if line.startswith("listening on "):
                self.port = int(line.strip().rsplit(":", 1)[1])
                return self.url
        raise DemoError(f"cloud serve did not listen within {SERVE_TIMEOUT_S:g}s")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._reap()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def cli(self, *args: str) -> str:
        """One ``tillflow cloud`` command on this cloud's database; its stdout."""
        cmd = [sys.executable, "-m", "edge.cli", "cloud", *args]
        cmd += ["--database-url", self.database_url]
        if args[0] == "command":
            cmd += ["--signing-key", str(self.signing_key)]
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        if out.returncode != 0:
            raise DemoError(f"tillflow cloud {' '.join(args)}: exit {out.returncode}: {out.stderr}")
        return out.stdout

    def enroll_token(self, store: str, group: str | None = None) -> str:
        args = ["enroll-token", "create", "--store", store, "--json"]
        if group:
            args += ["--group", group]
        return str(json.loads(self.cli(*args))["token"])

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            text = self.log.read_text(encoding="utf-8", errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return "(no cloud log)"


class SyncTerminal(Terminal):
    """The daemon with sync: ``tillflow-edge run``, enrolling at ``cloud_url`` with
    ``token`` on its first start, syncing every ``interval_s``."""

    PROGRAM = ("sync.device.main",)

    def __init__(
        self,
        work: Path,
        sock_dir: Path,
        devices: str,
        acquirer: str,
        *,
        cloud_url: str,
        token: str,
        interval_s: float = 1.0,
        batch_max_entries: int = 200,
        risk: dict[str, int] | None = None,
    ) -> None:
        cloud = (
            "cloud:\n"
            f"  url: '{cloud_url}'\n"
            f"  enroll_token: '{token}'\n"
            f"  sync_interval_s: {interval_s}\n"
            f"  batch_max_entries: {batch_max_entries}\n"
            "  timeout_s: 5\n"
        )
        work.mkdir(parents=True, exist_ok=True)
        super().__init__(work, sock_dir, devices, acquirer, extra_config=cloud, risk=risk)

    def health(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/health"))

    def device_id(self) -> str | None:
        """The id the cloud gave this terminal, once enrolled."""
        path = self.data_dir / "sync" / "identity.json"
        with contextlib.suppress(FileNotFoundError):
            return str(json.loads(path.read_text())["device_id"])
        return None
