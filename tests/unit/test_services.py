"""``Engine(services=...)`` is opaque to the engine: the very object reaches every step
(parallel tasks and compensations included); a Mapping is copied as it always was, and
an engine given none hands steps an empty object."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tf_steps

from edge.engine import Engine, FakeClock, Status
from edge.engine.loader import load_text
from edge.store.sqlite import SqliteStore

WORKFLOW = """
workflow_type: services
version: 1
saga: true
steps:
  - {name: one, type: STANDARD, function: "tf_steps:keep_services",
     compensate: "tf_steps:keep_services"}
  - name: both
    type: PARALLEL
    tasks:
      - {name: a, function: "tf_steps:keep_services"}
      - {name: b, function: "tf_steps:keep_services"}
  - {name: last, type: STANDARD, function: "tf_steps:fatal"}
"""


@dataclass(frozen=True)
class TerminalServices:
    device_id: str


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "services.db"))
    yield s
    s.close()


def _run(store: SqliteStore, services: Any) -> tuple[Engine, list[tuple[str, Any]]]:
    engine = Engine(store, clock=FakeClock(), services=services)
    engine.register(load_text(WORKFLOW))
    run = engine.get(engine.start("services", {}))
    assert run.status is Status.ROLLED_BACK  # "one" was compensated after "last" failed
    engine.close()
    seen: list[tuple[str, Any]] = tf_steps.KNOBS["services"]
    return engine, seen


def test_services__a_typed_object_reaches_every_step_as_it_is(store):
    services = TerminalServices(device_id="T-1")
    engine, seen = _run(store, services)
    assert engine.services is services
    # the step, both parallel tasks, and the step's compensation
    assert sorted(step for step, _ in seen) == ["both/a", "both/b", "one", "one"]
    assert all(s is services for _, s in seen)


def test_services__a_mapping_is_copied_once_and_shared_by_the_steps(store):
    given = {"device_id": "T-1"}
    engine, seen = _run(store, given)
    assert engine.services == given and engine.services is not given
    assert len(seen) == 4 and all(s is engine.services for _, s in seen)


def test_services__none_given_is_an_empty_object(store):
    _, seen = _run(store, None)
    services = seen[0][1]
    assert not isinstance(services, Mapping) and vars(services) == {}
