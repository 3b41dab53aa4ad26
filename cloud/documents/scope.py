"""Which assignment of a document a device follows: the precedence rule, pure.

A document version is assigned to a scope -- the whole fleet, a group, a store or one
device -- at most once per (kind, scope, value). A device follows the most specific
assignment that names it::

    device  >  store  >  group  >  fleet

(its own id, then its store, then its group, then the fleet's default). A device
without a group matches no group assignment; no match at all means no document of that
kind is assigned to it (the terminal keeps its config file's values / no policy).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

Scope = Literal["fleet", "group", "store", "device"]
#: Scopes from the most specific to the least: the first that names a device wins.
PRECEDENCE: tuple[Scope, ...] = ("device", "store", "group", "fleet")
SCOPES: frozenset[str] = frozenset(PRECEDENCE)
#: The longest group, store or device id (as the sync protocol's fields).
MAX_VALUE_CHARS = 200


@dataclass(frozen=True)
class Place:
    """Where a device sits: what the scopes are matched against."""

    device_id: str
    store: str
    group: str | None


class Scoped(Protocol):
    @property
    def scope(self) -> str: ...

    @property
    def value(self) -> str: ...


S = TypeVar("S", bound=Scoped)


def normal_value(scope: str, value: str | None) -> str:
    """The stored value of an assignment to ``scope``: '' for the fleet (which takes
    none), else the group, store or device id (1..MAX_VALUE_CHARS characters). Raises
    ``ValueError`` saying what is wrong."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; one of: fleet, group, store, device")
    if scope == "fleet":
        if value:
            raise ValueError("a fleet assignment names no value (leave it out)")
        return ""
    if not value:
        raise ValueError(f"a {scope} assignment names the {scope} (value)")
    if len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"a {scope} is at most {MAX_VALUE_CHARS} characters")
    return value


def applies(scope: str, value: str, place: Place) -> bool:
    """Whether an assignment to (``scope``, ``value``) names the device at ``place``."""
    if scope == "fleet":
        return True
    if scope == "group":
        return place.group is not None and value == place.group
    if scope == "store":
        return value == place.store
    if scope == "device":
        return value == place.device_id
    return False


def rank(scope: str) -> int:
    """0 for the most specific scope (device), 3 for the fleet."""
    return PRECEDENCE.index(scope)


def effective(assignments: Iterable[S], place: Place) -> S | None:
    """The assignment the device at ``place`` follows (most specific first), or None."""
    best: S | None = None
    for a in assignments:
        if a.scope not in SCOPES or not applies(a.scope, a.value, place):
            continue
        if best is None or rank(a.scope) < rank(best.scope):
            best = a
    return best


__all__ = [
    "MAX_VALUE_CHARS",
    "PRECEDENCE",
    "SCOPES",
    "Place",
    "Scope",
    "Scoped",
    "applies",
    "effective",
    "normal_value",
    "rank",
]
