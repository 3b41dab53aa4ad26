"""Late joiners: a device that was offline while a rollout notified it (its command
expired), or that enrolled during or after one, gets the version in force for it when
it next syncs -- the rollout's, or after a rollback the old content again.

A device a running rollout's selector names but that it did not plan (enrolled, moved
or tagged since) joins it, in the wave it is at (``join``): the run notifies and
follows it as any other (its health counts, a rollback restores it).

Rollouts write what each device should follow as assignments (a device-scope one as
each device is notified, the selector's place at Finalize; a rollback puts them back or
points them at the restore version), so "what should this device run" is always its
effective assignment (``cloud.documents.scope``). ``find`` compares that, in one
set-based query per kind, with what the device's latest heartbeat reports, and
``reconcile`` queues the effective document for each device that is behind and has no
command of that action pending -- nor any for that version it already took or refused
(a refusal is not asked again, every sweep). One batch per version, in one transaction.

The sweep of ``tillflow cloud worker`` calls it every pass (``cloud.executor.worker``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.rollouts import plan, steps
from cloud.rollouts import service as rollouts
from cloud.rollouts._sql import Conn, Q
from cloud.rollouts.options import RolloutOptions
from cloud.rollouts.steps import ACTION, _InTransaction
from edge.engine import StepContext
from edge.engine.clock import Clock, SystemClock
from sync.server import ServiceError, SyncService
from sync.server_records import CommandTarget, NewDocument

log = logging.getLogger(__name__)

#: Devices looked at per pass; the next pass takes the rest.
DEFAULT_LIMIT = 1000
#: How long a late joiner's command waits for it (seconds; a day).
DEFAULT_TTL_S = 86_400.0
#: Any 64-bit number of ours: one reconcile pass at a time across every worker's sweep
#: (two at once would each find a device behind and each queue it a command).
RECONCILE_LOCK = 0x7417_2EC0


@dataclass(frozen=True)
class Behind:
    device_id: str
    kind: str
    version: int


def find(conn: Conn, *, now: float, limit: int = DEFAULT_LIMIT) -> list[Behind]:
    """The devices behind their effective config, policy or release, at most ``limit``."""
    found = []
    for query in ("behind", "behind_release"):
        rows = conn.execute(Q[query], {"now": now, "limit": limit}).fetchall()
        found += [Behind(str(d), str(k), int(v)) for d, k, v in rows]
    return found


def join(conn: Conn, *, limit: int = DEFAULT_LIMIT) -> dict[str, list[str]]:
    """Add to each running rollout the devices its selector names now that it did not
    when it was planned (enrolled, moved, tagged since), in the wave it is at: its run
    notifies and follows them like the others. Returns them by rollout."""
    joined: dict[str, list[str]] = {}
    for rollout_id, options, current_wave in conn.execute(Q["active_rollouts"]).fetchall():
        target = RolloutOptions.model_validate(options).target
        params = {**plan.selector_params(target), "rollout_id": rollout_id, "limit": limit}
        rows = conn.execute(Q["late_targets"], params).fetchall()
        if not rows:
            continue
        wave = int(current_wave)
        conn.execute(
            Q["join_late"],
            {"rollout_id": rollout_id, "wave": wave, "device_ids": [r[0] for r in rows],
             "stores": [r[1] for r in rows], "groups": [r[2] for r in rows]},
        )  # fmt: skip
        conn.execute(Q["wave_grew"], {"rollout_id": rollout_id, "wave": wave, "n": len(rows)})
        joined[str(rollout_id)] = [str(r[0]) for r in rows]
        log.info(
            "rollout %s: %d late joiner(s) in wave %d",
            rollout_id,
            len(rows),
            wave,
            extra={"action": "rollout_joined", "count": len(rows)},
        )
    return joined


def retry_finished(
    conn: Conn, key: Ed25519PrivateKey, clock: Clock, *, limit: int = DEFAULT_LIMIT
) -> list[str]:
    """The devices an operator asked to retry in a rollout that already succeeded (its
    run is over): notified again (each once for the retry) and followed to an outcome,
    with the run's own notify and progress, in this transaction. Returns the rollouts."""
    done = []
    for (rollout_id,) in conn.execute(Q["retried_finished"], {"limit": limit}).fetchall():
        row = rollouts.load(conn, str(rollout_id), lock=True)
        last = conn.execute(
            "SELECT max(wave) FROM rollout_waves WHERE rollout_id = %(id)s", {"id": rollout_id}
        ).fetchone()
        ctx = StepContext(
            run_id=str(row["run_id"] or f"rollout:{rollout_id}"), step="retry_failed",
            attempt=1, idempotency_key=f"retry:{rollout_id}", clock=clock,
            input={"rollout_id": rollout_id}, services={"signing_key": key},
        )  # fmt: skip
        steps._notify(conn, row, int(last[0]) if last and last[0] else 1, ctx)
        steps._progress(conn, row, clock.now())
        done.append(str(rollout_id))
    return done


def reconcile(
    conn: Conn,
    key: Ed25519PrivateKey,
    clock: Clock,
    *,
    limit: int = DEFAULT_LIMIT,
    ttl_s: float = DEFAULT_TTL_S,
) -> dict[tuple[str, int], list[str]]:
    """Queue the effective document for every device ``find`` finds, in ``conn``'s
    transaction; returns the devices commanded, by (kind, version). (First: devices a
    running rollout's selector names now join it, ``join``; and the devices retried in
    a rollout that succeeded are notified and followed, ``retry_finished``.)"""
    got = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (RECONCILE_LOCK,)).fetchone()
    if not got or not got[0]:
        return {}  # another sweep is at it: what it queues, this one would have too
    join(conn, limit=limit)
    retry_finished(conn, key, clock, limit=limit)
    now = clock.now()
    groups: dict[tuple[str, int], list[str]] = {}
    for b in find(conn, now=now, limit=limit):
        groups.setdefault((b.kind, b.version), []).append(b.device_id)
    sync = SyncService(_InTransaction(conn), clock, key)
    sent: dict[tuple[str, int], list[str]] = {}
    for (kind, version), ids in sorted(groups.items()):
        row = conn.execute(Q["document_row"], {"kind": kind, "version": version}).fetchone()
        if row is None:
            continue
        try:
            batch = sync.queue_commands(
                CommandTarget(device_ids=tuple(ids)),
                ACTION[kind],
                NewDocument(dict(row[0]), kind, version),  # type: ignore[arg-type]
                ttl_s=ttl_s,
            )
        except ServiceError as exc:
            if exc.code == "no_devices":
                continue
            raise
        done = sorted(c.device_id for c in batch.commands)
        conn.execute(Q["mark_late"], {"kind": kind, "version": version, "device_ids": done})
        sent[(kind, version)] = done
        log.info(
            "late joiners: %s version %d queued for %d device(s)",
            kind,
            version,
            len(done),
            extra={"action": "rollout_late_joiners", "count": len(done)},
        )
    return sent


def finder(
    connect: Callable[[], AbstractContextManager[Conn]],
    key: Callable[[], Ed25519PrivateKey],
    clock: Clock | None = None,
) -> Callable[[object], Mapping[tuple[str, int], list[str]]]:
    """A sweep finder (``Sweep(finders=[...])``): one reconcile pass per call, in one
    transaction on a connection of ``connect()``."""
    used = clock or SystemClock()

    def run(_engine: object) -> Mapping[tuple[str, int], list[str]]:
        with connect() as conn, conn.transaction():
            return reconcile(conn, key(), used)

    return run


__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_TTL_S",
    "RECONCILE_LOCK",
    "Behind",
    "find",
    "finder",
    "join",
    "reconcile",
    "retry_finished",
]
