"""The SQLite schema: numbered migrations converge with ``schema.sql``, the version lives
in the database, and every named query compiles against what the migrations build."""

from __future__ import annotations

import json
import re
import sys
from importlib import resources
from pathlib import Path

import apsw
import pytest

from edge.engine import Engine, FakeClock, InlineExecutor
from edge.engine.audit import GENESIS, link
from edge.engine.loader import load_text
from edge.engine.records import AuditEvent
from edge.errors import MigrationError, StoreError
from edge.store.queries import load_migrations, load_queries, load_schema, parse_queries
from edge.store.sqlite import SqliteStore

SCHEMA_OBJECTS = """
SELECT type, name, tbl_name, sql FROM sqlite_master
WHERE name NOT LIKE 'sqlite_%' AND name != 'schema_migrations'
ORDER BY type, name
"""

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")


def schema_of(conn: apsw.Connection) -> list[tuple[str, str, str, str]]:
    # ALTER TABLE ADD COLUMN appends ", col" to the stored text after the last column's
    # own whitespace and before the closing one: "x INTEGER , y TEXT)". Spaces before a
    # comma or a parenthesis mean nothing.
    return [
        (kind, name, table, " ".join((sql or "").split()).replace(" ,", ",").replace(" )", ")"))
        for kind, name, table, sql in conn.execute(SCHEMA_OBJECTS)
    ]


@pytest.fixture
def migrated(tmp_path: Path):
    store = SqliteStore(tmp_path / "migrated.db")
    yield store
    store.close()


@pytest.fixture
def migrated_conn(migrated: SqliteStore):
    """A second connection onto the migrated database, for inspecting it directly."""
    conn = apsw.Connection(migrated.path)
    yield conn
    conn.close()


@pytest.fixture
def canonical_conn(tmp_path: Path):
    conn = apsw.Connection(str(tmp_path / "canonical.db"))
    conn.execute(load_schema("sqlite"))
    yield conn
    conn.close()


def compile_in(conn: apsw.Connection, sql: str) -> list[str]:
    """Prepare ``sql`` in EXPLAIN mode (nothing runs) inside a transaction that is rolled
    back; return the text of every statement it held."""
    statements: list[str] = []

    def trace(_cursor: apsw.Cursor, statement: str, _bindings: object) -> bool:
        statements.append(statement)
        return True

    bindings = {name: None for name in _PARAM.findall(sql)}
    conn.execute("BEGIN")
    try:
        cursor = conn.cursor()
        cursor.exec_trace = trace
        cursor.execute(sql, bindings, explain=1).fetchall()
    finally:
        conn.execute("ROLLBACK")
    return statements


# --- migrations and schema.sql -----------------------------------------------------------


def test_migrations__applied_in_order_give_the_same_schema_as_schema_sql(
    migrated_conn, canonical_conn
):
    from_migrations = schema_of(migrated_conn)
    assert {name for kind, name, _, _ in from_migrations if kind == "table"} >= {
        "workflow_definitions",
        "workflow_runs",
        "workflow_steps",
        "workflow_audit_log",
        "audit_head",
        "outbox",
    }
    assert from_migrations == schema_of(canonical_conn)


def test_migrations__schema_comparison_sees_a_missing_index(migrated_conn, canonical_conn):
    canonical_conn.execute("DROP INDEX workflow_runs_by_parent")
    assert schema_of(migrated_conn) != schema_of(canonical_conn)


def test_migrations__are_numbered_1_to_n_with_names():
    migrations = load_migrations("sqlite")
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial"
    assert all(m.sql.strip() for m in migrations)


def test_migrations__every_file_in_the_folder_is_a_numbered_migration():
    folder = resources.files("edge.store").joinpath("sql/sqlite/migrations")
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".sql"))
    expected = [f"{m.version:04d}_{m.name}.sql" for m in load_migrations("sqlite")]
    assert names == expected


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A throwaway package with its own ``sql/sqlite/migrations`` folder."""
    name = "tillflow_fake_migrations"
    folder = tmp_path / name / "sql" / "sqlite" / "migrations"
    folder.mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, folder
    sys.modules.pop(name, None)


def test_load_migrations__rejects_a_gap_in_the_numbering(fake_package):
    package, folder = fake_package
    (folder / "0001_first.sql").write_text("CREATE TABLE a (x);", encoding="utf-8")
    (folder / "0003_third.sql").write_text("CREATE TABLE c (x);", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not numbered 1\.\.n: \[1, 3\]"):
        load_migrations("sqlite", package=package)


def test_load_migrations__orders_by_number_not_by_listing(fake_package):
    package, folder = fake_package
    for version, name in [(2, "second"), (10, "tenth"), (1, "first")]:
        (folder / f"{version:04d}_{name}.sql").write_text("SELECT 1;", encoding="utf-8")
    for version in range(3, 10):
        (folder / f"{version:04d}_filler.sql").write_text("SELECT 1;", encoding="utf-8")
    assert [m.version for m in load_migrations("sqlite", package=package)] == list(range(1, 11))


# --- the version in the database -----------------------------------------------------------


def test_migrate__a_fresh_database_ends_at_the_latest_version(migrated, migrated_conn):
    latest = len(load_migrations("sqlite"))
    assert migrated.schema_version() == latest == 6
    rows = migrated_conn.execute("SELECT version, name FROM schema_migrations").fetchall()
    assert rows == [
        (1, "initial"),
        (2, "counters"),
        (3, "retention"),
        (4, "operation_key"),
        (5, "audit_streams"),
        (6, "sync"),
    ]


def test_migrate__reopening_a_migrated_database_is_a_no_op(migrated, migrated_conn):
    before = schema_of(migrated_conn)
    migrated.close()
    again = SqliteStore(migrated.path)
    try:
        assert again.schema_version() == 6
        assert again.migrate() == 6
    finally:
        again.close()
    assert migrated_conn.execute("SELECT count(*) FROM schema_migrations").fetchall() == [(6,)]
    assert schema_of(migrated_conn) == before


def test_migrate__an_unmigrated_database_reports_version_0_and_creates_nothing(tmp_path):
    store = SqliteStore(tmp_path / "bare.db", migrate=False)
    try:
        assert store.schema_version() == 0
    finally:
        store.close()
    conn = apsw.Connection(str(tmp_path / "bare.db"))
    try:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchall() == [(0,)]
    finally:
        conn.close()


def test_migrate__a_database_newer_than_this_build_raises_migration_error(migrated, migrated_conn):
    migrated.close()
    migrated_conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'future', 0.0)"
    )
    with pytest.raises(MigrationError) as info:
        SqliteStore(migrated.path)
    err = info.value
    assert isinstance(err, StoreError)
    assert err.code == "migration_failed"
    assert err.operation == "migrate"
    assert err.path == migrated.path
    known = len(load_migrations("sqlite"))
    assert f"version 99 is newer than this build knows ({known})" in err.message
    assert err.hint and "upgrade tillflow" in err.hint
    max_version = migrated_conn.execute("SELECT max(version) FROM schema_migrations").fetchall()
    assert max_version == [(99,)]  # refused, not rewritten


# --- named queries -------------------------------------------------------------------------


def test_queries__every_named_query_is_a_single_statement_that_compiles(migrated_conn):
    queries = load_queries("sqlite")
    assert "insert_run" in queries and "update_run" in queries
    for name, sql in queries.items():
        try:
            statements = compile_in(migrated_conn, sql)
        except apsw.Error as exc:
            pytest.fail(f"query {name} does not compile: {type(exc).__name__}: {exc}")
        assert len(statements) == 1, f"query {name} holds {len(statements)} statements"


def test_queries__the_compile_check_catches_an_unknown_column(migrated_conn):
    with pytest.raises(apsw.SQLError, match="no such column"):
        compile_in(migrated_conn, "SELECT no_such_column FROM workflow_runs WHERE run_id = :id")


def test_queries__the_compile_check_counts_every_statement(migrated_conn):
    assert len(compile_in(migrated_conn, "SELECT 1; SELECT :x")) == 2


def test_queries__the_compile_check_runs_nothing(migrated_conn):
    compile_in(migrated_conn, "INSERT INTO audit_head (id, seq, hash) VALUES (1, :seq, :hash)")
    assert migrated_conn.execute("SELECT count(*) FROM audit_head").fetchall() == [(0,)]


def test_queries__every_query_has_a_one_line_description():
    text = resources.files("edge.store").joinpath("sql/sqlite/queries.sql").read_text()
    lines = text.splitlines()
    headers = [i for i, ln in enumerate(lines) if ln.startswith("-- name:")]
    assert len(headers) == len(load_queries("sqlite"))
    for i in headers:
        description = lines[i + 1]
        assert description.startswith("-- ") and len(description) > 4, lines[i]
        assert not lines[i + 2].startswith("--"), f"{lines[i]}: description is one line"


def test_parse_queries__strips_headers_and_descriptions_and_keeps_the_body_whole():
    text = (
        "-- name: first\n-- The first.\nSELECT 1;\n\n"
        "-- name: second\n-- The second, two lines of SQL.\nSELECT 2\nFROM t;\n"
    )
    assert parse_queries(text) == {"first": "SELECT 1;", "second": "SELECT 2\nFROM t;"}


def test_parse_queries__rejects_a_duplicate_name():
    text = "-- name: q\n-- One.\nSELECT 1;\n\n-- name: q\n-- Again.\nSELECT 2;\n"
    with pytest.raises(ValueError, match="query 'q' is defined twice"):
        parse_queries(text)


def test_migrate__two_processes_opening_a_new_database_at_once_migrate_it_once(tmp_path):
    """The daemon and the CLI may open a fresh terminal database at the same moment."""
    import subprocess
    import sys

    db = tmp_path / "race.db"
    script = (
        "import sys; from edge.store.sqlite import SqliteStore; "
        "sys.stdin.readline(); SqliteStore(sys.argv[1]).close(); print('ok')"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for p in procs:  # release all four together
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate(timeout=30) for p in procs]
    assert [(p.returncode, out.strip()) for p, (out, _) in zip(procs, results, strict=True)] == [
        (0, "ok")
    ] * 4, [err for _, err in results]
    conn = apsw.Connection(str(db))
    assert conn.execute("SELECT count(*) FROM schema_migrations").get == len(
        load_migrations("sqlite")
    )
    conn.close()


def test_migrate__step_rows_written_before_operation_keys_read_back_as_none(tmp_path):
    """A database of schema 3 (before 0004) with a step row: after the upgrade the row
    is still there, and its operation key is None (the engine falls back for it)."""
    path = str(tmp_path / "old.db")
    conn = apsw.Connection(path)
    conn.execute(load_queries("sqlite")["create_migrations_table"])
    for mig in load_migrations("sqlite")[:3]:
        conn.execute(mig.sql)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (mig.version, mig.name))
    conn.execute(
        "INSERT INTO workflow_definitions VALUES ('h', 'old', '1', '{}', 0);"
        "INSERT INTO workflow_runs (run_id, workflow_type, definition_hash, fingerprints,"
        " status, state, cursor, revision, created_at, updated_at)"
        " VALUES ('r1', 'old', 'h', '{}', 'COMPLETED', '{}', '{}', 1, 0, 0);"
        "INSERT INTO workflow_steps (run_id, step, step_name, kind, status, attempt,"
        " started_at, finished_at) VALUES ('r1', 'pay', 'pay', 'step', 'COMPLETED', 1, 0, 0)"
    )
    conn.close()
    store = SqliteStore(path)
    try:
        assert store.schema_version() == len(load_migrations("sqlite"))
        (row,) = store.step_history("r1")
        assert (row.step, row.status, row.operation_key) == ("pay", "COMPLETED", None)
    finally:
        store.close()


def test_migrate__audit_rows_from_before_streams_keep_verifying_and_the_chain_goes_on(tmp_path):
    """A schema-4 database whose chain was written with hash version 1: after 0005 its
    rows are version 1 on stream 0, they still verify, and new rows (version 2) continue
    the same chain from its head."""
    path = str(tmp_path / "old.db")
    conn = apsw.Connection(path)
    conn.execute(load_queries("sqlite")["create_migrations_table"])
    for mig in load_migrations("sqlite")[:4]:
        conn.execute(mig.sql)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (mig.version, mig.name))
    prev = GENESIS
    for seq in (1, 2):
        ev = AuditEvent(None, "config_changed", 1_700_000_000.25 + seq, None, {"n": seq})
        digest = link(prev, seq, ev, version=1)
        conn.execute(
            "INSERT INTO workflow_audit_log (seq, run_id, event, step, detail, at, prev_hash,"
            " hash) VALUES (?, NULL, ?, NULL, ?, ?, ?, ?)",
            (seq, ev.event, json.dumps(ev.detail), ev.at, prev, digest),
        )
        prev = digest
    conn.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, 2, ?)", (prev,))
    conn.close()
    store = SqliteStore(path)
    try:
        engine = Engine(store, InlineExecutor(), clock=FakeClock())
        engine.register(load_text(ONE_STEP))
        engine.start("one", {})
        rows = list(store.audit_rows())
        assert [(r.stream, r.version) for r in rows[:2]] == [(0, 1), (0, 1)]
        assert {r.version for r in rows[2:]} == {2} and rows[2].prev_hash == prev
        report = engine.verify_audit()
        assert report.ok and report.rows == len(rows) > 2, report
    finally:
        store.close()


ONE_STEP = """
workflow_type: one
version: 1
steps:
  - {name: noop, type: STANDARD, function: "tf_steps:noop"}
"""
