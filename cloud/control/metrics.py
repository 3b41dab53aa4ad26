"""The fleet's gauges for Prometheus, computed in SQL when Prometheus scrapes (a custom
collector: nothing is counted per request, and every API process answers the same
numbers from the one database).

=================================== ======================================================
metric                              what
=================================== ======================================================
``tillflow_devices{status}``        enrolled devices, active / revoked
``tillflow_devices_seen{window}``   devices seen in the last 5m / 15m / 60m
``tillflow_sync_lag_seconds``       p50/p95/p99 (``quantile``) of now - last seen, over
                                    active devices that have synced
``tillflow_outbox_oldest_age_seconds`` p50/p95/p99 of the oldest unsent outbox entry's
                                    age each device last reported (an empty outbox: 0)
``tillflow_commands{status}``       commands by status (every status, zeros included)
``tillflow_workflow_runs{status}``  engine runs by status (when the engine's tables are
                                    in this database)
``tillflow_device_alerts_raised``   devices raised by AuditAggregation, not yet cleared
``tillflow_audit_chains_broken``    chains the last AuditAggregation found broken
=================================== ======================================================

API latency is a histogram fed per request (``cloud.api.fleet.routes.metrics``), in the
same registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from cloud.control import Conn
from cloud.control._sql import Q
from edge.engine.records import Status

#: The windows of ``tillflow_devices_seen``.
WINDOWS = ("5m", "15m", "60m")
QUANTILES = ("0.5", "0.95", "0.99")
COMMAND_STATUSES = ("queued", "delivered", "applied", "refused", "expired")

Transaction = Callable[[], contextlib.AbstractContextManager[Conn]]


class FleetCollector:
    """Gauges from the database at each scrape. ``transaction`` opens one (a fault is the
    caller's to translate: the route answers 503); ``now`` is the clock."""

    def __init__(self, transaction: Transaction, now: Callable[[], float]) -> None:
        self._transaction = transaction
        self._now = now

    def collect(self) -> Iterator[Metric]:
        now = self._now()
        with self._transaction() as conn:
            families = list(_devices(conn, now))
            families += _lag(conn, now)
            families.append(_by_status(conn, "metrics_commands", "tillflow_commands",
                                       "Commands by status.", COMMAND_STATUSES))  # fmt: skip
            if _scalar(conn, "metrics_runs_present"):
                statuses = tuple(str(s) for s in Status)
                families.append(_by_status(conn, "metrics_runs", "tillflow_workflow_runs",
                                           "Workflow runs by status.", statuses))  # fmt: skip
            if _present(conn, "device_alerts") and _present(conn, "audit_verifications"):
                families += _audit(conn)
        yield from families


def _scalar(conn: Conn, name: str, params: dict[str, Any] | None = None) -> Any:
    row = conn.execute(Q[name], params or {}).fetchone()
    return None if row is None else row[0]


def _present(conn: Conn, table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


def _devices(conn: Conn, now: float) -> Iterator[Metric]:
    row = conn.execute(Q["metrics_devices"], {"now": now}).fetchone()
    active, revoked, *seen = (int(x) for x in (row or (0, 0, 0, 0, 0)))
    devices = GaugeMetricFamily("tillflow_devices", "Enrolled devices by status.",
                                labels=["status"])  # fmt: skip
    devices.add_metric(["active"], active)
    devices.add_metric(["revoked"], revoked)
    yield devices
    family = GaugeMetricFamily(
        "tillflow_devices_seen", "Devices seen (synced) within the window.", labels=["window"]
    )
    for window, count in zip(WINDOWS, seen, strict=True):
        family.add_metric([window], count)
    yield family


def _lag(conn: Conn, now: float) -> list[Metric]:
    row = conn.execute(Q["metrics_lag"], {"now": now}).fetchone()
    lag, age = row if row else (None, None)
    out: list[Metric] = []
    for name, doc, values in (
        ("tillflow_sync_lag_seconds",
         "Seconds since active devices were last seen, by quantile.", lag),
        ("tillflow_outbox_oldest_age_seconds",
         "Age of devices' oldest unsent outbox entry as last reported, by quantile.", age),
    ):  # fmt: skip
        family = GaugeMetricFamily(name, doc, labels=["quantile"])
        for q, v in zip(QUANTILES, values or (), strict=False):
            if v is not None:
                family.add_metric([q], float(v))
        out.append(family)
    return out


def _by_status(
    conn: Conn, query: str, name: str, doc: str, statuses: tuple[str, ...]
) -> GaugeMetricFamily:
    counts = {str(s): int(n) for s, n in conn.execute(Q[query])}
    family = GaugeMetricFamily(name, doc, labels=["status"])
    for status in dict.fromkeys((*statuses, *sorted(counts))):
        family.add_metric([status], counts.get(status, 0))
    return family


def _audit(conn: Conn) -> list[Metric]:
    row = conn.execute(Q["metrics_audit"]).fetchone()
    raised, broken = (int(x) for x in (row or (0, 0)))
    return [
        GaugeMetricFamily("tillflow_device_alerts_raised",
                          "Devices raised for not syncing, not yet cleared.", value=raised),
        GaugeMetricFamily("tillflow_audit_chains_broken",
                          "Device audit chains the last AuditAggregation found broken.",
                          value=broken),
    ]  # fmt: skip


__all__ = ["COMMAND_STATUSES", "QUANTILES", "WINDOWS", "FleetCollector"]
