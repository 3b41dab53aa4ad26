"""What `make` installs, and how: metadata setuptools takes without a warning, every
directory of data shipped as a package, and a lock of hashed pins that the install uses.

A newcomer's first `make` printed some 200 lines of setuptools warnings that read as a
failure; and every install took the newest release of each dependency.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
LOCK = REPO / "requirements.lock"
#: The first setuptools that reads ``license`` as an SPDX expression (PEP 639).
SPDX_SETUPTOOLS = Version("77")


def package_dirs() -> dict[str, Path]:
    """Every directory under the package roots (``package-dir``), by dotted name."""
    out: dict[str, Path] = {}
    for top, folder in SETUPTOOLS["package-dir"].items():
        root = REPO / folder
        for d in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
            rel = d.relative_to(root).parts
            if "__pycache__" in rel:
                continue
            out[".".join((top, *rel))] = d
    return out


def data_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc"))


def locked() -> dict[str, Version]:
    """Name -> pinned version of every requirement in the lock (markers ignored)."""
    pins: dict[str, Version] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def test_pyproject__license_is_an_spdx_expression_with_a_setuptools_that_reads_it():
    assert isinstance(PYPROJECT["project"]["license"], str)  # a table is deprecated
    [backend] = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    assert backend.name == "setuptools"
    assert not backend.specifier.contains("76.9"), backend


def test_pyproject__every_directory_of_package_data_is_a_listed_package_with_its_globs():
    listed = set(SETUPTOOLS["packages"])
    globs: dict[str, list[str]] = SETUPTOOLS["package-data"]
    unlisted, unshipped = [], []
    for name, d in package_dirs().items():
        files = data_files(d)
        if not files:
            continue
        if name not in listed:
            unlisted.append(name)
        for f in files:
            if not any(f.match(g) for g in globs.get(name, [])):
                unshipped.append(str(f.relative_to(REPO)))
    assert unlisted == [] and unshipped == []


# Copies the sources into a temporary directory (setuptools writes build/ and egg-info
# beside them) and builds a wheel there, recording every warning setuptools raises.
BUILD = """
import json, sys, warnings
import setuptools.build_meta as backend
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    wheel = backend.build_wheel(sys.argv[1])
print(json.dumps({"wheel": wheel,
                  "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def test_build__a_wheel_builds_without_a_warning_and_holds_the_data_files(tmp_path):
    have = Version(importlib.metadata.version("setuptools"))
    assert have >= SPDX_SETUPTOOLS, f"setuptools {have} predates requirements.lock: run make"
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ["edge", "sync", "cloud", "hardware-sim"]:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(REPO / name, src / name)
    out = subprocess.run(
        [sys.executable, "-c", BUILD, str(tmp_path / "dist")],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["warnings"] == []
    names = set(zipfile.ZipFile(tmp_path / "dist" / result["wheel"]).namelist())
    for name, d in package_dirs().items():
        for f in data_files(d):
            assert "/".join((*name.split("."), f.name)) in names


def test_lock__every_requirement_is_pinned_to_one_version_with_hashes():
    entries: list[str] = []
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line[:1].isalnum():
            entries.append(line)
        elif line[:1].isspace() and entries:
            entries[-1] += "\n" + line
        else:
            assert line == "" or line.startswith("#"), line
    assert len(entries) == len(locked()) > 20
    for entry in entries:
        assert re.match(r"^[A-Za-z0-9._-]+==\S+", entry), entry
        assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_lock__satisfies_every_requirement_of_pyproject_build_backend_and_pip_included():
    project = PYPROJECT["project"]
    wanted = [
        *project["dependencies"],
        *(
            r
            for extra in ("dev", "cloud", "build")
            for r in project["optional-dependencies"][extra]
        ),
        *PYPROJECT["build-system"]["requires"],
        "pip",
    ]
    pins = locked()
    stale = []
    for text in wanted:
        req = Requirement(text)
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or not req.specifier.contains(pin, prereleases=True):
            stale.append(f"{text} (locked: {pin})")
    assert stale == [], "pyproject.toml changed since the lock: run `make lock`"


def make_rule(target: str) -> tuple[str, list[str]]:
    """A Makefile rule's prerequisites and recipe lines, with continuations joined."""
    text = (REPO / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    m = re.search(rf"^{re.escape(target)}:([^\n]*)\n((?:\t[^\n]*\n)*)", text, flags=re.M)
    assert m, f"no rule for {target} in the Makefile"
    return m.group(1), [ln.strip() for ln in m.group(2).splitlines()]


def test_makefile__the_install_uses_the_lock_in_hash_checking_mode_and_reinstalls_on_change():
    prerequisites, recipe = make_rule("$(STAMP)")
    assert "$(LOCK)" in prerequisites.split()
    assert re.search(r"^LOCK := requirements\.lock$", (REPO / "Makefile").read_text(), re.M)
    pips = [ln for ln in recipe if " -m pip install" in ln]
    assert "--require-hashes -r $(LOCK)" in pips[0]
    # Nothing else fetched: not pip (it is locked), not the build backend (no isolation).
    assert all("--upgrade" not in ln for ln in pips)
    assert all("--no-deps" in ln and "--no-build-isolation" in ln for ln in pips[1:])


def test_makefile__make_lock_regenerates_the_lock_and_the_readme_says_so():
    _, recipe = make_rule("lock")
    assert any("--generate-hashes" in ln and "-o build/$(LOCK)" in ln for ln in recipe)
    assert any("cp build/$(LOCK) $(LOCK)" in ln for ln in recipe)
    assert "make lock" in (REPO / "README.md").read_text(encoding="utf-8")
    assert LOCK.read_text(encoding="utf-8").splitlines()[1].strip("# ") == "make lock"
