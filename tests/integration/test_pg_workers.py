"""Many worker processes on one PostgreSQL database: every run is advanced, none twice.

The test process starts runs through ``PollingExecutor`` (nothing leased), and four
``tillflow worker`` processes claim and advance them. Every step execution is written,
with its idempotency key and the worker's pid, to a ``ledger`` table in the same
database, the way a downstream system would see it; the ledger is what proves that no
step ran twice (or, after a SIGKILL, ran twice only as a replay with the same key).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cloud.store.postgres import PostgresStore
from edge.engine import Engine, PollingExecutor, Status, load_text

REPO = Path(__file__).resolve().parents[2]
STEPS_MODULE = "pg_ledger_steps"
#: Set only in the worker that is to hang: it blocks in its Nth step execution, after
#: the ledger saw the effect and before the engine committed the outcome.
BLOCK_AFTER_ENV = "TILLFLOW_IT_BLOCK_AFTER"

RUNS = 500
WORKERS = 4
#: Runs a worker claims per poll (the CLI's default, passed explicitly).
BATCH = 8
ACTION_STEPS = ("reserve", "charge", "record_sale")
EXPECTED_HISTORY = [
    ("reserve", "step", "COMPLETED"),
    ("route", "decision", "COMPLETED"),
    ("charge", "step", "COMPLETED"),
    ("record_sale", "step", "COMPLETED"),
]

#: Bounds on waits for the worker processes; reached only when something is broken.
READY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 60.0  # a bound, not a clock: a loaded 2-core CI box can be slow
POLL_S = 0.1

WORKFLOW_YAML = f"""\
workflow_type: ledger_sale
version: 1
steps:
  - name: reserve
    type: STANDARD
    function: {STEPS_MODULE}:reserve
  - name: route
    type: DECISION
    routes:
      - when: state.amount <= 0
        next: END
    default: charge
  - name: charge
    type: STANDARD
    function: {STEPS_MODULE}:charge
  - name: record_sale
    type: STANDARD
    function: {STEPS_MODULE}:record_sale
"""

STEPS_SOURCE = '''\
"""Steps of the worker tests: each execution is recorded before the step returns."""

import os
import threading

import psycopg

LEDGER_URL = {url!r}
BLOCK_AFTER = int(os.environ.get({env!r}, "0"))
_conn = None
_executions = 0


def _record(ctx):
    global _conn, _executions
    if _conn is None:
        _conn = psycopg.connect(LEDGER_URL, autocommit=True)
    row = (ctx.run_id, ctx.step, ctx.idempotency_key, ctx.attempt, os.getpid())
    _conn.execute(
        "INSERT INTO ledger (run_id, step, key, attempt, pid) VALUES (%s, %s, %s, %s, %s)", row
    )
    _executions += 1
    if _executions == BLOCK_AFTER:
        _conn.execute(
            "INSERT INTO blocked (run_id, step, key, pid) VALUES (%s, %s, %s, %s)",
            (ctx.run_id, ctx.step, ctx.idempotency_key, os.getpid()),
        )
        threading.Event().wait()  # hang with the effect done and the outcome uncommitted


def reserve(state, ctx):
    _record(ctx)
    return {{"reserved": state["amount"]}}


def charge(state, ctx):
    _record(ctx)
    return {{"charged": state["amount"]}}


def record_sale(state, ctx):
    _record(ctx)
    return {{"recorded": True}}
'''

LEDGER_DDL = """
CREATE TABLE ledger (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id  text NOT NULL,
    step    text NOT NULL,
    key     text NOT NULL,
    attempt integer NOT NULL,
    pid     integer NOT NULL
);
CREATE TABLE blocked (run_id text NOT NULL, step text NOT NULL, key text NOT NULL,
    pid integer NOT NULL);
"""


class WorkerProc:
    """One ``tillflow worker`` process; its stderr and stdout go to files in tmp_path."""

    def __init__(self, root: Path, index: int, url: str, env: dict[str, str]) -> None:
        self.stderr_path = root / f"worker{index}.stderr"
        self.stdout_path = root / f"worker{index}.stdout"
        with self.stderr_path.open("wb") as err, self.stdout_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edge.cli",
                    "worker",
                    "--json",
                    "--database-url",
                    url,
                    "--path",
                    str(root),
                    "--batch",
                    str(BATCH),
                    "--poll-s",
                    "0.05",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=root,
                env=env,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def ready(self) -> bool:
        """It prints its 'polling' line once its signal handlers are installed."""
        return "polling" in self.stderr()

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = json.loads(self.stdout_path.read_text(encoding="utf-8"))
        return stats

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=EXIT_TIMEOUT_S)


@dataclass
class Fleet:
    url: str
    root: Path
    procs: list[WorkerProc] = field(default_factory=list)

    def start(self, n: int, *, block_after: int | None = None) -> list[WorkerProc]:
        base = {k: v for k, v in os.environ.items() if k != BLOCK_AFTER_ENV}
        base["PYTHONPATH"] = os.pathsep.join([str(self.root), str(REPO)])
        started = []
        for i in range(n):
            env = dict(base)
            if block_after is not None and i == 0:
                env[BLOCK_AFTER_ENV] = str(block_after)
            started.append(WorkerProc(self.root, len(self.procs), self.url, env))
            self.procs.append(started[-1])
        return started

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(p.ready() for p in self.procs):
            self.check_alive()
            assert time.monotonic() < deadline, "workers did not start polling in time"
            time.sleep(POLL_S)

    def check_alive(self, *, except_pid: int | None = None) -> None:
        for p in self.procs:
            if p.pid != except_pid and p.proc.poll() is not None:
                raise AssertionError(
                    f"worker {p.pid} exited {p.proc.returncode}; stderr:\n{p.stderr()}"
                )

    def stop(self, procs: list[WorkerProc]) -> None:
        """SIGTERM: each worker finishes the run in hand, then exits 0."""
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.proc.wait(timeout=EXIT_TIMEOUT_S)
            assert p.proc.returncode == 0, p.stderr()


@pytest.fixture
def fleet(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    """The ledger tables, the steps module (importable here too, to register the
    workflow) and the worker processes, every one killed at teardown."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(LEDGER_DDL.encode())
    source = STEPS_SOURCE.format(url=pg_url, env=BLOCK_AFTER_ENV)
    (tmp_path / f"{STEPS_MODULE}.py").write_text(source, encoding="utf-8")
    sys.modules.pop(STEPS_MODULE, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    f = Fleet(pg_url, tmp_path)
    try:
        yield f
    finally:
        for p in f.procs:
            p.close()
        sys.modules.pop(STEPS_MODULE, None)


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    store = PostgresStore(pg_url, pool_size=2)
    eng = Engine(store, PollingExecutor())
    eng.register(load_text(WORKFLOW_YAML, source="ledger_sale.yaml"))
    try:
        yield eng
    finally:
        eng.close()
        store.close()


def _query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def _statuses(url: str) -> Counter[str]:
    return Counter(
        {s: n for s, n in _query(url, "SELECT status, count(*) FROM workflow_runs GROUP BY 1")}
    )


def _start(engine: Engine, i: int) -> str:
    return engine.start("ledger_sale", {"amount": 100 + i})


def _leased_to(url: str, pid: int) -> dict[str, float]:
    """``{run_id: lease_expires_at}`` of the unfinished runs leased to worker ``pid``."""
    rows = _query(
        url,
        "SELECT run_id, lease_expires_at FROM workflow_runs "
        "WHERE status = 'RUNNING' AND lease_owner LIKE %s",
        (f"%:{pid}:%",),
    )
    return dict(rows)


@dataclass
class Hang:
    """Where the victim hung, and what it held, when it was killed."""

    run_id: str
    step: str
    key: str
    pid: int
    orphans: dict[str, float]  # {run_id: lease_expires_at} it held
    completed: int  # runs COMPLETED at the kill


def _kill_if_hung(fleet: Fleet, victim: WorkerProc) -> Hang | None:
    """If the victim hangs in its step, note what it holds and SIGKILL it."""
    rows = _query(fleet.url, "SELECT run_id, step, key, pid FROM blocked")
    if not rows:
        return None
    orphans = _leased_to(fleet.url, victim.pid)  # fixed: it is stuck in a step
    os.kill(victim.pid, signal.SIGKILL)
    [(run_id, step, key, pid)] = rows
    return Hang(run_id, step, key, pid, orphans, _statuses(fleet.url)["COMPLETED"])


def _wait_all_completed(fleet: Fleet, *, except_pid: int | None = None) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        statuses = _statuses(fleet.url)
        if statuses["COMPLETED"] == RUNS:
            return
        unhappy = {s: n for s, n in statuses.items() if s not in ("RUNNING", "COMPLETED")}
        assert not unhappy, f"runs ended badly: {unhappy}"
        fleet.check_alive(except_pid=except_pid)
        assert time.monotonic() < deadline, f"not all runs completed in time: {dict(statuses)}"
        time.sleep(POLL_S)


def _ledger(url: str) -> dict[tuple[str, str], list[tuple[str, int]]]:
    """``{(run_id, step): [(key, pid), ...]}`` in execution order."""
    out: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for run_id, step, key, pid in _query(
        url, "SELECT run_id, step, key, pid FROM ledger ORDER BY id"
    ):
        out.setdefault((run_id, step), []).append((key, pid))
    return out


def _assert_runs_sound(engine: Engine, run_ids: list[str]) -> None:
    """Every run COMPLETED, lease released, one history row per step, audit chain ok."""
    assert _statuses(engine.store.url) == Counter({"COMPLETED": RUNS})  # type: ignore[attr-defined]
    for run_id in run_ids:
        run = engine.get(run_id)
        assert run.status is Status.COMPLETED and run.lease_owner is None
        assert run.state["recorded"] is True and run.state["charged"] == run.input["amount"]
        history = [(s.step, s.kind, s.status) for s in engine.store.step_history(run_id)]
        assert history == EXPECTED_HISTORY, (run_id, history)
    report = engine.verify_audit()
    assert report.ok, str(report)
    events = Counter(row.event for row in engine.store.audit_rows())
    assert events["run_started"] == RUNS
    assert events["step_completed"] == RUNS * len(ACTION_STEPS)
    assert events["run_completed"] == RUNS


def test_workers__four_processes_complete_every_run_executing_each_step_once(
    fleet: Fleet, engine: Engine
) -> None:
    workers = fleet.start(WORKERS)
    fleet.wait_ready()
    run_ids = [_start(engine, i) for i in range(RUNS)]
    assert len(set(run_ids)) == RUNS

    _wait_all_completed(fleet)

    _assert_runs_sound(engine, run_ids)
    ledger = _ledger(fleet.url)
    assert set(ledger) == {(r, s) for r in run_ids for s in ACTION_STEPS}
    twice = {k: v for k, v in ledger.items() if len(v) != 1}
    assert not twice, f"steps executed more than once: {twice}"
    keys = [key for ((key, _),) in ledger.values()]
    assert len(set(keys)) == len(keys)  # one idempotency key per (run, step)
    pids = Counter(pid for ((_, pid),) in ledger.values())
    assert set(pids) <= {w.pid for w in workers}  # the test process never ran a step
    assert len(pids) >= 2, f"only {pids} did work"
    by_run: dict[str, set[int]] = {}
    for (run_id, _), [(_, pid)] in ledger.items():
        by_run.setdefault(run_id, set()).add(pid)
    handed_over = {r: p for r, p in by_run.items() if len(p) != 1}
    assert not handed_over, f"runs advanced by two workers with nobody dead: {handed_over}"

    fleet.stop(workers)
    stats = [w.stats() for w in workers]  # each printed its stats on the way out
    # Every run was claimed exactly once, by claim_due; nobody died, so none was recovered.
    assert sum(s["claimed"] for s in stats) == RUNS, stats
    assert sum(s["recovered"] for s in stats) == 0, stats


def test_workers__survivors_finish_the_runs_of_a_worker_killed_mid_step(
    fleet: Fleet, engine: Engine
) -> None:
    victim, *survivors = fleet.start(WORKERS, block_after=40)
    fleet.wait_ready()
    run_ids: list[str] = []
    hang = None
    for i in range(RUNS):  # keep starting runs; kill the victim as soon as it hangs
        run_ids.append(_start(engine, i))
        if hang is None and i % 10 == 0:
            hang = _kill_if_hung(fleet, victim)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while hang is None:
        fleet.check_alive()
        assert time.monotonic() < deadline, "the victim never reached its blocking step"
        time.sleep(POLL_S)
        hang = _kill_if_hung(fleet, victim)
    victim.proc.wait(timeout=EXIT_TIMEOUT_S)  # reaped: a zombie would still look alive
    assert victim.proc.returncode == -signal.SIGKILL
    assert hang.pid == victim.pid
    assert hang.completed < RUNS // 2, f"the kill came late: {hang.completed} completed"
    # The dead worker's lease on the run it hung in is still valid by the clock.
    assert hang.orphans[hang.run_id] > time.time()

    _wait_all_completed(fleet, except_pid=victim.pid)

    _assert_runs_sound(engine, run_ids)
    for run_id, lease_expires_at in hang.orphans.items():
        # Taken over because its owner died, not because the lease ran out.
        assert engine.get(run_id).updated_at < lease_expires_at, run_id
    ledger = _ledger(fleet.url)
    assert set(ledger) == {(r, s) for r in run_ids for s in ACTION_STEPS}
    for (run_id, step), executions in ledger.items():
        assert len({key for key, _ in executions}) == 1, (run_id, step, executions)
        assert len(executions) <= 2, (run_id, step, executions)
    twice = {k: v for k, v in ledger.items() if len(v) > 1}
    # Only the step in flight at the kill ran again, as a replay with the same key.
    assert set(twice) == {(hang.run_id, hang.step)}, twice
    [(first_key, first_pid), (replay_key, replay_pid)] = twice[(hang.run_id, hang.step)]
    assert first_key == replay_key == hang.key
    assert first_pid == victim.pid and replay_pid in {w.pid for w in survivors}

    fleet.stop(survivors)


def test_workers__a_worker_starting_against_a_backlog_leases_one_batch_not_all(
    fleet: Fleet, engine: Engine
) -> None:
    run_ids = [_start(engine, i) for i in range(RUNS)]  # a backlog before any worker runs
    [first] = fleet.start(1)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not _query(fleet.url, "SELECT 1 FROM ledger WHERE pid = %s", (first.pid,)):
        fleet.check_alive()
        assert time.monotonic() < deadline, "the first worker never ran a step"
        time.sleep(POLL_S)
    held = len(_leased_to(fleet.url, first.pid))
    assert held <= BATCH, f"one worker holds {held} runs others could take"

    others = fleet.start(WORKERS - 1)
    _wait_all_completed(fleet)
    _assert_runs_sound(engine, run_ids)
    pids = Counter(pid for executions in _ledger(fleet.url).values() for _, pid in executions)
    assert len(pids) >= 2, f"only {pids} did work"
    fleet.stop([first, *others])
