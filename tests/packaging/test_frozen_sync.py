"""The frozen binary syncs: ``tillflow-edge enroll`` with a one-time token from the real
cloud (``tillflow cloud serve`` from source, on PostgreSQL), then ``tillflow-edge run``
uploads its offline sales and the cloud acknowledges them. The binary holds no cloud
code (``test_frozen_binary``): what it needs of sync is all inside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import services
from conftest import WAIT_S, config_text, notify_socket, pay, wait_for
from hwsim.syncrig import Cloud

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    name = f"tillflow_pkgsync_{uuid.uuid4().hex[:10]}"
    admin_url = services.postgres_admin_url()  # configured, else an embedded server
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL not reachable at {admin_url}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {admin_url}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    c = Cloud(url, tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_binary__enrolls_and_uploads_its_sales(binary, tmp_path, short_dir, sims, cloud):
    devices, acquirer = sims
    data = tmp_path / "data"
    cfg = tmp_path / "edge.yaml"
    sock = short_dir / "edge.sock"
    cfg.write_text(
        config_text(data, sock, devices.url, acquirer.url)
        + f"cloud: {{url: '{cloud.url}', sync_interval_s: 0.5}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env.pop("PYTHONPATH", None)

    token = cloud.enroll_token("store-pkg")
    out = subprocess.run(
        [str(binary), "enroll", "--config", str(cfg), "--token", token, "--json"],
        env=env, capture_output=True, text=True, timeout=WAIT_S, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    device = json.loads(out.stdout)["device_id"]
    key = data / "sync" / "device.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert token not in out.stdout + out.stderr
    # The token is single use: a second enrollment with it is refused, clearly.
    again = subprocess.run(
        [str(binary), "enroll", "--config", str(cfg), "--token", token],
        env=env, capture_output=True, text=True, timeout=WAIT_S, cwd="/",
    )  # fmt: skip
    assert again.returncode != 0 and again.stderr.strip(), again

    env["NOTIFY_SOCKET"] = str(short_dir / "notify")
    notify = notify_socket(short_dir / "notify")
    log = tmp_path / "daemon.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [str(binary), "run", "--config", str(cfg)],
            env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=fh,
        )  # fmt: skip
    try:
        wait_for(notify, "READY=1")
        paid = [pay(devices, sock, f"pkg-sync-{i}") for i in range(3)]
        assert all(p["decision"] == "approved" for p in paid)
        deadline = time.monotonic() + WAIT_S
        held: set[str] = set()
        while held != {p["run_id"] for p in paid}:
            assert time.monotonic() < deadline, f"not uploaded: {log.read_text()[-2000:]}"
            time.sleep(0.2)  # polling the cloud's database for the daemon's uploads
            with psycopg.connect(cloud.database_url) as conn:
                rows = conn.execute(
                    "SELECT payload->>'run_id' FROM sync_messages WHERE device_id = %s "
                    "AND topic = 'payment'",
                    (device,),
                ).fetchall()
            held = {r[0] for r in rows}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        notify.close()
    assert key.read_bytes().hex() not in log.read_text()
