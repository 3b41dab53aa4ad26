"""Power cuts through ``hwsim.powerloss``: what SQLite synced survives, nothing corrupts.

Each test writes through a ``PowerLossVFS``, cuts the power (at a chosen moment, or at
every write/sync event in turn), closes the dead connection and reopens the file with
the default VFS, i.e. from what "the disk" kept.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest
from hwsim.powerloss import PowerLossVFS, close_after_cut

from edge.errors import StoreError
from edge.store.queries import load_migrations
from edge.store.sqlite import SqliteStore

_names = itertools.count()


@pytest.fixture
def make_vfs() -> Iterator[Callable[..., PowerLossVFS]]:
    made: list[PowerLossVFS] = []

    def make(**kwargs: object) -> PowerLossVFS:
        vfs = PowerLossVFS(f"powerloss-{next(_names)}", **kwargs)  # type: ignore[arg-type]
        made.append(vfs)
        return vfs

    yield make
    for vfs in made:
        vfs.unregister()


def _open(path: Path, vfs: PowerLossVFS, synchronous: str = "FULL") -> apsw.Connection:
    conn = apsw.Connection(str(path), vfs=vfs.vfs_name)
    assert conn.execute("PRAGMA journal_mode=WAL").fetchall() == [("wal",)]
    conn.execute(f"PRAGMA synchronous={synchronous}")
    # Checkpoint often, so cuts also land in checkpoints and WAL restarts.
    conn.execute("PRAGMA wal_autocheckpoint=4")
    return conn


def _after_reboot(path: Path) -> list[int]:
    """Reopen with the default VFS: integrity must be ok; return the rows kept."""
    conn = apsw.Connection(str(path))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tables = conn.execute("SELECT name FROM sqlite_schema WHERE name='t'").fetchall()
        if not tables:
            return []
        return [r[0] for r in conn.execute("SELECT x FROM t ORDER BY x")]
    finally:
        conn.close()


def test_synced_commit_survives_unsynced_one_is_dropped(tmp_path, make_vfs):
    vfs = make_vfs()
    db = tmp_path / "t.db"
    conn = _open(db, vfs)
    conn.execute("CREATE TABLE t(x INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    assert vfs.pending(str(db) + "-wal") == 0  # FULL: the commit synced the WAL
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("INSERT INTO t VALUES (2)")  # committed, never synced
    assert vfs.pending(str(db) + "-wal") > 0
    dropped = vfs.cut_power()
    assert str(db) + "-wal" in dropped
    with pytest.raises(apsw.IOError):
        conn.execute("INSERT INTO t VALUES (3)")
    close_after_cut(conn)
    assert _after_reboot(db) == [1]
    assert vfs.writes[str(db) + "-wal"] > 0
    assert vfs.syncs[str(db) + "-wal"] > 0


def test_uncommitted_transaction_is_dropped(tmp_path, make_vfs):
    vfs = make_vfs()
    db = tmp_path / "t.db"
    conn = _open(db, vfs)
    conn.execute("CREATE TABLE t(x INTEGER PRIMARY KEY, pad BLOB)")
    conn.execute("INSERT INTO t VALUES (1, NULL)")
    conn.execute("BEGIN")
    # Bigger than the page cache, so pages spill into the WAL before the commit.
    conn.execute("PRAGMA cache_size=2")
    for x in range(2, 50):
        conn.execute("INSERT INTO t VALUES (?, randomblob(2000))", (x,))
    vfs.cut_power()
    close_after_cut(conn)
    assert _after_reboot(db) == [1]


def _workload(
    db: Path, vfs: PowerLossVFS, commits: int, synchronous: str = "FULL"
) -> tuple[int, bool]:
    """Commit rows 1..commits one per transaction until the power goes; return how many
    commits returned and whether the cut came."""
    conn = None
    done = 0
    try:
        conn = _open(db, vfs, synchronous)
        conn.execute("CREATE TABLE IF NOT EXISTS t(x INTEGER PRIMARY KEY, pad BLOB)")
        for x in range(1, commits + 1):
            conn.execute("INSERT INTO t VALUES (?, randomblob(700))", (x,))
            done = x
    except (apsw.Error, AssertionError):
        if not vfs.cut:
            raise
    finally:
        if conn is not None:
            try:
                conn.close()
            except apsw.IOError:  # closed all the same
                if not vfs.cut:  # the cut may come during the closing checkpoint
                    raise
    return done, vfs.cut


def _cutter(n: int, **cut_kwargs: object) -> tuple[Callable[..., None], list[PowerLossVFS]]:
    """An ``on_event`` hook cutting the power at event ``n``; put the VFS in the list."""
    holder: list[PowerLossVFS] = []

    def cut_at(kind: str, path: str, event: int) -> None:
        if event == n:
            holder[0].cut_power(**cut_kwargs)  # type: ignore[arg-type]

    return cut_at, holder


def _count_events(tmp_path: Path, make_vfs, commits: int, synchronous: str) -> int:
    vfs = make_vfs()
    done, cut = _workload(tmp_path / "count.db", vfs, commits, synchronous)
    assert (done, cut) == (commits, False)
    return vfs.events


@pytest.mark.parametrize("tear", [False, True], ids=["clean", "torn"])
def test_full_every_returned_commit_survives_a_cut_at_any_event(tmp_path, make_vfs, tear):
    commits = 8
    total = _count_events(tmp_path, make_vfs, commits, "FULL")
    assert total > commits
    for n in range(1, total + 1):
        cut_at, holder = _cutter(n, tear=tear, rng=random.Random(n))
        vfs = make_vfs(on_event=cut_at)
        holder.append(vfs)
        db = tmp_path / f"full-{n}.db"
        done, _ = _workload(db, vfs, commits)
        rows = _after_reboot(db)
        # Every commit that returned is there; the one in flight may or may not be.
        assert rows in (list(range(1, done + 1)), list(range(1, done + 2))), (n, done, rows)


def test_off_may_lose_commits_but_never_corrupts(tmp_path, make_vfs):
    commits = 12
    total = _count_events(tmp_path, make_vfs, commits, "OFF")
    for n in range(1, total + 1):
        cut_at, holder = _cutter(n)
        vfs = make_vfs(on_event=cut_at)
        holder.append(vfs)
        db = tmp_path / f"off-{n}.db"
        done, _ = _workload(db, vfs, commits, "OFF")
        rows = _after_reboot(db)
        assert len(rows) <= done + 1
        assert rows == list(range(1, len(rows) + 1))


def test_off_loop_then_cut(tmp_path, make_vfs):
    vfs = make_vfs()
    db = tmp_path / "t.db"
    done, cut = _workload(db, vfs, 20, "OFF")
    assert (done, cut) == (20, False)  # the connection closed cleanly: no cut yet
    # A second batch, still open, then the cut.
    conn = _open(db, vfs, "OFF")
    for x in range(21, 41):
        conn.execute("INSERT INTO t VALUES (?, randomblob(700))", (x,))
    vfs.cut_power()
    close_after_cut(conn)
    rows = _after_reboot(db)
    assert len(rows) <= 40
    assert rows == list(range(1, len(rows) + 1))


@pytest.mark.parametrize("seed", range(5))
def test_torn_write_mid_transaction_is_rejected_by_wal_checksums(tmp_path, make_vfs, seed):
    vfs = make_vfs()
    db = tmp_path / "t.db"
    conn = _open(db, vfs)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t(x INTEGER PRIMARY KEY, pad BLOB)")
    conn.execute("INSERT INTO t VALUES (1, randomblob(3000))")
    conn.execute("PRAGMA synchronous=OFF")
    for x in range(2, 6):  # committed into the WAL, never synced
        conn.execute("INSERT INTO t VALUES (?, randomblob(3000))", (x,))
    dropped = vfs.cut_power(tear=True, rng=random.Random(seed))
    assert dropped
    close_after_cut(conn)
    assert _after_reboot(db) == [1]


def test_sqlite_store_opens_after_a_cut_at_any_event(tmp_path):
    """SqliteStore opens through ours by name (``vfs=``). Cut at every event of open +
    migrate + a few definitions; the store then reopens on
    the real VFS, migrates to the end, and keeps every definition saved before the cut."""
    total = None
    n = 0
    while total is None or n < total:
        n += 1
        state = {"vfs": None}

        def cut_at(kind: str, path: str, event: int, n: int = n, state=state) -> None:
            if event == n:
                state["vfs"].cut_power(tear=True, rng=random.Random(n))

        vfs = PowerLossVFS(f"powerloss-store-{n}", on_event=cut_at)
        state["vfs"] = vfs
        db = tmp_path / f"store-{n}.db"
        saved: list[str] = []
        try:
            store = None
            try:
                store = SqliteStore(db, vfs=vfs.vfs_name)
                for i in range(3):
                    store.save_definition(f"h{i}", "wf", "1", "snapshot" * 100, 0.0)
                    saved.append(f"h{i}")
            except (StoreError, apsw.IOError):  # a failed open's close() fails too
                assert vfs.cut
            if store is not None:
                with contextlib.suppress(apsw.IOError):
                    store.close()
            if not vfs.cut:
                total = vfs.events  # a clean run: every event has had its cut
        finally:
            vfs.unregister()
        store = SqliteStore(db)
        try:
            assert store.integrity_check() == "ok"
            assert store.schema_version() == len(load_migrations("sqlite"))
            for h in saved:
                assert store.load_definition(h) is not None, (n, h)
        finally:
            store.close()
    assert total is not None and total > 10
    assert vfs.writes[str(db) + "-wal"] > 0  # the store really wrote through our VFS


def test_cut_after_close_undoes_unsynced_writes_of_closed_files(tmp_path, make_vfs):
    vfs = make_vfs()
    db = tmp_path / "t.db"
    conn = _open(db, vfs)
    conn.execute("CREATE TABLE t(x INTEGER PRIMARY KEY, pad BLOB)")
    conn.execute("INSERT INTO t VALUES (1, NULL)")
    conn.close()  # FULL: the closing checkpoint syncs the database
    conn = _open(db, vfs, "OFF")
    conn.execute("INSERT INTO t VALUES (2, NULL)")
    conn.close()  # OFF: checkpointed into the database unsynced, the WAL deleted
    pending = vfs.pending(str(db))
    assert pending > 0
    assert vfs.cut_power() == {str(db): pending}
    assert _after_reboot(db) == [1]
