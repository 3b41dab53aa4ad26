"""``install_release`` on the terminal: fetch a release file by file, verify it whole, and
hand it to the installed installer (issue 14's ReleaseRollout, issue 17's delta updates).

The command processor (``commands.py``) checks the ``ReleaseContent`` and records the
command applied in its one transaction; then ``start`` hands the release to an
``Installer`` on a thread of its own (never inside that transaction, never on the sync
runner's exchange). The installer:

1. fetches the release's signed file list (``GET /v1/releases/{release}/manifest``,
   signed by the device key as ``/v1/sync`` is) and checks that its SHA-256 is the
   command's ``manifest_sha256`` and its signature verifies under the terminal's pinned
   release key, ``<root>/etc/tillflow/release.pub`` (where ``install.sh --pubkey`` put it
   on the first install): the cloud is not trusted with the release's integrity;
2. assembles the bundle's tree in ``<data_dir>/releases/stage/tillflow-edge-<release>/``:
   a file whose SHA-256 this terminal already holds (in an installed release under
   ``<root>/opt/tillflow/releases/``, or in the last bundle's files kept in
   ``<data_dir>/releases/kept/``) is hard-linked (copied across file systems, or when its
   mode differs), any other is downloaded by hash (``GET /v1/files/{sha256}``) into
   ``<data_dir>/releases/partial/``, resumed with ``Range`` after an interruption, and
   checked against the signed list: a corrupt or substituted file is deleted and fetched
   again (``FETCH_ATTEMPTS`` times, then the install fails naming it);
3. verifies the assembled tree whole with the terminal's own verifier
   (``verify_bundle``: signature, every digest, no unlisted file) -- nothing of the
   running release has been touched until here;
4. runs the new tree's ``install.sh`` (detached, in a session of its own), which
   verifies the bundle again with the *installed* binary, switches ``current``
   atomically, restarts the daemon and rolls back by itself when the new release does not
   become healthy. Its exit status lands in ``<data_dir>/releases/install.rc``.

The daemon running when ``install.sh`` is done -- the new release, or the old one after
a rollback, or this one if the installer refused the bundle -- reports the outcome: the
sync client's command processor calls ``report_finished`` on every exchange, which turns
``pending.json`` plus ``install.rc`` into one outbox message of topic ``release_result``
(``{"command_id", "release", "status": "installed"|"failed", "reason",
"bytes_downloaded"}``) and a ``release_installed``/``release_failed`` audit row, in one
transaction. A daemon that stopped mid-download resumes the download when it next syncs.

Under systemd (``INVOCATION_ID`` or ``NOTIFY_SOCKET`` set and the tree at ``/``) the
daemon is the unprivileged ``tillflow`` user and cannot run install.sh, which needs root.
It hands the verified stage over instead (``hand_over``): ``<data_dir>/update/request.json``
(``{"id", "release", "stage"}``, renamed into place) starts ``tillflow-edge-update.service``
through ``tillflow-edge-update.path``; that root side (``packaging/tillflow-edge-update.sh``)
copies the stage, verifies it with the installed binary and only then runs its
``install.sh``; its exit status and output land in
``/var/lib/tillflow-update/result/<id>.rc`` and ``<id>.log``, which this daemon (the new
one, after the restart) reads where it reads ``install.rc`` in process mode.

Only a terminal that runs from an installed tree (``.../opt/tillflow/releases/<v>/``,
the frozen binary) can install; any other refuses the command (``cannot_install``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from edge.engine.clock import Clock
from edge.engine.records import AuditEvent, CommandRecord, OutboxMessage
from edge.errors import BundleInvalid
from edge.terminal.service import release
from sync import signing, wire
from sync.device.identity import DeviceIdentity, load_key
from sync.device.ports import SyncStore

log = logging.getLogger(__name__)

RESULT_TOPIC = "release_result"
SUMS = release.SUMS
SIGNATURE = release.SIGNATURE
#: Tries of one file before the install fails (a corrupt or substituted copy is one).
FETCH_ATTEMPTS = 4
#: Seconds between two tries of a file the network lost (doubling, at most 60).
RETRY_S = 1.0
HTTP_TIMEOUT_S = 60.0
#: install.sh's wait for the new release's health (its --health-timeout).
HEALTH_TIMEOUT_S = 60
#: An install.sh that has not exited by then (the machine restarted under it) failed.
INSTALL_DEADLINE_S = 1800.0
_CHUNK = 1 << 20
#: The installer's exit statuses (install.sh's header), as a reason says them.
_INSTALL_EXIT = {
    1: "install.sh failed",
    2: "install.sh was called wrongly",
    3: "the installer refused the bundle (it does not verify)",
    4: "the new release was not healthy: rolled back",
    5: "the new release was not healthy and there was no healthy release to fall back to",
    6: "the update service refused the request (malformed, or its stage is not a plain "
    "directory in the state directory)",
}
#: The data dir the root side reads requests from (tillflow-edge-update.path's), under the root.
HANDOFF_DATA_DIR = PurePosixPath("var/lib/tillflow")

Status = Literal["installed", "failed"]


class InstallFailed(Exception):
    """The release cannot be installed; the message is the result's reason."""


@dataclass(frozen=True)
class Tree:
    """Where this terminal is installed: ``<root>/opt/tillflow/releases/<running>/``."""

    #: The install root (``/`` on a terminal; a directory under ``install.sh --root``).
    root: Path
    #: The running release's directory and its name (its ``VERSION``).
    running: Path
    release: str

    @property
    def opt(self) -> Path:
        return self.root / "opt" / "tillflow"

    @property
    def pubkey(self) -> Path:
        """The pinned release key (``install.sh --pubkey`` copies it here)."""
        return self.root / "etc" / "tillflow" / "release.pub"

    @property
    def results(self) -> Path:
        """Where the root side leaves ``<id>.rc`` and ``<id>.log`` (its StateDirectory=)."""
        return self.root / "var" / "lib" / "tillflow-update" / "result"

    def install_args(self) -> list[str]:
        if self.root == Path("/"):
            return ["--health-timeout", str(HEALTH_TIMEOUT_S)]
        return ["--root", str(self.root), "--supervise", "process",
                "--health-timeout", str(HEALTH_TIMEOUT_S)]  # fmt: skip


def find_tree(executable: str | None = None) -> Tree | None:
    """The tree the running binary was installed in, or None (run from source, or from
    a directory ``install.sh`` did not lay out)."""
    if executable is None:
        if not getattr(sys, "frozen", False):
            return None
        executable = sys.executable
    here = Path(executable).resolve().parent
    releases, opt = here.parent, here.parent.parent
    if releases.name != "releases" or opt.name != "tillflow" or opt.parent.name != "opt":
        return None
    try:
        name = (here / "VERSION").read_text().strip()
    except OSError:
        name = here.name
    return Tree(root=opt.parent.parent, running=here, release=name or here.name)


def under_systemd(env: dict[str, str] | None = None) -> bool:
    """The daemon runs as a systemd service (systemd sets ``INVOCATION_ID`` for every
    unit, ``NOTIFY_SOCKET`` for ``Type=notify``)."""
    env = dict(os.environ) if env is None else env
    return bool(env.get("INVOCATION_ID") or env.get("NOTIFY_SOCKET"))


def hands_over(tree: Tree, env: dict[str, str] | None = None) -> bool:
    """Installs go through the root side: systemd supervises a tree at ``/`` (install.sh
    has no systemd mode under ``--root``)."""
    return tree.root == Path("/") and under_systemd(env)


def running_release(executable: str | None = None) -> str | None:
    tree = find_tree(executable)
    return None if tree is None else tree.release


# --- the state kept in the data dir ---------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    base: Path

    @property
    def pending(self) -> Path:
        return self.base / "pending.json"

    @property
    def rc(self) -> Path:
        return self.base / "install.rc"

    @property
    def install_log(self) -> Path:
        return self.base / "install.log"

    @property
    def stage(self) -> Path:
        return self.base / "stage"

    @property
    def partial(self) -> Path:
        return self.base / "partial"

    @property
    def kept(self) -> Path:
        return self.base / "kept"

    @property
    def request(self) -> Path:
        """The hand-off to the root side (``<data_dir>/update/request.json``)."""
        return self.base.parent / "update" / "request.json"


def paths_of(data_dir: Path) -> Paths:
    return Paths(Path(data_dir) / "releases")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_digest = release.file_digest


def parse_sums(text: str) -> dict[str, str]:
    """``SHA256SUMS``: path -> digest, read by the installer's own reader
    (``edge.terminal.service.release.parse_sums``); a bad line fails the install."""
    try:
        return release.parse_sums(text)
    except BundleInvalid as exc:
        raise InstallFailed(str(exc)) from None


# --- the installer ----------------------------------------------------------------------------


class Installer:
    """Fetches, verifies and installs one release (module docstring), on its own thread."""

    def __init__(
        self,
        tree: Tree,
        data_dir: Path,
        identity: DeviceIdentity,
        store: SyncStore,
        clock: Clock,
        *,
        http: Callable[[], httpx.Client] | None = None,
        launch: Callable[[Path, list[str], Paths], None] | None = None,
        handoff: bool | None = None,
    ) -> None:
        self.tree = tree
        self.data_dir = Path(data_dir)
        self.paths = paths_of(self.data_dir)
        self.identity = identity
        self.store = store
        self.clock = clock
        self.make_http = http or (lambda: httpx.Client(timeout=HTTP_TIMEOUT_S, trust_env=False))
        self.launch = launch or launch_install
        #: Under systemd: a request to the root side instead of launching install.sh.
        self.handoff = hands_over(tree) if handoff is None else handoff
        self.base_path = urlsplit(identity.url.rstrip("/")).path
        self.bytes_downloaded = 0
        #: Seconds the server's clock is ahead of ours (learnt from a clock_skew answer).
        self.clock_offset = 0.0
        self.sizes: dict[str, int] = {}
        self.modes: dict[str, int] = {}
        self._key = load_key(self.data_dir)

    # --- requests -----------------------------------------------------------------------

    def _signed(self, path: str) -> dict[str, str]:
        now = self.clock.now() + self.clock_offset
        full = self.base_path + path
        return signing.sign_request(self._key, "GET", full, b"", self.identity.device_id, now)

    def _retryable(self, r: httpx.Response) -> bool:
        """A 429/5xx, or a clock_skew 401 (then signed with the server's time after)."""
        if r.status_code == 429 or r.status_code >= 500:
            return True
        if r.status_code == 401:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                err = r.json().get("error") or {}
                if err.get("code") == "clock_skew" and r.json().get("server_time") is not None:
                    self.clock_offset = float(r.json()["server_time"]) - self.clock.now()
                    return True
        return False

    def _get(self, http: httpx.Client, path: str, headers: dict[str, str] | None = None) -> Any:
        url = self.identity.url.rstrip("/") + path
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                r = http.get(url, headers={**self._signed(path), **(headers or {})})
            except httpx.TransportError:
                if attempt == FETCH_ATTEMPTS:
                    raise
            else:
                if attempt == FETCH_ATTEMPTS or not self._retryable(r):
                    return r
            time.sleep(min(60.0, RETRY_S * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    def manifest(self, http: httpx.Client, release: str, expected: str) -> tuple[str, bytes]:
        """The signed file list and its signature, checked (module docstring, 1); the
        unsigned hints kept in ``self.sizes`` and ``self.modes``."""
        r = self._get(http, f"/v1/releases/{release}/manifest")
        if r.status_code != 200:
            raise InstallFailed(f"the manifest of {release}: HTTP {r.status_code}: {r.text[:200]}")
        body = r.json()
        sums = str(body.get("sums", ""))
        sizes, modes = body.get("sizes"), body.get("modes")
        self.sizes = {str(k): int(v) for k, v in sizes.items()} if isinstance(sizes, dict) else {}
        self.modes = {str(k): int(v) for k, v in modes.items()} if isinstance(modes, dict) else {}
        actual = hashlib.sha256(sums.encode()).hexdigest()
        if actual != expected:
            raise InstallFailed(
                f"the manifest's SHA-256 is {actual[:16]}…, the command names {expected[:16]}…"
            )
        signature = base64.b64decode(str(body.get("signature", "")))
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(self.tree.pubkey.read_bytes())
        except (OSError, ValueError) as exc:
            raise InstallFailed(f"no pinned release key at {self.tree.pubkey}: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise InstallFailed(f"{self.tree.pubkey} is not an Ed25519 public key")
        try:
            key.verify(signature, sums.encode())
        except InvalidSignature as exc:
            raise InstallFailed(
                f"the manifest's signature does not verify under {self.tree.pubkey}"
            ) from exc
        return sums, signature

    def fetch(self, http: httpx.Client, digest: str, rel: str) -> Path:
        """The file ``digest`` in ``partial/``, downloaded (resumed) and verified."""
        self.paths.partial.mkdir(parents=True, exist_ok=True)
        part = self.paths.partial / f"{digest}.part"
        problem = ""
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            have = part.stat().st_size if part.exists() else 0
            try:
                headers = {"Range": f"bytes={have}-"} if have else {}
                with self._stream(http, f"/v1/files/{digest}", headers) as r:
                    if r.status_code == 416 and have:
                        pass  # all there already (or more): the digest decides
                    elif r.status_code not in (200, 206):
                        r.read()
                        if not self._retryable(r):
                            raise InstallFailed(f"{rel}: HTTP {r.status_code}: {r.text[:200]}")
                        raise httpx.HTTPStatusError(
                            f"HTTP {r.status_code}", request=r.request, response=r
                        )
                    else:
                        mode = "ab" if r.status_code == 206 else "wb"
                        with part.open(mode) as fh:
                            for chunk in r.iter_bytes(_CHUNK):
                                fh.write(chunk)
                                self.bytes_downloaded += len(chunk)
            except httpx.HTTPError as exc:
                problem = f"{rel}: {type(exc).__name__}: {exc}"
                log.warning("release file %s: %s; again (resumes)", rel, problem)
                time.sleep(min(60.0, RETRY_S * 2 ** (attempt - 1)))
                continue
            if _digest(part) == digest:
                return part
            problem = f"{rel} does not match its SHA-256 in {SUMS}"
            log.warning(
                "release file %s refused: it does not match its SHA-256; fetched again",
                rel,
                extra={"action": "release_file_refused"},
            )
            part.unlink()
        raise InstallFailed(f"{problem} (after {FETCH_ATTEMPTS} tries)")

    @contextlib.contextmanager
    def _stream(self, http: httpx.Client, path: str, headers: dict[str, str]) -> Any:
        url = self.identity.url.rstrip("/") + path
        with http.stream("GET", url, headers={**self._signed(path), **headers}) as r:
            yield r

    # --- the tree -------------------------------------------------------------------------

    def held(self, wanted: dict[str, int]) -> dict[str, Path]:
        """digest -> a local file with it, among files of the sizes ``wanted`` holds
        (digest -> size): the installed releases and the last bundle's kept files."""
        sizes = set(wanted.values())
        found: dict[str, Path] = {}
        roots = [self.tree.opt / "releases", self.paths.kept]
        for root in roots:
            if not root.is_dir():
                continue
            for path in root.rglob("*"):
                if not path.is_file() or path.is_symlink():
                    continue
                try:
                    if path.stat().st_size not in sizes:
                        continue
                    digest = _digest(path)
                except OSError:
                    continue
                if digest in wanted:
                    found.setdefault(digest, path)
        return found

    def assemble(self, http: httpx.Client, release: str, sums: str, signature: bytes) -> Path:
        """The bundle's tree in ``stage/``, every file verified (module docstring, 2-3)."""
        listed = parse_sums(sums)
        stage = self.paths.stage / f"tillflow-edge-{release}"
        stage.mkdir(parents=True, exist_ok=True)
        # What was staged before (an earlier try of this release) stays if it verifies.
        for path in sorted(stage.rglob("*"), reverse=True):
            rel = path.relative_to(stage).as_posix()
            if path.is_file() and rel not in listed and rel not in (SUMS, SIGNATURE):
                path.unlink()
        todo = {}
        for rel, digest in listed.items():
            target = stage / rel
            if target.is_file() and _digest(target) == digest:
                continue
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            todo[rel] = digest
        local = self.held({d: self.sizes[d] for d in set(todo.values()) if d in self.sizes})
        linked = 0
        for rel, digest in sorted(todo.items()):
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            source = local.get(digest)
            executable = bool(self.modes.get(rel, 0o755 if _executable(rel) else 0o644) & 0o100)
            if source is None:
                part = self.fetch(http, digest, rel)
                part.chmod(0o755 if executable else 0o644)
                os.replace(part, target)
                continue
            # A link shares the inode: never chmod it (it is the running release's file).
            if executable == bool(source.stat().st_mode & 0o100):
                _link_or_copy(source, target)
            else:
                shutil.copyfile(source, target)
                target.chmod(0o755 if executable else 0o644)
            linked += 1
        (stage / SUMS).write_text(sums)
        (stage / SIGNATURE).write_bytes(signature)
        from edge.errors import BundleInvalid, ConfigError
        from edge.terminal.service.release import verify_bundle

        try:
            verify_bundle(stage, self.tree.pubkey)
        except (BundleInvalid, ConfigError) as exc:
            raise InstallFailed(f"the assembled release does not verify: {exc}") from exc
        log.info(
            "release %s assembled: %d files, %d held already, %d linked, %d bytes downloaded",
            release,
            len(listed),
            len(listed) - len(todo) + linked,
            linked,
            self.bytes_downloaded,
            extra={"action": "release_assembled"},
        )
        return stage

    # --- the whole install ------------------------------------------------------------------

    def run(self, command_id: str, content: wire.ReleaseContent) -> None:
        """Fetch, verify, launch install.sh; on a failure before the launch, report it."""
        state = _read_json(self.paths.pending) or {}
        self.bytes_downloaded = int(state.get("bytes_downloaded", 0))
        pending = {
            "command_id": command_id,
            "release": content.release,
            "manifest_sha256": content.manifest_sha256,
            "files": content.files,
            "bytes": content.bytes,
            "from_release": self.tree.release,
            "state": "downloading",
            "bytes_downloaded": self.bytes_downloaded,
            "started_at": state.get("started_at", self.clock.now()),
        }
        _write_json(self.paths.pending, pending)
        try:
            with self.make_http() as http:
                sums, signature = self.manifest(http, content.release, content.manifest_sha256)
                stage = self.assemble(http, content.release, sums, signature)
        except (InstallFailed, httpx.HTTPError, OSError, ValueError) as exc:
            _write_json(self.paths.pending, {**pending, "bytes_downloaded": self.bytes_downloaded})
            finish(self.store, self.clock, self.paths, "failed", str(exc))
            return
        self.install(content.release, stage, pending)

    def install(self, release: str, stage: Path, pending: dict[str, Any]) -> None:
        """The verified ``stage``: its install.sh launched, or (under systemd) handed over."""
        with contextlib.suppress(FileNotFoundError):
            self.paths.rc.unlink()
        pending |= {"state": "installing", "bytes_downloaded": self.bytes_downloaded}
        pending["install_started_at"] = self.clock.now()
        if self.handoff:
            self.hand_over(release, stage, pending)
            return
        _write_json(self.paths.pending, pending)
        log.info(
            "release %s verified whole: running its install.sh",
            release,
            extra={"action": "release_install"},
        )
        try:
            self.launch(stage / "install.sh", self.tree.install_args(), self.paths)
        except OSError as exc:
            finish(self.store, self.clock, self.paths, "failed", f"install.sh did not start: {exc}")

    def hand_over(self, release: str, stage: Path, pending: dict[str, Any]) -> None:
        """Ask the root side to install ``stage`` (module docstring): the request names
        the release and its stage relative to the data dir, nothing else. The pending
        state first, so a result is always looked for once the request exists."""
        rel = stage.relative_to(self.data_dir).as_posix()
        request_id = uuid.uuid4().hex
        pending |= {"request_id": request_id, "results": str(self.tree.results)}
        _write_json(self.paths.pending, pending)
        _write_json(self.paths.request, {"id": request_id, "release": release, "stage": rel})
        log.info(
            "release %s verified whole: handed to tillflow-edge-update (request %s)",
            release,
            request_id,
            extra={"action": "release_install"},
        )


def _executable(rel: str) -> bool:
    return rel in ("install.sh", "tillflow-edge/tillflow-edge")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def launch_install(script: Path, args: list[str], paths: Paths) -> None:
    """``sh install.sh ARGS`` in a session of its own (it outlives this daemon, which it
    stops), its output in ``install.log`` and its exit status in ``install.rc``. At ``/``
    (no ``--root``; run by hand as root, not under systemd, which hands over instead)
    through ``systemd-run``: the daemon's cgroup is stopped with it, and a child inside it
    would be too."""
    paths.base.mkdir(parents=True, exist_ok=True)
    log_file, rc_file = str(paths.install_log), str(paths.rc)
    tmp = shlex.quote(rc_file + ".tmp")
    wrapper = f'sh "$0" "$@" >{shlex.quote(log_file)} 2>&1; echo $? >{tmp}; '
    wrapper += f"mv {tmp} {shlex.quote(rc_file)}"
    env = dict(os.environ)
    if getattr(sys, "frozen", False):  # the bootloader's library path is not install.sh's
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is None:
            env.pop("LD_LIBRARY_PATH", None)
        else:
            env["LD_LIBRARY_PATH"] = original
    command = ["sh", "-c", wrapper, str(script), *args]
    if "--root" not in args and shutil.which("systemd-run"):
        unit = f"--unit=tillflow-edge-install-{uuid.uuid4().hex[:8]}"
        command = ["systemd-run", "--collect", "--quiet", unit, *command]
    subprocess.Popen(
        command,
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


# --- reporting ----------------------------------------------------------------------------------


def finish(
    store: SyncStore, clock: Clock, paths: Paths, status: Status, reason: str | None
) -> bool:
    """Report the pending install's outcome (one transaction: its ``release_result`` and
    its audit row) and clear its state. False when nothing was pending."""
    claimed = paths.base / "pending.reporting"
    try:
        os.replace(paths.pending, claimed)
    except FileNotFoundError:
        return False
    state = _read_json(claimed) or {}
    at = clock.now()
    payload = {
        "command_id": state.get("command_id"),
        "release": state.get("release"),
        "status": status,
        "reason": reason,
        "bytes_downloaded": int(state.get("bytes_downloaded", 0)),
        "from_release": state.get("from_release"),
    }
    event = "release_installed" if status == "installed" else "release_failed"
    rec = CommandRecord(
        seq=None,
        command_id=str(state.get("command_id") or ""),
        action="install_release",
        status="applied",
        reason=None,
        issued_at=at,
        at=at,
        audit=[AuditEvent(None, event, at, None, dict(payload))],
        outbox=[OutboxMessage(uuid.uuid4().hex, None, None, RESULT_TOPIC, payload, at)],
    )
    try:
        store.record_command(rec)
    except Exception:
        os.replace(claimed, paths.pending)  # reported on a later exchange
        raise
    claimed.unlink()
    with contextlib.suppress(FileNotFoundError):
        paths.rc.unlink()
    with contextlib.suppress(FileNotFoundError):
        paths.request.unlink()  # a hand-off the root side never took
    shutil.rmtree(paths.stage, ignore_errors=True)
    shutil.rmtree(paths.partial, ignore_errors=True)
    level = logging.INFO if status == "installed" else logging.WARNING
    log.log(
        level,
        "release %s %s: %s (%d bytes downloaded)",
        payload["release"],
        status,
        reason or "ok",
        payload["bytes_downloaded"],
        extra={"action": event},
    )
    return True


def result_now(content: wire.ReleaseContent, command_id: str, at: float) -> OutboxMessage:
    """The ``release_result`` of a release that is running already (sent with the
    command's own transaction: nothing to download)."""
    payload = {
        "command_id": command_id,
        "release": content.release,
        "status": "installed",
        "reason": "already running",
        "bytes_downloaded": 0,
        "from_release": content.release,
    }
    return OutboxMessage(uuid.uuid4().hex, None, None, RESULT_TOPIC, payload, at)


_threads: dict[Path, threading.Thread] = {}
_lock = threading.Lock()


def busy(data_dir: Path) -> bool:
    """An install is under way (its thread runs, or install.sh has not finished)."""
    with _lock:
        t = _threads.get(Path(data_dir))
        if t is not None and t.is_alive():
            return True
    state = _read_json(paths_of(data_dir).pending)
    return state is not None


def start(installer: Installer, command_id: str, content: wire.ReleaseContent) -> threading.Thread:
    """Run ``installer`` for the command on a thread of its own."""
    with _lock:
        t = threading.Thread(
            target=_run_logged,
            args=(installer, command_id, content),
            name=f"release-{content.release}",
            daemon=True,
        )
        _threads[installer.data_dir] = t
        t.start()
        return t


def _run_logged(installer: Installer, command_id: str, content: wire.ReleaseContent) -> None:
    try:
        installer.run(command_id, content)
    except Exception:
        log.exception("the release installer failed", extra={"action": "release_error"})


def report_finished(
    data_dir: Path,
    store: SyncStore,
    clock: Clock,
    make: Callable[[], Installer | None],
) -> bool:
    """Called on every sync exchange: the pending install's outcome once ``install.sh``
    is done (or its download resumed, if this daemon stopped mid-way). True when an
    outcome was reported now."""
    paths = paths_of(data_dir)
    state = _read_json(paths.pending)
    if state is None:
        return False
    with _lock:
        t = _threads.get(Path(data_dir))
        if t is not None and t.is_alive():
            return False
    if state.get("state") == "downloading":
        installer = make()
        if installer is None:
            return finish(store, clock, paths, "failed", "this terminal cannot install releases")
        content = wire.ReleaseContent(
            release=state["release"],
            manifest_sha256=state["manifest_sha256"],
            files=int(state.get("files", 1)),
            bytes=int(state.get("bytes", 0)),
        )
        start(installer, str(state["command_id"]), content)
        return False
    rc_file, log_file = paths.rc, paths.install_log
    if state.get("request_id"):  # handed to the root side: its result, where it keeps it
        results = Path(str(state.get("results", "")))
        rc_file = results / f"{state['request_id']}.rc"
        log_file = results / f"{state['request_id']}.log"
    try:
        rc_text = rc_file.read_text().strip()
    except FileNotFoundError:
        began = float(state.get("install_started_at") or clock.now())
        if clock.now() - began < INSTALL_DEADLINE_S:
            return False  # install.sh is still at work
        why = f"install.sh did not finish within {INSTALL_DEADLINE_S:.0f} s"
        if state.get("request_id") and paths.request.exists():
            why = (
                f"no update service took the request within {INSTALL_DEADLINE_S:.0f} s "
                "(is tillflow-edge-update.path enabled?)"
            )
        elif state.get("request_id"):
            why = (
                f"the update service left no result within {INSTALL_DEADLINE_S:.0f} s "
                "(journalctl -u tillflow-edge-update)"
            )
        return finish(store, clock, paths, "failed", why)
    rc = int(rc_text) if rc_text.lstrip("-").isdigit() else 1
    running = running_release()
    wanted = state.get("release")
    if rc == 0 and (running is None or running == wanted):
        _keep_bundle_files(paths, str(wanted))
        return finish(store, clock, paths, "installed", None)
    why = _INSTALL_EXIT.get(rc, f"install.sh exited {rc}")
    if rc == 0:
        why = f"install.sh reported success but {running} runs, not {wanted}"
    last = _last_line(log_file)
    return finish(store, clock, paths, "failed", f"{why}: {last}" if last else why)


def _keep_bundle_files(paths: Paths, release: str) -> None:
    """The bundle's files install.sh does not install (its own script, the unit, the
    default config), kept so the next release need not download them if unchanged."""
    stage = paths.stage / f"tillflow-edge-{release}"
    if not stage.is_dir():
        return
    shutil.rmtree(paths.kept, ignore_errors=True)
    paths.kept.mkdir(parents=True, exist_ok=True)
    for item in stage.iterdir():
        if item.is_file() and item.name not in (SUMS, SIGNATURE):
            with contextlib.suppress(OSError):
                _link_or_copy(item, paths.kept / item.name)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


# --- what the command processor asks ----------------------------------------------------------

CANNOT_INSTALL = "cannot_install"
INSTALL_IN_PROGRESS = "install_in_progress"


class ReleaseHooks:
    """The installer as ``commands.CommandProcessor`` sees it: may this terminal take an
    ``install_release`` now, start it after the command committed, and report finished
    installs on every exchange."""

    def __init__(
        self,
        identity: DeviceIdentity,
        store: SyncStore,
        terminal: Any,
        clock: Clock,
        *,
        tree: Tree | None = None,
        data_dir: Path | None = None,
        handoff: bool | None = None,
    ) -> None:
        self.identity, self.store, self.clock = identity, store, clock
        self.tree = tree if tree is not None else find_tree()
        self.handoff = handoff
        cfg = getattr(terminal, "cfg", None)
        found = data_dir if data_dir is not None else getattr(cfg, "data_dir", None)
        self.data_dir = None if found is None else Path(found)

    def refusal(self, content: wire.ReleaseContent) -> tuple[str, str] | None:
        if self.tree is None or self.data_dir is None:
            where = "<root>/opt/tillflow/releases/<release>/ (install.sh's layout)"
            return (
                CANNOT_INSTALL,
                f"this terminal does not run from an installed release in {where}",
            )
        if self.running(content):
            return None
        handoff_dir = self.tree.root / HANDOFF_DATA_DIR
        if self.hands_over() and self.data_dir.resolve() != handoff_dir.resolve():
            return (
                CANNOT_INSTALL,
                f"under systemd the update service reads requests from {handoff_dir}; "
                f"this terminal's data_dir is {self.data_dir}",
            )
        if busy(self.data_dir):
            state = _read_json(paths_of(self.data_dir).pending) or {}
            return INSTALL_IN_PROGRESS, f"release {state.get('release', '?')} is being installed"
        return None

    def hands_over(self) -> bool:
        """Installs go through the root side (``hands_over``, or as told)."""
        if self.handoff is not None:
            return self.handoff
        return self.tree is not None and hands_over(self.tree)

    def running(self, content: wire.ReleaseContent) -> bool:
        return self.tree is not None and self.tree.release == content.release

    def make(self) -> Installer | None:
        if self.tree is None or self.data_dir is None:
            return None
        try:
            return Installer(
                self.tree,
                self.data_dir,
                self.identity,
                self.store,
                self.clock,
                handoff=self.hands_over(),
            )
        except Exception as exc:  # the device key unreadable: said in the log, and reported
            log.error("the release installer cannot start: %s", exc)
            return None

    def begin(self, command_id: str, content: wire.ReleaseContent) -> None:
        installer = self.make()
        if installer is None:
            assert self.data_dir is not None
            _write_json(paths_of(self.data_dir).pending, {"command_id": command_id,
                        "release": content.release, "state": "failed"})  # fmt: skip
            finish(self.store, self.clock, paths_of(self.data_dir), "failed", "no installer")
            return
        start(installer, command_id, content)

    def poll(self) -> None:
        """Report an install that finished (called on every exchange; never raises but a
        store error, which leaves it for the next)."""
        if self.data_dir is None:
            return
        report_finished(self.data_dir, self.store, self.clock, self.make)
