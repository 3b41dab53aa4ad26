"""Engine throughput on the terminal's store, against the raw SQLite commit rate.

    python bench/engine.py [--quick] [--runs N] [--profile]

Drives the 5-step ``bench_payment`` workflow (3 STANDARD + 2 DECISION, ~5 KB pydantic
state; ``bench/fixtures``) through ``Engine`` + ``SqliteStore`` on a file database, one
run after another, for ``synchronous=FULL`` and ``NORMAL``. In the same process, on its
own file with the same PRAGMAs, it measures the raw bound: transactions/s of
``BEGIN IMMEDIATE; UPDATE a 5 KB row; INSERT audit; INSERT outbox; COMMIT``.

The figure that counts is ``ratio = runs_per_s / (raw_tx_per_s / 6)``: 6 is the
yardstick of one commit to start a run plus one per step. Raw and engine batches are
interleaved in rounds so both see the same machine. Prints one JSON object on stdout;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `edge` and `bench` importable
    sys.path.insert(0, str(ROOT))

import apsw  # noqa: E402

from bench.fixtures.bench_steps import BenchState, make_input  # noqa: E402
from edge.engine import Engine, Status, Store, SystemClock  # noqa: E402
from edge.engine.loader import load_file  # noqa: E402
from edge.engine.records import Commit, RunRecord  # noqa: E402
from edge.store.sqlite import DEFAULT_BUSY_TIMEOUT_MS, SqliteStore  # noqa: E402

Mode = Literal["FULL", "NORMAL"]

WORKFLOW_YAML = ROOT / "bench" / "fixtures" / "bench_payment.yaml"
STEPS_PER_RUN = 5  # 3 STANDARD + 2 DECISION, all executed by every run
#: The yardstick: one commit to start a run plus one per step.
YARDSTICK_COMMITS_PER_RUN = 6
DEFAULT_RUNS = 300
QUICK_RUNS = 60
#: Interleaved raw/engine batches per mode, so drift on a noisy machine hits both alike.
ROUNDS = 5
#: Warm-up sized so both WAL files fill and wrap once (~1000 pages: ~20 engine runs, ~200
#: raw transactions) before measuring: while a WAL still grows, every fsync also syncs
#: the file size, and the first rounds would be slower than the steady state.
WARMUP_RUNS = 40
WARMUP_RAW_TX = 400
#: Raw transactions measured per engine run: about the engine's own commit count.
RAW_TX_PER_RUN = 4
TARGETS = {"ratio": ">= 0.7 on FULL", "engine_cpu_us_per_step": "<= 150"}
TARGET_RATIO_FULL = 0.7
TARGET_ENGINE_US_PER_STEP = 150.0


def progress(msg: str) -> None:
    print(f"[bench.engine] {msg}", file=sys.stderr, flush=True)


# --- the store, counted ---------------------------------------------------------------


@dataclass
class Tally:
    calls: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def reset(self) -> None:
        self.calls, self.wall_s, self.cpu_s = 0, 0.0, 0.0


class CountingStore:
    """Delegates everything to a real store; counts and times the calls on the hot path.

    ``start``/``commit`` are the write transactions; ``get_run`` is the one read the
    inline executor makes per run. Everything else goes through ``__getattr__``.
    """

    def __init__(self, inner: SqliteStore) -> None:
        self._inner = inner
        self.writes = Tally()  # start + commit
        self.starts = 0
        self.reads = Tally()  # get_run

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def reset(self) -> None:
        self.writes.reset()
        self.reads.reset()
        self.starts = 0

    def _timed(self, tally: Tally, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        c0 = time.process_time()
        try:
            return fn()
        finally:
            tally.cpu_s += time.process_time() - c0
            tally.wall_s += time.perf_counter() - t0
            tally.calls += 1

    def start(self, commit: Commit) -> tuple[str, bool]:
        self.starts += 1
        return cast(tuple[str, bool], self._timed(self.writes, lambda: self._inner.start(commit)))

    def commit(self, commit: Commit) -> None:
        self._timed(self.writes, lambda: self._inner.commit(commit))

    def get_run(self, run_id: str) -> RunRecord | None:
        return cast(RunRecord | None, self._timed(self.reads, lambda: self._inner.get_run(run_id)))


# --- the raw bound ---------------------------------------------------------------------

_RAW_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, revision INTEGER NOT NULL, state TEXT NOT NULL)
    STRICT;
CREATE TABLE audit (seq INTEGER PRIMARY KEY, run_id TEXT, event TEXT NOT NULL, step TEXT,
    detail TEXT NOT NULL, at REAL NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL) STRICT;
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE,
    run_id TEXT, topic TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL) STRICT;
"""


class RawBound:
    """The fastest a step outcome can commit here: apsw, no engine, same PRAGMAs."""

    def __init__(self, path: Path, synchronous: Mode, state_json: str) -> None:
        self.conn = apsw.Connection(str(path))
        # The same settings, in the same order, as edge.store.sqlite.SqliteStore.
        self.conn.set_busy_timeout(DEFAULT_BUSY_TIMEOUT_MS)
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"cannot enable WAL on {path} (journal_mode={mode})")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute(_RAW_SCHEMA)
        # Two bodies of the same size, alternated, so every UPDATE really changes the row.
        self._bodies = (state_json, state_json.replace('"EUR"', '"USD"', 1))
        self.conn.execute(
            "INSERT INTO runs (run_id, revision, state) VALUES ('r', 0, ?)", (state_json,)
        )
        self._seq = 0
        self._hash = "0" * 64

    def transactions(self, n: int) -> float:
        """Run ``n`` transactions; return the seconds they took."""
        conn = self.conn
        t0 = time.perf_counter()
        for _ in range(n):
            self._seq += 1
            seq = self._seq
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE runs SET state = ?, revision = revision + 1 WHERE run_id = 'r'",
                (self._bodies[seq & 1],),
            )
            conn.execute(
                "INSERT INTO audit (seq, run_id, event, step, detail, at, prev_hash, hash) "
                "VALUES (?, 'r', 'step_completed', 'validate', '{\"attempt\":1}', ?, ?, ?)",
                (seq, time.time(), self._hash, f"{seq:064x}"),
            )
            conn.execute(
                "INSERT INTO outbox (message_id, run_id, topic, payload, created_at) "
                "VALUES (?, 'r', 'sale', '{\"total_minor\":12345,\"currency\":\"EUR\"}', ?)",
                (f"m-{seq}", time.time()),
            )
            conn.execute("COMMIT")
            self._hash = f"{seq:064x}"
        return time.perf_counter() - t0

    def close(self) -> None:
        self.conn.close()


# --- measuring -------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def open_engine(path: Path, synchronous: Mode) -> tuple[Engine, CountingStore, SqliteStore]:
    real = SqliteStore(path, synchronous=synchronous)
    counted = CountingStore(real)
    engine = Engine(cast(Store, counted), clock=SystemClock())
    engine.register(load_file(WORKFLOW_YAML))
    return engine, counted, real


def check_completed(real: SqliteStore, run_ids: list[str]) -> None:
    for run_id in run_ids:
        run = real.get_run(run_id)
        if run is None or run.status is not Status.COMPLETED:
            status = None if run is None else run.status
            raise SystemExit(f"bench run {run_id} ended {status}, not COMPLETED")


def measure_mode(
    workdir: Path, synchronous: Mode, runs: int, warmup: int, state_json: str
) -> dict[str, Any]:
    engine, counted, real = open_engine(workdir / f"engine-{synchronous}.db", synchronous)
    raw = RawBound(workdir / f"raw-{synchronous}.db", synchronous, state_json)
    inputs = [make_input(i) for i in range(warmup + runs)]
    try:
        progress(f"{synchronous}: warm-up ({warmup} runs, {WARMUP_RAW_TX} raw tx)")
        check_completed(real, [engine.start("bench_payment", inputs[i]) for i in range(warmup)])
        raw.transactions(WARMUP_RAW_TX)

        counted.reset()
        latencies: list[float] = []
        run_ids: list[str] = []
        raw_s = 0.0
        raw_n = 0
        cpu_s = 0.0
        round_ratios: list[float] = []
        next_input = warmup
        for r, (n_runs, n_tx) in enumerate(
            zip(split(runs, ROUNDS), split(runs * RAW_TX_PER_RUN, ROUNDS), strict=True)
        ):
            progress(f"{synchronous}: round {r + 1}/{ROUNDS}: {n_tx} raw tx, {n_runs} runs")
            round_raw_s = raw.transactions(n_tx)
            raw_s += round_raw_s
            raw_n += n_tx
            first = len(latencies)
            c0 = time.process_time()
            for _ in range(n_runs):
                payload = inputs[next_input]
                next_input += 1
                t0 = time.perf_counter()
                run_id = engine.start("bench_payment", payload)
                latencies.append(time.perf_counter() - t0)
                run_ids.append(run_id)
            cpu_s += time.process_time() - c0
            round_runs_per_s = n_runs / sum(latencies[first:])
            round_bound = n_tx / round_raw_s / YARDSTICK_COMMITS_PER_RUN
            round_ratios.append(round_runs_per_s / round_bound)
        check_completed(real, run_ids)
    finally:
        engine.close()
        raw.close()
        real.close()

    total_s = sum(latencies)
    steps = runs * STEPS_PER_RUN
    ordered = sorted(latencies)
    runs_per_s = runs / total_s
    raw_tx_per_s = raw_n / raw_s
    raw_bound = raw_tx_per_s / YARDSTICK_COMMITS_PER_RUN
    ratio = runs_per_s / raw_bound
    engine_us = (total_s - counted.writes.wall_s) / steps * 1e6
    result: dict[str, Any] = {
        "runs": runs,
        "runs_per_s": round(runs_per_s, 1),
        "p50_ms": round(percentile(ordered, 50) * 1e3, 3),
        "p99_ms": round(percentile(ordered, 99) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
        "commits_per_run": round(counted.writes.calls / runs, 3),
        "starts_per_run": round(counted.starts / runs, 3),
        "store_write_ms_per_commit": round(counted.writes.wall_s / counted.writes.calls * 1e3, 3),
        "store_write_share": round(counted.writes.wall_s / total_s, 3),
        "get_run_calls_per_run": round(counted.reads.calls / runs, 3),
        "get_run_us_per_call": round(counted.reads.wall_s / max(1, counted.reads.calls) * 1e6, 1),
        "raw_tx": raw_n,
        "raw_tx_per_s": round(raw_tx_per_s, 1),
        "raw_bound_runs_per_s": round(raw_bound, 1),
        "ratio": round(ratio, 3),
        # Per-round ratios (raw batch vs the engine batch right after it): the noise.
        "ratio_rounds_min_max": [round(min(round_ratios), 3), round(max(round_ratios), 3)],
        # Wall time outside store.start/commit, per executed step (DECISIONs included).
        "engine_cpu_us_per_step": round(engine_us, 1),
        # The same, also without the get_run read the executor makes per run.
        "engine_us_per_step_excl_reads": round(
            (total_s - counted.writes.wall_s - counted.reads.wall_s) / steps * 1e6, 1
        ),
        # Process CPU over the same runs (includes SQLite's CPU inside the commits).
        "process_cpu_us_per_run": round(cpu_s / runs * 1e6, 1),
        "engine_process_cpu_us_per_step": round((cpu_s - counted.writes.cpu_s) / steps * 1e6, 1),
    }
    if synchronous == "FULL":
        result["meets_ratio_target"] = ratio >= TARGET_RATIO_FULL
    result["meets_engine_cpu_target"] = engine_us <= TARGET_ENGINE_US_PER_STEP
    return result


def profile_runs(workdir: Path, runs: int, top: int = 10) -> list[dict[str, Any]]:
    """cProfile ``runs`` runs (synchronous=NORMAL); the top cumulative entries in edge/."""
    engine, _, real = open_engine(workdir / "profile.db", "NORMAL")
    inputs = [make_input(i) for i in range(runs + 5)]
    try:
        for i in range(5):
            engine.start("bench_payment", inputs[i])
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(5, runs + 5):
            engine.start("bench_payment", inputs[i])
        profiler.disable()
    finally:
        engine.close()
        real.close()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    edge_dir = str(ROOT / "edge") + os.sep
    raw_stats = cast(dict[tuple[str, int, str], tuple[int, int, float, float, Any]], stats.stats)  # type: ignore[attr-defined]
    rows = [
        (ct, tt, nc, f"{Path(file).relative_to(ROOT)}:{line}({fn})")
        for (file, line, fn), (_cc, nc, tt, ct, _callers) in raw_stats.items()
        if file.startswith(edge_dir)
    ]
    rows.sort(reverse=True)
    return [
        {
            "function": where,
            "cum_us_per_run": round(ct / runs * 1e6, 1),
            "self_us_per_run": round(tt / runs * 1e6, 1),
            "calls_per_run": round(nc / runs, 2),
        }
        for ct, tt, nc, where in rows[:top]
    ]


def environment(workdir: Path) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "tmpdir": str(workdir.parent),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs per mode")
    parser.add_argument("--runs", type=int, help=f"runs per mode (default {DEFAULT_RUNS})")
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile runs; top 10 edge/ entries"
    )
    args = parser.parse_args(argv)
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    if runs < ROUNDS:
        parser.error(f"--runs must be at least {ROUNDS}")
    warmup = WARMUP_RUNS

    sample = BenchState.model_validate(make_input(0)).model_dump(mode="json")
    state_json = json.dumps(sample, separators=(",", ":"))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tillflow-bench-") as tmp:
        workdir = Path(tmp)
        modes = {m: measure_mode(workdir, m, runs, warmup, state_json) for m in ("FULL", "NORMAL")}
        profile = profile_runs(workdir, min(runs, 100)) if args.profile else None
        env = environment(workdir)
    out: dict[str, Any] = {
        "benchmark": "engine",
        "quick": bool(args.quick),
        "workflow": {
            "type": "bench_payment",
            "steps_per_run": STEPS_PER_RUN,
            "standard": 3,
            "decision": 2,
            "state_bytes_at_start": len(state_json),
            "yardstick_commits_per_run": YARDSTICK_COMMITS_PER_RUN,
        },
        "warmup_runs": warmup,
        "warmup_raw_tx": WARMUP_RAW_TX,
        "rounds": ROUNDS,
        "modes": modes,
        "targets": TARGETS,
        **({"profile_top_edge_cumulative": profile} if profile is not None else {}),
        "env": env,
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
