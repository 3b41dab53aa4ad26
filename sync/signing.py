"""Signatures of the sync protocol (Ed25519), over exact bytes, no I/O.

Two things are signed:

* **Every device request**, by the device's key. The signed bytes are
  ``request_bytes(method, path, body, time, nonce, device_id)``::

      tillflow-request-v1 \\n METHOD \\n /path \\n sha256-hex(body) \\n time \\n nonce \\n device_id

  where ``body`` is the request body exactly as sent (gzip'd bytes when gzip'd) and
  ``time``/``nonce`` are the header strings exactly as sent. The server rebuilds the
  same bytes from the request it received (never from a parsed and re-encoded body) and
  verifies them: a changed byte anywhere (an amount inside the body included) fails.
  Headers: ``Tillflow-Device``, ``Tillflow-Time`` (Unix seconds), ``Tillflow-Nonce``
  (32 hex), ``Tillflow-Signature`` (base64url).

  **Enrollment** is signed the same way, by the key it registers, before the device
  has an id: ``device_id`` is the request's ``public_key`` text (base64url of the raw
  32 bytes), so the signed bytes of ``POST /v1/enroll`` are::

      tillflow-request-v1 \\n POST \\n /v1/enroll \\n sha256-hex(body) \\n time \\n nonce
          \\n public_key

  (``Tillflow-Device`` carries that same ``public_key``; the path is the URL's own,
  a prefix included). It proves the caller holds the key, so the server can answer a
  retry by the same key after a lost answer with the same device
  (``sync.server.SyncService.enroll``).

* **Every command and document**, by the control plane's key: an ``Envelope`` carries
  the canonical JSON bytes of a ``Command`` (base64url) and the signature over exactly
  those bytes; the terminal verifies the bytes, then decodes them.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.engine.audit import canonical_json
from sync.wire import Command, Envelope, WireError, b64d, b64e, decode

REQUEST_DOMAIN = b"tillflow-request-v1"
ROTATION_DOMAIN = b"tillflow-rotate-v1"
H_DEVICE, H_TIME, H_NONCE, H_SIGNATURE = (
    "tillflow-device",
    "tillflow-time",
    "tillflow-nonce",
    "tillflow-signature",
)


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64url: how a key travels and is stored."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64e(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public(text: str) -> Ed25519PublicKey:
    raw = b64d(text, "public_key")
    if len(raw) != 32:
        raise WireError("invalid_field", "public_key: not a 32-byte Ed25519 key", "public_key")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(public: str) -> str:
    """A short name for a public key (first 16 hex of its SHA-256)."""
    return hashlib.sha256(public.encode()).hexdigest()[:16]


def private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def load_private(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)


def verify(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


# --- device requests -----------------------------------------------------------------


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def request_bytes(
    method: str, path: str, body: bytes, time: str, nonce: str, device_id: str
) -> bytes:
    """The exact bytes a device request's signature covers (module docstring)."""
    parts = [REQUEST_DOMAIN, method.upper().encode(), path.encode(), body_digest(body).encode()]
    parts += [time.encode(), nonce.encode(), device_id.encode()]
    return b"\n".join(parts)


def sign_request(
    key: Ed25519PrivateKey, method: str, path: str, body: bytes, device_id: str, now: float
) -> dict[str, str]:
    """The four headers that sign one request."""
    time, nonce = f"{now:.3f}", secrets.token_hex(16)
    sig = key.sign(request_bytes(method, path, body, time, nonce, device_id))
    return {H_DEVICE: device_id, H_TIME: time, H_NONCE: nonce, H_SIGNATURE: b64e(sig)}


def request_headers(headers: Mapping[str, str]) -> tuple[str, str, str, str] | None:
    """(device, time, nonce, signature) from a request's headers, or None if any is
    missing (header names compared case-insensitively)."""
    low = {k.lower(): v for k, v in headers.items()}
    got = tuple(low.get(h) for h in (H_DEVICE, H_TIME, H_NONCE, H_SIGNATURE))
    if any(v is None or v == "" for v in got):
        return None
    return got  # type: ignore[return-value]


def rotation_bytes(device_id: str, new_public_key: str) -> bytes:
    return b"\n".join([ROTATION_DOMAIN, device_id.encode(), new_public_key.encode()])


# --- control-plane documents -------------------------------------------------------------


def command_bytes(command: Command) -> bytes:
    """The canonical JSON bytes of a command: what the control plane signs."""
    return canonical_json(command.model_dump(mode="json")).encode()


def seal(key: Ed25519PrivateKey, command: Command) -> Envelope:
    data = command_bytes(command)
    return Envelope(
        payload=b64e(data), signature=b64e(key.sign(data)), key_id=key_id(public_text(key))
    )


def open_envelope(public: Ed25519PublicKey, envelope: Envelope) -> Command:
    """Verify the envelope's bytes with the pinned control-plane key, then decode them.
    ``WireError("bad_signature")`` when the bytes are not what the key signed."""
    data = b64d(envelope.payload, "payload")
    if not verify(public, b64d(envelope.signature, "signature"), data):
        raise WireError("bad_signature", "the command's signature does not verify", "signature")
    return decode(data, Command)
