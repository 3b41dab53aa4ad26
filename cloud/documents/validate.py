"""Config and fraud-policy documents checked with the terminal's own models, so what the
cloud stores is what a terminal takes: ``edge.terminal.config.ConfigDocument`` (the live,
pushable part of the terminal's config: ``{"risk": {...}}``) and
``edge.terminal.sale.policy.PolicyDocument``. A problem names its field as a path in the
request (``content.risk.floor_limit_minor``, ``content.rules[2].max_minor``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from cloud.documents.errors import DocumentInvalid
from edge.terminal.config import ConfigDocument
from edge.terminal.sale.policy import PolicyDocument
from sync.server_ingest import text_problem

Kind = Literal["config", "policy"]
KINDS: tuple[Kind, ...] = ("config", "policy")
MODELS: dict[str, type[BaseModel]] = {"config": ConfigDocument, "policy": PolicyDocument}
#: The error type of PolicyDocument's checks across rules (its context lists each).
_RULES_CONFLICT = "policy_rules_conflict"


def validate(kind: Kind, content: Any) -> dict[str, Any]:
    """``content`` as the terminal's model reads it back (defaults filled in), or
    ``DocumentInvalid`` naming every bad field."""
    if not isinstance(content, Mapping):
        raise DocumentInvalid([("content", f"a {kind} document is a JSON object")])
    problem = text_problem(content)
    if problem:
        raise DocumentInvalid([("content", f"the document {problem}")])
    try:
        model = MODELS[kind].model_validate(dict(content))
    except ValidationError as exc:
        raise DocumentInvalid(list(problems(exc, content))) from None
    out: dict[str, Any] = model.model_dump(mode="json")
    return out


def problems(exc: ValidationError, content: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, message) of each error, the field a path from the request's ``content``."""
    found: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        if err["type"] == _RULES_CONFLICT:
            for index, name, message in err["ctx"]["problems"]:
                found.append((f"content.rules[{index}].{name}", str(message)))
            continue
        loc = list(err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("type")
        message = str(err["msg"])
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            message = str(err["ctx"]["error"])
        found.append((field_path(loc, content), message))
    return found or [("content", str(exc))]


def field_path(loc: Sequence[int | str], content: Mapping[str, Any]) -> str:
    """``content.rules[0].max_minor`` for pydantic's ``('rules', 0, 'amount_over',
    'max_minor')``: the tag pydantic puts after a rule's index (its ``type``) is not a
    field of the request, so it is left out."""
    rules = content.get("rules")
    out = "content"
    for n, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        after = loc[n - 1] if n >= 1 else None
        if n >= 2 and loc[n - 2] == "rules" and isinstance(after, int):
            rule = rules[after] if isinstance(rules, list) and after < len(rules) else None
            if isinstance(rule, Mapping) and rule.get("type") == part:
                continue
        out += f".{part}"
    return out


__all__ = ["KINDS", "MODELS", "Kind", "field_path", "problems", "validate"]
