"""The rollout funnel's SVG (``cloud.dashboard.svg``), drawn from the rollout view: the
bars carry their counts, the threshold line sits at the failures past which the wave
aborts (strictly above ``failure_percent`` of the sample, at least the minimum sample),
and any text from the view is escaped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from cloud.dashboard.svg import funnel, progress, threshold_count

THRESHOLD = {"failure_percent": 20.0, "min_sample_wave": 5, "min_sample_total": 10,
             "count": ["failed", "refused", "timed_out"]}  # fmt: skip


def wave(**counts: int) -> dict[str, object]:
    base = {"wave": 1, "targeted": 10, "notified": 0, "applied": 0, "healthy": 0, "failed": 0,
            "refused": 0, "timed_out": 0, "pending": 10, "status": "running"}  # fmt: skip
    return base | counts


def test_threshold__counted_on_the_sample_but_never_below_the_minimum():
    assert threshold_count(wave(), THRESHOLD) == (1, 0)  # 20% of the minimum sample 5
    assert threshold_count(wave(applied=8, failed=2), THRESHOLD) == (2, 10)
    assert threshold_count(wave(applied=30, failed=10), THRESHOLD) == (8, 40)


def test_funnel__one_panel_per_wave_with_each_count_and_the_threshold_line():
    view = {"rollout_id": "ro_1", "threshold": THRESHOLD,
            "waves": [wave(notified=10, applied=6, healthy=4, failed=3, refused=1),
                      wave(wave=2, targeted=20)]}  # fmt: skip
    svg = funnel(view)
    root = ET.fromstring(svg)  # well-formed
    ns = "{http://www.w3.org/2000/svg}"
    panels = root.findall(f"{ns}g")
    assert [p.get("data-wave") for p in panels] == ["1", "2"]
    bars = {r.get("data-stage"): r.get("data-count") for r in panels[0].iter(f"{ns}rect")}
    assert bars == {"targeted": "10", "notified": "10", "applied": "6", "healthy": "4",
                    "failed": "3", "refused": "1", "timed_out": "0"}  # fmt: skip
    assert "abort &gt; 2 of 10 sampled" in svg
    healthy = next(r for r in panels[0].iter(f"{ns}rect") if r.get("data-stage") == "healthy")
    targeted = next(r for r in panels[0].iter(f"{ns}rect") if r.get("data-stage") == "targeted")
    tall = float(targeted.get("height") or 0)
    assert float(healthy.get("height") or 0) == pytest.approx(tall * 0.4)


def test_funnel__text_from_the_view_is_escaped():
    view = {"rollout_id": "<script>x</script>", "threshold": THRESHOLD,
            "waves": [wave(status='"><script>alert(1)</script>')]}  # fmt: skip
    svg = funnel(view)
    assert "<script>" not in svg
    ET.fromstring(svg)


def test_progress__a_share_never_past_full():
    assert re.search(r'width="120.0"', progress(5, 10, width=240))
    assert re.search(r'width="240.0"', progress(15, 10, width=240))
    assert 'width="0.0"' in progress(0, 0)
