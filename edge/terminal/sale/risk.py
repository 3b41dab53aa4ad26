"""Offline risk limits: may this payment be approved without the acquirer?

Two halves, used together by the approve-offline step:
- ``check_offline`` decides from what the step can read (counters, outbox age) and
  returns a machine-readable reason for any decline;
- ``apply_guards`` re-states the same caps as guards on the step's commit, so the
  database enforces them in the approving transaction: two payments racing for the last
  room under a cap cannot both get it (the loser's step re-runs and declines).

Velocity uses fixed windows (``velocity:<pan hash>:<window number>``): a card may be
used ``velocity_max`` times per window; cheaper than a sliding window and exact at the
window's edges, where a sliding one would not matter for an offline floor limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edge.engine.records import Guard
from edge.terminal.config import RiskLimits

#: Counter of unsent offline approvals: (amount in minor units, count).
OFFLINE = "offline"

# Machine-readable decline reasons (the API returns them as they are).
FLOOR_LIMIT = "floor_limit"
OFFLINE_AMOUNT_CAP = "offline_amount_cap"
OFFLINE_COUNT_CAP = "offline_count_cap"
OFFLINE_AGE = "offline_age"
VELOCITY = "velocity"
STORAGE_FULL = "storage_full"
ALREADY_RELEASED = "offline_already_released"


class Guarding(Protocol):
    def guard(
        self,
        name: str,
        *,
        amount: int = 0,
        count: int = 0,
        max_amount: int | None = None,
        max_count: int | None = None,
        reason: str = "limit_exceeded",
    ) -> None: ...


@dataclass(frozen=True)
class OfflineDecision:
    approved: bool
    reason: str | None = None


def velocity_counter(pan_hash: str, now: float, window_s: int) -> str:
    return f"velocity:{pan_hash}:{int(now // window_s)}"


def card_use_counter(pan_hash: str, now: float, window_s: int) -> str:
    """Every use of a card in a fixed window (any channel, any outcome): the fraud
    policy's velocity rules read it. Under the ``velocity:`` prefix, so maintenance
    drops it once its window has ended."""
    return f"velocity:uses:{pan_hash}:{int(now // window_s)}"


def check_offline(
    limits: RiskLimits,
    *,
    amount_minor: int,
    pan_hash: str,
    now: float,
    counters: dict[str, tuple[int, int]],
    oldest_unsent: float | None,
) -> OfflineDecision:
    """Decide an offline approval from the current totals; the first limit hit names it."""
    if amount_minor > limits.floor_limit_minor:
        return OfflineDecision(False, FLOOR_LIMIT)
    if oldest_unsent is not None and now - oldest_unsent > limits.max_offline_age_s:
        return OfflineDecision(False, OFFLINE_AGE)
    amount, count = counters.get(OFFLINE, (0, 0))
    if amount + amount_minor > limits.offline_amount_cap_minor:
        return OfflineDecision(False, OFFLINE_AMOUNT_CAP)
    if count + 1 > limits.offline_count_cap:
        return OfflineDecision(False, OFFLINE_COUNT_CAP)
    used = counters.get(velocity_counter(pan_hash, now, limits.velocity_window_s), (0, 0))[1]
    if used + 1 > limits.velocity_max:
        return OfflineDecision(False, VELOCITY)
    return OfflineDecision(True)


def apply_guards(
    ctx: Guarding, limits: RiskLimits, *, amount_minor: int, pan_hash: str, now: float
) -> None:
    """The caps of ``check_offline`` as guards on the approving step's commit."""
    ctx.guard(
        OFFLINE,
        amount=amount_minor,
        count=1,
        max_amount=limits.offline_amount_cap_minor,
        reason=OFFLINE_AMOUNT_CAP,
    )
    ctx.guard(OFFLINE, max_count=limits.offline_count_cap, reason=OFFLINE_COUNT_CAP)
    ctx.guard(
        velocity_counter(pan_hash, now, limits.velocity_window_s),
        count=1,
        max_count=limits.velocity_max,
        reason=VELOCITY,
    )


def released_marker(payment_run_id: str) -> str:
    """The counter that says an offline payment's exposure was given back (count 1).

    Two things give it back: the cloud acknowledging the payment's approval, and a void
    (or the payment's own compensation). Each takes this marker in the same transaction
    (``max_count=1``), so whichever comes second releases nothing."""
    return f"offline_released:{payment_run_id}"


def release_guards(payment_run_id: str, amount_minor: int) -> tuple[Guard, ...]:
    """The counter changes that give one offline payment's room back, marker first: a
    store applying an acknowledgement stops at the first refused one (see
    ``Acknowledgement``), so a taken marker leaves the exposure as it is."""
    return (
        Guard(released_marker(payment_run_id), count=1, max_count=1, reason=ALREADY_RELEASED),
        Guard(OFFLINE, amount=-amount_minor, count=-1, reason="offline_release"),
    )


def release(ctx: Guarding, *, payment_run_id: str, amount_minor: int, released: bool) -> bool:
    """Give back offline room in this step's commit (a void, a compensation), unless it
    was given back already (``released``: the step read the marker set). Returns whether
    it did. If the acknowledgement takes the marker between the read and the commit,
    the commit is refused and the step runs again, reading the marker set this time."""
    if released:
        return False
    for g in release_guards(payment_run_id, amount_minor):
        ctx.guard(g.name, amount=g.amount, count=g.count, max_count=g.max_count, reason=g.reason)
    return True


def restore(ctx: Guarding, *, payment_run_id: str, amount_minor: int) -> None:
    """Undo ``release`` (a void compensated): the exposure and the marker stand again."""
    ctx.guard(OFFLINE, amount=amount_minor, count=1, reason="offline_restore")
    ctx.guard(released_marker(payment_run_id), count=-1, reason="offline_restore")
