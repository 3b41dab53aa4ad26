"""Deterministic power-cut sweeps (``hwsim.cuttorture.sweep``): for one payment, one
refund, one saga rollback and one payment whose approval's answer is lost before an
outage (torn only in ``make torture``: its retries make it long), the power goes at
every write, truncate and sync of the database in turn (request, the daemon's
checkpoint and stop), from the same template database with a WAL of committed frames;
every reboot recovers, the POS retries, the invariants hold, and the request ends as a
clean run does. No window is left to chance.
"""

from __future__ import annotations

import pytest
from hwsim import cuttorture

#: Fewer events than this would mean the sweep no longer sees the whole request.
MIN_EVENTS = {"payment": 100, "refund": 100, "saga": 120, "lost": 200, "ack": 30}


@pytest.mark.parametrize("scenario", sorted(cuttorture.SCENARIOS))
def test_sweep__a_cut_at_every_event_breaks_no_invariant(tmp_path, scenario):
    result = cuttorture.sweep(scenario, workdir=tmp_path)
    assert result["violations"] == [], result
    assert result["events"] >= MIN_EVENTS[scenario]
    assert result["swept"] == result["events"]
    kinds = " ".join(result["cut_at"])
    for where in ("write db-wal", "sync db-wal", "write db", "sync db", "truncate db-wal"):
        assert where in kinds, result["cut_at"]  # commits, the checkpoint and its reset


@pytest.mark.parametrize(
    "scenario",
    [
        "payment",
        pytest.param("refund", marks=pytest.mark.slow),
        pytest.param("saga", marks=pytest.mark.slow),
    ],
)
def test_sweep__a_torn_write_at_every_write_breaks_no_invariant(tmp_path, scenario):
    result = cuttorture.sweep(scenario, workdir=tmp_path, tear=True)
    assert result["violations"] == [], result
    assert result["swept"] >= MIN_EVENTS[scenario] // 2
    assert set(result["cut_at"]) <= {"write db-wal", "write db"}


def test_sweep__an_unknown_scenario_is_refused(tmp_path):
    with pytest.raises(ValueError, match="payment, refund, saga"):
        cuttorture.sweep("settlement", workdir=tmp_path)
