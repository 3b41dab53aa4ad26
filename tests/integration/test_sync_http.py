"""The sync service through HTTP: `tillflow cloud serve --port 0` as a process on a
database of its own, a terminal signing with sync.signing over httpx, and the operator
commands (`tillflow cloud enroll-token|device|command|audit`) on the same database."""

from __future__ import annotations

import gzip
import json
import os
import selectors
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from conftest import NewDatabase
from sync_memory import Terminal, outbox_entry

from cloud.sync.postgres import load_migrations
from edge.cli import main
from edge.engine.clock import SystemClock
from sync import signing, wire

START_TIMEOUT_S = 60


@pytest.fixture
def sync_url(new_database: NewDatabase) -> str:
    """A new, empty database of this test's own, dropped when it ends."""
    return new_database()


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, key_file: Path, log: Path) -> None:
        self.proc, self.url, self.key_file, self.log = proc, url, key_file, log


def start(sync_url: str, key_file: Path, *extra: str) -> Server:
    """``tillflow cloud serve --port 0``, once it answers; its stderr goes to a file
    beside the key (a pipe nobody reads would fill and stall it)."""
    cmd = [sys.executable, "-m", "edge.cli", "cloud", "serve", "--database-url", sync_url]
    cmd += ["--port", "0", "--signing-key", str(key_file), *extra]
    log = key_file.with_name(key_file.name + ".serve.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + START_TIMEOUT_S
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                proc.kill()
                proc.communicate(timeout=10)
                raise AssertionError(f"no 'listening on' line; stderr: {log.read_text()}")
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                proc.communicate(timeout=10)
                raise AssertionError(f"serve exited {proc.returncode}: {log.read_text()}")
            line += chunk
    text = line.decode().strip()
    assert text.startswith("listening on http://127.0.0.1:"), text
    server = Server(proc, text.removeprefix("listening on "), key_file, log)
    # the socket is listening already; the first request waits for the app to start
    with httpx.Client(base_url=server.url, timeout=START_TIMEOUT_S) as client:
        assert client.get("/v1/health").status_code == 200
    return server


def stop(server: Server) -> None:
    """SIGTERM: a graceful stop, exit status 0."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.communicate(timeout=30)
        assert server.proc.returncode == 0, server.log.read_text()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate(timeout=10)


@pytest.fixture
def server(sync_url: str, tmp_path: Path) -> Iterator[Server]:
    s = start(sync_url, tmp_path / "keys" / "control-plane.key")
    try:
        yield s
    finally:
        stop(s)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["cloud", *argv])
    return code, capsys.readouterr().out


def enroll_over_http(client: httpx.Client, token: str) -> Terminal:
    term = Terminal(SystemClock())
    answer = client.post("/v1/enroll", **term.enroll_request(token))
    assert answer.status_code == 200, answer.text
    term.device_id = answer.json()["device_id"]
    return term


def post_sync(client: httpx.Client, term: Terminal, request: dict[str, Any]) -> httpx.Response:
    _, path, headers, body = term.signed(request)
    return client.post(path, content=body, headers=headers)


def test_http__enroll_sync_commands_and_the_operator_commands(server, client, sync_url, capsys):
    key_file = server.key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    health = client.get("/v1/health").json()
    assert health["ok"] and health["schema_versions"]["sync"] == len(load_migrations())
    db = ["--database-url", sync_url]
    code, out = cli(
        capsys, "enroll-token", "create", "--store", "s-1", "--group", "g", *db, "--json"
    )
    token = json.loads(out)
    assert code == 0 and (token["store"], token["group"]) == ("s-1", "g")
    term = enroll_over_http(client, token["token"])
    pinned = client.post("/v1/enroll", **Terminal(SystemClock()).enroll_request(token["token"]))
    assert pinned.status_code == 401 and pinned.json()["error"]["code"] == "invalid_token"

    request = term.request(
        [outbox_entry(1), outbox_entry(2, content_hash="f" * 64), outbox_entry(3)],
        term.grow_audit(4),
    )
    answer = post_sync(client, term, request)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [r["status"] for r in body["results"]] == ["applied", "rejected", "applied"]
    assert (body["outbox_through"], body["audit_through"]) == (3, 4)

    doc = server.key_file.parent / "config.yaml"
    doc.write_text("offline_limit_minor: 5000\n")
    keyarg = ["--signing-key", str(key_file)]
    code, out = cli(capsys, "command", "send", "--device", term.device_id, "--action",
                    "update_config", "--document", str(doc), *db, *keyarg, "--json")  # fmt: skip
    queued = json.loads(out)
    assert code == 0 and queued["seq"] == 1 and queued["document"]["version"] == 1
    answer = post_sync(client, term, term.request())
    [env] = answer.json()["commands"]
    public = signing.load_public(signing.public_text(signing.load_private(key_file.read_bytes())))
    command = signing.open_envelope(public, wire.Envelope(**env))
    assert command.document and command.document.content == {"offline_limit_minor": 5000}

    code, out = cli(capsys, "device", "list", *db, "--json")
    [row] = json.loads(out)
    assert (row["device_id"], row["store"], row["status"]) == (term.device_id, "s-1", "active")
    assert row["last_seen_at"] and row["storage_state"] == "ok"
    code, out = cli(capsys, "audit", "verify", "--device", term.device_id, *db)
    assert code == 0 and "4 rows verified" in out
    with psycopg.connect(sync_url) as conn:
        conn.execute("UPDATE device_audit SET hash = repeat('0', 64) WHERE seq = 2")
    code, out = cli(capsys, "audit", "verify", "--device", term.device_id, *db)
    assert code == 4 and "at seq 2" in out

    code, out = cli(capsys, "device", "revoke", term.device_id, *db)
    assert code == 0 and "revoked" in out
    answer = post_sync(client, term, term.request())
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "device_revoked"


def test_http__bad_input_is_never_a_5xx_and_always_the_error_shape(server, client, capsys):
    code, out = cli(capsys, "enroll-token", "create", "--store", "s", "--database-url",
                    server_db(server), "--json")  # fmt: skip
    assert code == 0
    term = enroll_over_http(client, json.loads(out)["token"])
    good = json.dumps(term.request([outbox_entry(1)])).encode()

    def signed(body: bytes, **headers: str) -> httpx.Response:
        h = term.sign(body, gzipped=False) | headers
        return client.post("/v1/sync", content=body, headers=h)

    cases = {
        "unsigned": client.post("/v1/sync", content=gzip.compress(good)),
        "malformed json": signed(b"{nope"),
        "wrong content type": signed(b"<xml/>", **{"content-type": "text/xml"}),
        "bad gzip": signed(b"\x1f\x8b\x08\x00garbage", **{"content-encoding": "gzip"}),
        "truncated gzip": signed(gzip.compress(good)[:-10], **{"content-encoding": "gzip"}),
        "unknown kind": signed(b'{"kind": "sync_request_v7", "protocol_version": 1}'),
        "old version": signed(json.dumps(term.request() | {"protocol_version": 99}).encode()),
        "huge body": client.post("/v1/sync", content=b" " * (wire.MAX_BATCH_BYTES + 1)),
        "huge enroll": client.post("/v1/enroll", content=b"{" * 100_000),
        "enroll garbage": client.post("/v1/enroll", content=b"\xff\xfe"),
        "unknown route": client.get("/v1/secrets"),
        "wrong method": client.get("/v1/sync"),
        "root": client.get("/"),
        "docs": client.get("/docs"),
    }
    for name, answer in cases.items():
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
        error = answer.json()["error"]
        assert set(error) == {"code", "message", "field"} and error["code"], name
    assert cases["unknown route"].status_code == 404
    assert cases["wrong method"].status_code == 405
    assert cases["huge body"].status_code == 413
    assert cases["unsigned"].json()["error"]["code"] == "missing_signature"


def server_db(server: Server) -> str:
    argv = server.proc.args
    assert isinstance(argv, list)
    return str(argv[argv.index("--database-url") + 1])


def test_http__the_database_going_away_is_503_with_retry_after_then_it_recovers(
    server, client, sync_url, pg_server, capsys
):
    code, out = cli(capsys, "enroll-token", "create", "--store", "s", "--database-url",
                    sync_url, "--json")  # fmt: skip
    assert code == 0
    term = enroll_over_http(client, json.loads(out)["token"])
    name = sync_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )
    try:
        answer = post_sync(client, term, term.request([outbox_entry(1)]))
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "unavailable"
        assert int(answer.headers["retry-after"]) >= 1
        assert client.get("/v1/health").status_code == 503
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    deadline = time.monotonic() + 60
    while True:  # the pool reconnects on its own backoff; each try is bounded
        answer = post_sync(client, term, term.request([outbox_entry(1)]))
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        assert answer.status_code == 503, answer.text
    assert answer.status_code == 200 and answer.json()["outbox_through"] == 1


def test_http__two_workers_serve_one_socket(sync_url, tmp_path):
    server = start(sync_url, tmp_path / "k.key", "--workers", "2")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert all(c.get("/v1/health").json()["ok"] for _ in range(4))
    finally:
        stop(server)


def test_cli__the_commands_say_what_is_missing(capsys, tmp_path, sync_url):
    # (No database given is no longer missing: the embedded one is used, as
    # tests/integration/test_embedded.py shows.)
    missing = tmp_path / "none.key"
    code = main(["cloud", "command", "send", "--device", "d", "--action", "request_health",
                 "--database-url", sync_url, "--signing-key", str(missing)])  # fmt: skip
    assert code == 1 and "no control-plane signing key" in capsys.readouterr().err
    assert main(["cloud", "audit", "verify", "--device", "dev_x", "--database-url", sync_url]) == 1
    assert "no device dev_x" in capsys.readouterr().err


def test_cli__tillflow_database_url_is_the_default_database(sync_url, capsys, monkeypatch):
    monkeypatch.setenv("TILLFLOW_DATABASE_URL", sync_url)
    code, out = cli(capsys, "enroll-token", "create", "--store", "env-store", "--json")
    assert code == 0 and json.loads(out)["store"] == "env-store"
    code, out = cli(capsys, "device", "list")
    assert (code, out.strip()) == (0, "no devices")
