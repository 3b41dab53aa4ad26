"""AuditAggregation on the engine and real PostgreSQL: devices enrolled and synced through
``SyncService``, then the workflow run to completion by a ``Worker``: every chain ok and a
signed digest; an edited row found; an edit re-chained so the chain alone verifies still
caught by the signed digest (and not laundered into the next one); a forged digest
refused; a silent device raised, then cleared when it syncs. The Fleet API's views of
it (alerts, verifications, digests and their check) on the same database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import NewDatabase
from sync_memory import Terminal

from cloud.api.app import create_app
from cloud.api.fleet.context import FleetContext
from cloud.api.fleet.routes import alerts as alert_routes
from cloud.api.serve import migrate_fleet
from cloud.control import SCHEMA, migrate
from cloud.control import digest as digests
from cloud.fleet import tokens
from cloud.settings import CloudSettings
from cloud.store.postgres import PostgresStore
from cloud.sync.keys import load_or_create_key
from cloud.sync.postgres import PostgresSyncBackend
from edge.engine import Engine, FakeClock, PollingExecutor, RunRecord, Status, Worker
from edge.engine.audit import link
from edge.engine.records import AuditEvent
from sync import signing
from sync.server import SyncService
from sync.wire import b64e

# imported at collection, where its deprecation notice about httpx is not an error
testclient = pytest.importorskip("starlette.testclient")

WORKFLOWS = Path(__file__).resolve().parents[2] / "cloud" / "workflows"
WORKFLOW = WORKFLOWS / "audit_aggregation.yaml"
OFFLINE_AFTER_S = 3600.0


@dataclass
class Rig:
    url: str
    clock: FakeClock
    settings: CloudSettings
    key: Any
    backend: PostgresSyncBackend
    service: SyncService
    store: PostgresStore
    engine: Engine
    client: Any
    token: str

    def enroll(self, store: str = "s1") -> Terminal:
        term = Terminal(self.clock)
        status, body = term.enroll(self.service, self.service.create_enroll_token(store).token)
        assert status == 200, body
        term.device_id = body["device_id"]
        return term

    def sync(self, term: Terminal, rows: int = 0) -> dict[str, Any]:
        request = term.request((), term.grow_audit(rows) if rows else ())
        status, body = self.service.sync(*term.signed(request))
        assert status == 200, body
        return body

    def run(self, workflow: str = "AuditAggregation", **run_input: Any) -> RunRecord:
        """One run, advanced by a worker until it ends."""
        run_id = self.engine.start(workflow, run_input)
        worker = Worker(self.engine)
        deadline = time.monotonic() + 60
        while True:
            run = self.store.get_run(run_id)
            assert run is not None
            if run.status.terminal:
                return run
            assert time.monotonic() < deadline, f"run stuck: {run.status} {run.error}"
            if worker.run_once() == 0:
                self.clock.advance(1.0)  # a retry's backoff (none is expected) comes due

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def api(self, method: str, path: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        return self.client.request(method, path, headers=headers, **kw)


@pytest.fixture
def rig(new_database: NewDatabase, tmp_path: Path) -> Iterator[Rig]:
    url = new_database()
    clock = FakeClock(time.time())
    key_file = tmp_path / "control-plane.key"
    key, _ = load_or_create_key(key_file)
    settings = CloudSettings(
        database_url=url, signing_key_file=key_file, offline_after_s=OFFLINE_AFTER_S
    )
    store = PostgresStore(url)
    backend = PostgresSyncBackend(url, pool_size=4)
    try:
        migrate_fleet(backend)
        service = SyncService(backend, clock, key)
        # The steps find everything from the settings, as a worker's would.
        engine = Engine(store, PollingExecutor(), clock=clock, services={"settings": settings})
        engine.register(WORKFLOW)
        engine.register(WORKFLOWS / "silent_devices.yaml")
        fleet = FleetContext(settings, backend.pool, service, clock, key)
        app = create_app(service, fleet=fleet, fleet_routers=[alert_routes.router])
        with backend.pool.connection() as conn, conn.transaction():
            token, _ = tokens.create(conn, "auditor", "auditor", at=1.0, by="test")
        with testclient.TestClient(app, raise_server_exceptions=False) as client:
            yield Rig(url, clock, settings, key, backend, service, store, engine, client, token)
    finally:
        backend.close()
        store.close()


def verifications(rig: Rig) -> dict[str, tuple[bool, int | None]]:
    rows = rig.sql("SELECT device_id, ok, first_bad_seq FROM audit_verifications")
    return {d: (ok, bad) for d, ok, bad in rows}


def rechain(rig: Rig, device_id: str, seq: int, detail: dict[str, Any]) -> None:
    """Edit one row, then recompute every hash after it and the chain's head: what an
    attacker with write access to the cloud's database would do."""
    rows = rig.sql(
        "SELECT seq, run_id, event, step, detail, at, hash, chain FROM device_audit "
        "WHERE device_id = %s ORDER BY seq",
        device_id,
    )
    prev = None
    for s, run_id, event, step, old, at, h, chain in rows:
        if s < seq:
            prev = h
            continue
        assert prev is not None
        new = link(prev, s, AuditEvent(run_id, event, at, step, detail if s == seq else old),
                   stream=chain)  # fmt: skip
        rig.sql(
            "UPDATE device_audit SET detail = %s::jsonb, prev_hash = %s, hash = %s "
            "WHERE device_id = %s AND seq = %s",
            psycopg.types.json.Jsonb(detail if s == seq else old), prev, new, device_id, s,
        )  # fmt: skip
        prev = new
    rig.sql("UPDATE audit_chains SET head_hash = %s WHERE device_id = %s", prev, device_id)


# --- schema --------------------------------------------------------------------------------

CATALOG = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = ANY(%(tables)s)
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = current_schema() AND tablename = ANY(%(tables)s)
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = current_schema() AND c.conrelid::regclass::text = ANY(%(tables)s)
        ORDER BY 1, 2""",
}
TABLES = ["audit_verifications", "audit_digests", "audit_digest_heads", "device_alerts"]


def catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {k: conn.execute(q, {"tables": TABLES}).fetchall() for k, q in CATALOG.items()}


def test_schema__migrations_converge_with_schema_sql_and_rerun_is_a_no_op(
    new_database: NewDatabase,
):
    migrated, fresh = new_database(), new_database()
    with psycopg.connect(migrated, autocommit=True) as conn, conn.transaction():
        assert migrate(conn) == len(SCHEMA.migrations()) == 1
    with psycopg.connect(migrated, autocommit=True) as conn, conn.transaction():
        assert migrate(conn) == 1  # nothing pending: nothing done
    with PostgresSyncBackend(migrated) as backend:  # serve's call, on its pool
        migrate_fleet(backend)
        with backend.pool.connection() as conn:
            assert SCHEMA.version(conn) == 1
    with psycopg.connect(fresh, autocommit=True) as conn:
        conn.execute(SCHEMA.schema().encode())
    got = catalog(migrated)
    assert {t for t, *_ in got["columns"]} == set(TABLES)
    assert got == catalog(fresh)


# --- the workflow --------------------------------------------------------------------------


def test_audit_aggregation__every_chain_ok_and_a_signed_chain_of_digests(rig: Rig):
    terms = [rig.enroll() for _ in range(5)]
    for i, term in enumerate(terms):
        rig.sync(term, rows=3 + i)
    run = rig.run(page_size=2)  # 5 devices: three pages, each its own step
    assert run.status is Status.COMPLETED, run.error
    assert (run.state["devices"], run.state["chains"], run.state["broken_chains"]) == (5, 5, 0)
    pages = rig.sql("SELECT count(*) FROM workflow_steps WHERE run_id = %s AND step_name = "
                    "'verify_page' AND status = 'COMPLETED'", run.run_id)  # fmt: skip
    assert pages == [(3,)]
    assert verifications(rig) == {t.device_id: (True, None) for t in terms}

    with psycopg.connect(rig.url) as conn:
        first, problems = digests.verify_stored(conn, 1, rig.key.public_key())
        assert problems == []
        heads = {h.device_id: (h.head_seq, h.head_hash) for h in digests.heads_of(conn, 1)}
    assert heads == {t.device_id: (t.audit_rows[-1]["seq"], t.audit_rows[-1]["hash"])
                     for t in terms}  # fmt: skip
    assert (first.heads, first.prev_hash, run.state["digest_seq"]) == (5, "0" * 64, 1)

    rig.sync(terms[0], rows=2)  # a head moves; the next digest signs the new one
    second = rig.run()
    assert second.status is Status.COMPLETED, second.error
    with psycopg.connect(rig.url) as conn:
        made, problems = digests.verify_stored(conn, 2, rig.key.public_key())
        head = digests.heads_of(conn, 2, terms[0].device_id)[0]
    assert problems == [] and made.prev_hash == first.hash
    assert (head.head_seq, head.head_hash) == (5, terms[0].audit_rows[-1]["hash"])
    # compared with digest 1 this time
    assert rig.sql("SELECT DISTINCT digest_seq FROM audit_verifications") == [(1,)]
    listed = rig.api("GET", "/api/v1/audit/digests", params={"limit": 1}).json()
    assert [d["seq"] for d in listed["items"]] == [2] and listed["next"] == "2"
    older = rig.api("GET", "/api/v1/audit/digests", params={"after": "2"}).json()
    assert [d["seq"] for d in older["items"]] == [1] and older["next"] is None
    check = rig.api("POST", "/api/v1/audit/digests/verify", json={}).json()
    assert (check["digest"]["seq"], check["devices_checked"], check["mismatches"]) == (2, 5, [])


def test_audit_aggregation__an_edited_row_is_found_broken(rig: Rig):
    a, b = rig.enroll(), rig.enroll()
    rig.sync(a, rows=4)
    rig.sync(b, rows=4)
    rig.sql("UPDATE device_audit SET detail = '{\"n\": 99}' WHERE device_id = %s AND seq = 3",
            b.device_id)  # fmt: skip
    run = rig.run()
    assert run.status is Status.COMPLETED, run.error
    assert verifications(rig) == {a.device_id: (True, None), b.device_id: (False, 3)}
    assert (run.state["broken_chains"], run.state["broken_devices"]) == (1, [b.device_id])
    broken = rig.api("GET", "/api/v1/audit/verifications", params={"state": "broken"}).json()
    [item] = broken["items"]
    assert (item["device_id"], item["first_bad_seq"]) == (b.device_id, 3)
    assert "edited" in item["reason"]


def test_audit_aggregation__a_rechained_edit_is_caught_by_the_signed_digest(rig: Rig):
    a, b = rig.enroll(), rig.enroll()
    rig.sync(a, rows=5)
    rig.sync(b, rows=5)
    assert rig.run().status is Status.COMPLETED  # digest 1 signs both heads
    rechain(rig, b.device_id, 2, {"n": 2, "amount": 1})
    # the chain alone verifies: only the digest can tell
    assert rig.service.verify_device_audit(b.device_id).ok
    run = rig.run()
    assert run.status is Status.COMPLETED, run.error
    assert verifications(rig) == {a.device_id: (True, None), b.device_id: (False, 5)}
    [reason] = [r[0] for r in rig.sql("SELECT reason FROM audit_verifications WHERE NOT ok")]
    assert "signed digest" in reason and "re-chained" in reason
    # digest 2 keeps the head digest 1 signed for b: the edit is not laundered
    with psycopg.connect(rig.url) as conn:
        [kept] = digests.heads_of(conn, 2, b.device_id)
    assert kept.head_hash == b.audit_rows[-1]["hash"]
    assert rig.run().state["broken_devices"] == [b.device_id]  # found again the day after
    check = rig.api("POST", "/api/v1/audit/digests/verify", json={"limit": 1})
    assert check.status_code == 200, check.text
    first = check.json()
    assert first["devices_checked"] == 1 and first["next"] is not None
    rest = rig.api("POST", "/api/v1/audit/digests/verify", json={"after": first["next"]}).json()
    mismatches = first["mismatches"] + rest["mismatches"]
    assert [(m["device_id"], m["signed_seq"]) for m in mismatches] == [(b.device_id, 5)]


def test_audit_aggregation__a_forged_digest_is_refused(rig: Rig):
    term = rig.enroll()
    rig.sync(term, rows=3)
    assert rig.run().status is Status.COMPLETED
    [(seq, run_id, made_at, n, hh, prev)] = rig.sql(
        "SELECT seq, run_id, made_at, heads, heads_hash, prev_hash FROM audit_digests"
    )
    data = digests.digest_bytes(seq, run_id, made_at, n, hh, prev)
    other = signing.new_key()
    # another key's signature over the very bytes: refused
    rig.sql("UPDATE audit_digests SET signature = %s", b64e(other.sign(data)))
    answer = rig.api("POST", "/api/v1/audit/digests/verify", json={"digest_seq": 1})
    assert answer.status_code == 409, answer.text
    error = answer.json()["error"]
    assert error["code"] == "digest_refused" and "forged" in error["message"]
    failed = rig.run()
    assert failed.status is Status.FAILED
    assert "refused" in str(failed.error)
    assert rig.sql("SELECT count(*) FROM audit_digests") == [(1,)]  # none chained onto it
    # a head edited under a genuine signature: refused too
    rig.sql("UPDATE audit_digests SET signature = %s", b64e(rig.key.sign(data)))
    assert rig.api("POST", "/api/v1/audit/digests/verify", json={}).status_code == 200
    rig.sql("UPDATE audit_digest_heads SET head_hash = %s", "f" * 64)
    answer = rig.api("POST", "/api/v1/audit/digests/verify", json={})
    assert answer.status_code == 409 and "heads changed" in answer.json()["error"]["message"]
    assert rig.api("POST", "/api/v1/audit/digests/verify",
                   json={"digest_seq": 7}).status_code == 404  # fmt: skip


def test_audit_aggregation__a_silent_device_is_raised_then_cleared_when_it_syncs(rig: Rig):
    quiet, busy, never = rig.enroll("s1"), rig.enroll("s2"), rig.enroll("s3")
    rig.sync(quiet, rows=1)
    rig.clock.advance(2 * OFFLINE_AFTER_S)
    rig.sync(busy, rows=1)
    rig.service.revoke_device(never.device_id)  # revoked: never raised
    run = rig.run()
    assert run.status is Status.COMPLETED, run.error
    assert (run.state["alerts_raised"], run.state["alerts_open"]) == (1, 1)
    raised = rig.api("GET", "/api/v1/alerts").json()["items"]
    assert [(a["device_id"], a["state"], a["store"]) for a in raised] == [
        (quiet.device_id, "raised", "s1")
    ]
    assert raised[0]["silent_s"] >= 2 * OFFLINE_AFTER_S
    rig.clock.advance(10)
    rig.sync(quiet)  # back: off the list at once, before the next run
    assert rig.api("GET", "/api/v1/alerts").json()["items"] == []
    shown = rig.api("GET", "/api/v1/alerts", params={"state": "cleared"}).json()["items"]
    assert [(a["device_id"], a["cleared_at"]) for a in shown] == [
        (quiet.device_id, rig.clock.now())
    ]
    again = rig.run()
    assert (again.state["alerts_cleared"], again.state["alerts_open"]) == (1, 0)
    [(cleared_at,)] = rig.sql("SELECT cleared_at FROM device_alerts")
    assert cleared_at is not None
    # silent again: raised anew
    rig.clock.advance(2 * OFFLINE_AFTER_S)
    rig.sync(busy)
    third = rig.run()
    assert third.state["alerts_raised"] == 1
    assert rig.sql("SELECT device_id FROM device_alerts WHERE cleared_at IS NULL") == [
        (quiet.device_id,)
    ]


def test_silent_devices__its_own_shorter_schedule_raises_without_a_digest(rig: Rig):
    term = rig.enroll()
    rig.sync(term, rows=2)
    rig.clock.advance(OFFLINE_AFTER_S + 1)
    run = rig.run("SilentDevices")
    assert run.status is Status.COMPLETED, run.error
    assert rig.sql("SELECT device_id FROM device_alerts WHERE cleared_at IS NULL") == [
        (term.device_id,)
    ]
    assert rig.sql("SELECT count(*) FROM audit_digests") == [(0,)]
    assert rig.run("SilentDevices").state["alerts_raised"] == 0  # still raised, once


def test_audit_aggregation__its_first_step_migrates_a_database_serve_never_saw(
    new_database: NewDatabase, tmp_path: Path
):
    url = new_database()
    key_file = tmp_path / "k"
    load_or_create_key(key_file)
    store = PostgresStore(url)
    PostgresSyncBackend(url).close()  # the sync tables, as any control-plane database has
    try:
        settings = CloudSettings(database_url=url, signing_key_file=key_file)
        engine = Engine(store, PollingExecutor(), services={"settings": settings})
        engine.register(WORKFLOW)
        run_id = engine.start("AuditAggregation")
        worker = Worker(engine)
        deadline = time.monotonic() + 30
        while not (run := store.get_run(run_id)) or not run.status.terminal:
            assert time.monotonic() < deadline
            worker.run_once()
        assert run.status is Status.COMPLETED, run.error
        assert run.state["control_schema"] == 1 and run.state["digest_heads"] == 0
    finally:
        store.close()


def test_audit_aggregation__without_settings_the_run_fails_saying_so(pg_url: str):
    store = PostgresStore(pg_url)
    try:
        engine = Engine(store, PollingExecutor())
        engine.register(WORKFLOW)
        run_id = engine.start("AuditAggregation")
        Worker(engine).run_once()
        run = store.get_run(run_id)
        assert run is not None and run.status is Status.FAILED
        assert "ctx.services.settings" in str(run.error)
    finally:
        store.close()
