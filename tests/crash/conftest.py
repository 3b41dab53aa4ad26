"""Shared pieces of the crash tests: workflows, a journalled steps module, child processes.

Each test gets its own directory holding the database, a copy of ``crash_steps.py``
(imported as ``crash_steps``) and the ledger that module appends every effect to.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge.engine import Engine, FakeClock
from edge.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[2]
STEPS_SOURCE = Path(__file__).with_name("crash_steps.py")
STEPS_MODULE = "crash_steps"
BLOCK_AT_ENV = "TILLFLOW_CRASH_BLOCK_AT"
FAIL_FIRST_ENV = "TILLFLOW_CRASH_FAIL_FIRST"

#: Virtual time every engine of a test starts at, child and parent alike: a lease the
#: child took is then still valid by the parent's clock, so only the death of its owner
#: can free it.
START = 1_700_000_000.0

#: Upper bound on any wait for a child process. Reached only when something is broken;
#: a healthy child answers in well under a second.
CHILD_TIMEOUT_S = 20.0

LINEAR_YAML = """\
workflow_type: crash_linear
version: 1
steps:
  - name: reserve
    type: STANDARD
    function: crash_steps:reserve
  - name: route
    type: DECISION
    routes:
      - when: state.amount <= 0
        next: END
    default: charge
  - name: charge
    type: STANDARD
    function: crash_steps:charge
    retry:
      max_attempts: 3
      initial_backoff_s: 0.5
  - name: print_receipt
    type: STANDARD
    function: crash_steps:print_receipt
  - name: record_sale
    type: STANDARD
    function: crash_steps:record_sale
"""

SAGA_YAML = """\
workflow_type: crash_saga
version: 1
saga: true
steps:
  - name: reserve
    type: STANDARD
    function: crash_steps:reserve
    compensate: crash_steps:release
  - name: charge
    type: STANDARD
    function: crash_steps:charge
    compensate: crash_steps:refund
    retry:
      max_attempts: 2
      initial_backoff_s: 0.5
  - name: print_receipt
    type: STANDARD
    function: crash_steps:print_receipt
  - name: decline
    type: STANDARD
    function: crash_steps:decline
"""

LOOP_YAML = """\
workflow_type: crash_loop
version: 1
steps:
  - name: reserve
    type: STANDARD
    function: crash_steps:reserve
  - name: items
    type: LOOP
    mode: ITERATE
    over: state.skus
    max_iterations: 10
    body:
      - name: charge_item
        type: STANDARD
        function: crash_steps:charge_item
  - name: record_sale
    type: STANDARD
    function: crash_steps:record_sale
"""

PARENT_YAML = """\
workflow_type: crash_parent
version: 1
steps:
  - name: reserve
    type: STANDARD
    function: crash_steps:reserve
  - name: pay
    type: SUB_WORKFLOW
    workflow: crash_linear
  - name: print_receipt
    type: STANDARD
    function: crash_steps:print_receipt
"""

PARALLEL_YAML = """\
workflow_type: crash_parallel
version: 1
steps:
  - name: authorise
    type: PARALLEL
    tasks:
      - name: hold
        function: crash_steps:reserve
      - name: capture
        function: crash_steps:charge
  - name: record_sale
    type: STANDARD
    function: crash_steps:record_sale
"""

WORKFLOWS = {
    "crash_linear": LINEAR_YAML,
    "crash_saga": SAGA_YAML,
    "crash_loop": LOOP_YAML,
    "crash_parent": PARENT_YAML,
    "crash_parallel": PARALLEL_YAML,
}
PAYMENT = {"amount": 1250}


@dataclass
class CrashDir:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "terminal.db"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.jsonl"

    def workflow(self, workflow_type: str) -> Path:
        return self.root / f"{workflow_type}.yaml"

    def effects(self) -> list[dict[str, Any]]:
        """Every effect the steps performed, in order, across all processes."""
        if not self.ledger.exists():
            return []
        lines = self.ledger.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def keys_by_step(self, kind: str, run_id: str | None = None) -> dict[str, Counter[str]]:
        """``{step path: Counter(idempotency key -> times presented)}`` for one kind of
        effect, of one run or of all."""
        out: dict[str, Counter[str]] = defaultdict(Counter)
        for e in self.effects():
            if e["kind"] == kind and run_id in (None, e["run_id"]):
                out[e["step"]][e["key"]] += 1
        return dict(out)


@pytest.fixture
def crash_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CrashDir]:
    """A fresh directory with the steps module importable from it, and no block flags
    in this (the recovering) process's environment."""
    shutil.copyfile(STEPS_SOURCE, tmp_path / f"{STEPS_MODULE}.py")
    for workflow_type, text in WORKFLOWS.items():
        (tmp_path / f"{workflow_type}.yaml").write_text(text, encoding="utf-8")
    monkeypatch.delenv(BLOCK_AT_ENV, raising=False)
    monkeypatch.delenv(FAIL_FIRST_ENV, raising=False)
    sys.modules.pop(STEPS_MODULE, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield CrashDir(tmp_path)
    sys.modules.pop(STEPS_MODULE, None)  # the next test imports its own copy


@dataclass
class Engines:
    """Opens engines on a database the way a restarted process would, and closes them."""

    opened: list[tuple[SqliteStore, Engine]] = field(default_factory=list)

    def open(self, db: Path, clock: FakeClock | None = None) -> Engine:
        store = SqliteStore(db)
        engine = Engine(store, clock=clock or FakeClock(START))
        self.opened.append((store, engine))
        return engine

    def crash(self, engine: Engine) -> None:
        """Retire an engine before surgery, as its process ending would: the database keeps
        only what it committed (there is no shutdown record to write)."""
        for i, (store, eng) in enumerate(self.opened):
            if eng is engine:
                eng.close()
                store.close()
                del self.opened[i]
                return
        raise AssertionError("not an engine opened here")


@pytest.fixture
def engines() -> Iterator[Engines]:
    opened = Engines()
    yield opened
    for store, engine in opened.opened:
        engine.close()
        store.close()


# --- child processes -------------------------------------------------------------------

CHILD_SCRIPT = """\
import json, random, sys
from edge.engine import Engine, FakeClock
from edge.store.sqlite import SqliteStore

db, workflow_type, payload, start, *workflows = sys.argv[1:]
engine = Engine(SqliteStore(db), clock=FakeClock(float(start)), rng=random.Random(7))
for workflow in workflows:
    engine.register(workflow)
run_id = engine.start(workflow_type, json.loads(payload))
print("FINISHED", run_id, engine.get(run_id).status, flush=True)
"""


class Child:
    """A terminal process driving one run; it says ``BLOCKED <run_id> <key>`` when the
    step named by ``block_at`` is in flight, and blocks there until killed."""

    def __init__(
        self, crash: CrashDir, workflow_type: str, payload: dict[str, Any], env: dict[str, str]
    ) -> None:
        self.stderr_path = crash.root / "child.stderr"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    CHILD_SCRIPT,
                    str(crash.db),
                    workflow_type,
                    json.dumps(payload),
                    repr(START),
                    *(str(crash.workflow(name)) for name in WORKFLOWS),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=crash.root,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(crash.root), str(REPO)]),
                    **env,
                },
            )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def read_line(self, timeout_s: float = CHILD_TIMEOUT_S) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child {self.pid} said nothing for {timeout_s}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                self.proc.wait(timeout=CHILD_TIMEOUT_S)
                raise AssertionError(
                    f"child {self.pid} exited {self.proc.returncode} before saying a line; "
                    f"stderr:\n{self._stderr()}"
                )
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def wait_blocked(self) -> tuple[str, str]:
        """(run_id, idempotency key) of the step the child is now blocked in."""
        line = self.read_line()
        word, run_id, key = line.split()
        assert word == "BLOCKED", line
        return run_id, key

    def sigkill(self) -> None:
        """Kill -9 and reap: an unreaped zombie still answers ``kill(pid, 0)``."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=CHILD_TIMEOUT_S)
        assert self.proc.returncode == -signal.SIGKILL, self._stderr()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=CHILD_TIMEOUT_S)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@dataclass
class Children:
    crash: CrashDir
    started: list[Child] = field(default_factory=list)

    def start(
        self,
        workflow_type: str,
        payload: dict[str, Any],
        *,
        block_at: str,
        fail_first: str | None = None,
    ) -> Child:
        env = {BLOCK_AT_ENV: block_at}
        if fail_first:
            env[FAIL_FIRST_ENV] = fail_first
        child = Child(self.crash, workflow_type, payload, env)
        self.started.append(child)
        return child


@pytest.fixture
def children(crash_dir: CrashDir) -> Iterator[Children]:
    spawned = Children(crash_dir)
    yield spawned
    for child in spawned.started:
        child.close()
