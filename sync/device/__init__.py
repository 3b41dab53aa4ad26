"""The device side of sync: the terminal's identity and enrollment, the sync client,
the commands it takes, and the background runner (``sync.device.service`` plugs it into
the daemon; ``sync.device.main`` is ``tillflow-edge``). No server code here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sync.device.client import SyncClient, SyncOutcome
    from sync.device.commands import CommandOutcome, CommandProcessor
    from sync.device.errors import (
        EnrollError,
        IdentityError,
        SyncError,
        SyncRefused,
        SyncUnavailable,
    )
    from sync.device.identity import DeviceIdentity, enroll, is_enrolled, load_identity, load_key
    from sync.device.ports import SyncStore, TerminalHooks
    from sync.device.runner import SyncRunner
    from sync.device.service import SyncService

#: Where each public name lives. Imported at first access (PEP 562), not with the
#: package: ``tillflow-edge`` imports ``sync.device.main`` on every start, and a
#: terminal without a ``cloud:`` section must not load httpx and cryptography for it.
_HOMES = {
    "SyncClient": "client",
    "SyncOutcome": "client",
    "CommandOutcome": "commands",
    "CommandProcessor": "commands",
    "EnrollError": "errors",
    "IdentityError": "errors",
    "SyncError": "errors",
    "SyncRefused": "errors",
    "SyncUnavailable": "errors",
    "DeviceIdentity": "identity",
    "enroll": "identity",
    "is_enrolled": "identity",
    "load_identity": "identity",
    "load_key": "identity",
    "SyncStore": "ports",
    "TerminalHooks": "ports",
    "SyncRunner": "runner",
    "SyncService": "service",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "CommandOutcome",
    "CommandProcessor",
    "DeviceIdentity",
    "EnrollError",
    "IdentityError",
    "SyncClient",
    "SyncError",
    "SyncOutcome",
    "SyncRefused",
    "SyncRunner",
    "SyncService",
    "SyncStore",
    "SyncUnavailable",
    "TerminalHooks",
    "enroll",
    "is_enrolled",
    "load_identity",
    "load_key",
]
