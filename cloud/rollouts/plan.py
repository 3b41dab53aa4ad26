"""A rollout's arithmetic, pure (no I/O, no clock of its own): the selector as bound
query parameters, wave sizes from counts and percentages, seeded membership, the abort
threshold's verdict with its figures, maintenance windows and the notify rate.

Everything here is decided from numbers the caller read in SQL, so the steps stay one
transaction each and this module stays testable in milliseconds
(``tests/unit/test_rollout_plan.py``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from cloud.rollouts.options import Abort, Target, Window

_WAVE = re.compile(r"^(?:(\d+)|(\d+(?:\.\d+)?)%)$")
#: The key of the window that applies to a store without one of its own.
DEFAULT_WINDOW = "default"


# --- the selector ----------------------------------------------------------------------


def selector_params(target: Target, *, only: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``targets`` query's parameters (``sql/queries.sql``): each list a bound
    array, NULL where the selector leaves the field out; ``only`` narrows it to some
    devices (a late joiner)."""
    f = target.fields()
    return {
        "stores": f.get("stores"),
        "groups": f.get("groups"),
        "tags": f.get("tags"),
        "binary_versions": f.get("binary_versions"),
        "device_ids": f.get("device_ids"),
        "only": None if only is None else list(only),
    }


# --- waves -----------------------------------------------------------------------------


def wave_sizes(waves: Sequence[str], targeted: int) -> list[int]:
    """The cumulative size of each wave for ``targeted`` devices: a count as given, a
    percentage rounded up (so 1% of 50 is 1, never 0), each clipped to ``targeted``.
    A wave that would add no device is dropped, so every wave has at least one. The
    last is always ``targeted``: the last wave given is raised to every device left,
    unless it is the only one or was dropped -- then a wave of the rest is added (a
    first wave never grows)."""
    if targeted <= 0:
        return []
    sizes: list[int] = []
    for w in waves:
        m = _WAVE.match(w.strip())
        if m is None:
            raise ValueError(f"not a wave size: {w!r}")
        if m.group(1) is not None:
            n = int(m.group(1))
        else:
            n = math.ceil(float(m.group(2)) * targeted / 100 - 1e-9)
        n = max(1, min(targeted, n))
        if not sizes or n > sizes[-1]:
            sizes.append(n)
    if sizes[-1] < targeted:
        # the last wave given is raised to the rest; one dropped (no bigger than the
        # one before) gives way to a wave of the rest, so wave 1 never grows
        last_kept = len(sizes) >= 1 and _size(waves[-1], targeted) == sizes[-1]
        if last_kept and len(sizes) > 1:
            sizes[-1] = targeted
        else:
            sizes.append(targeted)
    return sizes


def _size(wave: str, targeted: int) -> int:
    m = _WAVE.match(wave.strip())
    assert m is not None
    if m.group(1) is not None:
        return max(1, min(targeted, int(m.group(1))))
    return max(1, min(targeted, math.ceil(float(m.group(2)) * targeted / 100 - 1e-9)))


def membership(device_ids: Iterable[str], sizes: Sequence[int], seed: int) -> dict[str, int]:
    """Each device's wave (1-based): the devices in an order shuffled by ``seed`` (the
    same seed, the same order, whatever order they were read in), the first
    ``sizes[0]`` in wave 1, up to ``sizes[1]`` in wave 2, and so on. Not "first enrolled
    first", which would put one store's whole uplink in the first wave."""
    ordered = sorted(set(device_ids))
    random.Random(seed).shuffle(ordered)
    out: dict[str, int] = {}
    wave = 0
    for position, device_id in enumerate(ordered):
        while wave < len(sizes) and position >= sizes[wave]:
            wave += 1
        out[device_id] = min(wave, len(sizes) - 1) + 1
    return out


def draw_seed(rng: random.Random | None = None) -> int:
    """A seed for a rollout that was given none (recorded, so its waves can be redrawn)."""
    return (rng or random.SystemRandom()).randrange(1, 2**62)


# --- the threshold ---------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """The devices sampled -- every one that answered (applied: soaking or healthy;
    failed, refused) or timed out -- and those of the counted failure kinds among them.

    A soaking device counts as sampled (not yet a failure): a failure shows at once
    while success waits out the soak, so a rate over finished devices alone would read
    100% on the first few failures of a wave that is mostly well."""

    failures: int
    sampled: int

    @property
    def failure_percent(self) -> float:
        return 0.0 if self.sampled == 0 else round(100.0 * self.failures / self.sampled, 3)


@dataclass(frozen=True)
class Verdict:
    """Whether the rollout passed its threshold; if so, by which criterion and figures."""

    abort: bool
    criterion: str | None = None
    figures: Figures | None = None

    def detail(self, threshold: float) -> dict[str, Any]:
        f = self.figures or Figures(0, 0)
        return {
            "failures": f.failures,
            "sampled": f.sampled,
            "failure_percent": f.failure_percent,
            "threshold": threshold,
        }


def figures(counts: Mapping[str, int], abort: Abort) -> Figures:
    """``counts``: devices by status (applied, healthy, failed, refused, timed_out, ...)."""
    failures = sum(int(counts.get(k, 0)) for k in abort.count)
    sampled = sum(
        int(counts.get(k, 0)) for k in ("applied", "healthy", "failed", "refused", "timed_out")
    )
    return Figures(failures, sampled)


def evaluate(wave: Mapping[str, int], total: Mapping[str, int], abort: Abort) -> Verdict:
    """Past the threshold? The wave's rate counts once ``min_sample_wave`` of its devices
    have an outcome, the rollout's once ``min_sample_total`` have; past means above
    ``failure_percent`` (strictly). The wave's criterion is looked at first."""
    w, t = figures(wave, abort), figures(total, abort)
    if w.sampled >= abort.min_sample_wave and w.failure_percent > abort.failure_percent:
        return Verdict(True, "wave_failure_rate", w)
    if t.sampled >= abort.min_sample_total and t.failure_percent > abort.failure_percent:
        return Verdict(True, "total_failure_rate", t)
    return Verdict(False, None, t)


# --- windows and rate ------------------------------------------------------------------


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def in_window(window: Window | None, now: float) -> bool:
    """Whether ``now`` (epoch seconds) is inside ``window`` (None: always). ``end``
    before ``start`` spans midnight; ``start == end`` is the whole day."""
    if window is None:
        return True
    local = datetime.fromtimestamp(now, tz=UTC).astimezone(ZoneInfo(window.tz))
    minute = local.hour * 60 + local.minute
    start, end = _minutes(window.start), _minutes(window.end)
    if start == end:
        return True
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def window_of(windows: Mapping[str, Window] | None, store: str) -> Window | None:
    if not windows:
        return None
    return windows.get(store) or windows.get(DEFAULT_WINDOW)


def open_stores(
    windows: Mapping[str, Window] | None, stores: Iterable[str], now: float
) -> set[str]:
    """Which of ``stores`` may be notified at ``now``."""
    return {s for s in set(stores) if in_window(window_of(windows, s), now)}


#: The rate is counted over the last minute.
RATE_WINDOW_S = 60.0


def quota(rate_per_minute: int | None, notified_last_minute: int, wanted: int) -> int:
    """How many devices may be notified now: all ``wanted`` without a rate, else what
    the last minute's notifications left of ``rate_per_minute``."""
    if rate_per_minute is None:
        return wanted
    return max(0, min(wanted, rate_per_minute - notified_last_minute))


__all__ = [
    "DEFAULT_WINDOW",
    "RATE_WINDOW_S",
    "Figures",
    "Verdict",
    "draw_seed",
    "evaluate",
    "figures",
    "in_window",
    "membership",
    "open_stores",
    "quota",
    "selector_params",
    "wave_sizes",
    "window_of",
]
