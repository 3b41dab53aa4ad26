"""The unknown outcomes as the API lists them (``GET /api/v1/outcomes``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.rows import tuple_row

from cloud.outcomes._sql import Conn, Q


@dataclass(frozen=True)
class OutcomeRow:
    outcome_no: int
    outcome_id: str
    device_id: str
    key: str
    operation: str
    run_id: str
    amount_minor: int | None
    currency: str | None
    reported_at: float
    found_at: float
    state: str
    resolve_run_id: str | None
    status: str | None
    acquirer_ref: str | None
    resolved_at: float | None
    command_id: str | None
    command_note: str | None
    command_status: str | None
    command_reason: str | None
    lookup: dict[str, Any] | None = None


def outcomes(
    conn: Conn,
    *,
    state: str | None = None,
    device_id: str | None = None,
    after: int | None = None,
    limit: int = 100,
) -> list[OutcomeRow]:
    """Outcomes in the order they were found, after ``after`` (an ``outcome_no``)."""
    params = {"state": state, "device_id": device_id, "after": after, "limit": limit}
    cur = conn.cursor(row_factory=tuple_row)
    return [OutcomeRow(*row) for row in cur.execute(Q["outcomes"], params).fetchall()]


def outcome(conn: Conn, outcome_id: str) -> OutcomeRow | None:
    row = conn.cursor(row_factory=tuple_row).execute(Q["outcome"], {"outcome_id": outcome_id})
    found = row.fetchone()
    return None if found is None else OutcomeRow(*found)
