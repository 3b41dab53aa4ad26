"""The control plane's command-signing key file: 32 raw Ed25519 private-key bytes,
mode 0600, created once (never replaced: terminals pin its public half at enrollment,
so a new key would make every command they receive a forgery to them)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.errors import ConfigError
from edge.terminal.files import write_durably
from sync import signing

#: Where ``tillflow cloud serve`` keeps the key unless told otherwise.
DEFAULT_KEY_PATH = Path("~/.tillflow/control-plane.key")
#: The environment variable naming the key file.
KEY_FILE_ENV = "TILLFLOW_SIGNING_KEY_FILE"
KEY_BYTES = 32


def load_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``; ``ConfigError`` when it is missing, unsafe or damaged."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(
            f"no control-plane signing key at {path}",
            hint="`tillflow cloud serve` creates it on first start; or pass --signing-key FILE",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot open the signing key {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the signing key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"the signing key {path} is accessible to group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o})",
                hint=f"run `chmod 600 {path}`; if anyone else may have read it, treat the key "
                "as leaked (every terminal pinned it and must be re-enrolled)",
            )
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise ConfigError(
            f"the signing key {path} is {len(data)} bytes, not {KEY_BYTES}",
            hint="restore it from backup: terminals pinned its public half",
        )
    return signing.load_private(data)


def load_or_create_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The key at ``path``, made (mode 0600, its directory 0700) when absent; True
    when this call made it. Two processes starting at once end with one key."""
    if not path.exists():
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            made = write_durably(
                path, signing.private_bytes(signing.new_key()), mode=0o600, exclusive=True
            )
        except OSError as exc:
            raise ConfigError(f"cannot create the signing key {path}: {exc.strerror}") from exc
        return load_key(path), made
    return load_key(path), False


def key_path(given: str | None) -> Path:
    """The key file: ``given``, else ``$TILLFLOW_SIGNING_KEY_FILE``, else the default."""
    return Path(given or os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_PATH).expanduser()
