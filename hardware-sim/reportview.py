"""Reading ``report.json`` (the fleet simulator's report) for ``hwsim.fleetreport``:
a tolerant reader. ``View`` wraps one JSON object; each read checks the value's type
and a wrong one raises ``ReportError`` naming the JSON path
(``rollouts[1].samples[3].t_s``), so the page can say which field was wrong. A missing
key or null reads as None, and keys it does not ask for are ignored: a newer simulator
may add fields without breaking an older page."""

from __future__ import annotations

import math
from typing import Any

from edge.errors import ConfigError

__all__ = ["ReportError", "View", "is_number", "kind"]


class ReportError(ConfigError):
    """``report.json`` is not what ``hwsim.fleetsim`` writes: names the JSON path."""

    code = "report_invalid"


class View:
    """A JSON object read by key, each value checked for its type, errors naming the
    path (``rollouts[1].samples[3].t_s``). A missing key (or null) reads as None."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise ReportError(f"{path}: expected an object, got {kind(value)}")
        self.data: dict[str, Any] = value
        self.path = path

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def num(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ReportError(f"{self._at(key)}: expected a number, got {kind(value)}")
        if not math.isfinite(value):
            raise ReportError(f"{self._at(key)}: expected a finite number, got {value!r}")
        return float(value)

    def text(self, key: str) -> str | None:
        value = self.data.get(key)
        return None if value is None else str(value)

    def flag(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise ReportError(f"{self._at(key)}: expected true or false, got {kind(value)}")

    def obj(self, key: str) -> View | None:
        value = self.data.get(key)
        return None if value is None else View(value, self._at(key))

    def items(self, key: str) -> list[View]:
        """A list of objects (empty when missing)."""
        return [View(v, f"{self._at(key)}[{i}]") for i, v in enumerate(self.raw_list(key))]

    def raw_list(self, key: str) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ReportError(f"{self._at(key)}: expected a list, got {kind(value)}")
        return value

    def numbers(self, key: str) -> dict[str, float]:
        """An object of name -> number (per-process figures)."""
        view = self.obj(key)
        if view is None:
            return {}
        return {k: v for k in view.data if (v := view.num(k)) is not None}


def kind(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    return "null" if value is None else type(value).__name__


def is_number(value: object) -> bool:
    """A finite JSON number (a bool is not one)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return ok and math.isfinite(value)  # type: ignore[arg-type]
