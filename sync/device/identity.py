"""The terminal's identity in the fleet, and enrollment, which makes it.

``<data_dir>/sync/`` (mode 0700) holds two files:

* ``device.key``: the device's Ed25519 private key, the raw 32 bytes, mode 0600. Made
  on this terminal by ``enroll`` and never leaving it: not sent (only its public half
  is), not logged, not printed. Created exclusively (``write_durably(exclusive=True)``:
  a file opened ``O_CREAT|O_EXCL`` with mode 0600 before a byte lands, fsynced, linked
  into place), so two enrollments racing on one terminal end with one key.
* ``identity.json``: what the control plane answered -- the device id, its store and
  group, the control plane's command-signing key (pinned: every command must verify
  under it), the URL and when. Written durably after the answer; its presence is what
  "enrolled" means.

``enroll`` POSTs ``wire.EnrollRequest`` (the one-time token and the public key) to
``{url}/v1/enroll``. A key left by an attempt that never got an answer is used again
(the server never registered it, or the token is spent and enrolling fails anyway).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.terminal.files import write_durably
from sync import signing, wire
from sync.device.errors import EnrollError, IdentityError, server_said, server_time_of

log = logging.getLogger(__name__)

SYNC_DIR = "sync"
IDENTITY_FILE = "identity.json"
KEY_FILE = "device.key"
ENROLL_PATH = "/v1/enroll"
#: How long ``enroll`` waits for the control plane when it makes its own HTTP client (s).
ENROLL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DeviceIdentity:
    """Who this terminal is to the control plane (``identity.json``)."""

    device_id: str
    store: str
    group: str | None
    #: The control plane's command-signing public key (Ed25519, base64url), pinned.
    control_plane_key: str
    url: str
    enrolled_at: float

    def control_plane_public(self) -> Ed25519PublicKey:
        return signing.load_public(self.control_plane_key)

    def to_json(self) -> bytes:
        return json.dumps({"format": 1, **asdict(self)}, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, source: str) -> DeviceIdentity:
        try:
            raw = json.loads(data)
            fields = {k: raw[k] for k in cls.__dataclass_fields__}
            identity = cls(**fields)
            identity.control_plane_public()  # a key that does not load is no identity
        except (ValueError, KeyError, TypeError, wire.WireError) as exc:
            raise IdentityError(
                f"{source}: not a device identity: {type(exc).__name__}: {exc}",
                hint="enroll the terminal again (tillflow-edge enroll) after moving it aside",
            ) from None
        return identity


def sync_dir(data_dir: Path) -> Path:
    return Path(data_dir) / SYNC_DIR


def identity_path(data_dir: Path) -> Path:
    return sync_dir(data_dir) / IDENTITY_FILE


def key_path(data_dir: Path) -> Path:
    return sync_dir(data_dir) / KEY_FILE


def load_identity(data_dir: Path) -> DeviceIdentity | None:
    """The stored identity, or None when the terminal never enrolled."""
    path = identity_path(data_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read: {exc.strerror}") from exc
    return DeviceIdentity.from_json(data, str(path))


def load_key(data_dir: Path) -> Ed25519PrivateKey:
    """The device's private key. Refused when missing, not 32 bytes, or readable by
    anyone but its owner (as ssh refuses such a key)."""
    path = key_path(data_dir)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise IdentityError(
            f"{path}: the device key is missing", hint="enroll the terminal (tillflow-edge enroll)"
        ) from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the device key: {exc.strerror}") from exc
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        raw = os.read(fd, 64)
    finally:
        os.close(fd)
    if mode & 0o077:
        raise IdentityError(
            f"{path}: the device key is readable by others (mode {mode:04o})",
            hint=f"chmod 600 {path}",
        )
    if len(raw) != 32:
        raise IdentityError(f"{path}: not an Ed25519 device key ({len(raw)} bytes, not 32)")
    return signing.load_private(raw)


def is_enrolled(data_dir: Path) -> bool:
    return identity_path(data_dir).exists()


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is under the umask; an older dir is tightened


def _device_key(data_dir: Path) -> Ed25519PrivateKey:
    """The key of an earlier attempt, or a new one, created exclusively with mode 0600."""
    _private_dir(sync_dir(data_dir))
    path = key_path(data_dir)
    if path.exists():
        log.info("enroll: using the device key an earlier attempt made", extra={"action": "enroll"})
        return load_key(data_dir)
    key = signing.new_key()
    try:
        made = write_durably(path, signing.private_bytes(key), mode=0o600, exclusive=True)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot write the device key: {exc.strerror}") from exc
    return key if made else load_key(data_dir)  # another enrollment won the race: its key


def enroll(
    url: str,
    token: str,
    data_dir: Path,
    binary_version: str,
    http: httpx.Client | None = None,
    *,
    clock: Callable[[], float] = time.time,
    hardware: wire.Hardware | None = None,
    timeout_s: float = ENROLL_TIMEOUT_S,
) -> DeviceIdentity:
    """Enroll this terminal with the control plane at ``url`` using the one-time
    ``token``: make the device key, send its public half, store the identity the server
    answers (with its command-signing key, pinned from now on). An error says what the
    server answered (``EnrollError``, retryable when the server could not be reached or
    failed), and leaves no identity behind. Already enrolled: an ``EnrollError`` naming
    the device."""
    data_dir = Path(data_dir)
    existing = load_identity(data_dir)
    if existing is not None:
        raise EnrollError(
            f"this terminal is already enrolled as device {existing.device_id} at {existing.url}",
            hint=f"to enroll it again, move {sync_dir(data_dir)} aside first",
        )
    key = _device_key(data_dir)
    request = wire.EnrollRequest(
        protocol_version=wire.PROTOCOL_VERSION,
        token=token,
        public_key=signing.public_text(key),
        binary_version=binary_version,
        hardware=hardware or wire.Hardware(),
    )
    base = url.rstrip("/")
    body = wire.encode(request)
    # Signed by the key it registers (device id: that key's text): the server knows the
    # caller holds the key, and answers a retry after a lost answer the same again.
    public = signing.public_text(key)
    path = urlsplit(base).path + ENROLL_PATH
    signed = signing.sign_request(key, "POST", path, body, public, clock())
    try:
        answer = _post(http, base + ENROLL_PATH, body, timeout_s, signed)
    except EnrollError as exc:
        if exc.server_code != "clock_skew" or exc.server_time is None:
            raise
        # Our clock is off by more than the server's window (a terminal whose RTC lost
        # its battery): sign once more with the server's time, as the sync client does.
        offset = exc.server_time - clock()
        log.warning(
            "enroll: the control plane's clock is %+.0f s from ours: signing with its time",
            offset,
            extra={"action": "enroll_clock_offset"},
        )
        signed = signing.sign_request(key, "POST", path, body, public, clock() + offset)
        answer = _post(http, base + ENROLL_PATH, body, timeout_s, signed)
    try:
        response = wire.decode(answer, wire.EnrollResponse)
        signing.load_public(response.control_plane_key)
    except wire.WireError as exc:
        raise EnrollError(
            f"enrollment at {base}: the answer is not an enrollment: {exc.message}",
            retryable=True,
        ) from None
    identity = DeviceIdentity(
        device_id=response.device_id,
        store=response.store,
        group=response.group,
        control_plane_key=response.control_plane_key,
        url=base,
        enrolled_at=clock(),
    )
    where = identity_path(data_dir)
    try:
        write_durably(where, identity.to_json(), mode=0o600)
    except OSError as exc:
        raise IdentityError(f"{where}: cannot write the identity: {exc.strerror}") from exc
    log.info(
        "enrolled as device %s (store %s) at %s",
        identity.device_id,
        identity.store,
        base,
        extra={"action": "enrolled", "device_id": identity.device_id},
    )
    return identity


def _post(
    http: httpx.Client | None,
    url: str,
    body: bytes,
    timeout_s: float,
    signed: dict[str, str],
    what: str = "enrollment",
) -> bytes:
    own = http is None
    client = httpx.Client(timeout=timeout_s, trust_env=False) if http is None else http
    headers: dict[str, Any] = {"content-type": "application/json", **signed}
    try:
        resp = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise EnrollError(
            f"cannot reach the control plane at {url}: {type(exc).__name__}: {exc}",
            retryable=True,
        ) from None
    finally:
        if own:
            client.close()
    if resp.status_code in (200, 201):
        return resp.content
    code, message = server_said(resp.status_code, resp.content)
    # A replayed nonce is this very request arriving twice (a retrying middlebox sent it
    # again and we got the second answer): the first copy may well have landed, and a
    # retry is signed anew (fresh time and nonce), which the server answers as before.
    retryable = resp.status_code >= 500 or resp.status_code == 429 or code == "replayed_nonce"
    refused = EnrollError(
        f"{what} refused by {url}: {resp.status_code} {code}: {message}",
        server_code=code,
        status=resp.status_code,
        retryable=retryable,
    )
    refused.server_time = server_time_of(resp.content)
    raise refused


# --- key rotation ------------------------------------------------------------------------

ROTATE_PATH = "/v1/rotate-key"


def next_key_path(data_dir: Path) -> Path:
    """Where a rotation keeps the new key until the cloud has taken it."""
    return sync_dir(data_dir) / "device.key.new"


def rotate_key(
    data_dir: Path,
    http: httpx.Client | None = None,
    *,
    url: str | None = None,
    clock: Callable[[], float] = time.time,
    timeout_s: float = ENROLL_TIMEOUT_S,
) -> str:
    """Replace the device key: a new key is made (kept in ``device.key.new``, 0600,
    durable, before anything is sent), the cloud is asked to take it in a request signed
    by the current key, with the new key's signature over ``signing.rotation_bytes`` as
    its proof; once the cloud answers, the new key replaces ``device.key``. Returns the
    new public key. If the answer was lost, the cloud may hold the new key already:
    ``promote_next_key`` (the sync client calls it when the current key is refused)
    finishes the rotation; running this again retries with the same new key."""
    identity = load_identity(data_dir)
    if identity is None:
        raise IdentityError("this terminal is not enrolled", hint="tillflow-edge enroll first")
    current = load_key(data_dir)
    pending = next_key_path(data_dir)
    if pending.exists():
        new = _read_key(pending)
    else:
        new = signing.new_key()
        try:
            write_durably(pending, signing.private_bytes(new), mode=0o600)
        except OSError as exc:
            raise IdentityError(f"{pending}: cannot write the new key: {exc.strerror}") from exc
    new_public = signing.public_text(new)
    request = wire.RotateKeyRequest(
        protocol_version=wire.PROTOCOL_VERSION,
        new_public_key=new_public,
        proof=wire.b64e(new.sign(signing.rotation_bytes(identity.device_id, new_public))),
    )
    base = (url or identity.url).rstrip("/")
    body = wire.encode(request)
    path = urlsplit(base).path + ROTATE_PATH
    signed = signing.sign_request(current, "POST", path, body, identity.device_id, clock())
    try:
        answer = _post(http, base + ROTATE_PATH, body, timeout_s, signed, "key rotation")
    except EnrollError as exc:
        if exc.server_code == "bad_signature" and promote_next_key(data_dir):
            return new_public  # an earlier attempt's answer was lost: it had landed
        raise
    wire.decode(answer, wire.RotateKeyResponse)
    _promote(data_dir, pending)
    log.info(
        "device key rotated for device %s",
        identity.device_id,
        extra={"action": "key_rotated", "device_id": identity.device_id},
    )
    return new_public


def promote_next_key(data_dir: Path) -> bool:
    """Make a pending rotation's new key the device key (the cloud refused the current
    one: it holds the new one). False when no rotation is pending."""
    pending = next_key_path(data_dir)
    if not pending.exists():
        return False
    _promote(data_dir, pending)
    log.warning(
        "the cloud refused the device key: a rotation had landed, the new key is in use",
        extra={"action": "key_rotated"},
    )
    return True


def _promote(data_dir: Path, pending: Path) -> None:
    try:
        os.replace(pending, key_path(data_dir))
        fd = os.open(sync_dir(data_dir), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise IdentityError(f"{pending}: cannot put the new key in place: {exc.strerror}") from exc


def _read_key(path: Path) -> Ed25519PrivateKey:
    raw = path.read_bytes()
    if len(raw) != 32 or stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise IdentityError(f"{path}: not a private Ed25519 key (32 bytes, mode 0600)")
    return signing.load_private(raw)
