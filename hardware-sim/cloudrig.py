"""The real cloud as processes, for tests, benches and the fleet simulator.

``CloudRig(database_url, broker_url, work)``: ``tillflow cloud serve --port 0`` (one or
more) and ``tillflow cloud worker`` (one or more) on one PostgreSQL database and one
Redis broker, all reading one settings file (``work/cloud.yaml``: database, broker,
signing key, data dir, sweep interval), each logging to its own file in ``work``.
``start(serves=, workers=)``, ``kill9(which)`` (``"serve:0"``, ``"worker:1"``: the
process and, for a worker, its pool), ``restart(which)`` (a serve on the port it had),
``stop()``. ``admin_token()`` makes an admin Fleet API token with
``tillflow cloud api-token create``; ``fleet()`` is an httpx client for the Fleet API
carrying it (``FleetApi``: ``ok``/``get``/``post``, errors naming the answer).

Every wait is bounded and its error names the process and its log tail (``RigError``).
hwsim reaches the cloud only through its processes, its CLI and its HTTP API, as
``hwsim.syncrig.Cloud`` does (a test reads what no API shows with SQL on
``database_url`` itself: hwsim does not import a database driver).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

#: Bounded waits (seconds).
SERVE_TIMEOUT_S = 60.0
WORKER_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 60.0
POLL_S = 0.05
#: Lines of a log quoted in an error.
TAIL_LINES = 30


class RigError(RuntimeError):
    """A cloud process did not do what it was started for; the message names its log."""


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without ambient ``TILLFLOW_*`` (the settings file says it all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILLFLOW_", "CLOUD_"))}
    env.update(extra or {})
    return env


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` (or a note that there is none)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Proc:
    """One cloud process: its kind (serve/worker), index, log, and (serve) port."""

    kind: str
    index: int
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.index}"

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        return tail(self.log, lines)

    def fail(self, what: str) -> RigError:
        return RigError(f"{self.name} (pid {self.pid}) {what}; log {self.log}:\n{self.log_tail()}")


@dataclass
class CloudRig:
    """serve(s) + worker(s) on ``database_url`` and ``broker_url``, files in ``work``."""

    database_url: str
    broker_url: str
    work: Path
    #: More settings for cloud.yaml (``sweep_interval_s``, ``control_schedules``, ...).
    settings: dict[str, Any] = field(default_factory=dict)
    #: More environment for every process (PYTHONPATH of test step modules, ...).
    env: dict[str, str] = field(default_factory=dict)
    serves: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    _token: str | None = None

    def __post_init__(self) -> None:
        self.work = Path(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.signing_key = self.work / "control-plane.key"
        self.config = self.work / "cloud.yaml"
        data = {
            "database_url": self.database_url,
            "broker_url": self.broker_url,
            "signing_key_file": str(self.signing_key),
            "data_dir": str(self.work / "data"),
            "sweep_interval_s": 1.0,
            "host": "127.0.0.1",
            **self.settings,
        }
        self.config.write_text(yaml.safe_dump(data), encoding="utf-8")

    # --- processes ------------------------------------------------------------------

    def start(self, serves: int = 1, workers: int = 1) -> CloudRig:
        """Start ``serves`` API processes (the first migrates the database before any
        other starts) and ``workers`` Celery workers; return once all answer."""
        for _ in range(serves):
            proc = Proc("serve", len(self.serves), self.work / f"serve{len(self.serves)}.log")
            self.serves.append(proc)
            self._start_serve(proc)
        started = []
        for _ in range(workers):
            proc = Proc("worker", len(self.workers), self.work / f"worker{len(self.workers)}.log")
            self.workers.append(proc)
            self._spawn_worker(proc)
            started.append(proc)
        self._wait_workers(started)
        return self

    @property
    def url(self) -> str:
        """The first serve's URL."""
        if not self.serves:
            raise RigError("no serve started")
        return self.serves[0].url

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.serves]

    def proc(self, which: str) -> Proc:
        kind, _, index = which.partition(":")
        procs = {"serve": self.serves, "worker": self.workers}.get(kind)
        if procs is None or not index.isdigit() or int(index) >= len(procs):
            raise ValueError(f"no cloud process {which!r} (serve:N or worker:N)")
        return procs[int(index)]

    def _start_serve(self, proc: Proc) -> None:
        cmd = [sys.executable, "-m", "edge.cli", "cloud", "serve", "--config", str(self.config)]
        cmd += ["--port", str(proc.port)]
        with open(proc.log, "ab") as log:
            proc.popen = subprocess.Popen(
                cmd,
                env=_env(self.env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.work,
                start_new_session=True,
            )
        proc.starts += 1
        assert proc.popen.stdout is not None
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        # ``readline`` blocks: a serve that hangs before printing is caught by the
        # deadline only at its next line; serve prints or exits within seconds.
        while time.monotonic() < deadline:
            line = proc.popen.stdout.readline().decode()
            if not line:
                proc.popen.wait(STOP_TIMEOUT_S)
                raise proc.fail(f"exited {proc.popen.returncode} before listening")
            if line.startswith("listening on "):
                proc.port = int(line.strip().rsplit(":", 1)[1])
                proc.popen.stdout.close()  # nothing more is printed there
                self._wait_health(proc, deadline)
                return
        raise proc.fail(f"did not listen within {SERVE_TIMEOUT_S:g}s")

    def _wait_health(self, proc: Proc, deadline: float) -> None:
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(proc.url + "/v1/health").status_code == 200:
                        return
                if not proc.alive() or time.monotonic() > deadline:
                    raise proc.fail("did not answer GET /v1/health")
                time.sleep(POLL_S)

    def _spawn_worker(self, proc: Proc) -> None:
        cmd = [sys.executable, "-m", "edge.cli", "cloud", "worker", "--config", str(self.config)]
        with open(proc.log, "ab") as log:
            proc.popen = subprocess.Popen(
                cmd,
                env=_env(self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work,
                start_new_session=True,  # its own group: a kill9 takes its pool too
            )
        proc.starts += 1

    def _wait_workers(self, procs: list[Proc]) -> None:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        waiting = list(procs)
        while waiting:
            for proc in list(waiting):
                if f"worker {proc.pid} ready" in tail(proc.log, 400):
                    waiting.remove(proc)
                elif not proc.alive():
                    raise proc.fail(f"exited {proc.popen.returncode if proc.popen else '?'}")
            if waiting and time.monotonic() > deadline:
                raise waiting[0].fail(f"not ready within {WORKER_TIMEOUT_S:g}s")
            time.sleep(POLL_S)

    def kill9(self, which: str) -> int:
        """SIGKILL one process (``serve:N`` / ``worker:N``) and its process group; its pid."""
        proc = self.proc(which)
        if not proc.alive():
            raise proc.fail("is not running")
        assert proc.popen is not None
        pid = proc.popen.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        proc.popen.wait(STOP_TIMEOUT_S)
        return pid

    def restart(self, which: str) -> Proc:
        """Start ``which`` again (stopping it first if it runs); a serve keeps its port."""
        proc = self.proc(which)
        if proc.alive():
            self._stop(proc)
        if proc.kind == "serve":
            self._start_serve(proc)
        else:
            self._spawn_worker(proc)
            self._wait_workers([proc])
        return proc

    def _stop(self, proc: Proc) -> None:
        if proc.popen is None or proc.popen.poll() is not None:
            return
        proc.popen.terminate()
        try:
            proc.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(STOP_TIMEOUT_S)
        # a worker's pool processes leave with it; anything left of its group goes now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM every process (workers first), SIGKILL what outlives the wait."""
        for proc in [*self.workers, *self.serves]:
            with contextlib.suppress(Exception):
                self._stop(proc)

    def __enter__(self) -> CloudRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cpu_s(self, which: str) -> float:
        """CPU seconds (user + system) used so far by ``which`` and every process of its
        session (a worker's pool, a serve's uvicorn workers), from /proc."""
        proc = self.proc(which)
        return 0.0 if proc.pid is None else session_cpu_s(proc.pid)

    def rss_mib(self, which: str) -> float:
        """Resident memory now (MiB) of ``which`` and every process of its session."""
        proc = self.proc(which)
        return 0.0 if proc.pid is None else session_rss_mib(proc.pid)

    def logs(self, lines: int = TAIL_LINES) -> str:
        """Every process's log tail (for a failing test's message)."""
        return "\n".join(f"--- {p.name} ({p.log})\n{p.log_tail(lines)}"
                         for p in [*self.serves, *self.workers])  # fmt: skip

    # --- the operator's CLI and the Fleet API ------------------------------------------

    def cli(self, *args: str) -> str:
        """One ``tillflow cloud`` command on this cloud's database; its stdout."""
        cmd = [sys.executable, "-m", "edge.cli", "cloud", *args]
        cmd += ["--database-url", self.database_url]
        out = subprocess.run(
            cmd,
            env=_env(self.env),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            cwd=self.work,
        )
        if out.returncode != 0:
            raise RigError(f"tillflow cloud {' '.join(args)}: exit {out.returncode}: {out.stderr}")
        return out.stdout

    def admin_token(self) -> str:
        """An admin Fleet API token (made once with ``tillflow cloud api-token create``)."""
        if self._token is None:
            made = json.loads(self.cli("api-token", "create", "--name", "cloudrig",
                                       "--role", "admin", "--json"))  # fmt: skip
            self._token = str(made["token"])
        return self._token

    def fleet(self, url: str | None = None, token: str | None = None) -> FleetApi:
        """A Fleet API client on ``url`` (the first serve) with ``token`` (admin)."""
        return FleetApi(url or self.url, token or self.admin_token())

    def enroll_token(self, store: str, group: str | None = None, ttl_minutes: float = 60) -> str:
        """A one-time enrollment token, through the Fleet API."""
        body: dict[str, Any] = {"store": store, "ttl_minutes": ttl_minutes}
        if group is not None:
            body["group"] = group
        with self.fleet() as api:
            return str(api.ok("POST", "/api/v1/enroll-tokens", json=body, status=201)["token"])


class FleetApi:
    """An httpx client for the Fleet API with a bearer token; ``ok`` checks the status.
    One per thread: one shared by 32 threads once failed a read with EBADF (5,000
    terminals' tokens, ``simfleet.bench``)."""

    def __init__(self, url: str, token: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            trust_env=False,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FleetApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(method, path, **kw)

    def ok(self, method: str, path: str, *, status: int = 200, **kw: Any) -> Any:
        """The JSON of an answer with ``status``; else ``RigError`` quoting the answer."""
        answer = self.call(method, path, **kw)
        if answer.status_code != status:
            raise RigError(
                f"{method} {path}: {answer.status_code} (wanted {status}): {answer.text[:2000]}"
            )
        return answer.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.ok("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any, status: int = 201) -> Any:
        return self.ok("POST", path, json=body, status=status)

    def pages(self, path: str, **params: Any) -> Iterator[Any]:
        """Every item of a paged list (``{"items", "next"}``), following ``next``."""
        after = None
        while True:
            page = self.get(path, **params, after=after, limit=500)
            yield from page["items"]
            after = page.get("next")
            if not after:
                return


def _session(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
    return pids


def session_cpu_s(sid: int) -> float:
    """CPU seconds of the live processes of session ``sid`` (what exited is not counted)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _session(sid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def session_rss_mib(sid: int) -> float:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in _session(sid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return total * page / 2**20
