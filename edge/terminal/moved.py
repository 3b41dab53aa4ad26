"""The module paths ``edge.terminal`` had before it was split into ``drivers``, ``sale``
and ``service``, still importable: each old name is the module under its new name.

Why: a workflow names its step functions by import path (``function:
edge.terminal.payment_steps:authorize_online``), and a run in flight finishes on the
definition snapshot it started with, stored in the terminal's database (invariant 4).
After an upgrade that snapshot still names the old path; if it no longer resolved, every
payment in flight across the upgrade would fail on resume. New code and new YAML use the
new paths; this table is for what was written down before.

The old name is an alias, not a copy: ``import edge.terminal.payment_steps`` gives the
very module object ``edge.terminal.sale.payment_steps`` (same functions, same code
fingerprints, same classes for ``isinstance``). ``edge/terminal/__init__.py`` installs
the finder, so any import of an old name, by the engine or anyone, finds it. A moved
package's submodules (``edge.terminal.policy.document``) follow their package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence

#: Old module (or package) path -> where it lives now. Never remove a line: a database
#: written by an old release may name it.
MOVED: dict[str, str] = {
    "edge.terminal.ports": "edge.terminal.drivers.contracts",
    "edge.terminal._http": "edge.terminal.drivers._http",
    "edge.terminal.acquirer_http": "edge.terminal.drivers.acquirer_http",
    "edge.terminal.devices_http": "edge.terminal.drivers.devices_http",
    "edge.terminal.payment_steps": "edge.terminal.sale.payment_steps",
    "edge.terminal.txn_steps": "edge.terminal.sale.txn_steps",
    "edge.terminal.risk": "edge.terminal.sale.risk",
    "edge.terminal.views": "edge.terminal.sale.views",
    "edge.terminal.wait_inputs": "edge.terminal.sale.wait_inputs",
    "edge.terminal.policy": "edge.terminal.sale.policy",
    "edge.terminal.runtime": "edge.terminal.service.terminal",
    "edge.terminal.cli": "edge.terminal.service.commands",
    "edge.terminal.daemon": "edge.terminal.service.daemon",
    "edge.terminal.api": "edge.terminal.service.api",
    "edge.terminal.httpserver": "edge.terminal.service.httpserver",
    "edge.terminal.httpwire": "edge.terminal.service.httpwire",
    "edge.terminal.httplimits": "edge.terminal.service.httplimits",
    "edge.terminal.sdnotify": "edge.terminal.service.sdnotify",
    "edge.terminal.scheduler": "edge.terminal.service.scheduler",
    "edge.terminal.main": "edge.terminal.service.main",
    "edge.terminal.release": "edge.terminal.service.release",
}


def new_name(old: str) -> str | None:
    """Where the module ``old`` lives now (a moved package's submodules with it), or None
    if it did not move."""
    parts = old.split(".")
    for i in range(len(parts), 2, -1):
        head = ".".join(parts[:i])
        if head in MOVED:
            return ".".join([MOVED[head], *parts[i:]])
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing: the module ran once, under its new name."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers only for the old names; every other import goes on as before."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
