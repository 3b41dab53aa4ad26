"""The fraud policy document: its errors, the rule and document models, and loading.

Errors, all rooted in ``edge.errors.TillflowError``::

    PolicyError                 (policy_error)
    ├── PolicyInvalid           (policy_invalid) a document is wrong; lists every problem
    ├── PolicyVersionConflict   (policy_version_conflict) downgrade, or a reused version
    ├── NoPreviousPolicy        (policy_no_previous) rollback with nothing to go back to
    ├── PolicyStoreError        (policy_store_error) the policy directory failed
    └── PolicyInputError        (policy_input_invalid) a Txn field is out of range
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeAlias

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edge.errors import TillflowError

Action = Literal["decline", "online", "review"]


# --- errors ----------------------------------------------------------------------------


class PolicyError(TillflowError):
    code = "policy_error"


@dataclass(frozen=True)
class PolicyProblem:
    """One thing wrong in a policy document: the file, the rule (index and id), the field."""

    file: str
    rule_index: int | None
    rule_id: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        parts = [self.file]
        if self.rule_index is not None:
            rule = f"rules[{self.rule_index}]"
            parts.append(rule + (f" (id '{self.rule_id}')" if self.rule_id else ""))
        if self.field:
            parts.append(f"field '{self.field}'")
        return ", ".join(parts) + ": " + self.message


class PolicyInvalid(PolicyError):
    code = "policy_invalid"

    def __init__(self, problems: Iterable[PolicyProblem]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in fraud policy"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class PolicyVersionConflict(PolicyError):
    code = "policy_version_conflict"


class NoPreviousPolicy(PolicyError):
    code = "policy_no_previous"


class PolicyStoreError(PolicyError):
    """Reading or writing the policy directory failed; ``retryable`` is set per cause."""

    code = "policy_store_error"

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        path: Path,
        hint: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message, hint=hint)
        self.operation = operation
        self.path = str(path)
        self.retryable = retryable


class PolicyInputError(PolicyError):
    code = "policy_input_invalid"


# --- the document ----------------------------------------------------------------------

_RULE_ID = r"^[A-Za-z0-9_.\-]+$"  # no ':' or spaces, so a reason "type:id" splits cleanly
_BIN = r"^[0-9]{6,8}$"
_MCC = r"^[0-9]{4}$"
_PAN_HASH = r"^[0-9a-f]{32,128}$"  # lowercase hex of a keyed hash; a clear PAN cannot pass
_CURRENCY = r"^[A-Z]{3}$"

#: What a pattern mismatch means, for error messages a person can act on.
_PATTERN_HINTS = {
    _RULE_ID: "must be letters, digits, '_', '.' or '-'",
    _BIN: "must be a BIN prefix of 6 to 8 digits (quote it in YAML)",
    _MCC: "must be a 4-digit merchant category code (quote it in YAML)",
    _PAN_HASH: "must be a lowercase hex keyed PAN hash (32-128 chars), never a clear PAN",
    _CURRENCY: "must be an ISO 4217 alphabetic code such as 'EUR'",
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _Rule(_Strict):
    id: str = Field(min_length=1, max_length=64, pattern=_RULE_ID)


class AmountOverRule(_Rule):
    type: Literal["amount_over"]
    max_minor: int = Field(ge=0)
    currency: str | None = Field(None, pattern=_CURRENCY)
    action: Action


class BinBlockRule(_Rule):
    type: Literal["bin_block"]
    bins: list[Annotated[str, Field(pattern=_BIN)]] = Field(min_length=1)
    action: Action = "decline"


class BinAllowRule(_Rule):
    type: Literal["bin_allow"]
    bins: list[Annotated[str, Field(pattern=_BIN)]] = Field(min_length=1)
    action: Action


class VelocityRule(_Rule):
    type: Literal["velocity"]
    max_count: int = Field(ge=1)
    window_s: int = Field(ge=1)
    action: Action


class TimeOfDayRule(_Rule):
    type: Literal["time_of_day"]
    start: str
    end: str
    action: Action

    @field_validator("start", "end")
    @classmethod
    def _hh_mm(cls, value: str) -> str:
        _minute_of(value)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
        return self

    @property
    def start_minute(self) -> int:
        return _minute_of(self.start)

    @property
    def end_minute(self) -> int:
        return _minute_of(self.end)


class MccBlockRule(_Rule):
    type: Literal["mcc_block"]
    mccs: list[Annotated[str, Field(pattern=_MCC)]] = Field(min_length=1)
    action: Action


class HotListRule(_Rule):
    type: Literal["hot_list"]
    pan_hashes: list[Annotated[str, Field(pattern=_PAN_HASH)]]
    action: Action = "decline"


Rule: TypeAlias = Annotated[
    AmountOverRule
    | BinBlockRule
    | BinAllowRule
    | VelocityRule
    | TimeOfDayRule
    | MccBlockRule
    | HotListRule,
    Field(discriminator="type"),
]
_RULE_MODELS: dict[str, type[_Rule]] = {
    "amount_over": AmountOverRule,
    "bin_block": BinBlockRule,
    "bin_allow": BinAllowRule,
    "velocity": VelocityRule,
    "time_of_day": TimeOfDayRule,
    "mcc_block": MccBlockRule,
    "hot_list": HotListRule,
}


def _minute_of(hh_mm: str) -> int:
    hh, sep, mm = hh_mm.partition(":")
    ok = sep and len(hh) == 2 and len(mm) == 2 and (hh + mm).isascii() and (hh + mm).isdigit()
    if not ok or int(hh) > 23 or int(mm) > 59:
        raise ValueError(f"'{hh_mm}' is not a time of day as HH:MM (00:00 to 23:59)")
    return int(hh) * 60 + int(mm)


#: The error type for checks across rules (ids, windows); its context lists each problem.
_RULES_CONFLICT = "policy_rules_conflict"


class PolicyDocument(_Strict):
    """A fraud policy as written by an operator; immutable once it has a version."""

    version: int = Field(ge=1)
    name: str = Field("default", min_length=1)
    rules: list[Rule]

    @model_validator(mode="after")
    def _rules_agree(self) -> Self:
        problems: list[tuple[int, str, str]] = []
        first: dict[str, int] = {}
        window: tuple[int, int] | None = None  # (index, window_s) of the first velocity rule
        for i, rule in enumerate(self.rules):
            if rule.id in first:
                problems.append((i, "id", f"duplicate rule id (first at rules[{first[rule.id]}])"))
            first.setdefault(rule.id, i)
            if isinstance(rule, VelocityRule):
                if window is None:
                    window = (i, rule.window_s)
                elif rule.window_s != window[1]:
                    # Txn carries one card_recent_count, so one window per policy.
                    problems.append(
                        (
                            i,
                            "window_s",
                            f"every velocity rule must use the same window; rules[{window[0]}] "
                            f"uses {window[1]} s",
                        )
                    )
        if problems:
            summary = "; ".join(f"rules[{i}].{f}: {m}" for i, f, m in problems)
            raise PydanticCustomError(
                _RULES_CONFLICT, "{summary}", {"summary": summary, "problems": tuple(problems)}
            )
        return self


# --- loading ---------------------------------------------------------------------------


def load_policy_file(path: Path) -> PolicyDocument:
    """Read and validate a policy (``.json`` as JSON, anything else as YAML).

    Raises ``PolicyInvalid`` listing every problem, each naming the file, the rule's
    index and id, and the field.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyInvalid(
            [PolicyProblem(str(p), None, None, None, f"cannot read: {exc}")]
        ) from exc
    return _parse(text, str(p), is_json=p.suffix.lower() == ".json")


def _parse(text: str, source: str, *, is_json: bool) -> PolicyDocument:
    try:
        if is_json:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        else:  # a SafeLoader subclass: no arbitrary objects
            data = yaml.load(text, Loader=_UniqueKeyLoader)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if is_json else "YAML"
        raise PolicyInvalid(
            [PolicyProblem(source, None, None, None, f"not valid {kind}: {exc}")]
        ) from exc
    if not isinstance(data, dict):
        raise PolicyInvalid([PolicyProblem(source, None, None, None, "a policy must be a mapping")])
    try:
        return PolicyDocument.model_validate(data)
    except ValidationError as exc:
        raise PolicyInvalid(_problems(exc, data, source)) from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key '{key}' appears twice")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a repeated key instead of silently keeping the last one
    (a second ``bins:`` would otherwise drop the first block list)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _problems(exc: ValidationError, data: dict[str, Any], source: str) -> Iterator[PolicyProblem]:
    rules = data.get("rules")

    def rule_id(at: int | None) -> str | None:
        if at is None or not isinstance(rules, list) or at >= len(rules):
            return None
        raw = rules[at]
        value = raw.get("id") if isinstance(raw, dict) else None
        return value if isinstance(value, str) else None

    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if err["type"] == _RULES_CONFLICT:
            for at, fld, message in err["ctx"]["problems"]:
                yield PolicyProblem(source, at, rule_id(at), fld, message)
            continue
        index: int | None = None
        rest: tuple[str | int, ...] = loc
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            index = loc[1]
            rest = loc[3:] if len(loc) >= 3 and loc[2] in _RULE_MODELS else loc[2:]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            rest = (*rest, "type")
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
        yield PolicyProblem(
            source,
            index,
            rule_id(index),
            dotted.removeprefix(".") or None,
            _message(err, rest, rules, index),
        )


def _message(err: Any, rest: tuple[str | int, ...], rules: Any, index: int | None) -> str:
    kind = err["type"]
    last = next((p for p in reversed(rest) if isinstance(p, str)), None)
    if kind == "extra_forbidden":
        msg = f"unknown field '{last}'"
        allowed = list(_fields_of(rules, index)) if len(rest) == 1 else []
        close = difflib.get_close_matches(str(last), allowed, n=1)
        return msg + (f"; did you mean '{close[0]}'?" if close else "")
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        return f"unknown rule type '{err['ctx']['tag']}'; use one of {', '.join(_RULE_MODELS)}"
    if kind == "union_tag_not_found":
        return f"a rule needs 'type', one of {', '.join(_RULE_MODELS)}"
    if kind == "string_type" and isinstance(err["input"], int):
        if last in ("start", "end"):
            return 'must be a quoted "HH:MM" string (YAML reads unquoted 22:00 as the number 1320)'
        return "must be a quoted string (YAML reads unquoted digits as a number)"
    if kind == "string_pattern_mismatch":
        return _PATTERN_HINTS.get(err["ctx"]["pattern"], str(err["msg"]))
    if kind == "value_error":
        return str(err["ctx"]["error"])
    return str(err["msg"])


def _fields_of(rules: Any, index: int | None) -> Iterable[str]:
    """The keys allowed where an unknown one was found (for a did-you-mean hint)."""
    if index is None:
        return PolicyDocument.model_fields
    raw = rules[index] if isinstance(rules, list) and index < len(rules) else None
    kind = raw.get("type") if isinstance(raw, dict) else None
    model = _RULE_MODELS.get(kind) if isinstance(kind, str) else None
    return model.model_fields if model is not None else ()
