"""Suite-wide hygiene (no ambient TILLFLOW_* settings, fresh step-effect ledgers) and
the tiers: which tests are ``slow`` and which need a named backend."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tf_steps
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# The suite writes nothing into the working directory: no example database, and
# hypothesis's own caches go to a temporary directory.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="tillflow-hypothesis-"))
settings.register_profile("tillflow", database=None)
settings.load_profile("tillflow")

# What PostgreSQL and Redis the suite uses (configured, else provided): in the header
# and the summary.
pytest_plugins = ("services",)

TESTS = Path(__file__).resolve().parent

#: Folders whose every test is slow: the crash tortures and sweeps, and the tests of the
#: frozen binary (they start it as a process, and need it built).
SLOW_FOLDERS = {"crash", "packaging"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers by where a test lives and what it runs on, so the fast tier is a marker
    expression and every backend gap can be counted (``pytest --co -q -m postgres``)."""
    for item in items:
        try:
            folder = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if folder in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
        if folder == "packaging":
            item.add_marker(pytest.mark.binary)
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and "postgresql" in callspec.id.split("-")
        if folder == "integration" or on_postgres:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(autouse=True)
def _scrub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TILLFLOW_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _fresh_effects() -> Iterator[None]:
    tf_steps.reset()
    yield
    tf_steps.RELEASE.set()  # let any abandoned blocking step finish
