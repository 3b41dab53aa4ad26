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

import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from hwsim.syncrig import Cloud
from sync_memory import Terminal

from edge.cli import main
from edge.engine.clock import SystemClock

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
        "--rate-per-minute", "60", "--poll-s", "1", "--reason", "floor up",
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
    assert header.split()[:4] == ["id", "kind", "status", "document"] and rid in line
    assert fleet.json("rollouts", "list", "--kind", "policy")["items"] == []
    assert [
        r["rollout_id"] for r in fleet.json("rollouts", "list", "--kind", "config")["items"]
    ] == [rid]

    code, out, _ = fleet("rollouts", "show", rid)
    assert code == 0
    assert f"rollout {rid}: config" in out and "pending" in out
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
