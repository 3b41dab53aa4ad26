"""``install_release`` as the command processor takes it (``sync.device.commands`` with
``sync.device.releases``): refused where it cannot be installed or while another install
is under way, answered at once for the release already running, and a finished install's
outcome reported once as ``release_result``. The download and install themselves run
against real daemons in tests/packaging/test_release_install.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_sync_device_commands import Rig, envelope

from edge.store.memory import MemoryStore
from sync.device import releases
from sync.device.releases import ReleaseHooks, Tree

MANIFEST = "ab" * 32


def release_doc(version: int, release: str = "1.1.0", **content: Any) -> dict[str, Any]:
    body = {"release": release, "manifest_sha256": MANIFEST, "files": 90, "bytes": 39_000_000}
    return {"kind": "release", "version": version, "content": body | content}


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Rig, Path]:
    """A rig whose terminal runs release 1.0.0 from an installed tree."""
    rig = Rig(MemoryStore())
    running = tmp_path / "opt" / "tillflow" / "releases" / "1.0.0"
    running.mkdir(parents=True)
    tree = Tree(root=tmp_path, running=running, release="1.0.0")
    data = tmp_path / "data"
    rig.processor.releases = ReleaseHooks(
        rig.processor.identity, rig.store, rig.terminal, rig.clock, tree=tree, data_dir=data
    )
    return rig, data


def test_install_release__refused_by_a_terminal_not_running_from_an_installed_tree():
    rig = Rig(MemoryStore())  # from source: no tree
    (out,) = rig.take(envelope(1, "install_release", release_doc(1)))
    assert (out.status, out.reason) == ("refused", "cannot_install")
    (result,) = rig.results()
    assert result.reason is not None and "opt/tillflow/releases" in result.reason
    assert rig.store.active_document("release") is None


def test_install_release__a_bad_release_document_is_refused(installed):
    rig, _ = installed
    (out,) = rig.take(envelope(1, "install_release", release_doc(1, manifest_sha256="xyz")))
    assert (out.status, out.reason) == ("refused", "invalid_document")
    (out,) = rig.take(envelope(2, "install_release", None))
    assert (out.status, out.reason) == ("refused", "invalid_document")


def test_install_release__the_running_release_is_answered_in_the_commands_transaction(installed):
    rig, data = installed
    (out,) = rig.take(envelope(1, "install_release", release_doc(1, release="1.0.0")))
    assert (out.status, out.document) == ("applied", ("release", 1))
    (msg,) = rig.outbox("release_result")
    assert msg.payload == {
        "command_id": "c-1", "release": "1.0.0", "status": "installed",
        "reason": "already running", "bytes_downloaded": 0, "from_release": "1.0.0",
    }  # fmt: skip
    assert not (data / "releases" / "pending.json").exists()  # nothing to fetch
    # Versions only grow: the same version again is stale.
    (out,) = rig.take(envelope(2, "install_release", release_doc(1, release="1.0.0")))
    assert (out.status, out.reason) == ("refused", "stale_version")


def test_install_release__refused_while_another_install_is_under_way(installed):
    rig, data = installed
    pending = data / "releases" / "pending.json"
    pending.parent.mkdir(parents=True)
    state = {"command_id": "c-0", "release": "0.9.0", "state": "installing"}
    pending.write_text(json.dumps(state | {"install_started_at": rig.clock.now()}))
    (out,) = rig.take(envelope(1, "install_release", release_doc(1)))
    assert (out.status, out.reason) == ("refused", "install_in_progress")
    (result,) = rig.results()
    assert result.reason == "install_in_progress: release 0.9.0 is being installed"


@pytest.mark.parametrize(
    ("rc", "status", "words"),
    [(0, "installed", None), (4, "failed", "rolled back"), (3, "failed", "refused the bundle")],
)
def test_install_release__a_finished_install_is_reported_once(installed, rc, status, words):
    rig, data = installed
    base = data / "releases"
    base.mkdir(parents=True)
    state = {"command_id": "c-7", "release": "1.1.0", "state": "installing",
             "bytes_downloaded": 4_353_120, "from_release": "1.0.0"}  # fmt: skip
    (base / "pending.json").write_text(json.dumps(state))
    rig.take()  # install.sh still at work: nothing yet
    assert rig.outbox("release_result") == []
    (base / "install.log").write_text("install.sh: verifying\ninstall.sh: the last word\n")
    (base / "install.rc").write_text(f"{rc}\n")
    rig.take()
    rig.take()  # once only
    (msg,) = rig.outbox("release_result")
    assert msg.payload["status"] == status and msg.payload["command_id"] == "c-7"
    assert msg.payload["bytes_downloaded"] == 4_353_120
    if words is None:
        assert msg.payload["reason"] is None
    else:
        assert words in msg.payload["reason"] and "the last word" in msg.payload["reason"]
    events = [e for e, _ in rig.audit()]
    assert events == ["release_installed" if status == "installed" else "release_failed"]
    assert not (base / "pending.json").exists() and not (base / "install.rc").exists()


def test_install_release__an_install_sh_that_never_finished_fails_after_its_deadline(installed):
    rig, data = installed
    base = data / "releases"
    base.mkdir(parents=True)
    began = rig.clock.now()
    (base / "pending.json").write_text(
        json.dumps(
            {
                "command_id": "c-8",
                "release": "1.1.0",
                "state": "installing",
                "install_started_at": began,
            }
        )
    )
    rig.take()
    assert rig.outbox("release_result") == []
    rig.clock.advance(releases.INSTALL_DEADLINE_S + 1)
    rig.take()
    (msg,) = rig.outbox("release_result")
    assert msg.payload["status"] == "failed" and "did not finish" in msg.payload["reason"]


@pytest.mark.parametrize(
    "line", [f"{'a' * 64}  ../etc/passwd", f"{'a' * 64}  /abs", f"{'A' * 64}  x", "short  x"]
)
def test_parse_sums__refuses_a_malformed_line(line):
    with pytest.raises(releases.InstallFailed, match="malformed"):
        releases.parse_sums(line + "\n")


def test_find_tree__knows_an_installed_binary_and_nothing_else(tmp_path):
    exe = tmp_path / "opt" / "tillflow" / "releases" / "2.0.0" / "tillflow-edge"
    exe.parent.mkdir(parents=True)
    exe.write_bytes(b"")
    (exe.parent / "VERSION").write_text("2.0.0\n")
    tree = releases.find_tree(str(exe))
    assert tree is not None and (tree.root, tree.release) == (tmp_path, "2.0.0")
    assert tree.pubkey == tmp_path / "etc" / "tillflow" / "release.pub"
    assert tree.install_args()[:4] == ["--root", str(tmp_path), "--supervise", "process"]
    assert releases.find_tree(str(tmp_path / "bin" / "tillflow-edge")) is None
    assert releases.find_tree() is None  # from source
