"""ReleaseRollout end to end, with real daemons (issue 14): three terminals installed by
``install.sh --root R_i --supervise process`` from a signed bundle of the frozen binary
(release A), enrolled and syncing with the real cloud (``hwsim.cloudrig.CloudRig``:
``tillflow cloud serve`` and one ``tillflow cloud worker`` on a fresh PostgreSQL
database and the serverless broker, with the release key, ``release_pubkey_file``).

1. Release B (a one-line change in ``edge/``) and C (B with its interpreter's stdlib
   removed: it dies at start) are uploaded through the Fleet API.
2. ``POST /api/v1/release/rollout`` of B to the three, waves ``["1", "100%"]``, a short
   soak: it succeeds; every daemon downloads the delta, verifies it with its pinned
   release key, installs it, restarts on it and reports it (heartbeat
   ``binary_version``); each got exactly one ``install_release`` for it.
3. A rollout of C: the first wave's terminal installs it, the new binary never becomes
   healthy, ``install.sh`` rolls back by itself and the daemon (B again) reports
   ``failed``; the threshold stops the rollout in wave 1, the saga restores (a new
   release document with B's content: already running, nothing downloaded) and
   withdraws C's; the rollout is ``rolled_back`` with its reason; the terminals never
   notified got nothing; nothing of C runs anywhere.

The B binary is built once here with PyInstaller (``test_release_install.build_next``;
``TILLFLOW_EDGE_NEXT_DIST`` names a prebuilt one with the version ``<v>.1``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import services
from conftest import config_text
from hwsim.cloudrig import CloudRig, FleetApi
from test_release_install import (
    NEXT_ENV,
    _read_id,
    build_next,
    current,
    heartbeat_version,
    install,
    make_bundle,
    project_version,
    running_exe,
    sql,
)

from edge.terminal.service.release import generate_keypair

pytestmark = [pytest.mark.postgres, pytest.mark.binary, pytest.mark.slow]

TERMINALS = 3
#: The rollout options both rollouts take: one terminal, then the rest; a 2 s soak;
#: abort past 50% with a sample of one (wave 1 is one terminal).
WAVES = ["1", "100%"]
SOAK_S = 2
ABORT = {"failure_percent": 50, "min_sample_wave": 1, "min_sample_total": 1}
DEVICE_TIMEOUT_S = 240
#: Upper bounds of the waits (seconds); reached only when something is broken.
ENROLL_S = 60.0
ROLLOUT_S = 300.0
FINISHED = ("succeeded", "rolled_back", "failed")


@pytest.fixture(scope="module")
def releases(binary: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Release key; bundles of this build (A), the next build (B), and B with its
    interpreter's stdlib removed under another version (C: dies at start)."""
    work = tmp_path_factory.mktemp("rollout-releases")
    key, pub = work / "release.key", work / "release.pub"
    generate_keypair(key, pub)
    v = project_version()
    names = {"a": v, "b": f"{v}.1", "c": f"{v}.2"}
    if os.environ.get(NEXT_ENV):
        next_dist, built_s = Path(os.environ[NEXT_ENV]), None
    else:
        next_dist, built_s = build_next(work / "next", names["b"])
    broken = work / "broken-dist"
    shutil.copytree(next_dist, broken)
    (broken / "_internal" / "base_library.zip").unlink()
    out: dict[str, Any] = {"key": key, "pub": pub, "names": names, "build_s": built_s}
    for label, dist in (("a", binary.parent), ("b", next_dist), ("c", broken)):
        out[label] = make_bundle(dist, names[label], key, work / label)
    return out


@pytest.fixture
def rig(tmp_path: Path, releases: dict[str, Any]) -> Iterator[CloudRig]:
    """serve + one worker on a fresh database, the serverless broker, the release key."""
    name = f"tillflow_relroll_{uuid.uuid4().hex[:10]}"
    admin_url = services.postgres_admin_url()
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL not reachable at {admin_url}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {admin_url}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    settings = {"broker_url": None, "release_pubkey_file": str(releases["pub"])}
    cloud = CloudRig(url, "", tmp_path / "cloud", settings=settings)
    try:
        cloud.start(serves=1, workers=1)
        yield cloud
    finally:
        cloud.stop()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def api(rig: CloudRig) -> Iterator[FleetApi]:
    with rig.fleet() as client:
        yield client


@pytest.fixture
def roots(tmp_path: Path, short_dir: Path, sims, rig: CloudRig) -> Iterator[list[Path]]:
    """Three install roots, each a terminal's config pointing at the simulators and
    enrolling with the cloud (one token each)."""
    devices, acquirer = sims
    made = []
    for i in range(TERMINALS):
        r = tmp_path / f"root{i}"
        (r / "etc" / "tillflow").mkdir(parents=True)
        token = rig.enroll_token("store-roll")
        text = config_text(r / "var" / "lib" / "tillflow", short_dir / f"edge{i}.sock",
                           devices.url, acquirer.url).replace("T-PKG", f"T-ROLL-{i}")  # fmt: skip
        text += f"cloud: {{url: '{rig.url}', sync_interval_s: 0.5, enroll_token: '{token}'}}\n"
        (r / "etc" / "tillflow" / "edge.yaml").write_text(text)
        made.append(r)
    yield made
    for r in made:  # stop the daemons install.sh (or a release's install) left running
        pidfile = r / "run" / "tillflow-edge.pid"
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def wait(what: str, check: Any, rig: CloudRig, logs: list[Path], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {p}\n{p.read_text(errors='replace')[-2500:] if p.exists() else '(none)'}"
                for p in logs
            )
            pytest.fail(f"{what}: not within {timeout:g}s\n{tails}\n{rig.logs(40)}")
        time.sleep(0.5)  # polling the cloud for what the daemons and the run did


def upload(api: FleetApi, tar: Path) -> dict[str, Any]:
    made: dict[str, Any] = api.ok(
        "POST", "/api/v1/releases", status=201, content=tar.read_bytes(),
        headers={"content-type": "application/gzip"},
    )  # fmt: skip
    return made


def start_rollout(api: FleetApi, release: str, ids: list[str], reason: str) -> str:
    body = {
        "release": release,
        "target": {"device_ids": ids},
        "waves": WAVES,
        "soak_s": SOAK_S,
        "abort": ABORT,
        "device_timeout_s": DEVICE_TIMEOUT_S,
        "reason": reason,
    }
    return str(api.post("/api/v1/release/rollout", body)["rollout_id"])


def finished(api: FleetApi, rollout_id: str) -> dict[str, Any] | None:
    v: dict[str, Any] = api.get(f"/api/v1/rollouts/{rollout_id}")
    if v["status"] in FINISHED and (v["rollback"] or {}).get("pending", 0) == 0:
        return v
    return None


def installs_of(url: str, release: str) -> dict[str, int]:
    """install_release commands naming ``release``, counted per device."""
    rows = sql(
        url,
        "SELECT device_id, count(*) FROM commands WHERE action = 'install_release' "
        "AND document -> 'content' ->> 'release' = %s GROUP BY device_id",
        (release,),
    )
    return {str(d): int(n) for d, n in rows}


def results_of(url: str, command_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = sql(
        url,
        "SELECT payload FROM sync_messages WHERE topic = 'release_result' "
        "AND payload->>'command_id' = ANY(%s)",
        (command_ids,),
    )
    return {str(p["command_id"]): p for (p,) in rows}


def running_from(roots: list[Path], release: str) -> list[str]:
    """Processes whose executable is ``release``'s binary under one of ``roots``."""
    found = []
    wanted = [str(r / "opt" / "tillflow" / "releases" / release) for r in roots]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                exe = os.readlink(entry / "exe")
                if any(exe.startswith(w + "/") for w in wanted):
                    found.append(f"{entry.name}: {exe}")
    return found


def test_release_rollout__waves_install_b_everywhere_and_c_is_rolled_back_by_saga(
    releases, rig, api, roots
):
    began = time.monotonic()
    names = releases["names"]
    url = rig.database_url
    logs = [r / "var" / "log" / "tillflow-edge.log" for r in roots]

    # 1. three terminals on A, each enrolled and reporting A
    for r in roots:
        done = install(releases["a"][1], r, "--pubkey", str(releases["pub"]),
                       "--verifier", "openssl")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert current(r) == f"releases/{names['a']}"
    ids = []
    for r, log in zip(roots, logs, strict=True):
        identity = r / "var" / "lib" / "tillflow" / "sync" / "identity.json"
        ids.append(wait("enrolled", lambda p=identity: _read_id(p), rig, [log], ENROLL_S))
    by_id = dict(zip(ids, roots, strict=True))
    for d in ids:
        wait(f"{d} reports A", lambda d=d: heartbeat_version(url, d) == names["a"], rig, logs,
             ENROLL_S)  # fmt: skip
    ready_s = time.monotonic() - began

    # 2. B and C uploaded (verified by the cloud with the release key)
    b = upload(api, releases["b"][0])
    c = upload(api, releases["c"][0])
    assert (b["release"], c["release"]) == (names["b"], names["c"])
    assert b["created"] and c["created"]

    # 3. B to the three in two waves: succeeds, every daemon on B, one command each
    t0 = time.monotonic()
    ro_b = start_rollout(api, names["b"], ids, "release B")
    view = wait("rollout of B finished", lambda: finished(api, ro_b), rig, logs, ROLLOUT_S)
    b_s = time.monotonic() - t0
    assert view["status"] == "succeeded", view
    assert view["kind"] == "release" and view["document"]["release"] == names["b"], view
    assert [(w["wave"], w["targeted"], w["healthy"]) for w in view["waves"]] == [
        (1, 1, 1), (2, 2, 2)
    ], view["waves"]  # fmt: skip
    assert all(w["failed"] == w["refused"] == w["timed_out"] == w["pending"] == 0
               for w in view["waves"]), view["waves"]  # fmt: skip
    assert view["abort"] is None and view["rollback"] is None, view
    devices_b = list(api.pages(f"/api/v1/rollouts/{ro_b}/devices"))
    assert sorted(x["device_id"] for x in devices_b) == sorted(ids)
    assert {x["status"] for x in devices_b} == {"healthy"}, devices_b
    for d in ids:
        assert heartbeat_version(url, d) == names["b"], d
        assert current(by_id[d]) == f"releases/{names['b']}"
        assert running_exe(by_id[d]).endswith(f"/releases/{names['b']}/tillflow-edge")
    assert installs_of(url, names["b"]) == dict.fromkeys(ids, 1)
    outcomes = results_of(url, [x["command_id"] for x in devices_b])
    assert len(outcomes) == TERMINALS, outcomes
    assert {o["status"] for o in outcomes.values()} == {"installed"}, outcomes
    downloaded = sorted(int(o["bytes_downloaded"]) for o in outcomes.values())
    assert all(0 < n < b["bytes"] / 3 for n in downloaded), (downloaded, b["bytes"])

    # 4. C: the first wave's terminal rolls back by itself and reports failed; the saga
    # restores it to B; the others are never told about C
    t0 = time.monotonic()
    ro_c = start_rollout(api, names["c"], ids, "release C")
    view = wait("rollout of C finished", lambda: finished(api, ro_c), rig, logs, ROLLOUT_S)
    c_s = time.monotonic() - t0
    assert view["status"] == "rolled_back", view
    abort = view["abort"]
    assert abort is not None and abort["criterion"] == "wave_failure_rate", view
    assert abort["wave"] == 1 and abort["by"], abort
    # the reason is the criterion and its figures (an operator's abort adds its words)
    assert abort["figures"] == {"failures": 1, "sampled": 1, "failure_percent": 100.0,
                                "threshold": 50.0}, abort  # fmt: skip
    assert view["rollback"]["status"] == "done", view["rollback"]
    assert (view["rollback"]["to_restore"], view["rollback"]["restored"]) == (1, 1), view
    assert view["waves"][0]["failed"] == 1 and view["waves"][0]["notified"] == 1, view["waves"]
    assert all(w["notified"] == 0 for w in view["waves"][1:]), view["waves"]
    devices_c = list(api.pages(f"/api/v1/rollouts/{ro_c}/devices"))
    first = [x for x in devices_c if x["wave"] == 1]
    assert len(first) == 1, devices_c
    bad = first[0]
    assert bad["status"] == "failed" and "rolled back" in (bad["last_error"] or ""), bad
    assert bad["restore_status"] == "restored", bad
    outcome = results_of(url, [bad["command_id"]])[bad["command_id"]]
    assert outcome["status"] == "failed" and "rolled back" in outcome["reason"], outcome
    restore = results_of(url, [bad["restore_command_id"]])[bad["restore_command_id"]]
    assert restore["status"] == "installed" and restore["release"] == names["b"], restore
    assert restore["bytes_downloaded"] == 0, restore
    others = [x for x in devices_c if x["wave"] != 1]
    assert all(x["command_id"] is None and x["notified_at"] is None for x in others), others
    assert installs_of(url, names["c"]) == {bad["device_id"]: 1}
    # the restore is one more install_release of B, to the failed terminal only
    assert installs_of(url, names["b"]) == {d: 1 + (d == bad["device_id"]) for d in ids}
    withdrawn = sql(url, "SELECT withdrawn_at FROM sync_documents WHERE kind = 'release' "
                    "AND version = %s", (view["document"]["version"],))  # fmt: skip
    assert withdrawn and withdrawn[0][0] is not None, withdrawn
    for d in ids:
        assert heartbeat_version(url, d) == names["b"], d
        assert current(by_id[d]) == f"releases/{names['b']}"
        assert running_exe(by_id[d]).endswith(f"/releases/{names['b']}/tillflow-edge")
    assert running_from(roots, names["c"]) == []

    print(
        f"\nrelease rollout: {TERMINALS} daemons installed and on A in {ready_s:.1f} s; "
        f"B rolled out in {b_s:.1f} s (waves {WAVES}, soak {SOAK_S} s; each terminal "
        f"downloaded {downloaded} bytes of B's {b['bytes']}); C rolled back in {c_s:.1f} s "
        f"({abort['criterion']}: {abort['figures']}); the B binary built in "
        f"{releases['build_s'] and round(releases['build_s'], 1)} s; whole test "
        f"{time.monotonic() - began:.1f} s after the bundles"
    )
