"""Full bundle vs delta update: the bytes a terminal running release A downloads to
install B, against the whole bundle (the baseline).

    python bench/delta.py [--bump idna==3.19] [--pyc PKG,PKG...] [--starts N] [--keep]

Everything is built from the last commit (``git worktree`` in a temporary directory;
nothing in the working directory), the way ``make package`` builds (PYTHONHASHSEED=0,
SOURCE_DATE_EPOCH of the commit, ``release_tool.py normalise``) and bundled with
``release_tool.py bundle`` under a throwaway key. Builds:

* ``a``        the commit, version V (the baseline: its gzip'd bundle is what a full
               update downloads);
* ``a_again``  the same build once more: reproducible means every file is the same, so
               the delta between them is 0 bytes;
* ``edge``     A with one line appended to ``edge/terminal/service/main.py``, version V.1;
* ``dep_old``  the commit with one dependency one version back (``--bump``, installed
               with ``pip install --target`` ahead of the venv on PYTHONPATH), version V;
* ``dep_new``  the commit as locked, version V.1: ``dep_old -> dep_new`` is the bump.

The delta is what ``sync.device.releases`` downloads (its ``bytes_downloaded``): the
files of B's signed ``SHA256SUMS`` whose SHA-256 the terminal on A does not hold, one
download per distinct hash. A terminal that took A over the air holds all of A's
files: the installed tree (the onedir tree, the update script beside it) and the
bundle's own files its installer keeps (install.sh, the units, the default config,
VERSION); one installed from media holds only the installed tree and downloads those
few KB too (``first_update_extra_bytes``). The signed manifest (``manifest_bytes``:
SHA256SUMS and its signature) comes on top. Files are served as they are (``GET
/v1/files/{sha256}``), so the delta is counted uncompressed; its gzip'd size is given
too. Prints one JSON object; ratios are ``delta / full bundle gzip'd`` of the same run.

``--pyc`` is an experiment, not what ships: the worktree's spec is given
``module_collection_mode={PKG: "pyc"}`` for the packages named, which PyInstaller then
collects as ``.pyc`` files under ``_internal/`` instead of into the archive appended to
the executable (which every change of any module in it replaces whole). ``--starts N``
times what that costs at start: exec -> READY=1 of build ``a`` (median of N starts on
fresh data dirs, ``bench/payments.py``'s daemon harness) and its VmRSS then; with
``--pyc``, against ``a_shipped``, the same commit built as it ships, started in turn.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge.terminal.service.release import generate_keypair, parse_sums  # noqa: E402

#: What install.sh installs of a bundle (what the terminal then holds): the onedir tree
#: and the update hand-off's script it keeps beside the binary.
INSTALLED = ("tillflow-edge/", "tillflow-edge-update.sh")
EDGE_FILE = "edge/terminal/service/main.py"
EDGE_LINE = 'RELEASE_MARK = "next"  # the one line this release changes\n'
FLEET = 10_000
BUILD_TIMEOUT_S = 900


def progress(msg: str) -> None:
    print(f"[delta] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}…: exit {out.returncode}\n{out.stderr[-3000:]}")
    return out


class Builds:
    """Builds of one worktree of the last commit, each in its own folder of ``work``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.src = work / "src"
        run(["git", "worktree", "add", "--detach", str(self.src), "HEAD"], cwd=ROOT)
        self.commit = run(["git", "rev-parse", "--short=12", "HEAD"], cwd=self.src).stdout.strip()
        self.epoch = run(["git", "log", "-1", "--format=%ct"], cwd=self.src).stdout.strip()
        project = tomllib.loads((self.src / "pyproject.toml").read_text())["project"]
        self.version = str(project["version"])
        self.key = work / "release.key"
        generate_keypair(self.key, work / "release.pub")
        self.seconds: dict[str, float] = {}

    def collect_as_pyc(self, packages: list[str]) -> None:
        """The experiment of ``--pyc`` (module docstring), in the worktree's spec."""
        spec = self.src / "packaging" / "tillflow-edge.spec"
        text, marker = spec.read_text(), "    optimize=2,\n)"
        if marker not in text:
            raise SystemExit(f"{spec}: no `optimize=2,` closing Analysis(); cannot patch --pyc")
        modes = ", ".join(f"{p!r}: 'pyc'" for p in packages)
        spec.write_text(
            text.replace(marker, f"    optimize=2,\n    module_collection_mode={{{modes}}},\n)")
        )

    def close(self) -> None:
        subprocess.run(["git", "worktree", "remove", "--force", str(self.src)], cwd=ROOT,
                       capture_output=True, check=False)  # fmt: skip
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True, check=False)

    def build(
        self, name: str, version: str, *, edit: bool = False, site: Path | None = None
    ) -> Path:
        """Build ``name`` (the edge line appended when ``edit``; ``site`` ahead of the
        venv), bundle it as ``version``; returns the unpacked bundle."""
        pyproject = self.src / "pyproject.toml"
        original = pyproject.read_text()
        edge_file = self.src / EDGE_FILE
        edge_text = edge_file.read_text()
        try:
            pyproject.write_text(
                original.replace(f'version = "{self.version}"', f'version = "{version}"', 1)
            )
            if edit:
                edge_file.write_text(edge_text + EDGE_LINE)
            folder = self.work / name
            path = [str(site)] if site is not None else []
            env = {**os.environ, "PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": self.epoch,
                   "PYTHONPATH": os.pathsep.join([*path, str(self.src)])}  # fmt: skip
            began = time.monotonic()
            run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                 "--workpath", str(folder / "build"), "--distpath", str(folder / "dist"),
                 str(self.src / "packaging" / "tillflow-edge.spec")],
                cwd=self.src, env=env, timeout=BUILD_TIMEOUT_S)  # fmt: skip
            dist = folder / "dist" / "tillflow-edge"
            tool = str(self.src / "packaging" / "release_tool.py")
            run([sys.executable, tool, "normalise", "--dist", str(dist)], env=env, timeout=120)
            # The build works: it starts and reads a config (pydantic, yaml, the models).
            exe = str(dist / "tillflow-edge")
            config = str(self.src / "edge" / "terminal" / "edge.example.yaml")
            run([exe, "config", "check", config], env=clean_env(), timeout=60)
            self.seconds[name] = round(time.monotonic() - began, 1)
            run([sys.executable, tool, "bundle", "--key", str(self.key), "--version", version,
                 "--dist", str(dist), "--out", str(folder)], env=env, timeout=300)  # fmt: skip
        finally:
            pyproject.write_text(original)
            edge_file.write_text(edge_text)
        tar = folder / f"tillflow-edge-{version}.tar.gz"
        with tarfile.open(tar) as t:
            t.extractall(folder, filter="data")
        shutil.rmtree(folder / "build", ignore_errors=True)
        progress(f"{name}: built in {self.seconds[name]} s, bundle {tar.stat().st_size:,} bytes")
        return folder / f"tillflow-edge-{version}"


def starts(exes: dict[str, Path], n: int) -> dict[str, Any]:
    """Per binary of ``exes``: exec -> READY=1 (median of ``n``, the binaries started in
    turn so a busy moment hits them alike) and its VmRSS at READY."""
    import statistics

    from bench.payments import (
        DaemonProcess,
        SimAcquirer,
        SimDeviceServer,
        child_env,
        proc_status_kb,
        short_tempdir,
    )

    class Daemon(DaemonProcess):
        exe = ""

        def spawn(self) -> None:
            env = {**child_env(), "NOTIFY_SOCKET": str(self.notify_path)}
            env.pop("PYTHONPATH", None)
            with open(self.log, "ab") as log:
                self.t_exec = time.perf_counter()
                self.proc = subprocess.Popen(
                    [self.exe, "run", "--config", str(self.config)],
                    env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=log,
                )  # fmt: skip

    work = short_tempdir("tfd-")
    ready: dict[str, list[float]] = {name: [] for name in exes}
    rss: dict[str, list[float]] = {name: [] for name in exes}
    try:
        with SimDeviceServer() as devices, SimAcquirer() as acquirer:
            for i in range(n):
                for name, exe in exes.items():
                    d = Daemon(work / f"{name}-{i}", devices.url, acquirer.url)
                    d.exe = str(exe)
                    try:
                        d.spawn()
                        ready[name].append(d.wait_for("READY=1"))
                        rss[name].append(proc_status_kb(d.pid)["VmRSS"] / 1024)
                    finally:
                        d.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        name: {
            "exec_to_ready_s_median": round(statistics.median(ready[name]), 4),
            "exec_to_ready_s": [round(x, 4) for x in ready[name]],
            "rss_at_ready_mb_median": round(statistics.median(rss[name]), 1),
        }
        for name in exes
    }


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHASHSEED")}


def bundle_of(unpacked: Path) -> Path:
    return unpacked.parent / f"{unpacked.name}.tar.gz"


def listed(unpacked: Path) -> dict[str, str]:
    return parse_sums((unpacked / "SHA256SUMS").read_text())


def fetched(held: set[str], b: Path) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The files of ``b`` whose hash is not in ``held``: digest -> size (one download
    per distinct file), and each file as listed."""
    sizes: dict[str, int] = {}
    files = []
    for rel, digest in sorted(listed(b).items()):
        if digest in held:
            continue
        size = (b / rel).stat().st_size
        files.append({"path": rel, "bytes": size, "new": digest not in sizes})
        sizes.setdefault(digest, size)
    return sizes, files


def delta(a: Path, b: Path) -> dict[str, Any]:
    """What a terminal running ``a`` downloads to install ``b`` (module docstring)."""
    ota, files = fetched(set(listed(a).values()), b)
    media, _ = fetched({d for rel, d in listed(a).items() if rel.startswith(INSTALLED)}, b)
    total = sum(ota.values())
    payload = b"".join((b / f["path"]).read_bytes() for f in files if f["new"])
    full = bundle_of(b).stat().st_size
    return {
        "delta_bytes": total,
        "delta_gz_bytes": len(gzip.compress(payload, compresslevel=9, mtime=0)),
        "manifest_bytes": sum((b / n).stat().st_size for n in ("SHA256SUMS", "SHA256SUMS.sig")),
        "first_update_extra_bytes": sum(media.values()) - total,
        "files_downloaded": len(ota),
        "files_listed": len(listed(b)),
        "bundle_gz_bytes": full,
        "ratio_to_full_bundle": round(total / full, 4),
        "files": sorted(files, key=lambda f: -f["bytes"])[:8],
    }


def differing(a: Path, b: Path) -> list[str]:
    la, lb = listed(a), listed(b)
    return sorted(rel for rel in set(la) | set(lb) if la.get(rel) != lb.get(rel))


def module_changed(a: Path, b: Path, package: str) -> bool:
    """Whether the modules of ``package`` differ between the two builds, in the PYZ
    archive appended to the executable or (``--pyc``) as files under ``_internal/``:
    the bump really reached the build."""
    from PyInstaller.archive.readers import CArchiveReader

    def modules(unpacked: Path) -> dict[str, Any]:
        exe = CArchiveReader(str(unpacked / "tillflow-edge" / "tillflow-edge"))
        pyz = exe.open_embedded_archive("PYZ.pyz")
        names = [n for n in pyz.toc if n == package or n.startswith(package + ".")]
        found: dict[str, Any] = {n: pyz.extract(n) for n in names}
        internal = unpacked / "tillflow-edge" / "_internal"
        for path in [internal / f"{package}.pyc", *(internal / package).rglob("*")]:
            if path.is_file():
                found[str(path.relative_to(internal))] = path.read_bytes()
        return found

    return modules(a) != modules(b)


def pip_target(spec: str, into: Path) -> None:
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--disable-pip-version-check", "--target", str(into), spec], timeout=300)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--bump", default="idna==3.19",
                   help="a dependency one version back, for dep_old")  # fmt: skip
    p.add_argument("--pyc", default="", help="experiment: packages collected as .pyc files")
    p.add_argument("--starts", type=int, default=0, help="time N starts of build a")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    package, _, old_version = args.bump.partition("==")
    if not old_version:
        raise SystemExit("--bump is NAME==VERSION")
    work = Path(tempfile.mkdtemp(prefix="tf-delta-"))
    builds = Builds(work)
    result: dict[str, Any] = {"benchmark": "delta", "commit": builds.commit}
    pyc = [name for name in args.pyc.split(",") if name]
    if pyc:
        result["experiment"] = {"collected_as_pyc": pyc}
    try:
        shipped = None
        if pyc and args.starts:  # what ships, for the start-up comparison
            shipped = builds.build("a_shipped", builds.version)
        if pyc:
            builds.collect_as_pyc(pyc)
        v, nxt = builds.version, f"{builds.version}.1"
        a = builds.build("a", v)
        again = builds.build("a_again", v)
        edge = builds.build("edge", nxt, edit=True)
        site = work / "site"
        pip_target(args.bump, site)
        dep_old = builds.build("dep_old", v, site=site)
        dep_new = builds.build("dep_new", nxt)
        full = bundle_of(a).stat().st_size
        tree = sum((a / rel).stat().st_size for rel in listed(a))
        result["baseline"] = {
            "name": "full bundle, gzip'd",
            "bundle_gz_bytes": full,
            "tree_bytes": tree,
            "files": len(listed(a)),
            "fleet_gb": round(full * FLEET / 1e9, 1),
        }
        result["reproducible"] = {
            "identical_bundle": bundle_of(a).read_bytes() == bundle_of(again).read_bytes(),
            "differing_files": differing(a, again),
            "delta_bytes": delta(a, again)["delta_bytes"],
        }
        locked = importlib.metadata.version(package)
        if not module_changed(dep_old, dep_new, package):
            raise SystemExit(f"{args.bump}: the build's {package} modules did not change")
        cases = {
            "edge_one_line": {"change": f"one line appended to {EDGE_FILE}, version {nxt}",
                              **delta(a, edge)},
            "dependency_bump": {
                "change": f"{package} {old_version} -> {locked} (as locked), version {nxt}",
                **delta(dep_old, dep_new),
            },
        }  # fmt: skip
        for case in cases.values():
            case["fleet_gb"] = round(case["delta_bytes"] * FLEET / 1e9, 2)
        result["cases"] = cases
        result["build_s"] = builds.seconds
        if args.starts:
            exes = {"a": a / "tillflow-edge" / "tillflow-edge"}
            if shipped is not None:
                exes["a_shipped"] = shipped / "tillflow-edge" / "tillflow-edge"
            result["starts"] = starts(exes, args.starts)
        result["sha256_of_a_bundle"] = hashlib.sha256(bundle_of(a).read_bytes()).hexdigest()
        result["env"] = {"python": sys.version.split()[0], "nproc": os.cpu_count()}
    finally:
        builds.close()
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
