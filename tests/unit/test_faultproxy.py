"""hwsim.faultproxy: each fault observed at both ends, seeded determinism, heal/down/up.

A tiny upstream (``ThreadingHTTPServer``, HTTP/1.1 keep-alive) records every request it
read whole, in the order it read them; an httpx client talks to it through the proxy.
Everything is on loopback, port 0. Orders are observed at the upstream; no assertion
reads a wall clock.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from hwsim.faultproxy import FaultPlan, FaultProxy

TIMEOUT = httpx.Timeout(10.0)


@dataclass
class Upstream:
    """What the upstream processed: (method, path, body) of each whole request."""

    server: ThreadingHTTPServer
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)
    torn: int = 0  # requests whose body ended before its Content-Length
    lock: threading.Condition = field(default_factory=threading.Condition)

    def wait_torn(self, count: int) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: self.torn >= count, timeout=10)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    @property
    def paths(self) -> list[str]:
        with self.lock:
            return [path for _, path, _ in self.seen]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        return body if len(body) == length else None

    def _answer(self) -> None:
        up: Upstream = self.server.upstream  # type: ignore[attr-defined]
        body = self._body()
        if body is None:
            with up.lock:
                up.torn += 1
                up.lock.notify_all()
            self.close_connection = True
            return
        with up.lock:
            up.seen.append((self.command, self.path, body))
            n = len(up.seen)
        # A body long enough that "half of it" is a real cut.
        out = json.dumps({"n": n, "path": self.path, "len": len(body), "pad": "x" * 200})
        data = out.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a torn connection (cut_request) is what these tests make on purpose


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    up = Upstream(server)
    server.upstream = up  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield up
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream=upstream.address) as p:
        yield p
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy")]


def client(p: FaultProxy) -> httpx.Client:
    return httpx.Client(base_url=p.url, timeout=TIMEOUT)


def post(c: httpx.Client, path: str, body: bytes = b'{"entries": [1, 2, 3]}') -> httpx.Response:
    return c.post(path, content=body, headers={"Content-Type": "application/json"})


# --- pass and keep-alive ------------------------------------------------------------------


def test_pass_forwards_byte_for_byte_over_one_kept_alive_connection(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    with client(proxy) as c:
        first = post(c, "/v1/sync", b"abc" * 1000)
        second = c.get("/health")
        third = post(c, "/v1/sync", b"")
    assert [r.status_code for r in (first, second, third)] == [200, 200, 200]
    assert first.json() == {"n": 1, "path": "/v1/sync", "len": 3000, "pad": "x" * 200}
    assert second.json()["path"] == "/health"
    assert upstream.seen == [
        ("POST", "/v1/sync", b"abc" * 1000),
        ("GET", "/health", b""),
        ("POST", "/v1/sync", b""),
    ]
    tally = proxy.tally
    assert tally["connections"] == 1  # httpx reused its connection through the proxy
    assert tally["requests"] == tally["pass"] == 3


def test_a_chunked_request_body_is_forwarded(proxy: FaultProxy, upstream: Upstream) -> None:
    with client(proxy) as c:
        response = c.post("/v1/sync", content=iter([b"hello ", b"", b"world"]))
    assert response.status_code == 200
    assert upstream.seen == [("POST", "/v1/sync", b"hello world")]


# --- each fault ----------------------------------------------------------------------------


def test_drop_never_reaches_the_upstream_and_the_client_sees_an_error(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.set_plan(FaultPlan(rates={"drop": 1.0}))
    with client(proxy) as c, pytest.raises(httpx.TransportError):
        post(c, "/v1/sync")
    assert upstream.seen == []
    assert proxy.tally["drop"] == 1


def test_duplicate_reaches_the_upstream_twice_and_the_client_gets_the_second_answer(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.set_plan(FaultPlan(rates={"duplicate": 1.0}))
    with client(proxy) as c:
        response = post(c, "/v1/sync", b"batch-1")
    assert upstream.seen == [("POST", "/v1/sync", b"batch-1")] * 2
    assert response.json()["n"] == 2
    assert proxy.tally["duplicate"] == 1


def test_cut_request_tears_the_body_upstream_and_fails_the_client(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.set_plan(FaultPlan(rates={"cut_request": 1.0}, seed=3))
    with client(proxy) as c:
        for _ in range(4):
            with pytest.raises(httpx.TransportError):
                post(c, "/v1/sync", b"0123456789" * 50)
        with pytest.raises(httpx.TransportError):
            c.get("/no-body")  # no body: part of the method goes up
    assert upstream.wait_torn(4)  # the upstream read each torn body to its early end
    proxy.heal()
    with client(proxy) as c:
        assert post(c, "/after").status_code == 200
    assert upstream.paths == ["/after"]  # and processed none of the five
    assert proxy.tally["cut_request"] == 5


def test_cut_response_lands_upstream_but_the_client_cannot_tell(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    # Seeds give both cuts: the head alone, and the head with half the body.
    proxy.set_plan(FaultPlan(rates={"cut_response": 1.0}, seed=5))
    with client(proxy) as c:
        for i in range(8):
            with pytest.raises(httpx.TransportError):
                post(c, f"/v1/sync/{i}")
    assert upstream.paths == [f"/v1/sync/{i}" for i in range(8)]
    assert proxy.tally["cut_response"] == 8


def test_reorder_holds_a_request_until_a_later_one_has_been_forwarded(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.set_plan(FaultPlan(script=["reorder"], reorder_timeout_s=5.0))
    with ThreadPoolExecutor(1) as pool, client(proxy) as a, client(proxy) as b:
        held: Future[httpx.Response] = pool.submit(post, a, "/k")
        assert proxy.wait_seen(1)
        assert post(b, "/k+1").status_code == 200
        assert held.result(timeout=10).status_code == 200
    assert upstream.paths == ["/k+1", "/k"]
    assert proxy.history == ["reorder", "pass"]


def test_reorder_goes_anyway_when_no_later_request_comes(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.set_plan(FaultPlan(rates={"reorder": 1.0}, reorder_timeout_s=0.05))
    with client(proxy) as c:
        assert post(c, "/alone").status_code == 200
    assert upstream.paths == ["/alone"]


def test_delay_lets_a_later_request_overtake(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.set_plan(FaultPlan(script=["delay"], delay_s=(0.5, 0.5)))
    with ThreadPoolExecutor(1) as pool, client(proxy) as a, client(proxy) as b:
        slow: Future[httpx.Response] = pool.submit(post, a, "/slow")
        assert proxy.wait_seen(1)
        assert post(b, "/fast").status_code == 200
        assert slow.result(timeout=10).status_code == 200
    assert upstream.paths == ["/fast", "/slow"]
    assert proxy.tally["delay"] == 1


# --- determinism, plans ------------------------------------------------------------------------

MIX = {
    "drop": 0.15,
    "duplicate": 0.15,
    "delay": 0.1,
    "reorder": 0.1,
    "cut_request": 0.1,
    "cut_response": 0.1,
}


def run_mix(upstream: Upstream, seed: int) -> tuple[list[str], dict[str, int], list[str]]:
    """Thirty requests one after another under ``MIX``: what was decided, the tally and
    what the upstream processed (retrying nothing)."""
    plan = FaultPlan(rates=MIX, seed=seed, delay_s=(0.0, 0.01), reorder_timeout_s=0.01)
    with upstream.lock:
        upstream.seen.clear()
    with FaultProxy(upstream=upstream.address, plan=plan) as p, client(p) as c:
        for i in range(30):
            with contextlib.suppress(httpx.TransportError):
                post(c, f"/{i}")
        return p.history, dict(p.tally), upstream.paths


def test_the_same_seed_gives_the_same_faults_and_effects(upstream: Upstream) -> None:
    history, tally, paths = run_mix(upstream, seed=7)
    assert run_mix(upstream, seed=7) == (history, tally, paths)
    assert set(history) == {*MIX, "pass"}  # thirty draws hit every kind with this seed
    assert tally["requests"] == 30
    # What reached the upstream follows from the faults alone.
    landed = [f"/{i}" for i, k in enumerate(history) if k not in ("drop", "cut_request")]
    doubled = [f"/{i}" for i, k in enumerate(history) if k == "duplicate"]
    assert sorted(paths) == sorted(landed + doubled)
    assert run_mix(upstream, seed=8)[0] != history


def test_set_plan_starts_the_plan_from_its_seed_and_script(proxy: FaultProxy) -> None:
    plan = FaultPlan(rates={"duplicate": 0.5}, seed=2, script=["drop"])
    decided = []
    with client(proxy) as c:
        for _ in range(2):
            proxy.set_plan(plan)
            for i in range(6):
                with contextlib.suppress(httpx.TransportError):
                    post(c, f"/{i}")
            decided.append(proxy.history[-6:])
    assert decided[0] == decided[1]
    assert decided[0][0] == "drop"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rates": {"explode": 0.1}}, "unknown fault 'explode'"),
        ({"rates": {"drop": 0.7, "delay": 0.6}}, "sum to 1.3"),
        ({"rates": {"drop": -0.1}}, "probability"),
        ({"script": ["pass", "teleport"]}, "script[1]"),
        ({"delay_s": (0.5, 0.1)}, "delay_s"),
        ({"delay_s": (0.0, 60.0)}, "delay_s"),
        ({"reorder_timeout_s": 0.0}, "reorder_timeout_s"),
    ],
)
def test_a_bad_plan_is_refused_with_what_was_wrong(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FaultPlan(**kwargs)  # type: ignore[arg-type]


# --- heal, down, up, upstream gone, stop ---------------------------------------------------------


def test_heal_makes_everything_pass(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.set_plan(FaultPlan(rates={"drop": 1.0}))
    proxy.down()
    with client(proxy) as c:
        with pytest.raises(httpx.TransportError):
            post(c, "/before")
        proxy.heal()
        assert post(c, "/after").status_code == 200
    assert upstream.paths == ["/after"]


def test_down_refuses_and_cuts_connections_until_up(proxy: FaultProxy, upstream: Upstream) -> None:
    with client(proxy) as c:
        assert post(c, "/1").status_code == 200  # a kept-alive connection now exists
        proxy.down()
        with pytest.raises(httpx.TransportError):
            post(c, "/2")  # on the kept-alive connection, or a new one: both refused
        with client(proxy) as fresh, pytest.raises(httpx.TransportError):
            post(fresh, "/3")
        proxy.up()
        assert post(c, "/4").status_code == 200
    assert upstream.paths == ["/1", "/4"]
    assert proxy.tally["refused"] >= 1


def test_an_unreachable_upstream_is_a_502(upstream: Upstream) -> None:
    with FaultProxy(upstream=upstream.address) as p, client(p) as c:
        upstream.server.shutdown()
        upstream.server.server_close()  # nothing listens there now
        response = post(c, "/v1/sync")
        assert response.status_code == 502
        assert p.tally["upstream_errors"] == 1


def test_stop_ends_held_requests_and_joins_every_thread(upstream: Upstream) -> None:
    plan = FaultPlan(rates={"delay": 1.0}, delay_s=(10.0, 10.0))
    p = FaultProxy(upstream=upstream.address, plan=plan).start()
    with ThreadPoolExecutor(1) as pool, client(p) as c:
        held = pool.submit(post, c, "/held")
        assert p.wait_seen(1)
        p.stop()
        with pytest.raises(httpx.TransportError):
            held.result(timeout=5)
    assert upstream.paths == []
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy")]
    with pytest.raises(RuntimeError, match="starts once"):
        p.start()
