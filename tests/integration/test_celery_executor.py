"""The Celery executor with real Redis and real ``tillflow cloud worker`` processes.

Every test runs the ``counted`` workflow (``cloud_steps``: four steps, one failing its
first attempt) on worker subprocesses against the test's own database and a Redis
database number (or a private ``redis-server``) of its own, breaks something, and then
reads the effect tables the steps wrote: every step's effect is there (nothing lost),
each once (``calls = 1``), except where a process died between an effect and its commit,
and there the second call carries the same key (recognisable downstream, DESIGN.md
invariant 2). The broker is a wake-up; the database decides (invariant 11).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import cloud_steps
import psycopg
import pytest
import redis
import yaml

from cloud.engine import cloud_engine
from cloud.executor.celery_app import MAX_COUNTDOWN_S, QUEUE, celery_config, make_app
from cloud.executor.executor import CeleryExecutor
from cloud.settings import CloudSettings, load_settings
from cloud.store.postgres import PostgresStore
from edge.engine import Engine, FakeClock, PollingExecutor

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "support"
# Read once at import, before the suite-wide fixture scrubs TILLFLOW_* for each test.
REDIS_URL = os.environ.get("TILLFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379")

#: The workers' sweep: fast, so a lost message is found within seconds.
SWEEP_S = 0.5
#: Effect steps of ``counted`` (``cloud_steps.counted_yaml``), and its calls per run:
#: ``flaky`` is called twice (its first attempt fails).
EFFECT_STEPS = ("first", "pause", "flaky", "last")
CALLS_PER_RUN = 5
#: Bounds on waits; reached only when something is broken.
READY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
POLL_S = 0.05


# --- Redis ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The shared Redis (or a skip, or under CI a failure)."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        reason = f"Redis not reachable at {REDIS_URL} ({exc}); set TILLFLOW_TEST_REDIS_URL"
        if os.environ.get("CI") == "true":
            pytest.fail("under CI=true the Celery tests must run: " + reason)
        pytest.skip(reason)
    return REDIS_URL


@pytest.fixture
def broker(redis_server: str) -> Iterator[str]:
    """A Redis database number of this test's own (taken by SET NX on db 0, so tests in
    parallel sessions do not share one), empty at start, flushed at the end."""
    parts = urlsplit(redis_server)
    admin = redis.Redis.from_url(urlunsplit(parts._replace(path="/0")))
    for n in range(1, 16):
        if admin.set(f"tillflow-test-db:{n}", os.getpid(), nx=True, ex=600):
            url = urlunsplit(parts._replace(path=f"/{n}"))
            redis.Redis.from_url(url).flushdb()
            try:
                yield url
            finally:
                redis.Redis.from_url(url).flushdb()
                admin.delete(f"tillflow-test-db:{n}")
            return
    pytest.fail("no free Redis database number (1-15) for this test")


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port, without persistence: a
    restart loses every message it held, as a crash of an unpersisted broker does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        with (self.root / "redis.log").open("ab") as log:
            self.proc = self._spawn(exe, log)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping()
                return
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(POLL_S)

    def _spawn(self, exe: str, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
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
                str(self.root),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=EXIT_TIMEOUT_S)


# --- the fleet ------------------------------------------------------------------------------


class WorkerProc:
    """One ``tillflow cloud worker`` (its own session, so a kill takes its pool too)."""

    def __init__(self, root: Path, index: int, config: Path, env: dict[str, str]) -> None:
        self.index = index
        self.log_path = root / f"worker{index}.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge.cli", "cloud", "worker", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def ready(self) -> bool:
        return f"worker {self.pid} ready" in self.log()

    def group(self) -> set[int]:
        """The pids of its session: the worker and its pool processes."""
        pids = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == self.pid:
                        pids.add(int(entry.name))
                except OSError:
                    continue
        return pids

    def kill9(self) -> set[int]:
        """SIGKILL the worker and its pool at once; the pids it had."""
        pids = self.group()
        os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=EXIT_TIMEOUT_S)
        return pids

    def stop(self) -> None:
        """SIGTERM: Celery's warm shutdown; it exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=EXIT_TIMEOUT_S)
        assert self.proc.returncode == 0, self.log()

    def close(self) -> None:
        """SIGKILL whatever of its session is left (pool processes too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=EXIT_TIMEOUT_S)


@dataclass
class Rig:
    db: str
    broker: str
    root: Path
    procs: list[WorkerProc] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def settings(self, **extra: Any) -> CloudSettings:
        data = {
            "database_url": self.db,
            "broker_url": self.broker,
            "sweep_interval_s": SWEEP_S,
            "workflow_dirs": [str(self.root / "workflows")],
            "step_modules": ["cloud_steps"],
            "control_schedules": False,  # only this test's runs
            **extra,
        }
        path = self.root / "cloud.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return load_settings(path, environ={})

    def start_workers(
        self,
        n: int,
        *,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        sweep_s: float = SWEEP_S,
    ) -> list[WorkerProc]:
        self.settings(worker_concurrency=concurrency, sweep_interval_s=sweep_s)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TILLFLOW_", "CLOUD_"))}
        base["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(REPO)])
        base[cloud_steps.DB_ENV] = self.db
        base.update(env or {})
        started = []
        for _ in range(n):
            started.append(WorkerProc(self.root, len(self.procs), self.root / "cloud.yaml", base))
            self.procs.append(started[-1])
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(p.ready() for p in started):
            self.check_alive()
            assert time.monotonic() < deadline, "workers not ready:\n" + self.logs()
            time.sleep(POLL_S)
        return started

    def check_alive(self) -> None:
        for p in self.procs:
            code = p.proc.poll()
            if code is not None and code != -signal.SIGKILL:
                raise AssertionError(f"worker {p.pid} exited {code}:\n{p.log()}")

    def logs(self, tail: int | None = 4000) -> str:
        """Every worker's log (the last ``tail`` characters of each; None: all)."""
        return "\n".join(
            f"--- worker {p.index} ({p.pid})\n{p.log()[-tail if tail else 0 :]}" for p in self.procs
        )

    def engine(self, executor: Any = None) -> Engine:
        """A submitter's engine (as the API's): the cloud's, publishing to the broker."""
        settings = self.settings()
        store = PostgresStore(self.db, pool_size=2)
        if executor is None:
            executor = CeleryExecutor(make_app(settings))
        eng = cloud_engine(store, executor, settings=settings)
        self.closers += [eng.close, store.close]
        return eng

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db, autocommit=True) as conn:
            return conn.execute(query.encode(), params).fetchall()

    def statuses(self) -> Counter[str]:
        rows = self.sql("SELECT status, count(*) FROM workflow_runs GROUP BY 1")
        return Counter({s: n for s, n in rows})

    def wait(self, what: str, done: Callable[[], bool], timeout: float = DRAIN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.check_alive()
            assert time.monotonic() < deadline, (
                f"{what}: not in {timeout}s; runs {dict(self.statuses())}\n{self.logs()}"
            )
            time.sleep(POLL_S)

    def wait_completed(self, n: int, timeout: float = DRAIN_TIMEOUT_S) -> None:
        def done() -> bool:
            s = self.statuses()
            bad = {k: v for k, v in s.items() if k not in ("RUNNING", "COMPLETED")}
            assert not bad, f"runs ended badly: {bad}\n{self.logs()}"
            return s["COMPLETED"] == n

        self.wait(f"{n} runs completed", done, timeout)

    def effects(self) -> dict[tuple[str, str], int]:
        return {(r, s): c for r, s, c in self.sql("SELECT run_id, step, calls FROM step_effects")}

    def calls(self) -> list[tuple[str, str, int, str, int, bool]]:
        return [
            (r, s, a, k, p, rp)
            for r, s, a, k, p, rp in self.sql(
                "SELECT run_id, step, attempt, idempotency_key, pid, replay FROM step_calls"
                " ORDER BY id"
            )
        ]


@pytest.fixture
def rig(pg_url: str, broker: str, tmp_path: Path) -> Iterator[Rig]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(cloud_steps.effects_ddl().encode())
    wf = tmp_path / "workflows"
    wf.mkdir()
    (wf / "counted.yaml").write_text(cloud_steps.counted_yaml(), encoding="utf-8")
    (wf / "ticker.yaml").write_text(cloud_steps.ticker_yaml(), encoding="utf-8")
    r = Rig(pg_url, broker, tmp_path)
    try:
        yield r
    finally:
        for p in r.procs:
            p.close()
        for close in reversed(r.closers):
            close()


def _start(engine: Engine, n: int) -> list[str]:
    return [engine.start("counted", {"i": i}) for i in range(n)]


def _assert_each_effect_once(rig: Rig, run_ids: list[str]) -> None:
    """Every run completed, every effect step's effect there once, and no step called
    more than its attempts (the flaky step twice, every other once)."""
    effects = rig.effects()
    expected = {(r, s) for r in run_ids for s in EFFECT_STEPS}
    assert set(effects) == expected
    assert {k: c for k, c in effects.items() if c != 1} == {}
    per_run = Counter(r for r, *_ in rig.calls())
    assert per_run == dict.fromkeys(run_ids, CALLS_PER_RUN)


# --- the tests ------------------------------------------------------------------------------


def test_settings__durable_and_no_countdown_past_the_visibility_timeout() -> None:
    conf = celery_config(CloudSettings(broker_url="redis://127.0.0.1:1/0"))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["result_backend"] is None
    timeout = conf["broker_transport_options"]["visibility_timeout"]
    assert timeout >= MAX_COUNTDOWN_S * 4


def test_submit__a_short_wait_is_a_countdown_a_long_one_is_left_to_the_sweep(
    broker: str,
) -> None:
    app = make_app(CloudSettings(broker_url=broker))
    executor = CeleryExecutor(app)
    executor.bind(cast(Any, SimpleNamespace(clock=FakeClock(1000.0))))
    executor.submit("run-now")
    executor.submit("run-soon", 1000.0 + 30)
    executor.submit("run-later", 1000.0 + MAX_COUNTDOWN_S + 1)
    queued = [json.loads(m) for m in redis.Redis.from_url(broker).lrange(QUEUE, 0, -1)]
    by_run = {m["headers"]["argsrepr"]: m["headers"] for m in queued}
    assert set(by_run) == {"('run-now',)", "('run-soon',)"}
    assert by_run["('run-now',)"]["eta"] is None
    assert by_run["('run-soon',)"]["eta"] is not None
    assert (executor.sent, executor.left_to_sweep) == (2, 1)


def test_pool_process_killed_mid_step__its_message_is_requeued_and_taken_over(
    rig: Rig,
) -> None:
    # One worker, its sweep once a minute: only the rejected message can bring the run
    # back within the test (task_acks_late + task_reject_on_worker_lost).
    block = {cloud_steps.BLOCK_ENV: "pause"}
    [worker] = rig.start_workers(1, env=block, sweep_s=60.0)
    engine = rig.engine()
    [run_id] = _start(engine, 1)
    rig.wait("the step hangs", lambda: bool(rig.sql("SELECT 1 FROM blocked")))
    [(pid,)] = rig.sql("SELECT pid FROM blocked")
    assert pid != worker.pid  # a pool process, not the worker's main process
    os.kill(pid, signal.SIGKILL)
    rig.wait_completed(1, timeout=45.0)
    effects = rig.effects()
    assert effects.pop((run_id, "pause")) == 2
    assert set(effects.values()) == {1}
    pause = [c for c in rig.calls() if c[1] == "pause"]
    assert [c[4] == pid for c in pause] == [True, False]
    assert pause[1][5] and pause[0][3] == pause[1][3]  # a replay, the same key
    assert "submitted run" not in worker.log()  # not the sweep: the requeued message


def test_runs_on_two_workers__every_effect_once(rig: Rig) -> None:
    workers = rig.start_workers(2)
    engine = rig.engine()
    run_ids = _start(engine, 30)
    rig.wait_completed(30)
    _assert_each_effect_once(rig, run_ids)
    pids = {p for *_, p, _ in rig.calls()}
    assert len(pids) >= 2, "both workers should have served runs"
    for w in workers:
        w.stop()
    # Warm shutdown, and nothing left in the broker that a run still needed.
    assert rig.statuses() == {"COMPLETED": 30}


def test_duplicated_messages__change_nothing(rig: Rig) -> None:
    rig.start_workers(2)
    engine = rig.engine()
    executor = engine.executor
    assert isinstance(executor, CeleryExecutor)
    run_ids = _start(engine, 20)
    for _ in range(3):  # each run's message three more times while the runs are in flight
        for run_id in run_ids:
            assert executor.send(run_id)
    rig.wait_completed(20)
    for run_id in run_ids:  # and again once they finished
        assert executor.send(run_id)
    queue = redis.Redis.from_url(rig.broker)
    rig.wait("the duplicates consumed", lambda: queue.llen(QUEUE) == 0)
    rig.wait("the last ones acknowledged", lambda: queue.hlen("unacked") == 0)
    _assert_each_effect_once(rig, run_ids)
    assert all(not replay for *_, replay in rig.calls())


def test_lost_messages__the_sweep_submits_the_runs(rig: Rig) -> None:
    # Runs started by an engine that publishes nothing: every message is lost.
    engine = rig.engine(PollingExecutor())
    run_ids = _start(engine, 10)
    started = time.monotonic()
    rig.start_workers(1)
    rig.wait_completed(10)
    waited = time.monotonic() - started
    _assert_each_effect_once(rig, run_ids)
    log = rig.procs[0].log()
    submitted = set(re.findall(r"submitted run (\w+) \(RUNNING, lease free\)", log))
    assert submitted == set(run_ids), log
    # Found as lost only after being untouched for six sweeps, not at once.
    assert waited >= 6 * SWEEP_S


def test_worker_killed_mid_step__the_other_finishes_the_run(rig: Rig) -> None:
    # The first `pause` call anywhere hangs after its effect, before its commit.
    block = {cloud_steps.BLOCK_ENV: "pause"}
    victim, survivor = rig.start_workers(2, env=block)
    engine = rig.engine()
    run_ids = _start(engine, 20)
    rig.wait("a step hangs", lambda: bool(rig.sql("SELECT 1 FROM blocked")))
    [(hung_run, hung_pid)] = rig.sql("SELECT run_id, pid FROM blocked")
    holder = victim if hung_pid in victim.group() else survivor
    other = survivor if holder is victim else victim
    killed = holder.kill9()
    rig.wait_completed(20)
    effects = rig.effects()
    assert set(effects) == {(r, s) for r in run_ids for s in EFFECT_STEPS}
    calls = rig.calls()
    twice = {k: c for k, c in effects.items() if c != 1}
    # The hung step was done twice: in the killed process, then as a replay elsewhere
    # with the same key. So is any other step the killed process was in (its timers').
    assert (hung_run, "pause") in twice
    for (run_id, step), count in twice.items():
        assert count == 2
        made = [c for c in calls if c[0] == run_id and c[1] == step]
        first, second = made[-2], made[-1]
        assert first[4] in killed and second[4] not in killed
        assert second[5], "the second call is flagged a replay (StepContext.replay)"
        assert first[3] == second[3], "the replay carries the same idempotency key"
    print(f"kill -9 tally: {len(killed)} processes killed, {len(twice)} step(s) replayed")
    # The hung run finished on the other worker, from its last commit.
    finishing = [c for c in calls if c[0] == hung_run and c[1] == "last"]
    assert [c[4] for c in finishing][-1] in other.group()
    assert f"submitted run {hung_run}" in other.log()


def test_redis_restarted_mid_run__nothing_lost_nothing_twice(rig: Rig, tmp_path: Path) -> None:
    private = PrivateRedis(tmp_path)
    private.start()
    rig.closers.append(private.kill)
    rig.broker = private.url
    rig.start_workers(2)
    engine = rig.engine()
    run_ids = _start(engine, 30)
    rig.wait("runs under way", lambda: len(rig.effects()) >= 10)
    private.kill()  # every queued and unacknowledged message is gone with it
    in_flight = rig.statuses()["RUNNING"]
    assert in_flight > 0
    private.start()
    rig.wait_completed(30)
    _assert_each_effect_once(rig, run_ids)
    logs = rig.logs(tail=None)
    print(
        f"redis restart tally: {in_flight} runs in flight at the kill, "
        f"{logs.count('submitted run')} re-submitted by the sweep"
    )
    assert "Connection to broker lost" in logs
    assert "submitted run" in logs, "the sweep should have resubmitted the lost runs"


def test_postgres_restarted_mid_run__every_effect_there_duplicates_keyed(rig: Rig) -> None:
    rig.start_workers(2)
    engine = rig.engine()
    run_ids = _start(engine, 30)
    rig.wait("runs under way", lambda: len(rig.effects()) >= 10)
    name = rig.db.rsplit("/", 1)[1]
    admin = urlunsplit(urlsplit(rig.db)._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'.encode())
        conn.execute(
            b"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        # Away long enough that the store's own retries (~3 s) give up in the workers.
        down_until = time.monotonic() + 5.0
        while time.monotonic() < down_until:
            conn.execute(
                b"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            time.sleep(0.2)
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'.encode())
    rig.wait_completed(30)
    effects = rig.effects()
    assert set(effects) == {(r, s) for r in run_ids for s in EFFECT_STEPS}
    calls = rig.calls()
    for (run_id, step), count in effects.items():
        assert count <= 2
        if count == 2:  # its effect landed, its commit did not: run again, same attempt
            made = [c for c in calls if c[0] == run_id and c[1] == step]
            assert made[-1][3] == made[-2][3], "the retry carries the same idempotency key"
    logs = rig.logs(tail=None)
    twice = sum(c == 2 for c in effects.values())
    print(
        f"postgres restart tally: {len(effects)} effects, {twice} done twice with the same "
        f"key, {logs.count('not advanced')} tasks failed, {logs.count('trying again')} retries"
    )
    assert "not advanced" in logs or "trying again" in logs, "the workers saw it away"


def test_schedule__two_workers_start_each_slot_once(rig: Rig) -> None:
    every = {cloud_steps.SCHEDULE_ENV: "1"}
    a, b = rig.start_workers(2, env=every)

    def ticks() -> list[tuple[Any, ...]]:
        return rig.sql(
            "SELECT idempotency_key, status FROM workflow_runs WHERE workflow_type = 'ticker'"
        )

    rig.wait("four ticker runs completed", lambda: sum(s == "COMPLETED" for _, s in ticks()) >= 4)
    a.stop()
    b.stop()
    slots = sorted(int(k.rsplit(":", 1)[1]) for k, _ in ticks())
    assert slots == list(range(slots[0], slots[0] + len(slots))), "one run per slot, no gap"
    # Both sweeps went for the same slots and got the same run.
    seen_a = dict(re.findall(r"schedule ticker slot (\d+): run (\w+)", a.log()))
    seen_b = dict(re.findall(r"schedule ticker slot (\d+): run (\w+)", b.log()))
    common = set(seen_a) & set(seen_b)
    assert len(common) >= 3
    assert all(seen_a[s] == seen_b[s] for s in common)
    # Each completed tick did its effect once (the last slot's may still be queued).
    completed = sum(st == "COMPLETED" for _, st in ticks())
    effects = rig.effects()
    assert sorted(c for (_, step), c in effects.items() if step == "tick") == [1] * completed
