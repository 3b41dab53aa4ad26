"""One conformance suite over every store: each test gets a fresh database.

Memory: a ``MemoryDatabase`` (a "restart" opens a new store on it). SQLite: a file in
``tmp_path``. PostgreSQL: a database cloned from a template that is
migrated once per session (``TILLFLOW_TEST_DATABASE_URL``, default the local server's
``test`` database, names the server; when none answers, ``services`` starts an embedded
one for the session). Under ``CI=true`` the PostgreSQL leg must run; elsewhere it is
skipped, with a reason, when no server can be had.

A test that needs what one store has and another has not carries a named marker, so
the gaps can be counted (``pytest --co -q -m sqlite_only``): ``sqlite_only`` reads the
SQLite file itself; ``sql_only`` reaches the database past the store with SQL (the
append-only triggers), which the in-memory store has no way in for.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import apsw
import psycopg
import pytest
import services
from psycopg import conninfo

from cloud.store.postgres import PostgresStore
from edge.engine import Engine, FakeClock, InlineExecutor, Store, Workflow
from edge.engine.loader import load_text
from edge.store.memory import MemoryDatabase, MemoryStore
from edge.store.sqlite import SqliteStore

StoreFactory = Callable[[], Store]

BACKENDS = ["memory", "sqlite", "postgresql"]


def _with_dbname(url: str, dbname: str) -> str:
    return conninfo.make_conninfo(url, dbname=dbname)


def pg_admin_url() -> str:
    """The admin URL of the suite's server (configured, else embedded: ``services``)."""
    return services.postgres_admin_url()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database, made once per session."""
    try:
        admin = psycopg.connect(pg_admin_url(), autocommit=True, connect_timeout=3)
    except Exception as exc:  # neither the configured server nor an embedded one
        reason = (
            f"PostgreSQL not reachable at {services.CONFIGURED_PG} and no embedded one "
            f"({type(exc).__name__}: {exc}); set TILLFLOW_TEST_DATABASE_URL="
            "postgresql://USER@HOST:PORT/DB to run the PostgreSQL leg"
        )
        if os.environ.get("CI") == "true":
            pytest.fail("under CI=true the PostgreSQL leg must run: " + reason)
        pytest.skip(reason)
    name = f"tillflow_tpl_{os.getpid()}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.execute(f'CREATE DATABASE "{name}"')
    PostgresStore(_with_dbname(pg_admin_url(), name)).close()
    try:
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


#: Databases kept cloned ahead of the tests that will take them.
AHEAD = 4


class _FreshDatabases:
    """Databases cloned from the template one ahead of need, and dropped behind, by one
    pair of background threads: the clone (a quarter of a second alone: CREATE DATABASE
    writes the files and checkpoints; two at once share the checkpoint) overlaps the
    tests before instead of adding to each. FILE_COPY is the faster strategy for a small
    template."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pg-fresh-db")
        self.ahead: collections.deque[Future[str]] = collections.deque(
            self.pool.submit(self._create) for _ in range(AHEAD)
        )

    def _admin(self, sql: str) -> None:
        with psycopg.connect(pg_admin_url(), autocommit=True) as admin:
            admin.execute(sql)

    def _create(self) -> str:
        name = f"tillflow_t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}" STRATEGY FILE_COPY')
        return name

    def take(self) -> str:
        name = self.ahead.popleft().result()
        self.ahead.append(self.pool.submit(self._create))
        return name

    def drop(self, name: str) -> None:
        self.pool.submit(self._admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        for future in self.ahead:
            with contextlib.suppress(Exception):
                self.drop(future.result())
        self.pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def pg_databases(pg_template: str) -> Iterator[_FreshDatabases]:
    fresh = _FreshDatabases(pg_template)
    try:
        yield fresh
    finally:
        fresh.close()  # before pg_template drops the template


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, cloned from the template."""
    fresh: _FreshDatabases = request.getfixturevalue("pg_databases")
    name = fresh.take()
    try:
        yield _with_dbname(pg_admin_url(), name)
    finally:
        fresh.drop(name)


class Backend:
    """What a test needs to know about the database under the store: direct access, as
    someone with the database (not the store) in hand would have."""

    def __init__(self, name: str, target: Any, streams: int = 1) -> None:
        self.name = name
        self.target = target  # file path (sqlite), URL (postgresql), MemoryDatabase
        self.streams = streams  # audit chains (SQLite has one)

    def open(self) -> Store:
        if self.name == "memory":
            return MemoryStore(self.target, audit_streams=self.streams)
        if self.name == "sqlite":
            return SqliteStore(self.target)
        # One chain, so the tests that name rows by their seq mean one row; the streams
        # of the cloud's default are tested in test_audit_streams.py.
        return PostgresStore(self.target, pool_size=2, audit_streams=self.streams)

    def execute(self, sql: str) -> None:
        """Run SQL as someone with direct access to the database would."""
        if self.name == "sqlite":
            db = apsw.Connection(self.target)
            try:
                db.execute(sql)
            finally:
                db.close()
        elif self.name == "postgresql":
            with psycopg.connect(self.target, autocommit=True) as conn:
                conn.execute(sql.encode())
        else:
            raise AssertionError("the in-memory store has no SQL: mark the test sql_only")

    def tamper(self, sql: str) -> None:
        """Edit the audit log past its append-only triggers, as an attacker would."""
        if self.name == "sqlite":
            self.execute(
                "DROP TRIGGER IF EXISTS workflow_audit_log_no_update;"
                "DROP TRIGGER IF EXISTS workflow_audit_log_no_delete;" + sql
            )
        else:
            self.execute("ALTER TABLE workflow_audit_log DISABLE TRIGGER USER;" + sql)

    # --- the attacker's edits, on every store ----------------------------------------

    def delete_audit(self, *seqs: int, stream: int = 0) -> None:
        """Remove audit rows behind the store's back."""
        if self.name == "memory":
            for seq in seqs:
                del self.target.audit[(stream, seq)]
            return
        listed = ", ".join(str(int(s)) for s in seqs)
        self.tamper(f"DELETE FROM workflow_audit_log WHERE stream = {stream} AND seq IN ({listed})")

    def edit_audit(self, seq: int, *, detail: dict[str, Any], stream: int = 0) -> None:
        """Change one audit row's detail behind the store's back."""
        if self.name == "memory":
            row = self.target.audit[(stream, seq)]
            self.target.audit[(stream, seq)] = {**row, "detail": json.dumps(detail)}
            return
        text = json.dumps(detail).replace("'", "''")
        where = f"WHERE stream = {stream} AND seq = {int(seq)}"
        self.tamper(f"UPDATE workflow_audit_log SET detail = '{text}' {where}")

    def delete_audit_of_run(self, run_id: str) -> None:
        """Remove every audit row of one run (as if the run had never been)."""
        if self.name == "memory":
            for key in [k for k, r in self.target.audit.items() if r["run_id"] == run_id]:
                del self.target.audit[key]
            return
        self.tamper(f"DELETE FROM workflow_audit_log WHERE run_id = '{run_id}'")

    def swap_audit(self, a: int, b: int, *, stream: int = 0) -> None:
        """Exchange the places of two audit rows of a stream (reorder them)."""
        if self.name == "memory":
            ra, rb = self.target.audit[(stream, a)], self.target.audit[(stream, b)]
            self.target.audit[(stream, a)] = {**rb, "seq": a}
            self.target.audit[(stream, b)] = {**ra, "seq": b}
            return
        where = f"WHERE stream = {stream} AND seq ="
        self.tamper(
            f"UPDATE workflow_audit_log SET seq = -1 {where} {int(a)};"
            f"UPDATE workflow_audit_log SET seq = {int(a)} {where} {int(b)};"
            f"UPDATE workflow_audit_log SET seq = {int(b)} {where} -1"
        )

    def set_audit_head(self, seq: int, *, stream: int = 0) -> None:
        """Move a chain's head behind the store's back."""
        if self.name == "memory":
            self.target.heads[stream] = {**self.target.heads[stream], "seq": seq}
            return
        column = "id" if self.name == "sqlite" else "stream"  # SQLite's one head is id 1
        key = 1 if self.name == "sqlite" else stream
        self.execute(f"UPDATE audit_head SET seq = {int(seq)} WHERE {column} = {key}")

    @property
    def refusal(self) -> type[Exception]:
        """What the driver raises when the append-only triggers refuse a write."""
        return apsw.ConstraintError if self.name == "sqlite" else psycopg.errors.RaiseException


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    marks = {m.name for m in request.node.iter_markers()}
    if "sqlite_only" in marks and request.param != "sqlite":
        pytest.skip("sqlite_only: reads the SQLite file itself")
    if "sql_only" in marks and request.param == "memory":
        pytest.skip("sql_only: reaches the database with SQL; the in-memory store has none")
    if request.param == "memory":
        return Backend("memory", MemoryDatabase())
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "conformance.db"))
    return Backend("postgresql", request.getfixturevalue("pg_url"))


@pytest.fixture
def store_factory(backend: Backend) -> Iterator[StoreFactory]:
    """Opens a (new) connection to this test's database; call again to 'restart'."""
    opened: list[Any] = []

    def open_store() -> Store:
        s = backend.open()
        opened.append(s)
        return s

    yield open_store
    for s in opened:
        s.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    return store_factory()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(store: Store, clock: FakeClock) -> Iterator[Engine]:
    eng = Engine(store, InlineExecutor(), clock=clock)
    yield eng
    eng.close()


@pytest.fixture
def register(engine: Engine) -> Callable[[str], Workflow]:
    def _register(yaml_text: str) -> Workflow:
        return engine.register(load_text(yaml_text, source="test.yaml"))

    return _register
