"""Devices as operators query them: filtered and paged in SQL (every filter a bound
parameter), with the latest heartbeat, tags, chains and open quarantine; tags and
groups changed; a device's audit rows paged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud.fleet._sql import Conn, Q

#: The health a device list filters on: the storage state of its latest heartbeat, or
#: ``unknown`` before its first.
HEALTH_STATES = ("ok", "high_water", "full", "unknown")


@dataclass(frozen=True)
class DeviceFilter:
    store: str | None = None
    group: str | None = None
    tag: str | None = None
    binary_version: str | None = None
    config_version: int | None = None
    policy_version: int | None = None
    health: str | None = None
    status: str | None = None
    seen_before: float | None = None
    seen_after: float | None = None

    def params(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for name in ("config_version", "policy_version"):  # compared as the JSON text
            out[name] = None if out[name] is None else str(out[name])
        return out


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    store: str
    group: str | None
    status: str
    enrolled_at: float
    revoked_at: float | None
    binary_version: str | None
    config_version: int | None
    policy_version: int | None
    health: str
    last_seen_at: float | None
    tags: list[str] = field(default_factory=list)


def devices(
    conn: Conn,
    where: DeviceFilter,
    *,
    after: str | None = None,
    device_id: str | None = None,
    limit: int = 100,
) -> list[DeviceRow]:
    params = where.params() | {"after": after, "device_id": device_id, "limit": limit}
    return [_device(r) for r in conn.execute(Q["devices"], params).fetchall()]


def _device(r: Sequence[Any]) -> DeviceRow:
    return DeviceRow(
        r[0], r[1], r[2], r[3], float(r[4]), r[5], r[6],
        None if r[7] is None else int(r[7]), None if r[8] is None else int(r[8]),
        r[9], r[10], list(r[11]),
    )  # fmt: skip


def device(conn: Conn, device_id: str) -> DeviceRow | None:
    found = devices(conn, DeviceFilter(), device_id=device_id, limit=1)
    return found[0] if found else None


@dataclass(frozen=True)
class DeviceMore:
    hardware: dict[str, Any]
    conflicts: int
    rotated_at: float | None
    heartbeat: dict[str, Any] | None
    stream: str | None
    open_quarantine: int
    chains: list[dict[str, Any]]


def more(conn: Conn, device_id: str) -> DeviceMore | None:
    row = conn.execute(Q["device_more"], {"device_id": device_id}).fetchone()
    if row is None:
        return None
    names = ("stream", "chain", "base_seq", "head_seq", "state", "first_bad_seq", "reason",
             "broken_at", "updated_at")  # fmt: skip
    chains = [
        dict(zip(names, c, strict=True))
        for c in conn.execute(Q["device_chains"], {"device_id": device_id}).fetchall()
    ]
    return DeviceMore(dict(row[0] or {}), int(row[1]), row[2], row[3], row[4], int(row[5]), chains)


def lock(conn: Conn, device_id: str) -> tuple[str | None] | None:
    """The device's (group,), its row locked; None: no such device."""
    row = conn.execute(Q["device_lock"], {"device_id": device_id}).fetchone()
    return None if row is None else (row[0],)


def move(conn: Conn, device_id: str, group: str | None) -> None:
    conn.execute(Q["move_device"], {"device_id": device_id, "group": group})


def add_tag(conn: Conn, device_id: str, tag: str, at: float) -> bool:
    """Tag the device; False: it had the tag."""
    params = {"device_id": device_id, "tag": tag, "at": at}
    return conn.execute(Q["add_tag"], params).fetchone() is not None


def remove_tag(conn: Conn, device_id: str, tag: str) -> bool:
    """Untag the device; False: it did not have the tag."""
    params = {"device_id": device_id, "tag": tag}
    return conn.execute(Q["remove_tag"], params).fetchone() is not None


def tags(conn: Conn, device_id: str) -> list[str]:
    return [r[0] for r in conn.execute(Q["device_tags"], {"device_id": device_id}).fetchall()]


def groups(
    conn: Conn, *, after: str | None, store: str | None, limit: int
) -> list[tuple[str, int]]:
    params = {"after": after, "store": store, "limit": limit}
    return [(r[0], int(r[1])) for r in conn.execute(Q["groups"], params).fetchall()]


def stores(conn: Conn, *, after: str | None, limit: int) -> list[tuple[str, int]]:
    params = {"after": after, "limit": limit}
    return [(r[0], int(r[1])) for r in conn.execute(Q["stores"], params).fetchall()]


@dataclass(frozen=True)
class DeviceAuditRow:
    stream: str
    chain: int
    seq: int
    run_id: str | None
    event: str
    step: str | None
    detail: dict[str, Any]
    at: float
    prev_hash: str
    hash: str
    version: int

    def cursor(self) -> str:
        return f"{self.stream}:{self.chain}:{self.seq}"


def parse_audit_cursor(cursor: str | None) -> tuple[str, int, int] | None:
    """(stream, chain, seq) of a cursor ``STREAM:CHAIN:SEQ``; None: not one."""
    if cursor is None:
        return ("", -1, 0)
    parts = cursor.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    if len(parts[1]) > 18 or len(parts[2]) > 18:
        return None
    return parts[0], int(parts[1]), int(parts[2])


def audit_rows(
    conn: Conn,
    device_id: str,
    *,
    stream: str | None,
    chain: int | None,
    after: tuple[str, int, int],
    limit: int,
) -> list[DeviceAuditRow]:
    params = {
        "device_id": device_id, "stream": stream, "chain": chain, "a_stream": after[0],
        "a_chain": after[1], "a_seq": after[2], "limit": limit,
    }  # fmt: skip
    rows = conn.execute(Q["device_audit"], params).fetchall()
    return [_audit(r) for r in rows]


def _audit(r: Sequence[Any]) -> DeviceAuditRow:
    return DeviceAuditRow(
        r[0], int(r[1]), int(r[2]), r[3], r[4], r[5], r[6], float(r[7]), r[8], r[9], int(r[10])
    )
