"""A simulated fleet against the real cloud: ``hwsim.simfleet`` (20 real terminals in this
process: their own SQLite, the real payment workflows, the real sync client) enrolled with
tokens from the Fleet API, syncing over HTTP with ``tillflow cloud serve`` and a
``tillflow cloud worker`` (``hwsim.cloudrig``) on this test's own PostgreSQL database and
Redis database number.

* Terminals sell online (a fifth with clocks 15 minutes behind), a quarter go offline
  and sell offline, the API process is ``kill -9``'d and restarted, the terminals come
  back, two enroll late: the cloud holds every sale a terminal approved exactly once and
  no other (the late ones' too, sold before they enrolled), and each device's audit
  chain verifies (Fleet API) and ends at the terminal's head.
* An operator's ``update_config`` to a group (``POST /api/v1/commands``) is applied by
  every terminal of the group, and only by them; a model that refuses the config says
  why, in the command's status.
* The model that fails a config: after it, its terminals' payments fail (the printer
  jams; the saga reverses them) and their heartbeat names it (``last_error`` in
  ``GET /api/v1/devices/{id}``); the next config clears it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hwsim.cloudrig import CloudRig, FleetApi
from hwsim.simfleet import (
    BINARY_VERSION,
    FAILURE_PREFIX,
    REFUSAL_CODE,
    FleetSpec,
    HardwareModel,
    SimFleet,
    SimReleases,
    SimTerminal,
    TerminalSpec,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N = 20
#: Terminals the fixture leaves unenrolled: late joiners (``_enroll_late``).
LATE = 2


def _floor(content: dict[str, Any]) -> int:
    return int(content.get("risk", {}).get("floor_limit_minor", 0))


#: Its printer jams under a config raising the offline floor limit past 5,000.
JAMS = HardwareModel("XR-7", weight=1, fails_config=lambda c: _floor(c) > 5_000)
#: It refuses outright a config lowering the floor limit under 1,000.
REFUSES = HardwareModel(
    "K-2",
    weight=1,
    refuses_config=lambda c: 0 < _floor(c) < 1_000,
    refusal="its offline store cannot hold the floor limit under 1000",
)
PLAIN = HardwareModel("TF-100", weight=2)


@pytest.fixture
def fleet(rig: CloudRig, api: FleetApi, tmp_path: Path) -> Iterator[SimFleet]:
    """N terminals (seed 7: every model present, some clocks 15 minutes behind), all but
    the last LATE enrolled with tokens from the API."""
    spec = FleetSpec(terminals=N, seed=7, stores=3, models=(PLAIN, JAMS, REFUSES), skewed=0.2)
    made = SimFleet(spec, tmp_path / "fleet", rig.url)
    try:
        _enroll(api, made, made.terminals[: N - LATE])
        yield made
    finally:
        made.close()


def _enroll(api: FleetApi, fleet: SimFleet, terminals: list[SimTerminal]) -> list[str]:
    tokens = [
        api.post("/api/v1/enroll-tokens", {"store": t.spec.store, "group": t.spec.group})["token"]
        for t in terminals
    ]
    return fleet.enroll_all(tokens, terminals)


def _enroll_late(api: FleetApi, fleet: SimFleet) -> list[str]:
    """The late joiners, each with a token made as it enrolls (a callable)."""

    def token(t: TerminalSpec) -> str:
        return str(api.post("/api/v1/enroll-tokens", {"store": t.store, "group": t.group})["token"])

    return fleet.enroll_all(token, fleet.terminals[N - LATE :])


def _config(api: FleetApi, floor_limit_minor: int) -> int:
    body = {"content": {"risk": {"floor_limit_minor": floor_limit_minor}}}
    return int(api.post("/api/v1/documents/config", body)["version"])


def _send_config(api: FleetApi, target: dict[str, str], version: int) -> dict[str, str]:
    """``update_config`` of ``version`` to ``target``; command id by device."""
    body = {"target": target, "action": "update_config",
            "document": {"kind": "config", "version": version}}  # fmt: skip
    made = api.post("/api/v1/commands", body)
    return {c["device_id"]: c["command_id"] for c in made["commands"]}


def test_simfleet__enrolled_terminals_sell_online_and_offline_and_the_cloud_holds_each_once(
    rig: CloudRig, api: FleetApi, fleet: SimFleet
) -> None:
    assert {t.spec.model.name for t in fleet} == {"TF-100", "XR-7", "K-2"}
    skewed = [t for t in fleet.enrolled() if t.spec.skew_s]
    assert skewed  # enrolled although their clock is 15 minutes off
    devices = list(api.pages("/api/v1/devices"))
    assert {d["device_id"] for d in devices} == set(fleet.by_device())
    assert len(devices) == N - LATE
    assert {(d["store"], d["group"]) for d in devices} == {(t.spec.store, t.spec.group)
                                                           for t in fleet.enrolled()}  # fmt: skip
    online = fleet.sell(2 * N)
    assert {(s.decision, s.channel) for s in online} == {("approved", "online")}
    away = fleet.offline(0.25)
    assert len(away) == N // 4
    offline = fleet.sell(2 * len(away), terminals=away)
    assert {(s.decision, s.channel) for s in offline} == {("approved", "offline")}
    fleet.sell(N)  # anywhere: online or offline by where it lands
    fleet.run(2.0)  # each on its own interval; the offline ones fail and back off
    rig.kill9("serve:0")  # the API dies under them: every sync fails, nothing is lost
    assert fleet.sync_all() == N - LATE - len(
        [t for t in away if t.runner]
    )  # (those offline are not tried)
    rig.restart("serve:0")  # on its port: the terminals come back by themselves
    assert all(t.pending() for t in away)  # nothing of theirs reached the cloud
    assert all(t.runner.failures for t in away if t.runner is not None)
    fleet.settle()
    fleet.heal()
    late = fleet.terminals[N - LATE :]
    _enroll_late(api, fleet)  # they sold before they enrolled: it all goes up now
    fleet.settle()
    assert all(t.device_id in {d["device_id"] for d in api.pages("/api/v1/devices")}
               for t in late)  # fmt: skip
    assert all(t.client is not None and t.client.clock_offset for t in skewed)

    by_device = fleet.by_device()
    with psycopg.connect(rig.database_url) as conn:  # no API lists the sales
        rows = conn.execute(
            "SELECT device_id, payload->>'run_id', count(*) FROM sync_messages "
            "WHERE topic = 'payment' AND payload->>'decision' = 'approved' GROUP BY 1, 2"
        ).fetchall()
    held: dict[str, set[str]] = {d: set() for d in by_device}
    for device_id, run_id, count in rows:
        assert count == 1, (device_id, run_id, count)
        held[device_id].add(run_id)
    sold = 0
    for device_id, t in by_device.items():
        approved = t.approved()
        sold += len(approved)
        assert held[device_id] == approved, t.name  # each once, and none unknown to it
        assert t.terminal.health()["offline_exposure_minor"] == 0  # released on the ack
        verified = api.get(f"/api/v1/devices/{device_id}/audit/verify")
        assert verified["ok"] is True, verified
        head = t.terminal.store.audit_head()
        assert head is not None
        assert [c["head_seq"] for c in verified["chains"]] == [head[0]]
        detail = api.get(f"/api/v1/devices/{device_id}")
        assert detail["heartbeat"]["outbox_depth"] == 0 and detail["health"] == "ok"
        assert detail["hardware"]["model"] == t.spec.model.name
    assert sold == 2 * N + 2 * len(away) + N


def test_simfleet__a_group_config_is_applied_by_each_of_its_terminals_and_a_model_may_refuse(
    api: FleetApi, fleet: SimFleet
) -> None:
    _enroll_late(api, fleet)
    fleet.sell(N)
    fleet.settle()
    v = _config(api, 800)  # K-2 refuses a floor limit under 1000
    sent = _send_config(api, {"group": "tills"}, v)
    tills = fleet.by_group("tills")
    assert set(sent) == {t.device_id for t in tills} and 0 < len(tills) < N
    fleet.settle()
    refused = 0
    for t in fleet:
        assert t.device_id is not None
        detail = api.get(f"/api/v1/devices/{t.device_id}")
        if t.spec.group != "tills":
            assert detail["config_version"] is None and t.terminal.config_version is None
            continue
        command = api.get(f"/api/v1/commands/{sent[t.device_id]}")
        if t.spec.model.name == "K-2":
            refused += 1
            assert command["status"] == "refused", command
            assert command["reason"].startswith(f"{REFUSAL_CODE}: K-2: its offline store")
            assert detail["config_version"] is None
        else:
            assert command["status"] == "applied", command
            assert detail["config_version"] == v == t.terminal.config_version
            assert t.terminal.services.limits.floor_limit_minor == 800  # in force
    assert refused > 0
    # the command batch tallies it the same
    statuses = {c["status"] for c in api.pages("/api/v1/commands", status="applied")}
    assert statuses == {"applied"}


def test_simfleet__the_failing_model_reports_unhealthy_after_the_bad_config_and_recovers(
    rig: CloudRig, api: FleetApi, fleet: SimFleet
) -> None:
    _enroll_late(api, fleet)
    jams = fleet.by_model("XR-7")
    assert jams and len(jams) < N
    bad = _config(api, 9_000)
    for group in {t.spec.group for t in fleet if t.spec.group}:
        _send_config(api, {"group": group}, bad)
    fleet.settle()
    for t in fleet:
        assert t.device_id is not None and t.terminal.config_version == bad
        beat = api.get(f"/api/v1/devices/{t.device_id}")["heartbeat"]
        if t in jams:
            assert t.failing and t.printer.state == "jam"
            assert beat["last_error"].startswith(FAILURE_PREFIX + "XR-7 printer jams"), beat
            assert f"config version {bad}" in beat["last_error"]
        else:
            assert beat["last_error"] is None, (t.name, beat)
    # and it is not just words: its payments fail (the saga reverses each approval)
    sales = fleet.sell(2 * len(jams), terminals=jams)
    fleet.finish(timeout_s=30)
    for t in jams:
        assert t.approved() == set(), t.name
    assert all(s.decision in ("approved", "unknown") for s in sales)  # answered mid-retry
    assert {str(t.terminal.engine.get(s.run_id).status) for t in jams for s in t.sales} == {
        "ROLLED_BACK"
    }
    fleet.settle()
    with psycopg.connect(rig.database_url) as conn:  # the cloud holds none of them approved
        held = conn.execute(
            "SELECT count(*) FROM sync_messages WHERE topic = 'payment' "
            "AND payload->>'decision' = 'approved' AND payload->>'run_id' = ANY(%s)",
            ([s.run_id for s in sales],),
        ).fetchone()
    assert held == (0,)
    # the next config (the old floor limit back) clears it
    good = _config(api, 2_500)
    for group in {t.spec.group for t in fleet if t.spec.group}:
        _send_config(api, {"group": group}, good)
    fleet.settle()
    for t in jams:
        beat = api.get(f"/api/v1/devices/{t.device_id}")["heartbeat"]
        assert beat["last_error"] is None and beat["config_version"] == good
        assert not t.failing and t.printer.state == "ok"
    after = fleet.sell(len(jams), terminals=jams)
    assert {s.decision for s in after} == {"approved"}


def test_simfleet__a_release_installs_on_a_simulated_terminal_or_rolls_back_on_its_model(
    tmp_path: Path,
) -> None:
    """``SimReleases``: the outcome goes up as the real installer's does (one
    ``release_result`` message and its audit row); a model that fails the release keeps
    its version and says why. (No cloud: a release document needs a signed bundle; the
    rollout tests send real ones.)"""
    from sync import wire

    bad = HardwareModel("XR-7", weight=2, fails_release=lambda r: r == "2.0.0")
    spec = FleetSpec(terminals=6, seed=3, models=(PLAIN, bad), install_s=0.0)
    with SimFleet(spec, tmp_path / "fleet", "http://127.0.0.1:9") as fleet:
        assert {t.spec.model.name for t in fleet} == {"TF-100", "XR-7"}
        release = wire.ReleaseContent(release="2.0.0", manifest_sha256="a" * 64, files=3,
                                      bytes=100)  # fmt: skip
        for n, t in enumerate(fleet):
            hooks = SimReleases(t)
            assert hooks.refusal(release) is None and not hooks.running(release)
            hooks.begin(f"cmd-{n}", release)
            assert hooks.refusal(release) is not None  # one install at a time
            hooks.poll()
            [msg] = [m for m in t.terminal.store.outbox(after_seq=0, limit=50)
                     if m.topic == "release_result"]  # fmt: skip
            assert msg.payload["command_id"] == f"cmd-{n}"
            assert msg.payload["from_release"] == BINARY_VERSION
            if t.spec.model is bad:
                assert msg.payload["status"] == "failed"
                assert "rolled back" in msg.payload["reason"] and "XR-7" in msg.payload["reason"]
                assert t.binary_version == BINARY_VERSION
            else:
                assert (msg.payload["status"], msg.payload["reason"]) == ("installed", None)
                assert t.binary_version == "2.0.0" and hooks.running(release)
            events = [r.event for r in t.terminal.store.audit_rows()]
            assert ("release_failed" if t.spec.model is bad else "release_installed") in events
