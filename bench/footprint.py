"""Footprint of the frozen terminal binary against the source daemon (the baseline).

    python bench/footprint.py [--quick] [--starts N] [--idle-s S] [--payments N] [--dist DIR]

Legs, interleaved start by start: ``source`` (``python -m edge.cli edge run``, the
baseline), ``onedir`` (``dist/tillflow-edge/tillflow-edge run``, what ships) and, when
``make package-onefile`` built it, ``onefile`` (``dist/onefile/tillflow-edge``; its
RSS is the bootloader's plus its Python child's). Per leg: exec -> READY=1 (median of
``--starts`` starts on fresh data dirs, the approach of ``bench/payments.py``), with the
CPU seconds the process used to get there (less sensitive to a busy machine), VmRSS
after ``--idle-s`` seconds idle, then VmRSS and VmHWM after ``--payments`` payments
through the local API (the payments bench's online/offline mix); the idle RSS is also
split into anonymous and file-backed memory with the largest mappings (``smaps``; of the
main process). Sizes: the onedir tree, its executable, the tree as a gzip'd tar (what
is flashed), the onefile binary.

Where the MB go:

- ``sizes.by_package``: the onedir tree per top-level package (``_internal/<name>``, a
  ``.dist-info`` counted with its package, lib-dynload as ``stdlib-extensions``), on
  disk and gzip'd file by file; the executable's PYZ (the compressed pure modules) per
  top-level package.
- ``idle_imports``: what the idle daemon has imported. ``tillflow-edge run`` from source
  (``sync.device.main``, what the binary runs) with ``packaging/excludes.py``'s modules
  blocked (as in the binary; its ``-OO`` bytecode, without docstrings, is not used:
  about 1.5 MB less in the binary) dumps ``sys.modules``
  after ``--idle-s`` idle; then a fresh interpreter imports those modules group by group
  (stdlib, each third-party package, each edge/sync subpackage) and the VmRSS each
  group adds is its share (a group pulls in what no earlier group did); the daemon's
  idle RSS less the last figure is its data (workflows, database, threads).
- ``import_edge_engine``: ``import edge.engine`` in a fresh interpreter (median of
  starts), against a bare interpreter's start in the same run.

From source, children keep bytecode caches (``PYTHONDONTWRITEBYTECODE`` dropped): the
first run compiles, the figures are of the runs after it.

``--before DIR`` runs an earlier checkout's source and binary as legs of the same run,
with its sizes and imports (``before_*``), and ``after_over_before`` gives the ratios.

Prints one JSON object; ratios are ``leg / source`` from the same run.
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.payments import (  # noqa: E402
    DaemonProcess,
    SimAcquirer,
    SimDeviceServer,
    api_leg,
    child_env,
    proc_cpu_s,
    proc_status_kb,
    progress,
    short_tempdir,
)

DIST = ROOT / "dist"
#: Issue 17's targets on a 2-core machine (the bundle with the sync client inside).
TARGETS = {"binary_mb": 13.0, "exec_to_ready_s": 0.25, "idle_rss_mb": 35.0}
#: Seconds to wait for a child's answer (an idle dump, an import probe).
CHILD_TIMEOUT_S = 60.0


def source_env(root: Path = ROOT) -> dict[str, str]:
    """``child_env`` with the source tree ``root`` importable (this checkout, or the
    ``--before`` one), keeping bytecode caches: from source, a module is compiled once
    (as on a developer's machine), not at every start (PYTHONDONTWRITEBYTECODE)."""
    env = child_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env["PYTHONPATH"]])
    return env


class Daemon(DaemonProcess):
    """``DaemonProcess`` of the payments bench, started from a given command."""

    def __init__(self, cmd: list[str], *args: Any, root: Path = ROOT) -> None:
        super().__init__(*args)
        self.cmd = [*cmd, "run", "--config", str(self.config)]
        self.root = root

    def spawn(self) -> None:
        env = {**source_env(self.root), "NOTIFY_SOCKET": str(self.notify_path)}
        if self.cmd[0] != sys.executable:
            env.pop("PYTHONPATH", None)  # a frozen binary needs no source tree
        with open(self.log, "ab") as log:
            self.t_exec = time.perf_counter()
            self.proc = subprocess.Popen(
                self.cmd, env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=log
            )


def tree_rss_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` plus its children (a onefile bootloader's Python)."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    stats = [proc_status_kb(p) for p in pids]
    return {
        "vm_rss_mb": round(sum(s["VmRSS"] for s in stats) / 1024, 1),
        "vm_hwm_mb": round(sum(s.get("VmHWM", 0) for s in stats) / 1024, 1),
        "processes": len(pids),
    }


def smaps_breakdown_mb(pid: int, top: int = 10) -> dict[str, Any]:
    """Where ``pid``'s RSS is (``/proc/PID/smaps``): anonymous (heap, Python's arenas,
    relocated library data: private memory) against file-backed (clean library pages,
    reclaimable and shared), and the largest mappings by RSS."""
    per: dict[str, dict[str, int]] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if not parts[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            name = (
                Path(parts[5]).name
                if len(parts) > 5 and "/" in parts[5]
                else (parts[5] if len(parts) > 5 else "[anon]")
            )
        elif parts[0] in ("Rss:", "Anonymous:"):
            entry = per.setdefault(name, {"Rss": 0, "Anonymous": 0})
            entry[parts[0][:-1]] += int(parts[1])
    rss = sum(v["Rss"] for v in per.values())
    anon = sum(v["Anonymous"] for v in per.values())
    largest = sorted(per.items(), key=lambda kv: -kv[1]["Rss"])[:top]
    return {
        "rss_mb": round(rss / 1024, 1),
        "anonymous_mb": round(anon / 1024, 1),
        "file_backed_mb": round((rss - anon) / 1024, 1),
        "largest_mappings_mb": {k: round(v["Rss"] / 1024, 2) for k, v in largest},
    }


def _package_of(rel: Path) -> str:
    """The top-level package a file of the onedir tree belongs to."""
    parts = rel.parts
    if parts[0] != "_internal" or len(parts) < 2:
        return "executable" if len(parts) == 1 else parts[0]
    if parts[1].startswith("python3") and "lib-dynload" in parts:
        return "stdlib-extensions"
    name = parts[1]
    if name.endswith(".dist-info"):
        return name.split("-")[0].lower()
    if name.startswith("lib") and ".so" in name:
        return name.split(".so")[0]  # libcrypto.so.3 -> libcrypto
    return name.split(".")[0]  # _cffi_backend.cpython-311-...so -> _cffi_backend


def pyz_by_package(executable: Path) -> dict[str, float]:
    """KB of the executable's PYZ (zlib'd pure modules) per top-level package."""
    from PyInstaller.archive.readers import CArchiveReader

    archive = CArchiveReader(str(executable))
    per: dict[str, int] = {}
    for name in archive.toc:
        if not name.endswith(".pyz"):
            continue
        for module, (_typecode, _offset, length) in archive.open_embedded_archive(name).toc.items():
            top = module.split(".")[0]
            per[top] = per.get(top, 0) + length
    return {k: round(v / 1e3, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}


def sizes(onedir: Path, onefile: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tree = onedir.parent
    files = [p for p in tree.rglob("*") if p.is_file()]
    out["onedir_tree_mb"] = round(sum(p.stat().st_size for p in files) / 1e6, 2)
    out["onedir_executable_mb"] = round(onedir.stat().st_size / 1e6, 2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(tree, arcname="tillflow-edge")
    out["onedir_tar_gz_mb"] = round(len(gzip.compress(buf.getvalue(), 6)) / 1e6, 2)
    big = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:8]
    out["largest_files_mb"] = {
        str(p.relative_to(tree)): round(p.stat().st_size / 1e6, 2) for p in big
    }
    per: dict[str, list[int]] = {}
    for p in files:
        data = p.read_bytes()
        entry = per.setdefault(_package_of(p.relative_to(tree)), [0, 0])
        entry[0] += len(data)
        entry[1] += len(gzip.compress(data, 6))
    out["by_package_mb"] = {
        k: {"disk": round(d / 1e6, 2), "gzip": round(g / 1e6, 2)}
        for k, (d, g) in sorted(per.items(), key=lambda kv: -kv[1][1])
    }
    out["pyz_by_package_kb"] = pyz_by_package(onedir)
    if onefile.exists():
        out["onefile_mb"] = round(onefile.stat().st_size / 1e6, 2)
    return out


# --- what the idle daemon imported, and what each group of it costs ---------------------

#: Run as ``python PROBE ROOT OUT run --config FILE``: ``tillflow-edge`` from source with
#: packaging/excludes.py's modules absent (as in the binary); SIGUSR1 writes
#: ``sys.modules`` and VmRSS to OUT (the daemon leaves that signal alone).
IDLE_PROBE = """
import json, os, runpy, signal, sys
sys.path.insert(0, os.path.join(sys.argv[1], "packaging"))
from excludes import EXCLUDES
for name in EXCLUDES:
    sys.modules.setdefault(name, None)
OUT = sys.argv[2]
def dump(*_):
    rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
    with open(OUT + ".tmp", "w") as f:
        json.dump({"rss_kb": rss, "modules": sorted(k for k, v in sys.modules.items() if v)}, f)
    os.replace(OUT + ".tmp", OUT)
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["tillflow-edge", *sys.argv[3:]]
runpy.run_module("sync.device.main", run_name="__main__", alter_sys=True)
"""

#: Reads the idle modules (JSON) on stdin, imports them group by group, prints
#: [[group, VmRSS kB after it, modules after it], ...].
GROUPS_PROBE = """
import importlib, importlib.util, json, os, sys, sysconfig
sys.path.insert(0, os.path.join(sys.argv[1], "packaging"))
from excludes import EXCLUDES
for name in EXCLUDES:
    sys.modules.setdefault(name, None)
wanted = json.load(sys.stdin)
STDLIB = sysconfig.get_paths()["stdlib"]
ALIASES = {"pydantic_core": "pydantic", "annotated_types": "pydantic",
           "typing_inspection": "pydantic", "typing_extensions": "pydantic",
           "_yaml": "yaml", "_cffi_backend": "cryptography", "certifi": "httpx",
           "httpcore": "httpx", "idna": "httpx"}
FIRST = ["stdlib", "yaml", "apsw", "h11", "pydantic"]
# edge and sync in the order they build on each other, so a group's figure is its own
EDGE = ["edge", "edge.errors", "edge.engine", "edge.store", "edge.terminal",
        "edge.terminal.files", "edge.terminal.moved", "edge.terminal.carddata",
        "edge.terminal.config", "edge.terminal.drivers", "edge.terminal.sale",
        "edge.terminal.service", "edge.cli", "sync", "sync.wire", "sync.signing",
        "sync.device"]
def group(name):
    parts = name.split(".")
    if parts[0] in ("edge", "sync"):
        return ".".join(parts[:3] if parts[:2] == ["edge", "terminal"] else parts[:2])
    if parts[0] in sys.builtin_module_names:
        return "stdlib"
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) or ""
    if spec is None or "site-packages" not in origin:
        return "stdlib"
    return ALIASES.get(parts[0], parts[0])
groups = {}
for name in wanted:
    if name in ("__main__", "runpy") or name.startswith(("__editable__", "_distutils")):
        continue
    g = group(name)
    if g is not None:
        groups.setdefault(g, []).append(name)
def order(g):
    if g in FIRST:
        return (0, FIRST.index(g), g)
    if g in EDGE:
        return (2, EDGE.index(g), g)
    return (3 if g.startswith(("edge", "sync")) else 1, 0, g)
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
out = [["interpreter", rss(), len(sys.modules)]]
for g in sorted(groups, key=order):
    for name in groups[g]:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    out.append([g, rss(), len(sys.modules)])
print(json.dumps(out))
"""


def idle_imports(
    work: Path, devices_url: str, acquirer_url: str, idle_s: float, root: Path = ROOT
) -> dict[str, Any]:
    """The idle daemon's modules (from the source tree ``root``, as the binary runs) and
    each group's RSS."""
    work.mkdir(parents=True, exist_ok=True)
    probe = work / "idle_probe.py"
    probe.write_text(IDLE_PROBE)
    out = work / "idle_modules.json"
    d = Daemon(
        [sys.executable, str(probe), str(root), str(out)],
        work / "idle-imports",
        devices_url,
        acquirer_url,
        root=root,
    )
    try:
        d.spawn()
        d.wait_for("READY=1")
        time.sleep(idle_s)  # the idle period being measured, not a stand-in clock
        os.kill(d.pid, signal.SIGUSR1)
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not out.exists():
            if time.monotonic() > deadline or (d.proc is not None and d.proc.poll() is not None):
                raise RuntimeError(f"the idle daemon wrote no module list{d.log_tail()}")
            time.sleep(0.05)  # polling a file the child writes, with a deadline
        dump = json.loads(out.read_text())
    finally:
        d.stop()
    modules: list[str] = dump["modules"]
    proc = subprocess.run(
        [sys.executable, "-c", GROUPS_PROBE, str(root)],
        input=json.dumps(modules),
        capture_output=True,
        text=True,
        env=source_env(root),
        cwd=root,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    steps = json.loads(proc.stdout)
    by_group: dict[str, dict[str, float]] = {
        "interpreter": {"rss_mb": round(steps[0][1] / 1024, 1)}
    }
    for (_, rss0, n0), (name, rss1, n1) in itertools.pairwise(steps):
        by_group[name] = {"rss_mb": round((rss1 - rss0) / 1024, 2), "modules": n1 - n0}
    idle_kb = dump["rss_kb"]
    by_group["daemon data (workflows, database, threads)"] = {
        "rss_mb": round((idle_kb - steps[-1][1]) / 1024, 2)
    }
    tops: dict[str, int] = {}
    for m in modules:
        tops[m.split(".")[0]] = tops.get(m.split(".")[0], 0) + 1
    return {
        "how": "python -m sync.device.main run, packaging/excludes.py blocked",
        "idle_rss_mb": round(idle_kb / 1024, 1),
        "modules": len(modules),
        "rss_by_group_mb": by_group,
        "modules_by_top_level": dict(sorted(tops.items(), key=lambda kv: -kv[1])),
        "third_party": sorted(
            {m.split(".")[0] for m in modules}
            & {"httpx", "httpcore", "cryptography", "pydantic", "yaml", "apsw", "h11", "idna"}
        ),
    }


def import_time(code: str, runs: int, root: Path = ROOT) -> float:
    """Median seconds of ``code`` run in a fresh interpreter (timed inside it)."""
    script = f"import time\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
    samples = []
    for _ in range(runs + 1):  # the first run may write bytecode caches: not counted
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=source_env(root),
            cwd=root,
            timeout=CHILD_TIMEOUT_S,
            check=True,
        )
        samples.append(float(proc.stdout.split()[-1]))
    return statistics.median(samples[1:])


def interpreter_start_s(runs: int) -> float:
    """Median seconds from exec to exit of ``python -c pass`` (the baseline)."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=source_env(), cwd=ROOT, check=True)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="3 starts, 2 s idle, 30 payments")
    p.add_argument("--starts", type=int)
    p.add_argument("--idle-s", type=float)
    p.add_argument("--payments", type=int)
    p.add_argument("--dist", type=Path, default=DIST, help="where `make package` put it")
    p.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="a checkout of an earlier commit with its binary built in DIR/dist (e.g. "
        "`git worktree add DIR REV`, then build there): its source and onedir run as "
        "legs of this same run (before_source, before_onedir), with its sizes and imports",
    )
    args = p.parse_args(argv)
    starts = args.starts or (3 if args.quick else 7)
    idle_s = args.idle_s if args.idle_s is not None else (2.0 if args.quick else 10.0)
    payments = args.payments or (30 if args.quick else 200)
    onedir = args.dist / "tillflow-edge" / "tillflow-edge"
    onefile = args.dist / "onefile" / "tillflow-edge"
    if not onedir.exists():
        raise SystemExit(f"{onedir}: no binary; run `make package`")
    source = [sys.executable, "-m", "edge.cli", "edge"]
    legs: dict[str, tuple[list[str], Path]] = {
        "source": (source, ROOT),
        "onedir": ([str(onedir)], ROOT),
    }
    if onefile.exists():
        legs["onefile"] = ([str(onefile)], ROOT)
    roots = {"": ROOT}
    if args.before is not None:
        before = args.before.resolve() / "dist" / "tillflow-edge" / "tillflow-edge"
        if not before.exists():
            raise SystemExit(f"{before}: no binary; build it in {args.before}")
        legs["before_source"] = (source, args.before.resolve())
        legs["before_onedir"] = ([str(before)], args.before.resolve())
        roots["before_"] = args.before.resolve()
    work = short_tempdir("tff-")
    result: dict[str, Any] = {"benchmark": "footprint", "legs": {}}
    runs = max(3, starts)
    bare = interpreter_start_s(runs)
    result["bare_interpreter_start_s_median"] = round(bare, 4)
    for prefix, root in roots.items():
        tree = root / "dist" if prefix else args.dist
        result[f"{prefix}sizes"] = sizes(tree / "tillflow-edge" / "tillflow-edge", tree / "onefile")
        engine_import = import_time("import edge.engine", runs, root)
        result[f"{prefix}import_edge_engine"] = {
            "import_s_median": round(engine_import, 4),
            "ratio_to_interpreter_start": round(engine_import / bare, 3),
        }
        progress(f"{prefix}import edge.engine {engine_import:.3f}s (bare start {bare:.3f}s)")
    ready: dict[str, list[float]] = {name: [] for name in legs}
    cpu: dict[str, list[float]] = {name: [] for name in legs}
    with SimDeviceServer() as devices, SimAcquirer() as acquirer:
        for prefix, root in roots.items():
            found = idle_imports(work / f"{prefix}imports", devices.url, acquirer.url, idle_s, root)
            result[f"{prefix}idle_imports"] = found
            progress(f"{prefix}idle imports: {found['modules']} modules, {found['idle_rss_mb']} MB")
        for n in range(starts):
            for name, (cmd, root) in legs.items():
                d = Daemon(cmd, work / f"{name}-start{n}", devices.url, acquirer.url, root=root)
                try:
                    d.spawn()
                    ready[name].append(d.wait_for("READY=1"))
                    cpu[name].append(proc_cpu_s(d.pid))  # robust to a busy machine
                finally:
                    d.stop()
            progress(
                f"start {n + 1}/{starts}: "
                + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in ready.items())
            )
        for name, (cmd, root) in legs.items():
            d = Daemon(cmd, work / f"{name}-load", devices.url, acquirer.url, root=root)
            try:
                d.spawn()
                d.wait_for("READY=1")
                time.sleep(idle_s)  # the idle period being measured, not a stand-in clock
                idle = tree_rss_mb(d.pid)
                idle_smaps = smaps_breakdown_mb(d.pid)
                failed = None
                with d.client() as client:
                    leg = api_leg(d, client, devices)
                    try:
                        leg.batch(payments)
                    except SystemExit as exc:  # a payment that went wrong: said, not fatal
                        failed = str(exc)
                    loaded = tree_rss_mb(d.pid)
                rate = leg.count / leg.wall_s if leg.wall_s else 0.0
            finally:
                d.stop()
            progress(f"{name}: idle {idle['vm_rss_mb']} MB, after load {loaded['vm_rss_mb']} MB")
            result["legs"][name] = {
                "exec_to_ready_s_median": round(statistics.median(ready[name]), 4),
                "exec_to_ready_s": [round(x, 4) for x in ready[name]],
                "cpu_to_ready_s_median": round(statistics.median(cpu[name]), 4),
                "idle_rss_mb": idle["vm_rss_mb"],
                "idle_smaps": idle_smaps,
                "processes": idle["processes"],
                "rss_after_payments_mb": loaded["vm_rss_mb"],
                "rss_peak_mb": loaded["vm_hwm_mb"],
                "payments": payments,
                "payments_per_s": round(rate, 1),
            }
            if failed:
                result["legs"][name]["payments_failed"] = failed
    base = result["legs"]["source"]
    for name, leg in result["legs"].items():
        if name != "source":  # before_* against this tree's source, as the others
            leg["ratio_to_source"] = {
                k: round(leg[k] / base[k], 3)
                for k in (
                    "exec_to_ready_s_median",
                    "cpu_to_ready_s_median",
                    "idle_rss_mb",
                    "rss_after_payments_mb",
                )
            }
    if "before_onedir" in result["legs"]:
        keys = ("exec_to_ready_s_median", "cpu_to_ready_s_median", "idle_rss_mb")
        result["after_over_before"] = {
            now: {k: round(result["legs"][now][k] / result["legs"][then][k], 3) for k in keys}
            for now, then in (("onedir", "before_onedir"), ("source", "before_source"))
        }
        result["after_over_before"]["onedir_tar_gz_mb"] = round(
            result["sizes"]["onedir_tar_gz_mb"] / result["before_sizes"]["onedir_tar_gz_mb"], 3
        )
    ship = result["legs"]["onedir"]
    result["targets"] = TARGETS
    result["meets"] = {
        "binary_mb (gzip'd tree, flashed)": result["sizes"]["onedir_tar_gz_mb"]
        <= TARGETS["binary_mb"],
        "exec_to_ready_s": ship["exec_to_ready_s_median"] <= TARGETS["exec_to_ready_s"],
        "idle_rss_mb": ship["idle_rss_mb"] <= TARGETS["idle_rss_mb"],
    }
    result["params"] = {"starts": starts, "idle_s": idle_s, "payments": payments}
    result["env"] = {
        "python": sys.version.split()[0],
        "nproc": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
