"""The sync client in the terminal: documents the commands store come into force on the
real ``Terminal`` (and stay through a restart and a SIGHUP), the daemon's background
services (started after READY, joined before the terminal closes), ``SyncService``
(enroll from the config's token, then sync) and ``tillflow-edge enroll``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

from edge.engine import FakeClock
from edge.terminal.config import EdgeConfig
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service import daemon as daemon_mod
from edge.terminal.service.daemon import Daemon
from edge.terminal.service.terminal import Terminal
from sync import signing, wire
from sync.device import main as device_main
from sync.device.commands import CommandProcessor
from sync.device.identity import DeviceIdentity, load_identity
from sync.device.service import NOT_ENROLLED, SyncService

NOW = 2_000_000_000.0  # 2033: the test cards expire 3912
CP_KEY = signing.load_private(bytes(range(32)))
POLICY = {
    "version": 9,
    "name": "cloud",
    "rules": [{"id": "cap", "type": "amount_over", "max_minor": 1_500, "action": "decline"}],
}


def seal(seq: int, action: str, document: dict[str, Any] | None, device: str = "dev-1") -> Any:
    cmd = wire.Command(
        schema_version=1,
        command_id=f"c-{seq}",
        device_id=device,
        seq=seq,
        action=action,  # type: ignore[arg-type]
        issued_at=NOW,
        expires_at=NOW + 3600,
        document=None if document is None else wire.Document(**document),
    )
    return signing.seal(CP_KEY, cmd)


@pytest.fixture
def acquirer() -> Iterator[SimAcquirer]:
    with SimAcquirer() as sim:
        yield sim


class Till:
    def __init__(self, cfg: EdgeConfig, acquirer: SimAcquirer) -> None:
        self.clock = FakeClock(NOW)
        self.reader, self.link = SimCardReader(), SimNetworkLink(self.clock)
        self.http = HttpAcquirer(acquirer.url, link=self.link, timeout_s=2)
        peripherals = Peripherals(self.reader, SimPrinter(), self.http, self.link)
        self.terminal = Terminal(cfg, peripherals, clock=self.clock)
        ident = DeviceIdentity("dev-1", "S", None, signing.public_text(CP_KEY), "http://cp", NOW)
        self.commands = CommandProcessor(ident, self.terminal.store, self.terminal, self.clock)

    def pay(self, amount: int) -> dict[str, Any]:
        self.reader.insert(make_card("visa"))
        engine = self.terminal.engine
        return dict(
            engine.get(engine.start("payment", {"amount_minor": amount, "currency": "EUR"})).state
        )

    def close(self) -> None:
        self.terminal.close()
        self.http.close()


def _cfg(tmp_path: Path, **risk: Any) -> EdgeConfig:
    return EdgeConfig(
        device_id="T-1", data_dir=tmp_path / "data", risk={"online_random_percent": 0, **risk}
    )


def test_terminal__a_config_document_is_in_force_at_once_after_sighup_and_after_a_restart(
    tmp_path, acquirer
):
    till = Till(_cfg(tmp_path), acquirer)
    till.link.down()  # offline: the floor limit decides
    assert till.pay(2_000)["decision"] == "approved"  # the file's floor is 2500
    doc = {"kind": "config", "version": 3, "content": {"risk": {"floor_limit_minor": 1_000}}}
    (out,) = till.commands.handle_all([seal(1, "update_config", doc)])
    assert out.status == "applied"
    assert till.pay(2_000)["reason"] == "floor_limit"
    assert till.terminal.health()["config_version"] == 3
    till.terminal.reload(_cfg(tmp_path, velocity_max=9))  # SIGHUP: the file changed
    assert till.pay(2_000)["reason"] == "floor_limit"  # the document still overrides it
    till.close()
    again = Till(_cfg(tmp_path), acquirer)
    try:
        again.link.down()
        assert again.terminal.health()["config_version"] == 3
        assert again.pay(2_000)["reason"] == "floor_limit"
    finally:
        again.close()


def test_terminal__a_policy_document_above_the_files_comes_into_force(tmp_path, acquirer):
    till = Till(_cfg(tmp_path), acquirer)
    try:
        assert till.terminal.health()["policy_version"] is None
        assert till.pay(2_000)["decision"] == "approved"
        doc = {"kind": "policy", "version": 9, "content": POLICY}
        assert till.commands.handle_all([seal(1, "activate_policy", doc)])[0].status == "applied"
        health = till.terminal.health()
        assert (health["policy_version"], health["config_version"]) == (9, None)
        state = till.pay(2_000)
        assert (state["decision"], state["reason"]) == ("declined", "policy")
    finally:
        till.close()


# --- the daemon's background services ----------------------------------------------------


@pytest.fixture
def daemon_config(tmp_path, monkeypatch, acquirer) -> Callable[..., Daemon]:
    """A daemon on simulated hardware, in this thread, without touching the process's
    logging or signal handlers."""
    import shutil
    import tempfile

    sock_dir = Path(tempfile.mkdtemp(prefix="tf-sync-"))  # AF_UNIX paths must stay short
    monkeypatch.setattr(daemon_mod, "configure_logging", lambda fmt: None)
    monkeypatch.setattr(Daemon, "_signals", lambda self: None)

    def make(background, cloud: dict[str, Any] | None = None) -> Daemon:
        cfg = {
            "device_id": "T-1",
            "data_dir": str(tmp_path / "data"),
            "socket_path": str(sock_dir / "edge.sock"),
            "cloud": cloud,
        }
        path = tmp_path / "edge.yaml"
        path.write_text(yaml.safe_dump(cfg))
        clock = FakeClock(NOW)

        def peripherals(_: EdgeConfig) -> Peripherals:
            link = SimNetworkLink(clock)
            http = HttpAcquirer(acquirer.url, link=link, timeout_s=2)
            return Peripherals(SimCardReader(), SimPrinter(), http, link)

        return Daemon(path, peripherals=peripherals, clock=clock, background=background)

    yield make
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_daemon__background_services_run_in_threads_and_are_joined_before_the_close(
    daemon_config,
):
    seen: dict[str, Any] = {}

    def worker(terminal: Terminal, stop: threading.Event) -> None:
        seen["thread"] = threading.current_thread().name
        seen["ready"] = terminal.engine is not None
        stop.wait(30)
        seen["after_stop_depth"] = terminal.store.outbox_stats().depth  # not closed yet

    def stopper(terminal: Terminal, stop: threading.Event) -> None:
        stop.set()  # as SIGTERM would

    def broken(terminal: Terminal, stop: threading.Event) -> None:
        seen["terminal"] = terminal
        raise RuntimeError("boom")

    assert daemon_config([worker, broken, stopper]).run() == 0
    assert seen["thread"].startswith("tillflow-") and seen["thread"] != "MainThread"
    assert seen["after_stop_depth"] == 0
    assert seen["terminal"].last_error == "broken stopped: RuntimeError: boom"


def test_daemon__a_service_that_ignores_stop_delays_the_close_only_boundedly(
    daemon_config, monkeypatch
):
    monkeypatch.setattr(daemon_mod, "BACKGROUND_JOIN_S", 0.2)
    release = threading.Event()

    def stubborn(terminal: Terminal, stop: threading.Event) -> None:
        release.wait(30)

    def stopper(terminal: Terminal, stop: threading.Event) -> None:
        stop.set()

    try:
        assert daemon_config([stubborn, stopper]).run() == 0  # returned: not blocked
    finally:
        release.set()


# --- SyncService: enroll from the config, then sync -----------------------------------------


class Cloud:
    """Enrollment and sync endpoints on a mock transport."""

    def __init__(self, enroll_status: int = 201) -> None:
        self.enroll_status = enroll_status
        self.paths: list[str] = []
        self.synced = threading.Event()

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.paths.append(request.url.path)
        if request.url.path == "/v1/enroll":
            if self.enroll_status != 201:
                body = {"error": {"code": "token_expired", "message": "expired", "field": None}}
                return httpx.Response(self.enroll_status, json=body)
            resp = wire.EnrollResponse(
                protocol_version=1,
                device_id="dev-9",
                store="S",
                control_plane_key=signing.public_text(CP_KEY),
                server_time=NOW,
            )
            return httpx.Response(201, content=wire.encode(resp))
        chain = wire.ChainState(state="ok", head_seq=0)
        resp2 = wire.SyncResponse(protocol_version=1, server_time=NOW, chain=chain)
        self.synced.set()
        return httpx.Response(200, content=wire.encode(resp2))

    def factory(self, timeout: float) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handle))


def _terminal(tmp_path: Path, acquirer: SimAcquirer, cloud: dict[str, Any] | None) -> Terminal:
    clock = FakeClock(NOW)
    link = SimNetworkLink(clock)
    http = HttpAcquirer(acquirer.url, link=link, timeout_s=2)
    cfg = EdgeConfig(device_id="T-1", data_dir=tmp_path / "data", cloud=cloud)
    return Terminal(cfg, Peripherals(SimCardReader(), SimPrinter(), http, link), clock=clock)


def test_service__without_cloud_config_does_nothing(tmp_path, acquirer):
    terminal = _terminal(tmp_path, acquirer, None)
    try:
        cloud = Cloud()
        SyncService("1.0", http=cloud.factory)(terminal, threading.Event())
        assert cloud.paths == [] and terminal.last_error is None
    finally:
        terminal.close()


def test_service__not_enrolled_and_no_token_says_how_to_enroll(tmp_path, acquirer):
    terminal = _terminal(tmp_path, acquirer, {"url": "http://cp.test"})
    try:
        cloud = Cloud()
        SyncService("1.0", http=cloud.factory)(terminal, threading.Event())
        assert cloud.paths == [] and terminal.last_error == NOT_ENROLLED
    finally:
        terminal.close()


def test_service__enrolls_from_the_token_then_syncs_until_stopped(tmp_path, acquirer):
    terminal = _terminal(tmp_path, acquirer, {"url": "http://cp.test", "enroll_token": "t-1"})
    cloud = Cloud()
    stop = threading.Event()
    thread = threading.Thread(target=SyncService("1.0", http=cloud.factory), args=(terminal, stop))
    thread.start()
    try:
        assert cloud.synced.wait(10)
    finally:
        stop.set()
        thread.join(10)
        terminal.close()
    assert not thread.is_alive()
    assert cloud.paths[:2] == ["/v1/enroll", "/v1/sync"]
    identity = load_identity(tmp_path / "data")
    assert identity is not None and identity.device_id == "dev-9"


def test_service__a_refused_token_is_reported_and_not_tried_again(tmp_path, acquirer):
    terminal = _terminal(tmp_path, acquirer, {"url": "http://cp.test", "enroll_token": "t-1"})
    try:
        cloud = Cloud(enroll_status=403)
        SyncService("1.0", http=cloud.factory)(terminal, threading.Event())
        assert cloud.paths == ["/v1/enroll"]
        assert terminal.last_error is not None and "token_expired" in terminal.last_error
    finally:
        terminal.close()


# --- tillflow-edge ---------------------------------------------------------------------------


def test_main__lists_enroll_beside_every_terminal_command(capsys):
    with pytest.raises(SystemExit):
        device_main.main(["--help"])
    out = capsys.readouterr().out
    for name in ("run", "enroll", "config", "outbox", "recover", "audit", "health"):
        assert f"    {name}" in out


def test_main__enroll_without_url_or_token_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump({"device_id": "T-1", "data_dir": str(tmp_path / "d")}))
    assert device_main.main(["enroll", "--config", str(path)]) == 1
    assert "enroll needs --url and --token" in capsys.readouterr().err


def test_main__enroll_prints_the_device_and_stores_the_identity(tmp_path, capsys, monkeypatch):
    cloud = Cloud()
    real = httpx.Client
    monkeypatch.setattr(
        httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(cloud.handle))
    )
    path = tmp_path / "edge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "device_id": "T-1",
                "data_dir": str(tmp_path / "d"),
                "cloud": {"url": "http://cp.test"},
            }
        )
    )
    assert device_main.main(["enroll", "--config", str(path), "--token", "t-9"]) == 0
    assert "enrolled as device dev-9 (store S) at http://cp.test" in capsys.readouterr().out
    assert load_identity(tmp_path / "d") is not None
