"""The rollout workflows' steps (``cloud/workflows/{config,policy,release}_rollout.yaml``).

Every step is one transaction on the control plane's database, under the rollout row's
lock, and safe to run again: a crash between its commit and the engine's step commit
re-runs it, and it reads what it recorded instead of doing it twice. In particular a
device is commanded once per version: a device is picked only while its
``rollout_devices.command_id`` is NULL, and that id is written in the transaction that
queues the command.

    validate        the request again, as the run sees it; the run id recorded
    create_version  the new document version (config, policy, release), or the one given
      ↺ withdraw_version   withdrawn (kept, never sent again); the rollout rolled_back
    broadcast       per wave: notify its devices (windows, rate, pause), a device-scope
                    assignment each, one batch of commands
      ↺ restore_wave  cancel what was not delivered; every device that may hold the
                    change gets a new version with its previous content, its assignment
                    back; followed until each restore settles (a retryable failure
                    while any is pending: the engine polls it, durably)
    poll_wave       notify held devices, follow every device (set-based SQL over
                    rollout_devices, commands, device_health), time out the silent,
                    evaluate the threshold; ``wave_done`` once nothing is pending or it
                    passed the threshold (or an operator aborted)
    check_wave      past the threshold (or aborted): the reason recorded, then a failure
                    for good, which starts the saga; else the wave done, and its gate
    poll_approval   waits for ``approve`` after a gated wave
    finalize        the version assigned at the selector's place (fleet, group, store),
                    the rollout succeeded

What the steps need from ``ctx.services`` (an object or a mapping): ``pool`` (a
psycopg_pool pool of autocommit connections) or ``settings`` (``CloudSettings`` with a
``database_url``); ``signing_key`` (the command-signing key) or ``settings`` to load it
from (``settings.key_path()``).

The cloud keeps no process-local cache of compiled fraud policies (a terminal compiles
its policy; the cloud only stores and validates documents), so withdrawing a policy
version is the whole of Persist_Policy's compensation: there is no cache to drop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.types.json import Jsonb

from cloud.documents import service as documents
from cloud.documents.errors import DocumentError
from cloud.fleet.tokens import Principal
from cloud.rollouts import plan
from cloud.rollouts import service as rollouts
from cloud.rollouts._sql import Conn, Q
from cloud.rollouts.options import RolloutOptions
from cloud.settings import CloudSettings
from cloud.stepservices import service, transaction
from cloud.sync.keys import load_key
from cloud.sync.postgres import UNAVAILABLE, PostgresSyncTx
from edge.engine import StepContext
from edge.errors import ConfigError, StepError
from sync import wire
from sync.server import BackendUnavailable, ServiceError, SyncService
from sync.server_records import CommandBatch, CommandTarget, NewDocument

log = logging.getLogger(__name__)

State = dict[str, Any]

#: The command that carries each kind, and the heartbeat field that reports it in force.
ACTION = {"config": "update_config", "policy": "activate_policy", "release": "install_release"}
FIELD = {"config": "config_version", "policy": "policy_version", "release": "config_version"}


#: A fault of the database's own: the step is tried again.
_FAULTS: tuple[type[BaseException], ...] = (*UNAVAILABLE, BackendUnavailable)


# --- what the steps run on --------------------------------------------------------------


def _key(ctx: StepContext) -> Ed25519PrivateKey:
    key = service(ctx, "signing_key")
    if isinstance(key, Ed25519PrivateKey):
        return key
    settings = service(ctx, "settings")
    if not isinstance(settings, CloudSettings):
        raise StepError("no signing key and no settings to find one", retryable=True)
    try:
        return load_key(settings.key_path())
    except ConfigError as exc:
        raise StepError(f"cannot sign: {exc}", retryable=True, hint=exc.hint) from exc


class _InTransaction:
    """A ``SyncBackend`` whose transactions are savepoints of the step's transaction."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PostgresSyncTx]:
        with self.conn.transaction():
            yield PostgresSyncTx(self.conn)

    def schema_versions(self) -> dict[str, int]:
        return {}


def _sync(conn: Conn, ctx: StepContext) -> SyncService:
    return SyncService(_InTransaction(conn), ctx.clock, _key(ctx))


def _rollout_id(ctx: StepContext, state: Mapping[str, Any]) -> str:
    source = {**(ctx.input if isinstance(ctx.input, Mapping) else {}), **state}
    rollout_id = source.get("rollout_id")
    if not isinstance(rollout_id, str):
        raise StepError("the run's input names no rollout_id", retryable=False)
    return rollout_id


def _who(row: Mapping[str, Any], ctx: StepContext) -> Principal:
    """Who the audit log names: the operator who made the rollout, through this run."""
    return Principal(token_id=f"run:{ctx.run_id}", name=str(row["created_by"])[:200],
                     role="operator")  # fmt: skip


def _record(conn: Conn, row: Mapping[str, Any], ctx: StepContext, action: str,
            detail: Mapping[str, Any]) -> None:  # fmt: skip
    rollouts._record(conn, _who(row, ctx), action, row["rollout_id"], detail, ctx.clock.now())


def _options(row: Mapping[str, Any]) -> RolloutOptions:
    return RolloutOptions.model_validate(row["options"])


# --- documents of every kind ---------------------------------------------------------------


def _new_document(
    conn: Conn,
    kind: str,
    content: Mapping[str, Any],
    who: Principal,
    at: float,
    *,
    renumber: bool = True,
) -> int:
    """A new version of ``kind`` with ``content``: config and policy through the
    documents service (validated with the terminal's model, recorded); a release as a
    ``wire.ReleaseContent``, under the same per-kind lock, recorded the same way.
    ``renumber``: a policy's own version is dropped for the next free one (a restore
    of an older policy's content); else a policy that states one takes it."""
    if kind in ("config", "policy"):
        body = dict(content)
        if kind == "policy" and renumber:
            body.pop("version", None)  # the next free one is written in
        return documents.create(conn, kind, body, who, at=at).version
    checked = wire.ReleaseContent.model_validate(dict(content)).model_dump(mode="json")
    tx = PostgresSyncTx(conn)
    number = tx.documents_head("release") + 1
    tx.add_document("release", number, checked, at)
    documents.record(conn, who, "document.create", f"release:{number}",
                     {"kind": "release", "version": number}, at)  # fmt: skip
    return number


def _content(conn: Conn, kind: str, version: int) -> dict[str, Any]:
    row = conn.execute(Q["document_row"], {"kind": kind, "version": version}).fetchone()
    if row is None:
        raise StepError(f"no {kind} version {version}", retryable=False)
    return dict(row[0])


def _release_content(conn: Conn, release: str) -> dict[str, Any] | None:
    """A release's ``ReleaseContent`` from the uploaded release (``cloud.releases``), else
    from the newest release document that names it."""
    row = conn.execute(Q["release_row"], {"release": release}).fetchone()
    if row is not None:
        return {"release": row[0], "manifest_sha256": row[1], "files": int(row[2]),
                "bytes": int(row[3])}  # fmt: skip
    doc = conn.execute(Q["release_document_of"], {"release": release}).fetchone()
    return None if doc is None else dict(doc[1])


# --- validate and the version --------------------------------------------------------------


def _fail_rollout(conn: Conn, rollout_id: str, at: float, status: str = "failed") -> None:
    conn.execute(Q["set_status"], {"rollout_id": rollout_id, "status": status, "at": at,
                                   "finished_at": at})  # fmt: skip


def validate(state: State, ctx: StepContext) -> State:
    """The request checked again as the run sees it (a version withdrawn since, a
    release gone); the run id recorded and the rollout running. A refusal fails the
    rollout for good before anything is written; so does an abort asked before it ran."""
    rollout_id = _rollout_id(ctx, state)
    now = ctx.clock.now()
    problem: str | None = None
    with transaction(ctx, _FAULTS) as conn:
        row = rollouts.load(conn, rollout_id, lock=True)
        conn.execute(Q["set_started"], {"rollout_id": rollout_id, "run_id": ctx.run_id,
                                        "at": now})  # fmt: skip
        kind = str(row["kind"])
        try:
            if row["abort_requested"]:
                raise StepError("aborted by an operator before it started", retryable=False)
            if kind == "release":
                if conn.execute(Q["release_row"], {"release": row["release"]}).fetchone() is None:
                    raise StepError(f"no release {row['release']}", retryable=False)
            elif row["content"] is not None:
                rollouts.check_content(kind, row["content"])
            else:
                found = documents.get(conn, kind, int(row["source_version"]))
                documents.refuse_withdrawn(found)
        except (DocumentError, StepError) as exc:
            problem = exc.message if isinstance(exc, StepError) else f"{exc.code}: {exc.message}"
            abort = {"criterion": "invalid" if not row["abort_requested"] else "operator",
                     "wave": 0, "figures": None, "at": now, "by": row["created_by"],
                     "reason": problem}  # fmt: skip
            conn.execute(Q["set_abort"], {"rollout_id": rollout_id, "abort": Jsonb(abort),
                                          "at": now})  # fmt: skip
            _fail_rollout(conn, rollout_id, now,
                          "rolled_back" if row["abort_requested"] else "failed")  # fmt: skip
        waves = [int(w[0]) for w in conn.execute(Q["waves"], {"rollout_id": rollout_id})]
    if problem is not None:
        raise StepError(f"rollout {rollout_id}: {problem}", retryable=False)
    return {"rollout_id": rollout_id, "kind": kind, "waves": waves, "last_wave": max(waves),
            "wave_done": False, "awaiting": False}  # fmt: skip


def create_version(state: State, ctx: StepContext) -> State:
    """The version rolled out: a new one with the request's content (config, policy),
    the uploaded release's document (release), or the existing one named. Once
    recorded on the rollout, a re-run returns it."""
    rollout_id = _rollout_id(ctx, state)
    now = ctx.clock.now()
    with transaction(ctx, _FAULTS) as conn:
        row = rollouts.load(conn, rollout_id, lock=True)
        if row["version"] is not None:
            return {"version": int(row["version"])}
        kind = str(row["kind"])
        who = _who(row, ctx)
        if kind == "release":
            content = _release_content(conn, str(row["release"]))
            if content is None:
                raise StepError(f"no release {row['release']}", retryable=False)
            version = _new_document(conn, "release", content, who, now)
        elif row["content"] is not None:
            version = _new_document(conn, kind, row["content"], who, now, renumber=False)
        else:
            version = int(row["source_version"])
        conn.execute(Q["set_version"], {"rollout_id": rollout_id, "version": version, "at": now})
        _record(conn, row, ctx, "rollout.version", {"kind": kind, "version": version})
    log.info("rollout %s: %s version %d", rollout_id, kind, version,
             extra={"action": "rollout_version", "run_id": ctx.run_id})  # fmt: skip
    return {"version": version}


def withdraw_version(state: State, ctx: StepContext) -> State:
    """Create_Config_Version's (Persist_Policy's) compensation, the last of the saga:
    the version this rollout made is withdrawn (one it was given is left alone), the
    devices of waves never started cancelled, and the rollout is rolled back."""
    rollout_id = _rollout_id(ctx, state)
    now = ctx.clock.now()
    with transaction(ctx, _FAULTS) as conn:
        row = rollouts.load(conn, rollout_id, lock=True)
        if row["version"] is not None and row["source_version"] is None:
            documents.withdraw(conn, str(row["kind"]), int(row["version"]), _who(row, ctx),
                               at=now)  # fmt: skip
        conn.execute(Q["cancel_unstarted"], {"rollout_id": rollout_id, "at": now})
        conn.execute(Q["abort_unstarted"], {"rollout_id": rollout_id, "at": now})
        _fail_rollout(conn, rollout_id, now, "rolled_back")
    return {"withdrawn": row["version"] if row["source_version"] is None else None}


# --- notifying ------------------------------------------------------------------------------


def _notify(conn: Conn, row: Mapping[str, Any], wave: int, ctx: StepContext) -> int:
    """Command the devices of the waves through ``wave`` not commanded yet, as the
    windows and the rate allow now (the others held); each gets a device-scope
    assignment of the version and one command, in this transaction. Returns how many."""
    if row["paused"] or row["abort_requested"] or row["version"] is None:
        return 0
    rollout_id, kind, version = str(row["rollout_id"]), str(row["kind"]), int(row["version"])
    options = _options(row)
    now = ctx.clock.now()
    rows = conn.execute(Q["to_notify"], {"rollout_id": rollout_id, "wave": wave}).fetchall()
    if not rows:
        return 0
    open_ = plan.open_stores(options.windows, (r[1] for r in rows), now)
    allowed = [str(r[0]) for r in rows if r[1] in open_]
    since = now - plan.RATE_WINDOW_S
    recent = conn.execute(Q["notified_since"], {"rollout_id": rollout_id, "since": since})
    last_minute = int(recent.fetchone()[0])  # type: ignore[index]
    chosen = allowed[: plan.quota(options.rate_per_minute, last_minute, len(allowed))]
    held = sorted({str(r[0]) for r in rows} - set(chosen))
    if held:
        conn.execute(Q["hold"], {"rollout_id": rollout_id, "device_ids": held})
    if not chosen:
        return 0
    before = {
        str(r[0]): (r[1], r[2], r[3])
        for r in conn.execute(Q["effective_versions"], {"kind": kind, "device_ids": chosen})
    }
    content = _content(conn, kind, version)
    try:
        batch: CommandBatch | None = _sync(conn, ctx).queue_commands(
            CommandTarget(device_ids=tuple(chosen)), ACTION[kind],
            NewDocument(content, kind, version),  # type: ignore[arg-type]
            ttl_s=options.device_timeout_s,
        )  # fmt: skip
    except ServiceError as exc:
        if exc.code != "no_devices":
            raise StepError(f"{exc.code}: {exc.message}", retryable=False) from exc
        batch = None
    commanded = {} if batch is None else {c.device_id: c.command_id for c in batch.commands}
    gone = sorted(set(chosen) - set(commanded))
    if gone:  # revoked since the rollout was planned: nothing can reach them
        conn.execute(
            "UPDATE rollout_devices SET status = 'cancelled', last_error = 'device revoked' "
            "WHERE rollout_id = %(rollout_id)s AND device_id = ANY(%(ids)s::text[])",
            {"rollout_id": rollout_id, "ids": gone},
        )
    ids = sorted(commanded)
    if not ids:
        return 0
    conn.execute(Q["assign_devices"], {"kind": kind, "version": version, "device_ids": ids,
                                       "at": now, "by": f"rollout:{rollout_id}"})  # fmt: skip
    conn.execute(
        Q["mark_notified"],
        {
            "rollout_id": rollout_id, "at": now, "device_ids": ids,
            "command_ids": [commanded[d] for d in ids],
            "previous": [before.get(d, (None, None, None))[0] for d in ids],
            "assignments": [before.get(d, (None, None, None))[1] for d in ids],
            "releases": [before.get(d, (None, None, None))[2] for d in ids],
        },
    )  # fmt: skip
    assert batch is not None
    _record(conn, row, ctx, "rollout.notify",
            {"wave": wave, "devices": len(ids), "batch_id": batch.batch_id,
             "version": version, "held": len(held)})  # fmt: skip
    log.info("rollout %s wave %d: %d device(s) notified, %d held", rollout_id, wave, len(ids),
             len(held), extra={"action": "rollout_notified", "run_id": ctx.run_id})  # fmt: skip
    return len(ids)


def broadcast(state: State, ctx: StepContext) -> State:
    """Broadcast_To_Fleet, per wave (the loop's item): the wave started, its devices
    notified as the windows and rate allow. Its output names the wave (what its
    compensation restores)."""
    rollout_id = _rollout_id(ctx, state)
    wave = int(ctx.item)
    now = ctx.clock.now()
    with transaction(ctx, _FAULTS) as conn:
        row = rollouts.load(conn, rollout_id, lock=True)
        conn.execute(Q["set_wave"], {"rollout_id": rollout_id, "wave": wave, "at": now})
        conn.execute(Q["start_wave"], {"rollout_id": rollout_id, "wave": wave, "at": now})
        notified = _notify(conn, row, wave, ctx)
    return {"wave": wave, "notified": notified, "wave_done": False, "verdict": None,
            "awaiting": False}  # fmt: skip


# --- following ------------------------------------------------------------------------------


def _progress(conn: Conn, row: Mapping[str, Any], now: float) -> None:
    """Every commanded device moved on by what the cloud has heard: its command's result,
    its heartbeats (healthy for soak_s, or not), a failed install, silence."""
    options = _options(row)
    kind = str(row["kind"])
    release = str(row["release"]) if kind == "release" else None
    params = {
        "rollout_id": row["rollout_id"], "now": now, "release": release, "field": FIELD[kind],
        "version": int(row["version"] or 0), "soak_s": options.soak_s,
        "timeout_s": options.device_timeout_s,
    }  # fmt: skip
    for name in ("progress_refused", "progress_release_failed", "progress_applied",
                 "progress_unhealthy", "progress_payments_failing", "progress_healthy",
                 "progress_timed_out"):  # fmt: skip
        conn.execute(Q[name], params)


def _figures(conn: Conn, rollout_id: str, wave: int) -> tuple[dict[str, int], dict[str, int]]:
    counts = rollouts._counts(conn, rollout_id)
    total: dict[str, int] = {}
    for by_status in counts.values():
        for s, n in by_status.items():
            total[s] = total.get(s, 0) + n
    return counts.get(wave, {}), total


def poll_wave(state: State, ctx: StepContext) -> State:
    """Monitor_Broadcast's body: notify what may be notified now, follow every device,
    and say whether the wave is done: nothing pending (and not paused), or past the
    threshold, or aborted by an operator (``verdict``: why)."""
    rollout_id = _rollout_id(ctx, state)
    wave = int(state["wave"])
    now = ctx.clock.now()
    with transaction(ctx, _FAULTS) as conn:
        row = rollouts.load(conn, rollout_id, lock=True)
        if row["abort_requested"]:
            return {"wave_done": True, "verdict": {"criterion": "operator"}}
        _notify(conn, row, wave, ctx)
        _progress(conn, row, now)
        options = _options(row)
        in_wave, total = _figures(conn, rollout_id, wave)
        verdict = plan.evaluate(in_wave, total, options.abort)
        if verdict.abort:
            detail = verdict.detail(options.abort.failure_percent)
            return {"wave_done": True, "verdict": {"criterion": verdict.criterion, **detail}}
        left = conn.execute(Q["wave_unsettled"], {"rollout_id": rollout_id, "wave": wave})
        unsettled = int(left.fetchone()[0])  # type: ignore[index]
    return {"wave_done": unsettled == 0 and not row["paused"], "verdict": None,
            "unsettled": unsettled}  # fmt: skip


def _abort(conn: Conn, row: Mapping[str, Any], wave: int, verdict: Mapping[str, Any],
           ctx: StepContext) -> str:  # fmt: skip
    """Record why the rollout aborts (the first reason stands), in this transaction."""
    now = ctx.clock.now()
    criterion = str(verdict.get("criterion") or "operator")
    figures = {k: verdict[k] for k in ("failures", "sampled", "failure_percent", "threshold")
               if k in verdict}  # fmt: skip
    by = row["created_by"]
    reason = None
    if criterion == "operator":
        last = conn.execute(
            "SELECT requested_by, reason FROM rollout_controls WHERE rollout_id = %(id)s "
            "AND action = 'abort' ORDER BY control_id DESC LIMIT 1",
            {"id": row["rollout_id"]},
        ).fetchone()
        if last is not None:
            by, reason = last[0], last[1]
    abort = {"criterion": criterion, "wave": wave, "figures": figures or None, "at": now,
             "by": by, "reason": reason}  # fmt: skip
    conn.execute(Q["set_abort"], {"rollout_id": row["rollout_id"], "abort": Jsonb(abort),
                                  "at": now})  # fmt: skip
    conn.execute(Q["end_wave"], {"rollout_id": row["rollout_id"], "wave": wave,
                                 "status": "aborted", "at": now})  # fmt: skip
    _record(conn, row, ctx, "rollout.aborting", abort)
    stored = rollouts.load(conn, str(row["rollout_id"]))["abort"] or abort
    text = f"rollout {row['rollout_id']} aborted in wave {stored.get('wave')}: "
    text += str(stored.get("criterion"))
    f = stored.get("figures") or {}
    if f:
        text += (f" ({f.get('failures')} of {f.get('sampled')} failed, "
                 f"{f.get('failure_percent')}% > {f.get('threshold')}%)")  # fmt: skip
    return text


def check_wave(state: State, ctx: StepContext) -> State:
    """The wave's threshold check: past it (or aborted), the reason is recorded on the
    rollout and the step fails for good, so the saga rolls the rollout back; else the
    wave is done and, if it is gated, the rollout awaits approval."""
    rollout_id = _rollout_id(ctx, state)
    wave = int(state["wave"])
    now = ctx.clock.now()
    failure: str | None = None
    awaiting = False
    with transaction(ctx, _FAULTS) as conn:
        row = rollouts.load(conn, rollout_id, lock=True)
        verdict = state.get("verdict")
        if row["abort"] is not None:
            verdict = row["abort"]
        elif row["abort_requested"]:
            verdict = {"criterion": "operator"}
        if verdict:
            failure = _abort(conn, row, wave, verdict, ctx)
        else:
            conn.execute(Q["end_wave"], {"rollout_id": rollout_id, "wave": wave,
                                         "status": "done", "at": now})  # fmt: skip
            gates = _options(row).gates.approve_after
            last = int(state.get("last_wave") or wave)
            awaiting = wave in gates and wave < last and int(row["approved_through"]) < wave
            if awaiting and not row["paused"]:  # paused: resume says it awaits approval
                conn.execute(Q["set_status"], {"rollout_id": rollout_id, "at": now,
                                               "status": "awaiting_approval",
                                               "finished_at": None})  # fmt: skip
                _record(conn, row, ctx, "rollout.awaiting_approval", {"wave": wave})
    if failure is not None:
        raise StepError(failure, retryable=False)
    return {"awaiting": awaiting}


def poll_approval(state: State, ctx: StepContext) -> State:
    """Await_Approval's body: approved through this wave (go on), or aborted (the saga)."""
    rollout_id = _rollout_id(ctx, state)
    wave = int(state["wave"])
    failure: str | None = None
    awaiting = True
    with transaction(ctx, _FAULTS) as conn:
        row = rollouts.load(conn, rollout_id, lock=True)
        if row["abort_requested"]:
            failure = _abort(conn, row, wave, {"criterion": "operator"}, ctx)
        elif int(row["approved_through"]) >= wave:
            awaiting = False
    if failure is not None:
        raise StepError(failure, retryable=False)
    return {"awaiting": awaiting}


def finalize(state: State, ctx: StepContext) -> State:
    """Finalize_Rollout: past the last wave, the version assigned where the selector
    points (the fleet, one group, one store), which then covers the devices the rollout
    assigned one by one (their device assignments of this version removed); a finer
    selector keeps its device assignments. The rollout succeeded."""
    rollout_id = _rollout_id(ctx, state)
    now = ctx.clock.now()
    with transaction(ctx, _FAULTS) as conn:
        row = rollouts.load(conn, rollout_id, lock=True)
        if row["status"] == "succeeded":
            return {"finalized": row["finalized"]}
        kind, version = str(row["kind"]), int(row["version"])
        place = _options(row).target.scope
        finalized: dict[str, Any] | None = None
        if place is not None:
            scope, value = place
            who = _who(row, ctx)
            if kind == "release":
                was = conn.execute(
                    "SELECT version FROM document_assignments WHERE kind = 'release' "
                    "AND scope = %(scope)s AND value = %(value)s",
                    {"scope": scope, "value": value or ""},
                ).fetchone()
                conn.execute(
                    "INSERT INTO document_assignments (kind, scope, value, version, "
                    "assigned_at, assigned_by) VALUES ('release', %(scope)s, %(value)s, "
                    "%(version)s, %(at)s, %(by)s) ON CONFLICT (kind, scope, value) DO UPDATE "
                    "SET version = excluded.version, assigned_at = excluded.assigned_at, "
                    "assigned_by = excluded.assigned_by",
                    {"scope": scope, "value": value or "", "version": version, "at": now,
                     "by": who.name},
                )  # fmt: skip
                documents.record(conn, who, "document.assign", f"release:{scope}:{value or ''}",
                                 {"version": version}, now)  # fmt: skip
                previous = None if was is None else int(was[0])
            else:
                made = documents.assign(conn, kind, version, scope, value, who, at=now)
                previous = made.previous
            conn.execute(
                "DELETE FROM document_assignments a USING rollout_devices rd "
                "WHERE rd.rollout_id = %(id)s AND a.kind = %(kind)s AND a.scope = 'device' "
                "AND a.value = rd.device_id AND a.version = %(version)s",
                {"id": rollout_id, "kind": kind, "version": version},
            )
            finalized = {"scope": scope, "value": value, "version": version,
                         "previous": previous}  # fmt: skip
        conn.execute(Q["set_finalized"], {"rollout_id": rollout_id, "at": now,
                                          "finalized": Jsonb(finalized)})  # fmt: skip
        _record(conn, row, ctx, "rollout.succeeded", {"version": version, "assigned": finalized})
    return {"finalized": finalized}


# --- the rollback ---------------------------------------------------------------------------


def _restore_content(
    conn: Conn, kind: str, previous: int | None, previous_release: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """What a device is restored to (the content of what it followed before), and for a
    release its name; None: nothing known to restore to."""
    if kind == "release":
        content = None
        if previous is not None:
            content = _content(conn, "release", previous)
        elif previous_release:
            content = _release_content(conn, previous_release)
        return content, None if content is None else str(content.get("release"))
    if previous is None:
        # no config document was in force: one that overrides nothing puts the
        # terminal's own config file back; a policy has no such "none"
        return ({"risk": {}} if kind == "config" else None), None
    return _content(conn, kind, previous), None


def restore_wave(state: State, ctx: StepContext) -> State:
    """Broadcast_To_Fleet's compensation for one wave (its output names it), one
    transaction per attempt:

    1. the wave's commands not yet sent are cancelled, and their devices (and those
       never commanded) are ``cancelled``, their device assignment put back;
    2. every device whose command was delivered (it may hold the change) is restored:
       a new version with the content it followed before (one per previous version,
       reused across waves), its device assignment to it, and a command;
    3. the restores are followed: applied and reported in force (restored), refused
       (failed), silent past device_timeout_s (timed_out).

    While any restore is still on its way the attempt fails, retryably: the engine runs
    it again after its backoff (``compensate_retry: forever``), so the rollback is
    followed to its end, durably, and each restore is sent once."""
    rollout_id = _rollout_id(ctx, state)
    output = ctx.output if isinstance(ctx.output, Mapping) else {}
    wave = int(output.get("wave") or state.get("wave") or 0)
    now = ctx.clock.now()
    with transaction(ctx, _FAULTS) as conn:
        row = rollouts.load(conn, rollout_id, lock=True)
        kind = str(row["kind"])
        options = _options(row)
        who = _who(row, ctx)
        sync = _sync(conn, ctx)
        queued = [r[0] for r in conn.execute(Q["wave_devices_queued"],
                                             {"rollout_id": rollout_id, "wave": wave})]  # fmt: skip
        cancelled = sync.cancel_commands(queued) if queued else []
        conn.execute(Q["cancel_devices"], {"rollout_id": rollout_id, "wave": wave})
        conn.execute(Q["mark_restore"], {"rollout_id": rollout_id, "wave": wave})
        # never took it: the device assignment this rollout wrote goes back
        back = conn.execute(Q["put_back"], {"rollout_id": rollout_id, "wave": wave}).fetchall()
        drop = [d for d, prev in back if prev is None]
        if drop:
            conn.execute(Q["unassign_devices"], {"kind": kind, "device_ids": drop})
        for previous in {prev for _, prev in back if prev is not None}:
            ids = [d for d, prev in back if prev == previous]
            conn.execute(Q["assign_devices"], {"kind": kind, "version": previous,
                                               "device_ids": ids, "at": now,
                                               "by": f"rollout:{rollout_id}"})  # fmt: skip
        pending = conn.execute(Q["restore_pending"],
                               {"rollout_id": rollout_id, "wave": wave}).fetchall()  # fmt: skip
        # a restore version per previous version (and release), made once
        groups: dict[tuple[int | None, str | None], list[str]] = {}
        for device_id, previous, prev_release, _version, command_id in pending:
            if command_id is None:
                key = (None if previous is None else int(previous), prev_release)
                groups.setdefault(key, []).append(str(device_id))
        made: dict[int, list[str]] = {}
        for (previous, prev_release), ids in sorted(groups.items(), key=str):
            found = conn.execute(Q["restore_version_of"],
                                 {"rollout_id": rollout_id, "previous": previous,
                                  "previous_release": prev_release}).fetchone()  # fmt: skip
            if found is not None and found[0] is not None:
                version = int(found[0])
            else:
                content, _ = _restore_content(conn, kind, previous, prev_release)
                if content is None:
                    why = ("nothing of this kind was in force before the rollout: "
                           "no version to restore to")  # fmt: skip
                    conn.execute(Q["restore_failed"], {"rollout_id": rollout_id,
                                                       "device_ids": ids, "why": why})  # fmt: skip
                    continue
                version = _new_document(conn, kind, content, who, now)
            params = {"rollout_id": rollout_id, "version": version, "device_ids": ids}
            conn.execute(Q["set_restore_version"], params)
            made.setdefault(version, []).extend(ids)
        for version, ids in sorted(made.items()):
            content = _content(conn, kind, version)
            if kind == "release":
                conn.execute(
                    "UPDATE rollout_devices SET previous_release = %(r)s "
                    "WHERE rollout_id = %(id)s AND device_id = ANY(%(ids)s::text[])",
                    {"r": content.get("release"), "id": rollout_id, "ids": ids},
                )
            conn.execute(Q["assign_devices"], {"kind": kind, "version": version,
                                               "device_ids": ids, "at": now,
                                               "by": f"rollout:{rollout_id}"})  # fmt: skip
            try:
                batch = sync.queue_commands(
                    CommandTarget(device_ids=tuple(ids)), ACTION[kind],
                    NewDocument(content, kind, version),  # type: ignore[arg-type]
                    ttl_s=options.device_timeout_s,
                )  # fmt: skip
                sent = {c.device_id: c.command_id for c in batch.commands}
            except ServiceError as exc:
                if exc.code != "no_devices":
                    raise StepError(f"{exc.code}: {exc.message}", retryable=False) from exc
                sent = {}
            lost = sorted(set(ids) - set(sent))
            if lost:
                conn.execute(Q["restore_failed"], {"rollout_id": rollout_id,
                                                   "device_ids": lost,
                                                   "why": "device revoked"})  # fmt: skip
            if sent:
                s = sorted(sent)
                conn.execute(Q["mark_restore_notified"],
                             {"rollout_id": rollout_id, "at": now, "device_ids": s,
                              "command_ids": [sent[d] for d in s]})  # fmt: skip
            _record(conn, row, ctx, "rollout.restore",
                    {"wave": wave, "version": version, "devices": len(sent)})  # fmt: skip
        if kind == "release":
            conn.execute(Q["restore_release_failed"], {"rollout_id": rollout_id, "wave": wave})
        conn.execute(
            Q["restore_progress"],
            {"rollout_id": rollout_id, "wave": wave, "now": now, "release": kind == "release",
             "field": FIELD[kind], "timeout_s": options.device_timeout_s},
        )  # fmt: skip
        left = conn.execute(Q["restores_unsettled"], {"rollout_id": rollout_id, "wave": wave})
        unsettled = int(left.fetchone()[0])  # type: ignore[index]
        if not unsettled:
            conn.execute(Q["end_wave"], {"rollout_id": rollout_id, "wave": wave,
                                         "status": "aborted", "at": now})  # fmt: skip
    if unsettled:
        raise StepError(f"rollout {rollout_id} wave {wave}: {unsettled} restore(s) on their way",
                        retryable=True)  # fmt: skip
    return {"cancelled": len(cancelled)}


__all__ = [
    "broadcast",
    "check_wave",
    "create_version",
    "finalize",
    "poll_approval",
    "poll_wave",
    "restore_wave",
    "validate",
    "withdraw_version",
]
