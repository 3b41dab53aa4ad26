"""API tokens: roles and what they may do, how a token is made and kept, and its SQL.

A token is ``tfa_`` + 43 characters of ``secrets.token_urlsafe(32)`` (256 random
bits). Only its SHA-256 is stored; its id (``tok_`` + the first 16 hex digits of that
hash) is what lists, logs and the audit log show. The clear token is in the answer to
``create`` and nowhere else. (A fast hash is right for a random 256-bit secret: there is
nothing to guess, so nothing for a slow hash to slow down.)
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from cloud.fleet._sql import Conn, Q

Role = Literal["admin", "operator", "auditor", "read_only"]
Permission = Literal["read", "audit", "operate", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
PERMISSIONS: tuple[Permission, ...] = get_args(Permission)

#: The permissions each role holds (fleet-api.md): each role holds those of the roles
#: below it.
GRANTS: Mapping[Role, frozenset[Permission]] = {
    "admin": frozenset({"read", "audit", "operate", "admin"}),
    "operator": frozenset({"read", "audit", "operate"}),
    "auditor": frozenset({"read", "audit"}),
    "read_only": frozenset({"read"}),
}

TOKEN_PREFIX = "tfa_"
ID_PREFIX = "tok_"
#: A presented token longer than this is not one of ours (nor hashed).
MAX_TOKEN_CHARS = 200
MAX_NAME_CHARS = 200


def grants(role: str, permission: str) -> bool:
    """Whether ``role`` holds ``permission`` (an unknown role holds nothing)."""
    return permission in GRANTS.get(role, frozenset())  # type: ignore[call-overload]


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_id(hashed: str) -> str:
    return ID_PREFIX + hashed[:16]


def plausible(token: str) -> bool:
    """Whether ``token`` could be one of ours (else it is refused unhashed, unlooked-up)."""
    return token.startswith(TOKEN_PREFIX) and len(token) <= MAX_TOKEN_CHARS and token.isascii()


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a token (None: it can)."""
    if not name.strip() or len(name) > MAX_NAME_CHARS:
        return f"must be 1-{MAX_NAME_CHARS} characters, not blank"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "must not hold control characters"
    return None


@dataclass(frozen=True)
class ApiToken:
    """A stored token as lists show it (never the secret, nor its hash)."""

    token_id: str
    name: str
    role: str
    created_at: float
    created_by: str
    revoked_at: float | None
    revoked_by: str | None
    last_used_at: float | None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a live token belongs to: the caller of a Fleet API request (the token's id
    and name, and its role)."""

    token_id: str
    name: str
    role: str

    def can(self, permission: str) -> bool:
        return grants(self.role, permission)


def _token(row: Sequence[Any]) -> ApiToken:
    return ApiToken(*row)


def create(conn: Conn, name: str, role: str, *, at: float, by: str) -> tuple[str, ApiToken]:
    """Make and store a token; returns (the clear token, its record)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of: {', '.join(ROLES)}")
    problem = name_problem(name)
    if problem:
        raise ValueError(f"the token's name {problem}")
    token = new_token()
    hashed = token_hash(token)
    row = conn.execute(
        Q["add_token"],
        {
            "token_id": token_id(hashed),
            "token_hash": hashed,
            "name": name,
            "role": role,
            "at": at,
            "by": by,
        },
    ).fetchone()
    assert row is not None
    return token, _token(row)


def holder(conn: Conn, token: str, *, at: float) -> Principal | None:
    """The live token ``token`` is (None: unknown, revoked or not one of ours); notes
    its use."""
    if not plausible(token):
        return None
    row = conn.execute(Q["token_by_hash"], {"token_hash": token_hash(token)}).fetchone()
    if row is None:
        return None
    found = Principal(row[0], row[1], row[2])
    if row[3] is None or row[3] < at - 60:
        conn.execute(Q["touch_token"], {"token_id": found.token_id, "at": at})
    return found


def tokens(conn: Conn, *, after: str | None, limit: int) -> list[ApiToken]:
    rows = conn.execute(Q["tokens"], {"after": after, "limit": limit}).fetchall()
    return [_token(r) for r in rows]


def revoke(conn: Conn, token_id_: str, *, at: float, by: str) -> ApiToken | None:
    """Revoke a token; None if there is no such token. Revoking twice keeps the first."""
    row = conn.execute(Q["revoke_token"], {"token_id": token_id_, "at": at, "by": by}).fetchone()
    return None if row is None else _token(row)
