"""Unknown outcomes: an authorisation, reversal or refund a terminal reported whose
answer it lost (its ``payment``/``refund`` message with ``decision: unknown``), looked up
at the acquirer by its idempotency key, the truth recorded and told to the terminal.

* ``acquirer``: the port (``AcquirerLookup.lookup(key) -> Lookup``) and its HTTP
  implementation for hwsim's acquirer; a real acquirer's status API plugs in there.
* ``find``: the unknown outcomes among ``sync_messages`` not yet in ``unknown_outcomes``,
  recorded ``open``, and one ``resolve_outcome`` run started per outcome
  (``start_resolutions``, idempotency key ``resolve_outcome:<device>:<key>``).
* ``steps`` (``cloud/workflows/resolve_outcome.yaml``): look it up (retried with backoff
  while the acquirer is away), then, in one transaction, record the truth and queue the
  signed ``resolve_outcome`` command (``command``) for the terminal.
* ``store``: the reads the API lists (``GET /api/v1/outcomes``).

The tables are their own set (``SCHEMA``: ``sql/``), migrated after the sync service's
(``migrate``: by ``serve``'s start, and by the finder and the API if it has not).
"""

from __future__ import annotations

from typing import Any

import psycopg

from cloud.pgschema import SchemaSet

#: Any 64-bit number of ours, other than the other sets' (engine, sync, fleet, control).
_MIGRATION_LOCK = 0x7417_0C0E

#: The unknown outcomes' table: its migrations and version table.
SCHEMA = SchemaSet("outcomes", "cloud.outcomes", _MIGRATION_LOCK)


def migrate(conn: psycopg.Connection[Any], *, where: str = "the control plane's database") -> int:
    """Apply the pending outcomes migrations in ``conn``'s transaction (cheap when there
    are none: one read); returns the version the database is at. The finder and the API
    call it, so a database ``serve`` did not migrate still gets the table."""
    return SCHEMA.migrate(conn, where=where)


__all__ = ["SCHEMA", "migrate"]
