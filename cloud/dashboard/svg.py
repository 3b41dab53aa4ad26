"""The rollout funnel as SVG, drawn on the server from the rollout view
(``cloud.rollouts.service.view``, the JSON ``GET /api/v1/rollouts/{id}`` answers).

One panel per wave: four bars, targeted → notified → applied → healthy, on one scale
(the wave's targeted devices), and a fifth, the failures stacked by kind (failed,
refused, timed out), against the abort threshold: a dashed line at the failure count
past which the wave aborts with the devices sampled so far (``failure_percent`` of
them, at least ``min_sample_wave``; strictly above it aborts, as ``plan.evaluate``
reads it). Numbers are written on the bars, so the chart reads without colour.

Pure functions of the view, no I/O: every text goes through ``escape``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

WIDTH = 560
PANEL_H = 160
TOP = 38
BASE = PANEL_H - 26
BAR_W = 70
GAP = 26
LEFT = 14
STAGES = (("targeted", "#64748b"), ("notified", "#3b82f6"), ("applied", "#0ea5e9"),
          ("healthy", "#16a34a"))  # fmt: skip
FAILURES = (("failed", "#dc2626"), ("refused", "#f97316"), ("timed_out", "#a855f7"))


def _num(wave: Mapping[str, Any], key: str) -> int:
    value = wave.get(key, 0)
    return int(value) if isinstance(value, int | float) else 0


def threshold_count(wave: Mapping[str, Any], threshold: Mapping[str, Any]) -> tuple[int, int]:
    """(the failures past which the wave aborts now, the sample it is counted on)."""
    sampled = sum(_num(wave, k) for k in ("applied", "failed", "refused", "timed_out"))
    basis = max(sampled, int(threshold.get("min_sample_wave", 1) or 1))
    percent = float(threshold.get("failure_percent", 0) or 0)
    return math.floor(basis * percent / 100.0), sampled


def wave_panel(wave: Mapping[str, Any], threshold: Mapping[str, Any], *, y0: int = 0) -> str:
    """One wave's funnel, its top at ``y0``."""
    targeted = max(_num(wave, "targeted"), 1)
    scale = (BASE - TOP) / targeted

    def bar_h(n: int) -> float:
        return max(n * scale, 0.0)

    parts = [f'<g class="wave" data-wave="{_num(wave, "wave")}" transform="translate(0,{y0})">']
    parts.append(
        f'<text x="{LEFT}" y="16" class="wave-title">Wave {_num(wave, "wave")} · '
        f"{escape(str(wave.get('status', '')))} · {_num(wave, 'pending')} pending</text>"
    )
    x = LEFT
    for key, colour in STAGES:
        n = _num(wave, key)
        h = bar_h(n)
        parts.append(
            f'<rect class="bar" data-stage="{key}" data-count="{n}" x="{x}" y="{BASE - h:.1f}" '
            f'width="{BAR_W}" height="{h:.1f}" fill="{colour}" rx="2"/>'
            f'<text x="{x + BAR_W / 2}" y="{BASE - h - 4:.1f}" class="count">{n}</text>'
            f'<text x="{x + BAR_W / 2}" y="{BASE + 14}" class="label">{key}</text>'
        )
        x += BAR_W + GAP
    # the failures, stacked, against the threshold
    y = float(BASE)
    counted = set(threshold.get("count", ())) or {k for k, _ in FAILURES}
    total = 0
    for key, colour in FAILURES:
        n = _num(wave, key)
        total += n
        h = bar_h(n)
        y -= h
        faded = "" if key in counted else ' fill-opacity="0.35"'
        parts.append(
            f'<rect class="bar" data-stage="{key}" data-count="{n}" x="{x}" y="{y:.1f}" '
            f'width="{BAR_W}" height="{h:.1f}" fill="{colour}"'
            f"{faded}/>"
        )
    parts.append(
        f'<text x="{x + BAR_W / 2}" y="{y - 4:.1f}" class="count">{total}</text>'
        f'<text x="{x + BAR_W / 2}" y="{BASE + 14}" class="label">failures</text>'
    )
    limit, sampled = threshold_count(wave, threshold)
    line_y = BASE - bar_h(limit)
    parts.append(
        f'<line class="threshold" x1="{x - 8}" x2="{x + BAR_W + 8}" y1="{line_y:.1f}" '
        f'y2="{line_y:.1f}" stroke="#b91c1c" stroke-width="1.5" stroke-dasharray="4 3"/>'
        f'<text x="{x + BAR_W + 10}" y="{line_y + 4:.1f}" class="threshold-label">abort &gt; '
        f"{limit} of {sampled} sampled</text>"
    )
    parts.append(
        f'<line x1="{LEFT - 4}" x2="{x + BAR_W + 8}" y1="{BASE}" y2="{BASE}" stroke="#94a3b8"/>'
    )
    parts.append("</g>")
    return "".join(parts)


def funnel(view: Mapping[str, Any]) -> str:
    """The whole rollout: one panel per wave, top to bottom, as one ``<svg>``."""
    waves: Sequence[Mapping[str, Any]] = view.get("waves") or []
    threshold: Mapping[str, Any] = view.get("threshold") or {}
    height = max(len(waves), 1) * PANEL_H
    width = WIDTH + 150
    title = f"Rollout {view.get('rollout_id', '')} funnel by wave"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="funnel" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    ]
    for i, wave in enumerate(waves):
        parts.append(wave_panel(wave, threshold, y0=i * PANEL_H))
    if not waves:
        parts.append(f'<text x="{LEFT}" y="20" class="label">no waves planned</text>')
    parts.append("</svg>")
    return "".join(parts)


def progress(done: int, of: int, *, width: int = 240, colour: str = "#16a34a") -> str:
    """A thin bar: ``done`` of ``of`` (a rollback's restores)."""
    share = 0.0 if of <= 0 else min(done / of, 1.0)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="progress" width="{width}" height="10" '
        f'viewBox="0 0 {width} 10" role="img" aria-label="{done} of {of}">'
        f'<rect width="{width}" height="10" rx="3" fill="#e2e8f0"/>'
        f'<rect width="{width * share:.1f}" height="10" rx="3" fill="{colour}"/></svg>'
    )


def share_bars(
    counts: Sequence[tuple[str | None, int]], total: int, *, width: int = 160
) -> list[str]:
    """One small bar per (label, count), as a share of ``total`` (compliance lists)."""
    out = []
    for _, n in counts:
        share = 0.0 if total <= 0 else min(n / total, 1.0)
        out.append(
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="8" '
            f'viewBox="0 0 {width} 8" aria-hidden="true"><rect width="{width}" height="8" '
            f'rx="2" fill="#e2e8f0"/><rect width="{width * share:.1f}" height="8" rx="2" '
            f'fill="#3b82f6"/></svg>'
        )
    return out


__all__ = ["funnel", "progress", "share_bars", "threshold_count", "wave_panel"]
