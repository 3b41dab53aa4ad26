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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

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


def fleet_context(request: Request) -> FleetContext:
    """The dependency giving a route the process's ``FleetContext``."""
    ctx = getattr(request.app.state, "fleet", None)
    if not isinstance(ctx, FleetContext):
        raise RuntimeError("the Fleet API is not mounted: app.state.fleet is not set")
    return ctx


#: ``ctx: Ctx`` is ``ctx: FleetContext = Depends(fleet_context)``.
Ctx = Annotated[FleetContext, Depends(fleet_context)]

__all__ = ["Ctx", "FleetContext", "fleet_context"]
