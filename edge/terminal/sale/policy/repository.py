"""``PolicyRepository`` keeps every activated version on disk and switches the active one
atomically, remembering the one before for ``rollback``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.terminal.files import fsync_directory, write_durably
from edge.terminal.sale.policy.compiled import CompiledPolicy, compile_policy
from edge.terminal.sale.policy.document import (
    NoPreviousPolicy,
    PolicyDocument,
    PolicyInvalid,
    PolicyStoreError,
    PolicyVersionConflict,
    _parse,
)

#: Named for the package, as when this was one module, so log filters keep matching.
log = logging.getLogger("edge.terminal.sale.policy")


# --- the repository --------------------------------------------------------------------

POINTER_NAME = "active.json"
_VERSION_PREFIX, _VERSION_SUFFIX = "policy-v", ".json"


class _Pointer(BaseModel):
    """``active.json``: which stored version is active and which one rollback returns to.

    Unknown keys are ignored, so a terminal that downgrades its binary still reads a
    pointer written by a newer build."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    format: Literal[1] = 1
    active: int = Field(ge=1)
    previous: int | None = Field(None, ge=1)


class PolicyRepository:
    """Activated policy versions in one directory (the terminal's ``<data dir>/policies``).

    Layout: ``policy-v{version}.json`` per version (immutable once written) and
    ``active.json``, the pointer. Both are written whole to a ``.tmp`` file, fsynced,
    renamed over the target with ``os.replace`` and the directory fsynced, so after a
    crash at any point the pointer names the old version or the new one, and the version
    it names is on disk. This instance is the one writer; ``active()`` notices a pointer
    switched by another process (one ``stat`` when nothing changed), but keep the
    returned ``CompiledPolicy`` for the hot path rather than calling ``active()`` per
    transaction.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        # (pointer file identity, pointer, compiled active policy) as last read or written
        self._cache: tuple[tuple[int, int, int], _Pointer, CompiledPolicy] | None = None

    @property
    def pointer_path(self) -> Path:
        return self.directory / POINTER_NAME

    def version_path(self, version: int) -> Path:
        return self.directory / f"{_VERSION_PREFIX}{version}{_VERSION_SUFFIX}"

    def versions(self) -> list[int]:
        """Every stored version, ascending (active, previous and any older ones)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._store_error("list", self.directory, exc) from exc
        found = []
        for name in names:
            if name.startswith(_VERSION_PREFIX) and name.endswith(_VERSION_SUFFIX):
                digits = name[len(_VERSION_PREFIX) : -len(_VERSION_SUFFIX)]
                if digits.isascii() and digits.isdigit():
                    found.append(int(digits))
        return sorted(found)

    def active(self) -> CompiledPolicy | None:
        """The active policy, or None when nothing was ever activated here."""
        with self._lock:
            current = self._current()
            return current[1] if current is not None else None

    def activate(self, doc: PolicyDocument, *, force: bool = False) -> CompiledPolicy:
        """Store ``doc`` and make it the active policy; the one it replaces becomes
        ``previous``. A version not above the active one is refused unless ``force``
        (which also overwrites an unreadable pointer). A version number already stored
        with different rules is always refused: versions are immutable."""
        compiled = compile_policy(doc)
        with self._lock:
            try:
                current = self._current()
            except (PolicyStoreError, PolicyInvalid):
                if not force:
                    raise
                current = None  # forced over a pointer or active version we cannot read
            pointer = current[0] if current is not None else None
            if pointer is not None and doc.version <= pointer.active and not force:
                raise PolicyVersionConflict(
                    f"policy version {doc.version} is not above the active version "
                    f"{pointer.active} in {self.directory}",
                    hint="give the document a higher version, or pass force=True to go back",
                )
            self._store_version(doc)
            if pointer is None:
                previous = None
            elif pointer.active != doc.version:
                previous = pointer.active
            else:
                previous = pointer.previous
            self._switch(_Pointer(active=doc.version, previous=previous), compiled)
        log.info(
            "fraud policy v%s activated (previous v%s)",
            doc.version,
            previous,
            extra={"action": "policy_activate", "version": doc.version, "previous": previous},
        )
        return compiled

    def rollback(self) -> CompiledPolicy:
        """Re-activate the previous version. One step only: afterwards there is no
        previous, so a repeated rollback fails instead of returning to the version it
        just left."""
        with self._lock:
            current = self._current()
            pointer = current[0] if current is not None else None
            if pointer is None or pointer.previous is None:
                raise NoPreviousPolicy(
                    f"no previous fraud policy to roll back to in {self.directory}",
                    hint="activate a version explicitly (force=True to go back to an older one)",
                )
            compiled = compile_policy(self._load_version(pointer.previous))
            self._switch(_Pointer(active=pointer.previous, previous=None), compiled)
        log.info(
            "fraud policy rolled back from v%s to v%s",
            pointer.active,
            pointer.previous,
            extra={
                "action": "policy_rollback",
                "version": pointer.previous,
                "from": pointer.active,
            },
        )
        return compiled

    # -- internals (callers hold self._lock) --

    def _current(self) -> tuple[_Pointer, CompiledPolicy] | None:
        path = self.pointer_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache = None
            return None
        except OSError as exc:
            raise self._store_error("stat", path, exc) from exc
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is not None and self._cache[0] == identity:
            return self._cache[1], self._cache[2]
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise self._store_error("read", path, exc) from exc
        try:
            pointer = _Pointer.model_validate_json(raw)
        except ValidationError as exc:
            raise PolicyStoreError(
                f"{path} is not a valid policy pointer: {exc.errors(include_url=False)[0]['msg']}",
                operation="read",
                path=path,
                hint="activate a version with force=True to rewrite it",
            ) from exc
        compiled = compile_policy(self._load_version(pointer.active))
        self._cache = (identity, pointer, compiled)
        return pointer, compiled

    def _load_version(self, version: int) -> PolicyDocument:
        path = self.version_path(version)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise PolicyStoreError(
                f"{path} is missing: the policy pointer names version {version}",
                operation="read",
                path=path,
                hint="activate a stored version with force=True",
            ) from exc
        except OSError as exc:
            raise self._store_error("read", path, exc) from exc
        doc = _parse(text, str(path), is_json=True)
        if doc.version != version:
            raise PolicyStoreError(
                f"{path} holds version {doc.version}, not {version}",
                operation="read",
                path=path,
                hint="the file was edited or renamed by hand; restore it or activate anew",
            )
        return doc

    def _store_version(self, doc: PolicyDocument) -> None:
        path = self.version_path(doc.version)
        if path.exists():
            if self._load_version(doc.version) != doc:
                raise PolicyVersionConflict(
                    f"policy version {doc.version} is already stored in {path} with "
                    "different rules",
                    hint="versions are immutable: give the changed document a new version",
                )
            self._fsync_directory()  # a retried activation: make its earlier rename durable
            return
        body = doc.model_dump_json(indent=2, exclude_none=False)
        self._write_atomically(path, body.encode("utf-8") + b"\n")

    def _switch(self, pointer: _Pointer, compiled: CompiledPolicy) -> None:
        path = self.pointer_path
        self._write_atomically(path, pointer.model_dump_json().encode("utf-8") + b"\n")
        try:
            st = os.stat(path)
        except OSError:
            self._cache = None  # the switch is durable; the next read refills the cache
            return
        self._cache = ((st.st_ino, st.st_mtime_ns, st.st_size), pointer, compiled)

    def _write_atomically(self, path: Path, data: bytes) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_durably(path, data)
        except OSError as exc:
            raise self._store_error("write", path, exc) from exc

    def _fsync_directory(self) -> None:
        try:
            fsync_directory(self.directory)
        except OSError as exc:
            raise self._store_error("fsync", self.directory, exc) from exc

    @staticmethod
    def _store_error(operation: str, path: Path, exc: OSError) -> PolicyStoreError:
        return PolicyStoreError(
            f"cannot {operation} {path}: {exc.strerror or exc}",
            operation=operation,
            path=path,
            hint="check the policy directory's permissions and free space",
            retryable=True,
        )
