"""The local API's HTTP transport over a Unix socket: framing, limits and timeouts. The
routes are a callable ``app(method, path, body) -> (status, json_body)``
(``edge.terminal.service.api``), given the path without its query string.

Why h11 and not ``http.server``: the stdlib server is a thread per connection blocked in
``readline``, and hardening it means overriding most of it (its HTTP/0.9 fallback answers
garbage with HTML and no status line, its errors are HTML, it knows no chunked bodies,
it parses ``Content-Length`` with ``int()``, its ``handle_error`` prints tracebacks to
stderr). h11 is a small sans-I/O HTTP/1.1 parser that validates framing (request line,
``Content-Length``, chunked bodies, header size); it is httpx's own (through httpcore), so
it is in the frozen binary already. This module keeps only the I/O:

    one I/O thread (selectors): accepts, reads and parses without blocking; holds idle
      keep-alive connections (a descriptor each, no thread); enforces the deadlines;
      answers what is malformed, slow or too large with a 4xx and closes
         │ a complete request                      ▲ answered: idle again, or closed
         ▼                                         │
    WORKERS threads: app(method, path, body), then write the answer (bounded in time)

Every answer the transport makes itself is JSON, ``{"error": {"code", "message"}}``, and
closes the connection: 400 ``malformed_http``, 408 ``request_timeout``, 413
``body_too_large``, 431 ``headers_too_large``, 501 ``not_implemented``, 503
``server_busy`` (over ``MAX_CONNECTIONS``: answered, not reset), 500 ``internal_error``
(an exception escaped ``app``). No exception's text is logged or answered: it may quote the
request (pydantic's ``input_value=``), card data included; the log gets its type and
where it was raised. A client that hangs up before its answer is a debug line.

``stop()``: stop accepting, close idle connections at once, give requests in flight up
to ``STOP_GRACE_S`` to be answered (with ``Connection: close``), then return.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import h11

from edge.terminal.service.httplimits import (
    ACCEPT_BACKOFF_S,
    JOIN_MARGIN_S,
    READ_CHUNK_BYTES,
    REFUSAL_LOG_INTERVAL_S,
    Limits,
)
from edge.terminal.service.httpwire import (
    Rejected,
    closing_answer,
    describe_exception,
    error_json,
    protocol_error,
    reason_phrase,
    request_path,
    too_large,
)

log = logging.getLogger(__name__)

App = Callable[[str, str, bytes], tuple[int, dict[str, Any]]]


class _Phase(Enum):
    IDLE = "idle"  # between requests (keep-alive)
    HEADERS = "headers"  # a request's first bytes arrived
    BODY = "body"
    BUSY = "busy"  # with a worker: the I/O thread neither reads nor times it out
    LINGER = "linger"  # answered and write side shut: discarding input until EOF


class _Conn:
    __slots__ = ("body", "deadline", "eof", "http", "method", "path", "phase", "sock", "watched")

    def __init__(self, sock: socket.socket, limits: Limits, now: float) -> None:
        self.sock = sock
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.phase = _Phase.IDLE
        self.deadline = now + limits.idle_timeout_s
        self.method = ""
        self.path = ""
        self.body = bytearray()
        self.eof = False
        self.watched = False  # registered with the selector


_LISTENER = "listener"
_WAKE = "wake"


class UnixHttpServer:
    """HTTP/1.1 + JSON on a Unix socket: ``UnixHttpServer(path, app).start()``, ``stop()``.

    The socket is bound and listening once constructed (mode 0660: the POS app's user is
    in our group); a stale socket file from a crash is replaced."""

    def __init__(self, path: Path, app: App, *, limits: Limits | None = None) -> None:
        self.app = app
        self.limits = limits or Limits()
        self.socket_path = Path(path)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists() or self.socket_path.is_symlink():  # a crash left it
            self.socket_path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o660)  # the POS app's user is in our group
            self._listener.listen(self.limits.backlog)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._open: set[_Conn] = set()  # counted against max_connections
        self._lingering: set[_Conn] = set()
        self._todo: queue.SimpleQueue[_Conn | None] = queue.SimpleQueue()  # to the workers
        self._done: queue.SimpleQueue[tuple[_Conn, bool]] = queue.SimpleQueue()  # and back
        self._done_lock = threading.Lock()
        self._io_done = False  # past it, a worker closes what it answered itself
        self._stopping = threading.Event()
        self._accept_paused_until: float | None = None
        self._refused_unlogged = 0
        self._refusal_logged_at: float | None = None
        self._abandoned = 0
        self._io_thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []

    # --- life ----------------------------------------------------------------------------

    def start(self) -> UnixHttpServer:
        self._io_thread = threading.Thread(target=self._run, name="tillflow-api", daemon=True)
        # Daemon threads: a route stuck past the stop grace must not keep the process alive.
        self._workers = [
            threading.Thread(target=self._work, name=f"tillflow-api-{i}", daemon=True)
            for i in range(self.limits.workers)
        ]
        for thread in (self._io_thread, *self._workers):
            thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close idle connections, let requests in flight be answered for up
        to ``limits.stop_grace_s``, then return. Safe to call twice."""
        self._stopping.set()
        if self._io_thread is None:  # never started
            self._stop_listening()
            self._close_io()
            return
        self._wake()
        self._io_thread.join(self.limits.stop_grace_s + JOIN_MARGIN_S)
        for _ in self._workers:
            self._todo.put(None)
        if not self._abandoned:  # else a worker is stuck in a route: do not wait for it
            deadline = time.monotonic() + JOIN_MARGIN_S
            for worker in self._workers:
                worker.join(max(0.0, deadline - time.monotonic()))

    def _stop_listening(self) -> None:
        if self._listener.fileno() != -1:
            self._unwatch_listener()
            self._listener.close()
            self.socket_path.unlink(missing_ok=True)

    # --- the I/O thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug: the POS loses its API, so say it loudly
            log.critical(
                "api: the I/O loop failed: %s", describe_exception(exc), extra={"action": "api_io"}
            )
        finally:
            self._stopping.set()  # also when the loop failed: nothing is served past here
            self._stop_listening()
            for conn in [*self._open, *self._lingering]:
                if conn.phase is not _Phase.BUSY:
                    self._close(conn)
            with self._done_lock:
                self._io_done = True
                self._take_back()  # closes them: we are stopping
            self._close_io()

    def _close_io(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()  # a late worker's wake-up is an OSError it ignores

    def _loop(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        grace_end: float | None = None
        while True:
            now = time.monotonic()
            if self._stopping.is_set():
                if grace_end is None:
                    grace_end = now + self.limits.stop_grace_s
                    self._begin_stop()
                busy = [c for c in self._open if c.phase is _Phase.BUSY]
                if not busy:
                    return
                if now >= grace_end:
                    self._abandon(busy)
                    return
            for key, _ in self._selector.select(self._timeout(now, grace_end)):
                if key.data is _LISTENER:
                    self._accept()
                elif key.data is _WAKE:
                    _drain(self._wake_r)
                else:
                    self._on_readable(key.data)
            self._take_back()
            self._expire(time.monotonic())

    def _timeout(self, now: float, grace_end: float | None) -> float | None:
        deadlines = [
            c.deadline for c in (*self._open, *self._lingering) if c.phase is not _Phase.BUSY
        ]
        for extra in (grace_end, self._accept_paused_until):
            if extra is not None:
                deadlines.append(extra)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _begin_stop(self) -> None:
        self._stop_listening()
        for conn in [*self._open, *self._lingering]:
            if conn.phase is not _Phase.BUSY:  # idle, or a request not yet complete
                self._close(conn)

    def _abandon(self, busy: list[_Conn]) -> None:
        self._abandoned = len(busy)
        log.warning(
            "api: stopping with %d request(s) still running after %s s; each resumes from "
            "its last committed step on restart",
            len(busy),
            self.limits.stop_grace_s,
            extra={"action": "api_stop"},
        )
        for conn in busy:  # a worker blocked writing to it gets EPIPE; its route runs on
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        for _ in range(self.limits.backlog):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: let them wait in the backlog
                log.warning(
                    "api: accept failed (%s); pausing %s s",
                    errno.errorcode.get(exc.errno or 0, exc.errno),
                    ACCEPT_BACKOFF_S,
                    extra={"action": "api_accept"},
                )
                self._unwatch_listener()
                self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF_S
                return
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Conn(sock, self.limits, now)
            if len(self._open) >= self.limits.max_connections:
                self._log_refusal(now)
                message = f"{len(self._open)} connections open, the most this terminal keeps"
                self._linger(conn, closing_answer(503, "server_busy", message))
                continue
            self._open.add(conn)
            self._watch(conn)

    def _log_refusal(self, now: float) -> None:
        self._refused_unlogged += 1
        last = self._refusal_logged_at
        if last is None or now - last >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "api: refused %d connection(s) with 503: %d open, the limit",
                self._refused_unlogged,
                len(self._open),
                extra={"action": "api_busy"},
            )
            self._refused_unlogged, self._refusal_logged_at = 0, now

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client
            self._close(conn)
            return
        if conn.phase is _Phase.LINGER:
            if not data:
                self._close(conn)
            return
        if not data:
            conn.eof = True
        elif conn.phase is _Phase.IDLE:
            self._begin_request(conn, time.monotonic())
        conn.http.receive_data(data)
        self._advance(conn)

    def _begin_request(self, conn: _Conn, now: float) -> None:
        conn.phase, conn.deadline = _Phase.HEADERS, now + self.limits.header_timeout_s
        conn.method, conn.path, conn.body = "", "", bytearray()

    def _advance(self, conn: _Conn) -> None:
        """Parse what has arrived: dispatch a complete request, answer a bad one."""
        try:
            while True:
                event = conn.http.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    self._on_request(conn, event)
                elif isinstance(event, h11.Data):
                    conn.body += event.data
                    if len(conn.body) > self.limits.max_body_bytes:
                        raise too_large(self.limits.max_body_bytes)
                elif isinstance(event, h11.EndOfMessage):
                    conn.phase = _Phase.BUSY
                    self._unwatch(conn)
                    self._todo.put(conn)
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    self._close(conn)
                    return
        except h11.RemoteProtocolError as exc:
            if conn.eof:  # hung up mid-request: nobody to answer
                self._close(conn)
                return
            self._reject(conn, protocol_error(exc, self.limits.max_header_bytes))
        except Rejected as rejected:
            self._reject(conn, rejected)

    def _on_request(self, conn: _Conn, request: h11.Request) -> None:
        conn.method = request.method.decode("ascii")  # h11 checked it is a token
        conn.path = request_path(request.target.decode("latin-1"))
        length = None
        chunked = False
        for name, value in request.headers:
            if name == b"content-length":
                length = int(value)  # h11 checked it: 1 to 20 digits
            elif name == b"transfer-encoding":
                chunked = True  # h11 accepts only "chunked"
        if chunked and length is not None:  # which one frames the body? (request smuggling)
            raise Rejected(400, "malformed_http", "both Content-Length and Transfer-Encoding")
        if length is not None and length > self.limits.max_body_bytes:
            raise too_large(self.limits.max_body_bytes)
        conn.phase = _Phase.BODY
        conn.deadline = time.monotonic() + self.limits.body_timeout_s
        if conn.http.they_are_waiting_for_100_continue:
            continue_ = conn.http.send(h11.InformationalResponse(status_code=100, headers=[]))
            _send_nowait(conn.sock, continue_ or b"")

    def _reject(self, conn: _Conn, rejected: Rejected) -> None:
        log.debug(
            "api: %d %s for a request", rejected.status, rejected.code,
            extra={"action": "api_rejected", "status": rejected.status},
        )  # fmt: skip
        self._linger(conn, closing_answer(rejected.status, rejected.code, rejected.message))

    def _linger(self, conn: _Conn, answer: bytes) -> None:
        """Send ``answer``, shut the write side, and discard input until EOF or LINGER_S."""
        self._open.discard(conn)
        try:
            _send_nowait(conn.sock, answer)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        if len(self._lingering) >= self.limits.max_connections:  # a flood: close at once
            self._close(conn)
            return
        conn.phase, conn.deadline = _Phase.LINGER, time.monotonic() + self.limits.linger_s
        self._lingering.add(conn)
        self._watch(conn)

    def _take_back(self) -> None:
        """Connections the workers answered: idle again (or a pipelined request), or closed."""
        while True:
            try:
                conn, keep = self._done.get_nowait()
            except queue.Empty:
                return
            if not keep or self._stopping.is_set():
                self._close(conn)
                continue
            now = time.monotonic()
            conn.sock.setblocking(False)
            conn.phase, conn.deadline = _Phase.IDLE, now + self.limits.idle_timeout_s
            self._watch(conn)
            pending, closed = conn.http.trailing_data
            if pending:  # the client sent its next request already
                self._begin_request(conn, now)
            conn.eof = conn.eof or closed
            if pending or closed:
                self._advance(conn)

    def _expire(self, now: float) -> None:
        paused = self._accept_paused_until
        if paused is not None and now >= paused:
            self._accept_paused_until = None
            if self._listener.fileno() != -1:
                self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        for conn in [*self._open, *self._lingering]:
            if conn.phase is _Phase.BUSY or now < conn.deadline:
                continue
            if conn.phase in (_Phase.IDLE, _Phase.LINGER):
                self._close(conn)
            else:
                if conn.phase is _Phase.HEADERS:
                    part, timeout = "headers", self.limits.header_timeout_s
                else:
                    part, timeout = "body", self.limits.body_timeout_s
                message = f"the request's {part} did not arrive within {timeout} s"
                self._reject(conn, Rejected(408, "request_timeout", message))

    def _watch(self, conn: _Conn) -> None:
        if not conn.watched:
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            conn.watched = True

    def _unwatch(self, conn: _Conn) -> None:
        if conn.watched:
            self._selector.unregister(conn.sock)
            conn.watched = False

    def _unwatch_listener(self) -> None:
        with contextlib.suppress(KeyError, ValueError):  # not registered, or selector closed
            self._selector.unregister(self._listener)

    def _close(self, conn: _Conn) -> None:
        self._unwatch(conn)
        conn.sock.close()
        self._open.discard(conn)
        self._lingering.discard(conn)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a wake-up is pending already, or we are closed
            self._wake_w.send(b"\0")

    # --- the workers ---------------------------------------------------------------------

    def _work(self) -> None:
        while (conn := self._todo.get()) is not None:
            keep = False
            try:
                keep = self._answer(conn)
            except Exception as exc:  # a bug in this module: close the connection, go on
                log.error(
                    "api: answering %s %s failed: %s",
                    conn.method,
                    conn.path,
                    describe_exception(exc),
                    extra={"action": "api_error"},
                )
            with self._done_lock:
                if self._io_done:  # stopped while this request ran past the grace
                    conn.sock.close()
                    continue
                self._done.put((conn, keep))
            self._wake()

    def _answer(self, conn: _Conn) -> bool:
        """Run the route and write its answer; whether the connection stays open."""
        status, payload, close = self._call_app(conn)
        close = close or self._stopping.is_set()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        if close:
            headers.append((b"connection", b"close"))
        out = conn.http.send(
            h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))
        )
        if conn.method != "HEAD":  # h11 refuses a body in an answer to HEAD
            out = (out or b"") + (conn.http.send(h11.Data(data=payload)) or b"")
        out = (out or b"") + (conn.http.send(h11.EndOfMessage()) or b"")
        log.debug(
            "api: %s %s -> %d", conn.method, conn.path, status,
            extra={"action": "api_request", "status": status},
        )  # fmt: skip
        try:
            conn.sock.settimeout(self.limits.write_timeout_s)  # the whole sendall, not per send
            conn.sock.sendall(out)
        except OSError as exc:
            _log_write_failure(conn, status, exc, self.limits.write_timeout_s)
            return False
        if conn.http.our_state is not h11.DONE or conn.http.their_state is not h11.DONE:
            return False  # MUST_CLOSE: the client asked to close, or HTTP/1.0
        conn.http.start_next_cycle()
        return True

    def _call_app(self, conn: _Conn) -> tuple[int, bytes, bool]:
        """The route's status and JSON, or a 500 (and closing) for whatever escaped it."""
        try:
            status, body = self.app(conn.method, conn.path, bytes(conn.body))
            if not isinstance(status, int) or not 200 <= status <= 599 or status in (204, 304):
                raise TypeError(f"the route answered status {status!r} (a JSON answer has a body)")
            return status, json.dumps(body).encode(), False
        except Exception as exc:
            log.error(
                "api: %s %s: %s escaped the route; answered 500",
                conn.method,
                conn.path,
                describe_exception(exc),
                extra={"action": "api_error", "status": 500},
            )
            message = "the terminal failed to handle this request; its log says where"
            return 500, error_json("internal_error", message), True


def _log_write_failure(conn: _Conn, status: int, exc: OSError, timeout_s: float) -> None:
    """An answer that could not be written: a client that hung up is its own business."""
    if isinstance(exc, BrokenPipeError | ConnectionResetError):
        level, action, why = logging.DEBUG, "api_hangup", "the client hung up before its answer"
    elif isinstance(exc, TimeoutError):
        level, action = logging.INFO, "api_write_timeout"
        why = f"the client did not read its answer within {timeout_s} s"
    else:
        level, action = logging.WARNING, "api_write"
        why = f"writing the answer failed ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    extra = {"action": action, "status": status}
    log.log(level, "api: %s %s -> %d: %s", conn.method, conn.path, status, why, extra=extra)


def _send_nowait(sock: socket.socket, data: bytes) -> None:
    """As much of ``data`` as the socket's buffer takes now (a small answer: all of it)."""
    if data:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            sock.send(data)


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            if not sock.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
