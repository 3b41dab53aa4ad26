"""The terminal's devices over HTTP + JSON: drivers behind the ``CardReader``, ``Printer``
and ``NetworkLink`` ports.

The daemon runs as its own process; its devices are endpoints named in its config (a
real terminal's device service, or ``hwsim.devices`` in CI and the demo). Wire protocol::

    POST <reader>/card/read      {"timeout_s": t}       the service long-polls up to t
      200                        {"pan", "expiry", "cvv"?, "track2"?, "pin_block"?,
                                  "entry_mode"}
      any status                 {"error": {"reason": "timeout" | "removed" | "unreadable"}}
    POST <printer>/printer/print {"lines": ["...", ...]}
      2xx                        printed
      any status                 {"error": {"code": "paper_out" | "jam" | ...}}
    GET  <link url>              2xx while the network is up (anything else: down)

Fields a newer peer adds are ignored. The card data arrives in clear (that is what a
card reader hands over, on loopback) and is wrapped in ``Sensitive`` at once: it never
appears in an exception message, a log line or a repr.

httpx errors are translated here, in one place:

* card reader: anything that is not a card or a reported reason is
  ``CardReadError("unreadable")``, with a hint naming the reader's URL;
* printer: ``PaperOut`` and ``PrinterJam`` as reported; a printer that cannot be reached,
  times out or answers 5xx raises ``PrinterUnavailable``, a retryable ``PrinterJam``
  (see its docstring for why); a 4xx without a device error code is a ``PrinterError``
  (the URL points at something that is not a printer: retrying will not help);
* network link: ``is_up()`` never raises; any failure reads as "down".
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast, get_args

from pydantic import ValidationError

from edge.errors import ConfigError
from edge.terminal.carddata import CardRead
from edge.terminal.drivers._http import DIGIT_RUNS, HttpDriver, describe
from edge.terminal.drivers.contracts import (
    CardReadError,
    CardReadReason,
    PaperOut,
    PrinterError,
    PrinterJam,
)

if TYPE_CHECKING:  # imported by each call: an idle terminal has no use for httpx
    import httpx

__all__ = [
    "CARD_READ_PATH",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_LINK_CACHE_S",
    "DEFAULT_LINK_TIMEOUT_S",
    "DEFAULT_PRINT_TIMEOUT_S",
    "PRINT_PATH",
    "HttpCardReader",
    "HttpNetworkLink",
    "HttpPrinter",
    "PrinterUnavailable",
]

logger = logging.getLogger(__name__)

CARD_READ_PATH = "/card/read"
PRINT_PATH = "/printer/print"

#: Seconds a card reader gets to accept the connection and, beyond the long-poll itself,
#: to deliver its answer.
DEFAULT_CONNECT_TIMEOUT_S = 2.0
#: Seconds for one receipt: a thermal printer needs one or two.
DEFAULT_PRINT_TIMEOUT_S = 10.0
#: A link check is a hint for "go online or offline": it must be quick.
DEFAULT_LINK_TIMEOUT_S = 0.5
#: How long one link check is trusted, so a payment does not pay a round trip per check.
DEFAULT_LINK_CACHE_S = 1.0

_CARD_FIELDS = ("pan", "expiry", "cvv", "track2", "pin_block", "entry_mode")
_REASONS: tuple[str, ...] = get_args(CardReadReason)
_CODE_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")


class PrinterUnavailable(PrinterJam):
    """The printer could not be reached, did not answer in time, or failed (5xx).

    A ``PrinterJam``, so whatever retries a jam retries this: an unreachable printer is
    not out of paper (``PaperOut`` would park the payment waiting for an operator to load
    paper, which cannot help), and it is usually transient (the device service
    restarting, a cable reseated), so it is retryable; if it persists the operator is
    asked to look at the printer. ``code`` differs so logs and the POS can tell the two
    apart.

    ``outcome_unknown`` is True when the request may have reached the printer (timeout,
    connection lost): the receipt may have printed, and a retry may print it twice.
    """

    code = "printer_unavailable"
    retryable = True

    def __init__(self, message: str, *, outcome_unknown: bool, hint: str | None = None) -> None:
        super().__init__(
            message,
            hint=hint
            or "retry; if it persists, check the printer is on and its device service runs",
        )
        self.outcome_unknown = outcome_unknown


# --- shared helpers --------------------------------------------------------------------------


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _json_object(content: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None. The decode error is dropped: it quotes the
    body (``JSONDecodeError.doc``), which may hold card data."""
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return cast(dict[str, Any], value) if isinstance(value, dict) else None


def _error_field(payload: dict[str, Any] | None, field: str) -> str | None:
    """``payload["error"][field]`` (or its ``code``) if it is a short identifier; ``"?"``
    if there is an error without one; None if there is no error."""
    if payload is None or payload.get("error") is None:
        return None
    error = payload["error"]
    value = error.get(field, error.get("code")) if isinstance(error, dict) else error
    # A short identifier only: a service must not get a card number into our messages.
    if isinstance(value, str) and _CODE_SHAPE.fullmatch(value) and not DIGIT_RUNS.search(value):
        return value
    return "?"


# --- card reader -----------------------------------------------------------------------------


class HttpCardReader(HttpDriver):
    """``CardReader`` over HTTP. ``base_url`` is the reader service (``/card/read`` is
    appended). ``timeout_s`` is the transport's allowance: for connecting, and for the
    answer to arrive after the ``read(timeout_s)`` long-poll ends. Pass ``client`` to
    share a pool or inject an ``httpx.MockTransport``; one made here is closed by
    ``close()``."""

    def __init__(
        self,
        base_url: str,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self._grace_s = _positive("card reader timeout_s", timeout_s)
        url = self._connect("card reader", base_url, client)
        self._url = str(url).rstrip("/") + CARD_READ_PATH

    def read(self, timeout_s: float) -> CardRead:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s < 0:
            raise ValueError(f"timeout_s must be a non-negative number, got {timeout_s!r}")
        import httpx

        timeout = httpx.Timeout(self._grace_s, read=timeout_s + self._grace_s)
        try:
            response = self._client.post(
                self._url,
                content=json.dumps({"timeout_s": timeout_s}).encode(),
                headers={"Content-Type": "application/json"},
                timeout=timeout,
            )
        except httpx.TimeoutException as exc:
            raise self._unreadable(
                f"no answer within {timeout_s + self._grace_s:g}s ({describe(exc)})"
            ) from exc
        except httpx.HTTPError as exc:
            raise self._unreadable(f"cannot be reached ({describe(exc)})") from exc
        status, ok = response.status_code, response.is_success
        payload = _json_object(response.content)
        del response  # the body holds the clear card data; keep it out of tracebacks
        reason = _error_field(payload, "reason")
        if reason in _REASONS:
            logger.debug("card read: %s", reason, extra={"action": "card_reader.read"})
            raise CardReadError(cast(CardReadReason, reason))
        if reason is not None:
            named = f"error {reason!r}" if reason != "?" else "an unnamed error"
            raise self._unreadable(f"reported {named} (HTTP {status})")
        if not ok:
            raise self._unreadable(f"answered HTTP {status}")
        if payload is None:
            raise self._unreadable("answered with a body that is not a JSON object")
        card = self._card(payload)
        logger.debug(
            "card read: %s by %s",
            card.masked,
            card.entry_mode,
            extra={"action": "card_reader.read"},
        )
        return card

    def _card(self, payload: dict[str, Any]) -> CardRead:
        fields = {name: payload[name] for name in _CARD_FIELDS if name in payload}
        payload.clear()
        missing = sorted({"pan", "expiry", "entry_mode"} - fields.keys())
        if missing:
            fields.clear()
            raise self._unreadable(f"answered without {', '.join(missing)}")
        try:
            return CardRead.model_validate(fields)  # Sensitive from here on
        except ValidationError as exc:
            bad = ", ".join(
                sorted({".".join(str(p) for p in e["loc"]) or "<body>" for e in exc.errors()})
            )
        fields.clear()
        # Raised outside the except block: the pydantic error holds the clear values.
        raise self._unreadable(f"answered with a malformed card (bad fields: {bad})")

    def _unreadable(self, what: str) -> CardReadError:
        return CardReadError(
            "unreadable",
            hint=f"the card reader at {self._shown_url} {what}; check its device service",
        )


# --- printer ---------------------------------------------------------------------------------


class HttpPrinter(HttpDriver):
    """``Printer`` over HTTP. ``base_url`` is the printer service (``/printer/print`` is
    appended). Pass ``client`` to share a pool or inject a transport."""

    def __init__(
        self,
        base_url: str,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_PRINT_TIMEOUT_S,
    ) -> None:
        self._timeout_s = _positive("printer timeout_s", timeout_s)
        url = self._connect("printer", base_url, client)
        self._url = str(url).rstrip("/") + PRINT_PATH

    def print_receipt(self, lines: list[str]) -> None:
        if isinstance(lines, str) or not all(isinstance(line, str) for line in lines):
            raise TypeError("print_receipt takes a list of str, one per line")
        import httpx

        where = f"the printer at {self._shown_url}"
        try:
            response = self._client.post(
                self._url,
                content=json.dumps({"lines": list(lines)}).encode(),
                headers={"Content-Type": "application/json"},
                timeout=self._timeout_s,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise PrinterUnavailable(
                f"{where} cannot be reached ({describe(exc)}); nothing printed",
                outcome_unknown=False,
            ) from exc
        except httpx.TimeoutException as exc:
            raise PrinterUnavailable(
                f"{where} did not answer within {self._timeout_s:g}s; the receipt may have printed",
                outcome_unknown=True,
            ) from exc
        except httpx.HTTPError as exc:
            raise PrinterUnavailable(
                f"{where}: connection lost ({describe(exc)}); the receipt may have printed",
                outcome_unknown=True,
            ) from exc
        code = _error_field(_json_object(response.content), "code")
        status = response.status_code
        if code == "paper_out":
            raise PaperOut()
        if code == "jam":
            raise PrinterJam()
        if code is None and response.is_success:
            logger.debug("receipt printed: %d lines", len(lines), extra={"action": "printer.print"})
            return
        if code is None and 400 <= status < 500:
            raise PrinterError(
                f"{where} refused the receipt with HTTP {status}",
                hint="check the printer URL in the terminal configuration",
            )
        if code is None:
            detail = f"failed with HTTP {status}"
        else:
            named = f"error {code!r}" if code != "?" else "an unnamed error"
            detail = f"reported {named} (HTTP {status})"
        raise PrinterUnavailable(f"{where} {detail}; nothing printed", outcome_unknown=False)


# --- network link ----------------------------------------------------------------------------


class HttpNetworkLink(HttpDriver):
    """``NetworkLink`` by HTTP: up while ``GET url`` answers 2xx within ``timeout_s``
    (the simulator's ``/link``, or an acquirer's health URL).

    One answer is trusted for ``cache_s`` seconds of ``clock`` (monotonic seconds), so
    a payment's several checks cost one round trip at most. ``is_up()`` never raises;
    it is safe to share between threads (one check runs at a time; the others wait for
    its answer). ``invalidate()`` forgets the cached answer, e.g. after a request failed.
    """

    def __init__(
        self,
        url: str,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_LINK_TIMEOUT_S,
        cache_s: float = DEFAULT_LINK_CACHE_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout_s = _positive("network link timeout_s", timeout_s)
        if isinstance(cache_s, bool) or not isinstance(cache_s, int | float) or cache_s < 0:
            raise ConfigError(f"network link cache_s must be >= 0 seconds, got {cache_s!r}")
        self._cache_s = float(cache_s)
        self._url = self._connect("network link", url, client)
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._up = False
        self.checks = 0  # round trips made

    def is_up(self) -> bool:
        with self._lock:
            if self._checked_at is not None and self._clock() - self._checked_at < self._cache_s:
                return self._up
            up, why = self._probe()
            self.checks += 1
            if up != self._up or self._checked_at is None:
                logger.log(
                    logging.INFO if up else logging.WARNING,
                    "network link %s (%s: %s)",
                    "up" if up else "down",
                    self._shown_url,
                    why,
                    extra={"action": "link.check"},
                )
            self._up = up
            self._checked_at = self._clock()
            return up

    def invalidate(self) -> None:
        """Forget the cached answer: the next ``is_up()`` checks again."""
        with self._lock:
            self._checked_at = None

    def _probe(self) -> tuple[bool, str]:
        try:
            response = self._client.get(self._url, timeout=self._timeout_s)
        except Exception as exc:  # never raises: any failure means "down"
            return False, describe(exc)
        return response.is_success, f"HTTP {response.status_code}"
