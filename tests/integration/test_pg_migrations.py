"""The PostgreSQL schema: numbered migrations converge with ``schema.sql``, both dialects
name the same queries, every PostgreSQL query plans against the migrated schema, and
the schema version in the database guards against running an older build on it."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import psycopg
import psycopg.errors
import pytest
from psycopg.types.json import Jsonb

from cloud.store.postgres import PostgresStore
from edge.errors import MigrationError
from edge.store.queries import load_migrations, load_queries, load_schema

#: The ``new_database`` fixture (tests/integration/conftest.py): makes an empty database.
NewDatabase = Callable[[], str]
Snapshot = dict[str, list[tuple[Any, ...]]]

#: The catalog, as comparable rows. ``schema_migrations`` is bookkeeping that only the
#: migration path creates; column order is not compared (an added column lands last
#: in a migrated database, wherever ``schema.sql`` puts it).
CATALOG = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default,
               is_identity, identity_generation
        FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name <> 'schema_migrations'
        ORDER BY 1, 2""",
    "relations": r"""
        SELECT c.relname, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND c.relname NOT LIKE 'schema\_migrations%'
        ORDER BY 1""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = current_schema() AND tablename <> 'schema_migrations'
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = current_schema() AND c.conrelid <> 0
          AND c.conrelid::regclass::text <> 'schema_migrations'
        ORDER BY 1, 2""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT t.tgisinternal AND n.nspname = current_schema()
        ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema()
        ORDER BY 1, 2""",
    # Seed rows are part of the schema: the audit chain starts from this head.
    "audit_head": "SELECT stream, seq, hash FROM audit_head ORDER BY stream",
}


def _normalise(value: Any) -> Any:
    return " ".join(value.split()) if isinstance(value, str) else value


def snapshot(conn: psycopg.Connection[Any]) -> Snapshot:
    return {
        part: [tuple(_normalise(v) for v in row) for row in conn.execute(sql).fetchall()]
        for part, sql in CATALOG.items()
    }


@pytest.fixture
def migrated_and_canonical(new_database: NewDatabase) -> tuple[str, str]:
    """Two fresh databases: one migrated by the store, one built from schema.sql."""
    migrated, canonical = new_database(), new_database()
    PostgresStore(migrated).close()
    with psycopg.connect(canonical, autocommit=True) as conn:
        conn.execute(load_schema("postgresql", package="cloud.store").encode())
    return migrated, canonical


# --- migrations and schema.sql -----------------------------------------------------------


def test_migrations__applied_in_order_give_the_same_schema_as_schema_sql(
    migrated_and_canonical: tuple[str, str],
) -> None:
    migrated, canonical = migrated_and_canonical
    with psycopg.connect(migrated) as a, psycopg.connect(canonical) as b:
        from_migrations, from_schema = snapshot(a), snapshot(b)
    tables = {name for name, kind in from_migrations["relations"] if kind == "r"}
    assert tables == {
        "workflow_definitions",
        "workflow_runs",
        "workflow_run_inputs",
        "workflow_steps",
        "workflow_audit_log",
        "audit_head",
        "audit_retention",
        "outbox",
        "counters",
        "database_meta",
        "command_ledger",
        "documents",
    }
    assert all(from_migrations.values()), "a catalog query found nothing"
    for part in CATALOG:
        assert from_migrations[part] == from_schema[part], part


MUTATIONS = [
    "DROP INDEX workflow_runs_by_parent",
    "ALTER TABLE outbox ALTER COLUMN topic DROP NOT NULL",
    "ALTER TABLE workflow_steps ALTER COLUMN attempt SET DEFAULT 1",
    "ALTER TABLE workflow_steps ALTER COLUMN ref_seq TYPE integer",
    "ALTER TABLE workflow_runs DROP CONSTRAINT workflow_runs_status_check",
    "DROP TRIGGER workflow_audit_log_no_truncate ON workflow_audit_log",
    "CREATE OR REPLACE FUNCTION workflow_audit_log_append_only() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
    "UPDATE audit_head SET seq = 1",
]


def test_migrations__the_schema_comparison_sees_each_kind_of_difference(
    migrated_and_canonical: tuple[str, str],
) -> None:
    _, canonical = migrated_and_canonical
    with psycopg.connect(canonical) as conn:
        clean = snapshot(conn)
        conn.rollback()
        for mutation in MUTATIONS:
            with conn.transaction(force_rollback=True):
                conn.execute(mutation.encode())
                assert snapshot(conn) != clean, f"the comparison misses: {mutation}"
        assert snapshot(conn) == clean


def test_migrate__a_database_newer_than_this_build_raises_migration_error(pg_url: str) -> None:
    latest = len(load_migrations("postgresql", package="cloud.store"))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, 'future', 0)",
            (latest + 1,),
        )

    with pytest.raises(MigrationError) as caught:
        PostgresStore(pg_url)

    assert f"{latest + 1}" in caught.value.message and f"({latest})" in caught.value.message
    assert caught.value.operation == "migrate" and caught.value.hint
    reader = PostgresStore(pg_url, migrate=False)
    try:
        assert reader.schema_version() == latest + 1  # nothing was touched
    finally:
        reader.close()


def test_migrate__four_stores_opening_a_fresh_database_at_once_migrate_it_once(
    new_database: NewDatabase,
) -> None:
    url = new_database()
    barrier = threading.Barrier(4)

    def open_store() -> int:
        barrier.wait()
        store = PostgresStore(url, pool_size=1)
        try:
            return store.schema_version()
        finally:
            store.close()

    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda _: open_store(), range(4)))

    migrations = load_migrations("postgresql", package="cloud.store")
    assert versions == [len(migrations)] * 4
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    assert rows == [(m.version, m.name) for m in migrations]


# --- named queries ---------------------------------------------------------------------------

_PARAM = re.compile(r"%\((\w+)\)s")
_TEXT = {
    "run_id", "workflow_type", "definition_hash", "idempotency_key", "parent_run_id",
    "parent_step", "lease_owner", "owner", "commit_token", "content_hash", "snapshot",
    "name", "step", "step_name", "kind", "event", "hash", "prev_hash", "message_id", "topic",
    "genesis", "prefix", "operation_key", "command_id", "action", "reason",
    "version",  # text in workflow_definitions, integer in schema_migrations: left untyped
}  # fmt: skip
_INT = {
    "revision", "expected_revision", "attempt", "seq", "ref_seq", "limit", "after_seq",
    "amount", "count", "max_amount", "max_count", "acked_seq", "stream",
}  # fmt: skip
_FLOAT = {
    "at", "now", "created_at", "updated_at", "lease_expires_at", "next_attempt_at",
    "started_at", "finished_at", "before", "issued_at",
}  # fmt: skip
_JSON = {
    "fingerprints", "state", "cursor", "error", "input", "output", "detail", "payload", "content",
}  # fmt: skip


def _dummy(name: str) -> Any:
    """A plausible value for a query parameter, typed as the store sends it."""
    if name == "status":
        return "RUNNING"
    if name in _TEXT:
        return "1"
    if name in _INT:
        return 1
    if name in _FLOAT:
        return 1.0
    if name in _JSON:
        return Jsonb({"k": 1})
    if name == "run_ids":
        return ["r1", "r2"]
    raise AssertionError(f"no dummy value for query parameter '{name}': add it to this test")


def compile_in(conn: psycopg.Connection[Any], sql: str) -> None:
    """Plan ``sql`` with dummy parameters (EXPLAIN: nothing runs; DDL runs) in a
    transaction that is rolled back. One statement only, as the store sends it."""
    params = {name: _dummy(name) for name in _PARAM.findall(sql)}
    ddl = sql.lstrip().upper().startswith(("CREATE", "ALTER", "DROP"))
    with conn.transaction(force_rollback=True):
        conn.execute(sql if ddl else "EXPLAIN " + sql, params)


def test_queries__both_dialects_define_the_same_named_queries() -> None:
    sqlite = load_queries("sqlite")
    postgresql = load_queries("postgresql", package="cloud.store")
    assert "claim_due" in postgresql and len(postgresql) > 20
    assert set(sqlite) == set(postgresql)


def test_queries__every_postgresql_query_plans_against_the_migrated_schema(pg_url: str) -> None:
    queries = load_queries("postgresql", package="cloud.store")
    with psycopg.connect(pg_url) as conn:
        for name, sql in queries.items():
            try:
                compile_in(conn, sql)
            except psycopg.Error as exc:
                pytest.fail(f"query {name} does not plan: {type(exc).__name__}: {exc}")


def test_queries__the_plan_check_catches_an_unknown_column(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.UndefinedColumn):
        compile_in(conn, "SELECT no_such_column FROM workflow_runs WHERE run_id = %(run_id)s")


def test_queries__the_plan_check_rejects_two_statements(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.SyntaxError):
        compile_in(conn, "SELECT 1; SELECT %(run_id)s")


def test_queries__the_plan_check_runs_nothing(pg_url: str) -> None:
    queries = load_queries("postgresql", package="cloud.store")
    with psycopg.connect(pg_url) as conn:
        compile_in(conn, queries["insert_outbox"])
        compile_in(conn, queries["set_audit_head"])
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        assert conn.execute("SELECT seq FROM audit_head").fetchone() == (0,)


def test_queries__every_postgresql_query_has_a_one_line_description() -> None:
    path = "sql/postgresql/queries.sql"
    lines = resources.files("cloud.store").joinpath(path).read_text().splitlines()
    headers = [i for i, ln in enumerate(lines) if ln.startswith("-- name:")]
    assert len(headers) == len(load_queries("postgresql", package="cloud.store"))
    for i in headers:
        assert lines[i + 1].startswith("-- ") and len(lines[i + 1]) > 4, lines[i]
        assert not lines[i + 2].startswith("--"), f"{lines[i]}: description is one line"
