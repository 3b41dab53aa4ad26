"""The sync service on PostgreSQL (cloud.sync.PostgresSyncBackend): the schema, the
exchange end to end, the token race, document versions under concurrency, and a database
fault mid-sync as a 503 that committed nothing."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import NewDatabase, with_dbname
from sync_memory import Terminal, outbox_entry

from cloud.sync.postgres import PostgresSyncBackend, load_migrations, load_schema
from edge.engine.clock import FakeClock, SystemClock
from edge.errors import MigrationError
from sync import signing, wire
from sync.server import NewDocument, ServiceError, SyncService


@pytest.fixture
def sync_url(new_database: NewDatabase) -> str:
    """A new, empty database of this test's own, dropped when it ends."""
    return new_database()


@pytest.fixture
def backend(sync_url: str) -> Iterator[PostgresSyncBackend]:
    b = PostgresSyncBackend(sync_url, pool_timeout_s=2.0)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def clock() -> SystemClock:
    return SystemClock()


@pytest.fixture
def service(backend: PostgresSyncBackend, clock: Any) -> SyncService:
    return SyncService(backend, clock, signing.new_key())


def enroll(service: SyncService) -> Terminal:
    term = Terminal(service.clock)
    status, body = term.enroll(service, service.create_enroll_token("s1").token)
    assert status == 200, body
    term.device_id = body["device_id"]
    return term


def ok(service: SyncService, term: Terminal, **fields: Any) -> dict[str, Any]:
    outbox, audit = fields.pop("outbox", ()), fields.pop("audit", ())
    status, body = service.sync(*term.signed(term.request(outbox, audit, **fields)))
    assert status == 200, body
    return body


def scalar(url: str, sql: str, *params: Any) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]


# --- schema --------------------------------------------------------------------------------

CATALOG = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity
        FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name <> 'sync_schema_migrations'
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = current_schema() AND tablename <> 'sync_schema_migrations'
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = current_schema() AND c.conrelid <> 0
          AND c.conrelid::regclass::text <> 'sync_schema_migrations'
        ORDER BY 1, 2""",
}


def catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {k: conn.execute(q).fetchall() for k, q in CATALOG.items()}


def test_schema__the_migrations_converge_with_schema_sql_and_rerun_is_a_no_op(
    backend, sync_url, pg_server
):
    migrated = catalog(sync_url)
    assert {t for t, *_ in migrated["columns"]} == {
        "devices", "enroll_tokens", "device_nonces", "sync_streams", "sync_messages",
        "device_audit", "audit_chains", "quarantine", "commands", "sync_documents",
        "device_health", "document_assignments",
    }  # fmt: skip
    other = f"tillflow_sync_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{other}"')
    try:
        with psycopg.connect(with_dbname(pg_server, other), autocommit=True) as conn:
            conn.execute(load_schema().encode())
        assert catalog(with_dbname(pg_server, other)) == migrated
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')
    assert backend.migrate() == len(load_migrations()) == 5
    assert backend.schema_versions() == {"sync": 5}


def test_schema__sits_beside_the_engine_store_and_refuses_a_newer_version(sync_url):
    from cloud.store.postgres import PostgresStore

    PostgresStore(sync_url).close()  # the engine's tables first, in the same database
    with PostgresSyncBackend(sync_url) as backend:
        versions = backend.schema_versions()
        assert versions["sync"] == len(load_migrations()) and versions["engine"] >= 6
    with psycopg.connect(sync_url, autocommit=True) as conn:
        conn.execute("INSERT INTO sync_schema_migrations VALUES (99, 'future', 0)")
    with pytest.raises(MigrationError, match="newer than this build"):
        PostgresSyncBackend(sync_url)


# --- the exchange --------------------------------------------------------------------------


def test_sync__per_entry_results_chain_and_commands_on_postgresql(service, sync_url):
    term = enroll(service)
    batch = [outbox_entry(1), outbox_entry(2, content_hash="0" * 64), outbox_entry(3)]
    body = ok(service, term, outbox=batch, audit=term.grow_audit(3))
    assert [r["status"] for r in body["results"]] == ["applied", "rejected", "applied"]
    assert (body["outbox_through"], body["audit_through"]) == (3, 3)
    again = ok(service, term, outbox=[outbox_entry(3), outbox_entry(1, payload={"x": 1})])
    assert [r["status"] for r in again["results"]] == ["duplicate", "conflict"]
    assert scalar(sync_url, "SELECT count(*) FROM sync_messages") == 2
    assert scalar(sync_url, "SELECT count(*) FROM quarantine WHERE status = 'open'") == 2
    assert scalar(sync_url, "SELECT conflicts FROM devices") == 1
    assert scalar(sync_url, "SELECT outbox_acked FROM sync_streams") == 3
    assert scalar(sync_url, "SELECT payload->>'amount' FROM sync_messages WHERE seq = 1") == "100"
    body = ok(service, term, audit=term.grow_audit(2))
    assert body["chain"] == {"state": "ok", "head_seq": 5, "first_bad_seq": None, "reason": None}
    assert service.verify_device_audit(term.device_id).ok
    # the cloud's copy edited: audit verify finds the row
    with psycopg.connect(sync_url) as conn:
        conn.execute("UPDATE device_audit SET detail = '{\"n\": 9}' WHERE seq = 4")
    [chain] = service.verify_device_audit(term.device_id).chains
    assert (chain.ok, chain.first_bad_seq) == (False, 4)
    # commands: delivered until taken, a result recorded
    queued = service.queue_command(term.device_id, "update_config", NewDocument({"limit": 5}))
    [env] = ok(service, term)["commands"]
    command = signing.open_envelope(signing.load_public(service.public_key), wire.Envelope(**env))
    assert (command.seq, command.document and command.document.version) == (1, 1)
    result = {"command_id": queued.command_id, "seq": 1, "status": "applied", "at": 1.0}
    done = ok(service, term, commands_through=1,
              outbox=[outbox_entry(4, topic="command_result", payload=result)])  # fmt: skip
    assert done["commands"] == [] and done["results"][0]["status"] == "applied"
    assert scalar(sync_url, "SELECT status FROM commands") == "applied"
    device = service.device(term.device_id)
    assert device.heartbeat and device.heartbeat["config_version"] == 3 and device.last_seen_at


def test_sync__a_queued_command_past_its_expiry_is_expired_not_delivered(backend, sync_url):
    """take_commands expires and takes in one statement: the expired command is marked
    so and stays down; the live one goes."""
    clock = FakeClock(SystemClock().now())
    service = SyncService(backend, clock, signing.new_key())
    term = enroll(service)
    short = service.queue_command(term.device_id, "request_health", ttl_s=10)
    long = service.queue_command(term.device_id, "request_health", ttl_s=1000)
    clock.advance(100)
    [env] = ok(service, term)["commands"]
    command = signing.open_envelope(signing.load_public(service.public_key), wire.Envelope(**env))
    assert command.command_id == long.command_id
    status = "SELECT status FROM commands WHERE command_id = %s"
    assert scalar(sync_url, status, short.command_id) == "expired"
    assert scalar(sync_url, status, long.command_id) == "delivered"
    assert ok(service, term, commands_through=command.seq)["commands"] == []


def test_sync__a_full_batch_of_each_goes_in_whole(service, sync_url):
    term = enroll(service)
    n = wire.MAX_BATCH_ENTRIES
    body = ok(
        service,
        term,
        outbox=[outbox_entry(i) for i in range(1, n + 1)],
        audit=term.grow_audit(n),
    )
    assert (body["outbox_through"], body["audit_through"]) == (n, n)
    assert scalar(sync_url, "SELECT count(*) FROM device_audit") == n
    assert scalar(sync_url, "SELECT count(*) FROM sync_messages") == n
    assert service.verify_device_audit(term.device_id).chains[0].rows == n


def test_sync__refusals_store_nothing_on_postgresql(service, sync_url):
    term = enroll(service)
    request = term.signed(term.request([outbox_entry(1)]))
    assert service.sync(*request)[0] == 200
    status, body = service.sync(*request)
    assert (status, body["error"]["code"]) == (401, "replayed_nonce")
    # The enrollment's nonce and the first request's: the replay stored nothing.
    assert scalar(sync_url, "SELECT count(*) FROM device_nonces") == 2
    service.revoke_device(term.device_id)
    status, body = service.sync(*term.signed(term.request([outbox_entry(2)])))
    assert (status, body["error"]["code"]) == (403, "device_revoked")
    assert scalar(sync_url, "SELECT count(*) FROM sync_messages") == 1


def test_enroll__two_terminals_racing_one_token_exactly_one_wins(service, sync_url):
    for _ in range(5):
        token = service.create_enroll_token("race").token
        terms = [Terminal(service.clock) for _ in range(2)]
        barrier = threading.Barrier(2)
        answers: list[tuple[int, dict[str, Any]]] = []

        def go(term: Terminal, token: str, barrier: threading.Barrier, answers: list[Any]) -> None:
            barrier.wait(timeout=10)
            answers.append(term.enroll(service, token))

        threads = [threading.Thread(target=go, args=(t, token, barrier, answers)) for t in terms]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(status for status, _ in answers) == [200, 401]
        assert [b["error"]["code"] for s, b in answers if s == 401] == ["invalid_token"]
    assert scalar(sync_url, "SELECT count(*) FROM devices") == 5


def test_documents__concurrent_new_versions_are_distinct(service, sync_url):
    terms = [enroll(service) for _ in range(4)]
    barrier = threading.Barrier(len(terms))
    versions: list[int | None] = []

    def go(term: Terminal) -> None:
        barrier.wait(timeout=10)
        q = service.queue_command(
            term.device_id, "activate_policy", NewDocument({"id": term.device_id})
        )
        versions.append(q.document_version)

    threads = [threading.Thread(target=go, args=(t,)) for t in terms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(v or 0 for v in versions) == [1, 2, 3, 4]
    with pytest.raises(ServiceError) as exc:
        service.queue_command(
            terms[0].device_id, "activate_policy", NewDocument({"x": 1}, version=2)
        )
    assert exc.value.code == "stale_version"


# --- faults --------------------------------------------------------------------------------


class KillingBackend(PostgresSyncBackend):
    """Terminates its own connection from another session when the service reaches
    operation ``kill_on`` inside a transaction: the database going away mid-sync."""

    kill_on: str | None = None
    admin_url = ""

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        with super().transaction() as tx:
            yield _Killer(tx, self)


class _Killer:
    def __init__(self, tx: Any, backend: KillingBackend) -> None:
        self._tx, self._backend = tx, backend

    def __getattr__(self, name: str) -> Any:
        if name == self._backend.kill_on:
            self._backend.kill_on = None
            pid = self._tx.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            with psycopg.connect(self._backend.admin_url, autocommit=True) as admin:
                assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0]
        return getattr(self._tx, name)


@pytest.mark.parametrize("op", ["insert_messages", "insert_audit", "save_heartbeat"])
def test_fault__a_connection_killed_mid_sync_is_503_and_nothing_committed(sync_url, pg_server, op):
    backend = KillingBackend(sync_url, pool_timeout_s=2.0)
    backend.admin_url = pg_server
    try:
        service = SyncService(backend, SystemClock(), signing.new_key())
        term = enroll(service)
        backend.kill_on = op
        request = term.signed(term.request([outbox_entry(1)], term.grow_audit(2)))
        status, body = service.sync(*request)
        assert status == 503, body
        assert body["error"]["code"] == "unavailable" and body["retry_after"] > 0
        assert scalar(sync_url, "SELECT count(*) FROM sync_messages") == 0
        assert scalar(sync_url, "SELECT count(*) FROM device_audit") == 0
        # only the enrollment's nonce: the failed exchange's was rolled back with it
        assert scalar(sync_url, "SELECT count(*) FROM device_nonces") == 1
        # the retry (a new signature) is taken whole on a fresh connection
        body = ok(service, term, outbox=[outbox_entry(1)], audit=term.audit_rows)
        assert (body["outbox_through"], body["audit_through"]) == (1, 2)
    finally:
        backend.close()


def test_fault__a_database_refusing_connections_is_503_then_recovers(sync_url, pg_server):
    backend = PostgresSyncBackend(sync_url, pool_timeout_s=1.0)
    name = sync_url.rsplit("/", 1)[1]
    try:
        service = SyncService(backend, FakeClock(SystemClock().now()), signing.new_key())
        term = enroll(service)
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        status, body = service.sync(*term.signed(term.request([outbox_entry(1)])))
        assert (status, body["error"]["code"]) == (503, "unavailable")
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        # the pool reconnects on its own backoff: each try is a 503 until it has, then
        # the batch is taken (bounded: each try waits at most the pool timeout)
        deadline = time.monotonic() + 60
        while True:
            status, body = service.sync(*term.signed(term.request([outbox_entry(1)])))
            if status == 200 or time.monotonic() > deadline:
                break
            assert (status, body["error"]["code"]) == (503, "unavailable")
        assert status == 200 and body["outbox_through"] == 1
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        backend.close()


def _drop_connections(pg_server: str, sync_url: str) -> None:
    name = sync_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )


def test_pool__an_idle_connection_the_server_dropped_is_replaced_unseen(
    sync_url, pg_server, monkeypatch
):
    """The pool checks a connection that sat idle (``CHECK_IDLE_AFTER_S``; 0 here, so
    every one is) before handing it out: the server dropping it costs no request."""
    from cloud.sync import postgres

    monkeypatch.setattr(postgres, "CHECK_IDLE_AFTER_S", 0.0)
    backend = PostgresSyncBackend(sync_url, pool_size=1, pool_timeout_s=5.0)
    try:
        service = SyncService(backend, SystemClock(), signing.new_key())
        term = enroll(service)
        ok(service, term)
        _drop_connections(pg_server, sync_url)
        ok(service, term)  # 200: the dead connection was checked and replaced
    finally:
        backend.close()


def test_pool__a_connection_dropped_just_after_use_is_one_retryable_503(
    sync_url, pg_server, monkeypatch
):
    """A connection back in the pool a moment ago goes out unchecked (one round trip
    saved per exchange): if the server dropped it in that moment (an hour here, so the
    machine's speed does not matter), that one request is a 503 (retryable, nothing
    committed) and the next is served on a new connection."""
    from cloud.sync import postgres

    monkeypatch.setattr(postgres, "CHECK_IDLE_AFTER_S", 3600.0)
    backend = PostgresSyncBackend(sync_url, pool_size=1, pool_timeout_s=5.0)
    try:
        service = SyncService(backend, SystemClock(), signing.new_key())
        term = enroll(service)
        ok(service, term)
        _drop_connections(pg_server, sync_url)
        status, body = service.sync(*term.signed(term.request([outbox_entry(1)])))
        assert (status, body["error"]["code"]) == (503, "unavailable")
        assert scalar(sync_url, "SELECT count(*) FROM sync_messages") == 0
        assert ok(service, term, outbox=[outbox_entry(1)])["outbox_through"] == 1
    finally:
        backend.close()


def test_sync__audit_rows_already_held_above_the_head_do_not_fail_the_copy(service, sync_url):
    """The audit rows go in by COPY; a row there already (a chain reset by hand) makes
    the batch fall back to an insert that skips it, not a failed exchange."""
    term = enroll(service)
    rows = term.grow_audit(3)
    ok(service, term, audit=rows)
    with psycopg.connect(sync_url) as conn:
        conn.execute("UPDATE audit_chains SET head_seq = 1, head_hash = %s", (rows[0]["hash"],))
        conn.execute("DELETE FROM device_audit WHERE seq = 2")
    body = ok(service, term, audit=rows[1:])
    assert body["chain"]["state"] == "ok" and body["audit_through"] == 3
    assert scalar(sync_url, "SELECT count(*) FROM device_audit") == 3
    assert service.verify_device_audit(term.device_id).ok
