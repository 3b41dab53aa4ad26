"""``tillflow cloud serve``: the sync service and the Fleet API under uvicorn, on
PostgreSQL, with the options of ``cloud.settings`` (``--config FILE``, ``TILLFLOW_*``,
then the command's flags).

The database is migrated once (the sync service's tables, then the Fleet API's and the
other control-plane sets, then the engine's), in this process, before any worker
starts; the socket is bound here too, so ``--port 0`` can print the port the kernel
chose (``listening on http://HOST:PORT`` on stdout) before the first request is served:
connections that arrive meanwhile wait in the listen queue. With ``--workers N`` > 1,
uvicorn's supervisor starts N processes on that one socket; each builds its app from
the environment (``app_from_environment``: the settings as this process read them, the
database URL and key file set in its environment by ``serve``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import TextIO

import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from uvicorn.supervisors import Multiprocess

from cloud import embedded
from cloud.api.app import create_app
from cloud.api.fleet.context import FleetContext
from cloud.control import SCHEMA as CONTROL_SCHEMA
from cloud.fleet import SCHEMA as FLEET_SCHEMA
from cloud.outcomes import SCHEMA as OUTCOMES_SCHEMA
from cloud.releases import SCHEMA as RELEASES_SCHEMA
from cloud.rollouts import SCHEMA as ROLLOUTS_SCHEMA
from cloud.settings import CONFIG_ENV, CloudSettings, load_settings
from cloud.store.postgres import PostgresStore
from cloud.sync.keys import KEY_FILE_ENV, load_key, load_or_create_key
from cloud.sync.postgres import UNAVAILABLE, PostgresSyncBackend
from edge.engine.clock import SystemClock
from edge.errors import ConfigError
from edge.store import DATABASE_URL_ENV
from sync.server import BackendUnavailable, SyncService

#: What each worker process imports to build its app (``--workers`` > 1).
APP_FACTORY = "cloud.api.serve:app_from_environment"
#: Connections per process: the request threads share them (a request holds one for
#: its transaction only).
DEFAULT_POOL_SIZE = 10


def app_from_environment() -> FastAPI:
    """A worker's app: the settings from the environment (``TILLFLOW_CLOUD_CONFIG`` and
    ``TILLFLOW_*``), the database from ``TILLFLOW_DATABASE_URL``, the signing key from
    ``TILLFLOW_SIGNING_KEY_FILE`` (set by ``serve``)."""
    url = os.environ.get(DATABASE_URL_ENV)
    key_file = os.environ.get(KEY_FILE_ENV)
    if not url or not key_file:
        raise ConfigError(f"{DATABASE_URL_ENV} and {KEY_FILE_ENV} must be set")
    # the database as serve set it (the engine that starts rollouts' runs opens it too)
    settings = load_settings().model_copy(update={"database_url": url})
    backend = PostgresSyncBackend(url, migrate=False, pool_size=DEFAULT_POOL_SIZE)
    try:
        return build_app(settings, backend, load_key(Path(key_file)), dashboard=True)
    except BaseException:
        backend.close()
        raise


def build_app(
    settings: CloudSettings,
    backend: PostgresSyncBackend,
    key: Ed25519PrivateKey,
    *,
    dashboard: bool = False,
) -> FastAPI:
    """The app on ``backend``: the sync routes and the Fleet API, sharing its pool (the
    engine that starts workflow runs is made on first use, from ``settings``);
    ``dashboard``: the operator dashboard under ``/ui`` too (``cloud.dashboard``; what
    serve runs)."""
    clock = SystemClock()
    service = SyncService(backend, clock, key)
    fleet = FleetContext(settings, backend.pool, service, clock, key)

    def close() -> None:
        try:
            fleet.close()
        finally:
            backend.close()

    app = create_app(service, close=close, fleet=fleet)
    if dashboard:
        from cloud.dashboard import mount_dashboard

        mount_dashboard(app)
    return app


#: The control plane's sets of tables migrated after the sync service's (their tables
#: refer to its), in this order.
CONTROL_PLANE_SCHEMAS = (
    FLEET_SCHEMA,
    CONTROL_SCHEMA,
    OUTCOMES_SCHEMA,
    RELEASES_SCHEMA,
    ROLLOUTS_SCHEMA,
)


def migrate_fleet(backend: PostgresSyncBackend) -> int:
    """Apply the pending migrations of the Fleet API's, the control workflows' and the
    outcomes' tables (``CONTROL_PLANE_SCHEMAS``), in one transaction; returns the Fleet
    API's version."""
    try:
        with backend.pool.connection() as conn, conn.transaction():
            versions = [
                schema.migrate(conn, where=backend.where, unavailable=UNAVAILABLE)
                for schema in CONTROL_PLANE_SCHEMAS
            ]
            return versions[0]
    except UNAVAILABLE as exc:
        raise BackendUnavailable(
            f"PostgreSQL at {backend.where}: {type(exc).__name__}: {str(exc).strip()[:200]}"
        ) from exc


def serve_settings(
    settings: CloudSettings,
    *,
    config: str | None = None,
    access_log: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """``serve`` with every option from ``settings`` (``config``: the file they were
    read from, handed to the worker processes)."""
    # unset: an embedded PostgreSQL (started or shared; this process holds a lease)
    settings = settings.model_copy(update={"database_url": embedded.database_url(settings)})
    assert settings.database_url is not None
    if config:
        os.environ[CONFIG_ENV] = str(Path(config).resolve())
    return serve(
        settings.database_url,
        host=settings.host,
        port=settings.port,
        key_file=settings.key_path(),
        workers=settings.api_workers,
        access_log=access_log,
        out=out,
        settings=settings,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host}: {exc}") from exc
    family, _, proto, _, address = infos[0]
    # The protocol as getaddrinfo gave it (IPPROTO_TCP), not 0: asyncio sets TCP_NODELAY
    # only on accepted sockets whose ``proto`` says TCP. Without it Nagle holds a
    # response's body until the client acknowledges its headers (~40 ms of delayed ACK
    # on every keep-alive request: 44 ms a sync, measured, against 2 ms with it).
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
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
    settings: CloudSettings | None = None,
) -> int:
    """Migrate, bind, announce, serve until SIGINT/SIGTERM; returns the exit status.
    ``settings``: the rest of the options (default: the defaults, with these)."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    if settings is None:
        settings = CloudSettings(
            database_url=database_url, host=host, port=port, signing_key_file=key_file,
            api_workers=workers,
        )  # fmt: skip
    key, made = load_or_create_key(key_file)
    if made:
        print(f"created the control-plane signing key {key_file}", file=sys.stderr, flush=True)
    backend = PostgresSyncBackend(database_url, pool_size=DEFAULT_POOL_SIZE)  # migrates
    try:
        migrate_fleet(backend)
        # the engine's tables too: the API starts runs (rollouts) and reads them, maybe
        # before any worker has migrated them
        PostgresStore(database_url, pool_size=1).close()
        app = build_app(settings, backend, key, dashboard=True) if workers == 1 else None
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
        if app is not None:
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
