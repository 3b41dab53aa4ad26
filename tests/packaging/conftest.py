"""The frozen binary under test, and a terminal's world to run it in.

The binary is ``dist/tillflow-edge/tillflow-edge`` (``make test`` builds it first; or
name another with ``TILLFLOW_EDGE_BINARY``). Without it these tests skip with a hint,
except under ``CI=true``, where a missing binary fails them.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.devices import SimDeviceServer

REPO = Path(__file__).resolve().parents[2]
BINARY_ENV = "TILLFLOW_EDGE_BINARY"
#: Upper bound of any wait for the daemon; reached only when something is broken.
WAIT_S = 30.0


@pytest.fixture(scope="session")
def binary() -> Path:
    path = Path(os.environ.get(BINARY_ENV) or REPO / "dist" / "tillflow-edge" / "tillflow-edge")
    if not os.access(path, os.X_OK):
        message = f"no frozen binary at {path}: run `make package` (make test does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tfp-"))  # AF_UNIX paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def config_text(data_dir: Path, socket_path: Path, devices_url: str, acquirer_url: str) -> str:
    return (
        f"device_id: T-PKG\n"
        f"data_dir: {data_dir}\n"
        f"socket_path: {socket_path}\n"
        f"log_format: json\n"
        f"risk: {{online_random_percent: 0}}\n"
        f"peripherals:\n"
        f"  card_reader: {{url: '{devices_url}', timeout_s: 5}}\n"
        f"  printer: {{url: '{devices_url}'}}\n"
        f"  link: {{url: '{devices_url}/link'}}\n"
        f"  acquirer: {{url: '{acquirer_url}', timeout_s: 3}}\n"
    )


@pytest.fixture
def sims() -> Iterator[tuple[SimDeviceServer, SimAcquirer]]:
    with SimDeviceServer() as devices, SimAcquirer() as acquirer:
        devices.set_link(False)  # a terminal offline: payments approved within the limits
        yield devices, acquirer


def notify_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(WAIT_S)
    return s


def wait_for(notify: socket.socket, field: str) -> str:
    while True:
        msg = notify.recv(4096).decode()  # bounded by the socket's timeout
        if field in msg.splitlines():
            return msg


def api(sock: Path) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://pos", timeout=20
    )


def pay(devices: SimDeviceServer, sock: Path, key: str, amount: int = 900) -> dict[str, Any]:
    """A test card inserted, then one payment through the local API."""
    devices.insert_test_card("visa")
    with api(sock) as c:
        r = c.post(
            "/v1/payments", json={"amount_minor": amount, "currency": "EUR", "idempotency_key": key}
        )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result
