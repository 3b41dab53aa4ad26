"""``make demo``, third part: a config rolled out to a few terminals in waves -- one that
breaks a hardware model and is rolled back, one that succeeds.

The control plane runs as on a server: ``tillflow cloud serve`` and one ``tillflow
cloud worker`` (``hwsim.cloudrig.CloudRig``), on ``TILLFLOW_DATABASE_URL`` when set,
else on an embedded PostgreSQL of its own (``python -m cloud.embedded``, as
``hwsim.clouddemo`` holds it), and on ``TILLFLOW_BROKER_URL`` when set, else on the
serverless broker (kombu's ``filesystem://``, its folders under the cloud's data
directory, which serve and worker share). The terminals are ``hwsim.simfleet``'s: the
real terminal runtime, many to this process, syncing over HTTP. The rollout is driven
through the Fleet API (``POST /api/v1/config/rollout``, ``GET /api/v1/rollouts/{id}``)
as ``tillflow fleet rollouts`` drives it; what the terminals run is read from the
terminals themselves (the config in force in each one's own database):

 12. eight terminals (two models, two groups) enroll; config version 1 is assigned to
     the fleet and the worker's reconciler brings each terminal to it;
 13. a config whose new floor limit jams one model's printer is rolled out in two
     waves: the failures cross the abort threshold, the saga restores every terminal
     that applied it (a new version with the old content) and withdraws the version;
 14. a config every model takes is rolled out: every terminal on it, healthy; then
     everything stops.

``story(work, add=..., say=...)`` runs the three parts (``hwsim.demo`` calls it after
part 11); ``database_url``/``broker_url`` override the environment (tests).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hwsim import clouddemo
from hwsim.cloudrig import CloudRig, FleetApi
from hwsim.demorig import DemoError
from hwsim.simfleet import FleetSpec, HardwareModel, SimFleet, SimTerminal

DATABASE_URL_ENV = "TILLFLOW_DATABASE_URL"
BROKER_URL_ENV = "TILLFLOW_BROKER_URL"
#: The fleet: eight terminals in two stores and two groups, two of them XR-7s (the
#: seed draws 4 tills and 4 kiosks, 4 per store, 2 XR-7).
TERMINALS = 8
FLEET_SEED = 20
GROUPS = ("tills", "kiosks")
#: Seconds between a terminal's syncs here (a real one: every minute or so).
SYNC_INTERVAL_S = 0.5
#: The configs: version 1 (the fleet's), the one that breaks the XR-7, the good one.
BASELINE_FLOOR = 2_500
BAD_FLOOR = 9_000
GOOD_FLOOR = 3_000
#: Above this floor limit the XR-7's printer firmware jams (a simulated hardware bug).
XR7_JAMS_ABOVE = 5_000
#: The rollout options both rollouts take: two waves, a 3 s soak, abort past 20%.
WAVES = ["25%", "100%"]
SOAK_S = 3
ABORT = {"failure_percent": 20, "min_sample_wave": 2, "min_sample_total": 4}
DEVICE_TIMEOUT_S = 60
#: Bounded waits (seconds).
BASELINE_WAIT_S = 60.0
ROLLOUT_WAIT_S = 150.0
#: Rollout statuses it ends in.
FINISHED = ("succeeded", "rolled_back", "failed")

AddCheck = Callable[[str, str, str, bool], bool]
Say = Callable[[str], None]


def _floor(content: dict[str, Any] | None) -> int | None:
    risk = (content or {}).get("risk") or {}
    value = risk.get("floor_limit_minor")
    return None if value is None else int(value)


def eur(minor: int | None) -> str:
    return "-" if minor is None else f"{minor / 100:.2f} EUR"


#: The plain model, and the one whose printer jams under a floor limit over 50.00 EUR.
PLAIN = HardwareModel("TF-100", weight=2)
XR7 = HardwareModel("XR-7", weight=1, fails_config=lambda c: (_floor(c) or 0) > XR7_JAMS_ABOVE)


def config(floor_minor: int) -> dict[str, Any]:
    return {"risk": {"floor_limit_minor": floor_minor}}


def in_force(t: SimTerminal) -> tuple[int | None, int | None]:
    """(version, floor limit) of the config in force on the terminal, from its own
    database."""
    found = t.terminal.store.active_document("config")
    if found is None:
        return None, None
    return int(found[0]), _floor(dict(found[1]))


@contextlib.contextmanager
def _database(work: Path, say: Say, given: str | None) -> Iterator[tuple[str, str]]:
    if given:
        yield (
            given,
            (
                f"{DATABASE_URL_ENV} is set: the control plane uses that database (a fresh one: "
                "devices of an earlier run in these groups would be targeted too)."
            ),
        )
        return
    with clouddemo.control_plane_database(work, say) as found:
        yield found


def _counts(words: Counter[str]) -> str:
    return ", ".join(f"{n} {w}" for w, n in words.items() if n) or "none"


class Rollouts:
    """The Fleet API's rollouts, and the fleet synced while one runs."""

    def __init__(self, api: FleetApi, fleet: SimFleet, say: Say) -> None:
        self.api, self.fleet, self.say = api, fleet, say
        self.names = {t.device_id: t for t in fleet}

    def start(self, floor_minor: int, reason: str) -> dict[str, Any]:
        body = {
            "content": config(floor_minor),
            "target": {"groups": list(GROUPS)},
            "waves": WAVES,
            "soak_s": SOAK_S,
            "abort": ABORT,
            "device_timeout_s": DEVICE_TIMEOUT_S,
            "reason": reason,
        }
        view: dict[str, Any] = self.api.post("/api/v1/config/rollout", body)
        return view

    def view(self, rollout_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api.get(f"/api/v1/rollouts/{rollout_id}")
        return found

    def devices(self, rollout_id: str) -> list[dict[str, Any]]:
        return list(self.api.pages(f"/api/v1/rollouts/{rollout_id}/devices"))

    def follow(self, rollout_id: str) -> tuple[dict[str, Any], float]:
        """Let the terminals sync (each on its own interval, as the daemon's runner
        would) until the rollout ends; its last view and the seconds it took."""
        started = time.monotonic()
        deadline = started + ROLLOUT_WAIT_S
        while True:
            self.fleet.run(0.5)
            v = self.view(rollout_id)
            if v["status"] in FINISHED and (v["rollback"] or {}).get("pending", 0) == 0:
                return v, time.monotonic() - started
            if time.monotonic() > deadline:
                raise DemoError(
                    f"rollout {rollout_id} not finished within {ROLLOUT_WAIT_S:g}s: status "
                    f"{v['status']}, wave {v['current_wave']}, waves {v['waves']}"
                )

    def name(self, device_id: str) -> str:
        t = self.names.get(device_id)
        return device_id if t is None else f"{t.name} ({t.spec.model.name})"

    def tell_waves(self, v: dict[str, Any], devices: list[dict[str, Any]]) -> None:
        """What each wave did, in words: who was in it, applied, healthy, failed."""
        for w in v["waves"]:
            mine = [d for d in devices if d["wave"] == w["wave"]]
            applied = sum(d["applied_at"] is not None for d in mine)
            statuses = Counter(str(d["status"]) for d in mine)
            models = Counter(self.names[d["device_id"]].spec.model.name for d in mine
                             if d["device_id"] in self.names)  # fmt: skip
            what = (
                f"   Wave {w['wave']} ({WAVES[min(w['wave'], len(WAVES)) - 1]}): "
                f"{w['targeted']} terminal(s) targeted ({_counts(models)}), "
                f"{w['notified']} notified, {applied} applied it, {w['healthy']} stayed "
                f"healthy through the {SOAK_S} s soak, {w['failed']} failed"
            )
            others = {k: n for k, n in statuses.items() if k not in ("healthy", "failed")}
            if others:
                what += f", {_counts(Counter(others))}"
            if w["notified"] == 0 and w["targeted"]:
                what += " (the wave never started: nothing was sent to it)"
            self.say(what + ".")
            for d in mine:
                if d["status"] == "failed":
                    self.say(f"     {self.name(d['device_id'])}: {d['last_error']}")


def story(
    work: Path,
    *,
    add: AddCheck,
    say: Say,
    database_url: str | None = None,
    broker_url: str | None = None,
) -> None:
    """Parts 12 to 14; each adds its checks (``add``) and tells what happened
    (``say``). The first failure raises (after the cloud's log tails are shown)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    given_db = database_url or os.environ.get(DATABASE_URL_ENV) or None
    broker = broker_url or os.environ.get(BROKER_URL_ENV) or None
    rig: CloudRig | None = None
    with contextlib.ExitStack() as stack:
        say(
            "12. A small fleet: eight terminals, two hardware models, in two stores and two "
            "groups (tills, kiosks). The control plane runs again, now with a worker: "
            "tillflow cloud serve and tillflow cloud worker."
        )
        url, said = stack.enter_context(_database(work, say, given_db))
        say(f"   {said}")
        # broker_url None in the settings file: the serverless broker, under data_dir
        rig = CloudRig(url, broker or "", work / "cloud", settings={"broker_url": broker})
        stack.callback(rig.stop)
        try:
            _parts(rig, work, add=add, say=say, broker=broker, stack=stack, embedded=not given_db)
        except Exception:
            say("   The cloud's last log lines:")
            print("\n".join("     | " + ln for ln in rig.logs(12).splitlines()), flush=True)
            raise
    # every process stopped, the database's holder too (the stack is closed)
    assert rig is not None
    alive = [p.name for p in [*rig.serves, *rig.workers] if p.alive()]
    embedded = not given_db
    db_up = embedded and clouddemo._answers(url)
    if alive or db_up:
        say(
            "   !! Not everything stopped: "
            + ", ".join([*alive, *(["the embedded PostgreSQL"] if db_up else [])])
            + " still running."
        )
    else:
        say(
            "   Stopped: the eight terminals closed their databases, the worker and the "
            "server exited"
            + (", and the embedded PostgreSQL stopped (its last lease ended)." if embedded else ".")
        )
    add(
        "14b. stop",
        "worker, server" + (", database" if embedded else "") + " stopped",
        ("all stopped" if not alive else f"still running: {', '.join(alive)}")
        + (f", database {'still up' if db_up else 'stopped'}" if embedded else ""),
        not alive and not db_up,
    )


def _parts(
    rig: CloudRig,
    work: Path,
    *,
    add: AddCheck,
    say: Say,
    broker: str | None,
    stack: contextlib.ExitStack,
    embedded: bool,
) -> None:
    rig.start(serves=1, workers=1)
    where = (
        "the broker it was given"
        if broker
        else f"the serverless broker (files under {rig.work / 'data' / 'broker'})"
    )
    say(
        f"   The server listens on {rig.url}; the worker advances workflow runs (the "
        f"rollouts are workflows on the same engine as a payment) and is woken through "
        f"{where}; the database decides who runs what."
    )
    api = rig.fleet()
    stack.callback(api.close)
    spec = FleetSpec(
        terminals=TERMINALS, seed=FLEET_SEED, stores=2, groups=GROUPS, models=(PLAIN, XR7),
        sync_interval_s=SYNC_INTERVAL_S,
    )  # fmt: skip
    fleet = SimFleet(spec, work / "fleet", rig.url)
    stack.callback(fleet.close)
    tokens = [api.post("/api/v1/enroll-tokens", {"store": t.store, "group": t.group})["token"]
              for t in fleet.plan()]  # fmt: skip
    fleet.enroll_all(tokens)
    fleet.settle()
    for group in GROUPS:
        members = fleet.by_group(group)
        say(
            f"   {group}: "
            + ", ".join(f"{t.name} {t.spec.model.name} in {t.spec.store}" for t in members)
        )
    say(
        "   Each terminal is the real terminal runtime (its own database, the payment "
        "workflows, a simulated card reader and printer) enrolled with a one-time token "
        "and syncing over HTTP every half second."
    )
    v1 = int(api.post("/api/v1/documents/config", {"content": config(BASELINE_FLOOR)})["version"])
    api.post("/api/v1/documents/config/assignments", {"version": v1, "scope": "fleet"})
    say(
        f"   An operator makes config version {v1} (floor limit {eur(BASELINE_FLOOR)}) and "
        "assigns it to the whole fleet. Nobody sends it: the worker's reconciler sees "
        "each terminal report an older config and queues this one for it."
    )
    deadline = time.monotonic() + BASELINE_WAIT_S
    while any(in_force(t)[0] != v1 for t in fleet):
        if time.monotonic() > deadline:
            behind = [t.name for t in fleet if in_force(t)[0] != v1]
            raise DemoError(f"config {v1} not in force within {BASELINE_WAIT_S:g}s on {behind}")
        fleet.run(0.5)
    on_v1 = sum(in_force(t) == (v1, BASELINE_FLOOR) for t in fleet)
    say(f"   All {on_v1} terminals now run config version {v1}.")
    add(
        "12. eight terminals, config v1",
        f"{TERMINALS} enrolled, all on v{v1}",
        f"{len(fleet.by_device())} enrolled, {on_v1} on v{v1}",
        len(fleet.by_device()) == TERMINALS and on_v1 == TERMINALS,
    )
    say("")
    rollouts = Rollouts(api, fleet, say)
    bad(rollouts, api, fleet, v1, add=add, say=say)
    say("")
    good(rollouts, fleet, add=add, say=say)
    say(
        "   Closing time: the terminals, the worker (SIGTERM), the server"
        + (", the embedded PostgreSQL." if embedded else ".")
    )
    fleet.close()
    rig.stop()


def bad(
    rollouts: Rollouts, api: FleetApi, fleet: SimFleet, v1: int, *, add: AddCheck, say: Say
) -> None:
    """Part 13: a config the XR-7 cannot take, rolled out and rolled back."""
    xr7 = fleet.by_model(XR7.name)
    say(
        f"13. An operator rolls out a config raising the floor limit to {eur(BAD_FLOOR)} "
        f"(POST /api/v1/config/rollout, as tillflow fleet rollouts start config does), "
        f"to the groups {' and '.join(GROUPS)}, in waves {' then '.join(WAVES)}; a "
        f"terminal counts as a success once it applied it and stayed healthy {SOAK_S} s; "
        f"abort past {ABORT['failure_percent']}% failures (once {ABORT['min_sample_wave']} "
        f"of a wave, or {ABORT['min_sample_total']} in all, have an outcome)."
    )
    say(
        f"   What nobody knew: the XR-7's printer firmware jams under a floor limit above "
        f"{eur(XR7_JAMS_ABOVE)} ({len(xr7)} of the {len(fleet)} terminals are XR-7s). A "
        "jammed printer fails every payment, and the terminal says so in its heartbeat."
    )
    started = rollouts.start(BAD_FLOOR, "raise the floor limit")
    rid = started["rollout_id"]
    v, took = rollouts.follow(rid)
    version = int(v["document"]["version"])
    devices = rollouts.devices(rid)
    say(
        f"   Rollout {rid} (seed {v['seed']}: who is in which wave) made config version "
        f"{version} and went wave by wave:"
    )
    rollouts.tell_waves(v, devices)
    abort = v["abort"] or {}
    f = abort.get("figures") or {}
    criterion = abort.get("criterion")
    which = {
        "wave_failure_rate": f"wave {abort.get('wave')}'s failure rate",
        "total_failure_rate": "the failure rate over all waves so far",
        "operator": "an operator's abort",
    }.get(str(criterion), str(criterion))
    say(
        f"   Threshold crossed: {which} ({criterion}): {f.get('failures')} of "
        f"{f.get('sampled')} sampled terminals failed, {f.get('failure_percent')}%, above "
        f"the {f.get('threshold')}% allowed. The wave's check step (Check_Wave) failed for "
        "good, and that started the saga: the workflow runs the compensation of each step "
        "it completed, in reverse order: each wave's broadcast, the last wave first, then "
        "the version's creation."
    )
    add(
        "13a. bad config: threshold",
        f"aborted past {ABORT['failure_percent']}%",
        f"{v['status']}: {criterion}, {f.get('failures')}/{f.get('sampled')} "
        f"= {f.get('failure_percent')}%",
        v["status"] == "rolled_back"
        and criterion in ("wave_failure_rate", "total_failure_rate")
        and float(f.get("failure_percent") or 0) > ABORT["failure_percent"],
    )
    back = v["rollback"] or {}
    restored = [d for d in devices if d["restore_status"] == "restored"]
    applied = [d for d in devices if d["applied_at"] is not None]
    restore_versions = sorted({int(d["restore_version"]) for d in restored
                               if d["restore_version"] is not None})  # fmt: skip
    cancelled = [d for d in devices if d["status"] == "cancelled"]
    rv = ", ".join(map(str, restore_versions)) or "none"
    say(
        f"   The rollback: commands not yet delivered were cancelled, and the "
        f"{len(applied)} terminal(s) that had applied version {version} were each sent "
        f"version {rv}, a new version with version {v1}'s content (versions only grow, so "
        "a rollback is a new number), and followed until each reported it in force: "
        f"{back.get('restored')} of {back.get('to_restore')} restored, {back.get('failed')} "
        f"failed, {back.get('timed_out')} timed out."
        + (
            f" The {len(cancelled)} terminal(s) it never reached were cancelled: they keep "
            f"version {v1}, nothing was sent to them."
            if cancelled
            else ""
        )
    )
    refused = api.call("POST", "/api/v1/documents/config/assignments",
                       json={"version": version, "scope": "fleet"})  # fmt: skip
    err = (refused.json().get("error") or {}) if refused.status_code != 201 else {}
    withdrawn = refused.status_code == 409
    say(
        f"   Last, version {version} was withdrawn: it keeps its number, but assigning it "
        f"again is refused ({refused.status_code} {err.get('code')}: “{err.get('message')}”)."
    )
    add(
        "13b. bad config: rollback",
        "every applied one restored, withdrawn",
        f"{len(restored)}/{len(applied)} restored to v{rv}, v{version} "
        + ("withdrawn" if withdrawn else f"assignable ({refused.status_code})"),
        bool(applied)
        and {d["device_id"] for d in restored} == {d["device_id"] for d in applied}
        and len(restore_versions) == 1
        and restore_versions[0] > version
        and back.get("pending") == 0
        and withdrawn,
    )
    # The terminals themselves: the config in force in each one's own database.
    by_id = {d["device_id"]: d for d in devices}
    seen: Counter[str] = Counter()
    wrong = []
    for t in fleet:
        got_version, got_floor = in_force(t)
        d = by_id.get(t.device_id or "")
        want = v1 if d is None or d["restore_status"] != "restored" else d["restore_version"]
        seen[f"v{got_version}"] += 1
        if got_version != want or got_floor != BASELINE_FLOOR or t.failing or t.terminal.last_error:
            wrong.append(f"{t.name} v{got_version} {eur(got_floor)} {t.terminal.last_error}")
    jams = sum(t.printer.state == "jam" for t in xr7)
    say(
        f"   Asked the terminals themselves (the config in force in each one's database): "
        f"{TERMINALS - len(wrong)} of {TERMINALS} run a floor limit of {eur(BASELINE_FLOOR)} "
        f"again ({_counts(seen)}); the XR-7 printers jammed now: {jams}; errors: "
        f"{'; '.join(wrong) or 'none'}. Took {took:.0f} s."
    )
    add(
        "13c. terminals after the rollback",
        f"all {TERMINALS} on v{v1}'s content",
        f"{TERMINALS - len(wrong)} on {eur(BASELINE_FLOOR)} ({_counts(seen)}), {jams} jammed",
        not wrong and jams == 0,
    )


def good(rollouts: Rollouts, fleet: SimFleet, *, add: AddCheck, say: Say) -> None:
    """Part 14: a config every model takes, rolled out to the end."""
    say(
        f"14. The operator rolls out a config every model takes: floor limit "
        f"{eur(GOOD_FLOOR)}, the same groups, waves and threshold."
    )
    started = rollouts.start(GOOD_FLOOR, "a floor limit the XR-7 takes")
    rid = started["rollout_id"]
    v, took = rollouts.follow(rid)
    version = int(v["document"]["version"])
    devices = rollouts.devices(rid)
    say(f"   Rollout {rid} made config version {version}:")
    rollouts.tell_waves(v, devices)
    healthy = sum(d["status"] == "healthy" for d in devices)
    on = [t for t in fleet if in_force(t) == (version, GOOD_FLOOR) and not t.terminal.last_error]
    say(
        f"   It {v['status']} in {took:.0f} s: {healthy} of {len(devices)} terminals healthy "
        f"on version {version}. Asked the terminals themselves: {len(on)} of {TERMINALS} run "
        f"it ({eur(GOOD_FLOOR)}), with no error."
    )
    add(
        "14a. good config",
        f"succeeded, {TERMINALS}/{TERMINALS} healthy on it",
        f"{v['status']}, {healthy} healthy, {len(on)} on v{version}",
        v["status"] == "succeeded"
        and healthy == TERMINALS
        and len(on) == TERMINALS
        and all(w["status"] == "done" for w in v["waves"]),
    )
