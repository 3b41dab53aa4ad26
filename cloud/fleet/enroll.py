"""Enrollment tokens as operators see them: listed by id (the first 12 hex digits of
the token's SHA-256; never the token nor its whole hash) and revoked. They are made by
the sync service (``SyncService.create_enroll_token``), in its ``enroll_tokens`` table."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cloud.fleet._sql import Conn, Q

ID_CHARS = 12


def token_id(token: str) -> str:
    """The id of a clear enrollment token (as ``sync.server`` hashes it)."""
    return hashlib.sha256(token.encode()).hexdigest()[:ID_CHARS]


@dataclass(frozen=True)
class EnrollTokenRow:
    id: str
    store: str
    group: str | None
    created_at: float
    expires_at: float
    used_at: float | None
    device_id: str | None
    revoked_at: float | None
    revoked_by: str | None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.used_at is not None:
            return "used"
        return "expired" if self.expires_at <= now else "live"


def tokens(
    conn: Conn,
    *,
    after: str | None = None,
    store: str | None = None,
    id_: str | None = None,
    limit: int = 100,
) -> list[EnrollTokenRow]:
    params = {"after": after, "store": store, "id": id_, "limit": limit}
    return [EnrollTokenRow(*r) for r in conn.execute(Q["enroll_tokens"], params).fetchall()]


class RevokeRefused(Exception):
    """Why a token cannot be revoked: ``code`` (not_found, ambiguous, used)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def revoke(conn: Conn, id_: str, *, at: float, by: str) -> None:
    """Revoke the unused token ``id_`` names (an enrollment racing it waits, then fails)."""
    rows = conn.execute(Q["enroll_token_lock"], {"id": id_}).fetchall()
    if not rows:
        raise RevokeRefused("not_found", f"no enrollment token {id_}")
    if len(rows) > 1:
        raise RevokeRefused("ambiguous", f"{len(rows)} enrollment tokens have the id {id_}")
    token_hash, used_at, device_id = rows[0]
    if used_at is not None:
        raise RevokeRefused(
            "used", f"enrollment token {id_} was used by device {device_id}: revoke the device"
        )
    conn.execute(Q["revoke_enroll_token"], {"token_hash": token_hash, "at": at, "by": by})
