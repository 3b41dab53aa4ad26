"""Documents and commands on PostgreSQL, through the Fleet API app with a virtual clock:
versions validated with the terminal's models (a bad one is a 422 naming the field, and
nothing is stored), scoped assignments and the effective document of a device (device >
store > group > fleet), assign/unassign as one transaction with their audit record, and
commands to a device, a group or a store followed to applied, refused (the device's
reason) and expired -- answered by real device-side sync clients
(``sync.device.client.SyncClient`` over the app's own HTTP client, their commands checked
and applied by ``sync.device.commands`` into an ``edge`` store)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cloud.api.app import create_app
from cloud.api.fleet.context import FleetContext
from cloud.api.serve import migrate_fleet
from cloud.documents import commands as cmds
from cloud.documents import service
from cloud.fleet import tokens
from cloud.fleet.tokens import Principal
from cloud.settings import CloudSettings
from cloud.sync.postgres import PostgresSyncBackend
from edge.engine import Engine, InlineExecutor, Status
from edge.engine.clock import FakeClock
from edge.store.memory import MemoryStore
from edge.terminal.service.terminal import offline_acknowledgement
from sync import signing
from sync.device.client import SyncClient
from sync.device.identity import enroll, load_key
from sync.server import SyncService

starlette_testclient = pytest.importorskip("starlette.testclient")

T0 = 1_800_000_000.0
BASE = "http://testserver"
POLICY = {
    "rules": [
        {"id": "big", "type": "amount_over", "max_minor": 100_000, "action": "online"},
        {"id": "bins", "type": "bin_block", "bins": ["411111"]},
    ]
}


class Hooks:
    """The terminal side a sync client needs, over a real edge store: health reports the
    documents in force there."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def _version(self, kind: str) -> int | None:
        active = self.store.active_document(kind)
        return None if active is None else active[0]

    def health(self) -> dict[str, Any]:
        return {
            "storage": {"state": "ok", "used_percent": 1.0},
            "outbox_depth": self.store.outbox_stats().depth,
            "config_version": self._version("config"),
            "policy_version": self._version("policy"),
        }

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        ack = offline_acknowledgement(self.store, outbox_through, audit_through)
        return self.store.acknowledge(ack).messages

    def refresh_documents(self) -> None:
        pass

    def active_policy_version(self) -> int | None:
        return self._version("policy")


@dataclass
class Device:
    device_id: str
    store: MemoryStore
    client: SyncClient
    taken: list[str] = field(default_factory=list)

    def sync(self) -> list[Any]:
        """One exchange; the commands it took (each also kept in ``taken``)."""
        outcome = self.client.sync_once()
        self.taken += [o.command_id for o in outcome.commands]
        return list(outcome.commands)


@dataclass
class App:
    client: Any
    backend: PostgresSyncBackend
    clock: FakeClock
    ctx: FleetContext
    work: Path
    url: str
    tokens: dict[str, str] = field(default_factory=dict)
    _n: Iterator[int] = field(default_factory=itertools.count)

    def call(self, method: str, path: str, role: str = "operator", **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"}
        return self.client.request(method, path, headers=headers, **kw)

    def ok(self, method: str, path: str, status: int = 200, **kw: Any) -> Any:
        answer = self.call(method, path, **kw)
        assert answer.status_code == status, answer.text
        return answer.json()

    def refused(self, method: str, path: str, status: int, **kw: Any) -> dict[str, Any]:
        answer = self.call(method, path, **kw)
        assert answer.status_code == status, answer.text
        error: dict[str, Any] = answer.json()["error"]
        return error

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.backend.pool.connection() as conn:
            return conn.execute(query, params or None).fetchall()

    def count(self, table: str) -> int:
        return int(self.sql(f"SELECT count(*) FROM {table}")[0][0])

    def audit_actions(self) -> list[str]:
        return [r[0] for r in self.sql("SELECT action FROM cloud_audit ORDER BY seq")]

    def device(self, store: str, group: str | None = None) -> Device:
        """A terminal enrolled with a token from the API, syncing through the app."""
        body = {"store": store} | ({"group": group} if group else {})
        token = self.ok("POST", "/api/v1/enroll-tokens", 201, json=body)["token"]
        data_dir = self.work / f"device-{next(self._n)}"
        identity = enroll(BASE, token, data_dir, "1.0.0", http=self.client, clock=self.clock.now)
        edge_store = MemoryStore()
        client = SyncClient(
            identity, load_key(data_dir), edge_store, Hooks(edge_store), self.clock,
            self.client, binary_version="1.0.0",
        )  # fmt: skip
        return Device(identity.device_id, edge_store, client)

    def document(self, kind: str, content: dict[str, Any], **extra: Any) -> int:
        made = self.ok("POST", f"/api/v1/documents/{kind}", 201, json={"content": content} | extra)
        return int(made["version"])

    def send(self, target: dict[str, str], action: str, **extra: Any) -> dict[str, Any]:
        body = {"target": target, "action": action} | extra
        made: dict[str, Any] = self.ok("POST", "/api/v1/commands", 201, json=body)
        return made

    def status(self, command_id: str) -> str:
        return str(self.ok("GET", f"/api/v1/commands/{command_id}", role="read_only")["status"])


@pytest.fixture
def app(new_database, tmp_path) -> Iterator[App]:
    url = new_database()
    backend = PostgresSyncBackend(url, pool_size=4, pool_timeout_s=5.0)
    try:
        migrate_fleet(backend)
        clock, key = FakeClock(T0), signing.new_key()
        sync = SyncService(backend, clock, key)
        ctx = FleetContext(CloudSettings(database_url=url), backend.pool, sync, clock, key)
        with starlette_testclient.TestClient(
            create_app(sync, fleet=ctx), raise_server_exceptions=False
        ) as client:
            made = App(client, backend, clock, ctx, tmp_path, url)
            with backend.pool.connection() as conn, conn.transaction():
                for role in tokens.ROLES:
                    made.tokens[role], _ = tokens.create(conn, f"{role}-t", role, at=T0, by="t")
            yield made
    finally:
        backend.close()


# --- documents -----------------------------------------------------------------------------


def test_documents__a_bad_config_is_422_naming_the_field_and_nothing_is_stored(app):
    before = app.count("cloud_audit")
    error = app.refused("POST", "/api/v1/documents/config", 422,
                        json={"content": {"risk": {"floor_limit_minor": -1}}})  # fmt: skip
    assert error["code"] == "invalid_document"
    assert error["field"] == "content.risk.floor_limit_minor"
    assert "greater than or equal to 0" in error["message"]
    typo = app.refused("POST", "/api/v1/documents/config", 422,
                       json={"content": {"risk": {"floor_limt_minor": 5}}})  # fmt: skip
    assert typo["field"] == "content.risk.floor_limt_minor"
    bad_rule = {"rules": [{"id": "x", "type": "amount_over", "max_minor": 5, "action": "nope"}]}
    policy = app.refused("POST", "/api/v1/documents/policy", 422, json={"content": bad_rule})
    assert policy["field"] == "content.rules[0].action"
    nul = app.refused("POST", "/api/v1/documents/policy", 422,
                      json={"content": {**POLICY, "name": "a\u0000b"}})  # fmt: skip
    assert nul["code"] == "invalid_document"
    assert app.count("sync_documents") == 0 and app.count("cloud_audit") == before
    assert app.ok("GET", "/api/v1/documents/config", role="read_only") == {
        "items": [],
        "next": None,
    }


def test_documents__versions_only_grow_are_listed_newest_first_and_read_back(app):
    assert app.document("config", {"risk": {"floor_limit_minor": 3000}}) == 1
    assert app.document("config", {"risk": {"floor_limit_minor": 1000}}) == 2
    assert app.document("config", {"risk": {}}, version=7) == 7
    stale = app.refused("POST", "/api/v1/documents/config", 409,
                        json={"content": {"risk": {}}, "version": 7})  # fmt: skip
    assert (stale["code"], stale["field"]) == ("stale_version", "version")
    page = app.ok("GET", "/api/v1/documents/config?limit=2", role="read_only")
    assert [d["version"] for d in page["items"]] == [7, 2] and page["next"] == "2"
    rest = app.ok("GET", f"/api/v1/documents/config?limit=2&after={page['next']}", role="auditor")
    assert [d["version"] for d in rest["items"]] == [1] and rest["next"] is None
    one = app.ok("GET", "/api/v1/documents/config/1", role="read_only")
    assert one["content"] == {"risk": {"floor_limit_minor": 3000}}
    missing = app.refused("GET", "/api/v1/documents/config/3", 404, role="read_only")
    assert missing["code"] == "document_not_found"
    # a policy takes the next version written into it, or states its own (above the newest)
    first = app.ok("POST", "/api/v1/documents/policy", 201, json={"content": POLICY})
    assert first["version"] == 1 and first["content"]["version"] == 1
    assert first["content"]["rules"][1]["action"] == "decline"  # as the terminal reads it
    assert app.document("policy", {**POLICY, "version": 5}) == 5
    again = app.refused("POST", "/api/v1/documents/policy", 409,
                        json={"content": {**POLICY, "version": 5}})  # fmt: skip
    assert again["code"] == "stale_version"
    odd = app.refused("POST", "/api/v1/documents/policy", 422,
                      json={"content": {**POLICY, "version": 9}, "version": 8})  # fmt: skip
    assert odd["field"] == "content.version"
    assert app.audit_actions().count("document.create") == 5


def test_documents__read_only_and_auditors_look_operators_write(app):
    assert app.call("POST", "/api/v1/documents/config", "read_only",
                    json={"content": {}}).status_code == 403  # fmt: skip
    assert app.call("POST", "/api/v1/documents/config", "auditor",
                    json={"content": {}}).status_code == 403  # fmt: skip
    assert app.call("GET", "/api/v1/documents/config").status_code == 200
    assert app.client.get("/api/v1/documents/config").status_code == 401
    assert app.count("sync_documents") == 0


# --- assignments and the effective document ------------------------------------------------


def test_effective__the_most_specific_assignment_wins_device_store_group_fleet(app):
    d1 = app.device("s1", "g1")  # everything names it
    d2 = app.device("s1", "g2")  # its store
    d3 = app.device("s2", "g1")  # its group
    d4 = app.device("s2")  # only the fleet
    v = [app.document("config", {"risk": {"floor_limit_minor": n}}) for n in (1, 2, 3, 4)]
    path = "/api/v1/documents/config/assignments"
    for version, scope, value in [
        (v[0], "fleet", None),
        (v[1], "group", "g1"),
        (v[2], "store", "s1"),
        (v[3], "device", d1.device_id),
    ]:
        made = app.ok("POST", path, 201, json={"version": version, "scope": scope, "value": value})
        assert (made["scope"], made["value"], made["previous_version"]) == (scope, value, None)

    def effective(d: Device) -> tuple[Any, Any, Any]:
        e = app.ok("GET", f"/api/v1/devices/{d.device_id}/effective/config", role="read_only")
        return e["version"], e["scope"], e["content"]["risk"]["floor_limit_minor"]

    assert effective(d1) == (v[3], "device", 4)
    assert effective(d2) == (v[2], "store", 3)
    assert effective(d3) == (v[1], "group", 2)
    assert effective(d4) == (v[0], "fleet", 1)
    # replacing says what was there; removing the device's own falls back to its store
    moved = app.ok("POST", path, 201, json={"version": v[0], "scope": "group", "value": "g1"})
    assert moved["previous_version"] == v[1]
    assert effective(d3) == (v[0], "group", 1)
    mine = app.ok("GET", f"{path}?scope=device", role="read_only")["items"]
    assert [a["value"] for a in mine] == [d1.device_id]
    gone = app.ok("DELETE", f"{path}/{mine[0]['assignment_id']}")
    assert gone["version"] == v[3]
    assert effective(d1) == (v[2], "store", 3)
    assert app.refused("DELETE", f"{path}/{mine[0]['assignment_id']}", 404)["code"] == (
        "assignment_not_found"
    )
    assert len(app.ok("GET", path, role="auditor")["items"]) == 3
    actions = app.audit_actions()
    assert actions.count("document.assign") == 5 and actions.count("document.unassign") == 1
    # nothing assigned for policies: the device follows none
    none = app.ok("GET", f"/api/v1/devices/{d4.device_id}/effective/policy", role="read_only")
    assert (none["version"], none["scope"], none["content"], none["in_sync"]) == (
        None, None, None, True
    )  # fmt: skip


def test_effective__in_sync_once_the_devices_heartbeat_reports_the_version(app):
    d = app.device("s1", "g1")
    v = app.document("config", {"risk": {"floor_limit_minor": 4000}})
    app.ok("POST", "/api/v1/documents/config/assignments", 201,
           json={"version": v, "scope": "store", "value": "s1"})  # fmt: skip
    path = f"/api/v1/devices/{d.device_id}/effective/config"
    d.sync()
    assert app.ok("GET", path)["in_sync"] is False
    app.send({"store": "s1"}, "update_config", document={"kind": "config", "version": v})
    d.sync()  # takes and applies it
    d.sync()  # reports it in force
    e = app.ok("GET", path)
    assert (e["in_force_version"], e["in_sync"]) == (v, True)
    assert d.store.active_document("config") == (v, {"risk": {"floor_limit_minor": 4000}})


def test_assignments__refusals_name_what_is_wrong_and_store_nothing(app):
    v = app.document("config", {"risk": {}})
    path = "/api/v1/documents/config/assignments"
    before = app.count("cloud_audit")
    cases = [
        ({"version": v + 1, "scope": "fleet"}, 404, "document_not_found"),
        ({"version": v, "scope": "device", "value": "dev_nope"}, 404, "device_not_found"),
        ({"version": v, "scope": "fleet", "value": "x"}, 422, "invalid_request"),
        ({"version": v, "scope": "store"}, 422, "invalid_request"),
        ({"version": v, "scope": "region", "value": "eu"}, 422, "invalid_request"),
        ({"version": v, "scope": "store", "value": "s\u0000"}, 422, "invalid_request"),
    ]
    for body, status, code in cases:
        assert app.refused("POST", path, status, json=body)["code"] == code, body
    assert app.refused("POST", path, 403, role="read_only", json={"version": v, "scope": "fleet"})
    assert app.count("document_assignments") == 0 and app.count("cloud_audit") == before
    effective = app.refused("GET", "/api/v1/devices/dev_nope/effective/config", 404)
    assert effective["code"] == "device_not_found"


def test_assign__a_step_and_its_compensation_each_one_transaction_with_its_record(app):
    who = Principal("tok_wf", "ConfigRollout", "operator")
    v1 = app.document("config", {"risk": {"floor_limit_minor": 1}})
    v2 = app.document("config", {"risk": {"floor_limit_minor": 2}})
    with app.ctx.transaction() as conn:
        service.assign(conn, "config", v1, "group", "g1", who, at=T0)
    with app.ctx.transaction() as conn:
        step = service.assign(conn, "config", v2, "group", "g1", who, at=T0 + 1)
    assert (step.version, step.previous, step.target) == (v2, v1, "config:group:g1")
    with app.ctx.transaction() as conn:  # the compensation puts back what was there
        service.unassign(conn, step.kind, step.scope, step.value, who, at=T0 + 2,
                         restore=step.previous)  # fmt: skip
    assert app.sql("SELECT version FROM document_assignments") == [(v1,)]
    # a transaction that fails after the assignment leaves neither it nor its record
    rows = app.count("cloud_audit")
    with pytest.raises(RuntimeError), app.ctx.transaction() as conn:
        service.assign(conn, "config", v2, "fleet", None, who, at=T0 + 3)
        raise RuntimeError("the step after failed")
    assert app.count("document_assignments") == 1 and app.count("cloud_audit") == rows
    log = app.sql("SELECT actor, action, target, detail FROM cloud_audit "
                  "WHERE action LIKE 'document.%assign' ORDER BY seq")  # fmt: skip
    assert [(r[0], r[1], r[2]) for r in log] == [
        ("ConfigRollout", "document.assign", "config:group:g1"),
        ("ConfigRollout", "document.assign", "config:group:g1"),
        ("ConfigRollout", "document.unassign", "config:group:g1"),
    ]
    assert log[1][3] == {"version": v2, "previous": v1}
    verified = app.ok("GET", "/api/v1/audit/verify", role="auditor")
    assert verified["ok"] is True


#: A rollout's persist as the rollouts issue will write it, and a later step that fails.
ASSIGN_YAML = """\
workflow_type: assign_document
version: "1"
saga: true
steps:
  - name: note_assignment
    type: STANDARD
    function: cloud.documents.steps:note_assignment
  - name: assign
    type: STANDARD
    function: cloud.documents.steps:assign
    compensate: cloud.documents.steps:restore_assignment
  - name: route
    type: DECISION
    routes:
      - when: state.fail
        next: fail
    default: done
  - name: done
    type: STANDARD
    function: tf_steps:noop
    next: END
  - name: fail
    type: STANDARD
    function: tf_steps:fatal
"""


def test_assign__as_a_workflow_on_the_engine_a_failure_later_restores_what_was_there(app):
    from cloud.store.postgres import PostgresStore

    v1, v2, v3 = (app.document("config", {"risk": {"floor_limit_minor": n}}) for n in (1, 2, 3))
    app.ok("POST", "/api/v1/documents/config/assignments", 201,
           json={"version": v1, "scope": "group", "value": "g1"})  # fmt: skip
    (app.work / "assign_document.yaml").write_text(ASSIGN_YAML, encoding="utf-8")
    store = PostgresStore(app.url, pool_size=2)  # the engine's tables, in the same database
    engine = Engine(store, InlineExecutor(), clock=app.clock, services={"pool": app.backend.pool})
    try:
        engine.register(app.work / "assign_document.yaml")
        job = {"kind": "config", "scope": "group", "value": "g1", "actor": "alice"}
        ok = engine.start("assign_document", {**job, "version": v2, "fail": False})
        assert engine.get(ok).status is Status.COMPLETED
        assert engine.get(ok).state["previous"] == v1
        assert app.sql("SELECT version FROM document_assignments") == [(v2,)]
        bad = engine.start("assign_document", {**job, "version": v3, "fail": True})
        assert engine.get(bad).status is Status.ROLLED_BACK
        assert app.sql("SELECT version FROM document_assignments") == [(v2,)]  # put back
        fresh = engine.start("assign_document", {**job, "value": "g9", "version": v3, "fail": True})
        assert engine.get(fresh).status is Status.ROLLED_BACK
        assert app.sql("SELECT value FROM document_assignments") == [("g1",)]  # none there before
    finally:
        engine.close()
        store.close()
    log = app.sql("SELECT actor, action, target, detail FROM cloud_audit "
                  "WHERE actor = 'alice' ORDER BY seq")  # fmt: skip
    assert [(r[1], r[3]) for r in log] == [
        ("document.assign", {"version": v2, "previous": v1}),
        ("document.assign", {"version": v3, "previous": v2}),
        ("document.unassign", {"version": v3, "restored": v2}),
        ("document.assign", {"version": v3, "previous": None}),
        ("document.unassign", {"version": v3, "restored": None}),
    ]


# --- commands ------------------------------------------------------------------------------


def test_commands__a_group_command_reaches_each_active_device_of_the_group_once(app):
    group = [app.device("s1", "tills"), app.device("s2", "tills"), app.device("s3", "tills")]
    revoked, other = app.device("s1", "tills"), app.device("s1", "kiosks")
    app.ok("POST", f"/api/v1/devices/{revoked.device_id}/revoke")
    v = app.document("config", {"risk": {"floor_limit_minor": 3000}})
    made = app.send({"group": "tills"}, "update_config", document={"kind": "config", "version": v})
    assert (made["scope"], made["value"], made["document"]) == (
        "group", "tills", {"kind": "config", "version": v}
    )  # fmt: skip
    sent = {c["device_id"]: c for c in made["commands"]}
    assert set(sent) == {d.device_id for d in group}  # the revoked one is left out
    assert {c["seq"] for c in made["commands"]} == {1}  # each under its own device's seq
    assert len({c["command_id"] for c in made["commands"]}) == 3
    for _ in range(3):  # the first sync takes it; the others neither again nor twice
        for d in [*group, other]:
            d.sync()
    for d in group:
        assert d.taken == [sent[d.device_id]["command_id"]]
        assert d.store.active_document("config") == (v, {"risk": {"floor_limit_minor": 3000}})
        assert app.status(sent[d.device_id]["command_id"]) == "applied"
    assert other.taken == [] and other.store.active_document("config") is None
    batch = app.ok("GET", f"/api/v1/command-batches/{made['batch_id']}", role="read_only")
    assert (batch["total"], batch["by_status"]["applied"], batch["action"]) == (
        3, 3, "update_config"
    )  # fmt: skip
    listed = app.ok("GET", f"/api/v1/commands?batch={made['batch_id']}", role="auditor")
    assert {c["device_id"] for c in listed["items"]} == set(sent)
    assert app.sql("SELECT count(*) FROM commands WHERE batch_id = %s", made["batch_id"]) == [(3,)]
    log = app.sql("SELECT target, detail FROM cloud_audit WHERE action = 'command.send'")
    assert log[0][0] == "group:tills" and log[0][1]["devices"] == 3


def test_commands__a_store_command_and_statuses_as_the_device_answers(app):
    a, b = app.device("shop-9"), app.device("shop-9", "g")
    v = app.document("policy", POLICY)
    first = app.send({"store": "shop-9"}, "activate_policy",
                     document={"kind": "policy", "version": v})  # fmt: skip
    ids = {c["device_id"]: c["command_id"] for c in first["commands"]}
    assert set(ids) == {a.device_id, b.device_id}
    assert {app.status(i) for i in ids.values()} == {"queued"}
    a.sync()
    assert app.status(ids[a.device_id]) == "delivered"  # taken, its result not yet up
    a.sync()
    assert app.status(ids[a.device_id]) == "applied"
    # the same version again: the device refuses it (not above the one in force)
    again = app.send({"device_id": a.device_id}, "activate_policy",
                     document={"kind": "policy", "version": v})  # fmt: skip
    [cmd] = again["commands"]
    a.sync()
    a.sync()
    got = app.ok("GET", f"/api/v1/commands/{cmd['command_id']}", role="read_only")
    assert got["status"] == "refused" and got["reason"].startswith("stale_version")
    assert f"policy version {v} is not above the one in force" in got["reason"]
    refused = app.ok("GET", f"/api/v1/commands?device={a.device_id}&status=refused")
    assert [c["command_id"] for c in refused["items"]] == [cmd["command_id"]]


def test_commands__past_expiry_a_pending_command_reads_expired_and_the_device_word_wins(app):
    d = app.device("s1")
    late = app.send({"device_id": d.device_id}, "request_health", ttl_s=60)["commands"][0]
    app.clock.advance(61)
    assert app.status(late["command_id"]) == "expired"  # never delivered, now never will be
    assert d.sync() == [] and d.taken == []
    expired = app.ok("GET", "/api/v1/commands?status=expired", role="read_only")["items"]
    assert [c["command_id"] for c in expired] == [late["command_id"]]
    # applied in time offline, its result up only after the expiry: expired, then applied
    cmd = app.send({"device_id": d.device_id}, "request_health", ttl_s=60)["commands"][0]
    [taken] = d.sync()
    assert taken.status == "applied"
    app.clock.advance(61)
    assert app.status(cmd["command_id"]) == "expired"
    # the sweep writes what reads already show (the first one the device's sync marked)
    with app.ctx.transaction() as conn:
        assert cmds.sweep_expired(conn, now=app.clock.now()) == 1
    d.sync()
    assert app.status(cmd["command_id"]) == "applied"
    assert app.status(late["command_id"]) == "expired"
    assert app.sql("SELECT status FROM commands WHERE command_id = %s", late["command_id"]) == [
        ("expired",)
    ]


def test_commands__refusals_say_what_is_wrong_and_queue_nothing(app):
    d = app.device("s1", "g1")
    v = app.document("config", {"risk": {}})
    doc = {"kind": "config", "version": v}
    cases = [
        ({"target": {"group": "nobody"}, "action": "request_health"}, 404, "no_devices"),
        ({"target": {"group": "g1' OR '1'='1"}, "action": "request_health"}, 404, "no_devices"),
        ({"target": {"device_id": "dev_x"}, "action": "request_health"}, 404, "device_not_found"),
        ({"target": {"group": "g1", "store": "s1"}, "action": "request_health"}, 422,
         "invalid_request"),
        ({"target": {}, "action": "request_health"}, 422, "invalid_request"),
        ({"target": {"store": "s1"}, "action": "update_config"}, 422, "bad_document"),
        ({"target": {"store": "s1"}, "action": "activate_policy", "document": doc}, 422,
         "bad_document"),
        ({"target": {"store": "s1"}, "action": "request_health", "document": doc}, 422,
         "bad_document"),
        ({"target": {"store": "s1"}, "action": "update_config",
          "document": {"kind": "config", "version": v + 1}}, 404, "document_not_found"),
        ({"target": {"store": "s1"}, "action": "reboot"}, 422, "invalid_request"),
        ({"target": {"store": "s1"}, "action": "request_health", "ttl_s": 0}, 422,
         "invalid_request"),
    ]  # fmt: skip
    for body, status, code in cases:
        assert app.refused("POST", "/api/v1/commands", status, json=body)["code"] == code, body
    no = app.call("POST", "/api/v1/commands", "read_only",
                  json={"target": {"store": "s1"}, "action": "request_health"})  # fmt: skip
    assert no.status_code == 403
    assert app.count("commands") == 0 and "command.send" not in app.audit_actions()
    assert app.refused("GET", "/api/v1/commands/cmd_nope", 404)["code"] == "command_not_found"
    assert app.refused("GET", "/api/v1/command-batches/bat_x", 404)["code"] == "batch_not_found"
    assert app.refused("GET", "/api/v1/commands?after=x", 422)["field"] == "after"
    assert d.sync() == []


def test_commands__listed_newest_first_paged_and_filtered(app):
    a, b = app.device("s1"), app.device("s2")
    made = [app.send({"device_id": d.device_id}, "request_health")["commands"][0]["command_id"]
            for d in (a, b, a)]  # fmt: skip
    page = app.ok("GET", "/api/v1/commands?limit=2", role="read_only")
    assert [c["command_id"] for c in page["items"]] == made[::-1][:2]
    rest = app.ok("GET", f"/api/v1/commands?limit=2&after={page['next']}", role="read_only")
    assert [c["command_id"] for c in rest["items"]] == [made[0]] and rest["next"] is None
    mine = app.ok("GET", f"/api/v1/commands?device={a.device_id}", role="read_only")["items"]
    assert [(c["command_id"], c["seq"]) for c in mine] == [(made[2], 2), (made[0], 1)]
    assert app.ok("GET", "/api/v1/commands?device=nobody' OR '1'='1")["items"] == []
