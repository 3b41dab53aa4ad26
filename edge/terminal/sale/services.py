"""What a terminal's steps are handed as ``ctx.services``: one typed object.

The engine passes it through untouched (``Engine(services=...)``); the payment, refund,
void and settlement steps read ``ctx.services.acquirer``, ``ctx.services.store`` and so
on. ``build_services`` is the one place it is put together: the ``Terminal`` calls it
with what its config says, tests and the tortures with simulators. It is frozen: a SIGHUP
reload, or a test swapping the acquirer, replaces it whole (``dataclasses.replace``), so a
step never sees half of one configuration and half of another.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from edge.engine.ports import Maintenance, OutboxSource, Store
from edge.terminal.carddata import DataKey
from edge.terminal.config import RiskLimits
from edge.terminal.drivers.contracts import Acquirer, CardReader, NetworkLink, Printer

if TYPE_CHECKING:  # the policy compiler loads with a policy (Terminal._load_policy), if any
    from edge.terminal.sale.policy import CompiledPolicy

#: How long ``read_card`` waits for a card when nothing says otherwise (the config's
#: ``peripherals.card_reader.timeout_s`` default).
DEFAULT_CARD_TIMEOUT_S = 30.0
#: The merchant category code a fraud policy's ``mcc_block`` rules see: 5999,
#: miscellaneous retail, until a terminal is configured with its own.
DEFAULT_MCC = "5999"


class TerminalStore(Store, OutboxSource, Maintenance, Protocol):
    """The store as the terminal's steps use it: runs and steps, the outbox, counters."""


@dataclass(frozen=True)
class Peripherals:
    """The terminal's hardware and acquirer: real drivers, or ``hwsim`` simulators."""

    card_reader: CardReader
    printer: Printer
    acquirer: Acquirer
    link: NetworkLink


@dataclass(frozen=True)
class TerminalServices:
    card_reader: CardReader
    printer: Printer
    acquirer: Acquirer
    link: NetworkLink
    store: TerminalStore
    #: encrypts the PAN the card reader hands over (invariant 6)
    data_key: DataKey
    limits: RiskLimits
    device_id: str
    #: the active fraud policy, or None: no policy rules, only the risk limits
    policy: CompiledPolicy | None = None
    card_timeout_s: float = DEFAULT_CARD_TIMEOUT_S
    #: past this many unsent messages a payment is declined (``outbox_full``); None: no cap
    outbox_max_messages: int | None = None
    #: True above the database's high-water mark: offline sales are declined
    storage_high: Callable[[], bool] | None = None
    #: draws the share of payments sent online (``limits.online_random_percent``)
    rng: random.Random = field(default_factory=random.Random)
    mcc: str = DEFAULT_MCC


def build_services(
    peripherals: Peripherals,
    *,
    store: TerminalStore,
    data_key: DataKey,
    limits: RiskLimits,
    device_id: str,
    policy: CompiledPolicy | None = None,
    card_timeout_s: float = DEFAULT_CARD_TIMEOUT_S,
    outbox_max_messages: int | None = None,
    storage_high: Callable[[], bool] | None = None,
    rng: random.Random | None = None,
) -> TerminalServices:
    """The services of a terminal with these peripherals, store and settings."""
    return TerminalServices(
        card_reader=peripherals.card_reader,
        printer=peripherals.printer,
        acquirer=peripherals.acquirer,
        link=peripherals.link,
        store=store,
        data_key=data_key,
        limits=limits,
        device_id=device_id,
        policy=policy,
        card_timeout_s=card_timeout_s,
        outbox_max_messages=outbox_max_messages,
        storage_high=storage_high,
        rng=rng or random.Random(),
    )
