"""Import paths (``pkg.mod:name`` or ``pkg.mod.name``) and code fingerprints."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from collections.abc import Iterable
from typing import Any

from edge.errors import TillflowError


class ImportPathError(TillflowError):
    code = "import_failed"


def add_search_paths(paths: Iterable[str]) -> None:
    """Make step modules under ``paths`` importable (the CLI's ``--path DIR``)."""
    for p in paths:
        if p not in sys.path:
            sys.path.insert(0, p)


def split_path(path: str) -> tuple[str, str]:
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ImportPathError(f"'{path}' is not an import path", hint="write it as pkg.module:name")
    return module, attr


def resolve(path: str) -> Any:
    """Import ``path`` and return the object it names, or raise ImportPathError."""
    module_name, attr = split_path(path)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the integrator's to see
        raise ImportPathError(
            f"cannot import module '{module_name}' for '{path}': {type(exc).__name__}: {exc}",
            hint="is it on PYTHONPATH or under a --path directory?",
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportPathError(
                f"module '{module_name}' has no attribute '{attr}' (from '{path}')"
            ) from exc
    return obj


def fingerprint(obj: Any) -> str:
    """A short hash of an object's code: its source where we can read it, else bytecode.

    A run pins the fingerprints of its step functions; a different fingerprint on
    resume means the code changed under the run (``on_code_change``).
    """
    try:
        text = inspect.getsource(obj).encode()
    except (OSError, TypeError):
        code = getattr(obj, "__code__", None)
        text = (code.co_code + repr(code.co_consts).encode()) if code else repr(obj).encode()
    return hashlib.sha256(text).hexdigest()[:16]
