"""The terminal's small files (card-data key, policy documents and pointer, scheduler
state) written whole or not at all, and durably: a power cut leaves the old file or the
new one, never a short one, and a write that returned survives it."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_durably(path: Path, data: bytes, *, mode: int = 0o644, exclusive: bool = False) -> bool:
    """Put ``data`` at ``path``: a temporary file beside it is written, fsynced, moved into
    place, and the directory fsynced so that the new name survives a power cut too.

    ``mode`` is the file's exact mode, whatever the umask, set before any byte lands.
    ``exclusive``: publish only if ``path`` does not exist (a hard link, which fails if it
    does, where a rename would replace it); returns False then, leaving ``path`` as it
    is. Otherwise True. An ``OSError`` is raised as it is, for the caller to say what the
    file was for; no temporary file is left behind either way."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        fsync_directory(path.parent)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def fsync_directory(directory: Path) -> None:
    """Make the names in ``directory`` (a rename, a new link) survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
