"""The fleet report's tables (``hwsim.fleetreport`` lays out the page): the budget
against the issue's targets, the reconciliation checks, where the CPU went, the
screenshots, and the small HTML helpers both modules use (a figure with its unit, a
tick or a cross, a two-column table of figures). Every string from the JSON is escaped
here; numbers the page has no row for are listed by name (``extra_rows``), so what a
newer simulator adds is seen, not dropped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from hwsim.reportview import View, is_number
from hwsim.svgplot import esc, fmt_number

#: The issue's budget: 10,000 terminals in 10 minutes or less ...
WALL_TARGET_S = 600.0
#: ... and peak memory (simulator plus cloud) under 12 GB, in MiB.
MEMORY_TARGET_MIB = 12e9 / 2**20
#: Examples shown per reconciliation check; the JSON holds what the simulator kept.
EXAMPLES_SHOWN = 5
#: Separates facts on one line (a middle dot).
DOT = " \u00b7 "
NOT_MEASURED = '<p class="nm">not measured</p>'


def fmt(value: float | None, unit: str = "", decimals: int = 1) -> str:
    """A figure with its unit, as escaped HTML; a whole number shows no decimals, a
    missing one says "not measured"."""
    if value is None:
        return '<span class="nm">not measured</span>'
    shown = f"{value:,.0f}" if value == int(value) else f"{value:,.{decimals}f}"
    return esc(f"{shown} {unit}".strip())


def tick(ok: bool | None) -> str:
    """A green tick, a red cross, or a grey "?" when it is not known."""
    if ok is None:
        return '<span class="nm">?</span>'
    return '<span class="ok">\u2713</span>' if ok else '<span class="bad">\u2717</span>'


def budget(report: View, problems: list[str]) -> str:
    """The budget table: each figure, and the issue's targets met or not (a missed one
    is added to ``problems``)."""
    view = report.obj("budget")
    if view is None or not view.data:
        return NOT_MEASURED
    terminals = (report.obj("scenario") or View({}, "scenario")).num("terminals")
    sim_rss, cloud_rss = view.num("sim_peak_rss_mib"), view.numbers("cloud_peak_rss_mib")
    wall = view.num("wall_s")
    total_rss = None if sim_rss is None else sim_rss + sum(cloud_rss.values())
    rows: list[tuple[str, str, str, bool | None]] = []
    per_n = f" (the target for {fmt_number(10000)} terminals)"
    wall_ok = None if wall is None else wall <= WALL_TARGET_S
    rows.append(("wall time", fmt(wall, "s"), f"\u2264 {WALL_TARGET_S:,.0f} s{per_n}", wall_ok))
    mem_ok = None if total_rss is None else total_rss <= MEMORY_TARGET_MIB
    target = f"\u2264 {MEMORY_TARGET_MIB:,.0f} MiB (12 GB)"
    rows.append(("peak RSS, simulator + cloud", fmt(total_rss, "MiB"), target, mem_ok))
    rows.append(("peak RSS, simulator", fmt(sim_rss, "MiB"), "", None))
    for name, mib in sorted(cloud_rss.items()):
        rows.append((f"peak RSS, cloud {name}", fmt(mib, "MiB"), "", None))
    rows.append(("CPU per terminal", fmt(view.num("cpu_ms_per_terminal"), "ms"), "", None))
    rows.append(("CPU, simulator", fmt(view.num("sim_cpu_s"), "s"), "", None))
    for name, cpu in sorted(view.numbers("cloud_cpu_s").items()):
        rows.append((f"CPU, cloud {name}", fmt(cpu, "s"), "", None))
    rows.append(("requests", fmt(view.num("requests")), "", None))
    rows.append(("requests/s sustained", fmt(view.num("requests_per_s"), "/s"), "", None))
    rows.append(("syncs", fmt(view.num("syncs")), "", None))
    rows += [(name, value, "", None) for name, value in extra_rows(view, BUDGET_SHOWN)]
    for label, ok in (("wall time", wall_ok), ("peak memory", mem_ok)):
        if ok is False:
            problems.append(f"budget: {label} over its target")
    body = "".join(
        f'<tr><td>{esc(name)}</td><td class="n">{value}</td><td>{esc(target)}</td>'
        f"<td>{tick(ok) if target else ''}</td></tr>"
        for name, value, target, ok in rows
    )
    note = "" if terminals is None else f" for {esc(fmt_number(terminals))} terminals"
    return (
        f"<p>Measured in this run{note}.</p><table><tr><th>measure</th><th>value</th>"
        f"<th>target</th><th></th></tr>{body}</table>"
    )


#: The budget's figures the table names itself; any other number is listed after them.
BUDGET_SHOWN = {"wall_s", "sim_peak_rss_mib", "cpu_ms_per_terminal", "sim_cpu_s", "requests",
                "requests_per_s", "syncs"}  # fmt: skip


def figures(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of (name, formatted value); the name is escaped here."""
    body = "".join(f'<tr><td>{esc(k)}</td><td class="n">{v}</td></tr>' for k, v in rows)
    return f'<table class="figures">{body}</table>' if body else NOT_MEASURED


#: Key suffixes read as units, longest first (``requests_per_s``, ``wall_s``, ...).
UNITS = (("_per_s", "/s"), ("_mib", "MiB"), ("_kib", "KiB"), ("_ms", "ms"), ("_s", "s"))


def name_and_unit(key: str) -> tuple[str, str]:
    """``lag_s_end_of_day`` -> ("lag, end of day", "s"); ``sync_failures`` -> (.., "")."""
    for suffix, unit in UNITS:
        head, sep, tail = key.partition(suffix)
        if sep and (not tail or tail.startswith("_")):
            name = head.replace("_", " ") + (", " + tail[1:].replace("_", " ") if tail else "")
            return name, unit
    return key.replace("_", " "), ""


def extra_rows(view: View, known: set[str]) -> list[tuple[str, str]]:
    """Numbers in ``view`` that the page does not otherwise show, as figures rows: a
    newer simulator's additions are seen, not dropped."""
    rows = []
    for key, value in view.data.items():
        if key not in known and is_number(value):
            name, unit = name_and_unit(key)
            rows.append((name, fmt(view.num(key), unit, 2)))
    return rows


def reconciliation_table(recon: View | None) -> str:
    checks = [] if recon is None else recon.items("checks")
    if not checks:
        return NOT_MEASURED
    rows = []
    for c in checks:
        examples = [esc(e) for e in c.raw_list("examples")[:EXAMPLES_SHOWN]]
        more = len(c.raw_list("examples")) - len(examples)
        shown = "<br/>".join(f"<code>{e}</code>" for e in examples)
        if more > 0:
            shown += f"<br/>(and {more} more)"
        rows.append(
            f'<tr class="check"><td>{tick(check_ok(c))}</td><td>{esc(c.text("name") or "?")}</td>'
            f'<td class="n">{fmt(c.num("checked"))}</td><td class="n">{fmt(c.num("violations"))}'
            f"</td><td>{shown}</td></tr>"
        )
    return (
        "<table><tr><th></th><th>check</th><th>checked</th><th>violations</th><th>examples</th>"
        f"</tr>{''.join(rows)}</table>"
    )


def check_ok(check: View) -> bool | None:
    ok, violations = check.flag("ok"), check.num("violations")
    if violations:
        return False
    return ok


def profile(report: View) -> str:
    """Where the CPU went: one row per place (or phase), its total (``cpu_s``, else the
    sum of its per-process figures) and share, and the per-process seconds if given."""
    entries = report.items("profile")
    if not entries:
        return NOT_MEASURED
    skip = {"where", "wall_s", "cpu_s"}
    procs = list(dict.fromkeys(k for e in entries for k, v in e.data.items()
                               if k not in skip and is_number(v)))  # fmt: skip
    rows = []
    for e in entries:
        per = {p: e.num(p) for p in procs}
        total = e.num("cpu_s")
        total = total if total is not None else sum(v or 0.0 for v in per.values())
        rows.append((e.text("where") or "?", e.num("wall_s"), per, total))
    grand = sum(r[3] for r in rows) or 1.0
    walls = any(r[1] is not None for r in rows)
    head = "<th>where</th>" + ("<th>wall</th>" if walls else "") + "<th>CPU</th><th>share</th>"
    head += "<th></th>" + "".join(f"<th>{esc(p)}</th>" for p in procs)
    body = "".join(
        f"<tr><td>{esc(where)}</td>"
        + (f'<td class="n">{fmt(wall, "s")}</td>' if walls else "")
        + f'<td class="n">{fmt(total, "s")}</td><td class="n">{100 * total / grand:.1f}%</td>'
        f'<td><span class="share" style="width:{200 * total / grand:.0f}px"></span></td>'
        + "".join(f'<td class="n">{fmt(per[p], "s")}</td>' for p in procs)
        + "</tr>"
        for where, wall, per, total in rows
    )
    return f'<table id="profile-table"><tr>{head}</tr>{body}</table>'


def screenshots(report: View, out_dir: Path) -> str:
    shots = report.items("screenshots")
    if not shots:
        return NOT_MEASURED
    out = []
    for s in shots:
        page, path = s.text("page") or "?", s.text("path") or ""
        rel = PurePosixPath(path)
        if not path or rel.is_absolute() or ".." in rel.parts or ":" in path or "\\" in path:
            out.append(
                f'<p class="err">{esc(page)}: not shown, <code>{esc(path)}</code> is not'
                " a path relative to the report</p>"
            )
            continue
        missing = "" if (out_dir / rel).is_file() else " (file missing beside the report)"
        out.append(
            f'<figure class="screenshot"><img src="{esc(rel.as_posix())}" alt="{esc(page)}"/>'
            f"<figcaption>{esc(page)}, loaded in {fmt(s.num('load_ms'), 'ms')}"
            f"{esc(missing)}</figcaption></figure>"
        )
    return "".join(out)
