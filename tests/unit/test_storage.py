"""The SQLite store's size controls: incremental vacuum, the page budget, the WAL limit,
and a checkpoint that a long reader can delay but not defeat unnoticed."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest

from edge.engine import Engine, FakeClock, InlineExecutor, Status
from edge.engine.loader import load_text
from edge.errors import StorageFull
from edge.store.sqlite import SqliteStore

BULKY = """
workflow_type: bulky
version: 1
steps:
  - {name: one, type: STANDARD, function: "tf_steps:noop"}
"""

PAD = "x" * 3000  # a run's input and state: ~6 KB a run with its step and audit rows


def _engine(store: SqliteStore, clock: FakeClock) -> Engine:
    eng = Engine(store, InlineExecutor(), clock=clock)
    eng.register(load_text(BULKY))
    return eng


def _fill(eng: Engine, n: int) -> list[str]:
    return [eng.start("bulky", {"pad": PAD, "i": i}) for i in range(n)]


def _pragma(path: Path, name: str) -> int:
    conn = apsw.Connection(str(path))
    try:
        return int(conn.execute(f"PRAGMA {name}").fetchall()[0][0])
    finally:
        conn.close()


def test_a_new_database_uses_incremental_auto_vacuum(tmp_path):
    SqliteStore(tmp_path / "t.db").close()
    assert _pragma(tmp_path / "t.db", "auto_vacuum") == 2


def test_an_older_database_is_converted_once_and_keeps_its_rows(tmp_path):
    db = tmp_path / "old.db"
    conn = apsw.Connection(str(db))
    conn.execute("CREATE TABLE keep (x INTEGER); INSERT INTO keep VALUES (7)")
    conn.close()
    assert _pragma(db, "auto_vacuum") == 0
    SqliteStore(db).close()
    assert _pragma(db, "auto_vacuum") == 2
    conn = apsw.Connection(str(db))
    assert conn.execute("SELECT x FROM keep").fetchall() == [(7,)]
    conn.close()


def test_compaction_then_reclaim_gives_the_pages_back_to_the_file_system(tmp_path):
    clock = FakeClock()
    store = SqliteStore(tmp_path / "t.db")
    eng = _engine(store, clock)
    _fill(eng, 200)
    store.checkpoint()
    grown = store.storage()
    clock.advance(3600)
    assert store.compact(before=clock.now()).runs == 200
    assert store.storage().free_pages > 0
    shrunk_by = store.reclaim()
    store.checkpoint()
    after = store.storage()
    assert shrunk_by > 0 and after.free_pages == 0
    assert after.file_bytes < grown.file_bytes / 2
    assert Path(store.path).stat().st_size == after.file_bytes
    assert store.integrity_check() == "ok"
    store.close()


def test_past_the_page_budget_a_commit_fails_whole_and_nothing_is_corrupt(tmp_path):
    clock = FakeClock()
    store = SqliteStore(tmp_path / "t.db", max_bytes=400 * 1024)
    eng = _engine(store, clock)
    done: list[str] = []
    with pytest.raises(StorageFull) as info:
        for i in range(1000):
            done.append(eng.start("bulky", {"pad": PAD, "i": i}, idempotency_key=f"k{i}"))
    assert info.value.code == "storage_full" and len(done) > 10
    assert store.storage().file_bytes <= 400 * 1024
    assert store.integrity_check() == "ok"
    assert all(eng.get(r).status is Status.COMPLETED for r in done)
    assert eng.verify_audit().ok
    # Retention makes room: the refused work goes through afterwards.
    clock.advance(3600)
    store.compact(before=clock.now())
    again = eng.start("bulky", {"pad": PAD, "i": -1}, idempotency_key="after")
    assert eng.get(again).status is Status.COMPLETED
    store.close()


def test_a_checkpoint_cuts_the_wal_back_to_its_limit(tmp_path):
    store = SqliteStore(tmp_path / "t.db", wal_limit_bytes=64 * 1024)
    _fill(_engine(store, FakeClock()), 100)
    assert store.storage().wal_bytes > 64 * 1024
    result = store.checkpoint("TRUNCATE")
    assert not result.busy
    assert store.storage().wal_bytes == 0
    store.close()


def test_a_long_reader_blocks_the_reset_visibly_and_the_next_checkpoint_catches_up(tmp_path):
    store = SqliteStore(tmp_path / "t.db", wal_limit_bytes=64 * 1024)
    eng = _engine(store, FakeClock())
    _fill(eng, 5)
    reader = apsw.Connection(store.path)  # e.g. an export holding one snapshot for minutes
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM workflow_runs").fetchall() == [(5,)]
    _fill(eng, 100)
    blocked = store.checkpoint("TRUNCATE")
    assert blocked.busy and blocked.checkpointed < blocked.wal_frames
    assert store.storage().wal_bytes > store.wal_limit_bytes  # what health reports
    reader.execute("COMMIT")
    reader.close()
    caught_up = store.checkpoint("TRUNCATE")
    assert not caught_up.busy
    assert store.storage().wal_bytes <= store.wal_limit_bytes
    assert store.integrity_check() == "ok"
    store.close()
