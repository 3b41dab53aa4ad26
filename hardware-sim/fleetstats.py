"""The fleet simulation's figures and checks (``hwsim.fleetsim``): CPU and memory of
every process (from /proc; a killed process's CPU is kept), distributions, the rollout
samples, the checks asked of the terminals themselves, and ``report.json``'s shape (the
contract ``hwsim.fleetreport`` renders)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class CpuLedger:
    """CPU seconds per process name, across restarts: when a name's pid changes, what
    the old process had used is kept (its last reading)."""

    def __init__(self) -> None:
        self._base: dict[str, float] = {}
        self._last: dict[str, tuple[int, float]] = {}
        self._fixed: dict[str, float] = {}

    def see(self, name: str, pid: int | None, cpu_s: float) -> None:
        if pid is None:
            return
        last = self._last.get(name)
        if last is not None and last[0] != pid:
            self._base[name] = self._base.get(name, 0.0) + last[1]
        self._last[name] = (pid, cpu_s)

    def set(self, name: str, cpu_s: float) -> None:
        self._fixed[name] = cpu_s

    def totals(self) -> dict[str, float]:
        out = {n: round(self._base.get(n, 0.0) + c, 2) for n, (_, c) in self._last.items()}
        out.update({n: round(c, 2) for n, c in self._fixed.items()})
        return out


def _stat(pid: int) -> tuple[float, float]:
    """(CPU seconds, memory MiB): the proportional set size (shared pages divided among
    the processes sharing them, so PostgreSQL's backends are not each charged its
    shared buffers), else the resident set."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / tick
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return cpu, int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page / 2**20
    return cpu, rss


def process_usage(pid: int | None) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of one process; zeros when it is gone."""
    if pid is None:
        return 0.0, 0.0
    try:
        return _stat(pid)
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0


def postgres_usage(database_url: str) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of the PostgreSQL backends serving ``database_url``'s
    database (their process titles name it; backends that exited are not counted)."""
    name = (urlsplit(database_url).path or "/").lstrip("/") or "postgres"
    cpu = rss = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if title.startswith("postgres: ") and f" {name} " in title:
                c, r = _stat(int(entry.name))
                cpu, rss = cpu + c, rss + r
    return round(cpu, 2), round(rss, 1)


def distribution(values: Sequence[float], buckets: int = 20) -> dict[str, Any]:
    """Quantiles and a histogram ``[[lo, hi, count], ...]`` of ``values``."""
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "histogram": []}
    xs = sorted(values)

    def q(p: float) -> float:
        return round(xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))], 3)

    lo, hi = xs[0], xs[-1]
    width = (hi - lo) / buckets if hi > lo else 1.0
    counts = [0] * buckets
    for x in xs:
        counts[min(buckets - 1, int((x - lo) / width))] += 1
    hist = [[round(lo + i * width, 3), round(lo + (i + 1) * width, 3), c]
            for i, c in enumerate(counts)]  # fmt: skip
    return {"count": len(xs), "mean": round(sum(xs) / len(xs), 3), "p50": q(0.5), "p90": q(0.9),
            "p99": q(0.99), "max": round(hi, 3), "histogram": hist}  # fmt: skip


def rollout_sample(t_s: float, v: dict[str, Any]) -> dict[str, Any]:
    """One point of a rollout's funnel: the waves' counts summed, and the failure rate."""
    sums = {k: sum(int(w.get(k) or 0) for w in v["waves"])
            for k in ("targeted", "notified", "applied", "healthy", "failed", "refused",
                      "timed_out", "cancelled")}  # fmt: skip
    back = v.get("rollback") or {}
    rate = v.get("rate") or {}
    pct = rate.get("failure_percent")
    return {"t_s": t_s, "wave": int(v["current_wave"]), "status": v["status"], **sums,
            "restored": int(back.get("restored") or 0),
            "to_restore": int(back.get("to_restore") or 0),
            "failure_rate": None if pct is None else round(float(pct) / 100, 4),
            "sampled": rate.get("sampled")}  # fmt: skip


def abort_reason(abort: dict[str, Any]) -> str:
    """An abort in words: the operator's reason, else the criterion and its figures."""
    if abort.get("reason"):
        return str(abort["reason"])
    f = abort.get("figures") or {}
    return (f"{abort.get('criterion')} in wave {abort.get('wave')}: {f.get('failures')} of "
            f"{f.get('sampled')} sampled failed ({f.get('failure_percent')}%, threshold "
            f"{f.get('threshold')}%)")  # fmt: skip


def _check(name: str, checked: int, bad: list[str]) -> dict[str, Any]:
    return {"name": name, "ok": not bad, "checked": checked, "violations": len(bad),
            "examples": bad[:10]}  # fmt: skip


def terminal_checks(versions: dict[str, Any], bad: dict[str, Any], good: dict[str, Any],
                    policy: dict[str, Any], baseline: int) -> list[dict[str, Any]]:  # fmt: skip
    """What the terminals' own databases say: each on the good config and the policy,
    none failing; each that applied the bad config restored."""
    want_config = int(good["view"]["document"]["version"])
    want_policy = int(policy["view"]["document"]["version"])
    off = [f"{v['name']} ({v['model']}): config v{v['config']}, policy v{v['policy']}"
           + (f", {v['last_error']}" if v["last_error"] else "")
           for v in versions.values()
           if v["config"] != want_config or v["policy"] != want_policy or v["failing"]]  # fmt: skip
    applied = [d for d in bad.get("devices", []) if d.get("applied_at") is not None]
    unrestored = [f"{d['device_id']}: restore {d.get('restore_status')}" for d in applied
                  if d.get("restore_status") != "restored"]  # fmt: skip
    return [
        _check(f"every terminal on config v{want_config} and policy v{want_policy}, none failing",
               len(versions), off),
        _check("every terminal that applied the bad config was restored", len(applied), unrestored),
    ]  # fmt: skip


def rollout_checks(
    rollouts: Sequence[dict[str, Any]], abort_wave: int | None = 2
) -> list[dict[str, Any]]:
    """Each rollout ended as the scenario expects; the bad one aborted in wave
    ``abort_wave`` (None: in any wave -- a small fleet's wave 2 may hold too few of the
    failing model to judge)."""
    bad = []
    for r in rollouts:
        if r.get("status") != r["expected"]:
            bad.append(f"{r['name']}: {r.get('status')}, expected {r['expected']}")
        if r["expected"] == "rolled_back" and abort_wave is not None:
            wave = ((r.get("view") or {}).get("abort") or {}).get("wave")
            if wave != abort_wave:
                bad.append(f"{r['name']}: aborted in wave {wave}, expected wave {abort_wave}")
    where = f" (the bad config aborted in wave {abort_wave})" if abort_wave else ""
    return [_check(f"every rollout ended as expected{where}", len(rollouts), bad)]


def timeline(
    requests: Sequence[tuple[float, float, int]], step_s: float = 10.0
) -> list[dict[str, Any]]:
    """Requests per second and latency quantiles per ``step_s`` window."""
    windows: dict[int, list[tuple[float, int]]] = {}
    for start, took, status in requests:
        windows.setdefault(int(start // step_s), []).append((took, status))
    out = []
    for w in sorted(windows):
        rows = windows[w]
        lat = sorted(t for t, _ in rows)

        def q(p: float, lat: list[float] = lat) -> float:
            return round(1000 * lat[min(len(lat) - 1, math.ceil(p * len(lat)) - 1)], 2)

        out.append({"t_s": round((w + 1) * step_s, 1),
                    "requests_per_s": round(len(rows) / step_s, 1),
                    "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99),
                    "errors": sum(1 for _, s in rows if s == 0 or s >= 500)})  # fmt: skip
    return out


def report(*, plan: Any, wall_s: float, ok: bool, checks: list[dict[str, Any]],
           phases: list[dict[str, Any]], rollouts: list[dict[str, Any]],
           requests: list[tuple[float, float, int]], cpu: dict[str, float],
           peak_rss: dict[str, float], measures: list[dict[str, Any]],
           events: list[dict[str, Any]], day: dict[str, list[float]],
           end: dict[str, list[float]], day_totals: dict[str, int], started_at: float,
           accounts: int, rounds: int) -> dict[str, Any]:  # fmt: skip
    """``report.json`` (the shape ``hwsim.fleetreport`` renders)."""
    shard_cpu = sum(v for k, v in cpu.items() if k.startswith("shard-"))
    sim_rss = sum(v for k, v in peak_rss.items() if k.startswith("shard-"))
    cloud_cpu = {k: v for k, v in cpu.items() if not k.startswith("shard-") and k != "coordinator"}
    n = max(1, plan.terminals)
    syncs = sum(m["syncs"] for m in measures)
    answered = [r for r in requests if r[2]]
    span = max((r[0] for r in requests), default=0.0) - min((r[0] for r in requests), default=0.0)
    profile = [{"where": p["name"], "wall_s": round(p["end_s"] - p["start_s"], 1), **p["cpu"]}
               for p in phases]  # fmt: skip
    return {
        "scenario": {"terminals": plan.terminals, "seed": plan.seed, "processes": plan.shards,
                     "hours": plan.hours, "started_at": time.strftime(
                         "%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
                     "wall_s": wall_s, "ok": ok, "rounds": rounds, "plan": asdict(plan),
                     "phases": [{"name": p["name"], "start_s": p["start_s"], "end_s": p["end_s"]}
                                for p in phases],
                     "events": events, "day": day_totals},
        "budget": {"wall_s": wall_s,
                   "sim_peak_rss_mib": round(sim_rss, 1),
                   "cloud_peak_rss_mib": {k: round(v, 1) for k, v in peak_rss.items()
                                          if not k.startswith("shard-")},
                   "cpu_ms_per_terminal": round(1000 * shard_cpu / n, 1),
                   "sim_cpu_s": round(shard_cpu, 1), "cloud_cpu_s": cloud_cpu,
                   "requests": len(requests), "answered": len(answered),
                   "requests_per_s": round(len(requests) / span, 1) if span else None,
                   "syncs": syncs, "syncs_per_terminal": round(syncs / n, 2),
                   "sync_failures": sum(m["sync_failures"] for m in measures)},
        "rollouts": [{k: v for k, v in r.items() if k not in ("view", "devices")}
                     for r in rollouts],
        "sync": {"lag_s": distribution(end.get("lag_s", [])),
                 "lag_s_end_of_day": distribution(day.get("lag_s", [])),
                 "outbox_age_s": distribution(day.get("outbox_age_s", [])),
                 "outbox_age_s_end": distribution(end.get("outbox_age_s", [])),
                 "syncs_per_terminal": distribution(end.get("syncs", []))},
        "cloud": {"timeline": timeline(requests)},
        "terminals": {"cpu_ms": distribution(end.get("cpu_ms", [])),
                      "rss_kib_per_terminal": round(1024 * sim_rss / n, 1),
                      "accounts": accounts},
        "reconciliation": {"ok": ok, "checks": checks},
        "profile": profile,
        "screenshots": [],
    }  # fmt: skip


def screenshots(scenario: Any, out: Path) -> list[dict[str, Any]]:
    """The dashboard's pages at the end of the run, when ``hwsim.screenshots`` and a
    Chromium are here (else none, and the report says so)."""
    if not Path("/usr/bin/chromium").exists():
        return []
    try:
        from hwsim import screenshots as shots  # type: ignore[attr-defined]
    except ImportError:
        return []
    rig = scenario.rig
    ids = [r["id"] for r in scenario.rollouts]
    device = next(iter(scenario.rollouts[0].get("devices") or [{}]), {}).get("device_id")
    try:
        found: list[dict[str, Any]] = shots.capture(rig.url, rig.admin_token(), out / "screenshots",
                                                    rollout_ids=ids, device_id=device)  # fmt: skip
    except Exception as exc:  # a picture is not worth failing the run for; say why
        scenario.event(f"screenshots failed: {exc!r}")
        return []
    for s in found:
        with contextlib.suppress(ValueError):
            s["path"] = str(Path(s["path"]).relative_to(out))
    return found


def render_html(report: dict[str, Any], out: Path) -> Path | None:
    try:
        from hwsim import fleetreport
    except ImportError:
        return None
    return fleetreport.render(report, out)


def summary(report: dict[str, Any]) -> str:
    s, b = report["scenario"], report["budget"]
    lines = [
        f"fleetsim: {s['terminals']:,} terminals, seed {s['seed']}: "
        + ("every check holds" if s["ok"] else "VIOLATIONS"),
        f"  wall {b['wall_s']:.0f} s, {s['rounds']} sync rounds, {b['syncs']:,} syncs, "
        f"{b['requests']:,} requests ({b['requests_per_s']}/s), terminal CPU "
        f"{b['cpu_ms_per_terminal']} ms each, simulator peak {b['sim_peak_rss_mib']:.0f} MiB",
    ]
    for c in report["reconciliation"]["checks"]:
        lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']} ({c['checked']:,} checked"
                     + (f", {c['violations']} violation(s): {'; '.join(c['examples'][:3])}"
                        if not c["ok"] else "") + ")")  # fmt: skip
    return "\n".join(lines)
