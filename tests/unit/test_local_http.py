"""The local API's HTTP transport (edge.terminal.service.httpserver) against a hostile client: bad
framing on raw sockets, bursts, idle connections, slow clients, routes that raise, a POS
that hangs up, and stop() with connections open."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.terminal.service.httplimits import MAX_CONNECTIONS, Limits
from edge.terminal.service.httpserver import UnixHttpServer

REPO = Path(__file__).resolve().parents[2]
PAN = "4111111111111111"  # a public test number
#: Seconds a test waits for something that should happen at once (a bound, not a clock).
WAIT_S = 10.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tf-http-"))  # AF_UNIX paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def echo(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    return 200, {"method": method, "path": path, "body": body.decode("latin-1")}


@contextmanager
def serving(
    sock_dir: Path, app: Callable[[str, str, bytes], tuple[int, dict[str, Any]]] = echo, **limits
) -> Iterator[UnixHttpServer]:
    server = UnixHttpServer(sock_dir / "api.sock", app, limits=Limits(**limits)).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


class Raw:
    """A raw AF_UNIX client that reads answers by Content-Length, keeping what follows."""

    def __init__(self, path: Path, timeout: float = WAIT_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> Raw:
        self.sock.sendall(data)
        return self

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(self.buf)
        self.buf += chunk

    def answer(self) -> Answer:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), status_line
        headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines)}
        if status_line.split()[1] == "100":
            return self.answer()
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Answer(int(status_line.split()[1]), headers, json.loads(body) if body else None)

    def closed(self) -> bool:
        """Whether the server closes the connection (EOF) before anything else arrives."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def request(path: str, body: bytes = b"", method: str = "POST", headers: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: pos\r\nContent-Length: {len(body)}\r\n{headers}"
    return head.encode() + b"\r\n" + body


def served(path: Path) -> bool:
    c = Raw(path)
    try:
        return c.send(request("/v1/health", method="GET")).answer().status == 200
    finally:
        c.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(0.01)  # polling a condition, with a deadline


def uds_client(path: Path) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(path)), base_url="http://pos", timeout=WAIT_S
    )


# --- capacity: bursts, idle connections ----------------------------------------------------


def test_http__fifty_concurrent_requests_are_all_answered(sock_dir):
    with serving(sock_dir) as server:
        barrier = threading.Barrier(50)
        statuses: list[int | str] = []

        def one() -> None:
            with uds_client(server.socket_path) as client:
                barrier.wait(WAIT_S)
                try:
                    statuses.append(client.get("/v1/health").status_code)
                except httpx.HTTPError as exc:
                    statuses.append(type(exc).__name__)

        threads = [threading.Thread(target=one) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
    assert statuses == [200] * 50


def test_http__a_burst_of_connects_waits_in_the_backlog(sock_dir):
    """30 connects before the server accepts any: none refused (a backlog of 5 was)."""
    server = UnixHttpServer(sock_dir / "api.sock", echo)  # listening, not yet accepting
    clients: list[Raw] = []
    try:
        for _ in range(30):
            clients.append(Raw(server.socket_path, timeout=1.0))
        server.start()
        for c in clients:
            c.sock.settimeout(WAIT_S)
            assert c.send(request("/v1/health", method="GET")).answer().status == 200
    finally:
        for c in clients:
            c.close()
        server.stop()


@pytest.mark.parametrize(
    "limits", [{}, {"max_connections": 8, "workers": 2}], ids=["default", "small"]
)
def test_http__idle_connections_hold_no_thread_and_the_excess_get_a_503(sock_dir, limits):
    with serving(sock_dir, **limits) as server:
        cap = limits.get("max_connections", MAX_CONNECTIONS)
        threads_before = threading.active_count()
        clients = [Raw(server.socket_path) for _ in range(cap + 40)]
        try:
            refused = [c.answer() for c in clients[cap:]]
            assert {(a.status, a.body["error"]["code"]) for a in refused} == {(503, "server_busy")}
            assert all(a.headers["connection"] == "close" for a in refused)
            assert all(c.closed() for c in clients[cap:])
            assert threading.active_count() <= threads_before  # no thread per connection
            for c in clients[:cap]:  # the idle ones were kept, and serve
                assert c.send(request("/v1/health", method="GET")).answer().status == 200
        finally:
            for c in clients:
                c.close()
        wait_until(lambda: served(server.socket_path), "their slots to be free again")


def test_http__an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(sock_dir):
    with serving(sock_dir, idle_timeout_s=0.2) as server:
        c = Raw(server.socket_path)
        try:
            assert c.send(request("/v1/health", method="GET")).answer().status == 200
            assert c.closed()  # within WAIT_S, the socket's timeout
        finally:
            c.close()


# --- slow clients --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "part"),
    [
        (b"GET /v1/health HTTP/1.1\r\nHost: pos\r\n", "headers"),
        (b'POST /v1/payments HTTP/1.1\r\nHost: pos\r\nContent-Length: 10\r\n\r\n{"a"', "body"),
        (b"POST /v1/payments HTTP/1.1\r\nHost: pos\r\nContent-Length: -1\r\n\r\n{}", None),
    ],
    ids=["headers", "short-body", "negative-length"],
)
def test_http__a_slow_or_short_request_gets_an_answer_and_is_closed(sock_dir, sent, part):
    with serving(sock_dir, header_timeout_s=0.2, body_timeout_s=0.2) as server:
        c = Raw(server.socket_path)
        try:
            a = c.send(sent).answer()
            if part is None:  # not a number of bytes at all
                assert (a.status, a.body["error"]["code"]) == (400, "malformed_http")
            else:
                assert (a.status, a.body["error"]["code"]) == (408, "request_timeout")
                assert part in a.body["error"]["message"]
            assert c.closed()
        finally:
            c.close()


# --- framing -------------------------------------------------------------------------------

CHUNKED = "Transfer-Encoding: chunked\r\n"


def post(headers: str, body: bytes = b"") -> bytes:
    return f"POST /v1/payments HTTP/1.1\r\nHost: pos\r\n{headers}\r\n".encode() + body


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed_http"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "malformed_http"),  # TLS
        (b"GET /v1/health HTTP/1.1\r\n\r\n", 400, "malformed_http"),  # no Host
        (post("Content-Length: abc\r\n"), 400, "malformed_http"),
        (post("Content-Length: " + "9" * 5000 + "\r\n"), 400, "malformed_http"),
        (post("Content-Length: 2\r\nContent-Length: 3\r\n"), 400, "malformed_http"),
        (post("Content-Length: 3\r\n" + CHUNKED, b"3\r\nabc\r\n0\r\n\r\n"), 400, "malformed_http"),
        (post(CHUNKED, b"zz\r\n"), 400, "malformed_http"),
        (post("Transfer-Encoding: gzip\r\n"), 501, "not_implemented"),
        (post("Content-Length: 70000\r\n"), 413, "body_too_large"),
        (post(CHUNKED, b"10001\r\n" + b"x" * 0x10001 + b"\r\n0\r\n\r\n"), 413, "body_too_large"),
        (post("X-Big: " + "a" * 20_000)[:-2], 431, "headers_too_large"),  # and more to come
        (post(f"X-Card {PAN}\r\n"), 400, "malformed_http"),
    ],
    ids=[
        "garbage-line", "tls-hello", "no-host", "length-abc", "length-5000-digits",
        "two-lengths", "length-and-chunked", "bad-chunk", "gzip-coding", "length-too-big",
        "chunked-too-big", "headers-too-big", "pan-in-a-bad-header",
    ],
)  # fmt: skip
def test_http__malformed_framing_gets_a_4xx_json_error_and_the_connection_closes(
    sock_dir, raw, status, code, caplog
):
    caplog.set_level(logging.DEBUG, logger="edge.terminal.service.httpserver")
    with serving(sock_dir) as server:
        c = Raw(server.socket_path)
        try:
            a = c.send(raw).answer()
            assert (a.status, a.body["error"]["code"]) == (status, code), a.body
            assert a.headers["content-type"] == "application/json"
            assert a.headers["connection"] == "close"
            assert c.closed()
        finally:
            c.close()
    assert PAN not in json.dumps(a.body) and PAN not in caplog.text  # h11 quotes the bytes


def test_http__a_chunked_body_is_decoded_and_the_next_request_is_its_own(sock_dir):
    body = b'{"amount_minor": 100}'
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:])
    with serving(sock_dir) as server:
        c = Raw(server.socket_path)
        try:
            c.send(post(CHUNKED))
            c.send(chunked + request("/v1/health", method="GET"))  # pipelined behind it
            first, second = c.answer(), c.answer()
        finally:
            c.close()
    assert (first.status, first.body["path"], first.body["body"]) == (
        200,
        "/v1/payments",
        body.decode(),
    )
    assert (second.status, second.body["method"], second.body["path"]) == (200, "GET", "/v1/health")


def test_http__expect_100_continue_gets_its_interim_answer(sock_dir):
    with serving(sock_dir) as server:
        c = Raw(server.socket_path)
        try:
            c.send(post("Content-Length: 2\r\nExpect: 100-continue\r\n"))
            while b"\r\n\r\n" not in c.buf:
                c._more()
            assert c.buf.startswith(b"HTTP/1.1 100 ")
            assert c.send(b"{}").answer().body["body"] == "{}"
        finally:
            c.close()


def test_http__the_route_gets_the_path_without_its_query_string(sock_dir):
    with serving(sock_dir) as server, uds_client(server.socket_path) as client:
        assert client.get("/v1/health?verbose=1").json()["path"] == "/v1/health"
        assert client.get("/v1/runs/r-1?x=%2F#frag").json()["path"] == "/v1/runs/r-1"


def test_http__http_1_0_is_answered_and_closed(sock_dir):
    with serving(sock_dir) as server:
        c = Raw(server.socket_path)
        try:
            a = c.send(b"GET /v1/health HTTP/1.0\r\n\r\n").answer()
            assert (a.status, a.body["path"]) == (200, "/v1/health")
            assert c.closed()
        finally:
            c.close()


# --- what escapes the route ----------------------------------------------------------------


def json_route(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    return 200, {"parsed": json.loads(body)}  # what the API's JSON parsing does


@pytest.mark.parametrize(
    ("body", "escaped"),
    [
        (b'{"currency": "\xff\xfe"}', "UnicodeDecodeError"),
        (b"[" * 60_000, "RecursionError"),
        (b'{"amount_minor": ' + b"1" * 5000 + b"}", "ValueError"),
    ],
    ids=["not-utf8", "deep-nesting", "5000-digits"],
)
def test_http__an_exception_escaping_the_route_is_a_500_logged_without_its_text(
    sock_dir, caplog, body, escaped
):
    with serving(sock_dir, app=json_route) as server:
        c = Raw(server.socket_path)
        try:
            a = c.send(request("/v1/payments", body)).answer()
            assert (a.status, a.body["error"]["code"]) == (500, "internal_error")
            assert c.closed()
        finally:
            c.close()
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == "edge.terminal.service.httpserver" and escaped in record.getMessage()
    assert record.exc_info is None and record.exc_text is None
    for text in ("can't decode", "maximum recursion", "Exceeds the limit"):
        assert text not in caplog.text


def test_http__an_exception_quoting_card_data_leaves_none_in_the_answer_or_the_log(
    sock_dir, caplog
):
    def route(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            raise ValueError(f"1 validation error\npan\n  input_value='{PAN}', cvv='7319'")
        except ValueError as exc:
            raise RuntimeError(f"wrapped: {exc}") from exc

    caplog.set_level(logging.DEBUG)
    with serving(sock_dir, app=route) as server, uds_client(server.socket_path) as client:
        r = client.post("/v1/payments", json={"pan": PAN})
    assert r.status_code == 500
    assert "RuntimeError" in caplog.text and "ValueError" in caplog.text  # what, and where
    for secret in (PAN, "7319", "input_value"):
        assert secret not in caplog.text and secret not in r.text


SERVE_LOCAL_API = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    from edge.terminal.service.api import LocalApi
    from edge.terminal.service.daemon import configure_logging
    from edge.terminal.service.httpserver import UnixHttpServer

    configure_logging("json")
    logging.getLogger().setLevel(logging.DEBUG)  # the hang-up is a debug line: show it
    server = UnixHttpServer(Path(sys.argv[1]), LocalApi(None).handle).start()
    print("serving", flush=True)
    sys.stdin.read()  # until the test closes it
    server.stop()
    """
)


def test_http__a_pos_hanging_up_on_its_422_leaves_no_card_data_or_traceback(sock_dir, tmp_path):
    """A POS sends a PAN in a field the API refuses and hangs up before reading the 422:
    writing the answer fails (EPIPE). That is a debug line, no traceback, no PAN."""
    stderr = tmp_path / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE_LOCAL_API, str(sock_dir / "api.sock")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"serving\n"
        body = json.dumps(
            {"amount_minor": 100, "currency": "EUR", "idempotency_key": "k", "pan": PAN}
        ).encode()
        for _ in range(3):
            c = Raw(sock_dir / "api.sock")
            c.send(request("/v1/payments", body))
            c.close()  # before the answer
        wait_until(lambda: stderr.read_text().count('"action": "api_hangup"') == 3, "hang-ups")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(WAIT_S)
        proc.stdout.close()
    text = stderr.read_text()
    assert PAN not in text and "Traceback" not in text, text
    assert proc.returncode == 0


# --- stop ----------------------------------------------------------------------------------


def stop_in_thread(server: UnixHttpServer) -> threading.Thread:
    t = threading.Thread(target=server.stop)
    t.start()
    return t


def test_stop__closes_idle_keep_alive_connections_at_once(sock_dir):
    server = UnixHttpServer(sock_dir / "api.sock", echo).start()
    client = uds_client(server.socket_path)
    idle, partial = Raw(server.socket_path), Raw(server.socket_path)
    try:
        assert client.get("/v1/health").status_code == 200  # its connection stays pooled
        partial.send(b"POST /v1/payments HTTP/1.1\r\nHost: pos\r\n")  # and never finishes
        stopping = stop_in_thread(server)
        stopping.join(WAIT_S)
        assert not stopping.is_alive(), "stop() waited on idle connections"
        assert idle.closed() and partial.closed()
        assert not server.socket_path.exists()
    finally:
        client.close()
        idle.close()
        partial.close()


def test_stop__a_request_in_flight_is_answered_with_connection_close(sock_dir):
    entered, release = threading.Event(), threading.Event()

    def slow(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        entered.set()
        release.wait(WAIT_S)
        return 200, {"done": True}

    server = UnixHttpServer(sock_dir / "api.sock", slow).start()
    c = Raw(server.socket_path)
    try:
        c.send(request("/v1/payments", b"{}"))
        assert entered.wait(WAIT_S)
        stopping = stop_in_thread(server)
        wait_until(lambda: not server.socket_path.exists(), "stop() to stop accepting")
        assert stopping.is_alive()  # waiting for the request
        release.set()
        a = c.answer()
        assert (a.status, a.body, a.headers["connection"]) == (200, {"done": True}, "close")
        stopping.join(WAIT_S)
        assert not stopping.is_alive()
    finally:
        release.set()
        c.close()


def test_stop__gives_up_on_a_request_still_running_after_the_grace(sock_dir, caplog):
    entered, release = threading.Event(), threading.Event()

    def stuck(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        entered.set()
        release.wait(WAIT_S)
        return 200, {}

    server = UnixHttpServer(sock_dir / "api.sock", stuck, limits=Limits(stop_grace_s=0.2)).start()
    c = Raw(server.socket_path)
    try:
        c.send(request("/v1/payments", b"{}"))
        assert entered.wait(WAIT_S)
        stopping = stop_in_thread(server)
        stopping.join(WAIT_S)
        assert not stopping.is_alive(), "stop() waited past its grace"
        assert c.closed()
        assert "1 request(s) still running" in caplog.text
    finally:
        release.set()
        c.close()
