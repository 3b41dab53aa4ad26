"""ConfigRollout and PolicyRollout end to end on PostgreSQL: the cloud engine inline on
``PostgresStore`` with a virtual clock, the sync service behind the real ASGI app, and
terminals that answer through it -- real device-side sync clients
(``sync.device.client.SyncClient``) whose commands are checked and applied by
``sync.device.commands`` into an ``edge`` store, and whose heartbeats report the
documents in force there (and, for the devices a test makes sick, an error).

Between polls the run WAITs in the database; ``Fleet.tick`` moves the clock on, lets the
terminals sync, and has the engine recover what came due -- what a worker's sweep does.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from cloud.api.app import create_app
from cloud.api.fleet.context import FleetContext
from cloud.api.serve import migrate_fleet
from cloud.documents import service as documents
from cloud.engine import cloud_engine
from cloud.fleet.tokens import Principal
from cloud.rollouts import reconcile, steps
from cloud.rollouts import service as rollouts
from cloud.settings import CloudSettings
from cloud.store.postgres import PostgresStore
from cloud.sync.postgres import PostgresSyncBackend
from edge.engine import Engine, InlineExecutor, StepContext
from edge.engine.clock import FakeClock
from edge.errors import InvalidRunState
from edge.store.memory import MemoryStore
from edge.terminal.service.terminal import offline_acknowledgement
from sync import signing
from sync.device.client import SyncClient
from sync.device.identity import enroll, load_key
from sync.server import SyncService
from sync.server_records import CommandTarget, NewDocument

starlette_testclient = pytest.importorskip("starlette.testclient")

T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC
BASE = "http://testserver"
OPERATOR = Principal(token_id="tok_test", name="alice", role="operator")
V1 = {"risk": {"floor_limit_minor": 5000}}
V2 = {"risk": {"floor_limit_minor": 2500}}
#: Bounds on the ticks a rollout may take; reached only when something is broken.
MAX_TICKS = 400


class Hooks:
    """The terminal side a sync client needs, over a real edge store: health reports the
    documents in force there, and ``sick_on`` (a config version) makes it report an
    error once that version is in force."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.sick_on: int | None = None

    def _version(self, kind: str) -> int | None:
        active = self.store.active_document(kind)
        return None if active is None else active[0]

    def health(self) -> dict[str, Any]:
        config = self._version("config")
        sick = self.sick_on is not None and config == self.sick_on
        return {
            "storage": {"state": "ok", "used_percent": 1.0},
            "outbox_depth": self.store.outbox_stats().depth,
            "config_version": config,
            "policy_version": self._version("policy"),
            "last_error": "payments declined: host unreachable" if sick else None,
        }

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        ack = offline_acknowledgement(self.store, outbox_through, audit_through)
        return self.store.acknowledge(ack).messages

    def refresh_documents(self) -> None:
        pass

    def active_policy_version(self) -> int | None:
        return self._version("policy")


@dataclass
class Terminal:
    device_id: str
    store_name: str
    edge: MemoryStore
    client: SyncClient
    hooks: Hooks
    online: bool = True
    taken: list[str] = field(default_factory=list)

    def sync(self) -> None:
        if self.online:
            outcome = self.client.sync_once()
            self.taken += [o.command_id for o in outcome.commands]

    def version(self, kind: str = "config") -> int | None:
        active = self.edge.active_document(kind)
        return None if active is None else active[0]


@dataclass
class Fleet:
    client: Any
    backend: PostgresSyncBackend
    store: PostgresStore
    clock: FakeClock
    key: Any
    sync: SyncService
    engine: Engine
    work: Path
    terminals: dict[str, Terminal] = field(default_factory=dict)
    _n: Iterator[int] = field(default_factory=itertools.count)

    # --- the database -------------------------------------------------------------------

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.backend.pool.connection() as conn:
            return conn.execute(query, params or None).fetchall()

    def tx(self, fn: Callable[[Any], Any]) -> Any:
        with self.backend.pool.connection() as conn, conn.transaction():
            return fn(conn)

    # --- terminals ----------------------------------------------------------------------

    def enroll(self, store: str, group: str | None = None) -> Terminal:
        token = self.sync.create_enroll_token(store, group).token
        data_dir = self.work / f"device-{next(self._n)}"
        identity = enroll(BASE, token, data_dir, "1.0.0", http=self.client, clock=self.clock.now)
        edge = MemoryStore()
        hooks = Hooks(edge)
        client = SyncClient(
            identity, load_key(data_dir), edge, hooks, self.clock, self.client,
            binary_version="1.0.0",
        )  # fmt: skip
        t = Terminal(identity.device_id, store, edge, client, hooks)
        self.terminals[t.device_id] = t
        t.sync()
        return t

    def baseline(self, content: dict[str, Any] = V1) -> int:
        """A config version assigned to the fleet and applied by every terminal."""
        version = self.tx(lambda c: documents.create(c, "config", content, OPERATOR, at=T0))
        number = int(version.version)
        self.tx(lambda c: documents.assign(c, "config", number, "fleet", None, OPERATOR, at=T0))
        ids = tuple(sorted(self.terminals))
        self.sync.queue_commands(CommandTarget(device_ids=ids), "update_config",
                                 NewDocument(version.content, "config", number))  # fmt: skip
        for _ in range(2):
            for t in self.terminals.values():
                t.sync()
        assert all(t.version() == number for t in self.terminals.values())
        return number

    # --- rollouts -----------------------------------------------------------------------

    def rollout(self, kind: str, body: dict[str, Any], *, start: bool = True) -> str:
        request = rollouts.RolloutRequest.model_validate(body)
        rollout_id: str = self.tx(
            lambda c: rollouts.create(c, kind, request, OPERATOR, at=self.clock.now())  # type: ignore[arg-type]
        )
        if start:
            self.start(rollout_id, kind)
        return rollout_id

    def start(self, rollout_id: str, kind: str) -> str:
        return self.engine.start(
            rollouts.workflow_type(kind),  # type: ignore[arg-type]
            {"rollout_id": rollout_id},
            idempotency_key=rollouts.run_key(rollout_id),
        )

    def view(self, rollout_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.tx(lambda c: rollouts.view(c, rollout_id, now=self.clock.now()))
        return out

    def devices(self, rollout_id: str, **kw: Any) -> list[dict[str, Any]]:
        page = self.tx(lambda c: rollouts.devices(c, rollout_id, limit=1000, **kw))
        return list(page["items"])

    def control(self, rollout_id: str, action: str, reason: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = self.tx(
            lambda c: rollouts.control(
                c,
                rollout_id,
                action,
                OPERATOR,  # type: ignore[arg-type]
                at=self.clock.now(),
                reason=reason,
            )
        )
        self.wake(rollout_id)
        return out

    def wake(self, rollout_id: str) -> None:
        """What the API does after a control: answer the run's WAIT, so it polls now."""
        run_id = self.view(rollout_id)["run_id"]
        if run_id is None:
            return
        with contextlib.suppress(InvalidRunState):  # not waiting: it sees it at its next poll
            self.engine.resume(run_id, {})

    def tick(self, seconds: float = 10.0) -> None:
        """Terminals sync (twice: take, then report), the clock moves on, and the engine
        does what came due (a WAIT's timeout, a compensation's retry)."""
        for _ in range(2):
            for t in list(self.terminals.values()):
                t.sync()
        self.clock.advance(seconds)
        self.engine.recover()

    def until(self, rollout_id: str, done: Callable[[dict[str, Any]], bool],
              seconds: float = 10.0) -> dict[str, Any]:  # fmt: skip
        for _ in range(MAX_TICKS):
            v = self.view(rollout_id)
            if done(v):
                return v
            self.tick(seconds)
        raise AssertionError(f"rollout {rollout_id} never got there: {self.view(rollout_id)}")

    def commands_for(self, kind: str, version: int) -> Counter[str]:
        rows = self.sql(
            "SELECT device_id FROM commands WHERE document ->> 'kind' = %s "
            "AND (document ->> 'version')::bigint = %s",
            kind,
            version,
        )
        return Counter(str(r[0]) for r in rows)


@contextlib.contextmanager
def make_fleet(url: str, work: Path) -> Iterator[Fleet]:
    """A ``Fleet`` on the empty database ``url`` (migrated here), closed at the end."""
    backend = PostgresSyncBackend(url, pool_size=6, pool_timeout_s=10.0)
    store = PostgresStore(url, pool_size=2)
    engine: Engine | None = None
    try:
        migrate_fleet(backend)
        clock, key = FakeClock(T0), signing.new_key()
        sync = SyncService(backend, clock, key)
        settings = CloudSettings(database_url=url)
        ctx = FleetContext(settings, backend.pool, sync, clock, key)
        services = {"pool": backend.pool, "signing_key": key, "settings": settings}
        engine = cloud_engine(store, InlineExecutor(sleep=False), settings=settings, clock=clock,
                              services=services)  # fmt: skip
        with starlette_testclient.TestClient(
            create_app(sync, fleet=ctx), raise_server_exceptions=False
        ) as client:
            yield Fleet(client, backend, store, clock, key, sync, engine, work)
    finally:
        if engine is not None:
            engine.close()
        store.close()
        backend.close()


@pytest.fixture
def fleet(new_database, tmp_path) -> Iterator[Fleet]:
    with make_fleet(new_database(), tmp_path) as made:
        yield made


def _finished(v: dict[str, Any]) -> bool:
    return v["status"] in ("succeeded", "rolled_back", "failed")


# --- a rollout that succeeds ---------------------------------------------------------------


def test_config_rollout__healthy_waves_reach_every_target_each_commanded_once(fleet):
    for n in range(12):
        fleet.enroll(f"s{n % 3}")
    v1 = fleet.baseline()
    rid = fleet.rollout("config", {
        "content": V2, "target": {"all": True}, "waves": ["25%", "100%"], "soak_s": 30,
        "abort": {"failure_percent": 10, "min_sample_wave": 2, "min_sample_total": 4},
        "reason": "lower floor limit",
    })  # fmt: skip
    first = fleet.view(rid)
    assert first["status"] == "running" and first["current_wave"] == 1
    assert [w["targeted"] for w in first["waves"]] == [3, 9]
    assert first["waves"][0]["notified"] == 3 and first["waves"][1]["notified"] == 0
    v = fleet.until(rid, _finished)
    assert v["status"] == "succeeded", v
    version = v["document"]["version"]
    assert version == v1 + 1
    assert [(w["healthy"], w["status"]) for w in v["waves"]] == [(3, "done"), (9, "done")]
    assert v["abort"] is None and v["rollback"] is None
    assert v["finalized"] == {"scope": "fleet", "value": None, "version": version,
                              "previous": v1}  # fmt: skip
    assert all(t.version() == version for t in fleet.terminals.values())
    # each device commanded once for the version; the fleet assignment covers them now
    assert fleet.commands_for("config", version) == Counter(dict.fromkeys(fleet.terminals, 1))
    own = fleet.sql("SELECT count(*) FROM document_assignments WHERE scope = 'device'")
    assert own == [(0,)]
    for d in fleet.devices(rid):
        assert d["status"] == "healthy" and d["previous_version"] == v1
        assert d["healthy_at"] - d["applied_at"] >= 30  # the soak
    actions = [r[0] for r in fleet.sql("SELECT action FROM cloud_audit ORDER BY seq")]
    assert "rollout.create" in actions and "rollout.succeeded" in actions
    # the run's own trail, in the engine's audit table
    events = fleet.sql("SELECT count(*) FROM workflow_audit_log WHERE run_id = %s", v["run_id"])
    assert events[0][0] > 10


# --- a rollout that aborts in wave 2 and rolls back ---------------------------------------


def test_config_rollout__past_the_threshold_in_wave_2__aborts_restores_every_applied_device(
    fleet,
):
    for n in range(20):
        fleet.enroll(f"s{n % 4}")
    v1 = fleet.baseline()
    rid = fleet.rollout("config", {
        "content": V2, "target": {"all": True}, "waves": ["5", "100%"], "soak_s": 20,
        "seed": 1234,
        "abort": {"failure_percent": 20, "min_sample_wave": 5, "min_sample_total": 10},
    }, start=False)  # fmt: skip
    by_wave: dict[int, list[str]] = {}
    for d in fleet.devices(rid):
        by_wave.setdefault(d["wave"], []).append(d["device_id"])
    assert [len(by_wave[1]), len(by_wave[2])] == [5, 15]
    version = v1 + 1
    # in wave 2: five fall sick on the new config, three stay offline (never synced)
    sick, offline = by_wave[2][:5], by_wave[2][-3:]
    for d in sick:
        fleet.terminals[d].hooks.sick_on = version
    for d in offline:
        fleet.terminals[d].online = False
    fleet.start(rid, "config")
    v = fleet.until(rid, _finished)
    assert v["status"] == "rolled_back", v
    abort = v["abort"]
    assert abort["criterion"] == "wave_failure_rate" and abort["wave"] == 2
    f = abort["figures"]
    assert f["threshold"] == 20 and f["failures"] >= 5 and f["failure_percent"] > 20
    assert f["sampled"] >= 5 and f["failures"] * 100 / f["sampled"] == pytest.approx(
        f["failure_percent"], abs=0.01
    )
    assert v["waves"][1]["status"] == "aborted" and v["waves"][0]["status"] == "aborted"
    # every device that applied the new version runs the old content again, as a new
    # version (versions only grow); the offline ones' commands were cancelled, not sent
    devices = {d["device_id"]: d for d in fleet.devices(rid)}
    restore_versions = {d["restore_version"] for d in devices.values()} - {None}
    assert len(restore_versions) == 1
    (restore,) = restore_versions
    assert restore > version
    restored = fleet.tx(lambda c: documents.get(c, "config", restore))
    assert restored.content == fleet.tx(lambda c: documents.get(c, "config", v1)).content
    for device_id, t in fleet.terminals.items():
        d = devices[device_id]
        if device_id in offline:
            assert d["status"] == "cancelled" and d["restore_status"] == "none"
            assert t.version() == v1
        else:
            assert d["restore_status"] == "restored", d
            assert t.version() == restore
    cancelled = fleet.sql(
        "SELECT device_id, status, delivered_at FROM commands WHERE status = 'cancelled'"
    )
    assert sorted(r[0] for r in cancelled) == sorted(offline)
    assert all(r[2] is None for r in cancelled)
    # the offline ones come back: the cancelled command never goes; they keep v1
    taken = {d: list(fleet.terminals[d].taken) for d in offline}
    for d in offline:
        fleet.terminals[d].online = True
    fleet.tick()
    for d in offline:
        assert fleet.terminals[d].version() == v1 and fleet.terminals[d].taken == taken[d]
    # the new version is withdrawn (its number kept), the rollback done
    assert fleet.tx(lambda c: documents.get(c, "config", version)).withdrawn_at is not None
    assert v["rollback"]["status"] == "done"
    assert v["rollback"]["restored"] == 17 and v["rollback"]["pending"] == 0
    # each device commanded once per version: the new one, then its restore
    assert max(fleet.commands_for("config", version).values()) == 1
    assert max(fleet.commands_for("config", restore).values()) == 1
    run = fleet.engine.get(v["run_id"])
    assert run.status == "ROLLED_BACK"
    # a device that joins after the rollback gets the old content (the fleet's v1)
    late = fleet.enroll("s0")
    sent = fleet.tx(lambda c: reconcile.reconcile(c, fleet.key, fleet.clock))
    assert sent == {("config", v1): [late.device_id]}
    fleet.tick()
    assert late.version() == v1


# --- gates ---------------------------------------------------------------------------------


def test_config_rollout__pause_holds_the_wave_resume_goes_on_approve_opens_the_next(fleet):
    for _ in range(6):
        fleet.enroll("s1")
    fleet.baseline()
    rid = fleet.rollout("config", {
        "content": V2, "target": {"stores": ["s1"]}, "waves": ["2", "100%"], "soak_s": 0,
        "gates": {"approve_after": [1]},
    })  # fmt: skip
    paused = fleet.control(rid, "pause", reason="lunch rush")
    assert paused["status"] == "paused" and paused["controls"]["paused"]
    for _ in range(5):
        fleet.tick()
    v = fleet.view(rid)
    assert v["status"] == "paused" and v["current_wave"] == 1
    assert v["waves"][0]["healthy"] == 2 and v["waves"][0]["status"] == "running"
    with pytest.raises(rollouts.RolloutState):
        fleet.control(rid, "approve")
    fleet.control(rid, "resume")
    v = fleet.until(rid, lambda v: v["status"] == "awaiting_approval")
    assert v["waves"][0]["status"] == "done" and v["waves"][1]["notified"] == 0
    for _ in range(3):
        fleet.tick()
    assert fleet.view(rid)["waves"][1]["notified"] == 0  # nothing until approved
    approved = fleet.control(rid, "approve")
    assert approved["controls"]["approved_through"] == 1
    v = fleet.until(rid, _finished)
    assert v["status"] == "succeeded"
    assert v["finalized"]["scope"] == "store" and v["finalized"]["value"] == "s1"
    controls = fleet.sql(
        "SELECT action, requested_by, reason FROM rollout_controls ORDER BY control_id"
    )
    assert controls == [("pause", "alice", "lunch rush"), ("resume", "alice", None),
                        ("approve", "alice", None)]  # fmt: skip


def test_config_rollout__aborted_by_hand_rolls_back(fleet):
    for _ in range(4):
        fleet.enroll("s1")
    v1 = fleet.baseline()
    rid = fleet.rollout("config", {"content": V2, "target": {"all": True},
                                   "waves": ["2", "100%"], "soak_s": 0,
                                   "gates": {"approve_after": [1]}})  # fmt: skip
    fleet.until(rid, lambda v: v["status"] == "awaiting_approval")
    fleet.control(rid, "abort", reason="wrong limit")
    v = fleet.until(rid, _finished)
    assert v["status"] == "rolled_back"
    assert v["abort"]["criterion"] == "operator" and v["abort"]["reason"] == "wrong limit"
    assert v["abort"]["by"] == "alice"
    assert all(t.version() in (v1, v1 + 2) for t in fleet.terminals.values())
    assert sum(1 for t in fleet.terminals.values() if t.version() == v1 + 2) == 2
    with pytest.raises(rollouts.RolloutState):
        fleet.control(rid, "abort")


def test_config_rollout__rolled_back_where_no_config_was_in_force__the_file_s_values_again(
    fleet,
):
    for _ in range(3):
        fleet.enroll("s1")
    rid = fleet.rollout("config", {"content": V2, "target": {"all": True},
                                   "waves": ["2", "100%"], "soak_s": 0,
                                   "gates": {"approve_after": [1]}})  # fmt: skip
    fleet.until(rid, lambda v: v["status"] == "awaiting_approval")
    fleet.control(rid, "abort")
    v = fleet.until(rid, _finished)
    assert v["status"] == "rolled_back" and v["rollback"]["restored"] == 2
    (restore,) = {d["restore_version"] for d in fleet.devices(rid)} - {None}
    # a document that overrides nothing: the terminal's config file in force again
    assert fleet.tx(lambda c: documents.get(c, "config", restore)).content == {"risk": {}}
    assert sorted(t.version() or 0 for t in fleet.terminals.values()) == [0, restore, restore]


# --- late joiners and silent devices -------------------------------------------------------


def test_config_rollout__a_silent_device_times_out_and_gets_it_late_a_new_one_too(fleet):
    for _ in range(5):
        fleet.enroll("s1")
    v1 = fleet.baseline()
    silent = sorted(fleet.terminals)[0]
    fleet.terminals[silent].online = False
    rid = fleet.rollout("config", {
        "content": V2, "target": {"stores": ["s1"]}, "waves": ["100%"], "soak_s": 0,
        "device_timeout_s": 120,
        "abort": {"failure_percent": 50, "min_sample_wave": 5, "min_sample_total": 5},
    })  # fmt: skip
    newcomer = fleet.enroll("s1")  # enrolls during the rollout: not one of its targets
    v = fleet.until(rid, _finished)
    assert v["status"] == "succeeded"
    assert v["waves"][0]["timed_out"] == 1 and v["waves"][0]["healthy"] == 4
    d = fleet.devices(rid, status="timed_out")
    assert [x["device_id"] for x in d] == [silent]
    assert d[0]["last_error"] == "not applied within device_timeout_s"
    version = v1 + 1
    assert fleet.terminals[silent].version() == v1 and newcomer.version() is None
    # its command expired; back online, the reconciler gives it (and the newcomer) the
    # version the rollout is at; once, not every sweep
    fleet.terminals[silent].online = True
    fleet.clock.advance(3600)
    sent = fleet.tx(lambda c: reconcile.reconcile(c, fleet.key, fleet.clock))
    assert sent == {("config", version): sorted([silent, newcomer.device_id])}
    assert fleet.tx(lambda c: reconcile.reconcile(c, fleet.key, fleet.clock)) == {}
    fleet.tick()
    assert fleet.terminals[silent].version() == version and newcomer.version() == version
    assert fleet.devices(rid, status="timed_out")[0]["late"] is True


def test_config_rollout__a_device_enrolled_mid_rollout_joins_the_wave_it_is_at(fleet):
    for _ in range(4):
        fleet.enroll("s1")
    v1 = fleet.baseline()
    rid = fleet.rollout("config", {"content": V2, "target": {"stores": ["s1"]},
                                   "waves": ["2", "100%"], "soak_s": 0,
                                   "gates": {"approve_after": [1]}})  # fmt: skip
    fleet.until(rid, lambda v: v["status"] == "awaiting_approval")
    newcomer = fleet.enroll("s1")
    elsewhere = fleet.enroll("s2")  # not targeted: not joined
    sent = fleet.tx(lambda c: reconcile.reconcile(c, fleet.key, fleet.clock))
    # the newcomer waits for the rollout (not given v1 meanwhile); the other follows
    # the fleet's v1
    assert sent == {("config", v1): [elsewhere.device_id]}
    joined = fleet.devices(rid, wave=1)
    assert [d["device_id"] for d in joined if d["late"]] == [newcomer.device_id]
    assert fleet.view(rid)["waves"][0]["targeted"] == 3
    fleet.control(rid, "approve")
    v = fleet.until(rid, _finished)
    assert v["status"] == "succeeded" and v["targeted"] == 5
    assert newcomer.version() == v1 + 1 and elsewhere.version() == v1
    assert {d["device_id"] for d in fleet.devices(rid, status="healthy")} >= {newcomer.device_id}


def test_config_rollout__retry_failed_after_success__the_sweep_notifies_and_follows_them(fleet):
    for _ in range(4):
        fleet.enroll("s1")
    fleet.baseline()
    silent = sorted(fleet.terminals)[-1]
    fleet.terminals[silent].online = False
    rid = fleet.rollout("config", {
        "content": V2, "target": {"device_ids": sorted(fleet.terminals)}, "waves": ["100%"],
        "soak_s": 0, "device_timeout_s": 60,
        "abort": {"failure_percent": 50, "min_sample_wave": 4, "min_sample_total": 4},
    })  # fmt: skip
    v = fleet.until(rid, _finished)
    assert v["status"] == "succeeded" and v["waves"][0]["timed_out"] == 1
    version = v["document"]["version"]
    fleet.terminals[silent].online = True
    after = fleet.control(rid, "retry_failed", reason="it is back")
    assert after["status"] == "succeeded" and after["waves"][0]["pending"] == 1
    assert fleet.tx(lambda c: reconcile.reconcile(c, fleet.key, fleet.clock)) == {}
    d = fleet.devices(rid, status="notified")
    assert [x["device_id"] for x in d] == [silent] and d[0]["command_id"]
    fleet.tick()
    fleet.tx(lambda c: reconcile.reconcile(c, fleet.key, fleet.clock))
    v = fleet.view(rid)
    assert v["waves"][0]["healthy"] == 4 and v["waves"][0]["timed_out"] == 0
    assert fleet.terminals[silent].version() == version
    assert fleet.commands_for("config", version)[silent] == 2  # the expired one, the retry


def test_reconcile__two_sweeps_at_once_queue_a_late_joiner_once(fleet):
    fleet.enroll("s1")
    v1 = fleet.baseline()
    late = fleet.enroll("s1")
    with fleet.backend.pool.connection() as a, fleet.backend.pool.connection() as b:
        with a.transaction():
            first = reconcile.reconcile(a, fleet.key, fleet.clock)
            with b.transaction():  # the other sweep, while the first holds its lock
                assert reconcile.reconcile(b, fleet.key, fleet.clock) == {}
        assert first == {("config", v1): [late.device_id]}
        with b.transaction():  # after it committed: the command is pending, nothing to do
            assert reconcile.reconcile(b, fleet.key, fleet.clock) == {}
    assert fleet.commands_for("config", v1)[late.device_id] == 1


# --- windows -------------------------------------------------------------------------------


def test_config_rollout__a_store_outside_its_window_is_held_until_it_opens(fleet):
    for n in range(4):
        fleet.enroll(f"s{n % 2}")
    fleet.baseline()
    # now 08:00 UTC, 09:00 in Berlin: s1's window opens at 10:00 there; s0 has none
    rid = fleet.rollout("config", {
        "content": V2, "target": {"all": True}, "waves": ["100%"], "soak_s": 0,
        "windows": {"s1": {"tz": "Europe/Berlin", "start": "10:00", "end": "12:00"}},
    })  # fmt: skip
    held = fleet.devices(rid, status="held")
    assert {d["store"] for d in held} == {"s1"} and len(held) == 2
    for _ in range(6):
        fleet.tick(60)  # 08:06 UTC: still closed
    v = fleet.view(rid)
    assert v["status"] == "running" and v["waves"][0]["held"] == 2
    assert v["waves"][0]["healthy"] == 2
    fleet.clock.advance(3600)  # 09:06 UTC, 10:06 in Berlin
    v = fleet.until(rid, _finished)
    assert v["status"] == "succeeded"
    s1 = [d for d in fleet.devices(rid) if d["store"] == "s1"]
    assert all(d["notified_at"] >= T0 + 3600 for d in s1)


# --- replays -------------------------------------------------------------------------------


def test_steps_replayed__no_device_is_commanded_twice_for_a_version(fleet):
    for n in range(6):
        fleet.enroll(f"s{n % 2}")
    fleet.baseline()
    rid = fleet.rollout("config", {"content": V2, "target": {"all": True},
                                   "waves": ["50%", "100%"], "soak_s": 0,
                                   "rate_per_minute": 2})  # fmt: skip
    v = fleet.view(rid)
    version = v["document"]["version"]
    assert v["waves"][0]["notified"] == 2 and v["waves"][0]["held"] == 1  # the rate
    services = {"pool": fleet.backend.pool, "signing_key": fleet.key}

    def replay(fn: Callable[..., Any], state: dict[str, Any], **kw: Any) -> Any:
        ctx = StepContext(run_id=v["run_id"], step="replayed", attempt=1,
                          idempotency_key="replay", clock=fleet.clock,
                          input={"rollout_id": rid}, services=services, **kw)  # fmt: skip
        return fn(state, ctx)

    before = fleet.commands_for("config", version)
    # a crash after the step's commit, before the engine's: the step runs again
    assert replay(steps.create_version, {"rollout_id": rid}) == {"version": version}
    replay(steps.broadcast, {"rollout_id": rid}, item=1)
    replay(steps.poll_wave, {"rollout_id": rid, "wave": 1})
    assert fleet.commands_for("config", version) == before
    fleet.clock.advance(61)  # the rate's minute passed: one more may go, once
    replay(steps.poll_wave, {"rollout_id": rid, "wave": 1})
    replay(steps.poll_wave, {"rollout_id": rid, "wave": 1})
    assert sum(fleet.commands_for("config", version).values()) == 3
    v = fleet.until(rid, _finished, seconds=31)
    assert v["status"] == "succeeded"
    assert fleet.commands_for("config", version) == Counter(dict.fromkeys(fleet.terminals, 1))


# --- policy --------------------------------------------------------------------------------

POLICY = {"rules": [{"id": "big", "type": "amount_over", "max_minor": 100_000,
                     "action": "online"}]}  # fmt: skip


def test_policy_rollout__persisted_and_activated_on_every_target(fleet):
    for _ in range(4):
        fleet.enroll("s1", group="berlin")
    rid = fleet.rollout("policy", {"content": POLICY, "target": {"groups": ["berlin"]},
                                   "waves": ["1", "100%"], "soak_s": 0})  # fmt: skip
    v = fleet.until(rid, _finished)
    assert v["status"] == "succeeded", v
    version = v["document"]["version"]
    assert all(t.version("policy") == version for t in fleet.terminals.values())
    assert v["finalized"]["scope"] == "group" and v["finalized"]["value"] == "berlin"
    runs = fleet.sql("SELECT workflow_type, status FROM workflow_runs")
    assert runs == [("PolicyRollout", "COMPLETED")]


# --- release -------------------------------------------------------------------------------


def _release_row(fleet: Fleet, release: str, digest: str) -> None:
    fleet.sql(
        "INSERT INTO releases (release, manifest_sha256, sums, signature, files, bytes, "
        "new_bytes, uploaded_at, uploaded_by) VALUES (%s, %s, '', %s, 3, 1000, 1000, %s, 't') "
        "RETURNING release",
        release,
        digest,
        b"\x00" * 64,
        T0,
    )


def test_release_rollout__refused_by_terminals_that_cannot_install__stops_in_wave_1(fleet):
    for n in range(6):
        fleet.enroll(f"s{n % 2}")
    _release_row(fleet, "1.1.0", "ab" * 32)
    rid = fleet.rollout("release", {
        "release": "1.1.0", "target": {"binary_versions": ["1.0.0"]}, "waves": ["2", "100%"],
        "soak_s": 0, "abort": {"failure_percent": 20, "min_sample_wave": 2,
                               "min_sample_total": 2},
    })  # fmt: skip
    v = fleet.until(rid, _finished)
    assert v["status"] == "rolled_back", v
    assert v["document"]["kind"] == "release" and v["document"]["release"] == "1.1.0"
    assert v["abort"]["criterion"] == "wave_failure_rate" and v["abort"]["wave"] == 1
    assert v["waves"][0]["refused"] == 2 and v["waves"][1]["cancelled"] == 4
    doc = fleet.sql("SELECT content, withdrawn_at FROM sync_documents WHERE kind = 'release'")
    assert doc[0][0] == {"release": "1.1.0", "manifest_sha256": "ab" * 32, "files": 3,
                         "bytes": 1000}  # fmt: skip
    assert doc[0][1] is not None  # withdrawn
    refused = fleet.devices(rid, status="refused")
    assert all(d["last_error"] and "install" in d["last_error"] for d in refused), refused
    # a refusal changed nothing on the terminal: nothing to restore
    assert v["rollback"] == {"status": "done", "to_restore": 0, "restored": 0, "failed": 0,
                             "timed_out": 0, "pending": 0}  # fmt: skip
    installs = fleet.sql("SELECT count(*) FROM commands WHERE action = 'install_release'")
    assert installs == [(2,)]


# --- on real Celery workers ----------------------------------------------------------------

#: Bounds on waits against real workers; reached only when something is broken.
WORKER_READY_S = 60.0
ROLLOUT_S = 180.0


@pytest.fixture
def broker() -> Iterator[str]:
    """A Redis database number of this test's own (taken by SET NX on db 0, as
    test_celery_executor takes one), flushed at the end."""
    redis = pytest.importorskip("redis")
    import services

    try:
        base = services.redis_url()
    except Exception as exc:  # no Redis, and none could be started
        pytest.skip(f"no Redis: {exc}")
    parts = urlsplit(base)
    admin = redis.Redis.from_url(urlunsplit(parts._replace(path="/0")))
    for n in range(1, 16):
        if admin.set(f"tillflow-test-db:{n}", os.getpid(), nx=True, ex=600):
            url = urlunsplit(parts._replace(path=f"/{n}"))
            redis.Redis.from_url(url).flushdb()
            try:
                yield url
            finally:
                redis.Redis.from_url(url).flushdb()
                admin.delete(f"tillflow-test-db:{n}")
            return
    pytest.fail("no free Redis database number (1-15) for this test")


class Worker:
    """One ``tillflow cloud worker`` process (its own session: a kill takes its pool)."""

    def __init__(self, root: Path, n: int, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TILLFLOW_", "CLOUD_"))}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        self.log_path = root / f"worker{n}.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge.cli", "cloud", "worker", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                env=env, start_new_session=True,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WORKER_READY_S
        while f"worker {self.proc.pid} ready" not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "worker not ready:\n" + self.log()
            time.sleep(0.05)

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _cut_database(url: str, seconds: float) -> None:
    """The database away for ``seconds``: no connection allowed, every one cut (as a
    PostgreSQL restart looks to its clients), then back."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    terminate = b"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'.encode())
        try:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                conn.execute(terminate, (name,))
                time.sleep(0.2)
        finally:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'.encode())


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["worker_killed", "database_away"])
def test_config_rollout__on_celery_workers__a_fault_mid_rollout__finishes_once_each(
    new_database, broker, tmp_path, fault
):
    """The run on real ``tillflow cloud worker`` processes (Redis broker, the sweep
    waking it from its WAITs), the terminals answering in real time. Once wave 1 was
    notified: the only worker is kill -9'd and another, started then, takes the run on
    from its last commit (``worker_killed``); or the database is away for 5 s, every
    connection cut, as in a PostgreSQL restart (``database_away``). Every device ends on
    the version, each commanded once for it."""
    from cloud.executor.celery_app import make_app
    from cloud.executor.executor import CeleryExecutor
    from cloud.settings import load_settings
    from cloud.sync.keys import load_or_create_key
    from edge.engine.clock import SystemClock

    url = new_database()
    key_file = tmp_path / "signing.key"
    key, _ = load_or_create_key(key_file)
    config = tmp_path / "cloud.yaml"
    config.write_text(yaml.safe_dump({
        "database_url": url, "broker_url": broker, "sweep_interval_s": 0.5,
        "control_schedules": False, "signing_key_file": str(key_file),
    }), encoding="utf-8")  # fmt: skip
    settings = load_settings(config, environ={})
    backend = PostgresSyncBackend(url, pool_size=4)
    store = PostgresStore(url, pool_size=2)
    workers: list[Worker] = []
    engine: Engine | None = None
    clock = SystemClock()
    try:
        migrate_fleet(backend)
        sync = SyncService(backend, clock, key)
        ctx = FleetContext(settings, backend.pool, sync, clock, key)  # type: ignore[arg-type]
        engine = cloud_engine(store, CeleryExecutor(make_app(settings)), settings=settings)
        with starlette_testclient.TestClient(create_app(sync, fleet=ctx)) as client:
            f = Fleet(client, backend, store, clock, key, sync, engine, tmp_path)  # type: ignore[arg-type]
            for n in range(4):
                f.enroll(f"s{n % 2}")
            v1 = f.baseline()
            workers.append(Worker(tmp_path, 0, config))
            workers[0].wait_ready()
            rid = f.rollout("config", {"content": V2, "target": {"all": True},
                                       "waves": ["2", "100%"], "soak_s": 0})  # fmt: skip
            deadline = time.monotonic() + ROLLOUT_S
            killed = False
            while True:
                v = f.view(rid)
                if v["status"] in ("succeeded", "rolled_back", "failed"):
                    break
                assert time.monotonic() < deadline, f"{v}\n{workers[-1].log()[-4000:]}"
                if not killed and v["waves"][0]["notified"] == 2:
                    killed = True
                    if fault == "worker_killed":
                        workers[0].kill9()
                        workers.append(Worker(tmp_path, 1, config))
                        workers[-1].wait_ready()
                    else:
                        _cut_database(url, 5.0)
                    continue
                for t in f.terminals.values():
                    t.sync()
                time.sleep(0.2)
            assert killed and v["status"] == "succeeded", v
            version = v["document"]["version"]
            assert version == v1 + 1
            for t in f.terminals.values():
                t.sync()
                assert t.version() == version
            assert f.commands_for("config", version) == Counter(dict.fromkeys(f.terminals, 1))
            if fault == "database_away":
                assert "sweep pass failed" in workers[0].log(), workers[0].log()[-4000:]
    finally:
        for w in workers:
            w.kill9()
        if engine is not None:
            engine.close()
        store.close()
        backend.close()


# --- health from the sales, not only the heartbeat ----------------------------------------


def test_config_rollout__a_device_whose_payments_stop_being_approved_fails(fleet):
    """A terminal whose heartbeat looks fine but whose sales since the change are none
    approved (three received, all reversed) fails its soak; the others stay healthy."""
    for n in range(4):
        fleet.enroll(f"s{n}")
    fleet.baseline()
    rid = fleet.rollout("config", {
        "content": V2, "target": {"all": True}, "waves": ["100%"], "soak_s": 300,
        "abort": {"failure_percent": 50, "min_sample_wave": 4, "min_sample_total": 4},
    })  # fmt: skip
    fleet.until(rid, lambda v: v["waves"][0]["applied"] == 4)
    sick, *well = sorted(fleet.terminals)
    applied_at = max(d["applied_at"] for d in fleet.devices(rid))
    for seq in range(3):  # what the sync service stores as the terminal's sales arrive
        fleet.sql(
            "INSERT INTO sync_messages (device_id, stream, seq, message_id, topic, payload,"
            " created_at, content_hash, received_at) VALUES (%s, %s, %s, %s, 'payment',"
            " %s::jsonb, %s, %s, %s) RETURNING seq",
            sick, "f" * 32, 900 + seq, f"m-{seq}", '{"decision": "reversed"}',
            applied_at, "0" * 64, applied_at + 1 + seq,
        )  # fmt: skip
    for seq, device in enumerate(well):  # one approved sale does not make a verdict
        fleet.sql(
            "INSERT INTO sync_messages (device_id, stream, seq, message_id, topic, payload,"
            " created_at, content_hash, received_at) VALUES (%s, %s, %s, %s, 'payment',"
            " %s::jsonb, %s, %s, %s) RETURNING seq",
            device, "f" * 32, 900 + seq, f"ok-{seq}", '{"decision": "approved"}',
            applied_at, "0" * 64, applied_at + 1,
        )  # fmt: skip
    v = fleet.until(rid, _finished)
    assert v["status"] == "succeeded", v  # 1 of 4 failed: under the 50% threshold
    by_id = {d["device_id"]: d for d in fleet.devices(rid)}
    assert by_id[sick]["status"] == "failed"
    assert by_id[sick]["last_error"] == "payments failing: 3 since the change, none approved"
    assert all(by_id[d]["status"] == "healthy" for d in well)
