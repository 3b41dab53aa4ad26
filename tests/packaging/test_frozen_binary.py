"""Smoke test of THE FROZEN BINARY (not the source): a terminal initialised in a temp
dir takes payments offline through its local API, is killed with SIGKILL mid-payment,
starts again, recovers the payment in flight, and its audit chain verifies."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import apsw
import httpx
from conftest import REPO, WAIT_S, api, config_text, notify_socket, pay, wait_for
from PyInstaller.archive.readers import CArchiveReader

from edge.terminal.drivers.devices_http import CARD_READ_PATH

# What the terminal binary must never contain (DESIGN: edge, sync and five deps only).
FORBIDDEN = ("cloud", "hwsim", "psycopg", "celery", "redis", "fastapi", "uvicorn", "pytest")


def run_binary(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env.pop("PYTHONPATH", None)  # the binary must not need the source tree
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=WAIT_S, env=env, cwd="/"
    )


def test_binary__reports_version_commit_and_build_date(binary):
    out = run_binary(binary, "--version")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("tillflow-edge 0.1.0 (commit ")
    assert "commit source" not in line and "built not built" not in line


def test_binary__holds_no_cloud_simulator_or_test_module(binary):
    archive = CArchiveReader(str(binary))
    pyz_names = [n for n in archive.toc if n.endswith(".pyz") or n == "PYZ-00.pyz"]
    from PyInstaller.archive.readers import ZlibArchiveReader

    modules: list[str] = []
    for name in pyz_names:
        pyz = archive.open_embedded_archive(name)
        assert isinstance(pyz, ZlibArchiveReader)
        modules += list(pyz.toc)
    assert "edge.terminal.service.daemon" in modules
    assert "edge.terminal.sale.payment_steps" in modules
    leaked = [m for m in modules if m.split(".")[0] in FORBIDDEN]
    assert leaked == []
    internal = {p.name.split(".")[0].split("-")[0] for p in binary.parent.glob("_internal/*")}
    assert not internal & set(FORBIDDEN)


def test_binary__config_check_reads_the_example_config(binary):
    out = run_binary(binary, "config", "check", str(REPO / "edge/terminal/edge.example.yaml"))
    assert out.returncode == 0, out.stderr
    assert "device T-0001" in out.stdout


def test_binary__offline_payments_survive_kill_9_mid_payment(binary, tmp_path, short_dir, sims):
    devices, acquirer = sims
    cfg = tmp_path / "edge.yaml"
    db = tmp_path / "data" / "terminal.db"
    sock = short_dir / "edge.sock"
    cfg.write_text(config_text(tmp_path / "data", sock, devices.url, acquirer.url))
    notify = notify_socket(short_dir / "notify")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env.pop("PYTHONPATH", None)
    env["NOTIFY_SOCKET"] = str(short_dir / "notify")
    log = tmp_path / "daemon.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as fh:
            return subprocess.Popen(
                [str(binary), "run", "--config", str(cfg)],
                env=env,
                cwd="/",
                stdout=subprocess.DEVNULL,
                stderr=fh,
            )

    proc = start()
    try:
        wait_for(notify, "READY=1")
        paid = [pay(devices, sock, f"pkg-{i}") for i in range(3)]
        assert [(p["status"], p["decision"]) for p in paid] == [("COMPLETED", "approved")] * 3

        # A fourth payment waits at the card reader: kill -9 while it is in flight.
        in_flight = threading.Thread(target=_pay_swallowing_the_kill, args=(sock,))
        in_flight.start()
        deadline = time.monotonic() + WAIT_S
        while sum(r == ("POST", CARD_READ_PATH) for r in devices.received) < 4:
            assert time.monotonic() < deadline, "the payment never reached the card reader"
            time.sleep(0.02)  # polling the simulator, another thread's external request
        proc.kill()
        proc.wait(WAIT_S)
        in_flight.join(WAIT_S)

        # The killed daemon's card read is still held open in the simulator and takes the
        # first card presented; the second is there for the resumed run.
        devices.insert_test_card("mastercard")
        devices.insert_test_card("mastercard")
        proc = start()
        ready = wait_for(notify, "READY=1")
        assert "recovered 1 run(s)" in ready, ready
        again = [pay(devices, sock, f"pkg-{i}") for i in range(3)]
        assert [p["run_id"] for p in again] == [p["run_id"] for p in paid]
        with api(sock) as c:
            fourth = c.post(
                "/v1/payments",
                json={"amount_minor": 900, "currency": "EUR", "idempotency_key": "pkg-kill"},
            ).json()
        assert (fourth["status"], fourth["decision"]) == ("COMPLETED", "approved")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        notify.close()

    assert acquirer.effects("authorize") == []  # offline: nothing went to the acquirer
    audit = run_binary(binary, "audit", "verify", "--db", str(db), "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert json.loads(audit.stdout)["ok"] is True
    outbox = json.loads(run_binary(binary, "outbox", "--db", str(db), "--json").stdout)
    assert outbox["depth"] == 4  # four offline sales waiting to be sent, none twice
    recover = run_binary(binary, "recover", "--db", str(db))
    assert recover.returncode == 0 and "recovered 0 run(s)" in recover.stdout
    conn = apsw.Connection(str(db))
    assert conn.execute("PRAGMA integrity_check").get == "ok"
    conn.close()


def _pay_swallowing_the_kill(sock: Path) -> None:
    # The daemon dies under this request: that is the point.
    with api(sock) as c, contextlib.suppress(httpx.HTTPError):
        c.post(
            "/v1/payments",
            json={"amount_minor": 900, "currency": "EUR", "idempotency_key": "pkg-kill"},
        )
