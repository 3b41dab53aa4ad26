"""``{{ state.x }}`` placeholders in HTTP step url/headers/body and sub-workflow inputs.

A placeholder is ``{{ path }}``, where ``path`` is ``state`` or ``input`` followed by
``.name`` segments and ``[index]`` indexes: ``{{ state.card.last4 }}``,
``{{ input.items[0].sku }}``, ``{{ state.items[-1] }}``. Nothing else is evaluated: no
filters, no expressions (``when:`` has :mod:`edge.engine.expressions` for that). Every
``{{`` must open a well-formed placeholder; a lone ``}}`` is plain text (JSON is full
of them).

Rendering walks dicts (keys and values) and lists. A string that is exactly one
placeholder, give or take surrounding whitespace, becomes the value itself, type and
all; otherwise each placeholder is replaced by its value as text: ``None`` as ``""``,
dicts, lists and pydantic models as compact JSON, anything else by ``str()``. Dict keys
are always rendered as text, since a key must stay hashable. Paths are read with
:func:`edge.engine.expressions.lookup`, but unlike in an expression a missing value is
an error, not ``None``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel

from edge.engine.expressions import NAMES, lookup
from edge.errors import ExpressionError

__all__ = ["check_template", "render"]

_PLACEHOLDER: Final = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_ROOT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEGMENT: Final = re.compile(r"\.([A-Za-z][A-Za-z0-9_]*)|\[(-?[0-9]{1,9})\]")
_PATH: Final = re.compile(f"(?:{_SEGMENT.pattern})*")
_MISSING: Final = object()


@dataclass(frozen=True, slots=True)
class _Placeholder:
    root: str
    segments: tuple[str | int, ...]

    def __str__(self) -> str:
        path = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in self.segments)
        return f"{{{{ {self.root}{path} }}}}"

    def resolve(self, state: object, input: object) -> object:
        value = state if self.root == "state" else input
        where = self.root
        for segment in self.segments:
            found = lookup(value, segment, _MISSING)
            if found is _MISSING:
                what = f"index {segment}" if isinstance(segment, int) else repr(segment)
                raise ExpressionError(f"{self}: {what} not found in {where}")
            value = found
            where += f"[{segment}]" if isinstance(segment, int) else f".{segment}"
        return value


def render(template: object, state: object, input: object = None) -> object:
    """``template`` with every placeholder replaced by its value from ``state``/``input``."""
    if isinstance(template, str):
        parts = _parse(template)
        if len(parts) == 1 and isinstance(parts[0], _Placeholder):
            return parts[0].resolve(state, input)
        return "".join(
            _text(p.resolve(state, input)) if isinstance(p, _Placeholder) else p for p in parts
        )
    if isinstance(template, dict):
        return {
            _text(render(k, state, input)): render(v, state, input) for k, v in template.items()
        }
    if isinstance(template, list):
        return [render(item, state, input) for item in template]
    return template


def check_template(template: object) -> list[str]:
    """What is wrong with the placeholders in ``template``; empty when nothing is."""
    problems: list[str] = []
    if isinstance(template, str):
        try:
            _parse(template)
        except ExpressionError as exc:
            problems.append(exc.message)
    elif isinstance(template, dict):
        for key, value in template.items():
            problems += check_template(key) + check_template(value)
    elif isinstance(template, list):
        for item in template:
            problems += check_template(item)
    return problems


def _parse(text: str) -> list[str | _Placeholder]:
    """``text`` as literal strings and placeholders; a placeholder standing alone (give or
    take whitespace) comes back as the only part."""
    literals: list[str] = []
    placeholders: list[_Placeholder] = []
    end = 0
    for match in _PLACEHOLDER.finditer(text):
        literals.append(text[end : match.start()])
        placeholders.append(_placeholder(match.group(0), match.group(1).strip()))
        end = match.end()
    literals.append(text[end:])
    if any("{{" in literal for literal in literals):
        raise ExpressionError(f"'{{{{' without a closing '}}}}' in {text!r}")
    if len(placeholders) == 1 and not literals[0].strip() and not literals[1].strip():
        return [placeholders[0]]
    parts: list[str | _Placeholder] = []
    for literal, placeholder in zip(literals, placeholders, strict=False):
        parts += [literal, placeholder]
    parts.append(literals[-1])
    return [p for p in parts if p != ""]


def _placeholder(written: str, path: str) -> _Placeholder:
    root = _ROOT.match(path)
    if root is None or root.group(0) not in NAMES:
        raise ExpressionError(f"{written}: a placeholder must start with 'state' or 'input'")
    rest = path[root.end() :]
    if not _PATH.fullmatch(rest):
        raise ExpressionError(
            f"{written}: only .name segments (not starting with '_') and [integer] indexes"
            " may follow; no filters or expressions"
        )
    segments = tuple(
        int(index) if index is not None else name
        for name, index in (m.groups() for m in _SEGMENT.finditer(rest))
    )
    return _Placeholder(root.group(0), segments)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), default=_jsonable)
    return str(value)


def _jsonable(value: object) -> object:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)
