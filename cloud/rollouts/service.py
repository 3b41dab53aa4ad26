"""Rollouts as the Fleet API sees them: make one, read it, page its devices, list them,
and the operators' controls -- each in the caller's transaction (``conn``), with its
record in the cloud audit log, so a route does its write and its record together::

    with ctx.transaction() as conn:
        rollout_id = service.create(conn, "config", request, who, at=now)
    engine.start(service.workflow_type("config"), {"rollout_id": rollout_id},
                 idempotency_key=f"rollout:{rollout_id}")

``create`` only plans (the rollout row, its waves and its devices, with a seeded
membership); the run (``cloud/workflows/*_rollout.yaml``, steps ``cloud.rollouts.steps``)
does every write that reaches a device. ``control`` records a request; the run acts on
it at its next poll (the API wakes it).

Refusals are ``cloud.documents.errors`` (``code``, ``field``, HTTP ``status``)::

    DocumentError
    ├── DocumentInvalid     invalid_document (422)   the content fails the terminal's model
    ├── BadRequest          invalid_request (422)    a request that is not one
    │   └── NoDevices       no_devices (422)         the target selects no active device
    ├── NotFound            rollout_not_found, document_not_found, release_not_found (404)
    ├── StaleVersion        stale_version (409)      a withdrawn version
    └── RolloutState        rollout_state (409)      a control the status does not allow
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from psycopg.types.json import Jsonb
from pydantic import ConfigDict, Field

from cloud.documents import service as documents
from cloud.documents.errors import BadRequest, DocumentError, DocumentInvalid, NotFound
from cloud.documents.validate import validate
from cloud.fleet.tokens import Principal
from cloud.rollouts import plan
from cloud.rollouts._sql import Conn, Q
from cloud.rollouts.options import RolloutOptions

RolloutKind = Literal["config", "policy", "release"]
Action = Literal["pause", "resume", "approve", "abort", "retry_failed"]

KINDS: tuple[RolloutKind, ...] = ("config", "policy", "release")
WORKFLOW_TYPES: dict[str, str] = {
    "config": "ConfigRollout",
    "policy": "PolicyRollout",
    "release": "ReleaseRollout",
}
#: Statuses a rollout ends in.
FINISHED = ("succeeded", "rolled_back", "failed")
DEVICE_STATUSES = ("planned", "held", "notified", "applied", "healthy", "failed", "refused",
                   "timed_out", "cancelled")  # fmt: skip
RESTORE_STATUSES = ("none", "pending", "notified", "restored", "failed", "timed_out")
MAX_PAGE = 1000


class NoDevices(BadRequest):
    code = "no_devices"


class RolloutState(DocumentError):
    """A control the rollout's status does not allow (or a second abort)."""

    code = "rollout_state"
    status = 409


class RolloutRequest(RolloutOptions):
    """The POST body: the options, and what to roll out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: config/policy: the new document's content (validated before anything is written)
    content: dict[str, Any] | None = None
    #: or an existing version to roll out (not withdrawn)
    version: int | None = Field(None, ge=1)
    #: release rollouts: the uploaded release's name
    release: str | None = Field(None, min_length=1, max_length=200)
    #: kept in the audit log
    reason: str | None = Field(None, max_length=1000)

    def options(self) -> RolloutOptions:
        data = self.model_dump(exclude={"content", "version", "release", "reason"})
        return RolloutOptions.model_validate(data)


def workflow_type(kind: RolloutKind) -> str:
    """The workflow that runs a rollout of ``kind``."""
    if kind not in WORKFLOW_TYPES:
        raise BadRequest(f"unknown rollout kind {kind!r}; one of: config, policy, release",
                         field="kind")  # fmt: skip
    return WORKFLOW_TYPES[kind]


def run_key(rollout_id: str) -> str:
    """The idempotency key its run is started with."""
    return f"rollout:{rollout_id}"


def _record(conn: Conn, who: Principal, action: str, rollout_id: str, detail: Mapping[str, Any],
            at: float) -> None:  # fmt: skip
    documents.record(conn, who, action, f"rollout:{rollout_id}", detail, at)


# --- create ---------------------------------------------------------------------------------


def check_content(kind: str, content: Any) -> dict[str, Any]:
    """The content as the terminal's model reads it (a policy without a version is
    checked as if it had the next one: the run writes the number in)."""
    if kind == "policy" and isinstance(content, Mapping) and content.get("version") is None:
        checked = validate("policy", {**content, "version": 1})
        checked.pop("version", None)
        return checked
    return validate(kind, content)  # type: ignore[arg-type]


def create(
    conn: Conn, kind: RolloutKind, request: RolloutRequest, who: Principal, *, at: float
) -> str:
    """Plan a rollout (pending): validate the request, select its devices, draw their
    waves with the seed (drawn when not given), and record ``rollout.create``. Nothing
    reaches a device until its run is started."""
    workflow_type(kind)
    content: dict[str, Any] | None = None
    if kind == "release":
        if request.content is not None or request.version is not None:
            field = "content" if request.content is not None else "version"
            raise BadRequest("a release rollout names the release only", field=field)
        if request.release is None:
            raise BadRequest("a release rollout names the uploaded release", field="release")
        if conn.execute(Q["release_row"], {"release": request.release}).fetchone() is None:
            raise NotFound("release_not_found", f"no release {request.release[:80]}",
                           field="release")  # fmt: skip
    else:
        if request.release is not None:
            raise BadRequest(f"a {kind} rollout names no release", field="release")
        if (request.content is None) == (request.version is None):
            raise BadRequest(f"give the {kind}'s content, or the version to roll out",
                             field="content")  # fmt: skip
        if request.content is not None:
            content = check_content(kind, request.content)
        else:
            assert request.version is not None
            documents.refuse_withdrawn(documents.get(conn, kind, request.version))
    options = request.options()
    seed = options.seed if options.seed is not None else plan.draw_seed()
    options = options.model_copy(update={"seed": seed})
    rows = conn.execute(Q["targets"], plan.selector_params(options.target)).fetchall()
    if not rows:
        raise NoDevices("the target selects no active device", field="target")
    sizes = plan.wave_sizes(options.waves, len(rows))
    waves = plan.membership([r[0] for r in rows], sizes, seed)
    rollout_id = "ro_" + secrets.token_hex(12)
    conn.execute(
        Q["insert_rollout"],
        {
            "rollout_id": rollout_id, "kind": kind, "options": Jsonb(options.model_dump()),
            "seed": seed, "content": None if content is None else Jsonb(content),
            "source_version": request.version, "release": request.release,
            "reason": request.reason, "at": at, "by": who.name,
        },
    )  # fmt: skip
    own = [sum(1 for w in waves.values() if w == n + 1) for n in range(len(sizes))]
    conn.execute(
        Q["insert_waves"],
        {"rollout_id": rollout_id, "waves": list(range(1, len(sizes) + 1)), "sizes": sizes,
         "targeted": own},
    )  # fmt: skip
    conn.execute(
        Q["insert_devices"],
        {"rollout_id": rollout_id, "device_ids": [r[0] for r in rows],
         "stores": [r[1] for r in rows], "groups": [r[2] for r in rows],
         "waves": [waves[r[0]] for r in rows]},
    )  # fmt: skip
    detail = {"kind": kind, "targeted": len(rows), "waves": sizes, "seed": seed,
              "version": request.version, "release": request.release,
              "reason": request.reason}  # fmt: skip
    _record(conn, who, "rollout.create", rollout_id, detail, at)
    return rollout_id


# --- reading --------------------------------------------------------------------------------

_COLUMNS = ("rollout_id", "kind", "status", "options", "seed", "content", "source_version",
            "release", "reason", "version", "run_id", "current_wave", "created_at",
            "created_by", "updated_at", "finished_at", "paused", "approved_through",
            "abort_requested", "abort", "finalized")  # fmt: skip


def row_dict(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(_COLUMNS, row, strict=True))


def load(conn: Conn, rollout_id: str, *, lock: bool = False) -> dict[str, Any]:
    """The rollout's row as a dict (``rollout_not_found``); ``lock``: FOR UPDATE."""
    query = Q["rollout_for_update"] if lock else Q["rollout"]
    row = conn.execute(query, {"rollout_id": rollout_id}).fetchone()
    if row is None:
        raise NotFound("rollout_not_found", f"no rollout {rollout_id[:80]}", field="rollout_id")
    return row_dict(row)


def _run(conn: Conn, rollout_id: str) -> tuple[str | None, str | None]:
    row = conn.execute(Q["run_of"], {"key": run_key(rollout_id)}).fetchone()
    return (None, None) if row is None else (str(row[0]), str(row[1]))


def _status(row: Mapping[str, Any], run_status: str | None) -> str:
    """The status as it reads: a run that ended without its rollout saying so (it
    failed for good, or was rolled back before a step of ours could record it)."""
    status = str(row["status"])
    if status in FINISHED or run_status is None:
        return status
    if run_status == "FAILED":
        return "failed"
    if run_status in ("ROLLED_BACK", "CANCELLED"):
        return "rolled_back"
    return status


def _counts(conn: Conn, rollout_id: str) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for wave, status, n in conn.execute(Q["status_counts"], {"rollout_id": rollout_id}):
        out.setdefault(int(wave), {})[str(status)] = int(n)
    return out


def _wave_view(number: int, size: int, targeted: int, status: str, started: Any, finished: Any,
               counts: Mapping[str, int]) -> dict[str, Any]:  # fmt: skip
    """A wave's counts: each status as devices stand now, ``notified`` every device that
    was sent the change, ``pending`` those without an outcome yet."""
    c = {s: int(counts.get(s, 0)) for s in DEVICE_STATUSES}
    commanded = sum(c[s] for s in ("notified", "applied", "healthy", "failed", "refused",
                                   "timed_out"))  # fmt: skip
    return {
        "wave": number, "size": size, "targeted": targeted, "notified": commanded,
        "applied": c["applied"] + c["healthy"], "healthy": c["healthy"],
        "failed": c["failed"], "refused": c["refused"], "timed_out": c["timed_out"],
        "pending": c["planned"] + c["held"] + c["notified"] + c["applied"],
        "held": c["held"], "cancelled": c["cancelled"], "status": status,
        "started_at": started, "finished_at": finished,
    }  # fmt: skip


def view(conn: Conn, rollout_id: str, *, now: float) -> dict[str, Any]:
    """Everything a rollout shows (the design's JSON): per wave its counts, the
    threshold and the rate now, why it aborted and how far the rollback has got; for a
    release, the bytes its devices reported downloading (``bytes_downloaded``)."""
    row = load(conn, rollout_id)
    run_id, run_status = _run(conn, rollout_id)
    options = RolloutOptions.model_validate(row["options"])
    counts = _counts(conn, rollout_id)
    waves = [
        _wave_view(int(w), int(size), int(t), str(st), sa, fa, counts.get(int(w), {}))
        for w, size, t, st, sa, fa in conn.execute(Q["waves"], {"rollout_id": rollout_id})
    ]
    total: dict[str, int] = {}
    for by_status in counts.values():
        for s, n in by_status.items():
            total[s] = total.get(s, 0) + n
    rate = plan.figures(total, options.abort)
    restores = dict.fromkeys(RESTORE_STATUSES, 0)
    for s, n in conn.execute(Q["restore_counts"], {"rollout_id": rollout_id}):
        restores[str(s)] = int(n)
    status = _status(row, run_status)
    rollback = None
    if row["abort"] is not None or status in ("aborting", "rolled_back"):
        to_restore = sum(n for s, n in restores.items() if s != "none")
        unsettled = restores["pending"] + restores["notified"]
        rollback = {
            "status": "done" if status in ("rolled_back", "failed") and not unsettled
            else "running",
            "to_restore": to_restore, "restored": restores["restored"],
            "failed": restores["failed"], "timed_out": restores["timed_out"],
            "pending": unsettled,
        }  # fmt: skip
    document: dict[str, Any] = {"kind": row["kind"], "version": row["version"]}
    downloads = None
    if row["kind"] == "release":
        document["release"] = row["release"]
        downloads = _downloads(release_bytes(conn, rollout_id))
    return {
        "rollout_id": row["rollout_id"], "kind": row["kind"], "status": status,
        "created_at": row["created_at"], "created_by": row["created_by"],
        "run_id": run_id or row["run_id"], "run_status": run_status,
        "updated_at": row["updated_at"], "finished_at": row["finished_at"],
        "document": document, "options": row["options"], "seed": int(row["seed"]),
        "reason": row["reason"], "current_wave": int(row["current_wave"]),
        "threshold": options.abort.model_dump(),
        "rate": {"failure_percent": rate.failure_percent, "failures": rate.failures,
                 "sampled": rate.sampled},
        "targeted": sum(w["targeted"] for w in waves),
        "waves": waves, "abort": row["abort"], "rollback": rollback,
        "finalized": row["finalized"], "bytes_downloaded": downloads,
        "controls": {"paused": bool(row["paused"]),
                     "approved_through": int(row["approved_through"]),
                     "abort_requested": bool(row["abort_requested"])},
    }  # fmt: skip


_DEVICE_FIELDS = ("device_id", "store", "group", "wave", "status", "previous_version",
                  "command_id", "notified_at", "applied_at", "healthy_at", "failed_at",
                  "last_error", "restore_status", "restore_command_id", "restored_at",
                  "previous_release", "restore_version", "late")  # fmt: skip


#: The largest byte count taken from a device's report (a bigint; more is not believed).
_MAX_BYTES = 2**63 - 1


def _byte_count(value: Any) -> int | None:
    """A device's ``bytes_downloaded`` as it reported it: a non-negative integer, else
    None (missing, or not a count: the payload is the device's, never trusted)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= _MAX_BYTES else None


def release_bytes(
    conn: Conn, rollout_id: str, device_ids: Sequence[str] | None = None
) -> dict[str, tuple[int | None, int | None]]:
    """device id -> the bytes its ``release_result`` reported downloading, for the
    rollout's command and for its restore (None: no result, or none yet), of the devices
    named or (None) every device of the rollout."""
    params = {"rollout_id": rollout_id, "devices": None if device_ids is None else list(device_ids)}
    return {
        str(device): (_byte_count(install), _byte_count(restore))
        for device, install, restore in conn.execute(Q["release_bytes"], params)
    }


def _downloads(found: Mapping[str, tuple[int | None, int | None]]) -> dict[str, Any]:
    """The rollout's bytes sent: over the devices that reported their install, the total,
    mean and max, and the total of the restores after a rollback."""
    sent = [install for install, _ in found.values() if install is not None]
    restores = [restore for _, restore in found.values() if restore is not None]
    return {
        "devices": len(sent),
        "total": sum(sent),
        "mean": round(sum(sent) / len(sent)) if sent else None,
        "max": max(sent) if sent else None,
        "restore_devices": len(restores),
        "restore_total": sum(restores),
    }


def _limit(limit: int, most: int = MAX_PAGE) -> int:
    if not 1 <= limit <= most:
        raise BadRequest(f"limit is 1-{most}", field="limit")
    return limit


def devices(
    conn: Conn,
    rollout_id: str,
    *,
    wave: int | None = None,
    status: str | None = None,
    after: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """A page of the rollout's devices by id (``next``: the cursor of the next page);
    a release rollout's with the bytes each reported downloading (``release_bytes``)."""
    row = load(conn, rollout_id)
    if status is not None and status not in DEVICE_STATUSES:
        raise BadRequest(f"unknown device status {status!r}", field="status")
    params = {"rollout_id": rollout_id, "wave": wave, "status": status, "after": after,
              "limit": _limit(limit)}  # fmt: skip
    items = [dict(zip(_DEVICE_FIELDS, r, strict=True))
             for r in conn.execute(Q["devices"], params)]  # fmt: skip
    found = {}
    if row["kind"] == "release" and items:
        found = release_bytes(conn, rollout_id, [item["device_id"] for item in items])
    for item in items:
        item["bytes_downloaded"], item["restore_bytes_downloaded"] = found.get(
            item["device_id"], (None, None)
        )
    return {"items": items, "next": items[-1]["device_id"] if len(items) == limit else None}


ROLLOUT_STATUSES = ("pending", "running", "paused", "awaiting_approval", "succeeded",
                    "aborting", "rolled_back", "failed")  # fmt: skip


def rollouts(
    conn: Conn,
    *,
    kind: str | None = None,
    status: str | None = None,
    after: str | None = None,
    limit: int = 50,
) -> dict[str, Any]:
    """Rollouts newest first, as summaries (``next``: the cursor of the next page)."""
    if kind is not None and kind not in KINDS:
        raise BadRequest(f"unknown rollout kind {kind!r}", field="kind")
    if status is not None and status not in ROLLOUT_STATUSES:
        raise BadRequest(f"unknown rollout status {status!r}", field="status")
    params = {"kind": kind, "status": status, "after": after, "limit": _limit(limit, 500)}
    items = []
    for r in conn.execute(Q["rollouts"], params).fetchall():
        row = row_dict(r)
        _, run_status = _run(conn, row["rollout_id"])
        targeted = sum(sum(c.values()) for c in _counts(conn, row["rollout_id"]).values())
        document: dict[str, Any] = {"kind": row["kind"], "version": row["version"]}
        if row["kind"] == "release":
            document["release"] = row["release"]
        items.append({
            "rollout_id": row["rollout_id"], "kind": row["kind"],
            "status": _status(row, run_status), "created_at": row["created_at"],
            "created_by": row["created_by"], "updated_at": row["updated_at"],
            "finished_at": row["finished_at"], "document": document,
            "current_wave": int(row["current_wave"]), "targeted": targeted,
            "abort": row["abort"],
        })  # fmt: skip
    return {"items": items, "next": items[-1]["rollout_id"] if len(items) == limit else None}


# --- controls -------------------------------------------------------------------------------

#: The statuses each control is taken in.
ALLOWED: dict[str, tuple[str, ...]] = {
    "pause": ("pending", "running", "awaiting_approval"),
    "resume": ("paused",),
    "approve": ("awaiting_approval",),
    "abort": ("pending", "running", "paused", "awaiting_approval"),
    "retry_failed": ("running", "paused", "succeeded"),
}


def _awaits_approval(conn: Conn, row: Mapping[str, Any]) -> bool:
    """Whether the run waits at a gate: its current wave is done, gated, not approved."""
    wave = int(row["current_wave"])
    gates = RolloutOptions.model_validate(row["options"]).gates.approve_after
    if wave not in gates or int(row["approved_through"]) >= wave:
        return False
    found = conn.execute(
        "SELECT status FROM rollout_waves WHERE rollout_id = %(id)s AND wave = %(wave)s",
        {"id": row["rollout_id"], "wave": wave},
    ).fetchone()
    last = conn.execute(
        "SELECT max(wave) FROM rollout_waves WHERE rollout_id = %(id)s", {"id": row["rollout_id"]}
    ).fetchone()
    return found is not None and found[0] == "done" and last is not None and wave < last[0]


def control(
    conn: Conn,
    rollout_id: str,
    action: Action,
    who: Principal,
    *,
    at: float,
    reason: str | None = None,
) -> dict[str, Any]:
    """Record an operator's request (``rollout_controls`` and ``rollout.<action>`` in the
    audit log) and the controls it sets; returns the view after. The run acts on it at
    its next poll (pause: no device notified, no wave advances; approve: the wave it
    waits after; abort: the saga rolls back; retry_failed: the failed, refused and
    timed-out devices are notified again -- by the run, or for a rollout that succeeded
    by the sweep's reconciler, which follows them as the run would). A request the
    status does not allow is ``RolloutState`` (409)."""
    if action not in ALLOWED:
        raise BadRequest(f"unknown control {action!r}; one of: {', '.join(ALLOWED)}",
                         field="action")  # fmt: skip
    row = load(conn, rollout_id, lock=True)
    _, run_status = _run(conn, rollout_id)
    status = _status(row, run_status)
    if status not in ALLOWED[action] or (action == "abort" and row["abort_requested"]):
        allowed = ", ".join(ALLOWED[action])
        raise RolloutState(
            f"rollout {rollout_id} is {status}"
            + ("; an abort is already requested" if row["abort_requested"] else "")
            + f": {action} is taken when it is {allowed}",
            field="action",
        )
    paused, approved = bool(row["paused"]), int(row["approved_through"])
    abort_requested, new_status = bool(row["abort_requested"]), status
    detail: dict[str, Any] = {}
    if action == "pause":
        paused, new_status = True, "paused"
    elif action == "resume":
        paused = False
        new_status = "running" if row["run_id"] else "pending"
        if row["run_id"] and _awaits_approval(conn, row):
            new_status = "awaiting_approval"
    elif action == "approve":
        approved, new_status = max(approved, int(row["current_wave"])), "running"
        detail["wave"] = approved
    elif action == "abort":
        abort_requested = True
    else:
        again = [r[0] for r in conn.execute(Q["retry_failed"], {"rollout_id": rollout_id})]
        detail["devices"] = len(again)
    conn.execute(
        Q["add_control"],
        {"rollout_id": rollout_id, "action": action, "by": who.name, "at": at,
         "reason": reason, "detail": Jsonb(detail)},
    )  # fmt: skip
    conn.execute(
        Q["set_controls"],
        {"rollout_id": rollout_id, "paused": paused, "approved_through": approved,
         "abort_requested": abort_requested, "status": new_status, "at": at},
    )  # fmt: skip
    _record(conn, who, f"rollout.{action}", rollout_id, {"reason": reason, **detail}, at)
    return view(conn, rollout_id, now=at)


__all__ = [
    "ALLOWED",
    "DEVICE_STATUSES",
    "KINDS",
    "WORKFLOW_TYPES",
    "Action",
    "DocumentInvalid",
    "NoDevices",
    "RolloutKind",
    "RolloutRequest",
    "RolloutState",
    "check_content",
    "control",
    "create",
    "devices",
    "load",
    "release_bytes",
    "rollouts",
    "run_key",
    "view",
    "workflow_type",
]
