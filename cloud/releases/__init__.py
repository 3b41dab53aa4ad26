"""Terminal releases as the control plane holds them: uploaded bundles, verified with the
release key, kept file by file by content hash (one copy per distinct file), served to
devices for ``install_release`` (issue 14's ReleaseRollout; issue 17's delta updates).
"""

from __future__ import annotations

from cloud.pgschema import SchemaSet

#: Any 64-bit number of ours, other than the other sets' (engine, sync, fleet, control,
#: outcomes, rollouts).
_MIGRATION_LOCK = 0x7417_0E1E

#: The releases' tables: their migrations and version table.
SCHEMA = SchemaSet("releases", "cloud.releases", _MIGRATION_LOCK)
