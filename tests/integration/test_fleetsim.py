"""The fleet simulation, whole, as CI runs it: ``python -m hwsim.fleetsim`` with
``TILLFLOW_FLEET_N`` terminals (10,000 unless set; ``TILLFLOW_FLEET_N=200`` while
developing) against the real cloud (two ``tillflow cloud serve``, two Celery workers) on
this test's own PostgreSQL database and Redis database number (``redis_db``).

* It exits 0: every reconciliation check holds (each named in ``report.json`` with
  how many it checked): every approved sale in the cloud exactly once, no unknown one,
  every message once, every outbox drained, every audit chain verified to the
  terminal's head, nothing quarantined, every terminal on the good config and the
  policy, every terminal that applied the bad config restored; the bad config rolled
  back (in wave 2 from 1,000 terminals up: a smaller fleet's wave 2 may hold too few
  XR-7s to judge), the good config and the policy succeeded, with a worker and an API
  process killed by SIGKILL on the way.
* The report: ``report.json`` in the shape ``hwsim.fleetreport`` renders, and
  ``report.html``.
* The reconciliation can fail: with one payment deleted from the cloud,
  ``tillflow cloud reconcile`` exits 4 naming the sale and the message missing.

The report is kept where ``TILLFLOW_FLEET_REPORT_DIR`` says (copied), for CI to show.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N = int(os.environ.get("TILLFLOW_FLEET_N", "10000"))
#: A bound that only a hung run reaches (the 10,000-terminal run takes about 10 min).
TIMEOUT_S = 60 * 60


def test_fleet_simulation__reconciles_after_the_rollouts_and_the_kills(
    new_database, redis_db, tmp_path: Path
):
    db = new_database()
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "-m", "hwsim.fleetsim", "-n", str(N), "--seed", "1",
           "--database-url", db, "--broker-url", redis_db,
           "--out", str(out), "--work", str(work)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    keep = os.environ.get("TILLFLOW_FLEET_REPORT_DIR")
    if keep and out.exists():
        shutil.copytree(out, Path(keep), dirs_exist_ok=True)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]

    report = json.loads((out / "report.json").read_text())
    assert (out / "report.html").exists()
    s = report["scenario"]
    assert s["ok"] and s["terminals"] == N
    checks = {c["name"]: c for c in report["reconciliation"]["checks"]}
    assert len(checks) >= 9 and all(c["ok"] and c["checked"] > 0 for c in checks.values()), checks
    sales = checks["every approved sale is in the cloud exactly once"]["checked"]
    assert sales >= N  # about two sales a terminal, nearly all approved
    statuses = [(r["name"], r["status"]) for r in report["rollouts"]]
    assert statuses == [("bad config", "rolled_back"), ("good config", "succeeded"),
                        ("policy", "succeeded")]  # fmt: skip
    bad = report["rollouts"][0]
    assert bad["abort"]["criterion"] in ("wave_failure_rate", "total_failure_rate")
    if N >= 1000:
        assert bad["abort"]["wave"] == 2
    assert any(s_["restored"] > 0 for s_ in bad["samples"])
    events = " | ".join(e["what"] for e in s["events"])
    assert "kill -9: worker:0" in events and "restarted" in events
    assert report["budget"]["syncs"] > 3 * N and report["cloud"]["timeline"]

    # The reconciliation is not a rubber stamp: break the cloud's copy, it says so.
    accounts = work / "accounts.jsonl"
    first = next(a for a in map(json.loads, accounts.read_text().splitlines()) if a["approved"])
    with psycopg.connect(db, autocommit=True) as conn:
        deleted = conn.execute(
            "DELETE FROM sync_messages WHERE device_id = %s AND topic = 'payment' "
            "AND run_id = %s", (first["device_id"], first["approved"][0]),
        ).rowcount  # fmt: skip
        assert deleted == 1
    check = subprocess.run(
        [sys.executable, "-m", "edge.cli", "cloud", "reconcile", str(accounts),
         "--database-url", db],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert check.returncode == 4, check.stdout + check.stderr
    assert "FAIL every approved sale is in the cloud exactly once" in check.stdout
    assert "FAIL every outbox message arrived once" in check.stdout
    assert first["approved"][0] in check.stdout
