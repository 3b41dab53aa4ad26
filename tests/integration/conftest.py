"""PostgreSQL for the integration tests: a migrated template per session, a clone per test.

``TILLFLOW_TEST_DATABASE_URL`` (default: the local server's ``test`` database) names the
server. Under ``CI=true`` these tests must run, so an unreachable server fails them;
elsewhere they are skipped with a reason saying how to point them at a server.

The template's name differs from the conformance suite's, so both can exist in one
session; every database made here is dropped (``WITH (FORCE)``) when its test ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from hwsim.syncrig import Cloud
from psycopg import conninfo

from cloud.store.postgres import PostgresStore

# Read once at import, before the suite-wide fixture scrubs TILLFLOW_* for each test.
PG_URL = os.environ.get("TILLFLOW_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

NewDatabase = Callable[[], str]


def with_dbname(url: str, dbname: str) -> str:
    """``url`` naming database ``dbname``; a URL stays a URL, as the CLI needs one
    (it takes anything without ``://`` for a SQLite file)."""
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres"):
        return urlunsplit(parts._replace(path="/" + dbname))
    return conninfo.make_conninfo(url, dbname=dbname)


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)


def _drop(name: str) -> None:
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin URL of a reachable server (or a skip, or under CI a failure)."""
    try:
        _admin().close()
    except psycopg.OperationalError as exc:
        reason = (
            f"PostgreSQL not reachable at {PG_URL} ({exc}); set TILLFLOW_TEST_DATABASE_URL="
            "postgresql://USER@HOST:PORT/DB to run the integration tests"
        )
        if os.environ.get("CI") == "true":
            pytest.fail("under CI=true the PostgreSQL integration tests must run: " + reason)
        pytest.skip(reason)
    return PG_URL


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> Iterator[str]:
    """A database migrated once per session, cloned by ``pg_url``."""
    name = f"tillflow_itpl_{os.getpid()}"
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        PostgresStore(with_dbname(pg_server, name)).close()
        yield name
    finally:
        _drop(name)


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"tillflow_it_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    try:
        yield with_dbname(PG_URL, name)
    finally:
        _drop(name)


@pytest.fixture
def new_database(pg_server: str) -> Iterator[NewDatabase]:
    """Makes empty (never migrated) databases; all are dropped when the test ends."""
    made: list[str] = []

    def make() -> str:
        name = f"tillflow_it_{uuid.uuid4().hex[:12]}"
        with _admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return with_dbname(pg_server, name)

    try:
        yield make
    finally:
        for name in made:
            _drop(name)


@pytest.fixture
def cloud(new_database: NewDatabase, tmp_path: Path) -> Iterator[Cloud]:
    """``tillflow cloud serve`` on an empty database of this test's own (migrated by the
    server's start), stopped when the test ends."""
    c = Cloud(new_database(), tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()
