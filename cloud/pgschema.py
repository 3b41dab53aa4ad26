"""Numbered SQL migrations for one set of the control plane's tables on PostgreSQL.

The control plane keeps several sets of tables in one database, each with its own
migrations and version table, so one can grow without renumbering another: the engine
store's (``cloud.store``, its own migrator), the sync service's (``cloud.sync``), the
Fleet API's (``cloud.fleet``), the control workflows' (``cloud.control``). A set is a
package holding ``sql/migrations/NNNN_name.sql`` (numbered 1..n) and ``sql/schema.sql``
(what applying every migration produces; a test per set checks they converge).

``SchemaSet.migrate(conn)`` applies the pending ones inside the caller's transaction,
serialised across processes by an advisory lock of the set's own, each migration in a
savepoint; a database newer than this build is refused (``MigrationError``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from edge.errors import MigrationError
from edge.store.queries import Migration

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True)
class SchemaSet:
    #: A short name (``sync``): the version table is ``{name}_schema_migrations``.
    name: str
    #: The package holding ``sql/`` (``cloud.sync``).
    package: str
    #: A 64-bit advisory lock key of this set's own.
    lock: int

    @property
    def table(self) -> str:
        return f"{self.name}_schema_migrations"

    def migrations(self) -> list[Migration]:
        """The numbered migrations ``NNNN_name.sql``, in order; numbers must be 1..n."""
        found = []
        folder = resources.files(self.package).joinpath("sql", "migrations")
        for entry in folder.iterdir():
            m = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
            if m:
                found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
        found.sort(key=lambda mig: mig.version)
        if [mig.version for mig in found] != list(range(1, len(found) + 1)):
            versions = [m.version for m in found]
            raise ValueError(f"{self.name} migrations are not numbered 1..n: {versions}")
        return found

    def schema(self) -> str:
        return resources.files(self.package).joinpath("sql", "schema.sql").read_text()

    def version(self, conn: Conn) -> int:
        """The highest applied migration (0: none, or no version table yet)."""
        exists = conn.execute("SELECT to_regclass(%s)", (self.table,)).fetchone()
        if not exists or exists[0] is None:
            return 0
        row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {self.table}").fetchone()
        return int(row[0]) if row else 0

    def migrate(
        self,
        conn: Conn,
        *,
        where: str,
        unavailable: tuple[type[BaseException], ...] = (psycopg.OperationalError,),
    ) -> int:
        """Apply the pending migrations on ``conn`` (inside a transaction the caller
        holds); returns the version the database is at. ``where`` names the database in
        errors; ``unavailable`` errors pass through as they are (a server fault)."""
        migrations = self.migrations()
        if self.version(conn) == len(migrations):
            return len(migrations)  # the usual case: one read, no lock (versions only grow)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock,))
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            "version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at double precision NOT NULL)"
        )
        current = self.version(conn)
        if current > len(migrations):
            raise MigrationError(
                f"the {self.name} schema is at version {current}, newer than this build "
                f"knows ({len(migrations)})",
                operation="migrate",
                path=where,
                hint="upgrade tillflow, or point it at the matching database",
            )
        for mig in migrations[current:]:
            try:
                with conn.transaction():
                    conn.execute(mig.sql.encode())  # bytes: sent as-is, no placeholders
                    conn.execute(
                        f"INSERT INTO {self.table} (version, name, applied_at) VALUES (%s, %s, %s)",
                        (mig.version, mig.name, time.time()),
                    )
            except unavailable:
                raise
            except psycopg.Error as exc:
                raise MigrationError(
                    f"{self.name} migration {mig.version:04d}_{mig.name} failed: {exc}",
                    operation="migrate",
                    path=where,
                ) from exc
        return max(current, len(migrations))
