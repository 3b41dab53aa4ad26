"""The cloud audit log as the API writes it: one operator action, recorded with who did
it (the token's name, id and role), in the caller's transaction. The chain itself (the
rows, their hashes, verification) is ``cloud.fleet.audit``'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloud.fleet import audit
from cloud.fleet._sql import Conn
from cloud.fleet.tokens import Principal


def record(
    conn: Conn,
    who: Principal,
    action: str,
    target: str | None,
    detail: Mapping[str, Any] | None,
    *,
    at: float,
) -> audit.CloudAuditRow:
    """Append (who, what, when) to the cloud audit log, inside ``conn``'s transaction:
    the action and its record commit together or not at all."""
    return audit.append(
        conn,
        actor=who.name,
        actor_token=who.token_id,
        actor_role=who.role,
        action=action,
        target=target,
        detail=detail,
        at=at,
    )


__all__ = ["record"]
