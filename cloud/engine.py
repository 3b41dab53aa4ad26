"""The cloud's engine: the terminal's ``Engine`` on ``PostgresStore``, with the cloud's
workflows registered and its step modules imported.

One factory for every control-plane process (the API, ``tillflow cloud worker``, the
sweep), so each knows the same workflow types and none starts a run another cannot
advance. The workflows are the YAML files in ``cloud/workflows`` plus
``settings.workflow_dirs``; the step modules are ``STEP_MODULES`` plus
``settings.step_modules``, imported at start so a missing module fails the process then,
not the first run that needs it.

Scheduled workflows are ``SCHEDULES`` (plus the ``SCHEDULES`` a step module of
``settings.step_modules`` declares): the sweep starts each once per slot of ``every_s``
seconds, exactly once across every worker (``sweep.Sweep``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.settings import CloudSettings
from edge.engine import Clock, Engine, Executor, Store, load_file
from edge.engine.imports import ImportPathError

#: The cloud's own workflow YAML (other parts of the control plane add theirs here).
WORKFLOWS = Path(__file__).resolve().parent / "workflows"

#: The step modules of the cloud's workflows, imported by every control-plane process:
#: AuditAggregation and SilentDevices, resolve_outcome, the documents' assign steps, the
#: rollouts (ConfigRollout, PolicyRollout, ReleaseRollout).
STEP_MODULES: tuple[str, ...] = (
    "cloud.control.audit_steps",
    "cloud.outcomes.steps",
    "cloud.documents.steps",
    "cloud.rollouts.steps",
)


@dataclass(frozen=True)
class Schedule:
    """Start a ``workflow_type`` run every ``every_s`` seconds with ``input``.

    The slot is ``floor(now / every_s)``; its run's idempotency key is
    ``f"{workflow_type}:{slot}"``, so any number of sweeps start it once.
    """

    workflow_type: str
    every_s: float
    input: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.every_s <= 0:
            raise ValueError(f"schedule {self.workflow_type}: every_s must be > 0")

    def slot(self, now: float) -> int:
        return int(now // self.every_s)

    def key(self, slot: int) -> str:
        return f"{self.workflow_type}:{slot}"


#: Scheduled workflows at fixed intervals (those that follow the settings are in
#: ``schedules``).
SCHEDULES: tuple[Schedule, ...] = ()

#: SilentDevices runs at most this far apart (AuditAggregation raises silent devices
#: too, but only once a day).
SILENT_CHECK_MAX_S = 900.0


def workflow_files(settings: CloudSettings) -> list[Path]:
    """Every workflow YAML the cloud registers, in a stable order."""
    files = sorted(WORKFLOWS.glob("*.yaml"))
    for d in settings.workflow_dirs:
        files.extend(sorted(Path(d).expanduser().glob("*.yaml")))
    return files


def import_step_modules(settings: CloudSettings) -> list[Any]:
    """Import ``STEP_MODULES`` and ``settings.step_modules``; a failure names the module."""
    modules = []
    for name in (*STEP_MODULES, *settings.step_modules):
        try:
            modules.append(importlib.import_module(name))
        except Exception as exc:  # any import-time failure is the operator's to see
            raise ImportPathError(
                f"cannot import step module '{name}': {type(exc).__name__}: {exc}",
                hint="is it installed, or on PYTHONPATH? (settings: step_modules)",
            ) from exc
    return modules


def schedules(settings: CloudSettings) -> list[Schedule]:
    """The cloud's schedules: AuditAggregation every ``audit_aggregation_interval_s``
    (a day) and SilentDevices every quarter of ``offline_after_s`` (at most 15 minutes)
    unless ``control_schedules`` is off; ``SCHEDULES``; and those the settings' step
    modules declare."""
    found = list(SCHEDULES)
    if settings.control_schedules:
        every = min(settings.offline_after_s / 4, SILENT_CHECK_MAX_S)
        found[:0] = [
            Schedule("AuditAggregation", every_s=settings.audit_aggregation_interval_s),
            Schedule("SilentDevices", every_s=every),
        ]
    for module in import_step_modules(settings):
        if module.__name__ in STEP_MODULES:
            continue
        declared = getattr(module, "SCHEDULES", ())
        found.extend(s for s in declared if isinstance(s, Schedule))
    return found


def cloud_engine(
    store: Store,
    executor: Executor,
    *,
    settings: CloudSettings,
    clock: Clock | None = None,
    services: Any = None,
) -> Engine:
    """An ``Engine`` on ``store`` and ``executor`` knowing every cloud workflow. The
    steps' services (``ctx.services``) are ``services``, else ``{"settings": settings}``:
    each step opens what it needs from the settings (database, signing key, acquirer)."""
    import_step_modules(settings)
    if services is None:
        services = {"settings": settings}
    engine = Engine(store, executor, clock=clock, services=services)
    for path in workflow_files(settings):
        engine.register(load_file(path))
    return engine
