"""Release bundles: a ``SHA256SUMS`` of every file, signed with an Ed25519 release key.

A bundle is a directory (unpacked from ``tillflow-edge-<version>.tar.gz``) holding the
binary, the unit, a default config, ``install.sh``, ``SHA256SUMS`` (``<hex>  <path>``
per file, sorted, the format ``sha256sum -c`` reads) and ``SHA256SUMS.sig`` (the raw
64-byte Ed25519 signature of ``SHA256SUMS``). Keys are PEM: PKCS#8 private,
SubjectPublicKeyInfo public, so ``openssl pkeyutl -verify -rawin`` can check a bundle
on a machine that has OpenSSL and no Tillflow yet.

This lives in ``edge`` because a terminal has no Python: the installer verifies an
upgrade with the frozen binary already installed (``tillflow-edge verify-bundle``),
which, unlike the bundle's own binary, is trusted. ``cryptography`` is imported only
by the functions that need it, so the daemon never loads this module's dependencies.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

from edge.errors import BundleInvalid, ConfigError

__all__ = [
    "SIGNATURE",
    "SUMS",
    "file_digest",
    "generate_keypair",
    "parse_sums",
    "sign_bundle",
    "sums_text",
    "verify_bundle",
]

SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"
_CHUNK = 1 << 20


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 release key pair; the private key file is mode 0600."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists", hint="a release key is never overwritten")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)


def file_digest(path: Path) -> str:
    """The lowercase hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every regular file under ``root`` but the checksum list and its signature."""
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise BundleInvalid(f"{root}: {rel} is a symlink; a bundle holds regular files only")
        if path.is_file() and rel not in (SUMS, SIGNATURE):
            out.append(rel)
    return sorted(out)


def sums_text(root: Path) -> str:
    """``SHA256SUMS`` for the directory ``root``: ``<hex>  <path>`` per file, sorted."""
    return "".join(f"{file_digest(root / rel)}  {rel}\n" for rel in _files(root))


def sign_bundle(root: Path, private_key_path: Path) -> None:
    """Write ``SHA256SUMS`` of ``root`` and its Ed25519 signature into ``root``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(private_key_path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{private_key_path} is not an Ed25519 private key")
    text = sums_text(root).encode()
    (root / SUMS).write_bytes(text)
    (root / SIGNATURE).write_bytes(key.sign(text))


def parse_sums(text: str) -> dict[str, str]:
    """``SHA256SUMS``: path -> digest, or :class:`BundleInvalid` naming the first bad line
    (not ``<64 hex>  <relative path>``, a path out of the tree, a path twice, or the list
    naming itself or its signature). The one reader: the installer's verification and
    a terminal's download of a release (``sync.device.releases``) both use it."""
    listed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        digest, sep, rel = line.partition("  ")
        path = PurePosixPath(rel)
        if (
            not sep
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
            or not rel
            or path.is_absolute()
            or ".." in path.parts
            or rel in listed
            or rel in (SUMS, SIGNATURE)
        ):
            raise BundleInvalid(f"{SUMS} line {number} is malformed: {line[:120]!r}")
        listed[rel] = digest
    return listed


def verify_bundle(root: Path, public_key_path: Path) -> list[str]:
    """Check ``root``: the signature of ``SHA256SUMS`` under the public key, then every
    listed file's digest, and that no file is there that the list does not name.

    Returns the verified paths; raises :class:`BundleInvalid` naming the first problem.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(public_key_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read release public key {public_key_path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{public_key_path} is not an Ed25519 public key")
    try:
        text = (root / SUMS).read_bytes()
        signature = (root / SIGNATURE).read_bytes()
    except OSError as exc:
        raise BundleInvalid(f"{root}: {exc.strerror}: {exc.filename}") from exc
    try:
        key.verify(signature, text)
    except InvalidSignature as exc:
        raise BundleInvalid(
            f"{root}: {SIGNATURE} does not verify under {public_key_path}",
            hint="the bundle was altered, or signed with another release key",
        ) from exc
    listed = parse_sums(text.decode("utf-8", errors="replace"))
    present = _files(root)
    if extra := sorted(set(present) - set(listed)):
        raise BundleInvalid(f"{root}: files not in {SUMS}: {', '.join(extra[:5])}")
    for rel, digest in listed.items():
        path = root / rel
        if not path.is_file():
            raise BundleInvalid(f"{root}: {rel} is listed in {SUMS} but missing")
        if file_digest(path) != digest:
            raise BundleInvalid(f"{root}: {rel} does not match its SHA-256 in {SUMS}")
    return sorted(listed)
