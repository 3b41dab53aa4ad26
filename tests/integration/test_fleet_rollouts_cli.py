"""``tillflow fleet rollouts ...`` (cloud.opcli_rollouts) against a real ``tillflow cloud
serve --port 0`` on a PostgreSQL database of its own (the ``cloud`` fixture), with a HOME
of the test's own made before the server starts (its serverless broker's folders are
made under it, and no ambient ``~/.tillflow/api-token`` is read). Terminals enroll and
sync over HTTP as a device does (``sync_memory.Terminal``). No worker runs here: the
rollouts stay as their start left them (their runs started, waiting for a worker), so
what is shown is the API's view of a rollout its run has not planned yet; the request's
every flag reaches the server as the field it names.

The CLI runs in this process (``edge.cli.main``, its stdout/stderr captured).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from hwsim.syncrig import Cloud
from sync_memory import Terminal
from test_rollout_workflows import Hooks

from edge.cli import main
from edge.engine.clock import SystemClock
from edge.store.memory import MemoryStore
from sync.device import identity as device_identity
from sync.device.client import SyncClient

CONFIG = "risk:\n  floor_limit_minor: 2500\n"


class Fleet:
    """``tillflow fleet`` on one cloud, as the holder of ``token``."""

    def __init__(self, cloud: Cloud, token: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.cloud, self.token, self.capsys = cloud, token, capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(["fleet", *argv, "--url", self.cloud.url, "--token", self.token])
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.cloud.database_url, autocommit=True) as conn:
            cur = conn.execute(query.encode(), params or None)
            return cur.fetchall() if cur.description else []


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def served(home: Path, new_database, tmp_path: Path) -> Any:
    """``tillflow cloud serve`` started after HOME is the test's (``cloud``'s own fixture
    would start it before)."""
    c = Cloud(new_database(), tmp_path / "cloud")
    c.work.mkdir()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def fleet(served: Cloud, capsys: pytest.CaptureFixture[str]) -> Fleet:
    made = json.loads(
        served.cli("api-token", "create", "--name", "ops", "--role", "operator", "--json")
    )
    return Fleet(served, str(made["token"]), capsys)


def enroll(cloud: Cloud, store: str, group: str | None = None) -> Terminal:
    term = Terminal(SystemClock())
    with httpx.Client(base_url=cloud.url, timeout=30) as client:
        answer = client.post("/v1/enroll", **term.enroll_request(cloud.enroll_token(store, group)))
        assert answer.status_code == 200, answer.text
        term.device_id = answer.json()["device_id"]
        _, path, headers, body = term.signed(term.request())
        assert client.post(path, content=body, headers=headers).status_code == 200
    return term


def test_rollouts__start_by_flags_list_show_devices_and_steer(
    fleet: Fleet, served: Cloud, tmp_path: Path
) -> None:
    terms = [enroll(served, "s-1", "north"), enroll(served, "s-1", "south")]
    content = tmp_path / "config.yaml"
    content.write_text(CONFIG)
    started = fleet.json(
        "rollouts", "start", "config", "--content", str(content), "--target-group", "north",
        "--target-group", "south", "--waves", "1,100%", "--seed", "42", "--soak-s", "0",
        "--failure-percent", "20", "--min-sample-wave", "1", "--min-sample-total", "2",
        "--count", "failed,timed_out", "--device-timeout-s", "600", "--approve-after", "1",
        "--rate-per-minute", "60", "--reason", "floor up",
    )  # fmt: skip
    rid = started["rollout_id"]
    opts = started["options"]
    assert opts["target"]["groups"] == ["north", "south"] and opts["waves"] == ["1", "100%"]
    assert (opts["soak_s"], opts["device_timeout_s"], opts["rate_per_minute"]) == (0, 600, 60)
    assert opts["abort"] == {"failure_percent": 20, "min_sample_wave": 1, "min_sample_total": 2,
                             "count": ["failed", "timed_out"]}  # fmt: skip
    assert opts["gates"]["approve_after"] == [1] and started["seed"] == 42
    [(key, workflow_type)] = fleet.sql("SELECT idempotency_key, workflow_type FROM workflow_runs")
    assert (key, workflow_type) == (f"rollout:{rid}", "ConfigRollout")
    # the API process published the run to the serverless broker under its HOME
    queue = Path.home() / ".tillflow" / "cloud" / "broker" / "queue"
    assert len(list(queue.glob("*.msg"))) == 1

    code, out, _ = fleet("rollouts", "list")
    header, line = out.splitlines()[:2]
    assert header.split()[:4] == ["id", "kind", "status", "version"] and rid in line
    assert fleet.json("rollouts", "list", "--kind", "policy")["items"] == []
    assert [
        r["rollout_id"] for r in fleet.json("rollouts", "list", "--kind", "config")["items"]
    ] == [rid]

    code, out, _ = fleet("rollouts", "show", rid)
    assert code == 0
    assert f"rollout {rid}: config (version not made yet) -- pending" in out
    assert "abort past 20.0% failed, timed_out" in out and "seed 42" in out
    assert "approval after wave(s) 1" in out and "60/min" in out

    code, out, _ = fleet("rollouts", "devices", rid)
    assert code == 0
    if fleet.json("rollouts", "devices", rid)["items"]:  # planned at create, if it plans then
        assert {t.device_id for t in terms} <= set(out.split())

    code, out, _ = fleet("rollouts", "pause", rid, "--reason", "lunch")
    assert code == 0 and f"rollout {rid}: pause recorded" in out
    assert fleet.json("rollouts", "show", rid)["controls"]["paused"] is True
    assert len(list(queue.glob("*.msg"))) == 2  # the run woken: published again
    [(actor, target)] = fleet.sql(
        "SELECT actor, target FROM cloud_audit WHERE action = 'rollout.pause'"
    )
    assert (actor, target) == ("ops", f"rollout:{rid}")


def test_rollouts__a_request_file_with_flags_over_it(
    fleet: Fleet, served: Cloud, tmp_path: Path
) -> None:
    enroll(served, "s-1", "north")
    enroll(served, "s-2", "north")
    request = tmp_path / "rollout.yaml"
    request.write_text(
        "target: {stores: [s-1]}\nwaves: ['50%', '100%']\nsoak_s: 30\n"
        "abort: {failure_percent: 5}\ncontent:\n  risk:\n    floor_limit_minor: 900\n"
    )
    made = fleet.json("rollouts", "start", "config", str(request), "--target-store", "s-2",
                      "--min-sample-wave", "2")  # fmt: skip
    opts = made["options"]
    assert opts["target"]["stores"] == ["s-2"]  # the flag's target over the file's
    assert opts["waves"] == ["50%", "100%"] and opts["soak_s"] == 30
    assert (opts["abort"]["failure_percent"], opts["abort"]["min_sample_wave"]) == (5, 2)


def test_rollouts__refusals_are_the_servers_and_usage_errors_the_parsers(
    fleet: Fleet, served: Cloud, tmp_path: Path
) -> None:
    enroll(served, "s-1")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"risk": {"floor_limit_minor": -1}}))
    code, _, err = fleet("rollouts", "start", "config", "--content", str(bad), "--all")
    assert code == 1 and "422" in err and "content.risk.floor_limit_minor" in err
    code, _, err = fleet("rollouts", "start", "config", "--version", "1")
    assert code == 1 and "no target" in err
    code, _, err = fleet("rollouts", "start", "release", "--all")
    assert code == 1 and "--release NAME" in err
    code, _, err = fleet("rollouts", "start", "config", "--version", "1", "--all",
                         "--target-store", "s-1")  # fmt: skip
    assert code == 1 and "--all takes no other" in err
    good = tmp_path / "good.yaml"
    good.write_text(CONFIG)
    code, _, err = fleet("rollouts", "start", "config", "--content", str(good),
                         "--target-store", "nowhere")  # fmt: skip
    assert code == 1 and "422" in err
    assert fleet.sql("SELECT count(*) FROM rollouts") == [(0,)]
    code, _, err = fleet("rollouts", "show", "ro_nothere")
    assert code == 1 and "404 rollout_not_found" in err
    for argv in (
        ["--waves", ","], ["--approve-after", "0"], ["--failure-percent", "150"],
        ["--count", "exploded"], ["--soak-s", "-1"],
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            main(["fleet", "rollouts", "start", "config", "--all", "--version", "1", *argv])
        assert exited.value.code == 2, argv


def test_rollouts__watch_returns_at_once_on_a_rollout_that_ended(
    fleet: Fleet, served: Cloud, tmp_path: Path
) -> None:
    enroll(served, "s-1")
    content = tmp_path / "config.yaml"
    content.write_text(CONFIG)
    rid = fleet.json("rollouts", "start", "config", "--content", str(content), "--all")[
        "rollout_id"
    ]
    # as its run leaves it (no worker runs here): ended, rolled back
    fleet.sql("UPDATE rollouts SET status = 'rolled_back', finished_at = 1 WHERE rollout_id = %s",
              rid)  # fmt: skip
    code, out, _ = fleet("rollouts", "watch", rid, "--interval", "0.1")
    assert code == 1 and f"rollout {rid}" in out and "rolled_back" in out
    fleet.sql("UPDATE rollouts SET status = 'succeeded' WHERE rollout_id = %s", rid)
    code, out, _ = fleet("rollouts", "watch", rid)
    assert code == 0 and "succeeded" in out


# --- end to end: serve, a worker, terminals that apply what they are sent -----------------------


class Terminals:
    """Terminals enrolled over HTTP (``sync.device``'s client: commands checked and
    applied into an edge store), synced by one thread every ``SYNC_EVERY_S`` as a
    terminal's sync loop does, until stopped."""

    SYNC_EVERY_S = 0.3

    def __init__(self, cloud: Cloud, work: Path, n: int) -> None:
        self.http = httpx.Client(timeout=30)
        self.edges: list[MemoryStore] = []
        self.hooks: list[Hooks] = []
        self.clients: list[SyncClient] = []
        for i in range(n):
            data_dir = work / f"device-{i}"
            token = cloud.enroll_token("s-1", "north")
            identity = device_identity.enroll(cloud.url, token, data_dir, "1.0.0", http=self.http)
            edge = MemoryStore()
            self.edges.append(edge)
            self.hooks.append(Hooks(edge))
            self.clients.append(
                SyncClient(
                    identity,
                    device_identity.load_key(data_dir),
                    edge,
                    self.hooks[-1],
                    SystemClock(),
                    self.http,
                    binary_version="1.0.0",
                )
            )
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, name="terminals", daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            for client in self.clients:
                try:
                    client.sync_once()
                except Exception as exc:  # kept for the test to show; the loop goes on
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            self.stop.wait(self.SYNC_EVERY_S)

    def versions(self) -> list[int | None]:
        out = []
        for edge in self.edges:
            active = edge.active_document("config")
            out.append(None if active is None else active[0])
        return out

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.http.close()


@contextlib.contextmanager
def worker(cloud: Cloud, work: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``tillflow cloud worker`` on the cloud's database, its key, and the serverless
    broker serve publishes to (both under this test's HOME); the sweep every 0.5 s."""
    config = work / "worker.yaml"
    config.write_text(
        f"database_url: {cloud.database_url}\nsigning_key_file: {cloud.signing_key}\n"
        "sweep_interval_s: 0.5\ncontrol_schedules: false\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    log = open(work / "worker.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "cloud", "worker", "--config", str(config)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def until(what: str, done: Callable[[], bool], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.2)  # a poll with a deadline, not a wait standing in for an event
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    pytest.fail(f"not within {timeout_s:g}s: {what}\n--- worker log:\n{tail}")


@pytest.mark.slow
def test_rollouts__started_approved_and_watched_to_the_end_on_a_real_worker(
    fleet: Fleet, served: Cloud, tmp_path: Path
) -> None:
    terms = Terminals(served, tmp_path, 3)
    content = tmp_path / "config.yaml"
    content.write_text(CONFIG)
    with worker(served, tmp_path) as _:
        terms.thread.start()
        try:
            rid = fleet.json(
                "rollouts", "start", "config", "--content", str(content), "--all",
                "--waves", "1,100%", "--soak-s", "0", "--approve-after", "1",
                "--min-sample-wave", "1", "--min-sample-total", "1", "--device-timeout-s", "120",
            )["rollout_id"]  # fmt: skip

            def status() -> str:
                return str(fleet.json("rollouts", "show", rid)["status"])

            log = tmp_path / "worker.log"
            until("wave 1 healthy, awaiting approval", lambda: status() == "awaiting_approval",
                  90, log)  # fmt: skip
            code, out, _ = fleet("rollouts", "show", rid)
            assert code == 0 and "awaiting_approval" in out
            lines = out.splitlines()
            header = next(line for line in lines if line.startswith("wave "))
            assert header.split()[:6] == ["wave", "size", "targeted", "notified", "applied",
                                          "healthy"]  # fmt: skip
            assert lines[lines.index(header) + 1].split()[:6] == ["1", "1", "1", "1", "1", "1"]
            version = fleet.json("rollouts", "show", rid)["document"]["version"]
            assert terms.versions().count(version) == 1

            # the approval wakes the run: wave 2 is notified at once, not after the
            # approval WAIT's timeout (60 s) or a lease left to expire (30 s)
            approved_at = time.monotonic()
            code, out, _ = fleet("rollouts", "approve", rid, "--reason", "wave 1 fine")
            assert code == 0 and "approve recorded" in out

            def wave_2_notified() -> bool:
                waves = fleet.json("rollouts", "show", rid)["waves"]
                return waves[1]["notified"] == waves[1]["targeted"] > 0

            until("wave 2 notified", wave_2_notified, 25, log)
            woken_s = time.monotonic() - approved_at
            with fleet.capsys.disabled():  # pytest -s shows it
                print(json.dumps({"approve_to_wave_2_notified_s": round(woken_s, 2)}))
            assert woken_s < 15  # measured 0.5 s; 30.7 s when the API kept the lease

            code, out, _ = fleet("rollouts", "watch", rid, "--interval", "0.5")
            assert code == 0 and "succeeded" in out, out
            assert terms.versions() == [version] * 3
            devices = fleet.json("rollouts", "devices", rid)["items"]
            assert sorted(d["status"] for d in devices) == ["healthy"] * 3
            assert not terms.errors, terms.errors[:5]
        finally:
            terms.close()


@pytest.mark.slow
def test_rollouts__one_succeeds_the_next_aborts_and_every_device_is_restored(
    fleet: Fleet, served: Cloud, tmp_path: Path
) -> None:
    terms = Terminals(served, tmp_path, 3)
    first, second = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    first.write_text("risk:\n  floor_limit_minor: 5000\n")
    second.write_text("risk:\n  floor_limit_minor: 2500\n")
    log = tmp_path / "worker.log"
    with worker(served, tmp_path) as _:
        terms.thread.start()
        try:
            ok = fleet.json("rollouts", "start", "config", "--content", str(first), "--all",
                            "--waves", "100%", "--soak-s", "0")["rollout_id"]  # fmt: skip
            code, out, _ = fleet("rollouts", "watch", ok, "--interval", "0.5")
            assert code == 0 and "succeeded" in out, out
            v1 = fleet.json("rollouts", "show", ok)["document"]["version"]
            assert terms.versions() == [v1] * 3

            # the next version breaks two terminals of three: past 10% the run aborts
            # and its saga puts every device that took it back on v1's content
            for hooks in terms.hooks[:2]:
                hooks.sick_on = v1 + 1
            bad = fleet.json(
                "rollouts", "start", "config", "--content", str(second), "--all",
                "--waves", "100%", "--soak-s", "2", "--min-sample-wave", "1",
                "--min-sample-total", "1", "--reason", "lower floor",
            )["rollout_id"]  # fmt: skip
            code, out, _ = fleet("rollouts", "watch", bad, "--interval", "0.5")
            assert code == 1 and "rolled_back" in out, out
            view = fleet.json("rollouts", "show", bad)
            assert view["document"]["version"] == v1 + 1
            assert view["abort"]["criterion"] in ("wave_failure_rate", "total_failure_rate")
            assert "aborted: " in out and "rollback done" in out, out
            until("every terminal restored", lambda: all(
                v is not None and v > v1 + 1 for v in terms.versions()), 60, log)  # fmt: skip
            restored = fleet.json("rollouts", "devices", bad)["items"]
            assert {d["restore_status"] for d in restored} == {"restored"}
            with fleet.capsys.disabled():  # pytest -s shows what an operator reads
                print(out)
            assert not terms.errors, terms.errors[:5]
        finally:
            terms.close()


@pytest.mark.slow
def test_rollouts__aborted_by_hand_at_the_approval_gate(
    fleet: Fleet, served: Cloud, tmp_path: Path
) -> None:
    terms = Terminals(served, tmp_path, 2)
    content = tmp_path / "config.yaml"
    content.write_text(CONFIG)
    log = tmp_path / "worker.log"
    with worker(served, tmp_path) as _:
        terms.thread.start()
        try:
            rid = fleet.json(
                "rollouts", "start", "config", "--content", str(content), "--all",
                "--waves", "1,100%", "--soak-s", "0", "--approve-after", "1",
            )["rollout_id"]  # fmt: skip
            until("awaiting approval", lambda: fleet.json("rollouts", "show", rid)["status"]
                  == "awaiting_approval", 90, log)  # fmt: skip
            code, out, _ = fleet("rollouts", "abort", rid, "--reason", "not today")
            assert code == 0 and "abort recorded" in out
            code, _, err = fleet("rollouts", "abort", rid)
            assert code == 1 and "409 rollout_state" in err  # one abort is enough
            code, out, _ = fleet("rollouts", "watch", rid, "--interval", "0.5")
            assert code == 1 and "rolled_back" in out, out
            assert "aborted: operator" in out and "by ops: not today" in out, out
            view = fleet.json("rollouts", "show", rid)
            assert view["abort"]["criterion"] == "operator" and view["rollback"]["status"] == "done"
            waves = {w["wave"]: w for w in view["waves"]}
            assert waves[2]["notified"] == 0  # wave 2 never started
            assert not terms.errors, terms.errors[:5]
        finally:
            terms.close()
