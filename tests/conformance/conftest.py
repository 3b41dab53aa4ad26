"""One conformance suite over every store: each test gets a fresh database.

Add a backend by adding a param to ``store_factory``; a gap in a backend is a named
marker (``pytest.mark.skip_<backend>``) so gaps can be counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.engine import Engine, FakeClock, InlineExecutor, Store, Workflow
from edge.engine.loader import load_text
from edge.store.sqlite import SqliteStore

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens a (new) connection to this test's database; call again to 'restart'."""
    opened: list[Any] = []

    def open_store() -> Store:
        s = SqliteStore(tmp_path / "conformance.db")
        opened.append(s)
        return s

    yield open_store
    for s in opened:
        s.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    return store_factory()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(store: Store, clock: FakeClock) -> Iterator[Engine]:
    eng = Engine(store, InlineExecutor(), clock=clock)
    yield eng
    eng.close()


@pytest.fixture
def register(engine: Engine) -> Callable[[str], Workflow]:
    def _register(yaml_text: str) -> Workflow:
        return engine.register(load_text(yaml_text, source="test.yaml"))

    return _register
