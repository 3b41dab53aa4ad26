"""Footprint of the frozen terminal binary against the source daemon (the baseline).

    python bench/footprint.py [--quick] [--starts N] [--idle-s S] [--payments N]

Legs, interleaved start by start: ``source`` (``python -m edge.cli edge run``, the
baseline), ``onedir`` (``dist/tillflow-edge/tillflow-edge run``, what ships) and, when
``make package-onefile`` built it, ``onefile`` (``dist/onefile/tillflow-edge``; its
RSS is the bootloader's plus its Python child's). Per leg: exec -> READY=1 (median of
``--starts`` starts on fresh data dirs, the approach of ``bench/payments.py``), VmRSS
after ``--idle-s`` seconds idle, then VmRSS and VmHWM after ``--payments`` payments
through the local API (the payments bench's online/offline mix); the idle RSS is also
split into anonymous and file-backed memory with the largest mappings (``smaps``; of the
main process). Sizes: the onedir tree, its executable, the tree as a gzip'd tar (what
is flashed), the onefile binary.

Prints one JSON object; ratios are ``leg / source`` from the same run.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
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
    proc_status_kb,
    progress,
    short_tempdir,
)

ONEDIR = ROOT / "dist" / "tillflow-edge" / "tillflow-edge"
ONEFILE = ROOT / "dist" / "onefile" / "tillflow-edge"
TARGETS = {"binary_mb": 15.0, "exec_to_ready_s": 0.5, "idle_rss_mb": 30.0}


class Daemon(DaemonProcess):
    """``DaemonProcess`` of the payments bench, started from a given command."""

    def __init__(self, cmd: list[str], *args: Any) -> None:
        super().__init__(*args)
        self.cmd = [*cmd, "run", "--config", str(self.config)]

    def spawn(self) -> None:
        env = {**child_env(), "NOTIFY_SOCKET": str(self.notify_path)}
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


def sizes() -> dict[str, Any]:
    out: dict[str, Any] = {}
    tree = ONEDIR.parent
    files = [p for p in tree.rglob("*") if p.is_file()]
    out["onedir_tree_mb"] = round(sum(p.stat().st_size for p in files) / 1e6, 2)
    out["onedir_executable_mb"] = round(ONEDIR.stat().st_size / 1e6, 2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(tree, arcname="tillflow-edge")
    out["onedir_tar_gz_mb"] = round(len(gzip.compress(buf.getvalue(), 6)) / 1e6, 2)
    big = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:8]
    out["largest_files_mb"] = {
        str(p.relative_to(tree)): round(p.stat().st_size / 1e6, 2) for p in big
    }
    if ONEFILE.exists():
        out["onefile_mb"] = round(ONEFILE.stat().st_size / 1e6, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="3 starts, 2 s idle, 30 payments")
    p.add_argument("--starts", type=int)
    p.add_argument("--idle-s", type=float)
    p.add_argument("--payments", type=int)
    args = p.parse_args(argv)
    starts = args.starts or (3 if args.quick else 7)
    idle_s = args.idle_s if args.idle_s is not None else (2.0 if args.quick else 10.0)
    payments = args.payments or (30 if args.quick else 200)
    if not ONEDIR.exists():
        raise SystemExit(f"{ONEDIR}: no binary; run `make package`")

    legs: dict[str, list[str]] = {
        "source": [sys.executable, "-m", "edge.cli", "edge"],
        "onedir": [str(ONEDIR)],
    }
    if ONEFILE.exists():
        legs["onefile"] = [str(ONEFILE)]
    work = short_tempdir("tff-")
    result: dict[str, Any] = {"benchmark": "footprint", "sizes": sizes(), "legs": {}}
    ready: dict[str, list[float]] = {name: [] for name in legs}
    with SimDeviceServer() as devices, SimAcquirer() as acquirer:
        for n in range(starts):
            for name, cmd in legs.items():
                d = Daemon(cmd, work / f"{name}-start{n}", devices.url, acquirer.url)
                try:
                    d.spawn()
                    ready[name].append(d.wait_for("READY=1"))
                finally:
                    d.stop()
            progress(
                f"start {n + 1}/{starts}: "
                + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in ready.items())
            )
        for name, cmd in legs.items():
            d = Daemon(cmd, work / f"{name}-load", devices.url, acquirer.url)
            try:
                d.spawn()
                d.wait_for("READY=1")
                time.sleep(idle_s)  # the idle period being measured, not a stand-in clock
                idle = tree_rss_mb(d.pid)
                idle_smaps = smaps_breakdown_mb(d.pid)
                with d.client() as client:
                    leg = api_leg(d, client, devices)
                    leg.batch(payments)
                    loaded = tree_rss_mb(d.pid)
                rate = leg.count / leg.wall_s
            finally:
                d.stop()
            progress(f"{name}: idle {idle['vm_rss_mb']} MB, after load {loaded['vm_rss_mb']} MB")
            result["legs"][name] = {
                "exec_to_ready_s_median": round(statistics.median(ready[name]), 4),
                "exec_to_ready_s": [round(x, 4) for x in ready[name]],
                "idle_rss_mb": idle["vm_rss_mb"],
                "idle_smaps": idle_smaps,
                "processes": idle["processes"],
                "rss_after_payments_mb": loaded["vm_rss_mb"],
                "rss_peak_mb": loaded["vm_hwm_mb"],
                "payments": payments,
                "payments_per_s": round(rate, 1),
            }
    base = result["legs"]["source"]
    for name, leg in result["legs"].items():
        if name != "source":
            leg["ratio_to_source"] = {
                k: round(leg[k] / base[k], 3)
                for k in ("exec_to_ready_s_median", "idle_rss_mb", "rss_after_payments_mb")
            }
    ship = result["legs"]["onedir"]
    result["targets"] = TARGETS
    result["meets"] = {
        "binary_mb (gzip'd tree, flashed)": result["sizes"]["onedir_tar_gz_mb"]
        <= TARGETS["binary_mb"],
        "exec_to_ready_s": ship["exec_to_ready_s_median"] <= TARGETS["exec_to_ready_s"],
        "idle_rss_mb": ship["idle_rss_mb"] <= TARGETS["idle_rss_mb"],
    }
    result["params"] = {"starts": starts, "idle_s": idle_s, "payments": payments}
    result["env"] = {"python": sys.version.split()[0], "nproc": os.cpu_count()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
