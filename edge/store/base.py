"""What every store does the same way above its driver: reads mapped to records.

A dialect module (``SqliteStore``, ``PostgresStore``) supplies ``_rows`` and ``_scalar``
(run one named query) and ``_decode`` (its JSON decoder); the rest is written once here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from edge.engine.records import (
    AuditRetention,
    AuditRow,
    Guard,
    OutboxMessage,
    OutboxStats,
    RunRecord,
    Status,
    StepRecord,
)
from edge.errors import LimitExceeded, StoreError
from edge.store import rows as rowmap

log = logging.getLogger(__name__)

#: The counter that bounds the outbox (count = messages, amount = payload bytes).
OUTBOX_COUNTER = "outbox"


class RowReads:
    """Read side of the Store protocol, over a dialect's named queries."""

    @staticmethod
    def _decode(value: Any) -> Any:
        return value

    def _rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _scalar(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def schema_version(self) -> int:
        if not self._scalar("has_migrations_table"):
            return 0  # a database nothing was ever migrated into
        return int(self._scalar("schema_version"))

    def load_definition(self, content_hash: str) -> str | None:
        value = self._scalar("load_definition", {"content_hash": content_hash})
        return None if value is None else str(value)

    def latest_definition(self, workflow_type: str) -> str | None:
        value = self._scalar("latest_definition", {"workflow_type": workflow_type})
        return None if value is None else str(value)

    def get_run(self, run_id: str) -> RunRecord | None:
        found = self._runs("get_run", {"run_id": run_id})
        return found[0] if found else None

    def list_runs(
        self, statuses: Sequence[Status] | None = None, limit: int = 100
    ) -> list[RunRecord]:
        if not statuses:
            return self._runs("list_runs", {"limit": limit})
        out: list[RunRecord] = []
        for status in statuses:
            out += self._runs("list_runs_by_status", {"status": str(status), "limit": limit})
        out.sort(key=lambda r: r.created_at, reverse=True)
        return out[:limit]

    def recoverable(self, now: float, limit: int = 1000) -> list[RunRecord]:
        return self._runs("recoverable_runs", {"now": now, "limit": limit})

    def _runs(self, query: str, params: Mapping[str, Any]) -> list[RunRecord]:
        return [rowmap.run_from_row(r, self._decode) for r in self._rows(query, params)]

    def step_history(self, run_id: str) -> list[StepRecord]:
        found = self._rows("step_history", {"run_id": run_id})
        return [rowmap.step_from_row(r, self._decode) for r in found]

    def audit_rows(self, run_id: str | None = None) -> Iterator[AuditRow]:
        found = (
            self._rows("audit_rows_for_run", {"run_id": run_id})
            if run_id
            else self._rows("audit_rows")
        )
        for r in found:
            yield rowmap.audit_from_row(r, self._decode)

    def audit_head(self, stream: int = 0) -> tuple[int, str] | None:
        head = self._rows("audit_head", {"stream": stream})
        if not head or int(head[0]["seq"]) == 0:
            return None  # an empty chain, however the dialect seeds its head
        return int(head[0]["seq"]), str(head[0]["hash"])

    def audit_heads(self) -> dict[int, tuple[int, str]]:
        return {
            int(h["stream"]): (int(h["seq"]), str(h["hash"])) for h in self._rows("audit_heads")
        }

    def audit_retention(self, stream: int = 0) -> AuditRetention | None:
        found = self._rows("audit_retention", {"stream": stream})
        if not found:
            return None
        r = found[0]
        return AuditRetention(int(r["base_seq"]), str(r["base_hash"]), int(r["acked_seq"]))

    def outbox(self, after_seq: int = 0, limit: int = 100) -> list[OutboxMessage]:
        found = self._rows("outbox_after", {"after_seq": after_seq, "limit": limit})
        return [rowmap.outbox_from_row(r, self._decode) for r in found]

    def outbox_stats(self) -> OutboxStats:
        row = self._rows("outbox_stats")[0]
        return OutboxStats(
            depth=int(row["depth"]),
            bytes=int(row["bytes"]),
            oldest=row["oldest"],
            last_seq=int(row["last_seq"]),
        )

    def database_id(self) -> str:
        value = self._scalar("database_id")
        if value is None:
            raise StoreError(
                "the database has no stream id (database_meta); it was not migrated",
                operation="database_id",
                path=str(getattr(self, "path", "")),
                hint="open it with migrate=True (schema 6 or later)",
            )
        return str(value)

    def audit_after(self, after_seq: int, limit: int, stream: int = 0) -> list[AuditRow]:
        params = {"stream": stream, "after_seq": after_seq, "limit": limit}
        return [rowmap.audit_from_row(r, self._decode) for r in self._rows("audit_after", params)]

    # --- CommandLedger (reads) ---------------------------------------------------------

    def command_high_water(self) -> int:
        return int(self._scalar("command_high_water") or 0)

    def trusted_time(self) -> float | None:
        value = self._scalar("trusted_time")
        return None if value is None else float(value)

    def active_document(self, kind: str) -> tuple[int, dict[str, Any]] | None:
        found = self._rows("active_document", {"kind": kind})
        if not found:
            return None
        content = self._decode(found[0]["content"])
        return int(found[0]["version"]), dict(content)

    def counters(self) -> dict[str, tuple[int, int]]:
        return {r["name"]: (int(r["amount"]), int(r["count"])) for r in self._rows("counters")}


def guard_params(guard: Guard, at: float) -> dict[str, object]:
    return {
        "name": guard.name,
        "amount": guard.amount,
        "count": guard.count,
        "max_amount": guard.max_amount,
        "max_count": guard.max_count,
        "at": at,
    }


def guard_refused(guard: Guard) -> LimitExceeded:
    caps = ", ".join(
        f"{what} cap {cap}"
        for what, cap in (("amount", guard.max_amount), ("count", guard.max_count))
        if cap is not None
    )
    return LimitExceeded(
        f"counter '{guard.name}' would pass its {caps or 'floor of zero'} "
        f"(change {guard.amount:+d} / {guard.count:+d}); nothing was committed",
        reason=guard.reason,
    )
