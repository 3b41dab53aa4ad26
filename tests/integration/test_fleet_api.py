"""The Fleet API on PostgreSQL, through the app ``tillflow cloud serve`` builds: tokens
stored hashed, enrollment tokens, devices filtered in SQL (an injection matches
nothing), tags, groups, the kill switch, device audit paged and verified, the
quarantine replayed and discarded, and every action in the cloud's audit log, whose
verification finds an edited row. Plus the fleet schema's migrations, and serve with a
settings file and the first admin token from the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from fleet_app import Fleet, fleet_app
from sync_memory import outbox_entry

from cloud.fleet import SCHEMA
from cloud.sync.postgres import PostgresSyncBackend

pytest.importorskip("starlette.testclient")

INJECTION = "nobody' OR '1'='1"


@pytest.fixture
def fleet(new_database) -> Iterator[Fleet]:
    with fleet_app(new_database()) as f:
        yield f


def ok(answer: Any, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return answer.json()


def audit_log(fleet: Fleet) -> list[dict[str, Any]]:
    return ok(fleet.get("/api/v1/audit?limit=1000", "auditor"))["items"]


def everything_stored(fleet: Fleet) -> str:
    """Every row of every table in the database, as text."""
    tables = [r[0] for r in fleet.sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    )]  # fmt: skip
    return "\n".join(str(fleet.sql(f'SELECT t::text FROM "{name}" t')) for name in tables)


# --- schema --------------------------------------------------------------------------------

CATALOG = """
    SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity
    FROM information_schema.columns
    WHERE table_schema = current_schema() AND table_name = ANY(%(tables)s) ORDER BY 1, 2"""
FLEET_TABLES = ["api_tokens", "cloud_audit", "cloud_audit_head", "device_tags",
                "enroll_token_revocations", "quarantine_decisions"]  # fmt: skip


def test_schema__fleet_migrations_converge_with_schema_sql(new_database):
    migrated, fresh = new_database(), new_database()
    PostgresSyncBackend(migrated).close()
    PostgresSyncBackend(fresh).close()  # the sync tables the fleet tables refer to
    with psycopg.connect(migrated, autocommit=True) as conn, conn.transaction():
        assert SCHEMA.migrate(conn, where="test") == 1
    with psycopg.connect(migrated, autocommit=True) as conn, conn.transaction():
        assert SCHEMA.migrate(conn, where="test") == 1  # a re-run changes nothing
    with psycopg.connect(fresh, autocommit=True) as conn:
        conn.execute(SCHEMA.schema().encode())

    def catalog(url: str) -> dict[str, Any]:
        with psycopg.connect(url) as conn:
            cols = conn.execute(CATALOG, {"tables": FLEET_TABLES}).fetchall()
            idx = conn.execute(
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE tablename = ANY(%s) ORDER BY 1, 2",
                (FLEET_TABLES,),
            ).fetchall()
            cons = conn.execute(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                "FROM pg_constraint WHERE conrelid::regclass::text = ANY(%s) ORDER BY 1, 2",
                (FLEET_TABLES,),
            ).fetchall()
            head = conn.execute("SELECT seq, hash FROM cloud_audit_head").fetchall()
        return {"columns": cols, "indexes": idx, "constraints": cons, "head": head}

    a, b = catalog(migrated), catalog(fresh)
    assert {t for t, *_ in a["columns"]} == set(FLEET_TABLES)
    assert a == b
    assert a["head"] == [(0, "0" * 64)]


# --- API tokens --------------------------------------------------------------------------


def test_tokens__shown_once_stored_hashed_never_logged_and_revocable(fleet, caplog):
    caplog.set_level("DEBUG")
    made = ok(fleet.post("/api/v1/api-tokens", json={"name": "ci bot", "role": "operator"}), 201)
    token = made["token"]
    assert token.startswith("tfa_") and made["token_id"].startswith("tok_")
    stored = everything_stored(fleet)
    assert made["token_id"] in stored and token not in stored  # only its hash is kept
    listed = ok(fleet.get("/api/v1/api-tokens"))["items"]
    mine = next(t for t in listed if t["token_id"] == made["token_id"])
    assert "token" not in mine and mine["role"] == "operator" and mine["last_used_at"] is None

    mine_auth = {"Authorization": f"Bearer {token}"}
    assert fleet.client.get("/api/v1/devices", headers=mine_auth).status_code == 200
    assert fleet.client.get("/api/v1/api-tokens", headers=mine_auth).status_code == 403
    used = {t["token_id"]: t for t in ok(fleet.get("/api/v1/api-tokens"))["items"]}
    assert used[made["token_id"]]["last_used_at"] is not None
    revoked = ok(fleet.post(f"/api/v1/api-tokens/{made['token_id']}/revoke"))
    assert revoked["revoked_at"] is not None and revoked["revoked_by"] == "admin-test"
    assert fleet.client.get("/api/v1/devices", headers=mine_auth).status_code == 401
    assert fleet.post("/api/v1/api-tokens/tok_0000000000000000/revoke").status_code == 404
    bad_role = fleet.post("/api/v1/api-tokens", json={"name": "x", "role": "root"})
    assert bad_role.status_code == 422 and bad_role.json()["error"]["field"] == "body.role"

    actions = [(r["action"], r["actor"], r["target"]) for r in audit_log(fleet)]
    assert ("api_token.create", "admin-test", made["token_id"]) in actions
    assert ("api_token.revoke", "admin-test", made["token_id"]) in actions
    assert token not in caplog.text and token not in json.dumps(audit_log(fleet))


# --- enrollment tokens ----------------------------------------------------------------------


def test_enroll_tokens__listed_by_id_used_once_and_revoked(fleet):
    term = fleet.enroll("store-1", "north")
    listed = ok(fleet.get("/api/v1/enroll-tokens", "operator"))["items"]
    assert len(listed) == 1
    used = listed[0]
    assert len(used["id"]) == 12 and used["state"] == "used"
    assert used["used_by"] == term.device_id and (used["store"], used["group"]) == (
        "store-1", "north",
    )  # fmt: skip
    assert "token" not in used
    spare = ok(fleet.post("/api/v1/enroll-tokens", "operator", json={"store": "store-2"}), 201)
    assert spare["id"] not in spare["token"]
    stored = sorted(r[0] for r in fleet.sql("SELECT token_hash FROM enroll_tokens"))
    assert sorted(h[:12] for h in stored) == sorted([used["id"], spare["id"]])
    assert not any(h in json.dumps(listed) for h in stored)  # the id, never the whole hash
    assert spare["token"] not in everything_stored(fleet)

    ok(fleet.post(f"/api/v1/enroll-tokens/{spare['id']}/revoke", "operator"))
    other = type(term)(term.clock)
    refused = fleet.client.post("/v1/enroll", **other.enroll_request(spare["token"]))
    assert refused.status_code in (401, 403), refused.text  # a revoked token enrolls nothing
    again = fleet.post(f"/api/v1/enroll-tokens/{used['id']}/revoke", "operator")
    assert again.status_code == 409 and again.json()["error"]["code"] == "token_used"
    states = {
        t["id"]: t["state"] for t in ok(fleet.get("/api/v1/enroll-tokens", "operator"))["items"]
    }
    assert states == {used["id"]: "used", spare["id"]: "revoked"}
    too_long = fleet.post("/api/v1/enroll-tokens", "operator",
                          json={"store": "s", "ttl_minutes": 10**9})  # fmt: skip
    assert too_long.status_code == 422
    actions = [r["action"] for r in audit_log(fleet)]
    assert actions.count("enroll_token.create") == 2 and "enroll_token.revoke" in actions


# --- devices ------------------------------------------------------------------------------


@pytest.fixture
def three(fleet: Fleet) -> dict[str, Any]:
    """Three terminals: two in store-1 (north, south), one in store-2; their health."""
    a, b, c = (
        fleet.enroll("store-1", "north"),
        fleet.enroll("store-1", "south"),
        fleet.enroll("store-2", "north"),
    )
    ok(fleet.sync(a, config_version=3, policy_version=7, storage_state="ok"))
    ok(fleet.sync(b, config_version=4, binary_version="1.1.0", storage_state="high_water"))
    ok(fleet.post(f"/api/v1/devices/{c.device_id}/tags", "operator", json={"tag": "pilot"}))
    return {"a": a, "b": b, "c": c}


def ids(fleet: Fleet, query: str) -> set[str]:
    return {d["device_id"] for d in ok(fleet.get(f"/api/v1/devices?{query}", "read_only"))["items"]}


def test_devices__every_filter_in_sql_and_an_injection_matches_nothing(fleet, three):
    a, b, c = three["a"].device_id, three["b"].device_id, three["c"].device_id
    assert ids(fleet, "") == {a, b, c}
    assert ids(fleet, "store=store-1") == {a, b}
    assert ids(fleet, "group=north") == {a, c}
    assert ids(fleet, "store=store-1&group=north") == {a}
    assert ids(fleet, "tag=pilot") == {c}
    assert ids(fleet, "binary_version=1.1.0") == {b}
    assert ids(fleet, "binary_version=1.0.0") == {a, c}  # c: the version it enrolled with
    assert ids(fleet, "config_version=3") == {a}
    assert ids(fleet, "policy_version=7") == {a}
    assert ids(fleet, "health=high_water") == {b}
    assert ids(fleet, "health=unknown") == {c}  # no heartbeat yet
    assert ids(fleet, "status=active") == {a, b, c}
    now = time.time()
    assert ids(fleet, f"last_seen_after={now - 600}") == {a, b}
    assert ids(fleet, f"last_seen_before={now - 600}") == set()
    for name in ("store", "group", "tag", "binary_version"):
        answer = fleet.get("/api/v1/devices", "read_only", params={name: INJECTION})
        assert ok(answer)["items"] == [], name
    assert ok(fleet.get("/api/v1/groups", "read_only", params={"store": INJECTION}))["items"] == []
    bad = fleet.get("/api/v1/devices?config_version=3%20OR%201=1", "read_only")
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "query.config_version"
    # paged: one at a time, every device once, in id order
    seen, after = [], None
    while True:
        params = {"limit": 1} | ({"after": after} if after else {})
        body = ok(fleet.get("/api/v1/devices", "read_only", params=params))
        seen += [d["device_id"] for d in body["items"]]
        after = body["next"]
        if after is None:
            break
    assert seen == sorted([a, b, c])
    assert fleet.get("/api/v1/devices?limit=1001", "read_only").status_code == 422


def test_devices__one_device_tags_groups_move_and_the_kill_switch(fleet, three):
    a = three["a"]
    one = ok(fleet.get(f"/api/v1/devices/{a.device_id}", "read_only"))
    assert one["heartbeat"]["config_version"] == 3 and one["health"] == "ok"
    assert one["open_quarantine"] == 0 and one["tags"] == [] and one["stream"] == a.stream
    assert fleet.get("/api/v1/devices/nope", "read_only").json()["error"]["code"] == (
        "device_not_found"
    )
    tagged = ok(fleet.post(f"/api/v1/devices/{a.device_id}/tags", "operator", json={"tag": "eu"}))
    assert tagged["tags"] == ["eu"]
    assert fleet.post(f"/api/v1/devices/{a.device_id}/tags", "operator",
                      json={"tag": "a b"}).status_code == 422  # fmt: skip
    assert ok(fleet.delete(f"/api/v1/devices/{a.device_id}/tags/eu", "operator"))["tags"] == []
    assert fleet.delete(f"/api/v1/devices/{a.device_id}/tags/eu", "operator").status_code == 404
    moved = ok(
        fleet.put(f"/api/v1/devices/{a.device_id}/group", "operator", json={"group": "west"})
    )
    assert moved["group"] == "west"
    groups = ok(fleet.get("/api/v1/groups", "read_only"))["items"]
    assert groups == [{"name": "north", "devices": 1}, {"name": "south", "devices": 1},
                      {"name": "west", "devices": 1}]  # fmt: skip
    stores = ok(fleet.get("/api/v1/stores", "read_only"))["items"]
    assert stores == [{"name": "store-1", "devices": 2}, {"name": "store-2", "devices": 1}]

    revoked = ok(fleet.post(f"/api/v1/devices/{a.device_id}/revoke", "operator"))
    assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None
    refused = fleet.sync(a)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "device_revoked"
    assert ids(fleet, "status=revoked") == {a.device_id}
    log = [(r["action"], r["target"], r["actor"], r["actor_role"]) for r in audit_log(fleet)]
    for action in ("device.tag", "device.untag", "device.move", "device.revoke"):
        assert (action, a.device_id, "operator-test", "operator") in log, action
    assert ok(fleet.post(f"/api/v1/devices/{a.device_id}/revoke", "operator"))["status"] == (
        "revoked"
    )
    assert [r[0] for r in log].count("device.revoke") == 1  # revoking again records nothing


# --- a device's audit -------------------------------------------------------------------


def test_device_audit__paged_by_seq_and_verified_and_an_edit_is_found(fleet):
    term = fleet.enroll("store-1")
    ok(fleet.sync(term, audit=term.grow_audit(5)))
    pages, after = [], None
    while True:
        params = {"limit": 2} | ({"after": after} if after else {})
        body = ok(fleet.get(f"/api/v1/devices/{term.device_id}/audit", "auditor", params=params))
        pages.append([r["seq"] for r in body["items"]])
        after = body["next"]
        if after is None:
            break
    assert pages == [[1, 2], [3, 4], [5]]
    assert fleet.get(f"/api/v1/devices/{term.device_id}/audit", "read_only").status_code == 403
    checked = ok(fleet.get(f"/api/v1/devices/{term.device_id}/audit/verify", "auditor"))
    assert checked["ok"] and checked["chains"][0]["rows"] == 5
    fleet.sql("UPDATE device_audit SET detail = '{\"n\": 99}' WHERE seq = 3")
    broken = ok(fleet.get(f"/api/v1/devices/{term.device_id}/audit/verify", "auditor"))
    assert not broken["ok"] and broken["chains"][0]["first_bad_seq"] == 3
    assert fleet.get("/api/v1/devices/nope/audit/verify", "auditor").status_code == 404
    assert (
        fleet.get(f"/api/v1/devices/{term.device_id}/audit?after=x", "auditor").status_code == 422
    )


# --- quarantine ----------------------------------------------------------------------------


def test_quarantine__replay_lands_or_stays_with_its_reason_and_discard_keeps_who_why(fleet):
    term = fleet.enroll("store-1")
    forged = outbox_entry(1, content_hash="0" * 64)  # content that does not match its hash
    conflicting = outbox_entry(2)
    body = ok(fleet.sync(term, outbox=[forged, conflicting, outbox_entry(3)]))
    assert [r["status"] for r in body["results"]] == ["rejected", "applied", "applied"]
    ok(fleet.sync(term, outbox=[outbox_entry(2, payload={"amount": 1})]))  # a conflict
    items = ok(fleet.get(f"/api/v1/quarantine?device_id={term.device_id}", "auditor"))["items"]
    assert [(i["seq"], i["reason"], i["status"]) for i in items] == [
        (1, "content_hash_mismatch", "open"), (2, "content_conflict", "open"),
    ]  # fmt: skip
    assert fleet.get("/api/v1/quarantine", "read_only").status_code == 403
    assert fleet.post(f"/api/v1/quarantine/{items[0]['id']}/replay", "auditor").status_code == 403

    # still bad: it stays quarantined, with the reason the ingest gives now
    again = ok(fleet.post(f"/api/v1/quarantine/{items[0]['id']}/replay", "operator",
                          json={"reason": "after the fix"}))  # fmt: skip
    assert (again["landed"], again["outcome"]) == (False, "rejected")
    assert again["item"]["status"] == "open"
    assert again["item"]["decisions"][0]["decision"] == "still_quarantined"
    assert again["item"]["decisions"][0]["actor"] == "operator-test"

    # state surgery: the entry as a newer terminal build sends it (an older server
    # refused it): the replay applies it, once
    good = outbox_entry(1, payload={"amount": 5})
    fleet.sql("UPDATE quarantine SET entry = %s WHERE quarantine_id = %s",
              (json.dumps(good), items[0]["id"]))  # fmt: skip
    landed = ok(fleet.post(f"/api/v1/quarantine/{items[0]['id']}/replay", "operator"))
    assert (landed["landed"], landed["outcome"], landed["item"]["status"]) == (
        True, "applied", "replayed",
    )  # fmt: skip
    held = fleet.sql(
        "SELECT payload FROM sync_messages WHERE device_id = %s AND seq = 1", (term.device_id,)
    )
    assert held == [({"amount": 5},)]
    assert fleet.post(f"/api/v1/quarantine/{items[0]['id']}/replay", "operator").status_code == 409

    no_why = fleet.post(f"/api/v1/quarantine/{items[1]['id']}/discard", "operator", json={})
    assert no_why.status_code == 422 and no_why.json()["error"]["field"] == "body.reason"
    gone = ok(fleet.post(f"/api/v1/quarantine/{items[1]['id']}/discard", "operator",
                         json={"reason": "the device resent it corrected"}))  # fmt: skip
    assert gone["status"] == "discarded"
    assert gone["decisions"] == [{"decision": "discarded", "actor": "operator-test",
                                  "reason": "the device resent it corrected",
                                  "at": gone["decisions"][0]["at"]}]  # fmt: skip
    assert ok(fleet.get("/api/v1/quarantine?status=open", "auditor"))["items"] == []
    assert fleet.get("/api/v1/quarantine/999999", "auditor").status_code == 404
    actions = [(r["action"], r["target"]) for r in audit_log(fleet)]
    assert actions.count(("quarantine.replay", str(items[0]["id"]))) == 2
    assert ("quarantine.discard", str(items[1]["id"])) in actions


# --- the cloud's audit log ---------------------------------------------------------------


def test_cloud_audit__every_action_chained_and_an_edited_or_removed_row_is_found(fleet):
    term = fleet.enroll("store-1")
    ok(fleet.post(f"/api/v1/devices/{term.device_id}/tags", "operator", json={"tag": "t1"}))
    ok(fleet.post("/api/v1/api-tokens", json={"name": "n", "role": "auditor"}), 201)
    rows = audit_log(fleet)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["action"] for r in rows] == ["enroll_token.create", "device.tag", "api_token.create"]
    assert all(r["prev_hash"] == p["hash"] for p, r in itertools.pairwise(rows))
    assert ok(fleet.get("/api/v1/audit?action=device.tag", "auditor"))["items"][0]["target"] == (
        term.device_id
    )
    assert ok(fleet.get("/api/v1/audit/verify", "auditor")) == {
        "ok": True, "rows": 3, "first_bad_seq": None, "reason": None,
    }  # fmt: skip
    fleet.sql("UPDATE cloud_audit SET actor = 'someone else' WHERE seq = 2")
    edited = ok(fleet.get("/api/v1/audit/verify", "auditor"))
    assert (edited["ok"], edited["first_bad_seq"]) == (False, 2)
    assert "edited" in edited["reason"]
    fleet.sql("UPDATE cloud_audit SET actor = 'operator-test' WHERE seq = 2")
    assert ok(fleet.get("/api/v1/audit/verify", "auditor"))["ok"]
    fleet.sql("DELETE FROM cloud_audit WHERE seq = 3")
    cut = ok(fleet.get("/api/v1/audit/verify", "auditor"))
    assert (cut["ok"], cut["first_bad_seq"]) == (False, 3)


# --- serve ---------------------------------------------------------------------------------


def test_serve__settings_file_then_the_first_admin_token_from_the_cli(new_database, tmp_path):
    url = new_database()
    config = tmp_path / "cloud.yaml"
    config.write_text(
        f"database_url: {url}\nport: 0\nsigning_key_file: {tmp_path / 'k.key'}\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "cloud", "serve", "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on "), line
        base = line.strip().removeprefix("listening on ")
        made = subprocess.run(
            [sys.executable, "-m", "edge.cli", "cloud", "api-token", "create", "--name", "root",
             "--role", "admin", "--json", "--database-url", url],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        token = json.loads(made.stdout)["token"]
        with httpx.Client(base_url=base, timeout=10) as http:
            schema = http.get("/openapi.json").json()
            assert "/api/v1/devices" in schema["paths"] and "/v1/sync" not in schema["paths"]
            assert http.get("/api/v1/devices").status_code == 401
            got = http.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
            assert got.status_code == 200 and got.json() == {"items": [], "next": None}
            assert http.get("/v1/health").json()["ok"] is True
        listed = subprocess.run(
            [sys.executable, "-m", "edge.cli", "cloud", "api-token", "list", "--json",
             "--database-url", url],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert [t["name"] for t in json.loads(listed.stdout)] == ["root"]
        assert token not in listed.stdout
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stdout.close()  # type: ignore[union-attr]
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT action, actor FROM cloud_audit").fetchall()
    assert rows == [("api_token.create", rows[0][1])] and rows[0][1].startswith("cli:")


def test_quarantine__an_audit_row_replayed_onto_a_broken_chain_stays_with_that_reason(fleet):
    term = fleet.enroll("store-1")
    rows = term.grow_audit(3)
    body = ok(fleet.sync(term, audit=[rows[0], rows[2]]))  # row 2 missing: a gap
    assert body["chain"]["state"] == "broken" and body["audit_through"] == 1
    [item] = ok(fleet.get("/api/v1/quarantine?kind=audit", "auditor"))["items"]
    assert (item["seq"], item["reason"]) == (3, "gap")
    again = ok(fleet.post(f"/api/v1/quarantine/{item['id']}/replay", "operator"))
    assert (again["landed"], again["outcome"]) == (False, "chain_broken")
    assert again["item"]["reason"] == "chain_broken" and again["item"]["status"] == "open"
    assert again["superseded_by"] is None
    assert len(ok(fleet.get("/api/v1/quarantine", "auditor"))["items"]) == 1  # not doubled
    assert fleet.sql("SELECT count(*) FROM device_audit") == [(1,)]


def test_input__text_the_database_cannot_hold_is_a_422_naming_the_field_never_a_5xx(fleet):
    term = fleet.enroll("store-1")
    answers = {
        "query NUL": fleet.get("/api/v1/devices", "read_only", params={"store": "a\x00b"}),
        "cursor NUL": fleet.get("/api/v1/devices", "read_only", params={"after": "\x00"}),
        "path NUL": fleet.get("/api/v1/devices/a%00b", "read_only"),
        "body NUL": fleet.put(f"/api/v1/devices/{term.device_id}/group", "operator",
                              json={"group": "a\x00b"}),
        "body surrogate": fleet.post("/api/v1/quarantine/1/discard", "operator",
                                     content=b'{"reason": "\\ud800"}',
                                     headers={"content-type": "application/json"}),
        "token name": fleet.post("/api/v1/api-tokens", json={"name": "a\x00", "role": "admin"}),
        "store": fleet.post("/api/v1/enroll-tokens", "operator", content=b'{"store": "\\udfff"}',
                            headers={"content-type": "application/json"}),
    }  # fmt: skip
    for what, answer in answers.items():
        assert answer.status_code == 422, (what, answer.status_code, answer.text)
        assert set(answer.json()["error"]) == {"code", "message", "field"}, what
    assert answers["query NUL"].json()["error"]["field"] == "query.store"
    assert answers["body NUL"].json()["error"]["field"] == "body.group"
    assert ok(fleet.get(f"/api/v1/devices/{term.device_id}", "read_only"))["group"] is None


def test_quarantine__a_replay_kept_as_a_new_record_supersedes_the_old_one(fleet):
    term = fleet.enroll("store-1")
    ok(fleet.sync(term, outbox=[outbox_entry(1, content_hash="0" * 64)]))
    [item] = ok(fleet.get("/api/v1/quarantine", "auditor"))["items"]
    # state surgery: an older server kept the entry as sent (a field newer servers drop
    # included, its fingerprint of that text): the ingest now reads it as the model, so
    # it keeps it under a new fingerprint, a new record
    sent = json.dumps(outbox_entry(1, content_hash="0" * 64, legacy=True), sort_keys=True)
    fleet.sql(
        "UPDATE quarantine SET entry = %s, fingerprint = %s WHERE quarantine_id = %s",
        (sent, hashlib.sha256(sent.encode()).hexdigest(), item["id"]),
    )
    again = ok(fleet.post(f"/api/v1/quarantine/{item['id']}/replay", "operator"))
    assert (again["landed"], again["item"]["status"]) == (False, "replayed")
    newer = again["superseded_by"]
    assert newer is not None and newer != item["id"]
    assert again["item"]["decisions"][0]["reason"].endswith(f"quarantine item {newer}")
    [still] = ok(fleet.get("/api/v1/quarantine?status=open", "auditor"))["items"]
    assert (still["id"], still["reason"]) == (newer, "content_hash_mismatch")
