"""The terminal's delta download of a release (``sync.device.releases.Installer``)
against a real ``tillflow cloud serve`` on PostgreSQL, through a fault proxy on
loopback, without the frozen binary: the issue's three promises, each seen from outside.

* An interrupted download resumes: the link dies half way through the largest file
  (``cut_response`` of ``hwsim.faultproxy``), the next try asks for the rest with
  ``Range``, and the bytes downloaded in all are exactly the bytes of the files the
  terminal did not hold: not one fetched twice.
* A daemon that stopped mid-download (its ``pending.json`` says ``downloading``, half
  a file in ``partial/``) resumes it when it next syncs (``report_finished``): only the
  rest of that file and the files not yet fetched come down.
* A corrupt file is refused and fetched again: a partial copy planted with wrong bytes
  (as a crash could leave) is refused by its SHA-256 and fetched whole.
* Nothing of A is touched until B verifies whole: A's installed files (content, inode,
  mode, mtime) and ``current`` are as before at the moment the installer is launched,
  and after a failed install (a file the cloud serves substituted). B's unchanged files
  are hard links to A's (nothing downloaded for them); one whose mode changes is a copy,
  so A's file keeps its mode.

The installed tree of A is laid out as ``install.sh --root`` lays it out
(``<root>/opt/tillflow/releases/<v>/`` holding the bundle's ``tillflow-edge/`` and the
update script; the pinned key in ``<root>/etc/tillflow/release.pub``). What launches
``install.sh`` is the test's (it records the launch and what it saw then): running it is
``tests/packaging/test_release_install.py``'s, with the real binary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hwsim.faultproxy import FaultPlan, FaultProxy
from test_releases import KeyedCloud, tar_gz

from cloud.releases import store as releases_store
from edge.engine.clock import SystemClock
from edge.store.memory import MemoryStore
from edge.terminal.service.release import generate_keypair, parse_sums, sign_bundle, verify_bundle
from sync import wire
from sync.device import releases
from sync.device.identity import enroll
from sync.device.releases import Installer, Tree

pytestmark = [pytest.mark.postgres]

#: What both releases share (the "interpreter"), and the executable each has its own of.
SHARED = hashlib.shake_256(b"shared").digest(1 << 20)
EXE = {"1.0.0": hashlib.shake_256(b"exe-a").digest(3 << 19), "1.1.0": b"B" * (3 << 19)}
TOOL = b"#!/bin/sh\necho tool\n"  # the same bytes; 0644 in A, 0755 in B


def bundle(root: Path, version: str, key: Path) -> Path:
    """An unpacked bundle in ``make bundle``'s layout, signed with ``key``."""
    folder = root / f"tillflow-edge-{version}"
    internal = folder / "tillflow-edge" / "_internal"
    internal.mkdir(parents=True)
    (folder / "VERSION").write_text(version + "\n")
    (folder / "install.sh").write_text("#!/bin/sh\nexit 0\n")
    (folder / "install.sh").chmod(0o755)
    (folder / "tillflow-edge-update.sh").write_text("#!/bin/sh\nexit 0\n")
    (folder / "tillflow-edge-update.sh").chmod(0o755)
    (folder / "edge.yaml").write_text("device_id: T\n")
    exe = folder / "tillflow-edge" / "tillflow-edge"
    exe.write_bytes(b"\x7fELF" + EXE[version])
    exe.chmod(0o755)
    (internal / "libpython.so").write_bytes(SHARED)
    (internal / "base_library.zip").write_bytes(b"stdlib " + version.encode())
    (internal / "tool.sh").write_bytes(TOOL)
    (internal / "tool.sh").chmod(0o755 if version == "1.1.0" else 0o644)
    sign_bundle(folder, key)
    return folder


def install_a(bundle_a: Path, root: Path, pub: Path) -> Tree:
    """A's tree as install.sh lays it out (module docstring)."""
    running = root / "opt" / "tillflow" / "releases" / "1.0.0"
    shutil.copytree(bundle_a / "tillflow-edge", running)
    shutil.copy2(bundle_a / "VERSION", running / "VERSION")
    shutil.copy2(bundle_a / "tillflow-edge-update.sh", running / "tillflow-edge-update.sh")
    os.symlink("releases/1.0.0", root / "opt" / "tillflow" / "current")
    (root / "etc" / "tillflow").mkdir(parents=True)
    shutil.copy2(pub, root / "etc" / "tillflow" / "release.pub")
    return Tree(root=root, running=running, release="1.0.0")


def snapshot(root: Path) -> dict[str, Any]:
    """Every installed file's bytes, inode, mode and mtime, and ``current``."""
    opt = root / "opt" / "tillflow"
    out: dict[str, Any] = {"current": os.readlink(opt / "current")}
    for path in sorted((opt / "releases").rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(opt))] = (digest, st.st_ino, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def world(new_database, tmp_path: Path) -> Iterator[dict[str, Any]]:
    key, pub = tmp_path / "release.key", tmp_path / "release.pub"
    generate_keypair(key, pub)
    (tmp_path / "cloud").mkdir()
    cloud = KeyedCloud(new_database(), tmp_path / "cloud", pub)
    cloud.start()
    try:
        made = {v: bundle(tmp_path / "media", v, key) for v in ("1.0.0", "1.1.0")}
        uploaded = {}
        with psycopg.connect(cloud.database_url, autocommit=True) as conn:
            for v, folder in made.items():
                with conn.transaction():
                    done = releases_store.upload(conn, tar_gz(folder), pub, "t", time.time())
                uploaded[v] = done.release
        root = tmp_path / "root"
        tree = install_a(made["1.0.0"], root, pub)
        data = root / "var" / "lib" / "tillflow"
        identity = enroll(cloud.url, cloud.enroll_token("store-1"), data, "1.0.0")
        with FaultProxy(upstream=("127.0.0.1", cloud.port)) as proxy:
            yield {"cloud": cloud, "bundles": made, "uploaded": uploaded, "root": root,
                   "tree": tree, "data": data, "proxy": proxy,
                   "identity": dataclasses.replace(identity, url=proxy.url)}  # fmt: skip
    finally:
        cloud.stop()


class Launch:
    """Stands where install.sh is launched: records it, and what A and the stage were."""

    def __init__(self, root: Path, pub: Path) -> None:
        self.root, self.pub = root, pub
        self.calls: list[tuple[Path, dict[str, Any]]] = []

    def __call__(self, script: Path, args: list[str], paths: releases.Paths) -> None:
        verify_bundle(script.parent, self.pub)  # the stage verifies whole by now
        self.calls.append((script.parent, snapshot(self.root)))


def content_of(r: releases_store.Release) -> wire.ReleaseContent:
    return wire.ReleaseContent(
        release=r.release, manifest_sha256=r.manifest_sha256, files=r.files, bytes=r.bytes
    )


def seed_cutting_body(request: int) -> int:
    """A seed whose cut draw for request ``request`` (0-based) keeps half the body
    (``faultproxy._torn_response``: a cut >= 0.5; the proxy draws three numbers a
    request: fate, delay, cut)."""
    for seed in range(1000):
        rng = random.Random(seed)
        draws = [rng.random() for _ in range(3 * (request + 1))]
        if draws[-1] >= 0.5:
            return seed
    raise AssertionError("no seed found")


def releases_installed() -> tuple[str, ...]:
    """What install.sh installs of a bundle (the rest the terminal does not hold after
    a first install from media)."""
    return ("tillflow-edge/", "tillflow-edge-update.sh")


def test_delta__resumes_a_cut_download_refuses_a_corrupt_copy_and_leaves_a_untouched(
    world, monkeypatch
):
    monkeypatch.setattr(releases, "RETRY_S", 0.05)  # the retry back-off, not a clock
    root, data, proxy = world["root"], world["data"], world["proxy"]
    a_dir, b_dir = world["bundles"]["1.0.0"], world["bundles"]["1.1.0"]
    a_listed, b_listed = (
        parse_sums((a_dir / "SHA256SUMS").read_text()),
        parse_sums((b_dir / "SHA256SUMS").read_text()),
    )
    installed = {d for rel, d in a_listed.items() if rel.startswith(releases_installed())}
    wanted = sorted(rel for rel, d in b_listed.items() if d not in installed)
    exe = "tillflow-edge/tillflow-edge"
    assert exe in wanted and "tillflow-edge/_internal/libpython.so" not in wanted
    needed = sum((b_dir / rel).stat().st_size for rel in wanted)

    # A corrupt partial copy of B's base_library.zip (a crash mid-write could leave one).
    base = b_listed["tillflow-edge/_internal/base_library.zip"]
    partial = data / "releases" / "partial"
    partial.mkdir(parents=True)
    (partial / f"{base}.part").write_bytes(b"\0" * 3)
    # The link dies half way through the executable: request 0 is the manifest, then
    # the files B needs in path order (the corrupt partial's resume is one more).
    cut_at = 1 + wanted.index(exe) + (1 if wanted.index(exe) > wanted.index(
        "tillflow-edge/_internal/base_library.zip") else 0)  # fmt: skip
    script = ["pass"] * cut_at + ["cut_response"]
    proxy.set_plan(FaultPlan(script=script, seed=seed_cutting_body(cut_at)))

    before = snapshot(root)
    launch = Launch(root, world["tree"].pubkey)
    store = MemoryStore()
    installer = Installer(world["tree"], data, world["identity"], store, SystemClock(),
                          launch=launch, handoff=False)  # fmt: skip
    installer.run("cmd-b", content_of(world["uploaded"]["1.1.0"]))

    assert proxy.history[cut_at] == "cut_response", proxy.history
    assert [m.payload for m in store.outbox(limit=10) if m.topic == "release_result"] == []
    (stage, seen), = launch.calls  # fmt: skip
    assert seen == before  # nothing of A touched when B, verified whole, is handed on
    # Every byte B needed, once: the cut file resumed (Range), the corrupt copy's 3
    # bytes and what came onto them (refused, then fetched whole) on top.
    resumed_on_corrupt = (b_dir / "tillflow-edge/_internal/base_library.zip").stat().st_size - 3
    assert installer.bytes_downloaded == needed + resumed_on_corrupt, (
        installer.bytes_downloaded, needed, proxy.history,
    )  # fmt: skip
    # Unchanged files are A's own (hard links); the one whose mode changed is a copy.
    running = world["tree"].running
    lib = "_internal/libpython.so"
    assert (stage / "tillflow-edge" / lib).stat().st_ino == (running / lib).stat().st_ino
    tool = stage / "tillflow-edge" / "_internal" / "tool.sh"
    assert tool.stat().st_ino != (running / "_internal" / "tool.sh").stat().st_ino
    assert tool.stat().st_mode & 0o777 == 0o755
    assert (running / "_internal" / "tool.sh").stat().st_mode & 0o777 == 0o644
    assert snapshot(root) == before


def test_delta__a_substituted_file_fails_the_install_and_a_is_untouched(world, monkeypatch):
    monkeypatch.setattr(releases, "RETRY_S", 0.05)
    root, data, cloud = world["root"], world["data"], world["cloud"]
    b_dir = world["bundles"]["1.1.0"]
    exe_digest = parse_sums((b_dir / "SHA256SUMS").read_text())["tillflow-edge/tillflow-edge"]
    size = (b_dir / "tillflow-edge" / "tillflow-edge").stat().st_size
    with psycopg.connect(cloud.database_url, autocommit=True) as conn:
        conn.execute(  # the cloud serves other bytes of the same size under its hash
            "UPDATE release_blobs SET content = %s WHERE sha256 = %s",
            (b"X" * size, exe_digest),
        )
    before = snapshot(root)
    launch = Launch(root, world["tree"].pubkey)
    store = MemoryStore()
    installer = Installer(world["tree"], data, world["identity"], store, SystemClock(),
                          launch=launch, handoff=False)  # fmt: skip
    installer.run(f"cmd-{uuid.uuid4().hex[:6]}", content_of(world["uploaded"]["1.1.0"]))

    assert launch.calls == []  # never handed on
    (result,) = [m.payload for m in store.outbox(limit=10) if m.topic == "release_result"]
    assert result["status"] == "failed"
    assert "tillflow-edge/tillflow-edge does not match its SHA-256" in result["reason"]
    assert f"after {releases.FETCH_ATTEMPTS} tries" in result["reason"]
    assert snapshot(root) == before
    assert not (data / "releases" / "stage").exists()  # the half-built B is gone


def test_delta__a_daemon_stopped_mid_download_resumes_it_when_it_next_syncs(world):
    data, root = world["data"], world["root"]
    b_dir, b = world["bundles"]["1.1.0"], world["uploaded"]["1.1.0"]
    b_listed = parse_sums((b_dir / "SHA256SUMS").read_text())
    a_listed = parse_sums((world["bundles"]["1.0.0"] / "SHA256SUMS").read_text())
    installed = {d for rel, d in a_listed.items() if rel.startswith(releases_installed())}
    needed = sum((b_dir / rel).stat().st_size for rel, d in b_listed.items() if d not in installed)
    # What the stopped daemon left: its pending state and half the executable.
    exe = (b_dir / "tillflow-edge" / "tillflow-edge").read_bytes()
    half = len(exe) // 2
    partial = data / "releases" / "partial"
    partial.mkdir(parents=True)
    (partial / f"{b_listed['tillflow-edge/tillflow-edge']}.part").write_bytes(exe[:half])
    (data / "releases" / "pending.json").write_text(json.dumps({
        "command_id": "cmd-r", "release": b.release, "manifest_sha256": b.manifest_sha256,
        "files": b.files, "bytes": b.bytes, "from_release": "1.0.0", "state": "downloading",
        "bytes_downloaded": half, "started_at": time.time(),
    }))  # fmt: skip
    before = snapshot(root)
    launch = Launch(root, world["tree"].pubkey)
    store, clock = MemoryStore(), SystemClock()
    made: list[Installer] = []

    def make() -> Installer:
        made.append(Installer(world["tree"], data, world["identity"], store, clock,
                              launch=launch, handoff=False))  # fmt: skip
        return made[-1]

    assert releases.report_finished(data, store, clock, make) is False  # resumed, not done
    releases._threads[data].join(timeout=120)
    assert not releases._threads[data].is_alive()
    ((stage, seen),) = launch.calls
    assert seen == before
    # The executable's second half and the other files B needs, nothing more.
    assert made[0].bytes_downloaded == needed, (made[0].bytes_downloaded, needed)
    state = json.loads((data / "releases" / "pending.json").read_text())
    assert state["state"] == "installing" and state["bytes_downloaded"] == needed
    assert (stage / "tillflow-edge" / "tillflow-edge").read_bytes() == exe
