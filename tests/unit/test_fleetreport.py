"""The fleet report page (hwsim.fleetreport, hwsim.svgplot): rendered from a small
synthetic report.json, then read back as XML, so each assertion is about what a reader
of the page would see: the verdict, the charts and their series, the abort threshold
where the axis says it is, hostile strings shown as text, missing sections said so."""

from __future__ import annotations

import copy
import itertools
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hwsim import fleetreport, svgplot

HOSTILE = '<script>alert("x")</script>&amp;\'"'


def synthetic_report() -> dict[str, Any]:
    """A small report of the shape hwsim.fleetsim writes: a bad config rolled back in
    wave 1 (threshold 10 %), a good one that succeeds, reconciliation clean."""
    bad_samples = []
    for i, t in enumerate(range(100, 230, 10)):
        wave = 0 if t < 150 else 1
        targeted = 100 if wave == 0 else 1100
        applied = min(targeted, 8 * (i + 1) * (1 + 9 * wave))
        failed = applied // 9 if wave else 2
        aborted = t >= 200
        bad_samples.append(
            {
                "t_s": float(t),
                "wave": wave,
                "targeted": targeted,
                "notified": min(targeted, applied + 20),
                "applied": applied,
                "healthy": applied - failed,
                "failed": failed,
                "refused": 0,
                "timed_out": 0,
                "restored": (t - 190) * 20 if aborted else 0,
                "failure_rate": failed / applied,
            }
        )
    # fmt: off
    good_samples = [
        {"t_s": float(t), "wave": (t - 300) // 40, "targeted": 10 * (t - 290),
         "notified": 9 * (t - 290), "applied": 8 * (t - 290), "healthy": 8 * (t - 290),
         "failed": 0, "refused": 0, "timed_out": 0, "restored": 0, "failure_rate": 0.0}
        for t in range(300, 420, 20)
    ]
    dist = {"p50": 1.5, "p90": 4.0, "p99": 9.0, "max": 14.0,
            "histogram": [[0, 1, 3000], [1, 2, 4000], [2, 5, 2500], [5, 10, 450],
                          [10, 20, 50]]}
    return {
        "scenario": {
            "terminals": 10000, "seed": 1, "processes": 2, "started_at": "2026-12-04T18:00:00Z",
            "wall_s": 512.3, "ok": True,
            "phases": [{"name": "enroll", "start_s": 0.0, "end_s": 61.2},
                       {"name": "trading day", "start_s": 61.2, "end_s": 95.0},
                       {"name": "bad config", "start_s": 95.0, "end_s": 290.0},
                       {"name": "good config", "start_s": 290.0, "end_s": 420.0},
                       {"name": "reconcile", "start_s": 420.0, "end_s": 512.3}],
        },
        "budget": {
            "wall_s": 512.3, "sim_peak_rss_mib": 4300.0,
            "cloud_peak_rss_mib": {"serve-0": 210.0, "worker-0": 180.0, "postgres": 900.0},
            "cpu_ms_per_terminal": 48.2, "sim_cpu_s": 480.0,
            "cloud_cpu_s": {"serve-0": 120.0, "worker-0": 60.0},
            "requests": 123456, "requests_per_s": 240.1, "syncs": 98765,
        },
        "rollouts": [
            {"id": "ro_bad", "kind": "config", "name": "bad-config", "status": "rolled_back",
             "expected": "rolled_back", "failure_percent": 10.0,
             "waves": [{"index": 0, "size": 100}, {"index": 1, "size": 1000}],
             "abort": {"reason": "failure rate 11.1% >= 10% over 200 devices", "at_s": 201.5},
             "samples": bad_samples},
            {"id": "ro_good", "kind": "config", "name": "good-config", "status": "succeeded",
             "expected": "succeeded", "failure_percent": 10.0,
             "waves": [{"index": 0, "size": 100}, {"index": 1, "size": 1000}],
             "abort": None, "samples": good_samples},
        ],
        "sync": {"lag_s": dist, "outbox_age_s": copy.deepcopy(dist),
                 "syncs_per_terminal": {"p50": 10, "p90": 12, "p99": 15, "max": 18,
                                        "histogram": [[0, 5, 10], [5, 10, 4000], [10, 15, 5900],
                                                      [15, 20, 90]]}},
        "cloud": {"timeline": [
            {"t_s": float(t), "requests_per_s": 200.0 + t % 50, "p50_ms": 12.0, "p95_ms": 40.0,
             "p99_ms": 90.0 + t % 30, "errors": 3 if t == 250 else 0}
            for t in range(10, 510, 10)]},
        "terminals": {"cpu_ms": dist, "rss_kib_per_terminal": 440.0,
                      "by_model": [{"model": "m-a", "count": 6000},
                                   {"model": "m-b", "count": 4000}],
                      "offline_hours": {"count": 500}},
        "reconciliation": {"ok": True, "checks": [
            {"name": "every approved sale in the cloud exactly once", "ok": True,
             "checked": 31234, "violations": 0, "examples": []},
            {"name": "no outbox left undrained", "ok": True, "checked": 10000,
             "violations": 0, "examples": []}]},
        "profile": [{"where": "terminal sync (client)", "cpu_s": 200.0},
                    {"where": "cloud sync apply", "cpu_s": 120.0}],
        "screenshots": [{"page": "fleet", "path": "screenshots/fleet.png", "load_ms": 180.0}],
    }
    # fmt: on


def page(report: dict[str, Any], out: Path) -> ET.Element:
    """Render, then parse the whole page as XML: well-formedness is part of the test."""
    path = fleetreport.render(report, out)
    assert path == out / "report.html"
    return ET.fromstring(path.read_text(encoding="utf-8"))


def charts(root: ET.Element) -> dict[str, ET.Element]:
    return {s.get("aria-label", ""): s for s in root.iter("svg")}


def series(svg: ET.Element) -> dict[str, int]:
    """Series name -> points drawn (a step series draws two per point after the first)."""
    out = {}
    for g in svg.iter("g"):
        if g.get("class") == "series":
            points = g.find("polyline").get("points", "").split()  # type: ignore[union-attr]
            out[g.get("data-name", "")] = len(points)
    return out


def y_of(svg: ET.Element, value: float) -> float:
    """Where the chart's own y gridlines put ``value`` (interpolated between two)."""
    grid = sorted(
        (float(ln.get("data-value", "")), float(ln.get("y1", "")))
        for ln in svg.iter("line")
        if ln.get("class") == "grid y"
    )
    (v0, y0), (v1, y1) = grid[0], grid[-1]
    return y0 + (value - v0) / (v1 - v0) * (y1 - y0)


def text_of(el: ET.Element) -> str:
    return "".join(el.itertext())


def by_id(root: ET.Element, anchor: str) -> ET.Element:
    found = root.find(f".//*[@id='{anchor}']")
    assert found is not None, anchor
    return found


def test_report__verdict_passes_when_reconciliation_is_clean(tmp_path: Path) -> None:
    root = page(synthetic_report(), tmp_path)
    verdict = by_id(root, "verdict")
    assert "pass" in verdict.get("class", "").split()
    assert "PASSED" in text_of(verdict)
    assert "2 checks, 41,234 records, no violation" in text_of(verdict)


def test_report__verdict_names_each_violation(tmp_path: Path) -> None:
    report = synthetic_report()
    report["reconciliation"]["ok"] = False
    report["reconciliation"]["checks"][0].update(ok=False, violations=3, examples=["t-0042: s1"])
    root = page(report, tmp_path)
    verdict = by_id(root, "verdict")
    assert "fail" in verdict.get("class", "").split()
    violations = [text_of(li) for li in verdict.iter("li") if li.get("class") == "violation"]
    assert violations == ["every approved sale in the cloud exactly once: 3 violations"]
    table = text_of(by_id(root, "reconciliation"))
    assert "\u2717" in table and "t-0042: s1" in table


def test_report__verdict_fails_on_a_check_with_violations_even_if_ok_says_true(
    tmp_path: Path,
) -> None:
    report = synthetic_report()
    report["reconciliation"]["checks"][1]["violations"] = 2
    verdict = by_id(page(report, tmp_path), "verdict")
    assert "fail" in verdict.get("class", "").split()
    assert "no outbox left undrained: 2 violations" in text_of(verdict)


def test_report__verdict_fails_on_an_unexpected_rollout_end_and_a_missed_budget(
    tmp_path: Path,
) -> None:
    report = synthetic_report()
    report["rollouts"][1]["status"] = "rolled_back"
    report["budget"]["wall_s"] = 700.0
    verdict = by_id(page(report, tmp_path), "verdict")
    assert "FAILED" in text_of(verdict)
    problems = [text_of(li) for li in verdict.iter("li")]
    assert "rollout good-config: ended rolled_back, expected succeeded" in problems
    assert "budget: wall time over its target" in problems


def test_report__without_reconciliation_says_not_reconciled(tmp_path: Path) -> None:
    report = synthetic_report()
    del report["reconciliation"]
    root = page(report, tmp_path)
    verdict = by_id(root, "verdict")
    assert "unknown" in verdict.get("class", "").split()
    assert "NOT RECONCILED" in text_of(verdict)
    assert "not measured" in text_of(by_id(root, "reconciliation"))


def test_report__each_rollout_has_a_funnel_and_a_failure_rate_chart(tmp_path: Path) -> None:
    report = synthetic_report()
    found = charts(page(report, tmp_path))
    n = len(report["rollouts"][0]["samples"])
    bad = series(found["bad-config: devices per outcome"])
    # targeted is a staircase: 2 points per sample after the first
    assert bad == {
        "targeted": 2 * n - 1, "notified": n, "applied": n, "healthy": n, "failed": n, "restored": n
    }  # fmt: skip
    good = series(found["good-config: devices per outcome"])
    assert "restored" not in good  # no abort, nothing restored: no line for it
    assert series(found["bad-config: failure rate"]) == {"failure rate": n}


def test_report__threshold_line_sits_at_the_abort_percent_on_the_axis(tmp_path: Path) -> None:
    svg = charts(page(synthetic_report(), tmp_path))["bad-config: failure rate"]
    (line,) = [ln for ln in svg.iter("line") if ln.get("class") == "threshold"]
    assert line.get("data-value") == "10"
    assert line.get("stroke-dasharray")
    assert float(line.get("y1", "")) == pytest.approx(y_of(svg, 10.0), abs=0.02)
    assert line.get("y1") == line.get("y2")
    # and a point at 11.1 % sits above it (smaller y) on the same chart
    assert y_of(svg, 11.1) < float(line.get("y1", ""))


def test_report__samples_out_of_order_are_drawn_in_time_order(tmp_path: Path) -> None:
    report = synthetic_report()
    report["cloud"]["timeline"].reverse()
    svg = charts(page(report, tmp_path))["cloud request rate"]
    (line,) = svg.iter("polyline")
    xs = [float(p.split(",")[0]) for p in line.get("points", "").split()]
    assert xs == sorted(xs)


def test_report__abort_and_waves_are_marked_on_the_funnel(tmp_path: Path) -> None:
    svg = charts(page(synthetic_report(), tmp_path))["bad-config: devices per outcome"]
    marks = {text_of(g): g.get("data-value") for g in svg.iter("g") if g.get("class") == "marker"}
    assert marks == {"wave 0": "100", "wave 1": "150", "abort": "201.5"}


def test_report__a_status_change_is_marked_and_rare_outcomes_drawn(tmp_path: Path) -> None:
    report = synthetic_report()
    samples = report["rollouts"][0]["samples"]
    for s in samples:
        s["status"] = "running" if s["t_s"] < 200 else "rolling_back"
        s["to_restore"] = 0 if s["t_s"] < 200 else 180
    samples[-1]["timed_out"] = 4
    svg = charts(page(report, tmp_path))["bad-config: devices per outcome"]
    marks = {text_of(g): g.get("data-value") for g in svg.iter("g") if g.get("class") == "marker"}
    assert marks["rolling_back"] == "200"
    drawn = series(svg)
    assert drawn["timed_out"] == drawn["to_restore"] == len(samples)
    assert "refused" not in drawn  # never happened: no line for it


def test_report__an_empty_distribution_from_fleetstats_says_not_measured(tmp_path: Path) -> None:
    report = synthetic_report()
    empty = {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "histogram": []}
    report["sync"]["lag_s"] = empty
    root = page(report, tmp_path)
    assert "sync lag" not in charts(root)
    assert "sync lag: not measured" in text_of(by_id(root, "sync"))
    assert "n = 0" in text_of(by_id(root, "sync"))


def test_report__distributions_are_histograms_with_percentiles(tmp_path: Path) -> None:
    report = synthetic_report()
    found = charts(page(report, tmp_path))
    for title in ("sync lag", "outbox age", "syncs per terminal", "CPU per terminal"):
        svg = found[title]
        bins = [r for r in svg.iter("rect") if r.get("class") == "bin"]
        expected = (
            report["sync"]["syncs_per_terminal"]["histogram"]
            if title == "syncs per terminal"
            else report["sync"]["lag_s"]["histogram"]
        )
        assert [float(b.get("data-count", "")) for b in bins] == [c for _, _, c in expected]
        heights = [float(b.get("height", "")) for b in bins]
        tallest = max(range(len(expected)), key=lambda i: expected[i][2])
        assert heights.index(max(heights)) == tallest
        labels = {text_of(g) for g in svg.iter("g") if g.get("class") == "marker"}
        assert labels == {"p50", "p90", "p99"}
        edges = [text_of(t) for t in svg.iter("text") if t.get("class") == "tick x"]
        assert edges[0] == svgplot.fmt_number(expected[0][0]), edges
        assert edges[-1] == svgplot.fmt_number(expected[-1][1]), edges


def test_histogram__uniform_bins_get_round_ticks_across_the_range() -> None:
    bins = [(15.2 + i * 1.5, 15.2 + (i + 1) * 1.5, i) for i in range(20)]  # 15.2 .. 45.2
    svg = ET.fromstring(svgplot.histogram(bins, title="t", x_label="s") or "")
    labels = [text_of(t) for t in svg.iter("text") if t.get("class") == "tick x"]
    assert labels == ["20", "25", "30", "35", "40", "45"]
    # and 30 sits where it falls, 14.8/30 of the way along the plot
    (x30,) = [float(t.get("x", "")) for t in svg.iter("text") if text_of(t) == "30"]
    left, right = svgplot.LEFT, svgplot.WIDTH - svgplot.RIGHT
    assert x30 == pytest.approx(left + (30 - 15.2) / 30 * (right - left), abs=0.01)


def test_histogram__bins_rounded_to_milliseconds_still_count_as_uniform() -> None:
    bins = [(round(i * 0.9657, 3), round((i + 1) * 0.9657, 3), 1.0) for i in range(20)]
    svg = ET.fromstring(svgplot.histogram(bins, title="t", x_label="s") or "")
    labels = [text_of(t) for t in svg.iter("text") if t.get("class") == "tick x"]
    assert labels == ["0", "5", "10", "15"]  # round ticks, not edges like 0.966


def test_histogram__a_marker_at_the_right_edge_keeps_its_label_inside() -> None:
    bins = [(float(i), i + 1.0, 1.0) for i in range(10)]
    markers = [svgplot.Marker(0.5, "p50"), svgplot.Marker(10.0, "max 130 ms")]
    svg = ET.fromstring(svgplot.histogram(bins, title="t", x_label="s", markers=markers) or "")
    labels = {"p50", "max 130 ms"}
    anchors = {text_of(t): t.get("text-anchor") for t in svg.iter("text") if text_of(t) in labels}
    assert anchors == {"p50": "start", "max 130 ms": "end"}


def test_histogram__log_spaced_bins_get_their_edges_first_and_last_labelled() -> None:
    edges = [0.001 * 2**i for i in range(16)]
    bins = [(a, b, 1.0) for a, b in itertools.pairwise(edges)]
    svg = ET.fromstring(svgplot.histogram(bins, title="t", x_label="s") or "")
    labels = [text_of(t) for t in svg.iter("text") if t.get("class") == "tick x"]
    assert labels[0] == "0.001" and labels[-1] == "32.8"  # 0.001 * 2**15 = 32.768
    assert len(labels) == svgplot.EDGE_LABELS


def test_report__cloud_rate_and_latency_over_time(tmp_path: Path) -> None:
    report = synthetic_report()
    found = charts(page(report, tmp_path))
    n = len(report["cloud"]["timeline"])
    assert series(found["cloud request rate"]) == {"requests/s": n}
    assert series(found["cloud latency"]) == {"p50": n, "p95": n, "p99": n}
    assert series(found["cloud errors per sample"]) == {"errors": n}


def test_report__phases_and_budget_table(tmp_path: Path) -> None:
    report = synthetic_report()
    root = page(report, tmp_path)
    spans = [g for g in charts(root)["phases"].iter("g") if g.get("class") == "span"]
    assert [g.get("data-name") for g in spans] == [p["name"] for p in report["scenario"]["phases"]]
    budget = text_of(by_id(root, "budget"))
    assert "512.3 s" in budget and "5,590 MiB" in budget  # 4300 + 210 + 180 + 900
    assert "123,456" in budget


def test_report__hostile_strings_are_text_not_markup(tmp_path: Path) -> None:
    report = synthetic_report()
    report["rollouts"][0]["name"] = HOSTILE
    report["rollouts"][0]["abort"]["reason"] = HOSTILE
    report["terminals"]["by_model"][0]["model"] = HOSTILE
    report["reconciliation"]["checks"][0].update(ok=False, violations=1, examples=[HOSTILE])
    report["phases"] = []
    report["scenario"]["phases"][0]["name"] = HOSTILE + "\x00\x1b"
    report["screenshots"][0]["page"] = HOSTILE
    root = page(report, tmp_path)  # parses: nothing broke out of its element
    assert not [el for el in root.iter("script")]
    text = text_of(root)
    assert text.count(HOSTILE) >= 5
    assert f"{HOSTILE}: devices per outcome" in charts(root)


@pytest.mark.parametrize(
    "missing", ["budget", "rollouts", "sync", "cloud", "terminals", "profile", "screenshots",
                "scenario"],
)  # fmt: skip
def test_report__a_missing_section_says_not_measured(tmp_path: Path, missing: str) -> None:
    report = synthetic_report()
    del report[missing]
    root = page(report, tmp_path)
    if missing != "scenario":
        assert "not measured" in text_of(by_id(root, missing))
    else:
        assert "not measured" in text_of(by_id(root, "phases"))


def test_report__empty_sections_and_an_empty_report_render(tmp_path: Path) -> None:
    report = synthetic_report()
    report.update(rollouts=[], cloud={"timeline": []}, screenshots=[], profile=[], sync={})
    root = page(report, tmp_path / "a")
    for anchor in ("rollouts", "cloud", "screenshots", "profile", "sync"):
        assert "not measured" in text_of(by_id(root, anchor))
    root = page({}, tmp_path / "b")
    assert "NOT RECONCILED" in text_of(by_id(root, "verdict"))
    assert not list(root.iter("svg"))


def test_report__a_malformed_section_is_named_and_the_rest_renders(tmp_path: Path) -> None:
    report = synthetic_report()
    report["rollouts"][0]["samples"][3]["applied"] = "many"
    root = page(report, tmp_path)
    assert "rollouts[0].samples[3].applied: expected a number, got str" in text_of(
        by_id(root, "rollouts")
    )
    verdict = by_id(root, "verdict")
    assert "FAILED" in text_of(verdict) and "unreadable section, Rollouts" in text_of(verdict)
    assert "cloud latency" in charts(root)
    assert "good-config: devices per outcome" in charts(root)  # the other rollout still drawn


@pytest.mark.parametrize("bad", ["oops", 42, [1]])
@pytest.mark.parametrize(
    "key", ["scenario", "budget", "rollouts", "sync", "cloud", "terminals", "reconciliation",
            "profile", "screenshots"],
)  # fmt: skip
def test_report__a_section_of_the_wrong_shape_is_named_and_not_a_pass(
    tmp_path: Path, key: str, bad: object
) -> None:
    report = synthetic_report()
    report[key] = bad
    root = page(report, tmp_path)
    verdict = by_id(root, "verdict")
    assert "PASSED" not in text_of(verdict)
    problems = [text_of(li) for li in verdict.iter("li") if li.get("class") == "problem"]
    assert any(p.startswith("unreadable section") for p in problems), problems
    assert len(root.findall(".//section")) == len(fleetreport.SECTIONS)


@pytest.mark.parametrize("key", ["scenario", "sync", "cloud", "terminals", "budget"])
def test_report__unknown_fields_are_ignored(tmp_path: Path, key: str) -> None:
    report = synthetic_report()
    report[key]["added_later"] = {"x": [1, 2]}
    report["also_new"] = 1
    assert "PASSED" in text_of(by_id(page(report, tmp_path), "verdict"))


def test_report__a_nan_in_a_histogram_is_named(tmp_path: Path) -> None:
    report = synthetic_report()
    report["sync"]["outbox_age_s"] = {"p50": 1, "histogram": [[0, 1, float("inf")]]}
    root = page(report, tmp_path)
    assert "sync.outbox_age_s.histogram[0]: expected [lo, hi, count] numbers" in text_of(
        by_id(root, "sync")
    )


def test_report__screenshots_are_relative_images_with_captions(tmp_path: Path) -> None:
    report = synthetic_report()
    report["screenshots"].append({"page": "evil", "path": "/etc/passwd", "load_ms": 1.0})
    report["screenshots"].append({"page": "up", "path": "../x.png", "load_ms": 1.0})
    (tmp_path / "screenshots").mkdir()
    (tmp_path / "screenshots" / "fleet.png").write_bytes(b"\x89PNG")
    section = by_id(page(report, tmp_path), "screenshots")
    assert [img.get("src") for img in section.iter("img")] == ["screenshots/fleet.png"]
    caption = text_of(next(section.iter("figcaption")))
    assert caption == "fleet, loaded in 180 ms"
    assert text_of(section).count("not a path relative to the report") == 2


def test_cli__renders_beside_the_json_and_rejects_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "report.json"
    src.write_text(json.dumps(synthetic_report()), encoding="utf-8")
    assert fleetreport.main([str(src)]) == 0
    assert (tmp_path / "report.html").is_file()
    assert fleetreport.main([str(src), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    capsys.readouterr()
    src.write_text("{not json", encoding="utf-8")
    assert fleetreport.main([str(src)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    src.write_text("[1, 2]", encoding="utf-8")
    assert fleetreport.main([str(src)]) == 2
    assert "expected an object, got list" in capsys.readouterr().err


def test_fmt_number__shows_the_decimals_the_step_needs() -> None:
    assert svgplot.fmt_number(12500, 2500) == "12,500"
    assert [svgplot.fmt_number(v, 2.5) for v in (0, 2.5, 5)] == ["0.0", "2.5", "5.0"]
    assert svgplot.fmt_number(0.04, 0.02) == "0.04"
    assert svgplot.fmt_number(11.1111) == "11.1"
    assert svgplot.fmt_number(1 / 3, 1 / 3) == "0.333"  # capped


def fleetstats_shaped(report: dict[str, Any]) -> dict[str, Any]:
    """The additions hwsim.fleetstats makes to the contract: per-phase profile rows with
    per-process CPU, more distributions, events, the day's totals, more budget figures."""
    report["profile"] = [
        {"where": "enroll", "wall_s": 61.2, "shard-0": 30.0, "serve-0": 10.0},
        {"where": "trading day", "wall_s": 33.8, "shard-0": 50.0, "serve-0": 6.0,
         "postgres": 4.0},
    ]  # fmt: skip
    report["sync"]["lag_s_end_of_day"] = copy.deepcopy(report["sync"]["lag_s"])
    report["scenario"]["events"] = [
        {"t_s": 250.0, "what": "kill -9 worker-0 (pid 4242)"},
        {"t_s": 12.0, "what": "enrolled 10,000"},
    ]
    report["scenario"]["day"] = {"payments": 31234, "refunds": 120}
    report["budget"].update(sync_failures=17, syncs_per_terminal=9.88)
    return report


def test_report__profile_rows_sum_their_per_process_cpu(tmp_path: Path) -> None:
    root = page(fleetstats_shaped(synthetic_report()), tmp_path)
    table = by_id(root, "profile-table")
    rows = [[text_of(c) for c in tr] for tr in table.iter("tr")]
    assert rows[0] == ["where", "wall", "CPU", "share", "", "shard-0", "serve-0", "postgres"]
    assert rows[1] == ["enroll", "61.2 s", "40 s", "40.0%", "", "30 s", "10 s", "not measured"]
    assert rows[2][:4] == ["trading day", "33.8 s", "60 s", "60.0%"]


def test_report__events_are_numbered_on_the_phases_and_listed(tmp_path: Path) -> None:
    root = page(fleetstats_shaped(synthetic_report()), tmp_path)
    svg = charts(root)["phases"]
    marks = {text_of(g): g.get("data-value") for g in svg.iter("g") if g.get("class") == "marker"}
    assert marks == {"1": "12", "2": "250"}
    events = [[text_of(c) for c in tr] for tr in by_id(root, "events").iter("tr")]
    assert events[1:] == [["1", "12 s", "enrolled 10,000"],
                          ["2", "250 s", "kill -9 worker-0 (pid 4242)"]]  # fmt: skip
    # no event label sits over a phase's bar
    bars_top = min(float(r.get("y", "")) for r in svg.iter("rect"))
    labels = [t for g in svg.iter("g") if g.get("class") == "marker" for t in g.iter("text")]
    assert all(float(t.get("y", "")) < bars_top for t in labels)
    phases = text_of(by_id(root, "phases"))
    assert "payments31,234" in phases and "refunds120" in phases


def test_report__figures_the_page_has_no_row_for_are_listed_by_name(tmp_path: Path) -> None:
    root = page(fleetstats_shaped(synthetic_report()), tmp_path)
    budget = text_of(by_id(root, "budget"))
    assert "sync failures17" in budget and "syncs per terminal9.88" in budget
    assert "lag, end of day" in charts(root)


def test_nice_ticks__cover_the_range_with_round_steps() -> None:
    assert svgplot.nice_ticks(0, 11.1) == [0, 2.5, 5, 7.5, 10, 12.5]
    assert svgplot.nice_ticks(100, 410) == [100, 200, 300, 400, 500]
    # a flat line still gets an axis
    assert svgplot.nice_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = svgplot.nice_ticks(0.0, 0.037)
    assert ticks[0] == 0 and ticks[-1] >= 0.037 and len(ticks) <= 7
