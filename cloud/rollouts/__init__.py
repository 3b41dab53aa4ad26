"""Rollouts: config, fraud-policy and release changes pushed to the fleet in staged waves
by workflows on the cloud engine (ConfigRollout, PolicyRollout, ReleaseRollout), which
advance on the devices' health and roll back by saga (issue 14).

- ``options``: what a rollout can be told (target, waves, seed, soak, abort threshold,
  device timeout, gates, rate, windows), strict pydantic models;
- ``plan``: the arithmetic, pure (selector parameters, wave sizes, seeded membership,
  the threshold's verdict and figures, windows, rate);
- ``service``: create / view / devices / rollouts / control, in the caller's
  transaction (what the Fleet API calls);
- ``steps``: the workflows' steps (``cloud/workflows/*_rollout.yaml``), one transaction
  each, each safe to replay;
- ``reconcile``: late joiners (the worker's sweep runs it every pass).

Tables: ``sql/`` (``SCHEMA``: rollouts, rollout_waves, rollout_devices,
rollout_controls), migrated by ``tillflow cloud serve`` with the other control-plane sets.
"""

from __future__ import annotations

from cloud.pgschema import SchemaSet

#: Any 64-bit number of ours, other than the other sets' (engine, sync, fleet, control,
#: outcomes, releases).
_MIGRATION_LOCK = 0x7417_0A11

#: The rollouts' tables: their migrations and version table.
SCHEMA = SchemaSet("rollouts", "cloud.rollouts", _MIGRATION_LOCK)

__all__ = ["SCHEMA"]
