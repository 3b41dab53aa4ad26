"""Paged lists, the same way on every route: ``?limit=`` (default 100, at most 1000) and
``?after=`` (the ``next`` of the page before), answered ``{"items": [...], "next":
cursor|null}``. A query asks for ``limit + 1`` rows; the extra one only says there is
more (``page``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict

from cloud.api.fleet.fields import Clean

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: A cursor is text a page gave; longer is not one of ours.
MAX_CURSOR_CHARS = 200

T = TypeVar("T")
R = TypeVar("R")

Limit = Annotated[
    int, Query(ge=1, le=MAX_LIMIT, description=f"items per page (at most {MAX_LIMIT})")
]
After = Annotated[
    str | None,
    Query(max_length=MAX_CURSOR_CHARS, description="the `next` of the page before"),
    Clean,
]


class Page(BaseModel, Generic[T]):
    """One page of a list; ``next`` is the cursor of the following page (null: the last)."""

    model_config = ConfigDict(extra="forbid")

    items: list[T]
    next: str | None


def page(rows: Sequence[R], limit: int, cursor: Callable[[R], str]) -> tuple[list[R], str | None]:
    """The first ``limit`` of ``rows`` (fetched ``limit + 1``) and the next cursor."""
    if len(rows) > limit:
        kept = list(rows[:limit])
        return kept, cursor(kept[-1])
    return list(rows), None


__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "After", "Limit", "Page", "page"]
