"""What the dashboard reads beyond the Fleet API's own lists: the fleet's summary
(health, last seen, versions), the devices needing attention (a broken audit chain, a
stalled outbox), one device's timeline, a rollout's controls and the audit rows around
a broken link. Named queries in ``sql/queries.sql``, every value bound; each function
takes the caller's connection (the page's one transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from cloud.fleet._sql import Conn
from edge.store.queries import parse_queries

Q = parse_queries(resources.files("cloud.dashboard").joinpath("sql", "queries.sql").read_text())

#: An outbox whose oldest unsent entry is older than this is stalled (a terminal
#: syncing every minute or so holds nothing that long unless something is wrong).
STALLED_OUTBOX_S = 900.0
#: "Seen recently": within five minutes.
RECENT_S = 300.0
#: Names offered in the store and group filters.
SUGGESTIONS = 500


@dataclass(frozen=True)
class Summary:
    health: dict[str, int]
    active: int
    recent: int
    online: int
    silent: int
    never: int
    revoked: int
    versions: dict[str, list[tuple[str | None, int]]]
    attention: list[dict[str, Any]]
    attention_total: int


def summary(
    conn: Conn,
    *,
    now: float,
    offline_after_s: float,
    store: str | None,
    group: str | None,
    attention_limit: int = 25,
    stalled_s: float = STALLED_OUTBOX_S,
) -> Summary:
    scope = {"store": store, "group": group}
    counts: dict[str, list[tuple[str | None, int]]] = {}
    params = scope | {"recent": now - RECENT_S, "offline": now - offline_after_s}
    for kind, value, n in conn.execute(Q["fleet_summary"], params):
        counts.setdefault(str(kind), []).append((None if value is None else str(value), int(n)))
    seen = {str(k): n for k, n in counts.pop("seen", [])}
    health = {str(k): n for k, n in counts.pop("health", [])}
    versions = {k: counts.get(k, []) for k in ("binary", "config", "policy")}
    params = scope | {"now": now, "stalled_s": stalled_s, "limit": attention_limit}
    names = ("device_id", "store", "group", "last_seen_at", "outbox_depth", "outbox_age_s",
             "broken_chains", "first_bad_seq", "reason", "last_error", "total")  # fmt: skip
    attention = [dict(zip(names, r, strict=True)) for r in conn.execute(Q["attention"], params)]
    total = int(attention[0]["total"]) if attention else 0
    return Summary(
        health, seen.get("active", 0), seen.get("recent", 0), seen.get("online", 0),
        seen.get("silent", 0), seen.get("never", 0), seen.get("revoked", 0), versions,
        attention, total,
    )  # fmt: skip


def names(conn: Conn) -> tuple[list[str], list[str]]:
    """(stores, groups) for the filters' suggestions."""
    limit = {"limit": SUGGESTIONS}
    stores = [r[0] for r in conn.execute(Q["store_names"], limit)]
    groups = [r[0] for r in conn.execute(Q["group_names"], limit)]
    return stores, groups


def timeline(conn: Conn, device_id: str, *, quarantine: bool, limit: int = 40) -> dict[str, Any]:
    """A device's commands, syncs, rollouts and (``quarantine``: the caller may read it)
    quarantined entries, each list newest first, and the events merged by time."""
    p = {"device_id": device_id, "limit": limit}
    commands = [
        dict(zip(("command_id", "action", "status", "reason", "created_at", "delivered_at",
                  "result_at", "doc_kind", "doc_version"), r, strict=True))
        for r in conn.execute(Q["device_commands"], p)
    ]  # fmt: skip
    syncs = [
        {"at": r[0], "entries": int(r[1]), "topics": list(r[2]), "first": r[3], "last": r[4]}
        for r in conn.execute(Q["device_syncs"], p)
    ]
    rollouts = [
        dict(zip(("rollout_id", "kind", "rollout_status", "wave", "status", "notified_at",
                  "applied_at", "healthy_at", "failed_at", "last_error", "restore_status",
                  "created_at"), r, strict=True))
        for r in conn.execute(Q["device_rollouts"], p)
    ]  # fmt: skip
    held = []
    if quarantine:
        held = [
            dict(zip(("quarantine_id", "stream", "seq", "kind", "reason", "detail",
                      "received_at", "status"), r, strict=True))
            for r in conn.execute(Q["device_quarantine"], p)
        ]  # fmt: skip
    events: list[dict[str, Any]] = []
    for c in commands:
        doc = f" {c['doc_kind']} v{c['doc_version']}" if c["doc_kind"] else ""
        events.append({"at": c["result_at"] or c["delivered_at"] or c["created_at"],
                       "kind": "command", "status": c["status"],
                       "text": f"{c['action']}{doc}", "note": c["reason"]})  # fmt: skip
    for s in syncs:
        events.append({"at": s["at"], "kind": "sync", "status": "applied",
                       "text": f"{s['entries']} outbox entries (seq {s['first']}-{s['last']})",
                       "note": ", ".join(s["topics"])})  # fmt: skip
    for q in held:
        events.append({"at": q["received_at"], "kind": "quarantine", "status": q["status"],
                       "text": f"{q['kind']} seq {q['seq']} quarantined",
                       "note": q["reason"]})  # fmt: skip
    for r in rollouts:
        events.append({"at": r["failed_at"] or r["healthy_at"] or r["applied_at"]
                       or r["notified_at"] or r["created_at"], "kind": "rollout",
                       "status": r["status"], "text": f"{r['kind']} rollout {r['rollout_id']}",
                       "note": r["last_error"], "rollout_id": r["rollout_id"]})  # fmt: skip
    events.sort(key=lambda e: e["at"] or 0, reverse=True)
    return {"commands": commands, "syncs": syncs, "rollouts": rollouts, "quarantine": held,
            "events": events[:limit]}  # fmt: skip


def controls(conn: Conn, rollout_id: str) -> list[dict[str, Any]]:
    return [
        dict(zip(("action", "by", "at", "reason", "detail"), r, strict=True))
        for r in conn.execute(Q["rollout_controls"], {"rollout_id": rollout_id})
    ]


_CLOUD_ROW = ("seq", "at", "actor", "actor_role", "action", "target", "detail", "prev_hash",
              "hash")  # fmt: skip


def cloud_rows_around(conn: Conn, seq: int, spread: int = 2) -> list[dict[str, Any]]:
    params = {"low": seq - spread, "high": seq + spread}
    return [
        dict(zip(_CLOUD_ROW, r, strict=True)) for r in conn.execute(Q["cloud_audit_around"], params)
    ]


def cloud_latest(
    conn: Conn, *, before: int | None, action: str | None, limit: int
) -> list[dict[str, Any]]:
    params = {"before": before, "action": action, "limit": limit}
    return [
        dict(zip(_CLOUD_ROW, r, strict=True)) for r in conn.execute(Q["cloud_audit_latest"], params)
    ]


def device_rows_around(
    conn: Conn, device_id: str, stream: str, chain: int, seq: int, spread: int = 2
) -> list[dict[str, Any]]:
    params = {"device_id": device_id, "stream": stream, "chain": chain, "low": seq - spread,
              "high": seq + spread}  # fmt: skip
    names = ("seq", "run_id", "event", "step", "at", "prev_hash", "hash")
    return [
        dict(zip(names, r, strict=True)) for r in conn.execute(Q["device_audit_around"], params)
    ]


__all__ = [
    "RECENT_S",
    "STALLED_OUTBOX_S",
    "Summary",
    "cloud_latest",
    "cloud_rows_around",
    "controls",
    "device_rows_around",
    "names",
    "summary",
    "timeline",
]
