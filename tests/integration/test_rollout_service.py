"""``cloud.rollouts.service`` on PostgreSQL, as the Fleet API calls it: create refuses a bad
request naming the field and writes nothing; it selects its devices (AND across the
selector's fields, OR within one), draws the waves with a recorded seed, and records
``rollout.create``; the view, the device pages and the list read as the design says;
controls the status does not allow are 409 ``rollout_state``. The devices are enrolled
terminals (``test_rollout_workflows.Fleet``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_rollout_workflows import OPERATOR, V1, V2, Fleet, make_fleet

from cloud.documents import service as documents
from cloud.documents.errors import BadRequest, DocumentInvalid, NotFound, StaleVersion
from cloud.fleet import devices as fleet_devices
from cloud.rollouts import service as rollouts
from cloud.rollouts.service import NoDevices, RolloutRequest, RolloutState


@pytest.fixture
def fleet(new_database, tmp_path) -> Iterator[Fleet]:
    with make_fleet(new_database(), tmp_path) as made:
        yield made


def create(f: Fleet, kind: str, body: dict[str, Any]) -> str:
    request = RolloutRequest.model_validate(body)
    rid: str = f.tx(lambda c: rollouts.create(c, kind, request, OPERATOR, at=f.clock.now()))  # type: ignore[arg-type]
    return rid


def counts(f: Fleet) -> tuple[int, int, int, int]:
    row = f.sql(
        "SELECT (SELECT count(*) FROM rollouts), (SELECT count(*) FROM rollout_devices), "
        "(SELECT count(*) FROM sync_documents), (SELECT count(*) FROM cloud_audit)"
    )[0]
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def test_create__refusals_name_the_field_and_write_nothing(fleet):
    fleet.enroll("s1")
    before = counts(fleet)
    with pytest.raises(DocumentInvalid) as bad:
        create(fleet, "config", {"content": {"risk": {"floor_limit_minor": -1}},
                                 "target": {"all": True}})  # fmt: skip
    assert bad.value.field == "content.risk.floor_limit_minor"
    with pytest.raises(NoDevices) as none:
        create(fleet, "config", {"content": V2, "target": {"stores": ["nowhere"]}})
    assert none.value.code == "no_devices" and none.value.field == "target"
    with pytest.raises(BadRequest) as both:
        create(fleet, "config", {"content": V2, "version": 1, "target": {"all": True}})
    assert both.value.field == "content"
    with pytest.raises(NotFound) as missing:
        create(fleet, "config", {"version": 9, "target": {"all": True}})
    assert missing.value.code == "document_not_found"
    with pytest.raises(NotFound) as release:
        create(fleet, "release", {"release": "9.9.9", "target": {"all": True}})
    assert release.value.code == "release_not_found" and release.value.field == "release"
    assert counts(fleet) == before
    # a withdrawn version is refused too (and is never assigned again)
    made = fleet.tx(lambda c: documents.create(c, "config", V1, OPERATOR, at=fleet.clock.now()))
    fleet.tx(lambda c: documents.withdraw(c, "config", made.version, OPERATOR, at=1.0))
    assert (
        fleet.tx(lambda c: documents.withdraw(c, "config", made.version, OPERATOR, at=2.0)) is False
    )
    with pytest.raises(StaleVersion):
        create(fleet, "config", {"version": made.version, "target": {"all": True}})
    with pytest.raises(StaleVersion):
        fleet.tx(lambda c: documents.assign(c, "config", made.version, "fleet", None, OPERATOR,
                                            at=3.0))  # fmt: skip


def test_create__selector_and_seeded_waves_recorded(fleet):
    a = [fleet.enroll("s1", group="north") for _ in range(6)]
    b = [fleet.enroll("s2", group="north") for _ in range(3)]
    fleet.enroll("s3", group="south")
    for t in (a[0], b[0]):
        fleet.tx(lambda c, t=t: fleet_devices.add_tag(c, t.device_id, "canary", at=1.0))
    canary = create(fleet, "config", {"content": V2, "target": {"tags": ["canary"],
                                      "stores": ["s2", "s3"]}})  # fmt: skip
    assert [d["device_id"] for d in fleet.devices(canary)] == [b[0].device_id]
    versions = create(fleet, "config", {"content": V2, "target": {"binary_versions": ["1.0.0"],
                                        "device_ids": [a[1].device_id, "dev_gone"]}})  # fmt: skip
    assert [d["device_id"] for d in fleet.devices(versions)] == [a[1].device_id]
    rid = create(fleet, "config", {"content": V2, "target": {"groups": ["north"],
                                   "stores": ["s1", "s2"]}, "waves": ["1", "50%", "100%"],
                                   "seed": 42, "reason": "test"})  # fmt: skip
    v = fleet.view(rid)
    assert v["status"] == "pending" and v["seed"] == 42 and v["run_id"] is None
    assert v["targeted"] == 9 and [w["targeted"] for w in v["waves"]] == [1, 4, 4]
    assert [w["size"] for w in v["waves"]] == [1, 5, 9]
    assert v["options"]["seed"] == 42 and v["options"]["soak_s"] == 300
    assert v["threshold"] == {"failure_percent": 10.0, "min_sample_wave": 5,
                              "min_sample_total": 10, "count": ["failed", "refused",
                                                                "timed_out"]}  # fmt: skip
    assert v["rate"] == {"failure_percent": 0.0, "failures": 0, "sampled": 0}
    assert v["controls"] == {"paused": False, "approved_through": 0, "abort_requested": False}
    assert v["document"] == {"kind": "config", "version": None}
    # the same seed draws the same waves
    again = create(fleet, "config", {"content": V2, "target": {"groups": ["north"],
                                     "stores": ["s1", "s2"]}, "waves": ["1", "50%", "100%"],
                                     "seed": 42})  # fmt: skip
    waves = {d["device_id"]: d["wave"] for d in fleet.devices(rid)}
    assert waves == {d["device_id"]: d["wave"] for d in fleet.devices(again)}
    assert set(waves) == {t.device_id for t in a + b}
    drawn = create(fleet, "config", {"content": V2, "target": {"all": True}})
    assert fleet.view(drawn)["seed"] > 0  # drawn and recorded
    detail = fleet.sql(
        "SELECT actor, target, detail FROM cloud_audit WHERE action = 'rollout.create' "
        "AND target = %s",
        f"rollout:{rid}",
    )[0]
    assert detail[0] == "alice" and detail[1] == f"rollout:{rid}"
    assert detail[2]["targeted"] == 9 and detail[2]["seed"] == 42


def test_devices_and_rollouts__paged_and_filtered(fleet):
    for n in range(5):
        fleet.enroll(f"s{n}")
    rid = create(fleet, "config", {"content": V2, "target": {"all": True},
                                   "waves": ["2", "100%"]})  # fmt: skip
    first = fleet.tx(lambda c: rollouts.devices(c, rid, limit=2))
    assert len(first["items"]) == 2 and first["next"] == first["items"][1]["device_id"]
    rest = fleet.tx(lambda c: rollouts.devices(c, rid, after=first["next"], limit=10))
    assert len(rest["items"]) == 3 and rest["next"] is None
    assert set(first["items"][0]) >= {"device_id", "store", "group", "wave", "status",
                                      "previous_version", "command_id", "notified_at",
                                      "applied_at", "healthy_at", "failed_at", "last_error",
                                      "restore_status", "restore_command_id",
                                      "restored_at"}  # fmt: skip
    wave_two = fleet.tx(lambda c: rollouts.devices(c, rid, wave=2))
    assert len(wave_two["items"]) == 3
    assert fleet.tx(lambda c: rollouts.devices(c, rid, status="healthy"))["items"] == []
    with pytest.raises(BadRequest):
        fleet.tx(lambda c: rollouts.devices(c, rid, status="nope"))
    with pytest.raises(NotFound) as gone:
        fleet.tx(lambda c: rollouts.view(c, "ro_nope", now=0.0))
    assert gone.value.code == "rollout_not_found" and gone.value.status == 404
    fleet.clock.advance(1)  # newest first
    other = create(fleet, "policy", {"content": {"rules": []}, "target": {"all": True}})
    listed = fleet.tx(lambda c: rollouts.rollouts(c))
    assert [i["rollout_id"] for i in listed["items"]] == [other, rid]
    assert listed["items"][1]["targeted"] == 5 and listed["items"][1]["status"] == "pending"
    assert [i["rollout_id"] for i in fleet.tx(lambda c: rollouts.rollouts(c, kind="config"))[
        "items"]] == [rid]  # fmt: skip
    page = fleet.tx(lambda c: rollouts.rollouts(c, limit=1))
    assert page["next"] == other
    after = fleet.tx(lambda c: rollouts.rollouts(c, after=page["next"], limit=1))
    assert [i["rollout_id"] for i in after["items"]] == [rid]
    assert rollouts.workflow_type("policy") == "PolicyRollout"


def test_control__what_the_status_does_not_allow_is_409(fleet):
    fleet.enroll("s1")
    rid = create(fleet, "config", {"content": V2, "target": {"all": True}})
    for action in ("resume", "approve"):
        with pytest.raises(RolloutState) as refused:
            fleet.tx(lambda c, a=action: rollouts.control(c, rid, a, OPERATOR, at=1.0))
        assert refused.value.status == 409 and refused.value.code == "rollout_state"
    paused = fleet.tx(lambda c: rollouts.control(c, rid, "pause", OPERATOR, at=1.0))
    assert paused["status"] == "paused" and paused["controls"]["paused"] is True
    resumed = fleet.tx(lambda c: rollouts.control(c, rid, "resume", OPERATOR, at=2.0))
    assert resumed["status"] == "pending"  # its run has not started
    aborted = fleet.tx(lambda c: rollouts.control(c, rid, "abort", OPERATOR, at=3.0,
                                                  reason="not today"))  # fmt: skip
    assert aborted["controls"]["abort_requested"] is True
    with pytest.raises(RolloutState):
        fleet.tx(lambda c: rollouts.control(c, rid, "abort", OPERATOR, at=4.0))
    with pytest.raises(BadRequest):
        fleet.tx(lambda c: rollouts.control(c, rid, "explode", OPERATOR, at=4.0))  # type: ignore[arg-type]
    rows = fleet.sql("SELECT action FROM cloud_audit WHERE target = %s ORDER BY seq",
                     f"rollout:{rid}")  # fmt: skip
    actions = [r[0] for r in rows]
    assert actions == ["rollout.create", "rollout.pause", "rollout.resume", "rollout.abort"]
    # an abort asked before the run started: the run ends at once, nothing sent
    fleet.start(rid, "config")
    v = fleet.view(rid)
    assert v["status"] == "rolled_back" and v["abort"]["criterion"] == "operator"
    assert fleet.sql("SELECT count(*) FROM commands WHERE action = 'update_config'") == [(0,)]


def test_schema__migrations_converge_with_schema_sql(new_database):
    """The rollouts set's migrations give what its ``schema.sql`` says (tables, columns,
    constraints, indexes)."""
    import psycopg

    from cloud.rollouts import SCHEMA

    def catalog(url: str) -> list[Any]:
        with psycopg.connect(url, autocommit=True) as conn:
            cols = conn.execute(
                "SELECT table_name, column_name, data_type, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = 'public' "
                "AND table_name LIKE 'rollout%%' AND table_name <> 'rollouts_schema_migrations' "
                "ORDER BY 1, 2"
            ).fetchall()
            cons = conn.execute(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                "FROM pg_constraint WHERE conrelid::regclass::text LIKE 'rollout%%' "
                "AND conrelid::regclass::text <> 'rollouts_schema_migrations' "
                "ORDER BY 1, 2"
            ).fetchall()
            idx = conn.execute(
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE tablename LIKE 'rollout%%' AND tablename <> 'rollouts_schema_migrations' "
                "ORDER BY 1, 2"
            ).fetchall()
        return [cols, cons, idx]

    migrated, built = new_database(), new_database()
    with psycopg.connect(migrated, autocommit=True) as conn, conn.transaction():
        assert SCHEMA.migrate(conn, where="test") == len(SCHEMA.migrations())
    with psycopg.connect(built, autocommit=True) as conn:
        conn.execute(SCHEMA.schema().encode())
    a, b = catalog(migrated), catalog(built)
    assert a == b and len(a[0]) > 40
