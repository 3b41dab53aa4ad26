"""What every Fleet API route works with: ``FleetContext``, built once per process by
``tillflow cloud serve`` and kept on ``app.state.fleet``.

A route takes it as a dependency (``ctx: FleetContext = Depends(fleet_context)``) and
does its work in one transaction on a pooled connection (autocommit connections, so the
transaction is explicit)::

    with ctx.pool.connection() as conn, conn.transaction():
        ...                                          # the action
        ctx.record(conn, who, "device.tag", device_id, {"tag": tag})   # and its record

``record`` appends to the cloud's audit log in the caller's transaction, so the action
and its record commit together or not at all. ``sync_in(conn)`` is the sync service
working in that same transaction (revoke a device, make an enrollment token, queue a
command, recorded atomically with the action).

``engine()`` is the cloud engine this process starts and wakes workflow runs with (a
rollout's run, started once its row commits; woken after an operator's control): the
cloud's workflows on ``PostgresStore`` with a ``CeleryExecutor`` publishing to the
settings' broker, made on first use (an API process that never starts a run opens no
store and no broker connection) and once per process (each ``--workers`` process makes
its own, after the fork). This process never advances a run: the workers do.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, Request
from psycopg_pool import ConnectionPool

from cloud.api.fleet.audit import record
from cloud.fleet import audit, tokens
from cloud.fleet._sql import Conn
from cloud.fleet.tokens import Principal
from cloud.settings import CloudSettings
from cloud.sync.postgres import UNAVAILABLE, PostgresSyncTx
from edge.engine.clock import Clock
from sync.server import BackendUnavailable, SyncService

if TYPE_CHECKING:
    from edge.engine import Engine

#: Connections of the API process's engine store: a start or a wake at a time, one spare.
ENGINE_POOL_SIZE = 2


@dataclass
class FleetContext:
    """The process's settings, database pool, sync service and clock."""

    settings: CloudSettings
    #: Autocommit connections (the sync backend's pool, shared).
    pool: ConnectionPool[Conn]
    sync: SyncService
    clock: Clock
    #: The control plane's command-signing key (None: a context that cannot seal).
    signing_key: Ed25519PrivateKey | None = None
    #: Makes the engine ``engine()`` returns (None: ``api_engine`` on ``settings``).
    engine_factory: Callable[[], Engine] | None = None
    _engine: Engine | None = field(default=None, init=False, repr=False)
    _engine_close: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False)
    _engine_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def engine(self) -> Engine:
        """The process's cloud engine, made on the first call (thread-safe)."""
        with self._engine_lock:
            if self._engine is None:
                if self.engine_factory is not None:
                    self._engine = self.engine_factory()
                else:
                    self._engine, self._engine_close = api_engine(self.settings)
            return self._engine

    def close(self) -> None:
        """Stop the engine and close its store, if one was made (the app's shutdown)."""
        with self._engine_lock:
            engine, closers = self._engine, self._engine_close
            self._engine, self._engine_close = None, []
        if engine is not None:
            engine.close()
        for close in closers:
            close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Conn]:
        """One transaction on a pooled connection; a fault of the database's own (down,
        deadlock, pool timeout) is ``BackendUnavailable`` (a 503, nothing committed)."""
        try:
            with self.pool.connection() as conn, conn.transaction():
                yield conn
        except UNAVAILABLE as exc:
            raise BackendUnavailable(
                f"PostgreSQL: {type(exc).__name__}: {str(exc).strip()[:200]}"
            ) from exc

    def record(
        self,
        conn: Conn,
        who: Principal,
        action: str,
        target: str | None,
        detail: Mapping[str, Any] | None = None,
    ) -> audit.CloudAuditRow:
        """Append (who, what, when) to the cloud's audit log in ``conn``'s transaction."""
        return record(conn, who, action, target, detail, at=self.clock.now())

    def sync_in(self, conn: Conn) -> SyncService:
        """The sync service doing its work inside ``conn``'s transaction (each of its
        transactions a savepoint of it)."""
        return SyncService(_InTransaction(conn), self.clock, self.signing_key, self.sync.skew_s)

    def authenticate(self, token: str) -> Principal | None:
        """The caller a presented token is (None: unknown, revoked, not one of ours)."""
        with self.transaction() as conn:
            found = tokens.holder(conn, token, at=self.clock.now())
        return found


class _InTransaction:
    """A ``SyncBackend`` whose transactions are savepoints of one caller's transaction."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PostgresSyncTx]:
        try:
            with self.conn.transaction():
                yield PostgresSyncTx(self.conn)
        except UNAVAILABLE as exc:
            raise BackendUnavailable(
                f"PostgreSQL: {type(exc).__name__}: {str(exc).strip()[:200]}"
            ) from exc

    def schema_versions(self) -> dict[str, int]:
        with self.transaction() as tx:
            return tx.schema_versions()


def api_engine(settings: CloudSettings) -> tuple[Engine, list[Callable[[], None]]]:
    """The API process's engine, from the settings serve runs with: the cloud's
    workflows on ``PostgresStore(settings.database_url)`` (its tables migrated if they
    are not yet: a fast read when they are), runs submitted to the broker
    (``cloud.embedded.broker_url``: the configured one, else the serverless one under
    ``data_dir``, which ``tillflow cloud worker`` on the same settings reads). A lost
    publish is logged by the executor; the run is in the database and the workers'
    sweep submits it. Returns the engine and what closes what it opened."""
    from cloud.engine import cloud_engine
    from cloud.executor.celery_app import make_app
    from cloud.executor.executor import CeleryExecutor
    from cloud.store.postgres import PostgresStore

    if not settings.database_url:
        raise BackendUnavailable("no database_url: the API cannot start workflow runs")
    store = PostgresStore(settings.database_url, pool_size=ENGINE_POOL_SIZE)
    try:
        executor = CeleryExecutor(make_app(settings))
        engine = cloud_engine(store, executor, settings=settings)
    except BaseException:
        store.close()
        raise
    return engine, [executor.close, store.close]


def fleet_context(request: Request) -> FleetContext:
    """The dependency giving a route the process's ``FleetContext``."""
    ctx = getattr(request.app.state, "fleet", None)
    if not isinstance(ctx, FleetContext):
        raise RuntimeError("the Fleet API is not mounted: app.state.fleet is not set")
    return ctx


#: ``ctx: Ctx`` is ``ctx: FleetContext = Depends(fleet_context)``.
Ctx = Annotated[FleetContext, Depends(fleet_context)]

__all__ = ["Ctx", "FleetContext", "api_engine", "fleet_context"]
