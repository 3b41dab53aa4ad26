"""Audit chains per stream, on every store: each run's rows go to its stream, each
stream verifies on its own, and an edited, removed, reordered or truncated row -- or a
removed run -- is detected wherever it is. SQLite keeps one stream (a terminal); the
other stores are tested here with four."""

from __future__ import annotations

from collections import Counter

import pytest

from edge.engine import Engine, InlineExecutor
from edge.engine.audit import HASH_VERSION, stream_of
from edge.engine.loader import load_text

LONG = """
workflow_type: long
version: 1
steps:
  - {name: one, type: STANDARD, function: "tf_steps:add"}
  - {name: two, type: STANDARD, function: "tf_steps:add"}
"""

RUNS = 8


@pytest.fixture
def streamed(backend, clock):
    """Eight finished runs on a store keeping as many streams as it can (SQLite: 1)."""
    backend.streams = 1 if backend.name == "sqlite" else 4
    store = backend.open()
    engine = Engine(store, InlineExecutor(), clock=clock)
    engine.register(load_text(LONG))
    runs = [engine.start("long", {"x": i}) for i in range(RUNS)]
    report = engine.verify_audit()
    assert report.ok, report
    yield engine, runs, backend.streams
    engine.close()
    store.close()


def _rows_by_stream(engine):
    by: dict[int, list] = {}
    for row in engine.store.audit_rows():
        by.setdefault(row.stream, []).append(row)
    return by


def _busiest(engine):
    """(stream, its rows) of the stream holding the most rows."""
    by = _rows_by_stream(engine)
    stream = max(by, key=lambda s: len(by[s]))
    return stream, by[stream]


def test_streams__each_runs_rows_go_to_its_stream_and_each_stream_is_a_chain(streamed):
    engine, _, streams = streamed
    rows = list(engine.store.audit_rows())
    for row in rows:
        assert row.stream == stream_of(row.run_id, streams)
        assert row.version == HASH_VERSION
    per_stream = Counter(r.stream for r in rows)
    heads = engine.store.audit_heads()
    assert {s: seq for s, (seq, _) in heads.items()} == dict(per_stream)
    report = engine.verify_audit()
    assert report.rows == len(rows) and report.streams == max(1, len(per_stream))
    if streams > 1:
        assert len(per_stream) > 1  # eight runs over four streams land on more than one


def test_streams__an_edited_row_is_detected_in_its_stream(streamed, backend):
    engine, _, _ = streamed
    stream, rows = _busiest(engine)
    victim = rows[len(rows) // 2]
    backend.edit_audit(victim.seq, detail={"forged": True}, stream=stream)
    report = engine.verify_audit()
    assert not report.ok and (report.stream or 0, report.broken_at) == (stream, victim.seq)
    assert "edited" in report.reason


def test_streams__a_removed_row_is_detected(streamed, backend):
    engine, _, _ = streamed
    stream, rows = _busiest(engine)
    victim = rows[len(rows) // 2]
    backend.delete_audit(victim.seq, stream=stream)
    report = engine.verify_audit()
    assert not report.ok and (report.stream or 0, report.broken_at) == (stream, victim.seq)
    assert "missing" in report.reason


def test_streams__reordered_rows_are_detected(streamed, backend):
    engine, _, _ = streamed
    stream, rows = _busiest(engine)
    a = rows[1].seq
    backend.swap_audit(a, a + 1, stream=stream)
    report = engine.verify_audit()
    assert not report.ok and (report.stream or 0, report.broken_at) == (stream, a)


def test_streams__a_truncated_stream_disagrees_with_its_head(streamed, backend):
    engine, _, _ = streamed
    stream, rows = _busiest(engine)
    backend.delete_audit(*(r.seq for r in rows[-2:]), stream=stream)
    report = engine.verify_audit()
    assert not report.ok and (report.stream or 0) == stream
    assert report.broken_at == rows[-2].seq and "head" in report.reason


def test_streams__a_removed_run_is_detected(streamed, backend):
    engine, runs, _ = streamed
    backend.delete_audit_of_run(runs[3])
    report = engine.verify_audit()
    assert not report.ok
