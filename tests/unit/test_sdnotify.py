"""sd_notify over a real AF_UNIX datagram socket, as systemd would receive it."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.terminal.service.sdnotify import Notifier, Watchdog

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Upper bound on any single wait for a datagram: generous, so a loaded CI machine does
# not fail the suite; a passing run never waits this long.
_RECV_TIMEOUT_S = 5.0


class Systemd:
    """The receiving end of NOTIFY_SOCKET: what systemd's manager reads."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.notify_socket, **extra}

    def receive(self, timeout: float = _RECV_TIMEOUT_S) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def receive_or_none(self, timeout: float) -> bytes | None:
        try:
            return self.receive(timeout)
        except TimeoutError:
            return None

    def drain(self) -> list[bytes]:
        """Every datagram already queued, without waiting."""
        received = []
        self.sock.setblocking(False)
        try:
            while True:
                received.append(self.sock.recv(4096))
        except BlockingIOError:
            return received


def _actions(caplog: pytest.LogCaptureFixture) -> list[str | None]:
    return [getattr(record, "action", None) for record in caplog.records]


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    if len(str(tmp_path / "notify.sock")) <= _MAX_SOCKET_PATH:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="sd"))  # under /tmp: short enough
    try:
        yield short
    finally:
        shutil.rmtree(short)


@pytest.fixture
def systemd(socket_dir: Path) -> Iterator[Systemd]:
    path = socket_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Systemd(sock, str(path))


@pytest.fixture
def abstract_systemd() -> Iterator[Systemd]:
    name = f"tillflow-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Systemd(sock, "@" + name)


@pytest.fixture
def notifier(systemd: Systemd) -> Iterator[Notifier]:
    with Notifier.from_environment(systemd.environ()) as notifier:
        yield notifier


def test_ready__sends_ready_and_status(notifier: Notifier, systemd: Systemd) -> None:
    assert notifier.enabled
    assert notifier.ready()
    assert systemd.receive() == b"READY=1\n"
    assert notifier.ready(status="Listening on /run/tillflow/edge.sock")
    assert systemd.receive() == b"READY=1\nSTATUS=Listening on /run/tillflow/edge.sock\n"


def test_status__sends_one_line(notifier: Notifier, systemd: Systemd) -> None:
    assert notifier.status("3 runs pending sync")
    assert systemd.receive() == b"STATUS=3 runs pending sync\n"


def test_status__newlines_and_nul_cannot_forge_assignments(
    notifier: Notifier, systemd: Systemd
) -> None:
    assert notifier.status("acquirer said:\nREADY=1\0")
    assert systemd.receive() == b"STATUS=acquirer said: READY=1 \n"


def test_stopping__sends_stopping_and_status(notifier: Notifier, systemd: Systemd) -> None:
    assert notifier.stopping()
    assert systemd.receive() == b"STOPPING=1\n"
    assert notifier.stopping(status="finishing step authorize")
    assert systemd.receive() == b"STOPPING=1\nSTATUS=finishing step authorize\n"


def test_reload__sends_reloading_with_monotonic_usec_then_ready(
    notifier: Notifier, systemd: Systemd
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading = systemd.receive()
    prefix = b"RELOADING=1\nMONOTONIC_USEC="
    assert reloading.startswith(prefix)
    assert reloading.endswith(b"\n")
    assert before <= int(reloading[len(prefix) : -1]) <= after

    assert notifier.reloaded()
    assert systemd.receive() == b"READY=1\n"


def test_watchdog_ping__sends_watchdog(notifier: Notifier, systemd: Systemd) -> None:
    assert notifier.watchdog_ping()
    assert systemd.receive() == b"WATCHDOG=1\n"


def test_notify__sends_fields_in_order(notifier: Notifier, systemd: Systemd) -> None:
    assert notifier.notify(STATUS="degraded", ERRNO="5")
    assert systemd.receive() == b"STATUS=degraded\nERRNO=5\n"


@pytest.mark.parametrize("fields", [{}, {"status": "lower-case"}])
def test_notify__rejects_malformed_fields(notifier: Notifier, fields: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        notifier.notify(**fields)


def test_abstract_namespace_socket__receives_messages(abstract_systemd: Systemd) -> None:
    with Notifier.from_environment(abstract_systemd.environ()) as notifier:
        assert notifier.enabled
        assert notifier.ready(status="up")
    assert abstract_systemd.receive() == b"READY=1\nSTATUS=up\n"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_not_under_systemd__every_method_is_a_no_op(environ: dict[str, str]) -> None:
    notifier = Notifier.from_environment(environ)
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.reloading()
    assert not notifier.reloaded()
    assert not notifier.watchdog_ping()
    assert not notifier.notify(READY="1")
    watchdog = Watchdog(notifier)
    assert not watchdog.enabled
    watchdog.start()  # nothing to start
    watchdog.alive()
    watchdog.stop()


def test_unsupported_socket_address__disables_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="edge.terminal.service.sdnotify"):
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "relative/notify.sock"})
    assert not notifier.enabled
    assert _actions(caplog) == ["sd_notify_unsupported_socket"]


def test_from_environment__none_reads_os_environ(
    systemd: Systemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.notify_socket)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with Notifier.from_environment() as notifier:
        assert notifier.enabled
        assert notifier.watchdog_interval_s == 15.0


def test_watchdog_usec__interval_is_half_the_period(systemd: Systemd) -> None:
    environ = systemd.environ(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid()))
    assert Notifier.from_environment(environ).watchdog_interval_s == 15.0
    # WATCHDOG_PID is optional (sd_watchdog_enabled(3)): then the watchdog is ours.
    environ = systemd.environ(WATCHDOG_USEC="2000000")
    assert Notifier.from_environment(environ).watchdog_interval_s == 1.0


@pytest.mark.parametrize(
    "extra",
    [
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
        {},
    ],
    ids=["pid-mismatch", "pid-malformed", "usec-malformed", "usec-zero", "absent"],
)
def test_watchdog__disabled_unless_meant_for_this_process(
    systemd: Systemd, extra: dict[str, str]
) -> None:
    with Notifier.from_environment(systemd.environ(**extra)) as notifier:
        assert notifier.enabled  # notifications still work, only the watchdog is off
        assert notifier.watchdog_interval_s is None
        watchdog = Watchdog(notifier)
        assert not watchdog.enabled
        watchdog.alive()
        watchdog.start()
        watchdog.stop()
    assert systemd.drain() == []


def test_send_failure__returns_false_logs_once_and_recovers(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = socket_dir / "gone.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    with Notifier(str(path)) as notifier, receiver:
        assert notifier.ready()
        receiver.close()
        path.unlink()  # systemd went away

        with caplog.at_level(logging.INFO, logger="edge.terminal.service.sdnotify"):
            assert not notifier.status("one")
            assert not notifier.watchdog_ping()
            assert not notifier.stopping()
        assert _actions(caplog) == ["sd_notify_send_failed"]

        caplog.clear()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as back:
            back.bind(str(path))
            with caplog.at_level(logging.INFO, logger="edge.terminal.service.sdnotify"):
                assert notifier.status("back")
            back.settimeout(_RECV_TIMEOUT_S)
            assert back.recv(4096) == b"STATUS=back\n"
        assert _actions(caplog) == ["sd_notify_recovered"]


def test_watchdog__rejects_non_positive_intervals(notifier: Notifier) -> None:
    with pytest.raises(ValueError):
        Watchdog(notifier, 0)
    with pytest.raises(ValueError):
        Watchdog(notifier, 1.0, stale_after_s=-1)


def test_watchdog__pings_while_alive_and_stops_when_the_loop_hangs(
    notifier: Notifier, systemd: Systemd, caplog: pytest.LogCaptureFixture
) -> None:
    interval = 0.05
    watchdog = Watchdog(notifier, interval)
    hang = threading.Event()
    turned = threading.Event()

    def main_loop() -> None:
        while True:
            watchdog.alive()
            turned.set()
            if hang.wait(interval / 10):  # a turn's worth of work
                return

    loop = threading.Thread(target=main_loop, name="main-loop")
    loop.start()
    try:
        assert turned.wait(_RECV_TIMEOUT_S)
        with caplog.at_level(logging.ERROR, logger="edge.terminal.service.sdnotify"), watchdog:
            for _ in range(5):
                assert systemd.receive() == b"WATCHDOG=1\n"

            hang.set()  # the main loop hangs: alive() is no longer called
            loop.join()
            systemd.drain()  # pings already sent before the hang was noticed
            # At most the one ping whose tick read the clock just before the hang,
            # then nothing: wait several intervals to be sure the stream stopped.
            late = []
            while (datagram := systemd.receive_or_none(timeout=6 * interval)) is not None:
                late.append(datagram)
                assert len(late) <= 1, late
    finally:
        hang.set()
        loop.join()
    assert _actions(caplog) == ["watchdog_starved"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watchdog__staleness_follows_the_injected_clock(
    notifier: Notifier, systemd: Systemd, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    # The thread wakes every 10 ms of real time; alive-ness is judged on the fake clock.
    watchdog = Watchdog(notifier, 0.01, stale_after_s=15.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="edge.terminal.service.sdnotify"), watchdog:
        # Never alive yet: no ping, and no alarm before stale_after_s has passed.
        assert systemd.receive_or_none(timeout=0.1) is None
        watchdog.alive()
        assert systemd.receive() == b"WATCHDOG=1\n"

        clock.now += 14.0  # a slow step, still within stale_after_s
        systemd.drain()
        assert systemd.receive() == b"WATCHDOG=1\n"

        clock.now += 2.0  # 16 s since alive(): hung
        systemd.drain()
        assert systemd.receive_or_none(timeout=0.1) in (None, b"WATCHDOG=1\n")  # in flight
        assert systemd.receive_or_none(timeout=0.1) is None

        watchdog.alive()  # the loop came back before systemd's deadline
        assert systemd.receive() == b"WATCHDOG=1\n"
    assert _actions(caplog) == ["watchdog_starved", "watchdog_resumed"]


def test_watchdog__start_is_idempotent_and_restartable(
    notifier: Notifier, systemd: Systemd
) -> None:
    watchdog = Watchdog(notifier, 0.01, stale_after_s=60)  # staleness is not under test
    watchdog.alive()
    watchdog.start()
    watchdog.start()
    assert systemd.receive() == b"WATCHDOG=1\n"
    watchdog.stop()
    watchdog.stop()
    assert [t for t in threading.enumerate() if t.name == "sd-watchdog"] == []
    systemd.drain()
    watchdog.alive()
    with watchdog:
        assert systemd.receive() == b"WATCHDOG=1\n"
