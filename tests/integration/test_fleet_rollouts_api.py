"""The rollouts' Fleet API on PostgreSQL, through the app ``tillflow cloud serve`` builds
(``build_app``), its engine the one the API process makes (``FleetContext.engine()``:
the cloud's workflows on ``PostgresStore``, a ``CeleryExecutor`` on the serverless
broker under this test's ``data_dir``, whose queue folder is read to see what was
published).

A start writes the rollout row and its audit record, then starts its run: a
``workflow_runs`` row of the kind's type, key ``rollout:<id>``, input the rollout's id,
and a message naming it. A malformed document or option is a 422 naming the field, and
nothing is written (no rollout, no run, no document). A control is recorded, then wakes
the run: a run WAITING between two polls is answered and let go (its lease expired, so a
worker may claim it at once) and a message is published; any other is published again.
Roles: operate to start and steer, read to follow.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_app import Fleet

from cloud.api.fleet.context import api_engine
from cloud.api.serve import build_app, migrate_fleet
from cloud.engine import cloud_engine
from cloud.executor.celery_app import make_app
from cloud.executor.executor import CeleryExecutor
from cloud.fleet import tokens
from cloud.fleet.tokens import Principal
from cloud.rollouts import service
from cloud.rollouts.service import RolloutRequest
from cloud.settings import CloudSettings
from cloud.store.postgres import PostgresStore
from cloud.sync.keys import load_or_create_key
from cloud.sync.postgres import PostgresSyncBackend
from edge.engine import Status

starlette_testclient = pytest.importorskip("starlette.testclient")

CONFIG = {"risk": {"floor_limit_minor": 3000}}
POLICY = {
    "rules": [
        {"id": "big", "type": "amount_over", "max_minor": 100_000, "action": "online"},
        {"id": "bins", "type": "bin_block", "bins": ["411111"]},
    ]
}
TYPES = {"config": "ConfigRollout", "policy": "PolicyRollout", "release": "ReleaseRollout"}


@contextlib.contextmanager
def rollout_app(url: str, data_dir: Path, **settings_: Any) -> Iterator[Fleet]:
    """``fleet_app``'s app, its settings' data_dir this test's (the serverless broker's
    folders are made there, not in the home directory), and the signing key in a file
    there (a worker's steps read it from the settings)."""
    backend = PostgresSyncBackend(url, pool_size=4, pool_timeout_s=5.0)
    try:
        migrate_fleet(backend)
        key_file = data_dir / "control-plane.key"
        settings = CloudSettings(
            database_url=url, data_dir=data_dir, signing_key_file=key_file, **settings_
        )
        key, _ = load_or_create_key(key_file)  # the workers' steps sign with it too
        app = build_app(settings, backend, key)
        with starlette_testclient.TestClient(app, raise_server_exceptions=False) as client:
            fleet = Fleet(client, backend, url)
            for role in tokens.ROLES:
                fleet.tokens[role] = fleet.make_token(role)
            yield fleet
    finally:
        backend.close()


@pytest.fixture
def fleet(new_database, tmp_path: Path) -> Iterator[Fleet]:
    with rollout_app(new_database(), tmp_path / "cloud") as f:
        yield f


def ok(answer: Any, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return answer.json()


def refused(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    return error


def published(fleet: Fleet) -> list[str]:
    """The run ids of the messages waiting in the serverless broker's queue, oldest first."""
    queue = Path(fleet.client.app.state.fleet.settings.data_path()) / "broker" / "queue"
    if not queue.exists():
        return []
    runs = []
    for path in sorted(queue.glob("*.msg"), key=lambda p: int(p.name.split("_", 1)[0])):
        message = json.loads(path.read_text(encoding="utf-8"))
        args, _, _ = json.loads(base64.b64decode(message["body"]))
        runs.append(args[0])
    return runs


def runs(fleet: Fleet) -> list[tuple[Any, ...]]:
    return fleet.sql(
        "SELECT r.run_id, r.workflow_type, r.idempotency_key, i.input, r.status "
        "FROM workflow_runs r JOIN workflow_run_inputs i USING (run_id) ORDER BY r.created_at"
    )


def audit(fleet: Fleet) -> list[tuple[str, str, str]]:
    rows = ok(fleet.get("/api/v1/audit?limit=1000", "auditor"))["items"]
    return [(r["action"], r["actor"], r["target"]) for r in rows]


def counts(fleet: Fleet) -> tuple[int, int, int]:
    """(rollouts, workflow runs, stored documents): what a refusal must leave unchanged."""
    rollouts = fleet.sql("SELECT count(*) FROM rollouts")[0][0]
    documents = fleet.sql("SELECT count(*) FROM sync_documents")[0][0]
    workflow = fleet.sql("SELECT to_regclass('workflow_runs') IS NOT NULL")[0][0]
    n_runs = fleet.sql("SELECT count(*) FROM workflow_runs")[0][0] if workflow else 0
    return rollouts, n_runs, documents


@pytest.fixture
def devices(fleet: Fleet) -> list[str]:
    """Four enrolled terminals: three in store-1 (north, north, south), one in store-2."""
    made = [
        fleet.enroll("store-1", "north"),
        fleet.enroll("store-1", "north"),
        fleet.enroll("store-1", "south"),
        fleet.enroll("store-2", "south"),
    ]
    for term in made:
        ok(fleet.sync(term, config_version=None, storage_state="ok"))
    return [t.device_id for t in made]


# --- starting --------------------------------------------------------------------------------


def test_start__the_row_its_record_then_its_run_started_and_published(fleet, devices):
    body = {
        "content": CONFIG, "target": {"groups": ["north"]}, "waves": ["1", "100%"],
        "soak_s": 0, "seed": 7, "reason": "floor limit up",
    }  # fmt: skip
    view = ok(fleet.post("/api/v1/config/rollout", "operator", json=body), 201)
    rollout_id = view["rollout_id"]
    assert rollout_id.startswith("ro_") and view["kind"] == "config"
    assert view["status"] == "pending" and view["seed"] == 7
    assert view["options"]["waves"] == ["1", "100%"] and view["options"]["soak_s"] == 0
    assert view["threshold"]["failure_percent"] == 10.0  # defaults filled in
    assert view["targeted"] == 2 and view["reason"] == "floor limit up"  # the service's own
    assert [w["targeted"] for w in view["waves"]] == [1, 1]
    schema = fleet.client.get("/openapi.json").json()["components"]["schemas"]
    assert {"waves", "abort", "rollback", "controls"} <= set(schema["RolloutOut"]["properties"])

    [(run_id, workflow_type, key, run_input, _)] = runs(fleet)
    assert (workflow_type, key, run_input) == (
        "ConfigRollout", f"rollout:{rollout_id}", {"rollout_id": rollout_id},
    )  # fmt: skip
    assert published(fleet) == [run_id]  # the workers are told; none runs in this test
    assert ("rollout.create", "operator-test", f"rollout:{rollout_id}") in audit(fleet)

    shown = ok(fleet.get(f"/api/v1/rollouts/{rollout_id}", "read_only"))
    assert shown["rollout_id"] == rollout_id and shown["created_by"] == "operator-test"
    assert shown["run_id"] in (None, run_id)


def test_start__each_kind_its_workflow_and_the_same_rules(fleet, devices):
    policy = ok(fleet.post("/api/v1/policy/rollout", "operator",
                           json={"content": POLICY, "target": {"all": True}}), 201)  # fmt: skip
    version = ok(fleet.post("/api/v1/documents/config", "operator", json={"content": CONFIG}), 201)
    by_version = ok(fleet.post("/api/v1/config/rollout", "admin",
                               json={"version": version["version"],
                                     "target": {"stores": ["store-2"]}}), 201)  # fmt: skip
    by_key = {key: workflow_type for _, workflow_type, key, _, _ in runs(fleet)}
    assert by_key[f"rollout:{policy['rollout_id']}"] == "PolicyRollout"
    assert by_key[f"rollout:{by_version['rollout_id']}"] == "ConfigRollout"
    assert len(published(fleet)) == 2

    listed = ok(fleet.get("/api/v1/rollouts", "read_only"))
    assert {r["rollout_id"] for r in listed["items"]} == {
        policy["rollout_id"], by_version["rollout_id"],
    }  # fmt: skip
    only = ok(fleet.get("/api/v1/rollouts?kind=policy", "read_only"))["items"]
    assert [r["rollout_id"] for r in only] == [policy["rollout_id"]]
    pending = ok(fleet.get("/api/v1/rollouts?status=pending", "read_only"))["items"]
    assert len(pending) == 2
    assert ok(fleet.get("/api/v1/rollouts?status=succeeded", "read_only"))["items"] == []
    first = ok(fleet.get("/api/v1/rollouts?limit=1", "read_only"))
    assert len(first["items"]) == 1 and first["next"] is not None
    rest = ok(fleet.get(f"/api/v1/rollouts?limit=1&after={first['next']}", "read_only"))
    assert [r["rollout_id"] for r in first["items"] + rest["items"]] == [
        r["rollout_id"] for r in listed["items"]
    ]


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("config", {"content": {"risk": {"floor_limit_minor": -1}}, "target": {"all": True}},
         "content.risk.floor_limit_minor"),
        ("config", {"content": {"risk": {"floor_limt_minor": 5}}, "target": {"all": True}},
         "content.risk.floor_limt_minor"),
        ("policy", {"content": {"rules": [{"id": "x", "type": "bin_block", "bins": ["411111"],
                                           "action": "explode"}]}, "target": {"all": True}},
         "content.rules[0].action"),
        ("config", {"content": CONFIG, "target": {"all": True}, "waves": ["0%"]}, "body.waves"),
        ("config", {"content": CONFIG, "target": {"all": True}, "wavez": ["10%"]}, "body.wavez"),
        ("config", {"content": CONFIG, "target": {}}, "body.target"),
        ("config", {"content": CONFIG, "target": {"all": True},
                    "abort": {"failure_percent": 101}}, "body.abort.failure_percent"),
        ("config", {"content": CONFIG, "target": {"all": True},
                    "abort": {"count": ["exploded"]}}, "body.abort.count"),
        ("config", {"content": CONFIG, "target": {"stores": ["a\u0000b"]}}, "body.target.stores"),
        ("config", {"content": CONFIG, "target": {"all": True},
                    "windows": {"store-1": {"tz": "Mars/Olympus", "start": "22:00",
                                            "end": "06:00"}}}, "body.windows"),
    ],
)  # fmt: skip
def test_start__a_malformed_document_or_option_is_422_naming_the_field_nothing_written(
    fleet, devices, kind, body, field
):
    before = counts(fleet)
    error = refused(fleet.post(f"/api/v1/{kind}/rollout", "operator", json=body), 422)
    assert error["field"] is not None and error["field"].startswith(field), error
    assert counts(fleet) == before
    assert published(fleet) == []
    assert not [a for a in audit(fleet) if a[0].startswith("rollout.")]


def test_start__a_lone_surrogate_anywhere_is_422_naming_where_nothing_written(fleet, devices):
    before = counts(fleet)
    headers = fleet.auth("operator") | {"content-type": "application/json"}
    for raw, field in (
        (b'{"content": {"risk": {}, "note\\ud800": 1}, "target": {"all": true}}', "body.content"),
        (b'{"version": 1, "target": {"all": true}, "reason": "\\udc00"}', "body.reason"),
    ):
        answer = fleet.client.post("/api/v1/config/rollout", content=raw, headers=headers)
        assert refused(answer, 422)["field"] == field
    assert counts(fleet) == before and published(fleet) == []


def test_start__a_target_that_selects_no_device_is_refused_nothing_written(fleet, devices):
    before = counts(fleet)
    body = {"content": CONFIG, "target": {"groups": ["nobody-here"]}}
    error = refused(fleet.post("/api/v1/config/rollout", "operator", json=body), 422)
    assert error["code"] == "no_devices" or "device" in error["message"], error
    assert counts(fleet) == before and published(fleet) == []


def test_roles__operate_to_start_and_steer_read_to_follow(fleet, devices):
    body = {"content": CONFIG, "target": {"all": True}}
    for role in ("read_only", "auditor"):
        assert refused(fleet.post("/api/v1/config/rollout", role, json=body), 403)["code"] == (
            "forbidden"
        )
    made = ok(fleet.post("/api/v1/config/rollout", "operator", json=body), 201)
    rid = made["rollout_id"]
    for role in ("read_only", "auditor", "operator", "admin"):
        ok(fleet.get(f"/api/v1/rollouts/{rid}", role))
        ok(fleet.get(f"/api/v1/rollouts/{rid}/devices", role))
        ok(fleet.get("/api/v1/rollouts", role))
    for action in ("pause", "resume", "approve", "abort", "retry-failed"):
        answer = fleet.post(f"/api/v1/rollouts/{rid}/{action}", "read_only", json={})
        assert refused(answer, 403)["code"] == "forbidden"
    assert fleet.client.get(f"/api/v1/rollouts/{rid}").status_code == 401
    assert refused(fleet.get("/api/v1/rollouts/ro_nothere", "read_only"), 404)["code"] == (
        "rollout_not_found"
    )
    assert refused(fleet.post("/api/v1/rollouts/ro_nothere/pause", "operator"), 404)["code"] == (
        "rollout_not_found"
    )


# --- steering ---------------------------------------------------------------------------------


def test_control__recorded_then_the_run_published_again(fleet, devices):
    body = {"content": CONFIG, "target": {"all": True}, "gates": {"approve_after": [1]}}
    rid = ok(fleet.post("/api/v1/config/rollout", "operator", json=body), 201)["rollout_id"]
    [(run_id, *_)] = runs(fleet)
    assert published(fleet) == [run_id]
    paused = ok(fleet.post(f"/api/v1/rollouts/{rid}/pause", "operator",
                           json={"reason": "lunch rush"}))  # fmt: skip
    assert paused["rollout_id"] == rid and paused["controls"]["paused"] is True
    assert published(fleet) == [run_id, run_id]  # woken: the run reads the control now
    assert len(runs(fleet)) == 1  # the same run, never a second
    actions = audit(fleet)
    assert ("rollout.pause", "operator-test", f"rollout:{rid}") in actions
    # no body at all is a control without a reason
    ok(fleet.post(f"/api/v1/rollouts/{rid}/resume", "operator"))
    assert ("rollout.resume", "operator-test", f"rollout:{rid}") in audit(fleet)
    assert published(fleet) == [run_id] * 3
    too_long = fleet.post(f"/api/v1/rollouts/{rid}/abort", "operator", json={"reason": "x" * 1001})
    assert refused(too_long, 422)["field"] == "body.reason"
    unknown = fleet.post(f"/api/v1/rollouts/{rid}/pause", "operator", json={"why": "x"})
    assert refused(unknown, 422)["field"] == "body.why"


def test_control__a_run_that_lost_its_start_is_started_by_the_next_control(fleet, devices):
    # the rollout committed, then the process died before its run was started
    who = Principal("tok_test", "operator-test", "operator")
    request = RolloutRequest.model_validate({"content": CONFIG, "target": {"all": True}})
    with fleet.backend.pool.connection() as conn, conn.transaction():
        rid = service.create(conn, "config", request, who, at=time.time())
    assert counts(fleet)[1] == 0 and published(fleet) == []
    ok(fleet.post(f"/api/v1/rollouts/{rid}/pause", "operator"))
    [(run_id, workflow_type, key, run_input, _)] = runs(fleet)
    assert (workflow_type, key, run_input) == (
        "ConfigRollout", f"rollout:{rid}", {"rollout_id": rid},
    )  # fmt: skip
    assert published(fleet) == [run_id]


def test_control__a_run_waiting_between_polls_is_answered_and_let_go_to_a_worker(fleet, devices):
    body = {"content": CONFIG, "target": {"all": True}, "waves": ["1", "100%"],
            "gates": {"approve_after": [1]}}  # fmt: skip
    rid = ok(fleet.post("/api/v1/config/rollout", "operator", json=body), 201)["rollout_id"]
    [(run_id, *_)] = runs(fleet)
    # a worker's engine (the cloud's, in this process) drives the run to its first WAIT
    settings = fleet.client.app.state.fleet.settings
    store = PostgresStore(fleet.url, pool_size=2)
    worker = cloud_engine(store, CeleryExecutor(make_app(settings)), settings=settings)
    try:
        worker.advance(run_id)
        waiting = worker.get(run_id)
        assert waiting.status is Status.WAITING, [
            (s.step_name, s.status, s.error) for s in worker.show(run_id).steps
        ]
        before = len(published(fleet))

        ok(fleet.post(f"/api/v1/rollouts/{rid}/pause", "operator", json={"reason": "look"}))
        woken = worker.get(run_id)
        assert woken.status is Status.RUNNING and woken.revision > waiting.revision
        # let go: the API process holds no lease a worker would have to wait out
        assert woken.lease_expires_at is not None and woken.lease_expires_at <= time.time()
        assert run_id in published(fleet)[before:]
        worker.advance(run_id)  # a worker takes it at once and reads the pause
        after = worker.get(run_id)
        assert after.revision > woken.revision
        assert ok(fleet.get(f"/api/v1/rollouts/{rid}", "read_only"))["status"] == "paused"
    finally:
        worker.close()
        store.close()


def test_start__a_release_rollout_names_an_uploaded_release(fleet, devices):
    missing = fleet.post("/api/v1/release/rollout", "operator",
                         json={"release": "9.9.9", "target": {"all": True}})  # fmt: skip
    error = refused(missing, 404)
    assert (error["code"], error["field"]) == ("release_not_found", "release")
    both = {"release": "1.1.0", "content": CONFIG, "target": {"all": True}}
    content = fleet.post("/api/v1/release/rollout", "operator", json=both)
    assert refused(content, 422)["field"] == "content"
    assert counts(fleet)[0] == 0 and published(fleet) == []
    # an uploaded release (as cloud.releases stores one)
    fleet.sql(
        "INSERT INTO releases (release, manifest_sha256, sums, signature, files, bytes, "
        "new_bytes, uploaded_at, uploaded_by) VALUES (%s, %s, '', %s, 3, 1000, 1000, %s, 't')",
        ("1.1.0", "ab" * 32, b"\x00" * 64, time.time()),
    )
    body = {"release": "1.1.0", "target": {"binary_versions": ["1.0.0"]}, "waves": ["50%", "100%"]}
    view = ok(fleet.post("/api/v1/release/rollout", "operator", json=body), 201)
    assert view["kind"] == "release" and view["document"]["release"] == "1.1.0"
    [(run_id, workflow_type, key, _, _)] = runs(fleet)
    assert (workflow_type, key) == ("ReleaseRollout", f"rollout:{view['rollout_id']}")
    assert published(fleet) == [run_id]
    devices_page = ok(
        fleet.get(f"/api/v1/rollouts/{view['rollout_id']}/devices?limit=2", "read_only")
    )
    assert len(devices_page["items"]) == 2 and devices_page["next"] is not None
    rest = ok(fleet.get(f"/api/v1/rollouts/{view['rollout_id']}/devices"
                        f"?after={devices_page['next']}", "read_only"))  # fmt: skip
    assert len(devices_page["items"]) + len(rest["items"]) == len(devices)
    wave_1 = ok(fleet.get(f"/api/v1/rollouts/{view['rollout_id']}/devices?wave=1", "read_only"))
    assert len(wave_1["items"]) == view["waves"][0]["targeted"] == 2
    planned = ok(fleet.get(f"/api/v1/rollouts/{view['rollout_id']}/devices?status=planned"))
    assert len(planned["items"]) == len(devices)
    assert refused(fleet.get(f"/api/v1/rollouts/{view['rollout_id']}/devices?status=gone"),
                   422)["field"] == "query.status"  # fmt: skip


def test_start__a_broker_that_cannot_be_reached_still_answers_201_the_run_is_in_the_database(
    new_database, tmp_path: Path, caplog
):
    # nothing listens on port 1: every publish fails, at once
    with rollout_app(new_database(), tmp_path, broker_url="redis://127.0.0.1:1/0") as f:
        f.enroll("store-1")
        body = {"content": CONFIG, "target": {"all": True}}
        view = ok(f.post("/api/v1/config/rollout", "operator", json=body), 201)
        [(_, workflow_type, key, _, status)] = runs(f)
        assert (workflow_type, key, status) == (
            "ConfigRollout", f"rollout:{view['rollout_id']}", "RUNNING",
        )  # fmt: skip
        executor = f.client.app.state.fleet.engine().executor
        assert executor.failed >= 1 and executor.sent == 0
        assert "the sweep will submit it" in caplog.text  # a worker's sweep finds it
        ok(f.post(f"/api/v1/rollouts/{view['rollout_id']}/pause", "operator"))  # recorded too


def test_start__a_run_that_cannot_be_started_is_503_naming_the_rollout_a_control_starts_it(
    fleet, devices
):
    ctx = fleet.client.app.state.fleet
    # the engine's store unreachable (nothing listens on port 1), the API's own database up
    away = ctx.settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/x"})
    ctx.engine_factory = lambda: api_engine(away)[0]
    body = {"content": CONFIG, "target": {"all": True}}
    error = refused(fleet.post("/api/v1/config/rollout", "operator", json=body), 503)
    assert error["code"] == "run_not_started"
    [(rid, status)] = fleet.sql("SELECT rollout_id, status FROM rollouts")
    assert rid in error["message"] and status == "pending"
    ctx.engine_factory = None  # the store back
    ok(fleet.post(f"/api/v1/rollouts/{rid}/pause", "operator"))
    [(run_id, workflow_type, key, _, _)] = runs(fleet)
    assert (workflow_type, key) == ("ConfigRollout", f"rollout:{rid}")
    assert published(fleet) == [run_id]
