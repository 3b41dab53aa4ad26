"""What every store does the same way above its driver: reads mapped to records.

A dialect module (``SqliteStore``, ``PostgresStore``) supplies ``_rows`` and ``_scalar``
(run one named query) and ``_decode`` (its JSON decoder); the rest is written once here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from edge.engine.audit import GENESIS
from edge.engine.records import (
    Acknowledgement,
    AckResult,
    AuditRetention,
    AuditRow,
    Compaction,
    Guard,
    OutboxMessage,
    OutboxStats,
    RunRecord,
    Status,
    StepRecord,
)
from edge.errors import LimitExceeded
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

    def audit_head(self) -> tuple[int, str] | None:
        head = self._rows("audit_head")
        if not head or int(head[0]["seq"]) == 0:
            return None  # an empty chain, however the dialect seeds its head
        return int(head[0]["seq"]), str(head[0]["hash"])

    def audit_retention(self) -> AuditRetention | None:
        found = self._rows("audit_retention")
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


#: Runs one named query inside the caller's transaction: (rows as dicts, rows changed).
TxQuery = Callable[[str, Mapping[str, Any]], tuple[list[dict[str, Any]], int]]


def compact_in(
    q: TxQuery,
    *,
    run_ids: Callable[[list[str]], Any],
    before: float,
    counter_prefix: str | None,
    counters_before: float | None,
) -> Compaction:
    """Retention, as one transaction's statements (the store supplies the transaction).

    ``run_ids`` encodes a list of run ids the way the dialect's ``IN`` takes it. The audit
    base moves before the rows behind it are deleted, so the delete trigger -- which
    refuses any row past the base -- lets exactly those go and no other.
    """
    found, _ = q("compactable_runs", {"before": before})
    runs = steps = 0
    if found:
        ids = run_ids([str(r["run_id"]) for r in found])
        steps = q("delete_steps_of_runs", {"run_ids": ids})[1]
        q("delete_inputs_of_runs", {"run_ids": ids})
        runs = q("delete_runs", {"run_ids": ids})[1]
    audit = 0
    retention, _ = q("audit_retention", {})
    if retention:
        base, acked = int(retention[0]["base_seq"]), int(retention[0]["acked_seq"])
        point, _ = q("audit_compact_point", {"acked_seq": acked, "before": before})
        if point and int(point[0]["seq"]) > base:
            seq = int(point[0]["seq"])
            q("set_audit_base", {"seq": seq, "hash": str(point[0]["hash"])})
            audit = q("delete_audit_through", {"seq": seq})[1]
    counters = 0
    if counter_prefix is not None and counters_before is not None:
        params = {"prefix": counter_prefix, "before": counters_before}
        counters = q("delete_idle_counters", params)[1]
    return Compaction(runs=runs, steps=steps, audit_rows=audit, counters=counters)


def acknowledge_in(
    q: TxQuery, ack: Acknowledgement, *, outbox_bound: Guard | None, at: float
) -> AckResult:
    """One acknowledgement, as one transaction's statements (the store supplies it).

    The DELETE says which messages it really removed: only their ``releases`` apply, so
    an acknowledgement repeated, or raced by another (the loser's DELETE finds nothing),
    releases nothing twice. A release that would take a counter below zero is left out
    with a warning: the acknowledgement itself always goes through.
    """
    deleted: list[dict[str, Any]] = []
    if ack.outbox_through is not None:
        deleted, _ = q("ack_outbox", {"seq": ack.outbox_through})
    released = [g for r in deleted for g in ack.releases.get(int(r["seq"]), ())]
    changes = list(released)
    if outbox_bound is not None and deleted:
        size = sum(int(r["bytes"]) for r in deleted)
        changes.append(Guard(OUTBOX_COUNTER, amount=-size, count=-len(deleted)))
    for guard in changes:
        params = guard_params(guard, at)
        q("ensure_counter", params)
        if q("apply_counter", params)[1] != 1:
            log.warning(
                "releasing %+d / %+d would take counter %r below zero; left as it is",
                guard.amount,
                guard.count,
                guard.name,
                extra={"action": "ack_release_below_zero", "counter": guard.name},
            )
            if guard in released:
                released.remove(guard)
    if ack.audit_through is not None:
        q("ack_audit", {"seq": ack.audit_through, "genesis": GENESIS})
    return AckResult(messages=len(deleted), released=tuple(released))
