"""Versioned config and policy documents, their scoped assignments, and the effective
document of a device, on PostgreSQL (the sync service's tables).

Every function works in the caller's transaction (``conn``), so a route or a workflow
step does its write and its record in the cloud audit log together::

    with ctx.transaction() as conn:
        a = assign(conn, "config", 7, "store", "s-12", who, at=ctx.clock.now())
    # compensation (a saga step's undo): put back what was there
    unassign(conn, a.kind, a.scope, a.value, who, at=..., restore=a.previous)

Versions only grow per kind (``sync_documents``; the same lock as the sync service's
``queue_command``, so the two never take one number twice). A new version is validated
with the terminal's model (``cloud.documents.validate``) before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloud.documents import scope as scopes
from cloud.documents._sql import Conn, Q
from cloud.documents.errors import BadRequest, DocumentInvalid, NotFound, StaleVersion
from cloud.documents.validate import KINDS, Kind, validate
from cloud.fleet import audit
from cloud.fleet.tokens import Principal
from cloud.sync.postgres import PostgresSyncTx
from sync import wire

#: The first key of the per-(kind, scope, value) assignment lock.
_ASSIGNMENT_LOCK = 0x7417_A55


@dataclass(frozen=True)
class DocumentVersion:
    kind: str
    version: int
    created_at: float
    content: dict[str, Any] | None = None
    #: When a rollout's compensation withdrew it (None: in use): never assigned again.
    withdrawn_at: float | None = None


@dataclass(frozen=True)
class Assignment:
    """A version assigned to a scope. ``value`` is '' for the fleet. ``previous``: the
    version this assignment replaced (None: there was none), what a compensation puts
    back."""

    assignment_id: int
    kind: str
    scope: str
    value: str
    version: int
    assigned_at: float
    assigned_by: str
    previous: int | None = None

    @property
    def target(self) -> str:
        """How the audit log names it: ``config:store:s-12``, ``policy:fleet``."""
        return f"{self.kind}:{self.scope}" + (f":{self.value}" if self.value else "")


@dataclass(frozen=True)
class Effective:
    """The document a device follows (``assignment`` None: none of that kind names it)
    and the version its latest heartbeat says it runs."""

    device_id: str
    kind: str
    place: scopes.Place
    assignment: Assignment | None
    content: dict[str, Any] | None
    in_force: int | None

    @property
    def version(self) -> int | None:
        return None if self.assignment is None else self.assignment.version

    @property
    def in_sync(self) -> bool:
        """Whether the device runs what it should (nothing assigned: trivially)."""
        return self.version is None or self.version == self.in_force


def check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise BadRequest(f"unknown document kind {kind!r}; one of: config, policy", field="kind")
    return kind


def record(
    conn: Conn, who: Principal, action: str, target: str, detail: Mapping[str, Any], at: float
) -> None:
    """One row in the cloud audit log, in ``conn``'s transaction (as ``ctx.record``)."""
    audit.append(
        conn, actor=who.name, actor_token=who.token_id, actor_role=who.role,
        action=action, target=target, detail=detail, at=at,
    )  # fmt: skip


# --- documents -----------------------------------------------------------------------------


def create(
    conn: Conn,
    kind: str,
    content: Any,
    who: Principal,
    *,
    at: float,
    version: int | None = None,
) -> DocumentVersion:
    """A new version of ``kind``, validated with the terminal's model; recorded
    (``document.create``). ``version``: the one to take (above every other), else the
    next free one -- for a policy, the version its content states, else the next free
    one written into it (a terminal holds the two equal). Nothing is written when the
    content is refused (``DocumentInvalid``) or the version is not new (``StaleVersion``)."""
    kind = check_kind(kind)
    head = PostgresSyncTx(conn).documents_head(kind)  # holds the kind's lock
    if kind == "policy" and isinstance(content, Mapping):
        own = content.get("version")
        if own is not None and version is not None and own != version:
            raise DocumentInvalid(
                [("content.version", f"the policy says version {own}, the request {version}")]
            )
        if own is None:
            content = {**content, "version": version or head + 1}
    checked = validate(kind, content)
    if kind == "policy":
        number = int(checked["version"])
    else:
        number = version if version is not None else head + 1
    if number <= head:
        raise StaleVersion(
            f"{kind} version {number} is not above the newest ({head})",
            field="version",
            hint="leave the version out to take the next one; a rollback is a new version "
            "with the old content",
        )
    if number > wire.MAX_INT64:
        raise BadRequest(f"a version is at most {wire.MAX_INT64}", field="version")
    PostgresSyncTx(conn).add_document(kind, number, checked, at)
    record(conn, who, "document.create", f"{kind}:{number}", {"kind": kind, "version": number}, at)
    return DocumentVersion(kind, number, at, checked)


def get(conn: Conn, kind: str, version: int) -> DocumentVersion:
    kind = check_kind(kind)
    row = conn.execute(Q["document"], {"kind": kind, "version": version}).fetchone()
    if row is None:
        raise NotFound("document_not_found", f"no {kind} version {version}", field="version")
    withdrawn = None if row[4] is None else float(row[4])
    return DocumentVersion(row[0], int(row[1]), float(row[3]), dict(row[2]), withdrawn)


def withdraw(conn: Conn, kind: str, version: int, who: Principal, *, at: float) -> bool:
    """Withdraw ``kind`` ``version`` (a rollout's compensation): it keeps its number
    (versions only grow), is never assigned or rolled out again, and the withdrawal is
    recorded (``document.withdraw``). Kinds: config, policy and release. Returns False
    when it was withdrawn already (nothing recorded: safe to run twice)."""
    if kind not in (*KINDS, "release"):
        raise BadRequest(f"unknown document kind {kind!r}", field="kind")
    row = conn.execute(Q["withdraw_document"], {"kind": kind, "version": version, "at": at})
    done = row.fetchone()
    if done is None:
        exists = conn.execute(Q["document_exists"], {"kind": kind, "version": version})
        if exists.fetchone() is None:
            raise NotFound("document_not_found", f"no {kind} version {version}", field="version")
        return False
    record(conn, who, "document.withdraw", f"{kind}:{version}", {"kind": kind, "version": version},
           at)  # fmt: skip
    return True


def refuse_withdrawn(found: DocumentVersion) -> None:
    """A withdrawn version is not assigned nor rolled out (``withdrawn_version``, 409)."""
    if found.withdrawn_at is not None:
        raise StaleVersion(
            f"{found.kind} version {found.version} was withdrawn",
            field="version",
            hint="a withdrawn version is kept for the record only; create a new one",
        )


def versions(
    conn: Conn, kind: str, *, after: int | None = None, limit: int = 100
) -> list[DocumentVersion]:
    """Versions of ``kind``, newest first, below ``after`` (without their content)."""
    kind = check_kind(kind)
    params = {"kind": kind, "after": after, "limit": limit}
    rows = conn.execute(Q["documents"], params).fetchall()
    return [DocumentVersion(r[0], int(r[1]), float(r[2])) for r in rows]


# --- assignments ---------------------------------------------------------------------------


def _assignment(row: Sequence[Any], previous: int | None = None) -> Assignment:
    return Assignment(
        int(row[0]), row[1], row[2], row[3], int(row[4]), float(row[5]), row[6], previous
    )


def _where(kind: str, scope: str, value: str | None) -> tuple[Kind, str, str]:
    kind = check_kind(kind)
    try:
        return kind, scope, scopes.normal_value(scope, value)
    except ValueError as exc:
        field = "scope" if scope not in scopes.SCOPES else "value"
        raise BadRequest(str(exc), field=field) from None


def _lock(conn: Conn, kind: str, scope: str, value: str) -> None:
    params = {"lock": _ASSIGNMENT_LOCK, "kind": kind, "scope": scope, "value": value}
    conn.execute(Q["lock_assignment"], params)


def assign(
    conn: Conn,
    kind: str,
    version: int,
    scope: str,
    value: str | None,
    actor: Principal,
    *,
    at: float,
) -> Assignment:
    """Assign ``kind`` ``version`` to (``scope``, ``value``), replacing what was there,
    and record it (``document.assign``) in the same transaction. The version must exist
    (``document_not_found``); a device scope must name a device (``device_not_found``).
    The result's ``previous`` is what ``unassign(..., restore=previous)`` puts back: the
    compensation of this step in a saga."""
    kind, scope, value = _where(kind, scope, value)
    refuse_withdrawn(get(conn, kind, version))
    if scope == "device" and conn.execute(Q["place"], {"device_id": value}).fetchone() is None:
        raise NotFound("device_not_found", f"no device {value[:80]}", field="value")
    _lock(conn, kind, scope, value)
    was = conn.execute(Q["assignment"], {"kind": kind, "scope": scope, "value": value}).fetchone()
    previous = None if was is None else int(was[4])
    params = {"kind": kind, "scope": scope, "value": value, "version": version, "at": at,
              "by": actor.name}  # fmt: skip
    row = conn.execute(Q["put_assignment"], params).fetchone()
    assert row is not None
    made = _assignment(row, previous)
    record(conn, actor, "document.assign", made.target,
           {"version": version, "previous": previous}, at)  # fmt: skip
    return made


def unassign(
    conn: Conn,
    kind: str,
    scope: str,
    value: str | None,
    actor: Principal,
    *,
    at: float,
    restore: int | None = None,
) -> Assignment | None:
    """Remove the assignment of (``scope``, ``value``) -- or, with ``restore``, put that
    version back in its place -- and record it (``document.unassign``). Returns what was
    removed (None: nothing was assigned there, and nothing is recorded unless a version
    is restored). ``assign``'s compensation: ``restore=assignment.previous``."""
    kind, scope, value = _where(kind, scope, value)
    _lock(conn, kind, scope, value)
    if restore is not None:
        was = conn.execute(
            Q["assignment"], {"kind": kind, "scope": scope, "value": value}
        ).fetchone()
        get(conn, kind, restore)
        params = {"kind": kind, "scope": scope, "value": value, "version": restore, "at": at,
                  "by": actor.name}  # fmt: skip
        conn.execute(Q["put_assignment"], params)
        gone = None if was is None else _assignment(was)
    else:
        row = conn.execute(
            Q["delete_assignment"], {"kind": kind, "scope": scope, "value": value}
        ).fetchone()
        gone = None if row is None else _assignment(row)
    if gone is not None or restore is not None:
        target = f"{kind}:{scope}" + (f":{value}" if value else "")
        detail = {"version": None if gone is None else gone.version, "restored": restore}
        record(conn, actor, "document.unassign", target, detail, at)
    return gone


def current(conn: Conn, kind: str, scope: str, value: str | None) -> Assignment | None:
    """What is assigned to (``scope``, ``value``) now (None: nothing)."""
    kind, scope, value = _where(kind, scope, value)
    row = conn.execute(Q["assignment"], {"kind": kind, "scope": scope, "value": value}).fetchone()
    return None if row is None else _assignment(row)


def assignment_by_id(conn: Conn, kind: str, assignment_id: int) -> Assignment:
    kind = check_kind(kind)
    row = conn.execute(
        Q["assignment_by_id"], {"kind": kind, "assignment_id": assignment_id}
    ).fetchone()
    if row is None:
        raise NotFound(
            "assignment_not_found", f"no {kind} assignment {assignment_id}", field="assignment_id"
        )
    return _assignment(row)


def assignments(
    conn: Conn,
    kind: str,
    *,
    scope: str | None = None,
    value: str | None = None,
    version: int | None = None,
    after: int | None = None,
    limit: int = 100,
) -> list[Assignment]:
    kind = check_kind(kind)
    if scope is not None and scope not in scopes.SCOPES:
        raise BadRequest(f"unknown scope {scope!r}", field="scope")
    params = {"kind": kind, "scope": scope, "value": value, "version": version,
              "after": after, "limit": limit}  # fmt: skip
    return [_assignment(r) for r in conn.execute(Q["assignments"], params).fetchall()]


# --- the effective document ----------------------------------------------------------------


def place(conn: Conn, device_id: str) -> tuple[scopes.Place, dict[str, int | None]]:
    """Where the device sits, and the versions its latest heartbeat reports in force."""
    row = conn.execute(Q["place"], {"device_id": device_id}).fetchone()
    if row is None:
        raise NotFound("device_not_found", f"no device {device_id[:80]}", field="device_id")
    in_force = {"config": None if row[4] is None else int(row[4]),
                "policy": None if row[5] is None else int(row[5])}  # fmt: skip
    return scopes.Place(row[0], row[1], row[2]), in_force


def effective(conn: Conn, device_id: str, kind: str) -> Effective:
    """The document ``device_id`` follows (``cloud.documents.scope``: device > store >
    group > fleet), with its content, and the version the device reports running."""
    kind = check_kind(kind)
    where, in_force = place(conn, device_id)
    params = {"kind": kind, "device_id": where.device_id, "store": where.store,
              "group": where.group}  # fmt: skip
    found = [_assignment(r) for r in conn.execute(Q["candidates"], params).fetchall()]
    chosen = scopes.effective(found, where)
    content = None if chosen is None else get(conn, kind, chosen.version).content
    return Effective(device_id, kind, where, chosen, content, in_force[kind])


__all__ = [
    "Assignment",
    "DocumentVersion",
    "Effective",
    "assign",
    "assignment_by_id",
    "assignments",
    "check_kind",
    "create",
    "current",
    "effective",
    "get",
    "place",
    "record",
    "refuse_withdrawn",
    "unassign",
    "versions",
    "withdraw",
]
