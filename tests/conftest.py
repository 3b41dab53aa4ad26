"""Suite-wide hygiene: no ambient TILLFLOW_* settings, fresh step-effect ledgers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
import tf_steps
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# The suite writes nothing into the working directory: no example database, and
# hypothesis's own caches go to a temporary directory.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="tillflow-hypothesis-"))
settings.register_profile("tillflow", database=None)
settings.load_profile("tillflow")


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
