"""``tillflow cloud serve``: the sync service under uvicorn, on PostgreSQL.

The database is migrated once, in this process, before any worker starts; the socket is
bound here too, so ``--port 0`` can print the port the kernel chose
(``listening on http://HOST:PORT`` on stdout) before the first request is served:
connections that arrive meanwhile wait in the listen queue. With ``--workers N`` > 1,
uvicorn's supervisor starts N processes on that one socket; each builds its app from
the environment (``app_from_environment``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import TextIO

import uvicorn
from fastapi import FastAPI
from uvicorn.supervisors import Multiprocess

from cloud.api.app import create_app
from cloud.sync.keys import KEY_FILE_ENV, load_key, load_or_create_key
from cloud.sync.postgres import PostgresSyncBackend
from edge.engine.clock import SystemClock
from edge.errors import ConfigError
from edge.store import DATABASE_URL_ENV
from sync.server import SyncService

#: What each worker process imports to build its app (``--workers`` > 1).
APP_FACTORY = "cloud.api.serve:app_from_environment"
#: Connections per process: the request threads share them (a request holds one for
#: its transaction only).
DEFAULT_POOL_SIZE = 10


def app_from_environment() -> FastAPI:
    """A worker's app: the database from ``TILLFLOW_DATABASE_URL``, the signing key
    from ``TILLFLOW_SIGNING_KEY_FILE`` (set by ``serve``)."""
    url = os.environ.get(DATABASE_URL_ENV)
    key_file = os.environ.get(KEY_FILE_ENV)
    if not url or not key_file:
        raise ConfigError(f"{DATABASE_URL_ENV} and {KEY_FILE_ENV} must be set")
    backend = PostgresSyncBackend(url, migrate=False, pool_size=DEFAULT_POOL_SIZE)
    service = SyncService(backend, SystemClock(), load_key(Path(key_file)))
    return create_app(service, close=backend.close)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host}: {exc}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    database_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    key_file: Path,
    workers: int = 1,
    access_log: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Migrate, bind, announce, serve until SIGINT/SIGTERM; returns the exit status."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    key, made = load_or_create_key(key_file)
    if made:
        print(f"created the control-plane signing key {key_file}", file=sys.stderr, flush=True)
    backend = PostgresSyncBackend(database_url, pool_size=DEFAULT_POOL_SIZE)  # migrates
    try:
        sock = bind(host, port)
    except BaseException:
        backend.close()
        raise
    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again under the
    # handler it found: this one, so the process ends with status 0, not killed by it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on http://{shown}:{sock.getsockname()[1]}", file=out, flush=True)
    options = {"access_log": access_log, "log_level": "info", "timeout_graceful_shutdown": 10}
    try:
        if workers == 1:
            app = create_app(SyncService(backend, SystemClock(), key), close=backend.close)
            uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])  # type: ignore[arg-type]
        else:
            backend.close()
            os.environ[DATABASE_URL_ENV] = database_url
            os.environ[KEY_FILE_ENV] = str(key_file)
            config = uvicorn.Config(APP_FACTORY, factory=True, workers=workers, **options)  # type: ignore[arg-type]
            Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
        backend.close()  # (idempotent: the app's shutdown closes it too)
    return 0
