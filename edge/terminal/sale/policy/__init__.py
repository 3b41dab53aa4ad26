"""Fraud policy: a versioned rule document, compiled once, evaluated by a direct call.

A ``PolicyDocument`` (YAML or JSON, strict, unknown keys rejected) lists rules. A rule
*matches* a ``Txn`` as follows:

- ``amount_over``: ``amount_minor > max_minor`` (and ``txn.currency == currency`` if set)
- ``bin_block``: the card's BIN starts with one of ``bins`` (6, 7 or 8 digit prefixes)
- ``bin_allow``: the card's BIN starts with *none* of ``bins``
- ``velocity``: ``card_recent_count >= max_count``, the count being the card's *earlier*
  transactions within ``window_s``: ``max_count: 5`` lets five through, the sixth matches.
  The terminal counts every use of a card (any channel or outcome) in fixed windows of
  ``window_s`` (``risk.card_use_counter``), so a burst across a window's edge can pass
- ``time_of_day``: ``start <= local_minute < end``; ``start > end`` wraps midnight
- ``mcc_block``: ``txn.mcc`` is one of ``mccs``
- ``hot_list``: ``txn.pan_hash`` is one of ``pan_hashes`` (keyed hashes, never clear PANs)

The decision is the strongest action among the matching rules (decline > review >
online > approve); its ``reasons`` are ``"{type}:{id}"`` of every matching rule, in
document order, for offline risk decisions to record.

The package is split by concern:

- ``document``: the errors, the rule and document models, and ``load_policy_file``
- ``compiled``: ``Txn``, ``PolicyDecision``, ``CompiledPolicy`` and ``compile_policy``
- ``repository``: ``PolicyRepository``, the activated versions on disk

Everything public is re-exported here; import from ``edge.terminal.sale.policy``.
"""

from __future__ import annotations

from edge.terminal.sale.policy.compiled import CompiledPolicy, PolicyDecision, Txn, compile_policy
from edge.terminal.sale.policy.document import (
    AmountOverRule,
    BinAllowRule,
    BinBlockRule,
    HotListRule,
    MccBlockRule,
    NoPreviousPolicy,
    PolicyDocument,
    PolicyError,
    PolicyInputError,
    PolicyInvalid,
    PolicyProblem,
    PolicyStoreError,
    PolicyVersionConflict,
    Rule,
    TimeOfDayRule,
    VelocityRule,
    load_policy_file,
)
from edge.terminal.sale.policy.repository import PolicyRepository

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
