"""Who is looking at the dashboard: a login with an API token, kept in a cookie, and the
access rule every dashboard route states (as every Fleet API route states its own).

The cookie (``tf_session``) holds ``NONCE.TOKEN``: the API token the operator logged in
with and a nonce drawn at that login. It is ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page sends it), scoped to ``/ui`` and kept
``SESSION_MAX_AGE_S``. Every request is judged afresh, exactly as the Fleet API judges a
bearer token (``FleetContext.authenticate``: the token's hash looked up, a revoked token
refused at once), so a role, a revocation or an expiry means the same here as there.

Deny by default: a route's rule is ``session(permission)``; no cookie, or a token no
longer live, is a redirect to the login page (303); a role without the permission is a
403 page. A POST must also carry the session's CSRF token (a form field ``csrf`` or the
``X-CSRF-Token`` header): an HMAC of the nonce and the token's hash under a key derived
from the control plane's signing key (the same in every ``--workers`` process; a
context without a key uses one drawn per process). The same-site cookie already keeps
other sites out; the token keeps out anything that could still send it, and a request
whose ``Origin`` or ``Sec-Fetch-Site`` says it came from elsewhere is refused before
either is looked at.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import serialization
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from cloud.api.fleet.auth import Rule
from cloud.api.fleet.context import FleetContext
from cloud.fleet.tokens import GRANTS, PERMISSIONS, ROLES, Permission, Principal

COOKIE = "tf_session"
COOKIE_PATH = "/ui"
#: A login lasts a working day; then the token is asked for again.
SESSION_MAX_AGE_S = 8 * 3600
#: The largest form a dashboard POST takes (a reason and the CSRF token; a login's token).
FORM_CAP = 8192
#: The longest token text looked up (ours are far shorter).
MAX_TOKEN_CHARS = 200
_KEY_DOMAIN = b"tillflow dashboard csrf v1"
_PROCESS_KEY = secrets.token_bytes(32)


class DashboardError(Exception):
    """A refusal shown as a page: its status, a title and what to do."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


class LoginNeeded(Exception):
    """No live session: the answer is a redirect to the login page (back to ``next``)."""

    def __init__(self, next_path: str, why: str | None = None) -> None:
        super().__init__(why or "log in")
        self.next_path = next_path
        self.why = why


@dataclass(frozen=True)
class Session:
    """The caller (as the Fleet API would see its token), the nonce of this login and
    the CSRF token its forms carry."""

    who: Principal
    nonce: str
    csrf: str
    form: dict[str, str]

    def can(self, permission: str) -> bool:
        return self.who.can(permission)


def csrf_key(ctx: FleetContext) -> bytes:
    """The HMAC key of CSRF tokens: from the signing key (one per control plane)."""
    if ctx.signing_key is None:
        return _PROCESS_KEY
    raw = ctx.signing_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return hmac.new(raw, _KEY_DOMAIN, hashlib.sha256).digest()


def csrf_token(ctx: FleetContext, nonce: str, token: str) -> str:
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    return hmac.new(csrf_key(ctx), f"{nonce}:{token_hash}".encode(), hashlib.sha256).hexdigest()


def cookie_value(nonce: str, token: str) -> str:
    return f"{nonce}.{token}"


def parse_cookie(value: str | None) -> tuple[str, str] | None:
    """(nonce, token) of a cookie, None if it is not one of ours."""
    if not value or len(value) > MAX_TOKEN_CHARS + 64:
        return None
    nonce, sep, token = value.partition(".")
    if not sep or not nonce or not token or not value.isascii():
        return None
    return nonce, token


def new_nonce() -> str:
    return secrets.token_urlsafe(16)


def safe_next(path: str | None) -> str:
    """Where a login may send the browser back to: a dashboard path, never elsewhere."""
    if not path or not path.startswith("/ui/") or "//" in path or "\\" in path:
        return "/ui/fleet"
    if not path.isascii() or any(c in path for c in "\r\n\t") or len(path) > 1000:
        return "/ui/fleet"
    return path


def cross_site(request: Request) -> bool:
    """Whether the browser says the request came from another site (``Sec-Fetch-Site``)
    or another origin (``Origin``)."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("origin")
    if origin is None or (origin == "null" and fetch_site == "same-origin"):
        return False
    # the host only: behind a proxy that ends TLS the scheme seen here is not the browser's
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form body (at most ``FORM_CAP`` bytes), the first value of each field."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > FORM_CAP:
        raise DashboardError(413, "Too large", f"a form is at most {FORM_CAP} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_CAP:
            raise DashboardError(413, "Too large", f"a form is at most {FORM_CAP} bytes")
    try:
        text = body.decode("utf-8")
        fields = parse_qs(text, keep_blank_values=True, max_num_fields=20, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise DashboardError(400, "Bad form", "the form is not urlencoded UTF-8 text") from None
    return {k: v[0] for k, v in fields.items() if "\x00" not in k and "\x00" not in v[0]}


class SessionRule(Rule):
    """A dashboard route's rule: a live session whose role holds ``permission`` (and,
    for a POST, its CSRF token). The dependency's value is the ``Session``."""

    kind = "session"

    def __init__(self, permission: Permission) -> None:
        if permission not in PERMISSIONS:
            raise ValueError(f"unknown permission {permission!r}; one of: {PERMISSIONS}")
        self.permission: Permission = permission

    async def __call__(self, request: Request) -> Session:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        unsafe = request.method not in ("GET", "HEAD")
        if unsafe and cross_site(request):
            raise DashboardError(403, "Refused", "a request from another site is refused")
        found = parse_cookie(request.cookies.get(COOKIE))
        if found is None:
            raise LoginNeeded(path if not unsafe else request.headers.get("referer", ""))
        nonce, token = found
        ctx: FleetContext = request.app.state.fleet
        who = await run_in_threadpool(ctx.authenticate, token[:MAX_TOKEN_CHARS])
        if who is None:
            raise LoginNeeded(path, "the token is unknown or revoked: log in again")
        expected = csrf_token(ctx, nonce, token)
        form: dict[str, str] = {}
        if unsafe:
            form = await read_form(request)
            given = request.headers.get("x-csrf-token") or form.get("csrf", "")
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise DashboardError(
                    403, "Refused", "the form's CSRF token is missing or not this session's: "
                    "reload the page and try again",
                )  # fmt: skip
        if not who.can(self.permission):
            holders = ", ".join(r for r in ROLES if self.permission in GRANTS[r])
            raise DashboardError(
                403, "Not allowed", f"the role {who.role} may not do this: it needs "
                f"{self.permission!r} ({holders})",
            )  # fmt: skip
        return Session(who, nonce, expected, form)

    def __repr__(self) -> str:
        return f"session({self.permission!r})"


_RULES = {p: SessionRule(p) for p in PERMISSIONS}


def session(permission: Permission) -> SessionRule:
    """The rule "a session whose role holds ``permission``"."""
    return _RULES[permission]


CanRead = Annotated[Session, Depends(session("read"))]
CanAudit = Annotated[Session, Depends(session("audit"))]
CanOperate = Annotated[Session, Depends(session("operate"))]

__all__ = [
    "COOKIE",
    "COOKIE_PATH",
    "SESSION_MAX_AGE_S",
    "CanAudit",
    "CanOperate",
    "CanRead",
    "DashboardError",
    "LoginNeeded",
    "Session",
    "SessionRule",
    "cookie_value",
    "cross_site",
    "csrf_token",
    "new_nonce",
    "parse_cookie",
    "read_form",
    "safe_next",
    "session",
]
