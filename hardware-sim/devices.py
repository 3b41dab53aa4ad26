"""Simulated terminal devices behind HTTP: what the daemon's device drivers talk to.

``SimDeviceServer`` listens on ``127.0.0.1`` (a free port unless ``port`` is given;
``.url``) and serves the protocol of ``edge.terminal.drivers.devices_http`` from a
``SimCardReader``, a ``SimPrinter`` and, optionally, a ``SimNetworkLink``::

    POST /card/read       {"timeout_s": t}  the next queued card, waiting up to t for one
                          200 {"pan", "expiry", "cvv"?, "entry_mode", ...}
                          409 {"error": {"reason": "timeout" | "removed" | "unreadable"}}
    POST /printer/print   {"lines": [...]}  200 {"printed": true}
                          409 {"error": {"code": "paper_out" | "jam"}}
    GET  /link            200 {"up": true} while the link is up, 503 {"up": false} when down

and CONTROL endpoints, for the simulated POS and tests (the same things are methods)::

    POST /control/insert   {"card": "<TEST_CARDS name>", "cvv"?, "entry_mode"?}
                           or {"fail": "removed" | "unreadable"} (the next read fails so)
    POST /control/printer  {"state": "ok" | "paper_out" | "jam"} or {"fail_next": ...}
    POST /control/link     {"up": true | false}
    GET  /control/printed  {"printed": [[line, ...], ...]}

Anything refused: 4xx with ``{"error": {"code", "message"}}``.

A read with no card queued long-polls: it waits (a ``threading.Condition``) until a card
is inserted or ``timeout_s`` passes, then answers the card or ``timeout``; ``stop()``
releases waiting reads (their connections close without an answer). With ``clock`` (a
``FakeClock``/``VirtualClock``) nothing waits on the wall clock: an empty read sleeps
``timeout_s`` on that clock (a ``VirtualClock`` callback may insert a card meanwhile)
and then answers.

The card goes to the daemon in clear over loopback, as a card reader hands it over. It
is never logged: the handler's access log is silenced, and ``received`` keeps only
methods and paths. Control requests name test cards, never carry a PAN.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any, get_args

from hwsim._server import LoopbackServer
from hwsim.card_reader import EntryMode, SimCardReader
from hwsim.network import SimNetworkLink
from hwsim.printer import PrinterState, SimPrinter

from edge.engine.clock import Clock
from edge.terminal.carddata import CardRead
from edge.terminal.drivers.contracts import CardReadError, CardReadReason, PaperOut, PrinterJam
from edge.terminal.drivers.devices_http import CARD_READ_PATH, PRINT_PATH

__all__ = ["LINK_PATH", "MAX_LONG_POLL_S", "SimDeviceServer"]

LINK_PATH = "/link"
CONTROL_INSERT_PATH = "/control/insert"
CONTROL_PRINTER_PATH = "/control/printer"
CONTROL_LINK_PATH = "/control/link"
CONTROL_PRINTED_PATH = "/control/printed"

#: The longest a read may wait for a card; longer requests are cut to this.
MAX_LONG_POLL_S = 300.0
#: A waiting read also looks at the queue this often, so a card queued straight on the
#: ``SimCardReader`` (not through the server) is found too.
_POLL_S = 0.05
_MAX_BODY = 64 * 1024
_ENTRY_MODES: tuple[str, ...] = get_args(EntryMode)
_PRINTER_STATES: tuple[str, ...] = get_args(PrinterState)


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class SimDeviceServer(LoopbackServer):
    def __init__(
        self,
        reader: SimCardReader | None = None,
        printer: SimPrinter | None = None,
        link: SimNetworkLink | None = None,
        *,
        clock: Clock | None = None,
        port: int = 0,
    ) -> None:
        self.reader = reader if reader is not None else SimCardReader()
        self.printer = printer if printer is not None else SimPrinter()
        self.link = link
        self.clock = clock
        self.port = port
        self._link_switched_down = False  # /control/link when there is no link object
        self._cond = threading.Condition()
        self._stopping = False
        self._received: list[tuple[str, str]] = []
        super().__init__(_Handler)
        self._routes: dict[tuple[str, str], Callable[[dict[str, Any]], tuple[int, object]]] = {
            ("POST", PRINT_PATH): self._print,
            ("GET", LINK_PATH): self._link,
            ("POST", CONTROL_INSERT_PATH): self._control_insert,
            ("POST", CONTROL_PRINTER_PATH): self._control_printer,
            ("POST", CONTROL_LINK_PATH): self._control_link,
            ("GET", CONTROL_PRINTED_PATH): lambda _: (200, {"printed": self.printed}),
        }

    # --- control, as methods ------------------------------------------------------------

    def insert(self, card: CardRead) -> None:
        """Present ``card``: the next (or a waiting) read gets it."""
        with self._cond:
            self.reader.insert(card)
            self._cond.notify_all()

    def insert_test_card(
        self, name: str, cvv: str | None = "123", entry_mode: EntryMode = "chip"
    ) -> CardRead:
        """Present one of ``TEST_CARDS`` by name; returns it."""
        with self._cond:
            card = self.reader.insert_test_card(name, cvv=cvv, entry_mode=entry_mode)
            self._cond.notify_all()
        return card

    def fail_next_read(self, reason: CardReadReason) -> None:
        """The next read (in queue order) fails with ``reason`` (removed, unreadable)."""
        with self._cond:
            self.reader.fail_next(reason)
            self._cond.notify_all()

    def set_link(self, up: bool) -> None:
        if self.link is None:
            self._link_switched_down = not up
        elif up:
            self.link.up()
        else:
            self.link.down()

    def link_up(self) -> bool:
        """What ``GET /link`` answers now (a check of the ``SimNetworkLink``, if any)."""
        if self.link is None:
            return not self._link_switched_down
        return self.link.is_up()

    @property
    def printed(self) -> list[list[str]]:
        return [list(receipt) for receipt in self.printer.printed]

    @property
    def received(self) -> list[tuple[str, str]]:
        """Every request that reached the server: (method, path). No bodies."""
        with self._cond:
            return list(self._received)

    def wait_received(self, method: str, path: str, timeout_s: float) -> bool:
        """Block until a ``method path`` request has reached the server (True), or
        ``timeout_s`` passed (False): a test waits on the event, not on a polling sleep."""
        with self._cond:
            return self._cond.wait_for(lambda: (method, path) in self._received, timeout_s)

    # --- lifecycle (the rest is LoopbackServer's) ---------------------------------------

    def _port(self) -> int:
        return self.port

    def _stopped(self) -> bool:
        return self._stopping

    def _release(self) -> None:
        """Release waiting reads (stop() then stops serving and closes the socket)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # --- serving ------------------------------------------------------------------------

    def _serve(self, handler: _Handler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        with self._cond:
            self._received.append((method, path))
            self._cond.notify_all()  # wait_received
        try:
            body = _read_json(handler) if method == "POST" else {}
            if (method, path) == ("POST", CARD_READ_PATH):
                self._card_read(handler, body)
                return
            route = self._routes.get((method, path))
            if route is None:
                if any(p == path for _, p in self._routes) or path == CARD_READ_PATH:
                    raise _Refused(405, "method_not_allowed", f"{method} is not served here")
                raise _Refused(404, "not_found", f"nothing at {path}")
            status, payload = route(body)
        except _Refused as refused:
            error = {"code": refused.code, "message": refused.message}
            _reply(handler, refused.status, {"error": error}, close=True)  # body may be unread
            return
        _reply(handler, status, payload)

    def _card_read(self, handler: _Handler, body: dict[str, Any]) -> None:
        timeout_s = body.get("timeout_s")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s < 0:
            raise _Refused(400, "invalid_body", "timeout_s must be a non-negative number")
        timeout_s = min(float(timeout_s), MAX_LONG_POLL_S)
        if self.clock is not None:
            if not self.reader.queued:
                self.clock.sleep(timeout_s)  # virtual: instant, may fire callbacks that insert
        else:
            deadline = time.monotonic() + timeout_s
            with self._cond:
                while not self.reader.queued and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(min(remaining, _POLL_S))
        with self._cond:
            if self._stopping:
                handler.close_connection = True  # the reader went away: no answer
                return
            try:
                card = self.reader.read(0)
            except CardReadError as exc:
                failure = {"error": {"reason": exc.reason}}
            else:
                failure = None
        if failure is not None:
            _reply(handler, 409, failure)
            return
        _reply(handler, 200, _card_body(card))

    def _print(self, body: dict[str, Any]) -> tuple[int, object]:
        lines = body.get("lines")
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise _Refused(400, "invalid_body", "lines must be a list of strings")
        try:
            self.printer.print_receipt(lines)
        except PaperOut:
            return 409, {"error": {"code": "paper_out"}}
        except PrinterJam:
            return 409, {"error": {"code": "jam"}}
        return 200, {"printed": True}

    def _link(self, body: dict[str, Any]) -> tuple[int, object]:
        up = self.link_up()
        return (200 if up else 503), {"up": up}

    def _control_insert(self, body: dict[str, Any]) -> tuple[int, object]:
        if "fail" in body:
            reason = body["fail"]
            if reason not in ("removed", "unreadable"):
                raise _Refused(400, "invalid_body", "fail must be 'removed' or 'unreadable'")
            self.fail_next_read(reason)
            return 200, {"queued": self.reader.queued}
        name = body.get("card")
        cvv = body.get("cvv", "123")
        entry_mode = body.get("entry_mode", "chip")
        if not isinstance(name, str):
            raise _Refused(400, "invalid_body", "card must name one of TEST_CARDS")
        if cvv is not None and not isinstance(cvv, str):
            raise _Refused(400, "invalid_body", "cvv must be a string or null")
        if entry_mode not in _ENTRY_MODES:
            raise _Refused(400, "invalid_body", f"entry_mode must be one of {_ENTRY_MODES}")
        try:
            card = self.insert_test_card(name, cvv=cvv, entry_mode=entry_mode)
        except ValueError as exc:
            raise _Refused(400, "unknown_card", str(exc)) from None
        return 200, {"inserted": card.masked, "queued": self.reader.queued}

    def _control_printer(self, body: dict[str, Any]) -> tuple[int, object]:
        if "fail_next" in body:
            state = body["fail_next"]
            if state not in ("paper_out", "jam"):
                raise _Refused(400, "invalid_body", "fail_next must be 'paper_out' or 'jam'")
            self.printer.fail_next(state)
        elif "state" in body:
            state = body["state"]
            if state not in _PRINTER_STATES:
                raise _Refused(400, "invalid_body", f"state must be one of {_PRINTER_STATES}")
            self.printer.state = state
        else:
            raise _Refused(400, "invalid_body", "give state or fail_next")
        return 200, {"state": self.printer.state}

    def _control_link(self, body: dict[str, Any]) -> tuple[int, object]:
        up = body.get("up")
        if not isinstance(up, bool):
            raise _Refused(400, "invalid_body", "up must be true or false")
        self.set_link(up)
        return 200, {"up": up}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients pool connections
    timeout = 10  # an idle keep-alive connection frees its thread after this
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self.server.sim._serve(self, "GET")  # type: ignore[attr-defined]

    def do_POST(self) -> None:
        self.server.sim._serve(self, "POST")  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass  # never log: a request line is harmless, but nothing here gets the chance


def _card_body(card: CardRead) -> dict[str, object]:
    body: dict[str, object] = {
        "pan": card.pan.reveal(),
        "expiry": card.expiry,
        "entry_mode": card.entry_mode,
    }
    for name in ("cvv", "track2", "pin_block"):
        value = getattr(card, name)
        if value is not None:
            body[name] = value.reveal()
    return body


def _read_json(handler: BaseHTTPRequestHandler) -> dict[str, Any]:
    try:
        length = int(handler.headers.get("Content-Length", ""))
    except ValueError:
        raise _Refused(411, "length_required", "send a Content-Length") from None
    if not 0 <= length <= _MAX_BODY:
        raise _Refused(413, "body_too_large", f"at most {_MAX_BODY} bytes")
    raw = handler.rfile.read(length)
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        raise _Refused(400, "invalid_json", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise _Refused(400, "invalid_json", "the body must be a JSON object")
    return body


def _reply(
    handler: BaseHTTPRequestHandler, status: int, payload: object, *, close: bool = False
) -> None:
    data = json.dumps(payload).encode()
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if close:
            handler.send_header("Connection", "close")  # also sets close_connection
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        handler.close_connection = True  # the client gave up first (its timeout)
