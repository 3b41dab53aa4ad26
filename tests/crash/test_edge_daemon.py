"""The terminal daemon as a real process: READY over NOTIFY_SOCKET, a payment through the
POS socket, SIGTERM -> STOPPING and exit 0 with the WAL checkpointed; kill -9 and restart."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import httpx
import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.devices import SimDeviceServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tfd-"))  # AF_UNIX paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def daemon_world(
    tmp_path: Path, short_dir: Path, *, device_id: str = "T-D1", card_timeout_s: float = 5
) -> Iterator[dict]:
    """Simulated devices and acquirer, a daemon config beside them, a NOTIFY_SOCKET."""
    with SimDeviceServer() as devices, SimAcquirer() as acquirer:
        cfg = tmp_path / "edge.yaml"
        cfg.write_text(
            f"device_id: {device_id}\n"
            f"data_dir: {tmp_path / 'data'}\n"
            f"socket_path: {short_dir / 'edge.sock'}\n"
            f"log_format: json\n"
            f"risk: {{online_random_percent: 0}}\n"
            f"peripherals:\n"
            f"  card_reader: {{url: '{devices.url}', timeout_s: {card_timeout_s}}}\n"
            f"  printer: {{url: '{devices.url}'}}\n"
            f"  link: {{url: '{devices.url}/link'}}\n"
            f"  acquirer: {{url: '{acquirer.url}', timeout_s: 3}}\n"
        )
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(short_dir / "notify"))
        notify.settimeout(30)
        try:
            yield {
                "cfg": cfg,
                "devices": devices,
                "acquirer": acquirer,
                "notify": notify,
                "sock": short_dir / "edge.sock",
                "db": tmp_path / "data" / "terminal.db",
                "notify_path": str(short_dir / "notify"),
                "log": tmp_path / "daemon.log",
            }
        finally:
            notify.close()


@pytest.fixture
def world(tmp_path, short_dir) -> Iterator[dict]:
    with daemon_world(tmp_path, short_dir) as w:
        yield w


def start(world) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": world["notify_path"], "PYTHONPATH": str(REPO)}
    with open(world["log"], "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "edge", "run", "--config", str(world["cfg"])],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def wait_for(notify: socket.socket, field: str) -> str:
    while True:
        msg = notify.recv(4096).decode()  # bounded by the socket's timeout
        if field in msg.splitlines():
            return msg


def pay(world, key: str, amount: int = 900, cvv: str = "123") -> dict:
    insert = {"card": "visa", "cvv": cvv}
    httpx.post(f"{world['devices'].url}/control/insert", json=insert).raise_for_status()
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(world["sock"])), timeout=20) as c:
        r = c.post(
            "http://pos/v1/payments",
            json={"amount_minor": amount, "currency": "EUR", "idempotency_key": key},
        )
    assert r.status_code == 200, r.text
    return r.json()


def test_daemon__ready_serves_a_payment_and_stops_gracefully_on_sigterm(world):
    proc = start(world)
    try:
        ready = wait_for(world["notify"], "READY=1")
        assert "STATUS=serving on" in ready
        run = pay(world, "d-1")
        assert (run["status"], run["decision"]) == ("COMPLETED", "approved")
        proc.send_signal(signal.SIGTERM)
        wait_for(world["notify"], "STOPPING=1")
        assert proc.wait(20) == 0, world["log"].read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    wal = Path(str(world["db"]) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed
    assert not world["sock"].exists()


def test_daemon__restarts_after_kill_9_with_its_payments_intact(world):
    proc = start(world)
    try:
        wait_for(world["notify"], "READY=1")
        first = pay(world, "k-1")
        proc.kill()  # SIGKILL: no goodbye
        proc.wait(10)
        proc = start(world)  # a stale socket file is left behind: the daemon replaces it
        wait_for(world["notify"], "READY=1")
        again = pay(world, "k-1")  # the POS retries after the restart: the same payment
        assert again["run_id"] == first["run_id"]
        assert len(world["acquirer"].effects("authorize")) <= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    conn = apsw.Connection(str(world["db"]))
    assert conn.execute("PRAGMA integrity_check").get == "ok"
    conn.close()


def test_daemon__sighup_reloads_the_risk_limits_without_dropping_runs(world):
    world["devices"].set_link(False)  # offline: the floor limit decides
    proc = start(world)
    try:
        wait_for(world["notify"], "READY=1")
        assert pay(world, "h-1", amount=3_000)["reason"] == "floor_limit"  # default 2500
        text = (
            world["cfg"]
            .read_text()
            .replace(
                "risk: {online_random_percent: 0}",
                "risk: {online_random_percent: 0, floor_limit_minor: 5000}",
            )
        )
        world["cfg"].write_text(text)
        proc.send_signal(signal.SIGHUP)
        wait_for(world["notify"], "RELOADING=1")
        wait_for(world["notify"], "READY=1")
        run = pay(world, "h-2", amount=3_000)
        assert (run["decision"], run["channel"]) == ("approved", "offline")
        assert pay(world, "h-1", amount=3_000)["reason"] == "floor_limit"  # old run kept
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_daemon__logs_database_and_wal_hold_no_card_data(world):
    from carddata_scan import describe, scan, sqlite_files

    cvv = "8642"
    proc = start(world)
    try:
        wait_for(world["notify"], "READY=1")
        pay(world, "s-1", amount=3_000, cvv=cvv)
        world["devices"].set_link(False)
        pay(world, "s-2", amount=1_000, cvv=cvv)
    finally:
        proc.kill()  # leave the WAL as a crash would
        proc.wait(10)
    db_files = sqlite_files(world["db"])
    pan = "4111111111111111"
    findings = scan([*db_files, world["log"]], {"pan": pan})
    # A 4-digit CVV turns up by chance in hex hashes and timestamps; a leak would be a
    # value in the stored JSON, a 'cvv' field, or the number in a log line.
    findings += scan(db_files, {"cvv as a JSON string": f'"{cvv}"', "cvv field": "cvv"})
    findings += scan([world["log"]], {"cvv": cvv})
    assert findings == [], describe(findings)


def test_daemon__a_full_budget_answers_507_and_the_daemon_keeps_serving_health(world):
    """Online sales until the database budget is full: the POS gets 507 storage_full, the
    main loop goes on turning (recovering the interrupted run may fail for want of room;
    that is recorded, not fatal), health answers, and SIGTERM still stops it cleanly."""
    cfg = world["cfg"]
    cfg.write_text(
        cfg.read_text().replace("online_random_percent: 0", "online_random_percent: 100")
        + "db_budget_mb: 0.5\nstorage_high_water_percent: 99\n"
    )
    proc = start(world)
    try:
        wait_for(world["notify"], "READY=1")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(world["sock"])), timeout=20) as c:
            refused = None
            for i in range(2000):
                httpx.post(
                    f"{world['devices'].url}/control/insert", json={"card": "visa", "cvv": "123"}
                ).raise_for_status()
                r = c.post(
                    "http://pos/v1/payments",
                    json={"amount_minor": 900, "currency": "EUR", "idempotency_key": f"f-{i}"},
                )
                if r.status_code != 200:
                    refused = r
                    break
            assert refused is not None and refused.status_code == 507, refused
            assert refused.json()["error"]["code"] == "storage_full"
            for _ in range(2):  # two reloads: at least one whole loop turn after the 507
                proc.send_signal(signal.SIGHUP)
                wait_for(world["notify"], "READY=1")
            assert proc.poll() is None, world["log"].read_text()
            assert '"action": "storage_full"' in world["log"].read_text()  # operators see it
            health = c.get("http://pos/v1/health")
            assert health.status_code == 200
            assert health.json()["storage"]["state"] == "full"
            assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, world["log"].read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    conn = apsw.Connection(str(world["db"]))
    assert conn.execute("PRAGMA integrity_check").get == "ok"
    conn.close()


def test_daemon__a_schedule_missed_while_it_was_down_runs_once_on_start(world):
    """The end-of-day settlement last fired two years ago (the terminal was off over
    New Year): the daemon fires it once on start, says so in READY, and no more."""
    cfg = world["cfg"]
    cfg.write_text(
        cfg.read_text()
        + "schedules:\n"
        + "  - {name: new-year, cron: '0 3 1 1 *', workflow: settlement, input: {}}\n"
    )
    data = world["db"].parent
    data.mkdir(parents=True)
    two_years_ago = time.time() - 2 * 366 * 86_400
    (data / "schedules.json").write_text(
        json.dumps({"version": 1, "last_fired": {"new-year": two_years_ago}})
    )
    proc = start(world)
    try:
        ready = wait_for(world["notify"], "READY=1")
        assert "caught up 1 schedule(s)" in ready
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, world["log"].read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    conn = apsw.Connection(str(world["db"]))
    runs = conn.execute(
        "SELECT status FROM workflow_runs WHERE workflow_type = 'settlement'"
    ).fetchall()
    conn.close()
    assert runs == [("COMPLETED",)]
    fired = json.loads((data / "schedules.json").read_text())["last_fired"]["new-year"]
    assert fired > two_years_ago  # recorded: a restart now would not fire it again
