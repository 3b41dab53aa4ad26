"""Rollouts: config, fraud-policy and release changes pushed to the fleet in staged waves
by workflows on the cloud engine (ConfigRollout, PolicyRollout, ReleaseRollout), which
advance on the devices' health and roll back by saga (issue 14).
"""

from __future__ import annotations

from cloud.pgschema import SchemaSet

#: Any 64-bit number of ours, other than the other sets' (engine, sync, fleet, control,
#: outcomes, releases).
_MIGRATION_LOCK = 0x7417_0A11

#: The rollouts' tables: their migrations and version table.
SCHEMA = SchemaSet("rollouts", "cloud.rollouts", _MIGRATION_LOCK)
