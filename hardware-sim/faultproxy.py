"""A fault-injecting HTTP/1.1 proxy between a terminal and the cloud, on loopback.

``FaultProxy(upstream=(host, port), plan=FaultPlan(rates={...}, seed=1))`` listens on
``127.0.0.1`` (a free port; ``.url``) and forwards each request it reads to the upstream,
on a fresh upstream connection, after deciding its fate: one draw of a
``random.Random(seed)`` per request, so the same seed and the same sequence of requests
give the same faults (``.history``, ``.tally``). Client connections are kept alive as
the client asks (httpx reuses them); bodies are framed by ``Content-Length`` or chunked
and forwarded byte for byte (a signature over the body still verifies).

What each fault models in the field:

* ``drop`` -- the request reached the store's router, then the link died: the client
  connection is closed without a byte upstream. The cloud never saw it; the terminal
  sees a connection error and must send it again.
* ``duplicate`` -- a retrying middlebox or a client retry whose first attempt did land:
  the request is sent upstream twice and the client gets the second answer. The cloud
  must recognise the second copy (duplicate, not a new entry).
* ``delay`` -- a slow or congested link (a 3G modem, a saturated store uplink): the
  request is held ``delay_s`` (a bounded draw from ``FaultPlan.delay_s``) before it goes
  upstream, so requests from other connections overtake it.
* ``reorder`` -- two paths of different latency: request k is held until a later request
  (k+1, on another connection) has had its answer from upstream, then sent; bounded by
  ``FaultPlan.reorder_timeout_s`` when no later request comes.
* ``cut_request`` -- the link dies mid-upload: only part of the request (its head and
  part of its body; the first bytes of the method when it has no body) reaches the
  upstream, then both connections are closed. The cloud must store nothing from a torn request.
* ``cut_response`` -- the link dies on the way back: the upstream takes and processes
  the whole request, and the client gets only part of the answer (its head without the
  body, half the body, or half the head), then the connection closes. The client cannot
  tell whether its request landed: the case that makes idempotency necessary.
* ``pass`` -- forwarded as is (what is left of the rates).

``down()`` refuses every connection (reset at accept) and cuts the open ones until
``up()``: the cloud unreachable. ``heal()`` makes everything pass from now on (the plan
and the link). ``stop()`` closes every socket and joins every thread; every wait in here
is bounded (socket timeouts, the delay and reorder bounds), so nothing hangs.

Only the standard library: a thread accepts, one thread serves each client connection.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Self

__all__ = ["FAULTS", "KINDS", "FaultPlan", "FaultProxy"]

log = logging.getLogger(__name__)

#: The faults, in the order a draw walks the rates (fixed: a dict's order never matters).
FAULTS: tuple[str, ...] = ("drop", "duplicate", "delay", "reorder", "cut_request", "cut_response")
#: Every fate a request can have.
KINDS: tuple[str, ...] = (*FAULTS, "pass")

#: Upper bound of any delay or reorder hold, in seconds (a plan asking for more is an error).
MAX_HOLD_S = 10.0
#: A request or response head larger than this is refused (400) / treated as broken.
MAX_HEAD_BYTES = 64 * 1024
#: A body larger than this is refused: the sync protocol's batches are far smaller.
MAX_BODY_BYTES = 64 * 1024 * 1024

_BAD_GATEWAY = b"upstream unreachable or broken (fault proxy)\n"
_BAD_REQUEST = b"malformed HTTP request (fault proxy)\n"


@dataclass(frozen=True)
class FaultPlan:
    """What the proxy does to each request.

    ``rates``: fault kind -> probability per request (each in [0, 1], summing to at most
    1; the rest passes). ``seed``: the ``random.Random`` seed, drawn from once per request
    in the order requests are read. ``script``: kinds for the first requests under this
    plan, in order, before the rates take over (a test that needs request 0 reordered
    says so). ``delay_s``: (low, high) bounds of a ``delay``. ``reorder_timeout_s``: how
    long a ``reorder`` waits for a later request before it goes anyway.
    """

    rates: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    script: Sequence[str] = ()
    delay_s: tuple[float, float] = (0.05, 0.5)
    reorder_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        for kind, rate in self.rates.items():
            if kind not in KINDS:
                raise ValueError(f"unknown fault {kind!r} in rates; known: {', '.join(KINDS)}")
            if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
                raise ValueError(f"the rate of {kind!r} is a probability in [0, 1], got {rate!r}")
        total = sum(rate for kind, rate in self.rates.items() if kind != "pass")
        if total > 1.0 + 1e-9:
            raise ValueError(f"the fault rates sum to {total:g}; they may sum to at most 1")
        for i, kind in enumerate(self.script):
            if kind not in KINDS:
                raise ValueError(f"unknown fault {kind!r} at script[{i}]; known: {KINDS}")
        low, high = self.delay_s
        if not 0.0 <= low <= high <= MAX_HOLD_S:
            raise ValueError(f"delay_s needs 0 <= low <= high <= {MAX_HOLD_S}, got {self.delay_s}")
        if not 0.0 < self.reorder_timeout_s <= MAX_HOLD_S:
            raise ValueError(
                f"reorder_timeout_s must be in (0, {MAX_HOLD_S}], got {self.reorder_timeout_s}"
            )
        # Frozen copies: a caller's dict or list changed later does not change the plan.
        object.__setattr__(self, "rates", MappingProxyType(dict(self.rates)))
        object.__setattr__(self, "script", tuple(self.script))

    def pick(self, draw: float) -> str:
        """The kind a uniform ``draw`` in [0, 1) selects: the rates laid end to end in
        ``FAULTS`` order, ``pass`` after them."""
        edge = 0.0
        for kind in FAULTS:
            edge += self.rates.get(kind, 0.0)
            if draw < edge:
                return kind
        return "pass"


# --- HTTP/1.1 framing, byte for byte --------------------------------------------------


class _Broken(Exception):
    """The peer sent something that is not HTTP/1.1 we can frame, or closed mid-message."""


@dataclass
class _Message:
    """One request or response: its head and body exactly as read."""

    head: bytes
    body: bytes
    start: list[str]  # the start line's parts (method, target, version / version, status)
    headers: list[tuple[str, str]]  # (lowercased name, value)
    framed: bool = True  # False: a response whose body ran to the connection's end

    @property
    def raw(self) -> bytes:
        return self.head + self.body

    def tokens(self, name: str) -> set[str]:
        """The comma-separated tokens of every ``name`` header, lowercased."""
        return {t.strip().lower() for k, v in self.headers if k == name for t in v.split(",") if t}


class _Reader:
    """Buffered reads from one socket (every read bounded by the socket's timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> bytes | None:
        """The next head (up to and including the blank line); None when the peer closed
        cleanly before sending one byte of it."""
        while True:
            while self.buf[:2] == b"\r\n":  # a stray CRLF between messages is allowed
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > MAX_HEAD_BYTES:
                raise _Broken(f"a head longer than {MAX_HEAD_BYTES} bytes")
            if not self._fill():
                if self.buf:
                    raise _Broken("the peer closed in the middle of a head")
                return None

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise _Broken(f"the peer closed {n - len(self.buf)} bytes short of a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                data = bytes(self.buf[: end + 2])
                del self.buf[: end + 2]
                return data
            if len(self.buf) > MAX_HEAD_BYTES:
                raise _Broken("a chunk line too long")
            if not self._fill():
                raise _Broken("the peer closed in the middle of a chunked body")

    def to_eof(self) -> bytes:
        while self._fill():
            if len(self.buf) > MAX_BODY_BYTES:
                raise _Broken(f"a body larger than {MAX_BODY_BYTES} bytes")
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def chunked(self) -> bytes:
        """A chunked body as sent (sizes, chunks, trailers): forwarded unchanged."""
        out = bytearray()
        while True:
            line = self.line()
            out += line
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _Broken(f"a bad chunk size line {line!r}") from None
            if size == 0:
                while True:  # trailers, up to the blank line
                    trailer = self.line()
                    out += trailer
                    if trailer == b"\r\n":
                        return bytes(out)
            if len(out) + size > MAX_BODY_BYTES:
                raise _Broken(f"a body larger than {MAX_BODY_BYTES} bytes")
            out += self.exact(size + 2)


def _parse_head(head: bytes) -> tuple[list[str], list[tuple[str, str]]]:
    try:
        lines = head[:-4].decode("latin-1").split("\r\n")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise _Broken("an undecodable head") from None
    start = lines[0].split(" ", 2)
    if len(start) < 3 or not start[0] or not start[1]:
        raise _Broken(f"a bad start line {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Broken(f"a bad header line {line!r}")
        headers.append((name.lower(), value.strip()))
    return start, headers


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    values = {v for k, v in headers if k == "content-length"}
    if not values:
        return None
    if len(values) > 1 or not next(iter(values)).isdigit():
        raise _Broken(f"a bad Content-Length {sorted(values)}")
    length = int(next(iter(values)))
    if length > MAX_BODY_BYTES:
        raise _Broken(f"a body of {length} bytes, more than {MAX_BODY_BYTES}")
    return length


def _read_request(reader: _Reader) -> _Message | None:
    head = reader.head()
    if head is None:
        return None
    start, headers = _parse_head(head)
    if not start[2].startswith("HTTP/1."):
        raise _Broken(f"not HTTP/1.x: {start[2]!r}")
    msg = _Message(head, b"", start, headers)
    if "chunked" in msg.tokens("transfer-encoding"):
        msg.body = reader.chunked()
    else:
        length = _content_length(headers)
        msg.body = reader.exact(length) if length else b""
    return msg


def _read_response(reader: _Reader, method: str) -> _Message:
    head = reader.head()
    if head is None:
        raise _Broken("the upstream closed without answering")
    start, headers = _parse_head(head)
    if not start[1].isdigit():
        raise _Broken(f"a bad status line {start!r}")
    status = int(start[1])
    if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
        final = _read_response(reader, method)
        final.head = head + final.head
        return final
    msg = _Message(head, b"", start, headers)
    if method == "HEAD" or status in (204, 304):
        return msg
    if "chunked" in msg.tokens("transfer-encoding"):
        msg.body = reader.chunked()
        return msg
    length = _content_length(headers)
    if length is not None:
        msg.body = reader.exact(length)
    else:
        msg.body, msg.framed = reader.to_eof(), False
    return msg


def _keeps_alive(request: _Message, response: _Message) -> bool:
    """Whether the client connection carries another request after this exchange."""
    if not response.framed or "close" in response.tokens("connection"):
        return False
    if request.start[2] == "HTTP/1.0":
        return "keep-alive" in request.tokens("connection") and response.start[0] != "HTTP/1.0"
    return "close" not in request.tokens("connection") and response.start[0] != "HTTP/1.0"


def _simple_response(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (linger 0): what a refused or cut link looks like."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _shutdown(sock: socket.socket) -> None:
    """Wake any thread blocked on ``sock`` (its read returns end of file)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _UpstreamFailed(Exception):
    pass


@dataclass
class _Fate:
    n: int  # the request's number (0, 1, ... since start)
    kind: str
    plan: FaultPlan
    delay_s: float
    cut: float  # a uniform draw in [0, 1): where a cut falls
    released: threading.Event | None = None  # a reorder's hold


# --- the proxy ----------------------------------------------------------------------------


class FaultProxy:
    """The proxy (module docstring). ``start()`` returns it; a ``with`` block stops it.

    ``tally``: a copy of the counts so far: ``requests`` (read from clients), one per
    kind decided (``pass`` included), ``connections`` (accepted), ``refused``
    (connections reset while down) and ``upstream_errors`` (502s answered because the
    upstream could not be reached or answered garbage). ``history``: the kinds decided,
    in request order.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        plan: FaultPlan | None = None,
        *,
        upstream_timeout_s: float = 30.0,
        idle_timeout_s: float = 60.0,
    ) -> None:
        if upstream_timeout_s <= 0 or idle_timeout_s <= 0:
            raise ValueError("upstream_timeout_s and idle_timeout_s must be positive")
        self.upstream = upstream
        self.upstream_timeout_s = upstream_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._seen_cond = threading.Condition(self._lock)
        self._plan = plan if plan is not None else FaultPlan()
        self._rng = random.Random(self._plan.seed)
        self._scripted = 0
        self._seen = 0
        self._tally: Counter[str] = Counter()
        self._history: list[str] = []
        self._held: list[tuple[int, threading.Event]] = []
        self._down = False
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._clients: set[socket.socket] = set()
        self._upstreams: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: where the client points instead of the upstream."""
        host, port = self.address
        return f"http://{host}:{port}"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the proxy listens on."""
        if self._listener is None:
            raise RuntimeError("the FaultProxy is not started; call start() or use `with`")
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> Self:
        if self._listener is not None or self._stopping.is_set():
            raise RuntimeError("a FaultProxy starts once; make a new one")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.05)  # the accept loop looks at the stop flag this often
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="faultproxy-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, release every hold, join every
        thread (each within a bound). Idempotent."""
        self._stopping.set()
        with self._lock:
            for _, event in self._held:
                event.set()
            self._held.clear()
            socks = [*self._clients, *self._upstreams]
        for sock in socks:
            _shutdown(sock)
        if self._acceptor is not None:
            self._acceptor.join(timeout=5.0)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5.0)
        alive = [t.name for t in threads if t.is_alive()]
        if alive:  # pragma: no cover - every wait is bounded; this says which one was not
            log.warning("fault proxy: threads still running after stop: %s", alive)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- controls -------------------------------------------------------------------------

    def set_plan(self, plan: FaultPlan) -> None:
        """Decide the requests from now on by ``plan``, from its seed and its script's
        start (so a plan set twice repeats itself)."""
        with self._lock:
            self._plan = plan
            self._rng = random.Random(plan.seed)
            self._scripted = 0

    def heal(self) -> None:
        """Everything passes from now on: an empty plan, the link up, every held request
        released."""
        self.set_plan(FaultPlan())
        self.up()
        with self._lock:
            for _, event in self._held:
                event.set()
            self._held.clear()

    def down(self) -> None:
        """Refuse every connection (reset at accept) and cut the open ones, until ``up()``."""
        with self._lock:
            self._down = True
            clients = list(self._clients)
        for sock in clients:
            _shutdown(sock)

    def up(self) -> None:
        with self._lock:
            self._down = False

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    @property
    def tally(self) -> Counter[str]:
        with self._lock:
            return Counter(self._tally)

    @property
    def history(self) -> list[str]:
        with self._lock:
            return list(self._history)

    def wait_seen(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` requests have been read in all (since start), at most
        ``timeout`` seconds; whether they were."""
        with self._seen_cond:
            return self._seen_cond.wait_for(lambda: self._seen >= count, timeout)

    # --- the connections --------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # out of descriptors and the like: retry, bounded
                if self._stopping.is_set():
                    return
                log.warning("fault proxy: accept failed: %s", exc)
                self._stopping.wait(0.05)
                continue
            thread = self._admit(conn)
            if thread is None:
                _reset(conn)
            else:
                thread.start()

    def _admit(self, conn: socket.socket) -> threading.Thread | None:
        """The thread to serve ``conn``, or None when it is refused (down, stopping)."""
        with self._lock:
            if self._down or self._stopping.is_set():
                self._tally["refused"] += 1
                return None
            self._tally["connections"] += 1
            self._clients.add(conn)
            # Finished threads leave here (not on their own way out: stop() joins them all).
            self._threads = {t for t in self._threads if t.is_alive()}
            thread = threading.Thread(
                target=self._serve,
                args=(conn,),
                name=f"faultproxy-conn-{self._tally['connections']}",
                daemon=True,
            )
            self._threads.add(thread)
            return thread

    def _serve(self, client: socket.socket) -> None:
        """One client connection: requests one after another until either side closes."""
        client.settimeout(self.idle_timeout_s)
        reader = _Reader(client)
        try:
            while not self._stopping.is_set():
                try:
                    request = _read_request(reader)
                except _Broken as exc:
                    log.debug("fault proxy: bad request from the client: %s", exc)
                    with contextlib.suppress(OSError):
                        client.sendall(_simple_response("400 Bad Request", _BAD_REQUEST))
                    return
                if request is None or self._down or self._stopping.is_set():
                    return
                if not self._handle(client, request, self._decide()):
                    return
        except OSError:
            return  # the client went away, a socket timed out, or stop()/down() cut it
        finally:
            with self._lock:
                self._clients.discard(client)
            if self._down:
                _reset(client)
            else:
                client.close()

    def _decide(self) -> _Fate:
        """The request's fate: the same three draws every request (the fault, a delay, a
        cut point), so the sequence of fates depends on the seed and the count alone."""
        with self._lock:
            plan, rng = self._plan, self._rng
            draw, delay, cut = rng.random(), rng.uniform(*plan.delay_s), rng.random()
            if self._scripted < len(plan.script):
                kind = plan.script[self._scripted]
                self._scripted += 1
            else:
                kind = plan.pick(draw)
            fate = _Fate(self._seen, kind, plan, delay, cut)
            if kind == "reorder":
                fate.released = threading.Event()
                self._held.append((fate.n, fate.released))
            self._seen += 1
            self._tally["requests"] += 1
            self._tally[kind] += 1
            self._history.append(kind)
            self._seen_cond.notify_all()
        log.debug("fault proxy: request %d: %s", fate.n, kind)
        return fate

    def _handle(self, client: socket.socket, request: _Message, fate: _Fate) -> bool:
        """Carry out ``fate`` for ``request``; whether the client connection goes on."""
        kind = fate.kind
        if kind == "drop":
            return False
        if kind == "cut_request":
            self._send_torn(request, fate.cut)
            return False
        if kind == "delay" and self._stopping.wait(fate.delay_s):
            return False
        if kind == "reorder":
            assert fate.released is not None
            fate.released.wait(fate.plan.reorder_timeout_s)
            with self._lock:
                self._held = [(n, e) for n, e in self._held if e is not fate.released]
        if self._stopping.is_set() or self._down:
            return False  # held while the link went down: it never leaves
        try:
            if kind == "duplicate":
                with contextlib.suppress(_UpstreamFailed):
                    self._exchange(request, fate.n)
            response = self._exchange(request, fate.n)
        except _UpstreamFailed as exc:
            log.debug("fault proxy: request %d: upstream failed: %s", fate.n, exc)
            with self._lock:
                self._tally["upstream_errors"] += 1
            if not self._stopping.is_set():
                client.sendall(_simple_response("502 Bad Gateway", _BAD_GATEWAY))
            return False
        if kind == "cut_response":
            client.sendall(_torn_response(response, fate.cut))
            return False
        client.sendall(response.raw)
        return _keeps_alive(request, response)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.upstream, timeout=self.upstream_timeout_s)
        with self._lock:
            self._upstreams.add(sock)
        if self._stopping.is_set():
            _shutdown(sock)
        return sock

    def _release_upstream(self, sock: socket.socket) -> None:
        with self._lock:
            self._upstreams.discard(sock)
        sock.close()

    def _exchange(self, request: _Message, n: int) -> _Message:
        """Send ``request`` upstream on a new connection and read the whole answer; then
        release every reorder-held request older than ``n`` (this one overtook them)."""
        try:
            sock = self._connect()
        except OSError as exc:
            raise _UpstreamFailed(f"connect to {self.upstream}: {exc}") from None
        try:
            sock.sendall(request.raw)
            response = _read_response(_Reader(sock), request.start[0].upper())
        except (OSError, _Broken) as exc:
            raise _UpstreamFailed(str(exc)) from None
        finally:
            self._release_upstream(sock)
        with self._lock:
            for held_n, event in self._held:
                if held_n < n:
                    event.set()
        return response

    def _send_torn(self, request: _Message, cut: float) -> None:
        """Send the upstream part of ``request`` (part of its body, or of its method when
        it has no body), then close."""
        if request.body:
            data = request.head + request.body[: _cut_at(len(request.body), cut)]
        else:
            # Inside the method: a lenient server (http.server) takes a head cut further
            # on, at the end of its input, as a whole request; none takes half a method.
            data = request.head[: 1 + _cut_at(len(request.start[0]), cut)]
        try:
            sock = self._connect()
        except OSError as exc:
            log.debug("fault proxy: cut_request: upstream unreachable: %s", exc)
            return
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            self._release_upstream(sock)


def _cut_at(length: int, cut: float) -> int:
    """A cut point strictly inside ``length`` bytes (0 when there is at most one)."""
    return min(length - 1, math.floor(cut * length)) if length > 1 else 0


def _torn_response(response: _Message, cut: float) -> bytes:
    """Part of ``response``, never all of it: the head alone or the head and half the
    body (by the draw ``cut``), or half the head when there is no body to withhold."""
    if len(response.body) > 1 and response.framed:
        if cut < 0.5:
            return response.head
        return response.head + response.body[: len(response.body) // 2]
    return response.head[: max(1, len(response.head) // 2)]
