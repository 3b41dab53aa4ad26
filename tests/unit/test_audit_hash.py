"""The audit hash rule, pinned: golden vectors (tests/golden, never edited) and the
per-stream verifier's detection of edits, gaps, reorders, truncation and removed runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from edge.engine.audit import (
    GENESIS,
    canonical_json,
    hash_input,
    link,
    stream_of,
    verify_streams,
)
from edge.engine.records import AuditEvent, AuditRow

GOLDEN = Path(__file__).resolve().parents[1] / "golden"

#: The golden files as first committed. A new rule is a new version in a new file; a
#: change to one of these fails here on purpose.
PINNED = {
    "audit_hash_v1.json": "c9b32304b231db216bd964dc47dfbdf4910c45d3ef822b9f091b88bd636731fd",
    "audit_hash_v2.json": "cb8e5dc3f8f78b0e0ec744e93304a21db1bb2622ce2683b47b3cdf60da896fdf",
}


def _vectors(name: str) -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads((GOLDEN / name).read_text())["vectors"]
    return vectors


def _event(v: dict[str, Any]) -> AuditEvent:
    e = v["event"]
    return AuditEvent(e["run_id"], e["event"], e["at"], e["step"], e["detail"])


@pytest.mark.parametrize("name", sorted(PINNED))
def test_golden_files_are_never_edited(name: str) -> None:
    assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == PINNED[name]


@pytest.mark.parametrize("v", _vectors("audit_hash_v2.json"), ids=lambda v: v["name"])
def test_version_2_hashes_exactly_the_specified_bytes(v: dict[str, Any]) -> None:
    data = hash_input(v["prev_hash"], v["seq"], _event(v), stream=v["stream"])
    assert data.decode() == v["hash_input"]
    assert hashlib.sha256(data).hexdigest() == v["hash"]
    assert link(v["prev_hash"], v["seq"], _event(v), stream=v["stream"]) == v["hash"]


@pytest.mark.parametrize("v", _vectors("audit_hash_v1.json"), ids=lambda v: v["name"])
def test_version_1_rows_still_verify(v: dict[str, Any]) -> None:
    assert link(v["prev_hash"], v["seq"], _event(v), version=1) == v["hash"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.1, "0.1"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (1e-7, "1e-7"),
        (1e-6, "0.000001"),
        (-0.0, "0"),
        (2.0**53, "9007199254740992"),
        (-1.5e-10, "-1.5e-10"),
        ({"b": 1, "a": [True, None]}, '{"a":[true,null],"b":1}'),
        ("é\n\x01", '"é\\n\\u0001"'),
    ],
)
def test_canonical_json_follows_the_ecmascript_number_form(value: object, text: str) -> None:
    assert canonical_json(value) == text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1, 2}])
def test_what_has_no_canonical_form_is_refused(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        canonical_json({"x": bad})


def test_stream_of_is_stable_and_spreads_runs() -> None:
    assert stream_of("any", 1) == 0 and stream_of(None, 8) == 0
    # Pinned: the cloud's rows must land on the same stream on every host and release.
    assert [stream_of(f"run-{i}", 8) for i in range(8)] == [0, 5, 1, 0, 6, 1, 2, 4]
    assert len({stream_of(f"run-{i}", 8) for i in range(200)}) == 8


Heads = dict[int, tuple[int, str]]


def _chains(streams: int = 3, runs: int = 6, events: int = 3) -> tuple[list[AuditRow], Heads]:
    rows: list[AuditRow] = []
    heads: dict[int, tuple[int, str]] = {}
    for r in range(runs):
        run_id = f"run-{r}"
        s = stream_of(run_id, streams)
        for e in range(events):
            seq, prev = heads.get(s, (0, GENESIS))
            ev = AuditEvent(run_id, f"event-{e}", 1_700_000_000 + r + e / 10, None, {"e": e})
            digest = link(prev, seq + 1, ev, stream=s)
            row = AuditRow(seq + 1, run_id, ev.event, None, ev.detail, ev.at, prev, digest, s)
            rows.append(row)
            heads[s] = (seq + 1, digest)
    rows.sort(key=lambda row: (row.stream, row.seq))
    return rows, heads


def test_intact_streams_verify() -> None:
    rows, heads = _chains()
    report = verify_streams(rows, heads)
    assert report.ok and report.rows == len(rows) and report.streams == len(heads) > 1


def test_an_edited_row_is_found() -> None:
    rows, heads = _chains()
    rows[4] = dataclasses.replace(rows[4], detail={"e": 99})
    report = verify_streams(rows, heads)
    assert not report.ok and "edited" in str(report.reason)
    assert (report.stream, report.broken_at) == (rows[4].stream, rows[4].seq)


def test_a_removed_row_is_found() -> None:
    rows, heads = _chains()
    del rows[1]
    assert not verify_streams(rows, heads).ok


def test_reordered_rows_are_found() -> None:
    rows, heads = _chains()
    a, b = rows[0], rows[1]
    assert a.stream == b.stream
    rows[0] = dataclasses.replace(b, seq=a.seq)
    rows[1] = dataclasses.replace(a, seq=b.seq)
    assert not verify_streams(rows, heads).ok


def test_a_truncated_stream_is_found() -> None:
    rows, heads = _chains()
    last = max(range(len(rows)), key=lambda i: (rows[i].stream, rows[i].seq))
    del rows[last]
    report = verify_streams(rows, heads)
    assert not report.ok and "head says" in str(report.reason)


def test_a_removed_run_is_found() -> None:
    rows, heads = _chains()
    report = verify_streams([r for r in rows if r.run_id != "run-0"], heads)
    assert not report.ok


def test_a_stream_whose_rows_are_all_gone_is_found() -> None:
    rows, heads = _chains()
    gone = rows[0].stream
    assert not verify_streams([r for r in rows if r.stream != gone], heads).ok


def test_a_row_moved_to_another_stream_is_found() -> None:
    rows, heads = _chains()
    other = next(s for s in heads if s != rows[0].stream)
    rows[0] = dataclasses.replace(rows[0], stream=other)
    assert not verify_streams(rows, heads).ok
