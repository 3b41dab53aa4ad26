"""Engine throughput on the terminal's store, against the raw SQLite commit rate.

    python bench/engine.py [--quick] [--runs N] [--profile] [--pg-url URL | --no-pg]

Drives the 5-step ``bench_payment`` workflow (3 STANDARD + 2 DECISION, ~5 KB pydantic
state; ``bench/fixtures``) through ``Engine`` + ``SqliteStore`` on a file database, one
run after another, for ``synchronous=FULL`` and ``NORMAL``. In the same process, on its
own file with the same PRAGMAs, it measures the raw bound: transactions/s of
``BEGIN IMMEDIATE; UPDATE a 5 KB row; INSERT audit; INSERT outbox; COMMIT``.

The figure that counts is ``ratio = runs_per_s / (raw_tx_per_s / 6)``: 6 is the
yardstick of one commit to start a run plus one per step. Raw and engine batches are
interleaved in rounds so both see the same machine. Prints one JSON object on stdout;
progress goes to stderr.

Then the same for the cloud's store (``PostgresStore``; ``--pg-url``, default
``$TILLFLOW_BENCH_DATABASE_URL`` or the local server's ``test`` database; ``--no-pg``
skips it; an unreachable server is reported as skipped), each measurement in a fresh
database created for it and dropped at the end:

- sequential: ``Engine(PostgresStore(url, pool_size=2))`` with the inline executor, one
  run after another, interleaved with the raw bound on one psycopg connection
  (``BEGIN; UPDATE a 5 KB jsonb row; INSERT audit; INSERT outbox; COMMIT``), ratio as
  above;
- workers: N runs started first (``PollingExecutor``: nobody advances them), then 1, 2
  and 4 worker processes (spawned; ``Worker.run_once`` until idle) drive them; wall
  time from "go" to no run left in flight, plus where the workers' time went: the wait
  for the locked head rows of the audit chains a commit appends to (``audit_head``, one
  row per stream, ``PostgresStore(audit_streams=...)``; timed per commit) and
  ``pg_stat_activity`` wait events sampled meanwhile.

Then the cloud's Celery executor (``--no-celery`` skips it, ``--celery-only`` runs only
it): ``tillflow cloud worker --concurrency N`` for N = 1, 2, 4 worker processes, each on
a fresh database, against a private ``redis-server`` on a free port (or
``--broker-url``/``$TILLFLOW_BENCH_BROKER_URL``). The runs are started in advance with
nothing published; at "go" each gets its ``advance_run`` message; runs/s from go to none
in flight. The baseline is the same workflow driven inline in one process
(``Engine(PostgresStore)``, start included), measured before and after the workers in
the same run: ``ratio_to_inline`` and ``scaling_from_1`` are the figures that count.
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
from typing import Any, Literal, Protocol, cast

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

    def __init__(self, inner: Any) -> None:  # SqliteStore or PostgresStore
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


def check_completed(real: Any, run_ids: list[str]) -> None:
    for run_id in run_ids:
        run = real.get_run(run_id)
        if run is None or run.status is not Status.COMPLETED:
            status = None if run is None else run.status
            raise SystemExit(f"bench run {run_id} ended {status}, not COMPLETED")


class Raw(Protocol):
    def transactions(self, n: int) -> float: ...


def measure_interleaved(
    label: str,
    engine: Engine,
    counted: CountingStore,
    real: Any,
    raw: Raw,
    runs: int,
    warmup: int,
    warmup_raw_tx: int,
) -> dict[str, Any]:
    """``runs`` runs one after another, in ROUNDS batches each right after a batch of raw
    transactions; the common figures of both stores."""
    inputs = [make_input(i) for i in range(warmup + runs)]
    progress(f"{label}: warm-up ({warmup} runs, {warmup_raw_tx} raw tx)")
    check_completed(real, [engine.start("bench_payment", inputs[i]) for i in range(warmup)])
    raw.transactions(warmup_raw_tx)

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
        progress(f"{label}: round {r + 1}/{ROUNDS}: {n_tx} raw tx, {n_runs} runs")
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
    writes, reads, starts = counted.writes, counted.reads, counted.starts
    check_completed(real, run_ids)

    total_s = sum(latencies)
    steps = runs * STEPS_PER_RUN
    ordered = sorted(latencies)
    runs_per_s = runs / total_s
    raw_tx_per_s = raw_n / raw_s
    raw_bound = raw_tx_per_s / YARDSTICK_COMMITS_PER_RUN
    ratio = runs_per_s / raw_bound
    engine_us = (total_s - writes.wall_s) / steps * 1e6
    return {
        "runs": runs,
        "runs_per_s": round(runs_per_s, 1),
        "p50_ms": round(percentile(ordered, 50) * 1e3, 3),
        "p99_ms": round(percentile(ordered, 99) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
        "commits_per_run": round(writes.calls / runs, 3),
        "starts_per_run": round(starts / runs, 3),
        "store_write_ms_per_commit": round(writes.wall_s / writes.calls * 1e3, 3),
        "store_write_share": round(writes.wall_s / total_s, 3),
        "get_run_calls_per_run": round(reads.calls / runs, 3),
        "get_run_us_per_call": round(reads.wall_s / max(1, reads.calls) * 1e6, 1),
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
            (total_s - writes.wall_s - reads.wall_s) / steps * 1e6, 1
        ),
        # Process CPU over the same runs (includes the store's CPU inside the commits).
        "process_cpu_us_per_run": round(cpu_s / runs * 1e6, 1),
        "engine_process_cpu_us_per_step": round((cpu_s - writes.cpu_s) / steps * 1e6, 1),
    }


def measure_mode(
    workdir: Path, synchronous: Mode, runs: int, warmup: int, state_json: str
) -> dict[str, Any]:
    engine, counted, real = open_engine(workdir / f"engine-{synchronous}.db", synchronous)
    raw = RawBound(workdir / f"raw-{synchronous}.db", synchronous, state_json)
    try:
        result = measure_interleaved(
            synchronous, engine, counted, real, raw, runs, warmup, WARMUP_RAW_TX
        )
    finally:
        engine.close()
        raw.close()
        real.close()
    if synchronous == "FULL":
        result["meets_ratio_target"] = result["ratio"] >= TARGET_RATIO_FULL
    result["meets_engine_cpu_target"] = (
        result["engine_cpu_us_per_step"] <= TARGET_ENGINE_US_PER_STEP
    )
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


# --- PostgreSQL: the cloud's store ------------------------------------------------------

PG_DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL_ENV = "TILLFLOW_BENCH_DATABASE_URL"
PG_DEFAULT_RUNS = 300
PG_QUICK_RUNS = 40
PG_DEFAULT_WORKER_RUNS = 400
PG_QUICK_WORKER_RUNS = 100
PG_WARMUP_RUNS = 20
PG_WARMUP_RAW_TX = 100
PG_WORKER_COUNTS = (1, 2, 4)
#: One connection does the work; the second is there for the heartbeat thread.
PG_SEQUENTIAL_POOL_SIZE = 2
#: Runs of the instrumented pass that counts statements per commit.
PG_STATEMENT_PASS_RUNS = 20
#: Raw transactions measured with synchronous_commit=off (a diagnostic, not the bound).
PG_NO_FLUSH_RAW_TX = 200
#: How often the parent polls "runs left in flight" and samples pg_stat_activity.
PG_POLL_S = 0.01
#: A worker process exits after finding nothing to claim for this long.
PG_WORKER_IDLE_EXIT_S = 0.3
PG_WORKER_IDLE_SLEEP_S = 0.005
PG_WORKER_TIMEOUT_S = 300.0
PG_REFERENCE = (
    "DBOS 3.4 measured about 26 runs/s for this shape (5 steps, ~5 KB state, sequential) "
    "on a local PostgreSQL on this kind of machine"
)
PG_TARGETS = {"ratio": ">= 0.7 sequential"}
TARGET_RATIO_PG = 0.7
_IN_FLIGHT = "('RUNNING', 'COMPENSATING', 'WAITING')"

_PG_RAW_SCHEMA = """
CREATE TABLE runs (
    run_id text PRIMARY KEY, workflow_type text NOT NULL, status text NOT NULL,
    state jsonb NOT NULL, cursor jsonb NOT NULL, revision bigint NOT NULL,
    lease_owner text, lease_expires_at double precision,
    created_at double precision NOT NULL, updated_at double precision NOT NULL,
    commit_token text
);
CREATE TABLE audit (
    seq bigint PRIMARY KEY, run_id text, event text NOT NULL, step text,
    detail jsonb NOT NULL, at double precision NOT NULL, prev_hash text NOT NULL,
    hash text NOT NULL
);
CREATE INDEX audit_by_run ON audit (run_id, seq);
CREATE TABLE outbox (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, message_id text NOT NULL UNIQUE,
    run_id text, step text, topic text NOT NULL, payload jsonb NOT NULL,
    created_at double precision NOT NULL
);
"""


class PgRawBound:
    """The fastest a step outcome can commit on PostgreSQL: psycopg, one connection, no
    engine, rows shaped like the engine's (5 KB jsonb state, audit, outbox)."""

    def __init__(self, url: str, state_json: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(_PG_RAW_SCHEMA)
        self._bodies = (state_json, state_json.replace('"EUR"', '"USD"', 1))
        now = time.time()
        self.conn.execute(
            "INSERT INTO runs (run_id, workflow_type, status, state, cursor, revision, "
            "lease_owner, lease_expires_at, created_at, updated_at) VALUES ('r', "
            "'bench_payment', 'RUNNING', %s::jsonb, '{\"frames\":[[0]],\"attempt\":1}', 1, "
            "'bench', %s, %s, %s)",
            (state_json, now + 30, now, now),
        )
        self._seq = 0
        self._hash = "0" * 64

    def transactions(self, n: int) -> float:
        conn = self.conn
        t0 = time.perf_counter()
        for _ in range(n):
            self._seq += 1
            seq = self._seq
            now = time.time()
            conn.execute("BEGIN")
            conn.execute(
                "UPDATE runs SET state = %s::jsonb, revision = revision + 1, "
                "lease_expires_at = %s, updated_at = %s, commit_token = %s WHERE run_id = 'r'",
                (self._bodies[seq & 1], now + 30, now, f"t-{seq}"),
            )
            conn.execute(
                "INSERT INTO audit (seq, run_id, event, step, detail, at, prev_hash, hash) "
                "VALUES (%s, 'r', 'step_completed', 'validate', '{\"attempt\":1}', %s, %s, %s)",
                (seq, now, self._hash, f"{seq:064x}"),
            )
            conn.execute(
                "INSERT INTO outbox (message_id, run_id, step, topic, payload, created_at) "
                "VALUES (%s, 'r', 'record', 'sale', "
                '\'{"total_minor":12345,"currency":"EUR"}\', %s)',
                (f"m-{seq}", now),
            )
            conn.execute("COMMIT")
            self._hash = f"{seq:064x}"
        return time.perf_counter() - t0

    def round_trip_us(self, n: int = 200) -> float:
        """Median wall time of ``SELECT 1``: one round trip with nothing to do."""
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.conn.execute("SELECT 1").fetchone()
            times.append(time.perf_counter() - t0)
        return percentile(sorted(times), 50) * 1e6

    def transactions_no_flush(self, n: int) -> float:
        """Like ``transactions``, with ``synchronous_commit=off``: COMMIT waits for no
        WAL flush, so what is left is the round trips and the server's work."""
        self.conn.execute("SET synchronous_commit = off")
        try:
            return self.transactions(n)
        finally:
            self.conn.execute("RESET synchronous_commit")

    def close(self) -> None:
        self.conn.close()


class PgServer:
    """The admin connection: creates a database per measurement, drops them all."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self.admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
        row = self.admin.execute(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        if not (row and row[0]):
            self.admin.close()
            raise PermissionError("the role may not CREATE DATABASE (one is made per measurement)")
        self.created: list[str] = []
        self._tag = f"{os.getpid()}_{os.urandom(3).hex()}"

    def create(self, label: str) -> tuple[str, str]:
        """A fresh database; returns its name and a connection string for it."""
        from psycopg import conninfo, sql

        name = f"tillflow_bench_{self._tag}_{label}"
        self.admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return name, conninfo.make_conninfo(self.url, dbname=name)

    def drop(self, name: str) -> None:
        from psycopg import sql

        self.admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        self.created.remove(name)

    def describe(self) -> dict[str, Any]:
        import psycopg

        settings = {
            name: self.admin.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in (
                "synchronous_commit",
                "fsync",
                "wal_sync_method",
                "commit_delay",
                "shared_buffers",
                "max_connections",
            )
        }
        return {
            "server_version": self.admin.info.parameter_status("server_version"),
            "psycopg": psycopg.__version__,
            "settings": settings,
        }

    def close(self) -> None:
        try:
            for name in list(self.created):
                self.drop(name)
        finally:
            self.admin.close()


def _timed_pg_store_class() -> type[Any]:
    """``PostgresStore`` that counts its statements per write and times the audit chain:
    the ``audit_head`` SELECT ... FOR UPDATE (wait for the row lock + one round trip) and
    how long the lock is then held (the rest of the transaction, COMMIT included)."""
    from cloud.store.postgres import PostgresStore

    class TimedPostgresStore(PostgresStore):
        def __init__(self, url: str, **options: Any) -> None:
            self.stmts: dict[str, dict[str, int]] = {"start": {}, "commit": {}}
            self.writes = {"start": 0, "commit": 0}
            self.write_s = 0.0
            self.lock_waits: list[float] = []
            self.lock_holds: list[float] = []
            self.claims = 0  # claim_due calls that claimed something
            self.claim_s = 0.0
            self.empty_claims = 0
            self._kind: str | None = None
            self._locked_at: float | None = None
            super().__init__(url, **options)

        def _q(self, conn: Any, name: str, params: Any = None) -> Any:
            kind = self._kind
            if kind is None:
                return PostgresStore._q(conn, name, params)
            counts = self.stmts[kind]
            counts[name] = counts.get(name, 0) + 1
            if name != "audit_head":
                return PostgresStore._q(conn, name, params)
            t0 = time.perf_counter()
            cursor = PostgresStore._q(conn, name, params)
            self._locked_at = time.perf_counter()
            self.lock_waits.append(self._locked_at - t0)
            return cursor

        def _write(self, kind: str, fn: Callable[[], Any]) -> Any:
            self._kind, self._locked_at = kind, None
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                t1 = time.perf_counter()
                self._kind = None
                self.write_s += t1 - t0
                self.writes[kind] += 1
                if self._locked_at is not None:
                    self.lock_holds.append(t1 - self._locked_at)

        def start(self, commit: Commit) -> tuple[str, bool]:
            return cast(
                tuple[str, bool], self._write("start", lambda: PostgresStore.start(self, commit))
            )

        def commit(self, commit: Commit) -> None:
            self._write("commit", lambda: PostgresStore.commit(self, commit))

        def claim_due(
            self, owner: str, now: float, lease_expires_at: float, limit: int
        ) -> list[RunRecord]:
            t0 = time.perf_counter()
            claimed = super().claim_due(owner, now, lease_expires_at, limit)
            if claimed:
                self.claim_s += time.perf_counter() - t0
                self.claims += 1
            else:
                self.empty_claims += 1
            return claimed

    return TimedPostgresStore


def _mean_ms(values: list[float]) -> float:
    return round(sum(values) / len(values) * 1e3, 3) if values else 0.0


def _p_ms(values: list[float], p: float) -> float:
    return round(percentile(sorted(values), p) * 1e3, 3) if values else 0.0


def pg_statement_pass(url: str, runs: int) -> dict[str, Any]:
    """A few runs through the timed store: statements per write transaction, the audit
    chain's lock timings with no one to contend with."""
    store = _timed_pg_store_class()(url, pool_size=PG_SEQUENTIAL_POOL_SIZE)
    engine = Engine(cast(Store, store), clock=SystemClock())
    engine.register(load_file(WORKFLOW_YAML))
    try:
        for i in range(3):
            engine.start("bench_payment", make_input(i))
        store.stmts = {"start": {}, "commit": {}}
        store.writes = {"start": 0, "commit": 0}
        store.lock_waits, store.lock_holds, store.write_s = [], [], 0.0
        for i in range(runs):
            engine.start("bench_payment", make_input(i))
    finally:
        engine.close()
        store.close()
    out: dict[str, Any] = {"runs": runs}
    total_stmts = 0
    for kind in ("start", "commit"):
        n = store.writes[kind]
        stmts = {k: round(v / n, 2) for k, v in sorted(store.stmts[kind].items())}
        per = sum(store.stmts[kind].values()) / n
        total_stmts += sum(store.stmts[kind].values())
        out[kind] = {
            "per_run": round(n / runs, 2),
            "statements": stmts,
            "statements_per_tx": round(per, 2),
            # psycopg's conn.transaction() sends BEGIN and COMMIT as statements of their own.
            "round_trips_per_tx": round(per + 2, 2),
        }
    writes = sum(store.writes.values())
    out["statements_per_commit"] = round(total_stmts / writes, 2)
    out["round_trips_per_commit"] = round(total_stmts / writes + 2, 2)
    out["write_ms_per_commit"] = round(store.write_s / writes * 1e3, 3)
    out["audit_head_select_ms"] = _mean_ms(store.lock_waits)
    out["audit_lock_hold_ms"] = _mean_ms(store.lock_holds)
    return out


def pg_profile(url: str, runs: int, top: int = 12) -> dict[str, Any]:
    """cProfile ``runs`` sequential runs: top cumulative entries in cloud/ and edge/, and
    the top self-time entries anywhere (where the wall time really goes)."""
    from cloud.store.postgres import PostgresStore

    store = PostgresStore(url, pool_size=PG_SEQUENTIAL_POOL_SIZE)
    engine = Engine(store, clock=SystemClock())
    engine.register(load_file(WORKFLOW_YAML))
    try:
        for i in range(5):
            engine.start("bench_payment", make_input(i))
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        for i in range(runs):
            engine.start("bench_payment", make_input(i))
        profiler.disable()
        wall = time.perf_counter() - t0
    finally:
        engine.close()
        store.close()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    raw_stats = cast(dict[tuple[str, int, str], tuple[int, int, float, float, Any]], stats.stats)  # type: ignore[attr-defined]
    ours = (str(ROOT / "cloud") + os.sep, str(ROOT / "edge") + os.sep)

    def where(file: str, line: int, fn: str) -> str:
        try:
            return f"{Path(file).relative_to(ROOT)}:{line}({fn})"
        except ValueError:
            tail = os.sep.join(Path(file).parts[-2:]) if file.startswith(os.sep) else file
            return f"{tail}:{line}({fn})"

    def entry(key: tuple[str, int, str], nc: int, tt: float, ct: float) -> dict[str, Any]:
        return {
            "function": where(*key),
            "cum_us_per_run": round(ct / runs * 1e6, 1),
            "self_us_per_run": round(tt / runs * 1e6, 1),
            "calls_per_run": round(nc / runs, 2),
        }

    items = [(key, nc, tt, ct) for key, (_cc, nc, tt, ct, _) in raw_stats.items()]
    cumulative = sorted((i for i in items if i[0][0].startswith(ours)), key=lambda i: -i[3])
    by_self = sorted(items, key=lambda i: -i[2])
    return {
        "runs": runs,
        "wall_ms_per_run_profiled": round(wall / runs * 1e3, 3),
        "top_cloud_edge_cumulative": [entry(*i) for i in cumulative[:top]],
        "top_self_anywhere": [entry(*i) for i in by_self[:top]],
    }


def pg_sequential(
    server: PgServer, runs: int, warmup: int, state_json: str, profile: bool
) -> dict[str, Any]:
    from cloud.store.postgres import PostgresStore

    engine_db, engine_url = server.create("seq")
    raw_db, raw_url = server.create("raw")
    try:
        real = PostgresStore(engine_url, pool_size=PG_SEQUENTIAL_POOL_SIZE)
        counted = CountingStore(real)
        engine = Engine(cast(Store, counted), clock=SystemClock())
        engine.register(load_file(WORKFLOW_YAML))
        raw = PgRawBound(raw_url, state_json)
        try:
            result = measure_interleaved(
                "postgresql", engine, counted, real, raw, runs, warmup, PG_WARMUP_RAW_TX
            )
            n = PG_NO_FLUSH_RAW_TX
            result["raw_diagnostics"] = {
                "select_1_round_trip_us": round(raw.round_trip_us(), 1),
                # The raw shape without waiting for the WAL flush: the flush's share.
                "raw_tx_per_s_synchronous_commit_off": round(n / raw.transactions_no_flush(n), 1),
            }
        finally:
            engine.close()
            raw.close()
            real.close()
        result["pool_size"] = PG_SEQUENTIAL_POOL_SIZE
        result["meets_ratio_target"] = result["ratio"] >= TARGET_RATIO_PG
        progress(f"postgresql: statement count ({PG_STATEMENT_PASS_RUNS} runs, timed store)")
        result["per_commit"] = pg_statement_pass(engine_url, PG_STATEMENT_PASS_RUNS)
        if profile:
            n = min(runs, 50)
            progress(f"postgresql: cProfile ({n} runs)")
            result["profile"] = pg_profile(engine_url, n)
    finally:
        server.drop(engine_db)
        server.drop(raw_db)
    return result


def _pg_worker_main(url: str, messages: Any, go: Any, idle_exit_s: float) -> None:
    """One worker process: ``Worker(Engine(PostgresStore(url), PollingExecutor()))``,
    ``run_once`` from "go" until there has been nothing to claim for ``idle_exit_s``."""
    from edge.engine import PollingExecutor, Worker

    try:
        store = _timed_pg_store_class()(url)
    except BaseException as exc:
        messages.put(("error", os.getpid(), f"{type(exc).__name__}: {exc}"))
        raise
    engine = Engine(cast(Store, store), PollingExecutor(), clock=SystemClock())
    try:
        engine.register(load_file(WORKFLOW_YAML))  # as a real worker would: no load later
        worker = Worker(engine)
        messages.put(("ready", os.getpid(), None))
        go.wait()
        c0 = time.process_time()
        t0 = time.perf_counter()
        last_work, last_cpu, last_wall = t0, c0, time.time()
        idle_since: float | None = None
        while True:
            if worker.run_once():
                last_work, last_cpu, last_wall = (
                    time.perf_counter(),
                    time.process_time(),
                    time.time(),
                )
                idle_since = None
                continue
            now = time.perf_counter()
            if idle_since is None:
                idle_since = now
            elif now - idle_since >= idle_exit_s:
                break
            time.sleep(PG_WORKER_IDLE_SLEEP_S)
        stats = {
            "pid": os.getpid(),
            "claimed": worker.stats.claimed,
            "polls": worker.stats.polls,
            "busy_s": last_work - t0,
            "cpu_s": last_cpu - c0,
            # Wall clock when its last run_once with work returned: the parent takes the
            # latest of these as the end (its own polling only knows it to PG_POLL_S).
            "last_work_at": last_wall,
            "commits": store.writes["commit"],
            "write_s": store.write_s,
            "claims": store.claims,
            "claim_s": store.claim_s,
            "empty_claims": store.empty_claims,
            "lock_waits": store.lock_waits,
            "lock_holds": store.lock_holds,
            "stmts": store.stmts["commit"],
        }
        messages.put(("done", os.getpid(), stats))
    except BaseException as exc:
        messages.put(("error", os.getpid(), f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        engine.close()
        store.close()


def _host_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole host, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _wal_syncs(conn: Any) -> int | None:
    """Cluster-wide WAL fsyncs so far (pg_stat_wal, PostgreSQL 14+)."""
    try:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
    except Exception:
        return None
    return None if row is None else int(row[0])


def _activity_key(state: str | None, wait_type: str | None, wait_event: str | None) -> str:
    if state == "active":
        return f"active {wait_type}:{wait_event}" if wait_type else "active (on CPU)"
    if state == "idle in transaction":
        return "idle in transaction (client's turn)"
    return f"{state} (client's turn)"


def pg_workers(server: PgServer, n_workers: int, runs: int) -> dict[str, Any]:
    import multiprocessing

    import psycopg

    from cloud.store.postgres import PostgresStore
    from edge.engine import PollingExecutor
    from edge.engine.worker import DEFAULT_BATCH

    db, url = server.create(f"w{n_workers}")
    procs: list[Any] = []
    try:
        store = PostgresStore(url)
        starter = Engine(store, PollingExecutor(), clock=SystemClock())
        starter.register(load_file(WORKFLOW_YAML))
        inputs = [make_input(i) for i in range(runs)]
        t0 = time.perf_counter()
        for payload in inputs:
            starter.start("bench_payment", payload)
        start_s = time.perf_counter() - t0
        starter.close()
        store.close()

        ctx = multiprocessing.get_context("spawn")
        messages = ctx.Queue()
        go = ctx.Event()
        progress(f"postgresql: {n_workers} worker process(es), {runs} runs started in advance")
        t_spawn = time.perf_counter()
        procs = [
            ctx.Process(
                target=_pg_worker_main,
                args=(url, messages, go, PG_WORKER_IDLE_EXIT_S),
                daemon=True,
                name=f"bench-pg-worker-{i}",
            )
            for i in range(n_workers)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            kind, pid, detail = messages.get(timeout=120)
            if kind != "ready":
                raise RuntimeError(f"bench worker {pid} failed to start: {detail}")
        spawn_s = time.perf_counter() - t_spawn

        with psycopg.connect(url, autocommit=True) as mon:
            count_sql = f"SELECT count(*) FROM workflow_runs WHERE status IN {_IN_FLIGHT}"
            activity_sql = (
                "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
            wal0 = _wal_syncs(mon)
            cpu0 = _host_cpu()
            waits: dict[str, int] = {}
            backend_samples = 0
            polls = 0
            t90: float | None = None
            go.set()
            t_go = time.perf_counter()
            go_at = time.time()
            while True:
                left = int(mon.execute(count_sql).fetchone()[0])  # type: ignore[index]
                now = time.perf_counter()
                if t90 is None and left <= runs // 10:
                    t90 = now
                if left == 0:
                    t_end = now
                    break
                for state, wait_type, wait_event in mon.execute(activity_sql).fetchall():
                    key = _activity_key(state, wait_type, wait_event)
                    waits[key] = waits.get(key, 0) + 1
                    backend_samples += 1
                polls += 1
                if now - t_go > PG_WORKER_TIMEOUT_S:
                    raise RuntimeError(f"{left} runs still in flight after {PG_WORKER_TIMEOUT_S}s")
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError(f"all bench workers exited with {left} runs in flight")
                time.sleep(PG_POLL_S)
            cpu1 = _host_cpu()
            done: list[dict[str, Any]] = []
            for _ in procs:
                kind, pid, detail = messages.get(timeout=60)
                if kind != "done":
                    raise RuntimeError(f"bench worker {pid} failed: {detail}")
                done.append(detail)
            for p in procs:
                p.join(timeout=30)
            wal1 = _wal_syncs(mon)
            statuses = dict(
                mon.execute("SELECT status, count(*) FROM workflow_runs GROUP BY status").fetchall()
            )
        if statuses != {"COMPLETED": runs}:
            raise SystemExit(f"bench runs with {n_workers} workers ended {statuses}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        server.drop(db)

    wall = max(d["last_work_at"] for d in done) - go_at
    commits = sum(d["commits"] for d in done)
    waits_all = [w for d in done for w in d["lock_waits"]]
    holds_all = [h for d in done for h in d["lock_holds"]]
    busy = sum(d["busy_s"] for d in done)
    stmts: dict[str, int] = {}
    for d in done:
        for k, v in d["stmts"].items():
            stmts[k] = stmts.get(k, 0) + v
    hold_mean = sum(holds_all) / len(holds_all) if holds_all else 0.0
    audited_per_run = len(holds_all) / runs
    result: dict[str, Any] = {
        "workers": n_workers,
        "runs": runs,
        "wall_s": round(wall, 3),
        "wall_s_polled": round(t_end - t_go, 3),
        "runs_per_s": round(runs / wall, 1),
        # The first 90% of the runs: without the tail where some workers sit idle while
        # the last claimed batches finish.
        "runs_per_s_first_90pct": round((runs - runs // 10) / ((t90 or t_end) - t_go), 1),
        "runs_per_worker": sorted(d["claimed"] for d in done),
        "claim_batch": DEFAULT_BATCH,
        "step_commits_per_run": round(commits / runs, 3),
        "claims_per_run": round(sum(d["claims"] for d in done) / runs, 3),
        "empty_claim_due_calls": sum(d["empty_claims"] for d in done),
        "statements_per_step_commit": round(sum(stmts.values()) / max(1, commits), 2),
        "commit_ms_mean": round(sum(d["write_s"] for d in done) / max(1, commits) * 1e3, 3),
        "claim_due_ms_mean": round(
            sum(d["claim_s"] for d in done) / max(1, sum(d["claims"] for d in done)) * 1e3, 3
        ),
        # SELECT ... FROM audit_head FOR UPDATE: the row-lock wait plus one round trip.
        "audit_head_select_ms_mean": _mean_ms(waits_all),
        "audit_head_select_ms_p99": _p_ms(waits_all, 99),
        # From holding that lock to COMMIT returned: the chain's serial section.
        "audit_lock_hold_ms_mean": round(hold_mean * 1e3, 3),
        # Share of the workers' busy time spent in that SELECT (mostly waiting for the lock).
        "audit_head_wait_share_of_worker_time": round(sum(waits_all) / busy, 3) if busy else None,
        # If nothing else limited: one audited commit at a time, each holding the lock.
        "audit_lock_bound_runs_per_s": (
            round(1 / hold_mean / audited_per_run, 1) if hold_mean and audited_per_run else None
        ),
        "worker_cpu_ms_per_run": round(sum(d["cpu_s"] for d in done) / runs * 1e3, 3),
        "spawn_to_ready_s": round(spawn_s, 2),
        "start_runs_per_s_in_advance": round(runs / start_s, 1),
    }
    if cpu0 and cpu1 and cpu1[1] > cpu0[1]:
        result["host_cpu_busy_share"] = round((cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1]), 3)
    if wal0 is not None and wal1 is not None and commits:
        # Cluster-wide counter: anything else on the server counts too.
        result["wal_syncs_per_step_commit"] = round((wal1 - wal0) / commits, 3)
    result["pg_stat_activity"] = {
        "polls": polls,
        "backend_samples": backend_samples,
        "lock_wait_share": round(
            sum(v for k, v in waits.items() if k.startswith("active Lock:"))
            / max(1, backend_samples),
            3,
        ),
        "shares": {
            k: round(v / backend_samples, 3)
            for k, v in sorted(waits.items(), key=lambda kv: -kv[1])
            if backend_samples
        },
    }
    return result


def measure_postgresql(
    url: str, runs: int, worker_runs: int, state_json: str, profile: bool
) -> dict[str, Any]:
    try:
        import psycopg
    except ImportError as exc:
        return {"skipped": f"psycopg is not installed ({exc})"}
    from cloud.store.postgres import _redact

    t0 = time.perf_counter()
    try:
        server = PgServer(url)
    except (psycopg.Error, PermissionError) as exc:
        detail = " ".join(str(exc).split())
        reason = f"PostgreSQL not usable at {_redact(url)}: {detail}"
        progress(f"postgresql: skipped: {reason}")
        return {"skipped": reason}
    try:
        out: dict[str, Any] = {"url": _redact(url), **server.describe()}
        out["sequential"] = pg_sequential(server, runs, PG_WARMUP_RUNS, state_json, profile)
        by_count = {str(n): pg_workers(server, n, worker_runs) for n in PG_WORKER_COUNTS}
    finally:
        server.close()
    seq = out["sequential"]
    out["raw_bound_runs_per_s"] = seq["raw_bound_runs_per_s"]
    out["ratio"] = seq["ratio"]
    out["meets_ratio_target"] = seq["meets_ratio_target"]
    one, two = by_count["1"]["runs_per_s"], by_count["2"]["runs_per_s"]
    uncontended = by_count["1"]["audit_head_select_ms_mean"]
    for entry in by_count.values():
        # The SELECT ... FOR UPDATE beyond what it costs with one worker: the lock wait.
        entry["audit_lock_wait_ms_per_commit_est"] = round(
            max(0.0, entry["audit_head_select_ms_mean"] - uncontended), 3
        )
    out["workers"] = {
        # Runs are started before the workers run, so these exclude the start commit.
        "note": "runs started in advance; runs/s from go to none in flight (step commits only)",
        **by_count,
        "scaling_1_to_2": round(two / one, 3),
        "scaling_1_to_4": round(by_count["4"]["runs_per_s"] / one, 3),
    }
    out["scaling_1_to_2"] = out["workers"]["scaling_1_to_2"]
    out["reference"] = PG_REFERENCE
    out["targets"] = PG_TARGETS
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return out


# --- Celery: tillflow cloud worker processes over Redis ------------------------------------

CELERY_DEFAULT_RUNS = 400
CELERY_QUICK_RUNS = 100
CELERY_PROCESS_COUNTS = (1, 2, 4)
#: Rounds of (inline, 1, 2, 4 processes), interleaved so drift hits every figure alike.
CELERY_ROUNDS = 2
CELERY_BROKER_ENV = "TILLFLOW_BENCH_BROKER_URL"
CELERY_READY_TIMEOUT_S = 60.0
CELERY_DRAIN_TIMEOUT_S = 300.0


class PrivateRedis:
    """A ``redis-server`` of the bench's own on a free port (no persistence), so the
    figures see no other traffic and nothing of the machine's Redis is touched."""

    def __init__(self, workdir: Path) -> None:
        import shutil
        import socket
        import subprocess

        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (or pass --broker-url)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        with (workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_for(lambda: _redis_ping(self.url), CELERY_READY_TIMEOUT_S, "redis-server start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _redis_ping(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(PG_POLL_S)


def _in_flight(conn: Any) -> int:
    row = conn.execute(
        f"SELECT count(*) FROM workflow_runs WHERE status IN {_IN_FLIGHT}"
    ).fetchone()
    return int(row[0]) if row else 0


def celery_inline_baseline(server: PgServer, runs: int) -> dict[str, Any]:
    """The baseline: one process, ``Engine(PostgresStore, InlineExecutor)``, one run after
    another (start commit included, as a run started by the API and driven in place)."""
    from cloud.store.postgres import PostgresStore

    db, url = server.create("cinline")
    try:
        store = PostgresStore(url, pool_size=PG_SEQUENTIAL_POOL_SIZE)
        engine = Engine(store, clock=SystemClock())
        engine.register(load_file(WORKFLOW_YAML))
        try:
            for i in range(PG_WARMUP_RUNS):
                engine.start("bench_payment", make_input(i))
            t0 = time.perf_counter()
            ids = [engine.start("bench_payment", make_input(i)) for i in range(runs)]
            wall = time.perf_counter() - t0
            check_completed(store, ids)
        finally:
            engine.close()
            store.close()
    finally:
        server.drop(db)
    return {"runs": runs, "wall_s": round(wall, 3), "runs_per_s": round(runs / wall, 1)}


def celery_workers(
    server: PgServer, broker: str, processes: int, runs: int, workdir: Path
) -> dict[str, Any]:
    """``tillflow cloud worker --concurrency N`` on a fresh database: ``runs`` runs started
    in advance with nothing published, then at "go" one ``advance_run`` message each;
    wall time from go to no run in flight."""
    import subprocess

    import psycopg
    import redis
    import yaml

    from cloud.engine import cloud_engine
    from cloud.executor.celery_app import QUEUE, make_app
    from cloud.executor.executor import CeleryExecutor
    from cloud.settings import load_settings
    from cloud.store.postgres import PostgresStore
    from edge.engine import PollingExecutor

    redis.Redis.from_url(broker).flushdb()
    db, url = server.create(f"celery{processes}")
    config = workdir / f"celery{processes}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": url,
                "broker_url": broker,
                "worker_concurrency": processes,
                "workflow_dirs": [str(WORKFLOW_YAML.parent)],
                "step_modules": ["bench.fixtures.bench_steps"],
                "control_schedules": False,
            }
        ),
        encoding="utf-8",
    )
    settings = load_settings(config, environ={})
    log_path = workdir / f"celery{processes}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = None
    try:
        store = PostgresStore(url, pool_size=2)
        starter = cloud_engine(store, PollingExecutor(), settings=settings)
        warm = [starter.start("bench_payment", make_input(i)) for i in range(4 * processes)]
        ids = [starter.start("bench_payment", make_input(i)) for i in range(runs)]
        starter.close()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge.cli", "cloud", "worker", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        ready = f"worker {proc.pid} ready"
        _wait_for(
            lambda: ready in log_path.read_text(errors="replace") or proc.poll() is not None,
            CELERY_READY_TIMEOUT_S,
            "worker ready",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited: {log_path.read_text(errors='replace')[-2000:]}")
        progress(f"celery: {processes} worker process(es), {runs} runs")
        executor = CeleryExecutor(make_app(settings))
        poll = psycopg.connect(url, autocommit=True)
        # Warm-up: every process makes its engine (store, workflows) on its first task.
        for run_id in warm:
            executor.send(run_id)
        _wait_for(lambda: _in_flight(poll) == runs, CELERY_DRAIN_TIMEOUT_S, "warm-up")
        t0 = time.perf_counter()
        for run_id in ids:
            executor.send(run_id)
        publish_s = time.perf_counter() - t0
        _wait_for(lambda: _in_flight(poll) == 0, CELERY_DRAIN_TIMEOUT_S, "runs drained")
        wall = time.perf_counter() - t0
        poll.close()
        check_completed(store, ids)
        left = redis.Redis.from_url(broker).llen(QUEUE)
        store.close()
    finally:
        if proc is not None and proc.poll() is None:
            import signal

            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        server.drop(db)
    return {
        "processes": processes,
        "runs": runs,
        "publish_s": round(publish_s, 3),
        "wall_s": round(wall, 3),
        "runs_per_s": round(runs / wall, 1),
        "messages_left": left,
    }


def measure_celery(url: str, broker: str | None, runs: int) -> dict[str, Any]:
    """Celery throughput with 1, 2, 4 worker processes against the inline baseline."""
    try:
        import celery  # noqa: F401
        import psycopg
    except ImportError as exc:
        return {"skipped": f"the cloud extra is not installed ({exc})"}
    from cloud.store.postgres import _redact

    t0 = time.perf_counter()
    try:
        server = PgServer(url)
    except (psycopg.Error, PermissionError) as exc:
        return {"skipped": f"PostgreSQL not usable at {_redact(url)}: {exc}"}
    with tempfile.TemporaryDirectory(prefix="tillflow-bench-celery-") as tmp:
        workdir = Path(tmp)
        private = None
        try:
            if broker is None:
                private = PrivateRedis(workdir)
                broker = private.url
            elif not _redis_ping(broker):
                return {"skipped": f"Redis not reachable at {broker}"}
            rounds: list[dict[str, Any]] = []
            for r in range(CELERY_ROUNDS):
                progress(f"celery: round {r + 1}: inline baseline ({runs} runs, one process)")
                entry: dict[str, Any] = {"inline": celery_inline_baseline(server, runs)}
                for n in CELERY_PROCESS_COUNTS:
                    entry[str(n)] = celery_workers(server, broker, n, runs, workdir)
                rounds.append(entry)
            progress(f"celery: inline baseline again ({runs} runs)")
            after = celery_inline_baseline(server, runs)
        finally:
            if private is not None:
                private.close()
            server.close()
    inline = [e["inline"]["runs_per_s"] for e in rounds] + [after["runs_per_s"]]
    baseline = sum(inline) / len(inline)
    by_count: dict[str, Any] = {}
    for n in CELERY_PROCESS_COUNTS:
        rates = [e[str(n)]["runs_per_s"] for e in rounds]
        by_count[str(n)] = {
            "processes": n,
            "runs_per_s": round(sum(rates) / len(rates), 1),
            "runs_per_s_rounds": rates,
            "wall_s_rounds": [e[str(n)]["wall_s"] for e in rounds],
            "messages_left": max(e[str(n)]["messages_left"] for e in rounds),
        }
    one = by_count["1"]["runs_per_s"]
    for entry in by_count.values():
        entry["ratio_to_inline"] = round(entry["runs_per_s"] / baseline, 3)
        entry["scaling_from_1"] = round(entry["runs_per_s"] / one, 3)
    return {
        "note": "runs started in advance, one advance_run message each at go; runs/s from "
        "go to none in flight (after a warm-up of 4 runs per process). Baseline: one "
        "process, inline executor, start included, measured in every round and once after; "
        "their mean is the ratio's denominator",
        "broker": "private redis-server" if private is not None else broker,
        "runs": runs,
        "rounds": CELERY_ROUNDS,
        "inline_runs_per_s_rounds": inline,
        "inline_runs_per_s": round(baseline, 1),
        "processes": by_count,
        "scaling_1_to_2": by_count["2"]["scaling_from_1"],
        "scaling_1_to_4": by_count["4"]["scaling_from_1"],
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "nproc": os.cpu_count(),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }


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
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(PG_URL_ENV, PG_DEFAULT_URL),
        help=f"PostgreSQL server to measure on (default ${PG_URL_ENV} or {PG_DEFAULT_URL}); "
        "a database is created per measurement and dropped",
    )
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL leg")
    parser.add_argument(
        "--no-celery", action="store_true", help="skip the Celery leg (tillflow cloud worker)"
    )
    parser.add_argument(
        "--celery-only", action="store_true", help="only the Celery leg (and its baseline)"
    )
    parser.add_argument(
        "--celery-runs",
        type=int,
        help=f"runs per Celery measurement (default {CELERY_DEFAULT_RUNS}, "
        f"--quick {CELERY_QUICK_RUNS})",
    )
    parser.add_argument(
        "--broker-url",
        default=os.environ.get(CELERY_BROKER_ENV),
        help=f"Redis for the Celery leg (default ${CELERY_BROKER_ENV}, else a private "
        "redis-server on a free port); its database is flushed",
    )
    parser.add_argument(
        "--pg-runs",
        type=int,
        help=f"sequential PostgreSQL runs (default {PG_DEFAULT_RUNS}, --quick {PG_QUICK_RUNS})",
    )
    parser.add_argument(
        "--pg-worker-runs",
        type=int,
        help=f"runs per worker count (default {PG_DEFAULT_WORKER_RUNS}, "
        f"--quick {PG_QUICK_WORKER_RUNS})",
    )
    args = parser.parse_args(argv)
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    if runs < ROUNDS:
        parser.error(f"--runs must be at least {ROUNDS}")
    pg_runs = args.pg_runs or (PG_QUICK_RUNS if args.quick else PG_DEFAULT_RUNS)
    pg_worker_runs = args.pg_worker_runs or (
        PG_QUICK_WORKER_RUNS if args.quick else PG_DEFAULT_WORKER_RUNS
    )
    if pg_runs < ROUNDS:
        parser.error(f"--pg-runs must be at least {ROUNDS}")
    if pg_worker_runs < 10:
        parser.error("--pg-worker-runs must be at least 10")
    warmup = WARMUP_RUNS
    celery_runs = args.celery_runs or (CELERY_QUICK_RUNS if args.quick else CELERY_DEFAULT_RUNS)
    celery_leg = (
        {"skipped": "--no-celery"}
        if args.no_celery
        else measure_celery(args.pg_url, args.broker_url, celery_runs)
    )
    if args.celery_only:
        print(json.dumps({"benchmark": "engine", "celery": celery_leg}, indent=2))
        return 0

    sample = BenchState.model_validate(make_input(0)).model_dump(mode="json")
    state_json = json.dumps(sample, separators=(",", ":"))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tillflow-bench-") as tmp:
        workdir = Path(tmp)
        modes = {m: measure_mode(workdir, m, runs, warmup, state_json) for m in ("FULL", "NORMAL")}
        profile = profile_runs(workdir, min(runs, 100)) if args.profile else None
        env = environment(workdir)
    postgresql = (
        {"skipped": "--no-pg"}
        if args.no_pg
        else measure_postgresql(args.pg_url, pg_runs, pg_worker_runs, state_json, args.profile)
    )
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
        "postgresql": postgresql,
        "celery": celery_leg,
        "env": env,
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
