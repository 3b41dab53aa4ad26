"""``edge.store.template``: new SQLite databases copied from one migrated template.

A copy must be the database migrating would have made -- same schema, settings and
version, intact -- except for what each database must own: its stream id (DESIGN.md
invariant 9: a new database is a new stream)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from edge.store import template
from edge.store.sqlite import SqliteStore


@pytest.fixture
def sharing() -> Iterator[template.DatabaseTemplate]:
    made = template.share_new_databases()
    try:
        yield made
    finally:
        template.stop_sharing()


def _facts(path: Path) -> dict[str, Any]:
    db = apsw.Connection(str(path))
    try:
        one = lambda sql: db.execute(sql).fetchall()  # noqa: E731
        return {
            "schema": sorted(one("SELECT type, name, tbl_name, sql FROM sqlite_master")),
            "migrations": one("SELECT version, name FROM schema_migrations ORDER BY version"),
            "auto_vacuum": one("PRAGMA auto_vacuum"),
            "journal_mode": one("PRAGMA journal_mode"),
            "page_size": one("PRAGMA page_size"),
            "integrity": one("PRAGMA integrity_check"),
            "meta_keys": one("SELECT key FROM database_meta ORDER BY key"),
        }
    finally:
        db.close()


def _open(path: Path) -> str:
    store = SqliteStore(path, synchronous="NORMAL")
    try:
        return store.database_id()
    finally:
        store.close()


def test_copy__is_the_database_migrating_makes_but_its_stream(tmp_path, sharing):
    template.stop_sharing()
    migrated_id = _open(tmp_path / "migrated.db")
    template.share_new_databases()
    copied_id = _open(tmp_path / "copied.db")
    assert (tmp_path / "copied.db").exists()
    assert _facts(tmp_path / "copied.db") == _facts(tmp_path / "migrated.db")
    assert _facts(tmp_path / "copied.db")["integrity"] == [("ok",)]
    assert re.fullmatch(r"[0-9a-f]{32}", copied_id) and copied_id != migrated_id


def test_copy__each_copy_draws_its_own_stream(tmp_path, sharing):
    ids = {_open(tmp_path / f"t{i}.db") for i in range(20)}
    assert len(ids) == 20
    from edge.store.sqlite import _migrated

    image, at = sharing.image(_migrated)
    placeholder = image[at : at + 32].decode()
    assert placeholder not in ids


def test_copy__takes_writes_and_reopens_as_itself(tmp_path, sharing):
    path = tmp_path / "t.db"
    store = SqliteStore(path, synchronous="FULL")
    try:
        stream = store.database_id()
        store.save_definition("h1", "payment", "1", "{}", 1.0)
    finally:
        store.close()
    again = SqliteStore(path)
    try:
        assert again.database_id() == stream
        assert again.latest_definition("payment") is not None
    finally:
        again.close()


def test_copy__an_existing_database_is_never_replaced(tmp_path, sharing):
    path = tmp_path / "t.db"
    first = _open(path)
    from edge.store.sqlite import _migrated

    assert sharing.make(path, _migrated) is False
    assert _open(path) == first
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".new")] == []


def test_copy__not_without_sharing_nor_with_template_false(tmp_path, sharing):
    made: list[Path] = []
    real = sharing.make

    def spy(path: Any, *args: Any, **kw: Any) -> bool:
        made.append(Path(path))
        return real(path, *args, **kw)

    sharing.make = spy  # type: ignore[method-assign]
    SqliteStore(tmp_path / "off.db", template=False).close()
    template.stop_sharing()
    SqliteStore(tmp_path / "unshared.db").close()
    assert made == []
    assert template.shared() is None


def test_copy__into_a_missing_directory_fails_as_opening_would(tmp_path, sharing):
    from edge.errors import StoreError

    with pytest.raises(StoreError) as caught:
        SqliteStore(tmp_path / "no" / "such" / "t.db")
    assert caught.value.operation == "open"
