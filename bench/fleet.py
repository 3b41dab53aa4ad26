"""The fleet simulation's budget: ``python -m hwsim.fleetsim`` at each size, its figures
side by side, the smallest size the baseline of the per-terminal ratios.

    python bench/fleet.py [--sizes 1000,10000] [--seed 1] [--reports DIR ...]

Each size runs the whole scenario (enroll, trading day, three rollouts with a worker and
an API process killed, heal, reconcile) on a scratch PostgreSQL database of its own
(``TILLFLOW_TEST_DATABASE_URL``'s server, else the local ``test`` database's) and Redis
database 14 (``TILLFLOW_TEST_REDIS_URL``, else 127.0.0.1:6379); ``--reports`` reads the
``report.json`` of earlier runs instead (CI's, say). Prints one JSON object: per size the
wall time, peak memory of the simulator and of the cloud (PSS), CPU milliseconds per
terminal (simulator) and per sync (simulator and cloud), requests per second the cloud
sustained, syncs per terminal, where the wall time went (per phase) and whether every
reconciliation check held; ``ratio_vs_<baseline>``: the same per-terminal figures over the
baseline's (1.0: it scales linearly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"


def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def run(size: int, seed: int, out: Path) -> dict[str, Any]:
    server = os.environ.get("TILLFLOW_TEST_DATABASE_URL", DEFAULT_DB)
    redis = os.environ.get("TILLFLOW_TEST_REDIS_URL", DEFAULT_REDIS)
    name = f"bench_fleet_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        cmd = [sys.executable, "-m", "hwsim.fleetsim", "-n", str(size), "--seed", str(seed),
               "--database-url", _with_db(server, name), "--broker-url", redis,
               "--out", str(out)]  # fmt: skip
        done = subprocess.run(cmd, stdout=sys.stderr, timeout=4 * 3600)
        report: dict[str, Any] = json.loads((out / "report.json").read_text())
        report["exit"] = done.returncode
        return report
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def figures(report: dict[str, Any]) -> dict[str, Any]:
    s, b = report["scenario"], report["budget"]
    n = s["terminals"]
    cloud_cpu = sum(b["cloud_cpu_s"].values())
    return {
        "terminals": n, "ok": s["ok"], "wall_s": b["wall_s"], "rounds": s["rounds"],
        "sim_peak_mib": b["sim_peak_rss_mib"],
        "cloud_peak_mib": round(sum(b["cloud_peak_rss_mib"].values()), 1),
        "cpu_ms_per_terminal": b["cpu_ms_per_terminal"],
        "cloud_cpu_ms_per_terminal": round(1000 * cloud_cpu / n, 1),
        "sim_cpu_ms_per_sync": round(1000 * b["sim_cpu_s"] / max(1, b["syncs"]), 2),
        "cloud_cpu_ms_per_sync": round(1000 * cloud_cpu / max(1, b["syncs"]), 2),
        "requests_per_s": b["requests_per_s"], "syncs_per_terminal": b["syncs_per_terminal"],
        "wall_s_per_phase": {p["where"]: p["wall_s"] for p in report["profile"]},
        "cloud_cpu_s": b["cloud_cpu_s"],
    }  # fmt: skip


PER_TERMINAL = ("wall_s", "sim_peak_mib", "cpu_ms_per_terminal", "cloud_cpu_ms_per_terminal")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/fleet.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000", help="fleet sizes, comma-separated")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reports", nargs="*", help="report.json files to read instead of running")
    a = p.parse_args(argv)
    if a.reports:
        reports = [json.loads(Path(r).read_text()) for r in a.reports]
    else:
        sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
        base = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
        reports = [run(n, a.seed, base / f"n{n}") for n in sizes]
    rows = sorted((figures(r) for r in reports), key=lambda f: f["terminals"])
    baseline = rows[0]
    out: dict[str, Any] = {"baseline": f"{baseline['terminals']} terminals", "runs": rows}
    for row in rows[1:]:
        scale = row["terminals"] / baseline["terminals"]
        out[f"ratio_{row['terminals']}_vs_{baseline['terminals']}"] = {
            k: round(row[k] / (baseline[k] * (scale if k in ("wall_s", "sim_peak_mib") else 1)), 3)
            for k in PER_TERMINAL if baseline[k]
        }  # fmt: skip
    print(json.dumps(out, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
