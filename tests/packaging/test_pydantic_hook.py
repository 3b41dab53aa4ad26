"""packaging/hooks/hook-pydantic.py: the binary's pydantic hook names no module the spec
excludes, so `make package` prints no ``Hidden import "pydantic.v1..." not found!``."""

from __future__ import annotations

import runpy

from conftest import REPO

EXCLUDES = runpy.run_path(str(REPO / "packaging" / "excludes.py"))["EXCLUDES"]
HOOK = REPO / "packaging" / "hooks" / "hook-pydantic.py"


def excluded(name: str) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in EXCLUDES for i in range(1, len(parts) + 1))


def test_pydantic_hook__names_every_pydantic_module_but_the_excluded_ones():
    from PyInstaller.utils.hooks import collect_submodules

    hidden = runpy.run_path(str(HOOK))["hiddenimports"]
    assert [m for m in hidden if excluded(m)] == []
    # What pyinstaller-hooks-contrib's hook names, less the excluded: nothing else lost.
    assert sorted(hidden) == sorted(m for m in collect_submodules("pydantic") if not excluded(m))
    assert "pydantic.main" in hidden and "pydantic._internal._model_construction" in hidden


def test_spec__uses_the_project_hooks_before_contribs():
    spec = (REPO / "packaging" / "tillflow-edge.spec").read_text(encoding="utf-8")
    assert 'hookspath=[str(ROOT / "packaging" / "hooks")]' in spec
