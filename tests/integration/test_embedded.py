"""cloud.embedded: the embedded PostgreSQL starts, answers, stops; a running one is
reused (and outlives a ``kill -9`` of its holder); the ``filesystem://`` broker carries
a Celery message from one process to a worker in another."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from cloud import embedded
from cloud.embedded import EmbeddedPostgres, broker_url, database_url
from cloud.settings import CloudSettings

WAIT_S = 60.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def owner_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir whose embedded server is stopped however the test ends."""
    d = tmp_path / "cloud"
    yield d
    EmbeddedPostgres(d / "postgres").stop()


@pytest.fixture
def holder(data_dir: Path) -> Iterator[Callable[[], tuple[subprocess.Popen[str], str]]]:
    """Starts ``python -m cloud.embedded --data-dir DIR`` (a lease held in another
    process); returns it and the URL it printed."""
    procs: list[subprocess.Popen[str]] = []

    def start() -> tuple[subprocess.Popen[str], str]:
        cmd = [sys.executable, "-m", "cloud.embedded", "--data-dir", str(data_dir)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        procs.append(proc)
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("postgresql://"), proc.stderr.read() if proc.stderr else url
        return proc, url

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_embedded__starts_answers_and_stops(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    url = server.acquire()
    assert server.how == "started" and server.initialised
    assert url.startswith("postgresql://postgres@127.0.0.1:") and url.endswith("/tillflow")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (%s)", (42,))
        assert conn.execute("SELECT x FROM t").fetchone() == (42,)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    pid = int((server.data / "postmaster.pid").read_text().split()[0])
    # PostgreSQL refuses root: under root it runs as nobody, who owns the cluster.
    expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert owner_uid(pid) == expected
    assert server.data.stat().st_uid == expected

    assert server.release() is True  # the last lease: stopped
    assert not server.running()
    assert not answers(url)

    # Started again on the same cluster: the data is still there (no new initdb).
    again = EmbeddedPostgres(tmp_path / "pg", durable=False)
    url2 = again.acquire()
    try:
        assert again.how == "started" and not again.initialised
        with psycopg.connect(url2) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (42,)
    finally:
        again.release()


def test_database_url__is_the_configured_one_when_set(tmp_path: Path) -> None:
    settings = CloudSettings(database_url="postgresql://u@db.example:5432/x", data_dir=tmp_path)
    assert database_url(settings) == "postgresql://u@db.example:5432/x"
    assert not (tmp_path / "postgres").exists()  # nothing started, nothing made


def test_database_url__reuses_the_running_one_and_the_last_lease_stops_it(
    data_dir: Path, holder: Callable[[], tuple[subprocess.Popen[str], str]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    proc, url = holder()
    settings = CloudSettings(data_dir=data_dir)
    began = time.monotonic()
    assert database_url(settings) == url  # the same server, not a second one
    reuse_s = time.monotonic() - began
    said = capsys.readouterr().err
    assert "no TILLFLOW_DATABASE_URL: using an embedded PostgreSQL at " + url in said
    assert "reusing the running one" in said and str(data_dir / "postgres" / "data") in said
    print(f"reused in {reuse_s:.2f}s")

    embedded.release(settings)  # ours given back; the holder's still holds it
    assert answers(url)

    assert proc.stdin is not None
    proc.stdin.close()  # the holder lets go: the last lease, the server stops
    assert proc.wait(WAIT_S) == 0
    assert not answers(url)


def test_embedded__outlives_a_kill9_of_its_holder_and_is_reused(
    data_dir: Path, holder: Callable[[], tuple[subprocess.Popen[str], str]]
) -> None:
    proc, url = holder()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert answers(url)  # no one stopped it

    server = EmbeddedPostgres(data_dir / "postgres")
    assert server.acquire() == url
    assert server.how == "reused"
    users = (data_dir / "postgres" / "users").read_text()
    assert str(proc.pid) not in users  # the dead holder's lease was pruned
    assert server.release() is True  # so ours was the last
    assert not answers(url)


# --- the serverless broker -----------------------------------------------------------------

WORKER_APP = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from celery import Celery

    options = json.loads(os.environ["BROKER_OPTIONS"])
    app = Celery("h6probe", broker="filesystem://")
    app.conf.broker_transport_options = options
    app.conf.worker_hijack_root_logger = False

    @app.task(name="h6probe.record")
    def record(text):
        Path(os.environ["RECORD_FILE"]).write_text(f"{os.getpid()} {text}")
    """
)


def test_broker__is_the_configured_one_when_set(tmp_path: Path) -> None:
    broker = broker_url(CloudSettings(broker_url="redis://127.0.0.1:6379/3", data_dir=tmp_path))
    assert broker.url == "redis://127.0.0.1:6379/3" and not broker.embedded
    assert broker.transport_options == {}
    assert not (tmp_path / "broker").exists()


def test_broker__filesystem_carries_a_celery_message_to_a_worker_process(tmp_path: Path) -> None:
    import json

    from celery import Celery

    broker = broker_url(CloudSettings(data_dir=tmp_path / "cloud"))
    assert broker.url == "filesystem://" and broker.embedded
    for key in ("data_folder_in", "data_folder_out", "control_folder", "processed_folder"):
        assert Path(broker.transport_options[key]).is_dir()

    # The message is sent first, with no worker running: it waits in the folder.
    app = Celery("h6sender", broker=broker.url)
    app.conf.broker_transport_options = broker.transport_options
    app.send_task("h6probe.record", args=["hello through the folder"])
    queued = list(Path(broker.transport_options["data_folder_out"]).iterdir())
    assert len(queued) == 1

    (tmp_path / "h6probe.py").write_text(WORKER_APP)
    record = tmp_path / "record.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env.update(
        BROKER_OPTIONS=json.dumps(broker.transport_options),
        RECORD_FILE=str(record),
        PYTHONPATH=str(tmp_path),
    )
    cmd = [sys.executable, "-m", "celery", "-A", "h6probe", "worker", "--pool", "solo"]
    cmd += ["--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"]
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        wait_for(record.exists, f"the worker ran the task; log: {tmp_path / 'worker.log'}")
        pid, text = record.read_text().split(" ", 1)
        assert text == "hello through the folder"
        assert int(pid) == worker.pid != os.getpid()
        wait_for(
            lambda: not any(Path(broker.transport_options["data_folder_in"]).iterdir()),
            "the message consumed",
        )
    finally:
        worker.terminate()
        worker.wait(30)


def test_cloud_commands__with_no_database_given_use_the_embedded_one(tmp_path: Path) -> None:
    """An operator on embedded defaults (no TILLFLOW_DATABASE_URL) runs ``tillflow cloud``
    commands as they are: each starts the embedded server (or reuses the running one),
    writes, and stops it; what one wrote the next one reads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env["TILLFLOW_DATA_DIR"] = str(tmp_path / "cloud")

    def tillflow(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge.cli", "cloud", *argv],
            env=env, capture_output=True, text=True, timeout=WAIT_S, check=False,
        )  # fmt: skip

    made = tillflow("api-token", "create", "--role", "auditor", "--name", "ops-audit")
    assert made.returncode == 0, made.stderr
    assert "using an embedded PostgreSQL" in made.stderr and "initialised" in made.stderr
    listed = tillflow("--json", "api-token", "list")
    assert listed.returncode == 0, listed.stderr
    assert "ops-audit" in listed.stdout and "auditor" in listed.stdout
    data = tmp_path / "cloud" / "postgres" / "data"
    assert not (data / "postmaster.pid").exists()  # the last lease out stopped it
