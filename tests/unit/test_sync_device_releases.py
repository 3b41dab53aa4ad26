"""``install_release`` as the command processor takes it (``sync.device.commands`` with
``sync.device.releases``): refused where it cannot be installed or while another install
is under way, answered at once for the release already running, and a finished install's
outcome reported once as ``release_result``; under systemd, the verified stage handed to
the root side by a request file and its result read back. The download and install themselves run
against real daemons in tests/packaging/test_release_install.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_sync_device_commands import Rig, envelope

from edge.store.memory import MemoryStore
from sync import signing
from sync.device import releases
from sync.device.identity import key_path
from sync.device.releases import Installer, ReleaseHooks, Tree

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


# --- under systemd: the hand-off to the root side (tests/unit/test_release_handoff.py runs it)


def test_hands_over__only_a_tree_at_the_root_supervised_by_systemd(tmp_path):
    at_root = Tree(root=Path("/"), running=Path("/opt/tillflow/releases/1.0.0"), release="1.0.0")
    in_tmp = Tree(root=tmp_path, running=tmp_path / "r", release="1.0.0")
    assert releases.hands_over(at_root, {"INVOCATION_ID": "4f0c"})
    assert releases.hands_over(at_root, {"NOTIFY_SOCKET": "/run/systemd/notify"})
    assert not releases.hands_over(at_root, {})  # run by hand: install.sh launched as before
    # install.sh --root has no systemd mode; a test runner under systemd passes its
    # INVOCATION_ID on to the daemons it starts.
    assert not releases.hands_over(in_tmp, {"INVOCATION_ID": "4f0c"})
    assert at_root.results == Path("/var/lib/tillflow-update/result")


@pytest.fixture
def under_systemd(tmp_path: Path) -> tuple[Rig, Path, Tree]:
    """A rig whose terminal runs 1.0.0 under systemd: installs are handed over."""
    rig = Rig(MemoryStore())
    running = tmp_path / "opt" / "tillflow" / "releases" / "1.0.0"
    running.mkdir(parents=True)
    tree = Tree(root=tmp_path, running=running, release="1.0.0")
    data = tmp_path / "var" / "lib" / "tillflow"
    rig.processor.releases = ReleaseHooks(
        rig.processor.identity, rig.store, rig.terminal, rig.clock,
        tree=tree, data_dir=data, handoff=True,
    )  # fmt: skip
    return rig, data, tree


def test_handoff__the_daemon_writes_a_valid_request_and_launches_nothing(under_systemd):
    rig, data, tree = under_systemd
    key = key_path(data)
    key.parent.mkdir(parents=True)
    key.write_bytes(signing.private_bytes(signing.new_key()))
    key.chmod(0o600)
    launched: list[Path] = []
    installer = Installer(
        tree, data, rig.processor.identity, rig.store, rig.clock,
        launch=lambda script, args, paths: launched.append(script), handoff=True,
    )  # fmt: skip
    stage = data / "releases" / "stage" / "tillflow-edge-1.1.0"
    stage.mkdir(parents=True)
    installer.install("1.1.0", stage, {"command_id": "c-3", "release": "1.1.0"})
    assert launched == []
    text = (data / "update" / "request.json").read_text()
    request = json.loads(text)
    assert set(request) == {"id", "release", "stage"}
    assert request["release"] == "1.1.0"
    assert request["stage"] == "releases/stage/tillflow-edge-1.1.0"
    assert re.fullmatch(r"[0-9a-f]{32}", request["id"])
    # The exact line the root side accepts (sorted keys, one line, no newline).
    assert text == json.dumps(request, sort_keys=True)
    assert list((data / "update").iterdir()) == [data / "update" / "request.json"]  # renamed
    pending = json.loads((data / "releases" / "pending.json").read_text())
    assert pending["state"] == "installing" and pending["request_id"] == request["id"]
    assert pending["results"] == str(tree.results)
    rig.take()  # the root side has not answered: nothing yet
    assert rig.outbox("release_result") == []


def _handed_over(data: Path, tree: Tree, began: float) -> str:
    request_id = "f" * 32
    base = data / "releases"
    base.mkdir(parents=True)
    state = {"command_id": "c-5", "release": "1.1.0", "state": "installing",
             "install_started_at": began, "request_id": request_id,
             "results": str(tree.results)}  # fmt: skip
    (base / "pending.json").write_text(json.dumps(state))
    (data / "update").mkdir()
    (data / "update" / "request.json").write_text("{}")
    return request_id


def test_handoff__the_root_sides_result_is_reported_once(under_systemd):
    rig, data, tree = under_systemd
    request_id = _handed_over(data, tree, rig.clock.now())
    (data / "update" / "request.json").unlink()  # taken by the root side
    tree.results.mkdir(parents=True)
    (tree.results / f"{request_id}.log").write_text("x\ntillflow-edge-update: REFUSED: no\n")
    (tree.results / f"{request_id}.rc").write_text("3\n")
    rig.take()
    rig.take()
    (msg,) = rig.outbox("release_result")
    assert msg.payload["status"] == "failed" and msg.payload["command_id"] == "c-5"
    assert "refused the bundle" in msg.payload["reason"] and "REFUSED: no" in msg.payload["reason"]
    # The daemon cannot write root's directory: the root side clears it on its next run.
    assert (tree.results / f"{request_id}.rc").exists()


def test_handoff__a_request_no_update_service_took_fails_naming_the_path_unit(under_systemd):
    rig, data, tree = under_systemd
    _handed_over(data, tree, rig.clock.now())
    rig.take()
    assert rig.outbox("release_result") == []
    rig.clock.advance(releases.INSTALL_DEADLINE_S + 1)
    rig.take()
    (msg,) = rig.outbox("release_result")
    assert msg.payload["status"] == "failed"
    assert "tillflow-edge-update.path" in msg.payload["reason"]
    assert not (data / "update" / "request.json").exists()  # withdrawn


def test_handoff__a_request_taken_but_never_answered_fails_pointing_at_the_journal(
    under_systemd,
):
    """The root side refuses a request it cannot read an id from in its journal only."""
    rig, data, tree = under_systemd
    _handed_over(data, tree, rig.clock.now())
    (data / "update" / "request.json").unlink()  # taken
    rig.clock.advance(releases.INSTALL_DEADLINE_S + 1)
    rig.take()
    (msg,) = rig.outbox("release_result")
    assert "journalctl -u tillflow-edge-update" in msg.payload["reason"]


def test_handoff__refused_when_the_data_dir_is_not_where_the_root_side_reads(tmp_path):
    rig = Rig(MemoryStore())
    running = tmp_path / "opt" / "tillflow" / "releases" / "1.0.0"
    running.mkdir(parents=True)
    tree = Tree(root=tmp_path, running=running, release="1.0.0")
    rig.processor.releases = ReleaseHooks(
        rig.processor.identity, rig.store, rig.terminal, rig.clock,
        tree=tree, data_dir=tmp_path / "data", handoff=True,
    )  # fmt: skip
    (out,) = rig.take(envelope(1, "install_release", release_doc(1)))
    assert (out.status, out.reason) == ("refused", "cannot_install")
    (result,) = rig.results()
    assert result.reason is not None and "var/lib/tillflow" in result.reason
