"""A simulated acquirer: a real HTTP server on loopback speaking the HttpAcquirer protocol.

``SimAcquirer`` listens on ``127.0.0.1`` on a free port (``.url``), serves the wire format
defined in ``edge.terminal.drivers.acquirer_http`` and keeps a **ledger**: one ``LedgerEntry`` per
idempotency key, holding the operation, amount and *masked* PAN (never the clear one).
Tests assert exactly-once effects on it.

Behaviour, chosen with ``set_mode`` (read once per request):

* ``approve`` — authorise, subject to the rules below;
* ``decline`` — decline every authorisation and refund with ``decline_reason``;
* ``timeout`` — record the effect, then never answer (the reply is "lost"): the client
  times out not knowing the outcome, and a retry under the same key finds it done;
  ``stop()`` releases the waiting handler so nothing hangs;
* ``slow`` — like ``approve``, answering after ``latency_s``;
* ``error`` — answer ``error_status`` (500) with no effect;
* ``drop`` — the network between them is down: the request is read and the connection
  closed, with no answer and no effect (the client cannot tell that nothing arrived).

``lose_reply(key)`` loses one answer: the next request under ``key`` is decided and
recorded as usual, then its connection closes without the reply (a connection lost on
the way back; unlike ``timeout`` the client learns at once that the outcome is
unknown). A subclass may call it from ``_apply``, for the request being decided.
``dropped`` and ``lost_replies`` count both.

Authorisations are declined, in this order, when the key was already reversed
(``reversed``: the reversal overtook it), the PAN fails Luhn (``invalid_card``), the card
has expired by ``clock`` (``expired_card``, only if a clock is given), its BIN matches a
``decline_bin`` rule, or the amount is above a ``decline_over`` limit.

Idempotency: a repeated key returns the first answer and changes nothing (``replays``
counts repeats); the same key for a different request is refused with 422. Reversals:
of an approved authorisation, release it (approved, ``effect=True``); of one already
reversed, declined, or never seen, approve with a ``reason`` and no effect (and a later
authorisation under a never-seen key is declined); of a refund or reversal, decline
``not_reversible``.

Lookups (the acquirer's status API, as the control plane asks it about an operation
whose answer a terminal lost): ``GET /lookup`` with the operation's key in the
idempotency header answers from the ledger, changing nothing: ``found``, the
``operation``, its ``status`` (``approved``, ``declined``, or ``reversed`` for an
authorisation a reversal released), amount, currency and reference (``lookup_body``).
A key never seen is ``found: false`` (with ``fenced``: a reversal came first, so a late
authorisation would be declined). ``error`` and ``drop`` modes apply to lookups too (an
acquirer that is away is away for everyone); ``lookups`` counts them.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Literal, TypeVar, get_args

from hwsim._server import LoopbackServer
from pydantic import ValidationError

from edge.engine.clock import Clock
from edge.terminal.carddata import luhn_valid, mask_pan
from edge.terminal.drivers.acquirer_http import (
    AUTHORIZE_PATH,
    IDEMPOTENCY_HEADER,
    REFUND_PATH,
    REVERSE_PATH,
    AuthorizeBody,
    ReverseBody,
    encode_result,
)
from edge.terminal.drivers.contracts import AuthResponse

__all__ = ["LOOKUP_PATH", "LedgerEntry", "Mode", "Operation", "SimAcquirer"]

Mode = Literal["approve", "decline", "timeout", "slow", "error", "drop"]
Operation = Literal["authorize", "refund", "reverse"]

_MODES: tuple[str, ...] = get_args(Mode)
#: The status API's path (a GET; the key in the idempotency header).
LOOKUP_PATH = "/lookup"
_PATHS: dict[str, Operation] = {
    AUTHORIZE_PATH: "authorize",
    REFUND_PATH: "refund",
    REVERSE_PATH: "reverse",
}
#: How long a "timeout" reply stays lost if nobody calls stop(): far past any client
#: timeout, short enough that a forgotten server does not keep threads for good.
LOST_REPLY_S = 30.0
_MAX_BODY = 64 * 1024
_M = TypeVar("_M", AuthorizeBody, ReverseBody)


@dataclass(frozen=True)
class LedgerEntry:
    """What the acquirer did under one idempotency key."""

    key: str
    operation: Operation
    amount_minor: int
    currency: str
    masked_pan: str
    terminal_id: str
    response: AuthResponse
    effect: bool  # money moved: an approved auth/refund, or a reversal that released one
    reverses: str | None = None  # a reversal's original key
    replays: int = 0  # later requests with this key, answered from here


@dataclass(frozen=True)
class _Rule:
    kind: Literal["bin", "over"]
    bin_prefix: str
    limit_minor: int
    reason: str


class _Refused(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class SimAcquirer(LoopbackServer):
    def __init__(
        self,
        mode: Mode = "approve",
        *,
        latency_s: float = 0.0,
        decline_reason: str = "do_not_honor",
        error_status: int = 500,
        clock: Clock | None = None,
    ) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._mode: Mode = "approve"
        self.latency_s = 0.0
        self.decline_reason = decline_reason
        self.error_status = error_status
        self.set_mode(mode, latency_s=latency_s)
        self._rules: list[_Rule] = []
        self._ledger: dict[str, LedgerEntry] = {}
        self._reversed: dict[str, str] = {}  # original key -> reversal key
        self._received: list[tuple[str, str | None]] = []
        self._lose: set[str] = set()  # keys whose next reply is lost
        self.dropped = 0  # requests dropped unanswered in "drop" mode
        self.lost_replies = 0  # replies lost by lose_reply
        self.lookups = 0  # status lookups answered
        self._serial = itertools.count(1)
        super().__init__(_Handler)

    # --- configuration ------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(
        self, mode: Mode, *, reason: str | None = None, latency_s: float | None = None
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}; got {mode!r}")
        if latency_s is not None:
            if latency_s < 0:
                raise ValueError(f"latency_s must not be negative, got {latency_s}")
            self.latency_s = latency_s
        if reason is not None:
            self.decline_reason = reason
        self._mode = mode

    def decline_bin(self, prefix: str, reason: str = "do_not_honor") -> None:
        """Decline authorisations of PANs starting with ``prefix`` (a BIN, 1-8 digits)."""
        if not (prefix.isdigit() and 1 <= len(prefix) <= 8):
            raise ValueError("a BIN prefix is 1 to 8 digits")
        self._rules.append(_Rule("bin", prefix, 0, reason))

    def decline_over(self, limit_minor: int, reason: str = "exceeds_limit") -> None:
        """Decline authorisations of more than ``limit_minor``."""
        self._rules.append(_Rule("over", "", limit_minor, reason))

    def lose_reply(self, key: str) -> None:
        """The next request under ``key`` takes effect, and its reply is lost."""
        with self._lock:
            self._lose.add(key)

    # --- what happened ------------------------------------------------------------------

    @property
    def ledger(self) -> dict[str, LedgerEntry]:
        """A snapshot: idempotency key -> entry, in arrival order."""
        with self._lock:
            return dict(self._ledger)

    @property
    def received(self) -> list[tuple[str, str | None]]:
        """Every HTTP request that reached the server: (path, idempotency key)."""
        with self._lock:
            return list(self._received)

    def effects(self, operation: Operation | None = None) -> list[LedgerEntry]:
        """Entries that moved money, optionally of one operation."""
        return [
            e
            for e in self.ledger.values()
            if e.effect and (operation is None or e.operation == operation)
        ]

    def net_minor(self, currency: str | None = None) -> int:
        """Authorised and not reversed, minus refunded."""
        with self._lock:
            total = 0
            for e in self._ledger.values():
                if not e.effect or (currency is not None and e.currency != currency):
                    continue
                if e.operation == "authorize" and e.key not in self._reversed:
                    total += e.amount_minor
                elif e.operation == "refund":
                    total -= e.amount_minor
            return total

    # --- lifecycle (the rest is LoopbackServer's) ---------------------------------------

    def _stopped(self) -> bool:
        return self._released.is_set()

    def _release(self) -> None:
        """Release waiting handlers (stop() then stops serving and closes the socket)."""
        self._released.set()

    # --- serving ------------------------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        key = handler.headers.get(IDEMPOTENCY_HEADER)
        with self._lock:
            self._received.append((handler.path, key))
        mode, latency_s = self._mode, self.latency_s  # one request, one configuration
        try:
            operation = _PATHS.get(handler.path)
            if operation is None:
                raise _Refused(404, "not_found")
            if not key:
                raise _Refused(400, "missing_idempotency_key")
            body = _read_body(handler)
            if mode == "drop":
                with self._lock:
                    self.dropped += 1
                handler.close_connection = True  # lost on the way: no answer, no effect
                return
            if mode == "error":
                raise _Refused(self.error_status, "internal_error")
            response = self._apply(operation, key, body, mode)
        except _Refused as refused:
            payload = json.dumps({"error": refused.error}).encode()
            _reply(handler, refused.status, payload, close=True)  # the body may be unread
            return
        with self._lock:
            lost = key in self._lose
            self._lose.discard(key)
            self.lost_replies += lost
        if lost:
            handler.close_connection = True  # decided and recorded; the reply never leaves
            return
        if mode == "timeout":
            self._released.wait(LOST_REPLY_S)
            handler.close_connection = True  # the reply is lost: close without one
            return
        if mode == "slow" and self._released.wait(latency_s):
            handler.close_connection = True  # stopped while waiting
            return
        _reply(handler, 200, encode_result(response))

    def _serve_lookup(self, handler: _Handler) -> None:
        """``GET /lookup``: what the ledger holds under the key; nothing changes."""
        key = handler.headers.get(IDEMPOTENCY_HEADER)
        with self._lock:
            self._received.append((handler.path, key))
        if handler.path != LOOKUP_PATH:
            _reply(handler, 404, json.dumps({"error": "not_found"}).encode(), close=True)
            return
        if not key:
            payload = json.dumps({"error": "missing_idempotency_key"}).encode()
            _reply(handler, 400, payload, close=True)
            return
        if self._mode == "drop":
            with self._lock:
                self.dropped += 1
            handler.close_connection = True
            return
        if self._mode == "error":
            payload = json.dumps({"error": "internal_error"}).encode()
            _reply(handler, self.error_status, payload, close=True)
            return
        with self._lock:
            self.lookups += 1
            body = self.lookup_body(key)
        _reply(handler, 200, json.dumps(body).encode())

    def lookup_body(self, key: str) -> dict[str, object]:
        """The status API's answer for ``key`` (call with the lock held, or on a quiet
        simulator): the ledger's entry, its status after any reversal."""
        entry = self._ledger.get(key)
        if entry is None:
            return {"key": key, "found": False, "fenced": key in self._reversed}
        status = "approved" if entry.response.approved else "declined"
        if entry.operation == "authorize" and entry.effect and key in self._reversed:
            status = "reversed"
        return {
            "key": key,
            "found": True,
            "operation": entry.operation,
            "status": status,
            "amount_minor": entry.amount_minor,
            "currency": entry.currency,
            "acquirer_ref": entry.response.acquirer_ref,
            "auth_code": entry.response.auth_code,
            "reason": entry.response.reason,
            "reversed_by": self._reversed.get(key) if entry.operation == "authorize" else None,
        }

    def _apply(self, operation: Operation, key: str, body: bytes, mode: Mode) -> AuthResponse:
        """Decide and record, atomically per key; a repeat returns the recorded answer."""
        if operation == "reverse":
            original_key = _parse(ReverseBody, body).original_key
            fingerprint: tuple[object, ...] = (operation, original_key)
        else:
            auth = _parse(AuthorizeBody, body)
            pan = auth.pan.get_secret_value()
            masked = mask_pan(pan)
            fingerprint = (operation, auth.amount_minor, auth.currency, masked, auth.terminal_id)
        with self._lock:
            seen = self._ledger.get(key)
            if seen is not None:
                if _fingerprint(seen) != fingerprint:
                    raise _Refused(422, "idempotency_key_reused")
                self._ledger[key] = replace(seen, replays=seen.replays + 1)
                return seen.response
            if operation == "reverse":
                entry = self._reverse(key, original_key)
            else:
                reason = self._decline_reason(operation, key, pan, auth, mode)
                approved = reason is None
                entry = LedgerEntry(
                    key=key,
                    operation=operation,
                    amount_minor=auth.amount_minor,
                    currency=auth.currency,
                    masked_pan=masked,
                    terminal_id=auth.terminal_id,
                    response=self._response(approved, reason),
                    effect=approved,
                )
            self._ledger[key] = entry
            return entry.response

    def _decline_reason(
        self, operation: Operation, key: str, pan: str, auth: AuthorizeBody, mode: Mode
    ) -> str | None:
        if mode == "decline":
            return self.decline_reason
        if not luhn_valid(pan):
            return "invalid_card"
        if operation != "authorize":
            return None
        if key in self._reversed:
            return "reversed"
        if self.clock is not None and _expired(auth.expiry, self.clock.now()):
            return "expired_card"
        for rule in self._rules:
            if rule.kind == "bin" and pan.startswith(rule.bin_prefix):
                return rule.reason
            if rule.kind == "over" and auth.amount_minor > rule.limit_minor:
                return rule.reason
        return None

    def _reverse(self, key: str, original_key: str) -> LedgerEntry:
        original = self._ledger.get(original_key)
        effect = False
        if original is None:
            # Remember it: if the authorisation arrives late, it must not take effect.
            self._reversed.setdefault(original_key, key)
            approved, reason = True, "original_not_found"
        elif original.operation != "authorize":
            approved, reason = False, "not_reversible"
        elif not original.response.approved:
            approved, reason = True, "original_declined"
        elif original_key in self._reversed:
            approved, reason = True, "already_reversed"
        else:
            self._reversed[original_key] = key
            approved, reason, effect = True, None, True
        return LedgerEntry(
            key=key,
            operation="reverse",
            amount_minor=original.amount_minor if original else 0,
            currency=original.currency if original else "",
            masked_pan=original.masked_pan if original else "",
            terminal_id=original.terminal_id if original else "",
            response=self._response(approved, reason, auth_code=False),
            effect=effect,
            reverses=original_key,
        )

    def _response(
        self, approved: bool, reason: str | None, *, auth_code: bool = True
    ) -> AuthResponse:
        n = next(self._serial)
        return AuthResponse(
            approved=approved,
            auth_code=f"{n:06d}" if approved and auth_code else None,
            reason=reason,
            acquirer_ref=f"SIM{n:09d}",
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections
    timeout = 10  # an idle keep-alive connection frees its thread after this
    disable_nagle_algorithm = True  # headers and body go out in two writes; don't wait 40 ms

    def do_POST(self) -> None:
        self.server.sim._serve(self)  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self.server.sim._serve_lookup(self)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass  # the ledger and ``received`` are the record; stderr stays quiet


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    try:
        length = int(handler.headers.get("Content-Length", ""))
    except ValueError:
        raise _Refused(411, "length_required") from None
    if not 0 <= length <= _MAX_BODY:
        raise _Refused(413, "body_too_large")
    return handler.rfile.read(length)


def _parse(model: type[_M], body: bytes) -> _M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        # Name the fields only: the error text would quote the body, PAN included.
        fields = sorted({".".join(str(p) for p in e["loc"]) or "<body>" for e in exc.errors()})
        raise _Refused(400, "invalid_body: " + ",".join(fields)) from None


def _fingerprint(entry: LedgerEntry) -> tuple[object, ...]:
    if entry.operation == "reverse":
        return (entry.operation, entry.reverses)
    return (
        entry.operation,
        entry.amount_minor,
        entry.currency,
        entry.masked_pan,
        entry.terminal_id,
    )


def _expired(expiry: str, now: float) -> bool:
    """A card is good through the last day of its expiry month (UTC)."""
    today = datetime.fromtimestamp(now, UTC)
    return (today.year, today.month) > (2000 + int(expiry[:2]), int(expiry[2:]))


def _reply(
    handler: BaseHTTPRequestHandler, status: int, payload: bytes, *, close: bool = False
) -> None:
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        if close:
            handler.send_header("Connection", "close")  # also sets close_connection
        handler.end_headers()
        handler.wfile.write(payload)
    except (BrokenPipeError, ConnectionResetError):
        handler.close_connection = True  # the client gave up first (its timeout)
