"""The control plane's own workflows and their tables: AuditAggregation (re-verify every
device's audit chain as the cloud holds it, sign a digest of every chain's head, raise
devices that stopped syncing), on the same engine as a terminal's payment.

- ``digest``: the signed digests (the bytes hashed and signed, making and checking one);
- ``chains``: one device's chains walked from what the cloud holds, against a digest;
- ``alerts``: raising and clearing silent devices;
- ``audit_steps``: the workflow's steps (``cloud/workflows/audit_aggregation.yaml``);
- ``metrics``: the Prometheus collector whose gauges are computed in SQL on scrape.

Tables: ``sql/`` (``SCHEMA``), migrated after the sync service's (they read its tables)
by ``tillflow cloud serve`` at start and by the workflow's first step (``migrate``).
"""

from __future__ import annotations

from typing import Any

import psycopg

from cloud.pgschema import SchemaSet

#: Any 64-bit number of ours, other than the engine store's, sync's and fleet's.
_MIGRATION_LOCK = 0x7417_C047

#: The control workflows' tables (``control_schema_migrations``).
SCHEMA = SchemaSet("control", "cloud.control", _MIGRATION_LOCK)

Conn = psycopg.Connection[tuple[Any, ...]]


def migrate(conn: Conn, *, where: str = "the control plane's database") -> int:
    """Apply the pending control migrations in ``conn``'s transaction (one read when
    there are none); ``tillflow cloud serve`` does it at start (``migrate_fleet``)."""
    return SCHEMA.migrate(conn, where=where)


__all__ = ["SCHEMA", "migrate"]
