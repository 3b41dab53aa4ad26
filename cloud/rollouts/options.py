"""What a rollout can be told (issue 14's anchors), as strict pydantic models: every
field named plainly, defaults as named constants with their unit, a typo an error that
names the field.

    target     which devices: stores, groups, tags, binary_versions, device_ids (AND
               across fields, OR within one), or all: true; an empty selector is refused
    waves      cumulative sizes, counts or percentages (["1%", "10%", "50%", "100%"]);
               the last wave takes every targeted device left
    seed       membership randomised with it (drawn and recorded when not given)
    soak_s     a device succeeds once it applied AND reported healthy for this long
    abort      failure_percent past which it aborts, the minimum samples per wave and
               overall before the rate counts, which failure kinds count
    device_timeout_s   a device not applied/answered by then is timed_out
    gates      approve_after: waves after which it waits for an operator's approval
    rate_per_minute    devices notified per minute (None: no limit)
    windows    per store {tz, start, end} (plus "default"): notified only inside it

(How often the run looks at a wave's progress is its workflow's: the WAIT between two
polls, 10 s in cloud/workflows/*_rollout.yaml.)
"""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: A wave every tenth, then half, then all: a first wave small enough to stop a bad
#: change cheaply, big enough to sample.
DEFAULT_WAVES = ("10%", "50%", "100%")
#: Seconds a device must stay healthy after it applied the change (5 minutes).
DEFAULT_SOAK_S = 300.0
#: Seconds a device has to apply or answer before it counts as timed out (an hour).
DEFAULT_DEVICE_TIMEOUT_S = 3600.0
#: Seconds between two polls of a wave's progress.
FailureKind = Literal["failed", "refused", "timed_out"]
FAILURE_KINDS: tuple[FailureKind, ...] = ("failed", "refused", "timed_out")

_WAVE = re.compile(r"^(?:(\d{1,9})|(\d{1,3}(?:\.\d{1,4})?)%)$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Strict):
    """Which devices: AND across the fields given, OR within one list."""

    all: bool = False
    stores: list[str] | None = Field(None, min_length=1, max_length=10_000)
    groups: list[str] | None = Field(None, min_length=1, max_length=10_000)
    tags: list[str] | None = Field(None, min_length=1, max_length=1000)
    binary_versions: list[str] | None = Field(None, min_length=1, max_length=1000)
    device_ids: list[str] | None = Field(None, min_length=1, max_length=100_000)

    @field_validator("stores", "groups", "tags", "binary_versions", "device_ids")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for name in v:
            if not name or len(name) > 200 or "\x00" in name:
                raise ValueError("each name is 1-200 characters, no NUL")
        return sorted(set(v))

    @model_validator(mode="after")
    def _not_empty(self) -> Target:
        if not self.all and not self.fields():
            raise ValueError("the target selects nothing: give all: true or a field")
        if self.all and self.fields():
            raise ValueError("all: true takes no other field")
        return self

    def fields(self) -> dict[str, list[str]]:
        """The lists given, by field."""
        out = {}
        for name in ("stores", "groups", "tags", "binary_versions", "device_ids"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @property
    def scope(self) -> tuple[str, str | None] | None:
        """Where Finalize assigns the version when the selector is one place: the fleet
        (all), one group, one store; None for anything finer (device assignments stay)."""
        f = self.fields()
        if self.all:
            return ("fleet", None)
        if list(f) == ["groups"] and len(f["groups"]) == 1:
            return ("group", f["groups"][0])
        if list(f) == ["stores"] and len(f["stores"]) == 1:
            return ("store", f["stores"][0])
        return None


class Abort(_Strict):
    """When a rollout stops itself: past ``failure_percent`` of the sampled devices
    (those with an outcome) failing, once at least ``min_sample_wave`` of the wave, or
    ``min_sample_total`` overall, have an outcome; only the kinds in ``count`` count."""

    failure_percent: float = Field(10.0, ge=0, le=100)
    min_sample_wave: int = Field(5, ge=1)
    min_sample_total: int = Field(10, ge=1)
    count: list[FailureKind] = Field(default_factory=lambda: list(FAILURE_KINDS), min_length=1)


class Gates(_Strict):
    #: Wave numbers (1-based) after which the rollout waits for ``approve``.
    approve_after: list[int] = Field(default_factory=list)

    @field_validator("approve_after")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError("wave numbers start at 1")
        return sorted(set(v))


class Window(_Strict):
    """Local hours a store may be notified in: ``start`` to ``end`` (``end`` before
    ``start``: across midnight), in the IANA time zone ``tz``."""

    tz: str = "UTC"
    start: str
    end: str

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError("a time is HH:MM (00:00-23:59)")
        return v


class RolloutOptions(_Strict):
    """How a rollout goes (module docstring). ``model_dump()`` is what the view shows
    (defaults filled in)."""

    target: Target
    waves: list[str] = Field(default_factory=lambda: list(DEFAULT_WAVES), min_length=1,
                             max_length=100)  # fmt: skip
    seed: int | None = Field(None, ge=0, le=2**62)
    soak_s: float = Field(DEFAULT_SOAK_S, ge=0, le=30 * 86_400)
    abort: Abort = Field(default_factory=Abort)
    device_timeout_s: float = Field(DEFAULT_DEVICE_TIMEOUT_S, gt=0, le=30 * 86_400)
    gates: Gates = Field(default_factory=Gates)
    rate_per_minute: int | None = Field(None, ge=1, le=1_000_000)
    windows: dict[str, Window] | None = None

    @field_validator("waves")
    @classmethod
    def _waves(cls, v: list[str]) -> list[str]:
        for w in v:
            m = _WAVE.match(str(w).strip())
            if not m:
                raise ValueError(f"a wave is a count (25) or a percentage (10%), not {w!r}")
            if m.group(2) is not None and not 0 < float(m.group(2)) <= 100:
                raise ValueError(f"a percentage is above 0 and at most 100, not {w!r}")
            if m.group(1) is not None and int(m.group(1)) < 1:
                raise ValueError("a count is at least 1")
        return [str(w).strip() for w in v]


__all__ = [
    "DEFAULT_DEVICE_TIMEOUT_S",
    "DEFAULT_SOAK_S",
    "DEFAULT_WAVES",
    "FAILURE_KINDS",
    "Abort",
    "Gates",
    "RolloutOptions",
    "Target",
    "Window",
]
