"""install_release end to end, with real daemons: a terminal installed by
``install.sh --root … --supervise process`` from a signed bundle of the frozen binary,
syncing with ``tillflow cloud serve`` on PostgreSQL, is told to install a second release
built from a copy of this tree with a one-line change in ``edge/`` and a bumped version.
It fetches the signed manifest, downloads only the files whose hashes it does not hold
(one of them planted corrupt, refused and fetched again), verifies the tree whole, runs
the installer, restarts on the new release and reports it (``release_result``
installed, the heartbeat's ``binary_version``). A release whose binary does not start is
rolled back by the installer and reported failed; one whose file the cloud serves
substituted is refused before anything is touched; and going back to the first release
(a rollout's restore) downloads nothing.

The second binary is built here with PyInstaller (about 15-20 s on this machine;
``TILLFLOW_EDGE_NEXT_DIST`` names a prebuilt one with the version ``<v>.1``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import services
from conftest import REPO, api, config_text, pay
from hwsim.syncrig import Cloud

from cloud.releases import store as releases
from cloud.sync.keys import load_key
from cloud.sync.postgres import PostgresSyncBackend
from edge.engine.clock import SystemClock
from edge.terminal.service.release import generate_keypair
from sync import wire
from sync.server import SyncService
from sync.server_records import NewDocument

pytestmark = [pytest.mark.postgres, pytest.mark.binary, pytest.mark.slow]

TOOL = REPO / "packaging" / "release_tool.py"
BUILD_TIMEOUT_S = 600
INSTALL_TIMEOUT_S = 120
#: Upper bound of a whole download-install-restart-report; reached only when broken.
OUTCOME_S = 180.0
NEXT_ENV = "TILLFLOW_EDGE_NEXT_DIST"


def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env.pop("PYTHONPATH", None)
    return env


def build_next(work: Path, version: str) -> tuple[Path, float]:
    """The frozen binary of a copy of this tree, its version ``version`` and one line of
    ``edge/`` changed; returns its onedir folder and the seconds the build took."""
    src = work / "src"
    src.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("edge", "sync", "packaging"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    text = (REPO / "pyproject.toml").read_text()
    old = f'version = "{project_version()}"'
    assert old in text
    (src / "pyproject.toml").write_text(text.replace(old, f'version = "{version}"', 1))
    with open(src / "edge" / "terminal" / "service" / "main.py", "a") as fh:
        fh.write('RELEASE_MARK = "next"  # the one line this release changes\n')
    began = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
         "--workpath", str(work / "build"), "--distpath", str(work / "dist"),
         str(src / "packaging" / "tillflow-edge.spec")],
        cwd=src, env={**os.environ, "PYTHONPATH": str(src), "PYTHONHASHSEED": "0"},
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    dist = work / "dist" / "tillflow-edge"
    # As make package does: base_library.zip sorted, so it is A's file, not a download.
    subprocess.run([sys.executable, str(TOOL), "normalise", "--dist", str(dist)],
                   check=True, capture_output=True, timeout=INSTALL_TIMEOUT_S)  # fmt: skip
    return dist, time.monotonic() - began


def make_bundle(dist: Path, version: str, key: Path, out: Path) -> tuple[Path, Path]:
    """A signed bundle of ``dist``: (the tar.gz, its unpacked directory)."""
    subprocess.run(
        [sys.executable, str(TOOL), "bundle", "--key", str(key), "--version", version,
         "--dist", str(dist), "--out", str(out)],
        check=True, capture_output=True, timeout=INSTALL_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    tar = out / f"tillflow-edge-{version}.tar.gz"
    subprocess.run(["tar", "-xzf", str(tar), "-C", str(out)], check=True, timeout=60)
    return tar, out / f"tillflow-edge-{version}"


@pytest.fixture(scope="module")
def bundles(binary: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Release key; bundles of: this build (A), the next build (B), B with its
    interpreter's stdlib removed (broken: dies at start), B again under another version
    (D: its VERSION file the cloud will serve substituted)."""
    work = tmp_path_factory.mktemp("releases")
    generate_keypair(work / "release.key", work / "release.pub")
    key = work / "release.key"
    v = project_version()
    names = {"a": v, "b": f"{v}.1", "broken": f"{v}.2", "d": f"{v}.3"}
    if os.environ.get(NEXT_ENV):
        next_dist, built_s = Path(os.environ[NEXT_ENV]), None
    else:
        next_dist, built_s = build_next(work / "next", names["b"])
    broken = work / "broken-dist"
    shutil.copytree(next_dist, broken)
    (broken / "_internal" / "base_library.zip").unlink()
    out: dict[str, Any] = {"key": key, "pub": work / "release.pub", "names": names}
    out["build_s"] = built_s
    for label, dist in (("a", binary.parent), ("b", next_dist), ("broken", broken),
                        ("d", next_dist)):  # fmt: skip
        out[label] = make_bundle(dist, names[label], key, work / label)
    return out


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    name = f"tillflow_relinst_{uuid.uuid4().hex[:10]}"
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
    (tmp_path / "cloud").mkdir()
    c = Cloud(url, tmp_path / "cloud")
    try:
        c.start()
        yield c
    finally:
        c.stop()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def root(tmp_path: Path, short_dir: Path, sims, cloud: Cloud) -> Iterator[Path]:
    """An install root whose config points at the simulators and enrolls with the cloud."""
    devices, acquirer = sims
    r = tmp_path / "root"
    (r / "etc" / "tillflow").mkdir(parents=True)
    token = cloud.enroll_token("store-rel")
    (r / "etc" / "tillflow" / "edge.yaml").write_text(
        config_text(r / "var" / "lib" / "tillflow", short_dir / "edge.sock", devices.url,
                    acquirer.url)
        + f"cloud: {{url: '{cloud.url}', sync_interval_s: 0.3, enroll_token: '{token}'}}\n"
    )  # fmt: skip
    yield r
    pidfile = r / "run" / "tillflow-edge.pid"
    if pidfile.exists():  # stop the daemon install.sh left running
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def install(bundle: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    options = ["--supervise", "process", "--health-timeout", "30"]
    return subprocess.run(
        ["sh", str(bundle / "install.sh"), "--root", str(root), *options, *extra],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=clean_env(),
    )  # fmt: skip


def sql(url: str, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def wait(what: str, check: Any, log: Path, timeout: float = OUTCOME_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
            pytest.fail(f"{what}: not within {timeout:g}s; daemon log:\n{tail}")
        time.sleep(0.2)  # polling the cloud's database for what the daemon reported


def upload(url: str, tar: Path, pub: Path) -> releases.Release:
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        done = releases.upload(conn, tar.read_bytes(), pub, "test", time.time())
    return done.release


def send_install(cloud: Cloud, device_id: str, r: releases.Release) -> str:
    content = wire.ReleaseContent(
        release=r.release, manifest_sha256=r.manifest_sha256, files=r.files, bytes=r.bytes
    )
    backend = PostgresSyncBackend(cloud.database_url, pool_size=1)
    try:
        service = SyncService(backend, SystemClock(), load_key(cloud.signing_key))
        queued = service.queue_command(
            device_id, "install_release", NewDocument(content.model_dump(), kind="release")
        )
    finally:
        backend.close()
    return queued.command_id


def result_of(url: str, device_id: str, command_id: str) -> dict[str, Any] | None:
    rows = sql(
        url,
        "SELECT payload FROM sync_messages WHERE device_id = %s AND topic = 'release_result' "
        "AND payload->>'command_id' = %s",
        (device_id, command_id),
    )
    return rows[0][0] if rows else None


def heartbeat_version(url: str, device_id: str) -> str | None:
    rows = sql(url, "SELECT heartbeat FROM device_health WHERE device_id = %s", (device_id,))
    return rows[0][0].get("binary_version") if rows else None


def running_exe(root: Path) -> str:
    pid = int((root / "run" / "tillflow-edge.pid").read_text())
    return os.readlink(f"/proc/{pid}/exe")


def current(root: Path) -> str:
    return os.readlink(root / "opt" / "tillflow" / "current")


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_install_release__downloads_the_delta_installs_restarts_and_rolls_back_a_bad_one(
    bundles, root, cloud, sims, short_dir
):
    devices, _ = sims
    names = bundles["names"]
    url = cloud.database_url
    log = root / "var" / "log" / "tillflow-edge.log"
    sock = short_dir / "edge.sock"

    first = install(bundles["a"][1], root, "--pubkey", str(bundles["pub"]), "--verifier", "openssl")
    assert first.returncode == 0, first.stderr
    assert current(root) == f"releases/{names['a']}"
    data = root / "var" / "lib" / "tillflow"
    device_id = wait("enrolled", lambda: _read_id(data / "sync" / "identity.json"), log, timeout=60)
    wait("heartbeat of A", lambda: heartbeat_version(url, device_id) == names["a"], log, 60)

    uploaded = {k: upload(url, bundles[k][0], bundles["pub"]) for k in ("a", "b", "broken", "d")}
    b = uploaded["b"]
    gz = {k: bundles[k][0].stat().st_size for k in ("a", "b")}

    # A corrupt partial copy of B's binary, as an interrupted download could leave: the
    # download resumes onto it, the digest refuses it, and it is fetched again whole.
    exe_digest = _listed(bundles["b"][1])["tillflow-edge/tillflow-edge"]
    partial = data / "releases" / "partial"
    partial.mkdir(parents=True)
    (partial / f"{exe_digest}.part").write_bytes(b"\0" * 4096)

    command = send_install(cloud, device_id, b)
    outcome = wait("B's release_result", lambda: result_of(url, device_id, command), log)
    assert outcome["status"] == "installed", outcome
    assert outcome["release"] == names["b"] and outcome["reason"] is None
    wait("heartbeat of B", lambda: heartbeat_version(url, device_id) == names["b"], log, 60)
    assert current(root) == f"releases/{names['b']}"
    assert running_exe(root).endswith(f"/releases/{names['b']}/tillflow-edge")
    assert (root / "opt" / "tillflow" / "previous").read_text().strip() == names["a"]
    status = sql(url, "SELECT status FROM commands WHERE command_id = %s", (command,))
    assert status == [("applied",)]
    text = log.read_text(errors="replace")
    assert "release_file_refused" in text or "fetched again" in text, text[-3000:]
    assert pay(devices, sock, "rel-1")["decision"] == "approved"

    downloaded = outcome["bytes_downloaded"]
    changed = _changed_bytes(bundles["a"][1], bundles["b"][1])
    exe_size = (bundles["b"][1] / "tillflow-edge" / "tillflow-edge").stat().st_size
    print(
        f"\nrelease {names['b']}: bundle {gz['b']} bytes gzip'd, tree {b.bytes} bytes in "
        f"{b.files} files; the cloud stored {b.new_bytes} new bytes for it; the terminal "
        f"downloaded {downloaded} bytes: {changed} bytes of files it did not hold, and "
        f"{exe_size - 4096} bytes resumed onto the planted corrupt partial of the "
        f"{exe_size}-byte binary, refused, then fetched again; the second binary built in "
        f"{bundles['build_s'] and round(bundles['build_s'], 1)} s"
    )
    # Only the changed files came down (plus the refused resume of the planted one).
    assert downloaded < b.bytes / 3, (downloaded, b.bytes)
    assert downloaded == changed + exe_size - 4096

    # A signed release whose binary dies at start: installed, unhealthy, rolled back.
    command = send_install(cloud, device_id, uploaded["broken"])
    outcome = wait("broken's release_result", lambda: result_of(url, device_id, command), log)
    assert outcome["status"] == "failed", outcome
    assert "rolled back" in outcome["reason"], outcome
    assert current(root) == f"releases/{names['b']}"
    assert running_exe(root).endswith(f"/releases/{names['b']}/tillflow-edge")
    wait("heartbeat of B again", lambda: heartbeat_version(url, device_id) == names["b"], log, 60)
    assert pay(devices, sock, "rel-2")["decision"] == "approved"

    # A file the cloud serves substituted (same size, other bytes): refused every time,
    # the install fails naming it, and nothing is installed or switched.
    d_version = _listed(bundles["d"][1])["VERSION"]
    substitute = (names["d"][:-1] + "9\n").encode()
    assert len(substitute) == len(names["d"]) + 1
    sql_exec(
        url, "UPDATE release_blobs SET content = %s WHERE sha256 = %s", (substitute, d_version)
    )
    before = sorted(p.name for p in (root / "opt" / "tillflow" / "releases").iterdir())
    command = send_install(cloud, device_id, uploaded["d"])
    outcome = wait("D's release_result", lambda: result_of(url, device_id, command), log)
    assert outcome["status"] == "failed", outcome
    assert "VERSION does not match its SHA-256" in outcome["reason"], outcome
    assert current(root) == f"releases/{names['b']}"
    assert sorted(p.name for p in (root / "opt" / "tillflow" / "releases").iterdir()) == before
    with api(sock) as c:
        assert c.get("/v1/health").status_code == 200

    # Back to A (a rollout's restore: a new version of the release document with A's
    # content): every file is held already -- A's tree is the previous release, the
    # bundle's own files were kept from B's install -- so nothing is downloaded.
    command = send_install(cloud, device_id, uploaded["a"])
    outcome = wait("A's release_result", lambda: result_of(url, device_id, command), log)
    assert outcome["status"] == "installed", outcome
    assert outcome["bytes_downloaded"] == 0, outcome
    wait("heartbeat of A again", lambda: heartbeat_version(url, device_id) == names["a"], log, 60)
    assert current(root) == f"releases/{names['a']}"
    assert running_exe(root).endswith(f"/releases/{names['a']}/tillflow-edge")
    assert pay(devices, sock, "rel-3")["decision"] == "approved"


def sql_exec(url: str, query: str, params: Any) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(query, params)


def _read_id(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["device_id"])
    except (OSError, ValueError, KeyError):
        return None


def _listed(bundle: Path) -> dict[str, str]:
    out = {}
    for line in (bundle / "SHA256SUMS").read_text().splitlines():
        digest, _, rel = line.partition("  ")
        out[rel] = digest
    return out


def _changed_bytes(a: Path, b: Path) -> int:
    """Bytes of B's files whose digest A's installed tree (its bundle's binary folder,
    and the update hand-off's script install.sh copies beside it) has nowhere: what a
    terminal running A must download."""
    installed = ("tillflow-edge/", "tillflow-edge-update.sh")
    held = {d for rel, d in _listed(a).items() if rel.startswith(installed)}
    return sum((b / rel).stat().st_size for rel, digest in _listed(b).items() if digest not in held)
