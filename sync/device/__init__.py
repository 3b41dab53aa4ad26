"""The device side of sync: the terminal's identity and enrollment, the sync client,
the commands it takes, and the background runner (``sync.device.service`` plugs it into
the daemon; ``sync.device.main`` is ``tillflow-edge``). No server code here."""

from __future__ import annotations

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
