"""Small inline-SVG charts for the fleet report (``hwsim.fleetreport``): no plotting
library, no script, no network, so the page opens anywhere a CI artifact is looked at.

Four charts, each a function returning one ``<svg>`` element as text, or ``None`` when
there is nothing to draw (the caller then says "not measured"):

* ``line_chart``: several ``Series`` over a numeric x, a ``Series`` may be drawn as a
  step/area (e.g. devices targeted); horizontal ``Threshold`` lines (dashed) and
  vertical ``Marker`` lines (an abort, a wave starting).
* ``histogram``: ``[lo, hi, count]`` bins, drawn as equal-width bars so a log-spaced
  binning reads as well as a uniform one; ``Marker``s (percentiles) are placed inside
  their bin by interpolation.
* ``bar_chart``: one bar per label (counts by hardware model).
* ``timeline``: one horizontal bar per named span (the scenario's phases).

The output is well-formed XML as well as HTML (every string through ``esc``), and it
names what it draws: a series is ``<g class="series" data-name=...>`` holding a
``<polyline>``, a threshold is ``<line class="threshold" data-value=...>``, a gridline
``<line class="grid y" data-value=...>``; the report's tests read those back.
"""

from __future__ import annotations

import functools
import html
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Chart size in CSS pixels: two charts side by side in a 1280 px window.
WIDTH, HEIGHT = 600, 260
#: Plot margins: left holds y tick labels up to "100,000", top the title and the legend.
LEFT, RIGHT, TOP, BOTTOM = 62, 20, 46, 42
#: About how many ticks an axis gets (nice_ticks picks 1/2/2.5/5 x 10^k steps).
TICKS = 5
#: ... and an x axis, which is wider than it is tall.
X_TICKS = 7
#: At most this many bin-edge labels under a histogram; more would overlap.
EDGE_LABELS = 8
#: Bins whose widths differ by at most this fraction of the widest are uniform.
UNIFORM_SLACK = 0.01
#: Decimals a label may show (the simulator rounds its figures to milliseconds).
MAX_DECIMALS = 3
#: Marker labels: rows they may stack in, and about how wide a character is (10 px font).
MARKER_ROWS, MARKER_ROW_DY, LABEL_EM = 3, 11, 5.6
#: Palette (colour-blind-safe, Okabe-Ito), in the order series are given colours.
PALETTE = ("#0072B2", "#CC79A7", "#009E73", "#D55E00", "#E69F00", "#56B4E9", "#000000")
GREY, INK, GRID = "#888888", "#222222", "#e3e3e3"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(text: object) -> str:
    """``text`` safe as HTML/XML text or a quoted attribute value: escaped, and the
    control characters XML forbids dropped (a device name is data, it may hold any)."""
    return html.escape(_CONTROL.sub("", str(text)), quote=True)


@dataclass(frozen=True)
class Series:
    """A named line: ``points`` are (x, y); ``step`` draws it as a staircase, ``area``
    fills under it (lightly), ``dashed`` for a secondary line."""

    name: str
    points: Sequence[tuple[float, float]]
    color: str = ""
    step: bool = False
    area: bool = False
    dashed: bool = False


@dataclass(frozen=True)
class Threshold:
    """A horizontal dashed line at ``y`` (e.g. a rollout's abort threshold)."""

    y: float
    label: str
    color: str = "#D55E00"


@dataclass(frozen=True)
class Marker:
    """A vertical line at ``x`` with a short label (an abort, a wave, a percentile)."""

    x: float
    label: str
    color: str = GREY
    dashed: bool = True


class Scale:
    """Linear map from a data interval onto a pixel interval (either may be reversed)."""

    def __init__(self, lo: float, hi: float, px_lo: float, px_hi: float) -> None:
        if hi <= lo:
            lo, hi = lo - 1.0, lo + 1.0
        self.lo, self.hi, self.px_lo, self.px_hi = lo, hi, px_lo, px_hi

    def __call__(self, value: float) -> float:
        return self.px_lo + (value - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)


def nice_ticks(lo: float, hi: float, count: int = TICKS) -> list[float]:
    """Round tick values covering [lo, hi] with about ``count`` intervals, first tick
    <= lo and last >= hi (the axis then spans exactly its ticks)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"axis bounds must be finite numbers, got {lo!r}..{hi!r}")
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks: list[float] = []
    value = first
    while len(ticks) < 2 or ticks[-1] < hi - step * 1e-9:
        ticks.append(round(value, 12))
        value = first + len(ticks) * step
    return ticks


def fmt_number(value: float, step: float | None = None) -> str:
    """A tick or figure as people read it: thousands separated, decimals only as many
    as ``step`` (the tick spacing) needs."""
    if step is None:
        step = 1.0 if value == int(value) else 0.1
    decimals = 0
    while decimals < MAX_DECIMALS and not _whole(step * 10**decimals):
        decimals += 1
    return f"{value:,.{decimals}f}"


def _whole(x: float) -> bool:
    return abs(x - round(x)) <= 1e-9 * max(1.0, abs(x))


def _svg_open(title: str, width: int, height: int) -> list[str]:
    return [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        f' role="img" aria-label="{esc(title)}">',
        f'<text class="title" x="{LEFT}" y="16" font-weight="bold" font-size="13">'
        f"{esc(title)}</text>",
    ]


def _legend(items: Sequence[tuple[str, str, bool]], y: float = 34) -> list[str]:
    out, x = ['<g class="legend">'], float(LEFT)
    for name, color, dashed in items:
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        out.append(
            f'<line x1="{x:.1f}" y1="{y - 4}" x2="{x + 16:.1f}" y2="{y - 4}" stroke="{color}"'
            f' stroke-width="2.5"{dash}/>'
            f'<text class="legend-item" x="{x + 20:.1f}" y="{y}" font-size="11">{esc(name)}</text>'
        )
        x += 28 + 6.5 * len(name)
    out.append("</g>")
    return out


def _y_axis(ys: Scale, ticks: Sequence[float], width: int, label: str) -> list[str]:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    out = []
    for t in ticks:
        y = ys(t)
        out.append(
            f'<line class="grid y" data-value="{t:g}" x1="{LEFT}" y1="{y:.2f}"'
            f' x2="{width - RIGHT}" y2="{y:.2f}" stroke="{GRID}"/>'
            f'<text class="tick y" x="{LEFT - 6}" y="{y + 4:.2f}" font-size="11"'
            f' text-anchor="end">{esc(fmt_number(t, step))}</text>'
        )
    mid = (ys.px_lo + ys.px_hi) / 2
    out.append(
        f'<text class="axis-label y" x="12" y="{mid:.1f}" font-size="11" text-anchor="middle"'
        f' transform="rotate(-90 12 {mid:.1f})">{esc(label)}</text>'
    )
    return out


def _x_axis(xs: Scale, ticks: Sequence[float], height: int, label: str) -> list[str]:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    base = height - BOTTOM
    out = [
        f'<line class="axis x" x1="{LEFT}" y1="{base}" x2="{xs.px_hi}" y2="{base}" stroke="{INK}"/>'
    ]
    for t in ticks:
        x = xs(t)
        out.append(
            f'<line class="tick x" data-value="{t:g}" x1="{x:.2f}" y1="{base}" x2="{x:.2f}"'
            f' y2="{base + 4}" stroke="{INK}"/>'
            f'<text class="tick x" x="{x:.2f}" y="{base + 16}" font-size="11"'
            f' text-anchor="middle">{esc(fmt_number(t, step))}</text>'
        )
    out.append(
        f'<text class="axis-label x" x="{(xs.px_lo + xs.px_hi) / 2:.1f}" y="{height - 6}"'
        f' font-size="11" text-anchor="middle">{esc(label)}</text>'
    )
    return out


def _markers(
    markers: Sequence[Marker],
    place: Callable[[float], float],
    top: float,
    bottom: float,
    label_y: float,
    row_dy: float,
    right: float,
) -> list[str]:
    """Vertical lines at each marker's ``place(x)``, labelled at ``label_y``; a label
    that would overlap the previous one on its row moves to the next row (``row_dy``
    further), so close markers (p50/p90, two phases) stay readable; one that would run
    past ``right`` is set to the left of its line."""
    out, row_ends = [], [-math.inf] * MARKER_ROWS
    for m in sorted(markers, key=lambda m: m.x):
        x = place(m.x)
        row = next((r for r, end in enumerate(row_ends) if x > end), len(row_ends) - 1)
        label_w = LABEL_EM * len(m.label)
        row_ends[row] = x + 8 + label_w
        flip = x + 3 + label_w > right
        text_x, anchor = (x - 3, "end") if flip else (x + 3, "start")
        dash = ' stroke-dasharray="3 3"' if m.dashed else ""
        out.append(
            f'<g class="marker" data-value="{m.x:g}"><line x1="{x:.2f}" y1="{top}" x2="{x:.2f}"'
            f' y2="{bottom}" stroke="{m.color}" stroke-width="1.5"{dash}/>'
            f'<text x="{text_x:.2f}" y="{label_y + row * row_dy:.1f}" font-size="10"'
            f' text-anchor="{anchor}" fill="{m.color}">{esc(m.label)}</text></g>'
        )
    return out


def _points(points: Sequence[tuple[float, float]], xs: Scale, ys: Scale, step: bool) -> str:
    out: list[str] = []
    for i, (x, y) in enumerate(points):
        if step and i:
            out.append(f"{xs(x):.2f},{ys(points[i - 1][1]):.2f}")
        out.append(f"{xs(x):.2f},{ys(y):.2f}")
    return " ".join(out)


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    thresholds: Sequence[Threshold] = (),
    markers: Sequence[Marker] = (),
    y_max: float | None = None,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str | None:
    """Lines of ``series`` (those with points) over shared axes; y starts at 0 and
    reaches the highest point, threshold and ``y_max``. ``None`` if no series has a
    point."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return None
    all_x = [x for s in drawn for x, _ in s.points] + [m.x for m in markers]
    all_y = [y for s in drawn for _, y in s.points] + [t.y for t in thresholds]
    x_ticks = nice_ticks(min(all_x), max(all_x), X_TICKS)
    y_ticks = nice_ticks(0.0, max([*all_y, y_max or 0.0, 0.0]) or 1.0)
    xs = Scale(x_ticks[0], x_ticks[-1], LEFT, width - RIGHT)
    ys = Scale(y_ticks[0], y_ticks[-1], height - BOTTOM, TOP)
    colors = [s.color or PALETTE[i % len(PALETTE)] for i, s in enumerate(drawn)]
    out = _svg_open(title, width, height)
    out += _legend([(s.name, c, s.dashed) for s, c in zip(drawn, colors, strict=True)])
    out += _y_axis(ys, y_ticks, width, y_label)
    out += _x_axis(xs, x_ticks, height, x_label)
    for s, color in zip(drawn, colors, strict=True):
        pts = _points(s.points, xs, ys, s.step)
        out.append(f'<g class="series" data-name="{esc(s.name)}" data-points="{len(s.points)}">')
        if s.area:
            first, last = xs(s.points[0][0]), xs(s.points[-1][0])
            base = ys(0.0)
            out.append(
                f'<polygon class="area" points="{first:.2f},{base:.2f} {pts} {last:.2f},'
                f'{base:.2f}" fill="{color}" fill-opacity="0.12" stroke="none"/>'
            )
        dash = ' stroke-dasharray="6 3"' if s.dashed else ""
        out.append(
            f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"'
            f' stroke-linejoin="round"{dash}><title>{esc(s.name)}</title></polyline></g>'
        )
    for t in thresholds:
        y = ys(t.y)
        out.append(
            f'<line class="threshold" data-value="{t.y:g}" x1="{LEFT}" y1="{y:.2f}"'
            f' x2="{width - RIGHT}" y2="{y:.2f}" stroke="{t.color}" stroke-width="1.5"'
            f' stroke-dasharray="6 4"/>'
            f'<text class="threshold-label" x="{width - RIGHT - 2}" y="{y - 4:.2f}"'
            f' font-size="10" text-anchor="end" fill="{t.color}">{esc(t.label)}</text>'
        )
    out += _markers(markers, xs, TOP, height - BOTTOM, TOP + 10, 12, width)
    out.append("</svg>")
    return "\n".join(out)


def _bin_position(value: float, *, bins: Sequence[tuple[float, float, float]], xs: Scale) -> float:
    """Where ``value`` falls on an equal-width-bar axis: its bin, interpolated inside."""
    for i, (lo, hi, _) in enumerate(bins):
        if value <= hi or i == len(bins) - 1:
            frac = 0.0 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
            return xs(i + frac)
    return xs(0.0)


def histogram(
    bins: Sequence[tuple[float, float, float]],
    *,
    title: str,
    x_label: str,
    y_label: str = "count",
    markers: Sequence[Marker] = (),
    color: str = PALETTE[0],
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str | None:
    """One bar per ``(lo, hi, count)`` bin, edges labelled; ``markers`` at data values
    (placed in their bin). ``None`` without bins."""
    if not bins:
        return None
    y_ticks = nice_ticks(0.0, max(c for _, _, c in bins) or 1.0)
    xs = Scale(0.0, float(len(bins)), LEFT, width - RIGHT)
    ys = Scale(y_ticks[0], y_ticks[-1], height - BOTTOM, TOP)
    out = _svg_open(title, width, height)
    out += _y_axis(ys, y_ticks, width, y_label)
    base = height - BOTTOM
    out.append(
        f'<line class="axis x" x1="{LEFT}" y1="{base}" x2="{width - RIGHT}" y2="{base}"'
        f' stroke="{INK}"/>'
    )
    bar_w = xs(1.0) - xs(0.0)
    for i, (lo, hi, count) in enumerate(bins):
        top = ys(count)
        out.append(
            f'<rect class="bin" data-lo="{lo:g}" data-hi="{hi:g}" data-count="{count:g}"'
            f' x="{xs(i) + 0.5:.2f}" y="{top:.2f}" width="{max(bar_w - 1, 0.5):.2f}"'
            f' height="{base - top:.2f}" fill="{color}"><title>{esc(fmt_number(lo))}'
            f" to {esc(fmt_number(hi))}: {esc(fmt_number(count))}</title></rect>"
        )
    for value, label in _bin_labels(bins):
        x = _bin_position(value, bins=bins, xs=xs)
        anchor = "end" if x > width - RIGHT - 12 else "middle"
        out.append(
            f'<text class="tick x" x="{x:.2f}" y="{base + 16}" font-size="11"'
            f' text-anchor="{anchor}">{esc(label)}</text>'
        )
    out.append(
        f'<text class="axis-label x" x="{(LEFT + width - RIGHT) / 2:.1f}" y="{height - 6}"'
        f' font-size="11" text-anchor="middle">{esc(x_label)}</text>'
    )
    # labels above the bars (a histogram has no legend row), rising when they crowd
    place = functools.partial(_bin_position, bins=bins, xs=xs)
    out += _markers(markers, place, TOP - 8, base, TOP - 6, -11, width)
    out.append("</svg>")
    return "\n".join(out)


def _bin_labels(bins: Sequence[tuple[float, float, float]]) -> list[tuple[float, str]]:
    """Labels under a histogram: round ticks when the bins are uniform and contiguous
    (the axis is then linear), else bin edges (log-spaced bins), the first and last
    always, the others spread evenly, each to about three figures."""
    lo, hi = bins[0][0], bins[-1][1]
    widths = [b - a for a, b, _ in bins]
    slack = UNIFORM_SLACK * max(widths)  # edges rounded to ms still count as uniform
    joined = all(abs(b[0] - a[1]) <= slack for a, b in itertools.pairwise(bins))
    if joined and max(widths) - min(widths) <= slack:
        ticks = nice_ticks(lo, hi, X_TICKS)
        step = ticks[1] - ticks[0]
        inside = [t for t in ticks if lo - step * 1e-9 <= t <= hi + step * 1e-9]
        return [(t, fmt_number(t, step)) for t in inside]
    edges = [b[0] for b in bins] + [hi]
    shown = min(len(edges), EDGE_LABELS)
    picked = sorted({round(k * (len(edges) - 1) / max(shown - 1, 1)) for k in range(shown)})
    return [(edges[i], _short(edges[i])) for i in picked]


def _short(value: float) -> str:
    """About three significant figures, no trailing zeros: 0.125, 2.5, 19.3, 1,250."""
    decimals = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3
    text = f"{value:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def bar_chart(
    bars: Sequence[tuple[str, float]],
    *,
    title: str,
    y_label: str,
    color: str = PALETTE[0],
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str | None:
    """One vertical bar per ``(label, value)``. ``None`` without bars."""
    if not bars:
        return None
    y_ticks = nice_ticks(0.0, max(v for _, v in bars) or 1.0)
    xs = Scale(0.0, float(len(bars)), LEFT, width - RIGHT)
    ys = Scale(y_ticks[0], y_ticks[-1], height - BOTTOM, TOP)
    out = _svg_open(title, width, height)
    out += _y_axis(ys, y_ticks, width, y_label)
    base, slot = height - BOTTOM, xs(1.0) - xs(0.0)
    for i, (label, value) in enumerate(bars):
        top = ys(value)
        out.append(
            f'<rect class="bar" data-label="{esc(label)}" data-value="{value:g}"'
            f' x="{xs(i) + slot * 0.15:.2f}" y="{top:.2f}" width="{slot * 0.7:.2f}"'
            f' height="{base - top:.2f}" fill="{color}"><title>{esc(label)}:'
            f" {esc(fmt_number(value))}</title></rect>"
            f'<text class="tick x" x="{xs(i + 0.5):.2f}" y="{base + 16}" font-size="11"'
            f' text-anchor="middle">{esc(label)}</text>'
        )
    out.append(
        f'<line class="axis x" x1="{LEFT}" y1="{base}" x2="{width - RIGHT}" y2="{base}"'
        f' stroke="{INK}"/></svg>'
    )
    return "\n".join(out)


def timeline(
    spans: Sequence[tuple[str, float, float]],
    *,
    title: str,
    x_label: str,
    markers: Sequence[Marker] = (),
    width: int = 2 * WIDTH + 20,
    row: int = 22,
) -> str | None:
    """One horizontal bar per ``(name, start, end)``, on one time axis, the name left
    of it. ``None`` without spans."""
    if not spans:
        return None
    left = 150
    # marker labels get rows of their own above the bars, so no label covers a bar
    label_top = TOP - 10
    first = TOP - 20 + (MARKER_ROWS * MARKER_ROW_DY if markers else 0)
    height = first + row * len(spans) + BOTTOM
    x_ticks = nice_ticks(min(s for _, s, _ in spans), max(e for _, _, e in spans), 2 * X_TICKS)
    xs = Scale(x_ticks[0], x_ticks[-1], left, width - RIGHT)
    out = _svg_open(title, width, height)
    for i, (name, start, end) in enumerate(spans):
        y = first + i * row
        color = PALETTE[i % len(PALETTE)]
        out.append(
            f'<g class="span" data-name="{esc(name)}" data-start="{start:g}" data-end="{end:g}">'
            f'<text x="{left - 6}" y="{y + row / 2 + 4:.1f}" font-size="11" text-anchor="end">'
            f'{esc(name)}</text><rect x="{xs(start):.2f}" y="{y + 3}"'
            f' width="{max(xs(end) - xs(start), 1.0):.2f}" height="{row - 6}" fill="{color}"'
            f' fill-opacity="0.8"><title>{esc(name)}: {esc(fmt_number(start, 0.1))} to'
            f" {esc(fmt_number(end, 0.1))} s</title></rect></g>"
        )
    axis = Scale(xs.lo, xs.hi, left, width - RIGHT)
    base = height - BOTTOM
    step = x_ticks[1] - x_ticks[0]
    out.append(
        f'<line class="axis x" x1="{left}" y1="{base}" x2="{width - RIGHT}" y2="{base}"'
        f' stroke="{INK}"/>'
    )
    for t in x_ticks:
        out.append(
            f'<text class="tick x" x="{axis(t):.2f}" y="{base + 16}" font-size="11"'
            f' text-anchor="middle">{esc(fmt_number(t, step))}</text>'
        )
    out.append(
        f'<text class="axis-label x" x="{(left + width - RIGHT) / 2:.1f}" y="{height - 6}"'
        f' font-size="11" text-anchor="middle">{esc(x_label)}</text>'
    )
    out += _markers(markers, xs, label_top - 10, base, label_top, MARKER_ROW_DY, width)
    out.append("</svg>")
    return "\n".join(out)
