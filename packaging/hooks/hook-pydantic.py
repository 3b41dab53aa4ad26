"""PyInstaller hook for pydantic, in place of pyinstaller-hooks-contrib's.

Contrib's names every submodule of pydantic as a hidden import, ``pydantic.v1.*`` (pydantic
1, kept for migrations) and ``pydantic.mypy`` included; packaging/excludes.py leaves those
out of the binary, so the build printed one ``Hidden import ... not found!`` warning for
each of them, 25 lines that read as a failure. This is the same list without them.
"""

import runpy
from pathlib import Path

from PyInstaller.utils.hooks import collect_submodules

EXCLUDES = runpy.run_path(str(Path(__file__).resolve().parents[1] / "excludes.py"))["EXCLUDES"]


def _excluded(name: str) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in EXCLUDES for i in range(1, len(parts) + 1))


hiddenimports = collect_submodules("pydantic", filter=lambda name: not _excluded(name))
