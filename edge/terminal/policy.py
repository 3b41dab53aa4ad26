"""Fraud policy: a versioned rule document, compiled once, evaluated by a direct call.

A ``PolicyDocument`` (YAML or JSON, strict, unknown keys rejected) lists rules. A rule
*matches* a ``Txn`` as follows:

- ``amount_over``: ``amount_minor > max_minor`` (and ``txn.currency == currency`` if set)
- ``bin_block``: the card's BIN starts with one of ``bins`` (6, 7 or 8 digit prefixes)
- ``bin_allow``: the card's BIN starts with *none* of ``bins``
- ``velocity``: ``card_recent_count >= max_count``, the count being the card's *earlier*
  transactions within ``window_s``: ``max_count: 5`` lets five through, the sixth matches
- ``time_of_day``: ``start <= local_minute < end``; ``start > end`` wraps midnight
- ``mcc_block``: ``txn.mcc`` is one of ``mccs``
- ``hot_list``: ``txn.pan_hash`` is one of ``pan_hashes`` (keyed hashes, never clear PANs)

The decision is the strongest action among the matching rules (decline > review >
online > approve); its ``reasons`` are ``"{type}:{id}"`` of every matching rule, in
document order, for offline risk decisions to record.

``compile_policy`` turns the document into lookup tables: a dict per prefix, MCC and
hash; a 1440-entry table of minute -> matches; sorted thresholds with precomputed match
prefixes for amounts and velocity. ``CompiledPolicy.evaluate`` is then a handful of
dict lookups and at most three bisects whatever the rule count, and returns a prebuilt
decision when at most one rule matches (so the common path allocates nothing but the
slice of an 8-digit BIN).

``PolicyRepository`` keeps every activated version on disk and switches the active one
atomically, remembering the one before for ``rollback``.

Errors, all rooted in ``edge.errors.TillflowError``::

    PolicyError                 (policy_error)
    ├── PolicyInvalid           (policy_invalid) a document is wrong; lists every problem
    ├── PolicyVersionConflict   (policy_version_conflict) downgrade, or a reused version
    ├── NoPreviousPolicy        (policy_no_previous) rollback with nothing to go back to
    ├── PolicyStoreError        (policy_store_error) the policy directory failed
    └── PolicyInputError        (policy_input_invalid) a Txn field is out of range
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeAlias, TypeVar

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

__all__ = [
    "AmountOverRule",
    "BinAllowRule",
    "BinBlockRule",
    "CompiledPolicy",
    "HotListRule",
    "MccBlockRule",
    "NoPreviousPolicy",
    "PolicyDecision",
    "PolicyDocument",
    "PolicyError",
    "PolicyInputError",
    "PolicyInvalid",
    "PolicyProblem",
    "PolicyRepository",
    "PolicyStoreError",
    "PolicyVersionConflict",
    "Rule",
    "TimeOfDayRule",
    "Txn",
    "VelocityRule",
    "compile_policy",
    "load_policy_file",
]

log = logging.getLogger(__name__)

Action = Literal["decline", "online", "review"]
DecisionAction = Literal["approve", "online", "review", "decline"]

#: Strength of each outcome; the decision is the strongest matched.
_RANK: dict[str, int] = {"approve": 0, "online": 1, "review": 2, "decline": 3}
_BY_RANK: tuple[DecisionAction, ...] = ("approve", "online", "review", "decline")
MINUTES_PER_DAY = 1440

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


# --- evaluation ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Txn:
    """What the policy sees of a transaction; built by the caller, never validated on the
    hot path beyond ``local_minute``'s range.

    ``bin6`` is the card's leading digits: 6, or 8 when the PAN is long enough (8-digit
    BIN rules can only match when 8 are given). ``pan_hash`` is the same keyed hash the
    hot list holds. ``card_recent_count`` counts this card's *earlier* transactions within
    the policy's velocity window (``CompiledPolicy.velocity_windows``), this one excluded.
    """

    amount_minor: int
    currency: str
    bin6: str
    pan_hash: str
    mcc: str
    local_minute: int
    card_recent_count: int = 0


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    action: DecisionAction
    reasons: tuple[str, ...]
    version: int


#: One matching rule as the tables hold it: (document index, reason, rank, the decision
#: when it is the only match). The index orders reasons; the decision is prebuilt.
_Hit: TypeAlias = tuple[int, str, int, PolicyDecision]
_Hits: TypeAlias = tuple[_Hit, ...]
#: Ascending thresholds, and for k thresholds passed the hits of those k rules.
_Ladder: TypeAlias = tuple[tuple[int, ...], tuple[_Hits, ...]]
_R = TypeVar("_R", bound=_Rule)


class CompiledPolicy:
    """A policy turned into lookup tables; ``evaluate`` is the payment hot path.

    Immutable after construction and safe to share between threads.
    """

    __slots__ = (
        "_allow",
        "_amount_any",
        "_amount_by_currency",
        "_approve",
        "_block",
        "_block_lengths",
        "_hot",
        "_mcc",
        "_minute",
        "_velocity",
        "document",
        "name",
        "velocity_windows",
        "version",
    )

    def __init__(self, document: PolicyDocument) -> None:
        self.document = document
        self.version = document.version
        self.name = document.name
        self._approve = PolicyDecision("approve", (), document.version)
        hits = [
            (
                i,
                f"{r.type}:{r.id}",
                _RANK[r.action],
                PolicyDecision(r.action, (f"{r.type}:{r.id}",), document.version),
            )
            for i, r in enumerate(document.rules)
        ]
        rules = list(zip(document.rules, hits, strict=True))

        minute: list[list[_Hit]] = [[] for _ in range(MINUTES_PER_DAY)]
        for rule, hit in _of(TimeOfDayRule, rules):
            start, end = rule.start_minute, rule.end_minute
            span = (
                [*range(start, end)]
                if start < end
                else [*range(start, MINUTES_PER_DAY), *range(end)]
            )
            for m in span:
                minute[m].append(hit)
        self._minute: tuple[_Hits, ...] = _interned(minute)

        self._block = _index((b, hit) for rule, hit in _of(BinBlockRule, rules) for b in rule.bins)
        self._block_lengths = tuple(sorted({len(b) for b in self._block}))
        self._allow: tuple[tuple[frozenset[str], tuple[int, ...], _Hits], ...] = tuple(
            (frozenset(rule.bins), tuple(sorted({len(b) for b in rule.bins})), (hit,))
            for rule, hit in _of(BinAllowRule, rules)
        )
        self._mcc = _index((m, hit) for rule, hit in _of(MccBlockRule, rules) for m in rule.mccs)
        self._hot = _index(
            (h, hit) for rule, hit in _of(HotListRule, rules) for h in rule.pan_hashes
        )

        amounts = _of(AmountOverRule, rules)
        self._amount_any = _ladder((r.max_minor, hit) for r, hit in amounts if r.currency is None)
        self._amount_by_currency = {
            currency: _ladder((r.max_minor, hit) for r, hit in amounts if r.currency == currency)
            for currency in {r.currency for r, _ in amounts if r.currency is not None}
        }
        velocity = _of(VelocityRule, rules)
        self._velocity = _ladder((r.max_count, hit) for r, hit in velocity)
        self.velocity_windows: tuple[int, ...] = tuple(sorted({r.window_s for r, _ in velocity}))

    def evaluate(self, txn: Txn) -> PolicyDecision:
        minute = txn.local_minute
        if not 0 <= minute < MINUTES_PER_DAY:
            raise PolicyInputError(
                f"local_minute {minute} is outside 0..1439",
                hint="pass the terminal's local time as hour * 60 + minute",
            )
        hits = self._minute[minute]  # a tuple; `+=` of two tuples with one empty copies none
        bin_ = txn.bin6
        for n in self._block_lengths:
            found = self._block.get(bin_[:n])
            if found is not None:
                hits += found
        for allowed, lengths, hit in self._allow:
            for n in lengths:
                if bin_[:n] in allowed:
                    break
            else:
                hits += hit
        found = self._mcc.get(txn.mcc)
        if found is not None:
            hits += found
        found = self._hot.get(txn.pan_hash)
        if found is not None:
            hits += found
        amount = txn.amount_minor
        ladder = self._amount_any
        if ladder is not None:
            hits += ladder[1][bisect_left(ladder[0], amount)]  # thresholds < amount matched
        ladder = self._amount_by_currency.get(txn.currency)
        if ladder is not None:
            hits += ladder[1][bisect_left(ladder[0], amount)]
        ladder = self._velocity
        if ladder is not None:
            hits += ladder[1][bisect_right(ladder[0], txn.card_recent_count)]  # max_count <= n
        if not hits:
            return self._approve
        if len(hits) == 1:
            return hits[0][3]
        return self._combine(hits)

    def _combine(self, hits: _Hits) -> PolicyDecision:
        by_index = {hit[0]: hit for hit in hits}  # an 8- and a 6-digit prefix of one rule
        if len(by_index) == 1:
            return hits[0][3]
        ordered = [by_index[i] for i in sorted(by_index)]
        return PolicyDecision(
            _BY_RANK[max(hit[2] for hit in ordered)],
            tuple(hit[1] for hit in ordered),
            self.version,
        )

    def __repr__(self) -> str:
        return f"<CompiledPolicy {self.name!r} v{self.version}, {len(self.document.rules)} rules>"


def compile_policy(doc: PolicyDocument) -> CompiledPolicy:
    return CompiledPolicy(doc)


def _of(kind: type[_R], rules: list[tuple[Any, _Hit]]) -> list[tuple[_R, _Hit]]:
    return [(r, hit) for r, hit in rules if isinstance(r, kind)]


def _index(pairs: Iterable[tuple[str, _Hit]]) -> dict[str, _Hits]:
    """key -> the hits of every rule listing it, each rule once, in document order."""
    table: dict[str, dict[int, _Hit]] = {}
    for key, hit in pairs:
        table.setdefault(key, {})[hit[0]] = hit
    return {key: tuple(v[i] for i in sorted(v)) for key, v in table.items()}


def _ladder(pairs: Iterable[tuple[int, _Hit]]) -> _Ladder | None:
    ordered = sorted(pairs, key=lambda p: (p[0], p[1][0]))
    if not ordered:
        return None
    thresholds = tuple(t for t, _ in ordered)
    prefixes = tuple(
        tuple(sorted((hit for _, hit in ordered[:k]), key=lambda h: h[0]))
        for k in range(len(ordered) + 1)
    )
    return thresholds, prefixes


def _interned(rows: list[list[_Hit]]) -> tuple[_Hits, ...]:
    """Share one tuple between equal rows (most minutes of the day look alike)."""
    seen: dict[tuple[int, ...], _Hits] = {}
    return tuple(seen.setdefault(tuple(h[0] for h in row), tuple(row)) for row in rows)


# --- the repository --------------------------------------------------------------------

POINTER_NAME = "active.json"
_VERSION_PREFIX, _VERSION_SUFFIX = "policy-v", ".json"


class _Pointer(BaseModel):
    """``active.json``: which stored version is active and which one rollback returns to.

    Unknown keys are ignored, so a terminal that downgrades its binary still reads a
    pointer written by a newer build."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    format: Literal[1] = 1
    active: int = Field(ge=1)
    previous: int | None = Field(None, ge=1)


class PolicyRepository:
    """Activated policy versions in one directory (the terminal's ``<data dir>/policies``).

    Layout: ``policy-v{version}.json`` per version (immutable once written) and
    ``active.json``, the pointer. Both are written whole to a ``.tmp`` file, fsynced,
    renamed over the target with ``os.replace`` and the directory fsynced, so after a
    crash at any point the pointer names the old version or the new one, and the version
    it names is on disk. This instance is the one writer; ``active()`` notices a pointer
    switched by another process (one ``stat`` when nothing changed), but keep the
    returned ``CompiledPolicy`` for the hot path rather than calling ``active()`` per
    transaction.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        # (pointer file identity, pointer, compiled active policy) as last read or written
        self._cache: tuple[tuple[int, int, int], _Pointer, CompiledPolicy] | None = None

    @property
    def pointer_path(self) -> Path:
        return self.directory / POINTER_NAME

    def version_path(self, version: int) -> Path:
        return self.directory / f"{_VERSION_PREFIX}{version}{_VERSION_SUFFIX}"

    def versions(self) -> list[int]:
        """Every stored version, ascending (active, previous and any older ones)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._store_error("list", self.directory, exc) from exc
        found = []
        for name in names:
            if name.startswith(_VERSION_PREFIX) and name.endswith(_VERSION_SUFFIX):
                digits = name[len(_VERSION_PREFIX) : -len(_VERSION_SUFFIX)]
                if digits.isascii() and digits.isdigit():
                    found.append(int(digits))
        return sorted(found)

    def active(self) -> CompiledPolicy | None:
        """The active policy, or None when nothing was ever activated here."""
        with self._lock:
            current = self._current()
            return current[1] if current is not None else None

    def activate(self, doc: PolicyDocument, *, force: bool = False) -> CompiledPolicy:
        """Store ``doc`` and make it the active policy; the one it replaces becomes
        ``previous``. A version not above the active one is refused unless ``force``
        (which also overwrites an unreadable pointer). A version number already stored
        with different rules is always refused: versions are immutable."""
        compiled = compile_policy(doc)
        with self._lock:
            try:
                current = self._current()
            except (PolicyStoreError, PolicyInvalid):
                if not force:
                    raise
                current = None  # forced over a pointer or active version we cannot read
            pointer = current[0] if current is not None else None
            if pointer is not None and doc.version <= pointer.active and not force:
                raise PolicyVersionConflict(
                    f"policy version {doc.version} is not above the active version "
                    f"{pointer.active} in {self.directory}",
                    hint="give the document a higher version, or pass force=True to go back",
                )
            self._store_version(doc)
            if pointer is None:
                previous = None
            elif pointer.active != doc.version:
                previous = pointer.active
            else:
                previous = pointer.previous
            self._switch(_Pointer(active=doc.version, previous=previous), compiled)
        log.info(
            "fraud policy v%s activated (previous v%s)",
            doc.version,
            previous,
            extra={"action": "policy_activate", "version": doc.version, "previous": previous},
        )
        return compiled

    def rollback(self) -> CompiledPolicy:
        """Re-activate the previous version. One step only: afterwards there is no
        previous, so a repeated rollback fails instead of returning to the version it
        just left."""
        with self._lock:
            current = self._current()
            pointer = current[0] if current is not None else None
            if pointer is None or pointer.previous is None:
                raise NoPreviousPolicy(
                    f"no previous fraud policy to roll back to in {self.directory}",
                    hint="activate a version explicitly (force=True to go back to an older one)",
                )
            compiled = compile_policy(self._load_version(pointer.previous))
            self._switch(_Pointer(active=pointer.previous, previous=None), compiled)
        log.info(
            "fraud policy rolled back from v%s to v%s",
            pointer.active,
            pointer.previous,
            extra={
                "action": "policy_rollback",
                "version": pointer.previous,
                "from": pointer.active,
            },
        )
        return compiled

    # -- internals (callers hold self._lock) --

    def _current(self) -> tuple[_Pointer, CompiledPolicy] | None:
        path = self.pointer_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache = None
            return None
        except OSError as exc:
            raise self._store_error("stat", path, exc) from exc
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is not None and self._cache[0] == identity:
            return self._cache[1], self._cache[2]
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise self._store_error("read", path, exc) from exc
        try:
            pointer = _Pointer.model_validate_json(raw)
        except ValidationError as exc:
            raise PolicyStoreError(
                f"{path} is not a valid policy pointer: {exc.errors(include_url=False)[0]['msg']}",
                operation="read",
                path=path,
                hint="activate a version with force=True to rewrite it",
            ) from exc
        compiled = compile_policy(self._load_version(pointer.active))
        self._cache = (identity, pointer, compiled)
        return pointer, compiled

    def _load_version(self, version: int) -> PolicyDocument:
        path = self.version_path(version)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise PolicyStoreError(
                f"{path} is missing: the policy pointer names version {version}",
                operation="read",
                path=path,
                hint="activate a stored version with force=True",
            ) from exc
        except OSError as exc:
            raise self._store_error("read", path, exc) from exc
        doc = _parse(text, str(path), is_json=True)
        if doc.version != version:
            raise PolicyStoreError(
                f"{path} holds version {doc.version}, not {version}",
                operation="read",
                path=path,
                hint="the file was edited or renamed by hand; restore it or activate anew",
            )
        return doc

    def _store_version(self, doc: PolicyDocument) -> None:
        path = self.version_path(doc.version)
        if path.exists():
            if self._load_version(doc.version) != doc:
                raise PolicyVersionConflict(
                    f"policy version {doc.version} is already stored in {path} with "
                    "different rules",
                    hint="versions are immutable: give the changed document a new version",
                )
            self._fsync_directory()  # a retried activation: make its earlier rename durable
            return
        body = doc.model_dump_json(indent=2, exclude_none=False)
        self._write_atomically(path, body.encode("utf-8") + b"\n")

    def _switch(self, pointer: _Pointer, compiled: CompiledPolicy) -> None:
        path = self.pointer_path
        self._write_atomically(path, pointer.model_dump_json().encode("utf-8") + b"\n")
        try:
            st = os.stat(path)
        except OSError:
            self._cache = None  # the switch is durable; the next read refills the cache
            return
        self._cache = ((st.st_ino, st.st_mtime_ns, st.st_size), pointer, compiled)

    def _write_atomically(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # best effort: the next write truncates it
                tmp.unlink(missing_ok=True)
            raise self._store_error("write", path, exc) from exc
        self._fsync_directory()

    def _fsync_directory(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._store_error("fsync", self.directory, exc) from exc

    @staticmethod
    def _store_error(operation: str, path: Path, exc: OSError) -> PolicyStoreError:
        return PolicyStoreError(
            f"cannot {operation} {path}: {exc.strerror or exc}",
            operation=operation,
            path=path,
            hint="check the policy directory's permissions and free space",
            retryable=True,
        )
