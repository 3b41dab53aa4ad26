"""Text the database can hold, checked where a request comes in: PostgreSQL text and
jsonb take no NUL character, and UTF-8 has no lone surrogate (JSON's ``"\\ud800"``),
so either, in any path, query or body field, is a 422 naming the field, never a
driver error. ``Clean`` is the validator; the aliases are the fields routes use."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator, Field

from sync import wire


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    if "\x00" in value:
        raise ValueError("must not hold a NUL character")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError("must not hold a lone surrogate")
    return value


#: The validator: put it in any ``Annotated[str, ...]`` that reaches the database.
Clean = AfterValidator(_clean)

#: A name (store, group, device id...) in a body.
Text = Annotated[str, Field(min_length=1, max_length=wire.MAX_FIELD_CHARS), Clean]
#: The same as an optional query filter.
QText = Annotated[str | None, Query(min_length=1, max_length=wire.MAX_FIELD_CHARS), Clean]
#: A device id in the path.
DeviceId = Annotated[str, Path(min_length=1, max_length=wire.MAX_FIELD_CHARS), Clean]
#: Why an operator did something (kept with the decision and in the audit log).
Why = Annotated[str, Field(min_length=1, max_length=1000), Clean]

__all__ = ["Clean", "DeviceId", "QText", "Text", "Why"]
