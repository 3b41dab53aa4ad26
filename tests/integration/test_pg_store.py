"""The PostgreSQL store under the failures a cloud worker meets: dropped connections, a
COMMIT whose outcome the client never heard, transient errors, concurrent claimers,
dead workers. Faults are injected through the store's ``fault`` and ``sleep`` seams.
"""

from __future__ import annotations

import itertools
import logging
import socket
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import psycopg.errors
import pytest
import tf_steps

from cloud.store.postgres import PostgresStore
from edge.engine import Engine, FakeClock, InlineExecutor, PollingExecutor, Status, Worker
from edge.engine.loader import load_text
from edge.engine.records import Commit
from edge.errors import LeaseLost, StoreError

PAY_YAML = """\
workflow_type: pg_pay
version: 1
steps:
  - name: reserve
    type: STANDARD
    function: tf_steps:add
  - name: charge
    type: STANDARD
    function: tf_steps:emit_sale
  - name: record_sale
    type: STANDARD
    function: tf_steps:noop
"""
SPAWN_YAML = """\
workflow_type: pg_spawn
version: 1
steps:
  - name: reserve
    type: STANDARD
    function: tf_steps:add
  - {name: notify, type: FIRE_AND_FORGET, workflow: pg_pay, output_key: child_id}
  - name: record_sale
    type: STANDARD
    function: tf_steps:noop
"""
HISTORY = [
    ("reserve", "step", "COMPLETED"),
    ("charge", "step", "COMPLETED"),
    ("record_sale", "step", "COMPLETED"),
]
RUN_EVENTS = ["run_started", "step_completed", "step_completed", "step_completed", "run_completed"]
#: Bound on waiting for the server to finish terminating backends.
TERMINATE_TIMEOUT_S = 10.0


def connection_lost() -> BaseException:
    return psycopg.OperationalError("connection lost")


class Fault:
    """The store's ``fault`` seam: raises at a point when armed, in the arming thread only
    (the heartbeat thread's writes are not the ones under test). ``calls`` counts the
    writes that reached each point since the last ``arm``."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fired: list[str] = []
        self._armed: list[tuple[str, Callable[[], BaseException]]] = []
        self._thread = threading.get_ident()

    def arm(
        self, point: str, *, times: int = 1, error: Callable[[], BaseException] = connection_lost
    ) -> None:
        self._armed += [(point, error)] * times
        self.calls.clear()

    def __call__(self, point: str) -> None:
        if threading.get_ident() != self._thread:
            return
        self.calls[point] += 1
        if self._armed and self._armed[0][0] == point:
            _, error = self._armed.pop(0)
            self.fired.append(point)
            raise error()


class StepFaultStore(PostgresStore):
    """Arms its fault for the first commit that records step ``fault_step``'s outcome
    (once: a child run may have a step of the same name)."""

    def __init__(self, url: str, *, fault: Fault, fault_step: str, point: str, **kw: Any) -> None:
        super().__init__(url, fault=fault, **kw)
        self.test_fault = fault
        self.fault_step: str | None = fault_step
        self.point = point

    def commit(self, commit: Commit) -> None:
        if any(s.step == self.fault_step and s.kind == "step" for s in commit.steps):
            self.test_fault.arm(self.point)
            self.fault_step = None
        super().commit(commit)


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Closes engines and stores when the test ends (engines first)."""
    opened: list[Any] = []

    def close_later(thing: Any) -> Any:
        opened.append(thing)
        return thing

    yield close_later
    for thing in sorted(opened, key=lambda t: not isinstance(t, Engine)):
        thing.close()


def _engine(store: PostgresStore, executor: Any, clock: FakeClock, closing: Any) -> Engine:
    engine = closing(Engine(store, executor, clock=clock))
    engine.register(load_text(PAY_YAML, source="pg_pay.yaml"))
    engine.register(load_text(SPAWN_YAML, source="pg_spawn.yaml"))
    return engine


def _scalar(url: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
        assert row is not None
        return row[0]


def _others(url: str) -> set[int]:
    """Backend pids of every other connection to this test's database (the store's)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return {pid for (pid,) in rows}


def _terminate_store_connections(url: str) -> set[int]:
    """Kill the store's backends, as a failover or an admin would, and wait until gone."""
    victims = _others(url)
    assert victims, "the store holds no connection to lose"
    with psycopg.connect(url, autocommit=True) as conn:
        # With a timeout, pg_terminate_backend waits until the backend is gone (PG 14+).
        done = conn.execute(
            "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
            (int(TERMINATE_TIMEOUT_S * 1000),),
        ).fetchall()
    assert all(ok for (ok,) in done), "the server did not terminate the backends in time"
    assert not _others(url) & victims
    return victims


def _assert_completed_once(engine: Engine, run_id: str) -> None:
    """COMPLETED, one row per step, one audit row per event, each effect once."""
    view = engine.show(run_id)
    assert view.run.status is Status.COMPLETED
    assert [(s.step, s.kind, s.status) for s in view.steps] == HISTORY
    assert [a.event for a in view.audit] == RUN_EVENTS
    assert sorted(w for w, _ in tf_steps.EFFECTS) == ["add:reserve", "noop:record_sale"]
    report = engine.verify_audit()
    assert report.ok, str(report)


def _dead_owner() -> str:
    """The lease owner string of a process on this host that has exited."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return f"{socket.gethostname()}:{int(proc.stdout)}:1:deadbeef"


# --- connection loss -------------------------------------------------------------------


def test_store__operations_after_the_server_drops_its_connections_retry_on_new_ones(
    pg_url: str, closing: Any
) -> None:
    delays: list[float] = []
    store = closing(PostgresStore(pg_url, pool_size=2, sleep=delays.append))
    clock = FakeClock()
    engine = _engine(store, PollingExecutor(), clock, closing)
    before = engine.start("pg_pay", {"x": 2})

    lost = _terminate_store_connections(pg_url)
    assert engine.get(before).status is Status.RUNNING  # a read, on a new connection
    assert len(delays) >= 1, "the read did not meet the dropped connection"
    lost |= _terminate_store_connections(pg_url)
    retried = len(delays)
    after = engine.start("pg_pay", {"x": 3})  # a write
    assert len(delays) > retried, "the write did not meet the dropped connection"
    lost |= _terminate_store_connections(pg_url)
    retried = len(delays)
    assert Worker(engine).run_once() == 2  # claim_due, then every step commit
    assert len(delays) > retried

    assert not _others(pg_url) & lost
    for run_id in (before, after):
        view = engine.show(run_id)
        assert view.run.status is Status.COMPLETED
        assert [(s.step, s.kind, s.status) for s in view.steps] == HISTORY
        assert [a.event for a in view.audit] == RUN_EVENTS
    assert _scalar(pg_url, "SELECT count(*) FROM workflow_runs") == 2
    assert sorted(w for w, _ in tf_steps.EFFECTS) == sorted(
        ["add:reserve", "add:reserve", "noop:record_sale", "noop:record_sale"]
    )
    assert engine.verify_audit().ok


# --- a COMMIT whose outcome the client did not hear ---------------------------------------


@pytest.mark.parametrize(
    ("step", "point"),
    [
        pytest.param("reserve", "after_commit", id="plain-after_commit"),
        pytest.param("charge", "after_commit", id="outbox-after_commit"),
        pytest.param("reserve", "before_commit", id="plain-before_commit"),
        pytest.param("charge", "before_commit", id="outbox-before_commit"),
    ],
)
def test_store__a_step_commit_interrupted_at_commit_time_is_applied_exactly_once(
    pg_url: str, closing: Any, caplog: pytest.LogCaptureFixture, step: str, point: str
) -> None:
    fault = Fault()
    delays: list[float] = []
    store = closing(
        StepFaultStore(pg_url, fault=fault, fault_step=step, point=point, sleep=delays.append)
    )
    engine = _engine(store, InlineExecutor(), FakeClock(), closing)

    with caplog.at_level(logging.INFO, logger="cloud.store.postgres"):
        run_id = engine.start("pg_pay", {"x": 2, "amount": 1250})

    assert fault.fired == [point]
    assert delays == [store.backoff_s]  # one retry
    _assert_completed_once(engine, run_id)
    sales = store.outbox()
    assert [(m.run_id, m.topic, m.payload) for m in sales] == [(run_id, "sale", {"amount": 1250})]
    recognised = [r for r in caplog.records if getattr(r, "action", "") == "commit_already_applied"]
    # after_commit: the retry must recognise its own commit_token; before_commit: it
    # must apply the rolled-back outcome normally.
    assert len(recognised) == (1 if point == "after_commit" else 0)


def test_store__a_commit_starting_a_child_run_that_landed_unheard_starts_the_child_once(
    pg_url: str, closing: Any
) -> None:
    fault = Fault()
    delays: list[float] = []
    store = closing(
        StepFaultStore(
            pg_url, fault=fault, fault_step="reserve", point="after_commit", sleep=delays.append
        )
    )
    engine = _engine(store, InlineExecutor(), FakeClock(), closing)

    parent_id = engine.start("pg_spawn", {"x": 2})

    assert fault.fired == ["after_commit"] and delays == [store.backoff_s]
    parent = engine.get(parent_id)
    assert parent.status is Status.COMPLETED
    assert _scalar(pg_url, "SELECT count(*) FROM workflow_runs") == 2
    assert _scalar(pg_url, "SELECT count(*) FROM workflow_run_inputs") == 2
    assert engine.get(parent.state["child_id"]).status is Status.COMPLETED
    assert engine.verify_audit().ok


@pytest.mark.parametrize("point", ["after_commit", "before_commit"])
def test_store__a_start_interrupted_at_commit_time_inserts_the_run_once(
    pg_url: str, closing: Any, point: str
) -> None:
    fault = Fault()
    delays: list[float] = []
    store = closing(PostgresStore(pg_url, fault=fault, sleep=delays.append))
    engine = _engine(store, InlineExecutor(), FakeClock(), closing)

    fault.arm(point)
    run_id = engine.start("pg_pay", {"x": 2}, idempotency_key="pos-7")

    assert fault.fired == [point] and delays == [store.backoff_s]
    assert engine.start("pg_pay", {"x": 2}, idempotency_key="pos-7") == run_id
    assert _scalar(pg_url, "SELECT count(*) FROM workflow_runs") == 1
    assert _scalar(pg_url, "SELECT count(*) FROM workflow_run_inputs") == 1
    _assert_completed_once(engine, run_id)


# --- transient and permanent errors -----------------------------------------------------


TRANSIENT = [
    psycopg.OperationalError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: e.__name__)
def test_store__transient_errors_are_retried_with_doubling_backoff(
    pg_url: str, closing: Any, error: type[psycopg.Error]
) -> None:
    fault = Fault()
    delays: list[float] = []
    store = closing(
        PostgresStore(pg_url, retries=5, backoff_s=0.5, sleep=delays.append, fault=fault)
    )

    fault.arm("before_commit", times=3, error=lambda: error("injected"))
    store.save_definition("h1", "wf", "1", "snapshot one", 1.0)

    assert delays == [0.5, 1.0, 2.0]
    assert fault.calls["before_commit"] == 4
    assert store.load_definition("h1") == "snapshot one"


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: e.__name__)
def test_store__gives_up_after_its_retries_with_a_retryable_error_naming_the_operation(
    pg_url: str, closing: Any, error: type[psycopg.Error]
) -> None:
    fault = Fault()
    delays: list[float] = []
    store = closing(
        PostgresStore(pg_url, retries=3, backoff_s=0.5, sleep=delays.append, fault=fault)
    )

    fault.arm("before_commit", times=10, error=lambda: error("injected"))
    with pytest.raises(StoreError) as caught:
        store.save_definition("h2", "wf", "1", "snapshot two", 1.0)

    assert caught.value.retryable and caught.value.operation == "save_definition"
    assert isinstance(caught.value.__cause__, error)
    assert delays == [0.5, 1.0, 2.0]
    assert fault.calls["before_commit"] == 4  # the first try and three retries
    assert store.load_definition("h2") is None  # every try rolled back


def test_store__a_driver_error_that_is_not_transient_is_not_retried(
    pg_url: str, closing: Any
) -> None:
    fault = Fault()
    delays: list[float] = []
    store = closing(PostgresStore(pg_url, sleep=delays.append, fault=fault))

    fault.arm("before_commit", error=lambda: psycopg.errors.CheckViolation("injected"))
    with pytest.raises(StoreError) as caught:
        store.save_definition("h3", "wf", "1", "snapshot", 1.0)

    assert not caught.value.retryable and caught.value.operation == "save_definition"
    assert isinstance(caught.value.__cause__, psycopg.errors.CheckViolation)
    assert delays == [] and fault.calls["before_commit"] == 1


def test_store__a_revision_conflict_raises_lease_lost_without_retrying(
    pg_url: str, closing: Any
) -> None:
    fault = Fault()
    delays: list[float] = []
    store = closing(PostgresStore(pg_url, sleep=delays.append, fault=fault))
    clock = FakeClock()
    engine = _engine(store, PollingExecutor(), clock, closing)
    run_id = engine.start("pg_pay", {"x": 2})
    stale = store.get_run(run_id)
    assert stale is not None
    assert store.claim(run_id, stale.revision, "other-worker", clock.now() + 30) is not None
    fault.arm("after_commit")  # would fire only if the conflicting commit landed

    with pytest.raises(LeaseLost) as caught:
        store.commit(engine.draft(stale))

    assert not caught.value.retryable and caught.value.operation == "commit"
    assert delays == [] and fault.calls["before_commit"] == 0 and fault.fired == []
    run = store.get_run(run_id)
    assert run is not None
    assert (run.revision, run.lease_owner) == (stale.revision + 1, "other-worker")
    assert [a.event for a in store.audit_rows(run_id)] == ["run_started"]


# --- many workers ------------------------------------------------------------------------


def test_store__concurrent_claimers_on_two_stores_never_get_the_same_run(
    pg_url: str, closing: Any
) -> None:
    stores = [closing(PostgresStore(pg_url, pool_size=2)) for _ in range(2)]
    clock = FakeClock()
    engine = _engine(stores[0], PollingExecutor(), clock, closing)
    run_ids = {engine.start("pg_pay", {"x": i}) for i in range(50)}
    now = clock.now()
    barrier = threading.Barrier(2)

    def claim_all(store: PostgresStore, worker: str) -> dict[str, str]:
        """Claim batches until none is left: ``{run_id: owner}``. A new owner string per
        batch, since claim_due hands an owner its own leased runs again."""
        got: dict[str, str] = {}
        barrier.wait()
        for n in itertools.count():
            owner = f"{worker}:{n}"
            batch = store.claim_due(owner, now, now + 30, 5)
            if not batch:
                return got
            assert len(batch) <= 5 and not got.keys() & {r.run_id for r in batch}
            got |= {r.run_id: owner for r in batch}
        raise AssertionError("unreachable")

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(claim_all, s, f"worker-{i}") for i, s in enumerate(stores)]
        a, b = (f.result(timeout=60) for f in futures)

    assert not a.keys() & b.keys()
    assert a.keys() | b.keys() == run_ids
    for run_id, owner in (a | b).items():
        run = stores[0].get_run(run_id)
        assert run is not None and (run.lease_owner, run.revision) == (owner, 2)


def test_store__claim_due_skips_runs_another_claimer_has_locked_instead_of_waiting(
    pg_url: str, closing: Any
) -> None:
    store = closing(PostgresStore(pg_url, pool_size=2))
    clock = FakeClock()
    engine = _engine(store, PollingExecutor(), clock, closing)
    run_ids = [engine.start("pg_pay", {"x": i}) for i in range(10)]
    locked, free = set(run_ids[:5]), set(run_ids[5:])
    now = clock.now()

    with psycopg.connect(pg_url) as other, ThreadPoolExecutor(1) as pool:
        other.execute(
            "SELECT run_id FROM workflow_runs WHERE run_id = ANY(%s) FOR UPDATE", (list(locked),)
        )
        claimed = pool.submit(store.claim_due, "w", now, now + 30, 10).result(timeout=30)
        assert {r.run_id for r in claimed} == free
        other.rollback()
    assert {r.run_id for r in store.claim_due("w2", now, now + 30, 10)} == locked


def test_store__claim_due_respects_a_live_lease_until_it_expires(pg_url: str, closing: Any) -> None:
    store = closing(PostgresStore(pg_url, pool_size=2))
    clock = FakeClock()
    engine = _engine(store, PollingExecutor(), clock, closing)
    run_id = engine.start("pg_pay", {"x": 1})
    t = clock.now()

    assert [r.run_id for r in store.claim_due("a", t, t + 30, 5)] == [run_id]
    assert store.claim_due("b", t + 10, t + 40, 5) == []
    assert [r.run_id for r in store.claim_due("a", t + 10, t + 40, 5)] == [run_id]  # its own
    assert store.claim_due("b", t + 39, t + 69, 5) == []
    [taken] = store.claim_due("b", t + 40, t + 70, 5)
    assert (taken.run_id, taken.lease_owner, taken.revision) == (run_id, "b", 4)


# --- dead and distant workers ---------------------------------------------------------------


def test_worker__takes_over_at_once_the_run_of_a_dead_worker_on_this_host(
    pg_url: str, closing: Any
) -> None:
    store = closing(PostgresStore(pg_url, pool_size=2))
    clock = FakeClock()
    engine = _engine(store, PollingExecutor(), clock, closing)
    run_id = engine.start("pg_pay", {"x": 2})
    now = clock.now()
    [held] = store.claim_due(_dead_owner(), now, now + 3600, 5)
    assert held.run_id == run_id

    assert store.claim_due(engine.owner, now, now + 30, 5) == []  # by the clock, still held
    worker = Worker(engine)
    assert worker.recover() == [run_id]  # no clock advance: its owner is gone

    _assert_completed_once(engine, run_id)
    assert engine.get(run_id).lease_owner is None


def test_worker__counts_the_runs_its_startup_recovery_took_over(pg_url: str, closing: Any) -> None:
    store = closing(PostgresStore(pg_url, pool_size=2))
    clock = FakeClock()
    engine = _engine(store, PollingExecutor(), clock, closing)
    run_id = engine.start("pg_pay", {"x": 2})
    now = clock.now()
    store.claim_due(_dead_owner(), now, now + 3600, 5)
    stop = threading.Event()
    stop.set()  # run() recovers first, then finds it should stop

    stats = Worker(engine).run(stop)

    assert engine.get(run_id).status is Status.COMPLETED  # the startup pass did take it
    assert stats.recovered == 1


def test_worker__leaves_the_run_of_a_worker_on_another_host_until_its_lease_expires(
    pg_url: str, closing: Any
) -> None:
    store = closing(PostgresStore(pg_url, pool_size=2))
    clock = FakeClock()
    engine = _engine(store, PollingExecutor(), clock, closing)
    run_id = engine.start("pg_pay", {"x": 2})
    elsewhere = f"elsewhere-{uuid.uuid4().hex[:6]}:4242:1:cafe0000"
    now = clock.now()
    [held] = store.claim_due(elsewhere, now, now + 30, 5)
    worker = Worker(engine)

    assert worker.recover() == []
    assert worker.run_once() == 0
    unchanged = engine.get(run_id)
    assert (unchanged.lease_owner, unchanged.revision) == (elsewhere, held.revision)
    assert tf_steps.EFFECTS == []

    clock.advance(30)
    assert worker.recover() == [run_id]
    _assert_completed_once(engine, run_id)
