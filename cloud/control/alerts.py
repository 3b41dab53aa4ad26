"""Devices that stopped syncing: raised by AuditAggregation when an active device has
not been seen for ``CloudSettings.offline_after_s`` (one that enrolled and never synced:
since its enrollment), cleared when it is seen again (or revoked).

One row per device in ``device_alerts``. The workflow writes the raising and the
clearing; a list read between two runs shows an open alert whose device has been seen
since as cleared at that sighting, so a device that syncs again leaves the list at once,
not at the next run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cloud.control import Conn
from cloud.control._sql import Q

AlertState = Literal["raised", "cleared"]


@dataclass(frozen=True)
class Sweep:
    raised: list[str]
    cleared: list[str]
    open: int


@dataclass(frozen=True)
class Alert:
    device_id: str
    kind: str
    store: str
    raised_at: float
    #: When the device was last seen as it was raised.
    last_seen_at: float
    #: When it was last seen, as of now.
    seen_now: float
    cleared_at: float | None
    run_id: str

    @property
    def state(self) -> AlertState:
        return "raised" if self.cleared_at is None else "cleared"


def sweep(conn: Conn, *, now: float, offline_after_s: float, run_id: str) -> Sweep:
    """Clear the alerts of devices seen since, then raise the silent ones (in
    ``conn``'s transaction; run again, it changes nothing)."""
    cleared = [str(r[0]) for r in conn.execute(Q["clear_seen"], {"now": now})]
    params = {"now": now, "threshold": now - offline_after_s, "run_id": run_id}
    raised = [str(r[0]) for r in conn.execute(Q["raise_silent"], params)]
    row = conn.execute(Q["open_alerts"]).fetchone()
    return Sweep(sorted(raised), sorted(cleared), int(row[0]) if row else 0)


def _alert(row: Sequence[Any]) -> Alert:
    return Alert(
        device_id=row[0],
        kind=row[1],
        raised_at=float(row[2]),
        last_seen_at=float(row[3]),
        seen_now=float(row[4]),
        cleared_at=None if row[5] is None else float(row[5]),
        store=row[6],
        run_id=row[7],
    )


def listed(conn: Conn, *, state: AlertState | None, after: str | None, limit: int) -> list[Alert]:
    """Alerts by device id after ``after`` (``state`` None: raised and cleared)."""
    params = {"state": state, "after": after, "limit": limit}
    return [_alert(r) for r in conn.execute(Q["alerts"], params)]


__all__ = ["Alert", "AlertState", "Sweep", "listed", "sweep"]
