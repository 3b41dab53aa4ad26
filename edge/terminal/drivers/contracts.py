"""The terminal runtime's seams to hardware: one small Protocol per device, and its errors.

Real drivers (``edge.terminal.drivers.acquirer_http``) and the simulators in ``hwsim`` implement
the same Protocols; the runtime sees nothing else. A device error says what failed and
whether trying again may help::

    TillflowError
    └── DeviceError                 a terminal device or the acquirer failed
        ├── CardReadError           no usable card read (``reason``: timeout, removed, unreadable)
        ├── PrinterError
        │   ├── PaperOut            an operator must load paper before printing again
        │   └── PrinterJam          the mechanism jammed; a retry may clear it
        ├── AcquirerUnavailable     link down, timeout, connection failed; retry, same key
        └── AcquirerError           the acquirer broke the protocol or failed (4xx/5xx, bad body)

``AcquirerUnavailable`` after a request was sent means the outcome is *unknown*
(``outcome_unknown``): the acquirer may have approved it. Retry with the same
idempotency key, or reverse it, never authorise again under a new key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from edge.errors import TillflowError
from edge.terminal.carddata import CardRead, Sensitive

__all__ = [
    "Acquirer",
    "AcquirerError",
    "AcquirerUnavailable",
    "AuthRequest",
    "AuthResponse",
    "CardReadError",
    "CardReadReason",
    "CardReader",
    "DeviceError",
    "NetworkLink",
    "PaperOut",
    "Printer",
    "PrinterError",
    "PrinterJam",
]

# --- errors ----------------------------------------------------------------------------


class DeviceError(TillflowError):
    """A terminal device or the acquirer failed."""

    code = "device_error"


CardReadReason = Literal["timeout", "removed", "unreadable"]

_CARD_READ_MESSAGES: dict[str, tuple[str, str, bool]] = {
    # reason -> (message, hint, retryable)
    "timeout": ("no card was presented in time", "prompt the customer again", True),
    "removed": ("the card was removed during the read", "ask for the card again", True),
    "unreadable": (
        "the card could not be read",
        "use another entry mode (swipe or manual) or another card",
        False,  # the same card fails the same way; a different path is needed
    ),
}


class CardReadError(DeviceError):
    """No usable card read. ``reason`` is one of ``CardReadReason``."""

    code = "card_read_failed"

    def __init__(self, reason: CardReadReason, *, hint: str | None = None) -> None:
        if reason not in _CARD_READ_MESSAGES:
            raise ValueError(f"card read reason must be one of {', '.join(_CARD_READ_MESSAGES)}")
        message, default_hint, retryable = _CARD_READ_MESSAGES[reason]
        super().__init__(f"card read failed: {message}", hint=hint or default_hint)
        self.reason: CardReadReason = reason
        self.retryable = retryable


class PrinterError(DeviceError):
    code = "printer_error"


class PaperOut(PrinterError):
    """Not retryable: only an operator loading paper clears it (wait for their input)."""

    code = "printer_paper_out"
    retryable = False

    def __init__(
        self, message: str = "the printer is out of paper", *, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint or "load paper, then resume")


class PrinterJam(PrinterError):
    """Retryable: the mechanism often clears itself; if it persists, ask the operator."""

    code = "printer_jam"
    retryable = True

    def __init__(self, message: str = "the printer jammed", *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or "retry; if it persists, clear the paper path")


class AcquirerUnavailable(DeviceError):
    """The acquirer could not be reached or did not answer in time.

    ``outcome_unknown`` is False when no request left the terminal (link down, connection
    refused) and True when one may have arrived (timeout, connection lost mid-request).
    """

    code = "acquirer_unavailable"
    retryable = True

    def __init__(self, message: str, *, outcome_unknown: bool, hint: str | None = None) -> None:
        super().__init__(
            message, hint=hint or "retry later with the same idempotency key, or go offline"
        )
        self.outcome_unknown = outcome_unknown


class AcquirerError(DeviceError):
    """The acquirer answered, but not with a usable result: an error status or a body
    that breaks the protocol. ``status`` is the HTTP status, if there was one.
    ``retryable`` is True only for statuses that say "try again" (502, 503, 504)."""

    code = "acquirer_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.retryable = retryable


# --- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthRequest:
    """One authorisation or refund. Amounts are integer minor units (cents)."""

    pan: Sensitive
    expiry: str  # YYMM
    amount_minor: int
    currency: str  # ISO 4217 alpha, e.g. "EUR"
    idempotency_key: str
    terminal_id: str

    def __post_init__(self) -> None:
        if not (len(self.expiry) == 4 and self.expiry.isdigit()):
            raise ValueError("AuthRequest.expiry must be YYMM (four digits)")
        if isinstance(self.amount_minor, bool) or self.amount_minor <= 0:
            raise ValueError("AuthRequest.amount_minor must be a positive integer")
        if not (len(self.currency) == 3 and self.currency.isalpha() and self.currency.isupper()):
            raise ValueError("AuthRequest.currency must be an ISO 4217 code such as 'EUR'")
        if not self.idempotency_key:
            raise ValueError("AuthRequest.idempotency_key must not be empty")


@dataclass(frozen=True)
class AuthResponse:
    """The acquirer's answer. A decline is a normal answer (``approved=False`` with a
    ``reason``), not an error."""

    approved: bool
    auth_code: str | None
    reason: str | None
    acquirer_ref: str | None


# --- seams -------------------------------------------------------------------------------


@runtime_checkable
class CardReader(Protocol):
    def read(self, timeout_s: float) -> CardRead:
        """Wait up to ``timeout_s`` for a card and return what was read.

        Raises CardReadError. Returns whatever the card held: checking it (Luhn, expiry)
        is the runtime's job, not the reader's."""
        ...


@runtime_checkable
class Printer(Protocol):
    def print_receipt(self, lines: list[str]) -> None:
        """Print one receipt, or raise PaperOut / PrinterJam having printed nothing."""
        ...


@runtime_checkable
class Acquirer(Protocol):
    """The payment network's front door. Every call carries an idempotency key: the
    same key again returns the first answer and has no second effect."""

    def authorize(self, req: AuthRequest) -> AuthResponse:
        """Ask for an authorisation. Raises AcquirerUnavailable or AcquirerError."""
        ...

    def reverse(self, original_key: str, idempotency_key: str) -> AuthResponse:
        """Undo the authorisation made under ``original_key``. Reversing one that never
        arrived, or was already reversed, is approved without another effect."""
        ...

    def refund(self, req: AuthRequest) -> AuthResponse:
        """Return money to the card. Raises AcquirerUnavailable or AcquirerError."""
        ...


@runtime_checkable
class NetworkLink(Protocol):
    def is_up(self) -> bool:
        """Whether the terminal can reach the acquirer now (a hint: a request may
        still fail)."""
        ...
