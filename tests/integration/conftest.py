"""PostgreSQL for the integration tests: a migrated template per session, a clone per test.

``TILLFLOW_TEST_DATABASE_URL`` (default: the local server's ``test`` database) names the
server; when it does not answer, ``services`` (tests/support/services.py) starts an
embedded one for the session. Only if that fails too are these tests skipped (under
``CI=true``: failed). ``redis_url`` is the suite's Redis, found or started the same way.

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
import services
from hwsim.cloudrig import CloudRig, FleetApi
from hwsim.syncrig import Cloud
from psycopg import conninfo

from cloud.store.postgres import PostgresStore

NewDatabase = Callable[[], str]


def with_dbname(url: str, dbname: str) -> str:
    """``url`` naming database ``dbname``; a URL stays a URL, as the CLI needs one
    (it takes anything without ``://`` for a SQLite file)."""
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres"):
        return urlunsplit(parts._replace(path="/" + dbname))
    return conninfo.make_conninfo(url, dbname=dbname)


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(services.postgres_admin_url(), autocommit=True, connect_timeout=3)


def _drop(name: str) -> None:
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin URL of the suite's server: the configured one when it answers, else an
    embedded one started for the session (or a skip, or under CI a failure)."""
    try:
        return services.postgres_admin_url()
    except Exception as exc:  # the embedded server could not start either
        reason = (
            f"PostgreSQL not reachable at {services.CONFIGURED_PG} and no embedded one "
            f"({type(exc).__name__}: {exc}); set TILLFLOW_TEST_DATABASE_URL="
            "postgresql://USER@HOST:PORT/DB to run the integration tests"
        )
        if os.environ.get("CI") == "true":
            pytest.fail("under CI=true the PostgreSQL integration tests must run: " + reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The suite's Redis (``redis://HOST:PORT/N``): ``TILLFLOW_TEST_REDIS_URL`` or the
    local server when it answers, else a ``redis-server`` started for the session."""
    try:
        return services.redis_url()
    except Exception as exc:
        reason = f"no Redis for the tests: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail("under CI=true the Redis tests must run: " + reason)
        pytest.skip(reason)


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[str]:
    """A Redis database number of this test's own (``SET NX`` on db 0, as the Celery
    tests take theirs), empty at start, flushed at the end: a broker no other test's
    leftovers reach."""
    import redis

    parts = urlsplit(redis_url)
    admin = redis.Redis.from_url(urlunsplit(parts._replace(path="/0")))
    for n in range(1, 16):
        if admin.set(f"tillflow-test-db:{n}", os.getpid(), nx=True, ex=3600):
            url = urlunsplit(parts._replace(path=f"/{n}"))
            redis.Redis.from_url(url).flushdb()
            try:
                yield url
            finally:
                redis.Redis.from_url(url).flushdb()
                admin.delete(f"tillflow-test-db:{n}")
            return
    pytest.fail("no free Redis database number (1-15) for this test")


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
def pg_url(pg_server: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"tillflow_it_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    try:
        yield with_dbname(pg_server, name)
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


@pytest.fixture
def rig(new_database: NewDatabase, redis_db: str, tmp_path: Path) -> Iterator[CloudRig]:
    """One ``tillflow cloud serve`` and one worker (``hwsim.cloudrig``) on this test's
    own database and Redis number, stopped when the test ends (files that need another
    shape of cloud define their own ``rig``)."""
    cloud = CloudRig(new_database(), redis_db, tmp_path / "cloud")
    try:
        cloud.start(serves=1, workers=1)
        yield cloud
    finally:
        cloud.stop()


@pytest.fixture
def api(rig: CloudRig) -> Iterator[FleetApi]:
    """An admin Fleet API client on ``rig``."""
    with rig.fleet() as client:
        yield client
