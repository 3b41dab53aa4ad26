"""A simulated card reader: a queue of cards the test "presents".

``SimCardReader`` implements ``edge.terminal.drivers.contracts.CardReader``. ``read()``
hands over the next queued card as read; with nothing queued it raises ``CardReadError("timeout")``,
having spent ``timeout_s`` on the clock if one was given. It does not judge the card: a
``bad_luhn`` or ``expired`` test card reads fine, because validating is the runtime's job.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Literal

from edge.engine.clock import Clock
from edge.terminal.carddata import TEST_CARDS, CardRead, Sensitive
from edge.terminal.drivers.contracts import CardReadError, CardReadReason

__all__ = ["SimCardReader", "make_card"]

EntryMode = Literal["chip", "contactless", "swipe", "manual"]


def make_card(name: str, cvv: str | None = "123", entry_mode: EntryMode = "chip") -> CardRead:
    """A ``CardRead`` of one of ``TEST_CARDS`` (public test numbers only)."""
    try:
        pan, expiry = TEST_CARDS[name]
    except KeyError:
        raise ValueError(
            f"no test card named {name!r}; known: {', '.join(sorted(TEST_CARDS))}"
        ) from None
    return CardRead(
        pan=Sensitive(pan),
        expiry=expiry,
        cvv=Sensitive(cvv) if cvv is not None else None,
        track2=None,
        pin_block=None,
        entry_mode=entry_mode,
    )


class SimCardReader:
    def __init__(
        self, cards: Iterable[CardRead] | None = None, *, clock: Clock | None = None
    ) -> None:
        self._queue: deque[CardRead | CardReadReason] = deque(cards or ())
        self._lock = threading.Lock()
        self.clock = clock
        self.reads = 0  # read() calls, answered or not

    def insert(self, card: CardRead) -> None:
        """Queue ``card`` for the next ``read()``."""
        with self._lock:
            self._queue.append(card)

    def insert_test_card(
        self, name: str, cvv: str | None = "123", entry_mode: EntryMode = "chip"
    ) -> CardRead:
        """Queue one of ``TEST_CARDS`` by name and return it."""
        card = make_card(name, cvv=cvv, entry_mode=entry_mode)
        self.insert(card)
        return card

    def fail_next(self, reason: CardReadReason) -> None:
        """Make the next ``read()`` (in queue order) fail with ``reason``."""
        if reason == "timeout":
            raise ValueError("an empty queue already times out; fail_next is for the others")
        with self._lock:
            self._queue.append(reason)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def read(self, timeout_s: float) -> CardRead:
        with self._lock:
            self.reads += 1
            item = self._queue.popleft() if self._queue else None
        if item is None:
            if self.clock is not None:
                self.clock.sleep(timeout_s)
            raise CardReadError("timeout")
        if isinstance(item, str):
            raise CardReadError(item)
        return item
