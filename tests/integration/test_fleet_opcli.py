"""``tillflow fleet ...`` (cloud.opcli) against a real ``tillflow cloud serve --port 0`` on
a PostgreSQL database of its own (the ``cloud`` fixture), with the first admin token
made as an operator makes it (``tillflow cloud api-token create``). A terminal enrolls
and syncs over HTTP as a device does (signed, ``sync_memory.Terminal``).

The CLI runs in this process (``edge.cli.main``, its stdout/stderr captured) except for
one run through the installed entry point as a subprocess; the server is always its
own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from hwsim.syncrig import Cloud
from sync_memory import Terminal

from edge.cli import main
from edge.engine.clock import SystemClock


class Fleet:
    """``tillflow fleet`` on one cloud, as the holder of ``token``."""

    def __init__(self, cloud: Cloud, token: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.cloud, self.token, self.capsys = cloud, token, capsys

    def __call__(self, *argv: str, token: str | None = None) -> tuple[int, str, str]:
        code = main(["fleet", *argv, "--url", self.cloud.url, "--token", token or self.token])
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


def make_token(cloud: Cloud, role: str = "admin", name: str = "ops") -> str:
    made = json.loads(cloud.cli("api-token", "create", "--name", name, "--role", role, "--json"))
    return str(made["token"])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of the test's own: no ambient ~/.tillflow/api-token."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def fleet(cloud: Cloud, home: Path, capsys: pytest.CaptureFixture[str]) -> Fleet:
    return Fleet(cloud, make_token(cloud), capsys)


def enroll_and_sync(cloud: Cloud, token: str, audit_rows: int) -> Terminal:
    """A terminal enrolled with ``token`` that has uploaded ``audit_rows`` audit rows."""
    term = Terminal(SystemClock())
    with httpx.Client(base_url=cloud.url, timeout=30) as client:
        answer = client.post("/v1/enroll", **term.enroll_request(token))
        assert answer.status_code == 200, answer.text
        term.device_id = answer.json()["device_id"]
        _, path, headers, body = term.signed(term.request((), term.grow_audit(audit_rows)))
        answer = client.post(path, content=body, headers=headers)
        assert answer.status_code == 200, answer.text
    return term


def sync(cloud: Cloud, term: Terminal, commands_through: int = 0) -> httpx.Response:
    _, path, headers, body = term.signed(term.request(commands_through=commands_through))
    return httpx.post(cloud.url + path, content=body, headers=headers, timeout=30)


def test_fleet__enroll_list_tag_verify_and_revoke_a_device(fleet: Fleet, cloud: Cloud) -> None:
    made = fleet.json("enroll-tokens", "create", "--store", "s-1", "--group", "g")
    assert (made["store"], made["group"]) == ("s-1", "g") and made["token"]
    code, out, _ = fleet("enroll-tokens", "create", "--store", "s-1")
    assert code == 0 and out.strip() and " " not in out.strip()  # the token alone, for $(...)
    term = enroll_and_sync(cloud, made["token"], audit_rows=4)

    listed = fleet.json("enroll-tokens", "list", "--store", "s-1")
    states = {t["id"]: t["state"] for t in listed["items"]}
    assert states[made["id"]] == "used" and sorted(states.values()) == ["live", "used"]

    [row] = fleet.json("devices", "list")["items"]
    assert (row["device_id"], row["store"], row["group"]) == (term.device_id, "s-1", "g")
    assert row["status"] == "active" and row["health"] == "ok" and row["last_seen_at"]
    assert fleet.json("devices", "list", "--store", "s-2") == {"items": [], "next": None}
    assert fleet.json("devices", "list", "--seen-after", "1h")["items"]
    assert not fleet.json("devices", "list", "--seen-before", "1h")["items"]
    code, out, _ = fleet("devices", "list")
    header, line = out.splitlines()
    assert header.split()[:3] == ["device", "store", "group"] and term.device_id in line
    # aligned: each column starts where its header does
    assert line.index("s-1") == header.index("store") and line.index("active") == header.index(
        "status"
    )

    tagged = fleet.json("devices", "tag", term.device_id, "lane-3")
    assert tagged["tags"] == ["lane-3"]
    assert [d["device_id"] for d in fleet.json("devices", "list", "--tag", "lane-3")["items"]] == [
        term.device_id
    ]
    code, out, _ = fleet("devices", "show", term.device_id)
    assert code == 0 and "device_id:" in out and "lane-3" in out and "chain " in out

    code, out, _ = fleet("audit", "verify", "--device", term.device_id)
    assert code == 0 and "4 rows verified" in out
    with psycopg.connect(cloud.database_url) as conn:
        conn.execute("UPDATE device_audit SET hash = repeat('0', 64) WHERE seq = 2")
    code, out, _ = fleet("audit", "verify", "--device", term.device_id)
    assert code == 4 and "BROKEN" in out and "at seq 2" in out
    log = fleet.json("audit", "log", "--device", term.device_id)
    assert [r["seq"] for r in log["items"]] == [1, 2, 3, 4]

    # a command to it: queued, then delivered with its next sync
    sent = fleet.json("commands", "send", "--device", term.device_id, "--action", "request_health")
    [queued] = sent["commands"]
    assert (queued["device_id"], queued["seq"], sent["scope"]) == (term.device_id, 1, "device")
    assert fleet.json("commands", "show", queued["command_id"])["status"] == "queued"
    answer = sync(cloud, term)
    assert answer.status_code == 200 and len(answer.json()["commands"]) == 1
    [shown] = fleet.json("commands", "list", "--device", term.device_id)["items"]
    assert (shown["command_id"], shown["status"]) == (queued["command_id"], "delivered")

    code, out, _ = fleet("devices", "revoke", term.device_id)
    assert code == 0 and "revoked" in out
    assert sync(cloud, term).status_code == 403

    # every action above is in the cloud's audit log, by the token's holder, and it verifies
    actions = [(r["actor"], r["action"]) for r in fleet.json("audit", "log", "--cloud")["items"]]
    assert [a for who, a in actions if who == "ops"] == [
        "enroll_token.create", "enroll_token.create", "device.tag", "command.send",
        "device.revoke",
    ]  # fmt: skip
    code, out, _ = fleet("audit", "verify", "--cloud")
    assert code == 0 and out.startswith("ok")
    with psycopg.connect(cloud.database_url) as conn:
        conn.execute("UPDATE cloud_audit SET actor = 'someone else' WHERE seq = 2")
    verdict = fleet("audit", "verify", "--cloud", "--json")
    assert verdict[0] == 4 and json.loads(verdict[1])["first_bad_seq"] == 2


def test_fleet__documents_assigned_by_scope_and_sent_to_a_group(
    fleet: Fleet, cloud: Cloud, tmp_path: Path
) -> None:
    made = fleet.json("enroll-tokens", "create", "--store", "s-1", "--group", "g")
    term = enroll_and_sync(cloud, made["token"], audit_rows=1)
    for floor in (1000, 2000):
        doc = tmp_path / f"config-{floor}.yaml"
        doc.write_text(f"risk:\n  floor_limit_minor: {floor}\n")
        code, out, _ = fleet("documents", "create", "config", str(doc))
        assert code == 0 and out.startswith("config version")
    assert [d["version"] for d in fleet.json("documents", "list", "config")["items"]] == [2, 1]
    assert fleet.json("documents", "show", "config", "2")["content"] == {
        "risk": {"floor_limit_minor": 2000}
    }
    # a bad document: the server's 422 naming the field, nothing stored
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"risk": {"floor_limit_minor": -1}}))
    code, _, err = fleet("documents", "create", "config", str(bad))
    assert code == 1 and "422" in err and "floor_limit_minor" in err
    assert len(fleet.json("documents", "list", "config")["items"]) == 2

    fleet.json("documents", "assign", "config", "--version", "1", "--scope", "fleet")
    code, out, _ = fleet("documents", "effective", "config", "--device", term.device_id)
    assert code == 0 and "version 1 (from fleet)" in out
    fleet.json(
        "documents", "assign", "config", "--version", "2", "--scope", "store", "--value", "s-1"
    )
    effective = fleet.json("documents", "effective", "config", "--device", term.device_id)
    assert (effective["version"], effective["scope"], effective["value"]) == (2, "store", "s-1")
    rows = fleet.json("documents", "assignments", "config")["items"]
    assert {(r["scope"], r["value"], r["version"]) for r in rows} == {
        ("fleet", None, 1), ("store", "s-1", 2),
    }  # fmt: skip
    store_row = next(r for r in rows if r["scope"] == "store")
    fleet.json("documents", "unassign", "config", str(store_row["assignment_id"]))
    effective = fleet.json("documents", "effective", "config", "--device", term.device_id)
    assert (effective["version"], effective["scope"]) == (1, "fleet")

    # to a group: one command per active device, the document by kind and version
    sent = fleet.json("commands", "send", "--group", "g", "--action", "update_config",
                      "--document", "config:2")  # fmt: skip
    assert [c["device_id"] for c in sent["commands"]] == [term.device_id]
    code, out, _ = fleet("commands", "batch", sent["batch_id"])
    assert code == 0 and "1 queued" in out
    answer = sync(cloud, term)
    assert answer.status_code == 200 and len(answer.json()["commands"]) == 1
    code, out, _ = fleet("commands", "batch", sent["batch_id"])
    assert code == 0 and "1 delivered" in out
    code, _, err = fleet("commands", "send", "--group", "nobody", "--action", "request_health")
    assert code == 1 and "404 no_devices" in err
    # a usage error is the parser's (exit 2), not a request
    with pytest.raises(SystemExit) as exited:
        main(["fleet", "commands", "send", "--group", "g", "--action", "update_config",
              "--document", "config"])  # fmt: skip
    assert exited.value.code == 2


def test_fleet__lists_follow_the_next_cursor_up_to_the_limit(fleet: Fleet) -> None:
    for store in ("a", "b", "c"):
        fleet.json("enroll-tokens", "create", "--store", store)
    every = fleet.json("enroll-tokens", "list", "--page-size", "1")
    assert sorted(t["store"] for t in every["items"]) == ["a", "b", "c"] and every["next"] is None
    first = fleet.json("enroll-tokens", "list", "--page-size", "1", "--limit", "2")
    assert len(first["items"]) == 2 and first["next"]
    rest = fleet.json("enroll-tokens", "list", "--after", first["next"])
    assert [t["id"] for t in first["items"] + rest["items"]] == [t["id"] for t in every["items"]]
    code, out, _ = fleet("enroll-tokens", "list", "--limit", "1")
    assert code == 0 and f"--after {first['items'][0]['id']}" in out


def test_fleet__tokens_and_roles(fleet: Fleet) -> None:
    made = fleet.json("tokens", "create", "--name", "auditor-1", "--role", "auditor")
    assert made["role"] == "auditor" and made["token"]
    # an auditor reads the audit log, may not make tokens: 403 with the server's words
    assert fleet("audit", "verify", "--cloud", token=made["token"])[0] == 0
    code, out, err = fleet(
        "tokens", "create", "--name", "x", "--role", "admin", token=made["token"]
    )
    assert (code, out) == (1, "") and "403 forbidden" in err and "auditor" in err
    # a bad name is the server's 422, naming the field
    code, _, err = fleet("tokens", "create", "--name", "a\tb", "--role", "operator")
    assert code == 1 and "422" in err and "body.name" in err
    # a read_only token reads: the unknown outcomes (none yet)
    reader = fleet.json("tokens", "create", "--name", "reader", "--role", "read_only")["token"]
    code, out, _ = fleet("outcomes", "list", "--state", "open", token=reader)
    assert (code, out.strip()) == (0, "no unknown outcomes")
    code, _, err = fleet("outcomes", "show", "out_" + "0" * 32, token=reader)
    assert code == 1 and "404 outcome_not_found" in err
    listed = fleet.json("tokens", "list")["items"]
    assert {t["name"] for t in listed} == {"ops", "auditor-1", "reader"}
    code, out, _ = fleet("tokens", "revoke", made["token_id"])
    assert code == 0 and made["token_id"] in out
    code, _, err = fleet("audit", "verify", "--cloud", token=made["token"])
    assert code == 1 and "401 unauthenticated" in err and made["token"] not in err


def test_fleet__a_wrong_or_missing_token_and_no_server_are_clear_errors(
    fleet: Fleet, cloud: Cloud, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "not-a-token-" + "x" * 20
    code, out, err = fleet("devices", "list", token=wrong)
    assert (code, out) == (1, "")
    assert err.startswith("error: 401 unauthenticated:") and wrong not in err

    # no --token, no $TILLFLOW_API_TOKEN, no file: said so, and how to get one
    assert main(["fleet", "devices", "list", "--url", cloud.url]) == 1
    assert "no API token" in capsys.readouterr().err
    # the token file is the last resort
    (home / ".tillflow").mkdir()
    (home / ".tillflow" / "api-token").write_text(fleet.token + "\n")
    assert main(["fleet", "devices", "list", "--url", cloud.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"items": [], "next": None}

    free = cloud.url  # a port nothing listens on: the cloud's, once it is stopped
    cloud.stop()
    assert main(["fleet", "devices", "list", "--url", free, "--token", fleet.token]) == 1
    assert f"cannot reach the Fleet API at {free}" in capsys.readouterr().err


def test_fleet__the_entry_point_reads_the_environment(
    fleet: Fleet, cloud: Cloud, home: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env |= {"TILLFLOW_API_URL": cloud.url, "TILLFLOW_API_TOKEN": fleet.token, "HOME": str(home)}
    cmd = [sys.executable, "-m", "edge.cli", "fleet", "tokens", "list", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [t["name"] for t in json.loads(done.stdout)["items"]] == ["ops"]
    assert fleet.token not in done.stdout + done.stderr
    env["TILLFLOW_API_TOKEN"] = "wrong"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "401 unauthenticated" in done.stderr
    bad = subprocess.run([*cmd[:-1], "--limit", "0"], env=env, capture_output=True, timeout=60)
    assert bad.returncode == 2


def test_fleet__the_module_is_light_at_import() -> None:
    # tillflow builds every command's parser on each run: httpx waits for a fleet command
    code = "import sys, cloud.opcli; print(sorted({'httpx', 'yaml'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
