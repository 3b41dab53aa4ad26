"""The Fleet API's tables on PostgreSQL: API tokens, the cloud's audit log, device tags,
operators' decisions (``sql/``), and the SQL over them (``tokens``, ``audit``, ...).

Migrated where the sync service's tables are (``tillflow cloud serve``'s start), after
them: ``device_tags`` and the decisions refer to the sync service's rows.
"""

from __future__ import annotations

from cloud.pgschema import SchemaSet

#: Any 64-bit number of ours, other than the engine store's and the sync service's.
_MIGRATION_LOCK = 0x7417_F1EE

#: The Fleet API's tables: their migrations and version table (``fleet_schema_migrations``).
SCHEMA = SchemaSet("fleet", "cloud.fleet", _MIGRATION_LOCK)

__all__ = ["SCHEMA"]
