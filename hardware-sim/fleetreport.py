"""The fleet simulation's report page: ``report.json`` (written by ``hwsim.fleetsim``)
turned into one self-contained ``report.html``, the page an operator or a CI reviewer
reads to decide whether a release survived 10,000 terminals.

Top to bottom: the verdict (reconciliation passed, or each violation by name, and
anything else that went wrong: the scenario's own failure, a rollout that ended other
than expected, a budget target missed, a section that could not be read), the budget
table against the issue's targets, then the charts (phases, each rollout's funnel and
failure rate against its abort threshold, sync lag and outbox age, cloud rate and
latency, per-terminal cost), the reconciliation, profile and screenshot sections.

The tables (budget, reconciliation, profile, screenshots) are ``hwsim.fleettables``'.
Self-contained: inline SVG drawn by ``hwsim.svgplot``, a little inline CSS, no script, no
network; screenshots are ``<img>`` of PNG paths relative to the page. Every string taken
from the JSON is escaped (device names and reasons are data). Any section may be missing
or empty and renders as "not measured"; a section of the wrong shape renders as
"unreadable" with the JSON path that was wrong (``hwsim.reportview`` reads the JSON), and
is named in the verdict, so one bad field never hides the rest of the run.

    render(report, out_dir) -> out_dir/report.html
    python -m hwsim.fleetreport report.json [-o DIR]   (DIR defaults to report.json's)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hwsim import svgplot
from hwsim.fleettables import (
    DOT,
    NOT_MEASURED,
    budget,
    check_ok,
    extra_rows,
    figures,
    fmt,
    name_and_unit,
    profile,
    reconciliation_table,
    screenshots,
    tick,
)
from hwsim.reportview import ReportError, View, is_number
from hwsim.svgplot import Marker, Series, Threshold, esc, fmt_number

__all__ = ["ReportError", "main", "render"]

#: Funnel lines in drawing order, with their colours; ``restored`` joins after an abort.
FUNNEL = (
    ("notified", "#56B4E9"),
    ("applied", "#0072B2"),
    ("healthy", "#009E73"),
    ("failed", "#D55E00"),
    ("restored", "#E69F00"),
)
#: Outcomes drawn only when some sample has one (dashed: they are rarer, secondary).
FUNNEL_RARE = (
    ("refused", "#CC79A7"),
    ("timed_out", "#000000"),
    ("cancelled", "#888888"),
    ("to_restore", "#E69F00"),
)
CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;margin:24px auto;max-width:1260px;
padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;
border-bottom:1px solid #ddd;padding-bottom:4px}h3{font-size:15px;margin:16px 0 6px}
.meta{color:#555}.verdict{border-radius:6px;padding:12px 16px;margin:14px 0;
border:2px solid}.verdict.pass{background:#e9f7ef;border-color:#1e8449}
.verdict.fail{background:#fdecea;border-color:#c0392b}
.verdict.unknown{background:#fef5e7;border-color:#b9770e}.verdict .word{font-size:20px;
font-weight:bold}.verdict ul{margin:6px 0 0}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1e8449;font-weight:bold}.bad{color:#c0392b;font-weight:bold}
.nm{color:#888;font-style:italic}.err{color:#c0392b}.charts{display:flex;flex-wrap:wrap;
gap:12px}.charts>div{max-width:604px}.chart{border:1px solid #eee;background:#fff}
code{font-size:12px}
.share{background:#0072B2;height:10px;display:inline-block}nav a{margin-right:12px}
figure{margin:8px 0}figure img{max-width:600px;border:1px solid #ccc}
"""


class _Page:
    """The page being built: its sections' HTML and the problems the verdict names."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.unreadable: list[str] = []

    def section(self, anchor: str, title: str, body: Callable[[], str]) -> str:
        try:
            inner = body()
        except ReportError as exc:
            self.unreadable.append(f"{title}: {exc}")
            inner = f'<p class="err">unreadable: {esc(exc)}</p>'
        return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{inner}\n</section>'


def _chart(svg: str | None, what: str) -> str:
    return svg if svg is not None else f'<p class="nm">{esc(what)}: not measured</p>'


# -- sections ---------------------------------------------------------------------------


def _phases(report: View) -> str:
    scenario = report.obj("scenario")
    if scenario is None:
        return NOT_MEASURED
    spans = []
    for p in scenario.items("phases"):
        start, end = p.num("start_s"), p.num("end_s")
        if start is None or end is None:
            raise ReportError(f"{p.path}: a phase needs start_s and end_s")
        spans.append((p.text("name") or "?", start, end))
    events = [(e.num("t_s"), e.text("what") or "?") for e in scenario.items("events")]
    events.sort(key=lambda e: (e[0] is None, e[0] or 0.0))  # in time order, untimed last
    # events (a kill -9, a rollout started) as numbered marks, the numbers in the table
    marks = [Marker(t, str(i), "#7f3c8d") for i, (t, _) in enumerate(events, 1) if t is not None]
    out = [_chart(svgplot.timeline(spans, title="phases", x_label="s since start", markers=marks),
                  "phases")]  # fmt: skip
    if events:
        rows = "".join(
            f'<tr><td class="n">{i}</td><td class="n">{fmt(t, "s")}</td><td>{esc(what)}</td></tr>'
            for i, (t, what) in enumerate(events, 1)
        )
        out.append(f'<table id="events"><tr><th></th><th>at</th><th>event</th></tr>{rows}</table>')
    day = scenario.obj("day")
    if day is not None and day.data:
        out.append(f"<h3>trading day</h3>{figures(extra_rows(day, set()))}")
    return "".join(out)


def _rollout(ro: View, page: _Page) -> str:
    name = ro.text("name") or ro.text("id") or "rollout"
    status, expected = ro.text("status"), ro.text("expected")
    if status is not None and expected is not None and status != expected:
        page.problems.append(f"rollout {name}: ended {status}, expected {expected}")
    threshold = ro.num("failure_percent")
    abort = ro.obj("abort")
    abort_at = None if abort is None else abort.num("at_s")
    samples, times = _by_time(ro.items("samples"))
    series = [Series("targeted", _line(samples, times, "targeted"), "#bbbbbb", True, True)]
    for key, color in FUNNEL:
        if key != "restored" or abort is not None or any(s.num(key) for s in samples):
            series.append(Series(key, _line(samples, times, key), color))
    for key, color in FUNNEL_RARE:
        if any(s.num(key) for s in samples):
            series.append(Series(key, _line(samples, times, key), color, dashed=True))
    markers = _wave_markers(samples, times)
    if abort_at is not None:
        markers.append(Marker(abort_at, "abort", "#c0392b", dashed=False))
    funnel = svgplot.line_chart(
        series, title=f"{name}: devices per outcome", x_label="s since start",
        y_label="devices", markers=markers,
    )  # fmt: skip
    rate = [
        (t, r * 100)
        for t, s in zip(times, samples, strict=True)
        if (r := s.num("failure_rate")) is not None
    ]
    thresholds = [] if threshold is None else [Threshold(threshold, f"abort at {threshold:g}%")]
    rate_chart = svgplot.line_chart(
        [Series("failure rate", rate, "#D55E00")], title=f"{name}: failure rate",
        x_label="s since start", y_label="% failed", thresholds=thresholds, markers=markers,
    )  # fmt: skip
    waves = ", ".join(
        f"{int(w.num('index') or 0)}: {fmt_number(w.num('size') or 0)}" for w in ro.items("waves")
    )
    facts = [
        f"<b>{esc(name)}</b> ({esc(ro.text('kind') or '?')},"
        f" <code>{esc(ro.text('id') or '?')}</code>)",
        f"status <b>{esc(status or '?')}</b>, expected {esc(expected or '?')}"
        f" {tick(None if status is None or expected is None else status == expected)}",
        f"abort threshold {esc(f'{threshold:g}%' if threshold is not None else 'not given')}",
        f"waves (index: size) {esc(waves or 'none')}",
    ]
    if abort is not None:
        at = "?" if abort_at is None else fmt_number(abort_at, 0.1)
        facts.append(f"aborted at {esc(at)} s: {esc(abort.text('reason') or 'no reason given')}")
    return (
        f'<div class="rollout"><h3>{esc(name)}</h3><p>{DOT.join(facts)}</p>'
        f'<div class="charts">{_chart(funnel, "funnel")}{_chart(rate_chart, "failure rate")}'
        "</div></div>"
    )


def _by_time(samples: Sequence[View]) -> tuple[list[View], list[float]]:
    """``samples`` in time order, and their ``t_s``: each must have one."""
    timed = []
    for s in samples:
        t = s.num("t_s")
        if t is None:
            raise ReportError(f"{s.path}.t_s: missing")
        timed.append((t, s))
    timed.sort(key=lambda ts: ts[0])
    return [s for _, s in timed], [t for t, _ in timed]


def _line(samples: Sequence[View], times: Sequence[float], key: str) -> list[tuple[float, float]]:
    return [(t, v) for t, s in zip(times, samples, strict=True) if (v := s.num(key)) is not None]


def _wave_markers(samples: Sequence[View], times: Sequence[float]) -> list[Marker]:
    """A marker where each wave is first seen, and where the rollout's status changes
    (the first sample seen aborted or rolling back, even if ``abort.at_s`` is later)."""
    markers: list[Marker] = []
    wave_seen, status_seen = None, samples[0].text("status") if samples else None
    for t, s in zip(times, samples, strict=True):
        wave, status = s.num("wave"), s.text("status")
        if wave is not None and wave != wave_seen:
            markers.append(Marker(t, f"wave {wave:g}"))
            wave_seen = wave
        if status is not None and status != status_seen:
            markers.append(Marker(t, status, "#7f3c8d"))
            status_seen = status
    return markers


def _rollouts(report: View, page: _Page) -> str:
    out = []
    for ro in report.items("rollouts"):
        try:  # one rollout of the wrong shape does not hide the others
            out.append(_rollout(ro, page))
        except ReportError as exc:
            page.unreadable.append(f"Rollouts: {exc}")
            out.append(f'<p class="err">unreadable: {esc(exc)}</p>')
    return "".join(out) or NOT_MEASURED


def _distribution(dist: View | None, title: str, unit: str) -> str:
    if dist is None or not dist.data:
        return f'<div><p class="nm">{esc(title)}: not measured</p></div>'
    bins = []
    for i, b in enumerate(dist.raw_list("histogram")):
        ok = isinstance(b, list) and len(b) == 3
        if not ok or not all(is_number(x) for x in b):
            raise ReportError(f"{dist.path}.histogram[{i}]: expected [lo, hi, count] numbers")
        bins.append((float(b[0]), float(b[1]), float(b[2])))
    marks = [(k, dist.num(k)) for k in ("p50", "p90", "p99")]
    markers = [Marker(v, k, "#c0392b") for k, v in marks if v is not None]
    svg = svgplot.histogram(bins, title=title, x_label=unit, markers=markers)
    figures = DOT.join(
        f"{k} {fmt(dist.num(k), unit, 2)}"
        for k in ("p50", "p90", "p99", "max", "mean")
        if k != "mean" or dist.num(k) is not None
    )
    if (count := dist.num("count")) is not None:
        figures = f"n = {esc(fmt_number(count))}{DOT}{figures}"
    return f"<div>{_chart(svg, title)}<p>{figures}</p></div>"


def _sync(report: View) -> str:
    sync = report.obj("sync")
    if sync is None or not sync.data:
        return NOT_MEASURED
    known = {"lag_s": ("sync lag", "s"), "outbox_age_s": ("outbox age", "s"),
             "syncs_per_terminal": ("syncs per terminal", "syncs")}  # fmt: skip
    parts = [_distribution(sync.obj(k), title, unit) for k, (title, unit) in known.items()]
    for key in sync.data:  # what a newer simulator adds (lag_s_end_of_day, ...)
        if key not in known and isinstance(sync.data[key], dict):
            title, unit = name_and_unit(key)
            parts.append(_distribution(sync.obj(key), title, unit or "value"))
    return f'<div class="charts">{"".join(parts)}</div>'


def _cloud(report: View) -> str:
    cloud = report.obj("cloud")
    timeline = [] if cloud is None else cloud.items("timeline")
    if not timeline:
        return NOT_MEASURED
    timeline, times = _by_time(timeline)
    markers = [Marker(t, name) for name, t in _phase_starts(report)]
    rate = svgplot.line_chart(
        [Series("requests/s", _line(timeline, times, "requests_per_s"))],
        title="cloud request rate", x_label="s since start", y_label="requests/s",
        markers=markers,
    )  # fmt: skip
    latency = svgplot.line_chart(
        [Series(k, _line(timeline, times, f"{k}_ms"), c, dashed=k == "p50")
         for k, c in (("p50", "#009E73"), ("p95", "#0072B2"), ("p99", "#D55E00"))],
        title="cloud latency", x_label="s since start", y_label="ms", markers=markers,
    )  # fmt: skip
    errors = _line(timeline, times, "errors")
    total = sum(v for _, v in errors)
    parts = [_chart(rate, "request rate"), _chart(latency, "latency")]
    if total:
        parts.append(_chart(svgplot.line_chart(
            [Series("errors", errors, "#c0392b")], title="cloud errors per sample",
            x_label="s since start", y_label="errors", markers=markers,
        ), "errors"))  # fmt: skip
    note = f"{fmt_number(total)} errors in {fmt_number(len(timeline))} samples"
    return f'<div class="charts">{"".join(parts)}</div><p>{esc(note)}</p>'


def _phase_starts(report: View) -> list[tuple[str, float]]:
    scenario = report.obj("scenario")
    out = []
    for p in [] if scenario is None else scenario.items("phases")[1:]:
        start = p.num("start_s")
        if start is not None:
            out.append((p.text("name") or "?", start))
    return out


def _terminals(report: View) -> str:
    terms = report.obj("terminals")
    if terms is None or not terms.data:
        return NOT_MEASURED
    cpu = _distribution(terms.obj("cpu_ms"), "CPU per terminal", "ms")
    models = []
    for m in terms.items("by_model"):
        models.append((m.text("model") or "?", m.num("count") or 0.0))
    bars = svgplot.bar_chart(models, title="terminals by hardware model", y_label="terminals")
    offline = terms.obj("offline_hours")
    rows = [
        ("memory per terminal", fmt(terms.num("rss_kib_per_terminal"), "KiB")),
        ("terminals offline for hours", fmt(None if offline is None else offline.num("count"))),
        *extra_rows(terms, {"rss_kib_per_terminal"}),
    ]
    charts = f'<div class="charts">{cpu}<div>{_chart(bars, "hardware models")}</div></div>'
    return f"{charts}{figures(rows)}"


# -- the verdict and the page -----------------------------------------------------------


def _reconciliation_verdict(report: View) -> tuple[bool | None, str, list[str]]:
    """(passed, the headline, each violation): ``None`` when nothing was reconciled."""
    recon = report.obj("reconciliation")
    checks = [] if recon is None else recon.items("checks")
    if recon is None or (not checks and recon.flag("ok") is None):
        return None, "reconciliation not measured", []
    failing = []
    for c in checks:
        if check_ok(c) is False:
            violations = c.num("violations")
            count = "failed" if not violations else f"{fmt_number(violations)} violations"
            failing.append(f"{c.text('name') or '?'}: {count}")
    if recon.flag("ok") is False and not failing:
        failing.append("the simulator reported reconciliation failed (no check names it)")
    if failing:
        return False, f"reconciliation failed: {len(failing)} of {len(checks)} checks", failing
    if recon.flag("ok") is None:
        return None, "reconciliation did not say whether it passed", []
    checked = sum(c.num("checked") or 0 for c in checks)
    return (
        True,
        (
            f"reconciliation passed: {len(checks)} checks, {fmt_number(checked)} records, "
            "no violation"
        ),
        [],
    )


def _header(report: View, page: _Page) -> str:
    try:
        scenario = report.obj("scenario") or View({}, "scenario")
    except ReportError as exc:
        page.unreadable.append(f"scenario: {exc}")
        scenario = View({}, "scenario")
    try:
        passed, headline, violations = _reconciliation_verdict(report)
    except ReportError as exc:
        passed, headline, violations = None, "reconciliation unreadable", [str(exc)]
    others = list(page.problems)
    if scenario.flag("ok") is False:
        others.insert(0, "the simulator reported the scenario failed")
    others += [f"unreadable section, {u}" for u in page.unreadable]
    overall = "unknown" if passed is None else "pass" if passed and not others else "fail"
    word = {"pass": "PASSED", "fail": "FAILED", "unknown": "NOT RECONCILED"}[overall]
    if overall == "fail" and passed:
        word = "FAILED"  # reconciled, yet something else went wrong: still not a pass
    items = "".join(f'<li class="violation">{esc(v)}</li>' for v in violations)
    items += "".join(f'<li class="problem">{esc(p)}</li>' for p in others)
    terminals = scenario.num("terminals")
    meta = [
        f"{fmt_number(terminals)} terminals" if terminals is not None else "terminals: ?",
        f"seed {scenario.text('seed') or '?'}",
        f"{fmt_number(scenario.num('processes') or 0)} processes",
        f"started {scenario.text('started_at') or '?'}",
        f"wall {_plain(scenario.num('wall_s'), 's')}",
    ]
    return (
        f"<header><h1>Fleet simulation: {esc(meta[0])}</h1>"
        f'<p class="meta">{esc(DOT.join(meta))}</p>'
        f'<div class="verdict {overall}" id="verdict"><span class="word">{word}</span> '
        f'<span class="headline">{esc(headline)}</span>'
        f"{f'<ul>{items}</ul>' if items else ''}</div></header>"
    )


def _plain(value: float | None, unit: str) -> str:
    return "?" if value is None else f"{value:,.1f} {unit}"


SECTIONS = (
    ("budget", "Budget"),
    ("phases", "Phases"),
    ("rollouts", "Rollouts"),
    ("sync", "Sync"),
    ("cloud", "Cloud"),
    ("terminals", "Terminals"),
    ("reconciliation", "Reconciliation"),
    ("profile", "Where the time goes"),
    ("screenshots", "Screenshots"),
)


def render_html(report: object, out_dir: Path) -> str:
    """The page for ``report`` (the parsed report.json) as text; ``out_dir`` is where it
    will live (screenshot paths are checked against it)."""
    root = View(report, "")
    page = _Page()
    bodies: dict[str, Callable[[], str]] = {
        "budget": lambda: budget(root, page.problems),
        "phases": lambda: _phases(root),
        "rollouts": lambda: _rollouts(root, page),
        "sync": lambda: _sync(root),
        "cloud": lambda: _cloud(root),
        "terminals": lambda: _terminals(root),
        "reconciliation": lambda: reconciliation_table(root.obj("reconciliation")),
        "profile": lambda: profile(root),
        "screenshots": lambda: screenshots(root, out_dir),
    }
    sections = [page.section(a, t, bodies[a]) for a, t in SECTIONS]
    header = _header(root, page)
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>'
        f"<title>{esc('Fleet simulation report')}</title><style>{CSS}</style></head>\n<body>"
        f"{header}<nav>{nav}</nav>\n{''.join(sections)}\n"
        '<footer class="meta"><p>All times are seconds since the scenario started. Written'
        " by hwsim.fleetreport from report.json.</p></footer></body></html>\n"
    )


def render(report: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` for ``report`` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(render_html(report, out_dir), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hwsim.fleetreport", description="Render report.json as report.html."
    )
    parser.add_argument("report", type=Path, help="the fleet simulator's report.json")
    parser.add_argument(
        "-o", "--out", type=Path, help="directory for report.html (default: report.json's)"
    )
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.report.read_text(encoding="utf-8"))
        path = render(data, args.out or args.report.parent)
    except OSError as exc:
        print(f"fleetreport: cannot read or write: {exc}", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        print(f"fleetreport: {args.report} is not JSON: {exc}", file=sys.stderr)
        return 2
    except ReportError as exc:
        print(f"fleetreport: {args.report}: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
