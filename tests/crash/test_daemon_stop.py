"""SIGTERM while the POS app is connected: the daemon closes idle keep-alive connections
at once, lets a payment in flight be answered, checkpoints the WAL and exits 0, well
inside systemd's TimeoutStopSec=30 (past it, SIGKILL, and no checkpoint)."""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import httpx
import pytest
from hwsim.devices import SimDeviceServer

from edge.terminal.drivers.devices_http import CARD_READ_PATH
from edge.terminal.service.httplimits import STOP_GRACE_S

from .test_edge_daemon import daemon_world, start, wait_for

#: systemd's TimeoutStopSec for the unit (systemd/tillflow-edge.service).
TIMEOUT_STOP_S = 30.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tfs-"))  # AF_UNIX paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def world(tmp_path, short_dir) -> Iterator[dict]:
    # A longer card read than the other daemon tests: SIGTERM lands while one waits.
    with daemon_world(tmp_path, short_dir, device_id="T-STOP", card_timeout_s=10) as w:
        yield w


def pos_client(world) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=str(world["sock"]))
    return httpx.Client(transport=transport, base_url="http://pos", timeout=30)


def idle_socket(world) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(TIMEOUT_STOP_S)
    raw.connect(str(world["sock"]))
    return raw


def assert_checkpointed_and_intact(world) -> None:
    wal = Path(str(world["db"]) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed
    assert not world["sock"].exists()
    conn = apsw.Connection(str(world["db"]))
    assert conn.execute("PRAGMA integrity_check").get == "ok"
    conn.close()


def test_daemon_stop__sigterm_with_idle_keepalive_connections_exits_0_at_once(world):
    """An httpx client keeping its pooled connection and a raw socket sitting idle: stop
    does not wait on them (it used to wait forever), nor for the grace of requests in
    flight, since there are none."""
    proc = start(world)
    raw = None
    try:
        wait_for(world["notify"], "READY=1")
        with pos_client(world) as pos:
            assert pos.get("/v1/health").status_code == 200  # its connection stays pooled
            raw = idle_socket(world)
            proc.send_signal(signal.SIGTERM)
            wait_for(world["notify"], "STOPPING=1")
            assert proc.wait(STOP_GRACE_S - 5) == 0, world["log"].read_text()
            assert raw.recv(1) == b""  # the daemon closed it
    finally:
        if raw is not None:
            raw.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert_checkpointed_and_intact(world)


def test_daemon_stop__a_payment_in_flight_is_answered_before_the_daemon_exits(world):
    """SIGTERM while a payment waits for the customer's card, with an idle keep-alive
    connection open beside it: the card comes, the payment is approved and answered
    (Connection: close), the daemon checkpoints and exits 0 inside TimeoutStopSec."""
    devices: SimDeviceServer = world["devices"]
    proc = start(world)
    raw = None
    answers: list[httpx.Response | Exception] = []

    def pay() -> None:
        with pos_client(world) as c:
            try:
                body = {"amount_minor": 900, "currency": "EUR", "idempotency_key": "in-flight"}
                answers.append(c.post("/v1/payments", json=body))
            except httpx.HTTPError as exc:
                answers.append(exc)

    payment = threading.Thread(target=pay)
    try:
        wait_for(world["notify"], "READY=1")
        with pos_client(world) as pos:
            assert pos.get("/v1/health").status_code == 200  # pooled, idle from here on
            raw = idle_socket(world)
            payment.start()
            asked = devices.wait_received("POST", CARD_READ_PATH, timeout_s=20)
            assert asked, "the payment never asked for a card"
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            wait_for(world["notify"], "STOPPING=1")
            assert raw.recv(1) == b""  # idle: closed at once, not after the payment
            devices.insert_test_card("visa")
            payment.join(TIMEOUT_STOP_S)
            remaining = TIMEOUT_STOP_S - (time.monotonic() - signalled)
            assert proc.wait(remaining) == 0, world["log"].read_text()
    finally:
        if raw is not None:
            raw.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if payment.is_alive():
            payment.join(10)
    [answer] = answers
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 200, answer.text
    assert (answer.json()["status"], answer.json()["decision"]) == ("COMPLETED", "approved")
    assert answer.headers["connection"] == "close"
    assert_checkpointed_and_intact(world)
