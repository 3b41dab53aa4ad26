"""``packaging/release_tool.py normalise``: the onedir build's base_library.zip, which
PyInstaller writes in hash-seed order, rewritten so two builds of one source give the
same bytes (the same file hash, so a terminal running one need not download it for the
other), and still importable."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def release_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "release_tool", REPO / "packaging" / "release_tool.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MEMBERS = {
    "zz_last.py": b"VALUE = 'last'\n",
    "pkg/__init__.py": b"",
    "pkg/inner.py": b"VALUE = 'inner'\n",
    "aa_first.py": b"VALUE = 'first'\n" * 50,
}


def write_zip(path: Path, seed: int) -> None:
    """The members in a seeded order, with dates and attributes a build could leave."""
    names = sorted(MEMBERS)
    random.Random(seed).shuffle(names)
    with zipfile.ZipFile(path, "w") as z:
        for i, name in enumerate(names):
            info = zipfile.ZipInfo(name, date_time=(2020 + seed, 1 + i, 1, 0, 0, 0))
            info.compress_type = (
                zipfile.ZIP_DEFLATED if name.startswith("aa") else zipfile.ZIP_STORED
            )
            info.external_attr = (0o100600 + seed) << 16
            z.writestr(info, MEMBERS[name])


def dist_with(tmp: Path, seed: int) -> Path:
    dist = tmp / f"build-{seed}" / "tillflow-edge"
    (dist / "_internal").mkdir(parents=True)
    (dist / "tillflow-edge").write_bytes(b"\x7fELF")
    write_zip(dist / "_internal" / "base_library.zip", seed)
    return dist


def test_normalise__two_orders_become_one_file_with_its_members_and_compression(tmp_path):
    tool = release_tool()
    one, two = dist_with(tmp_path, 1), dist_with(tmp_path, 2)
    zip_one, zip_two = (d / "_internal" / "base_library.zip" for d in (one, two))
    assert zip_one.read_bytes() != zip_two.read_bytes()

    assert tool.normalise(one) == ["_internal/base_library.zip"]
    assert tool.normalise(two) == ["_internal/base_library.zip"]
    assert zip_one.read_bytes() == zip_two.read_bytes()
    assert tool.normalise(one) == []  # idempotent: a second run rewrites nothing

    with zipfile.ZipFile(zip_one) as z:
        infos = z.infolist()
        assert [i.filename for i in infos] == sorted(MEMBERS)
        assert {i.filename: z.read(i) for i in infos} == MEMBERS
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        kinds = {i.filename: i.compress_type for i in infos}
        assert kinds["aa_first.py"] == zipfile.ZIP_DEFLATED
        assert kinds["zz_last.py"] == zipfile.ZIP_STORED


def test_normalise__the_rewritten_zip_still_imports(tmp_path):
    dist = dist_with(tmp_path, 3)
    release_tool().normalise(dist)
    archive = dist / "_internal" / "base_library.zip"
    code = "import aa_first, pkg.inner; print(aa_first.VALUE[:5], pkg.inner.VALUE)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(archive)!r}); {code}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["first", "inner"]


def test_normalise__refuses_a_directory_without_a_binary(tmp_path):
    with pytest.raises(SystemExit, match="no binary"):
        release_tool().normalise(tmp_path)
