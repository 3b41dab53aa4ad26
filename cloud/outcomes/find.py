"""Finding unknown outcomes, and starting one ``resolve_outcome`` run for each.

A terminal that loses an acquirer's answer records a ``payment`` (or ``refund``) message
with ``decision: unknown`` and the operation's key (``auth_key``, ``refund_key``) in the
commit that learnt it; the sync service stores it in ``sync_messages`` like any other.
``find_unknown`` records every such message not yet an outcome as an ``open`` row (one
per device and key: a message uploaded twice, or a key reported twice, is one outcome)
and returns the open outcomes no run was started for. ``start_resolutions`` starts a
``resolve_outcome`` run for each under the idempotency key
``resolve_outcome:<device>:<key>``, so however often an outcome is found (two sweeps at
once, a start whose note was lost) it is resolved by one run.

Call ``start_resolutions`` from the sweep (every ``sweep_interval_s``) or a scheduled
run: a found outcome is open, and listed as open by the API, from that moment.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from psycopg.rows import tuple_row

from cloud.outcomes import migrate
from cloud.outcomes._sql import Conn, Q
from edge.engine import Engine

WORKFLOW = "resolve_outcome"
#: Outcomes recorded (and started) in one pass, at most; the next pass takes the rest.
DEFAULT_LIMIT = 500


@dataclass(frozen=True)
class Unknown:
    """An open outcome, as the resolve run's input takes it."""

    outcome_id: str
    device_id: str
    key: str
    operation: str
    run_id: str
    amount_minor: int | None
    currency: str | None

    def input(self) -> dict[str, Any]:
        return {
            "outcome_id": self.outcome_id,
            "device_id": self.device_id,
            "key": self.key,
            "operation": self.operation,
            "run_id": self.run_id,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
        }


def resolve_key(device_id: str, key: str) -> str:
    """The resolve run's idempotency key: the device and the operation's key."""
    return f"{WORKFLOW}:{device_id}:{key}"


def find_unknown(conn: Conn, *, now: float, limit: int = DEFAULT_LIMIT) -> list[Unknown]:
    """Record the new unknown outcomes among ``sync_messages`` (open), in the
    transaction ``conn`` holds, and return the open ones no run was noted for."""
    cur = conn.cursor(row_factory=tuple_row)  # whatever rows the caller's pool gives
    cur.execute(Q["record_found"], {"now": now, "limit": limit})
    rows = cur.execute(Q["unstarted"], {"limit": limit}).fetchall()
    return [Unknown(*row) for row in rows]


def start_resolutions(
    engine: Engine,
    connect: Callable[[], AbstractContextManager[Conn]],
    *,
    limit: int = DEFAULT_LIMIT,
) -> list[str]:
    """Find, then start one resolve run per open outcome without one, and note it.
    ``connect()`` gives a connection for the outcomes' tables (a pool's ``connection``).
    Returns the runs started or found already started. A crash between a start and its
    note starts nothing twice: the next pass's start answers the same run."""
    with connect() as conn, conn.transaction():
        migrate(conn)
        found = find_unknown(conn, now=engine.clock.now(), limit=limit)
    runs = []
    for unknown in found:
        run_id = engine.start(
            WORKFLOW, unknown.input(), idempotency_key=resolve_key(unknown.device_id, unknown.key)
        )
        with connect() as conn, conn.transaction():
            conn.execute(Q["note_run"], {"run_id": run_id, "outcome_id": unknown.outcome_id})
        runs.append(run_id)
    return runs
