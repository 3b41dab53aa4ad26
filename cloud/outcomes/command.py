"""The ``resolve_outcome`` command, sealed and queued in the caller's transaction.

The truth travels as the command's document (kind ``outcome``, content a
``wire.Outcome``): signed like every command, so only the control plane can settle a
terminal's operation, and kept by the terminal under ``outcome:<key>``
(``sync.device.commands``). Its version is 1: an outcome is not a document in force,
with versions to grow; the terminal refuses a second truth for a key whatever its seq.

Queued as ``SyncService.queue_command`` queues one (the device's next seq, the sealed
envelope in ``commands``), but on the caller's connection, so recording the truth and
queueing the command that tells it commit together.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.outcomes._sql import Conn
from cloud.sync.postgres import PostgresSyncTx
from sync import signing, wire
from sync.server_records import NewCommand

ACTION = "resolve_outcome"
#: How long the command waits for the terminal: a terminal may be offline for days,
#: and its operation stays open until it hears (seconds; a week).
DEFAULT_TTL_S = 7 * 86_400.0


@dataclass(frozen=True)
class Queued:
    """The command made, or (``command_id`` None) why none was: ``note``."""

    command_id: str | None
    seq: int | None
    note: str | None = None


def queue_resolution(
    conn: Conn,
    key: Ed25519PrivateKey,
    outcome: wire.Outcome,
    *,
    device_id: str,
    now: float,
    ttl_s: float = DEFAULT_TTL_S,
) -> Queued:
    """Seal ``resolve_outcome`` for ``device_id`` carrying ``outcome`` and queue it, in
    the transaction ``conn`` holds. A device unknown or revoked gets none (``note``
    says which): its operation is recorded resolved, and nothing can reach it."""
    tx = PostgresSyncTx(conn)
    device = tx.device(device_id, lock=True)
    if device is None:
        return Queued(None, None, "unknown_device")
    if device.status != "active":
        return Queued(None, None, f"device_{device.status}")
    seq = tx.next_command_seq(device_id)
    document = wire.OutcomeDocument(
        kind="outcome", version=1, content=outcome.model_dump(mode="json")
    )
    command = wire.Command(
        schema_version=1,
        command_id="cmd_" + uuid.uuid4().hex,
        device_id=device_id,
        group=None,  # addressed to the device alone
        seq=seq,
        action="resolve_outcome",
        issued_at=now,
        expires_at=now + ttl_s,
        document=document,
    )
    envelope = signing.seal(key, command)
    tx.add_command(
        NewCommand(
            command_id=command.command_id,
            device_id=device_id,
            seq=seq,
            action=ACTION,
            envelope=wire.encode(envelope).decode(),
            document=document.model_dump(mode="json"),
            created_at=now,
            expires_at=command.expires_at,
        )
    )
    return Queued(command.command_id, seq)
