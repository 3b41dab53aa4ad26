"""The compiled fraud policy: ``Txn`` in, ``PolicyDecision`` out.

``compile_policy`` turns the document into lookup tables: a dict per prefix, MCC and
hash; a 1440-entry table of minute -> matches; sorted thresholds with precomputed match
prefixes for amounts and velocity. ``CompiledPolicy.evaluate`` is then a handful of
dict lookups and at most three bisects whatever the rule count, and returns a prebuilt
decision when at most one rule matches (so the common path allocates nothing but the
slice of an 8-digit BIN).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypeVar

from edge.terminal.sale.policy.document import (
    AmountOverRule,
    BinAllowRule,
    BinBlockRule,
    HotListRule,
    MccBlockRule,
    PolicyDocument,
    PolicyInputError,
    TimeOfDayRule,
    VelocityRule,
    _Rule,
)

DecisionAction = Literal["approve", "online", "review", "decline"]

#: Strength of each outcome; the decision is the strongest matched.
_RANK: dict[str, int] = {"approve": 0, "online": 1, "review": 2, "decline": 3}
_BY_RANK: tuple[DecisionAction, ...] = ("approve", "online", "review", "decline")
MINUTES_PER_DAY = 1440


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
