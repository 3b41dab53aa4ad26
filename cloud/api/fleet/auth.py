"""Who may call what: bearer API tokens, roles, and a rule on every route.

A route states its rule as a dependency, and the app will not build without one::

    who: Principal = Depends(allow("operate"))   # a token whose role holds "operate"
    _: None = Depends(public())                  # anyone (only /openapi.json, health)
    _: None = Depends(device_signed())           # the sync routes: the device's signature

The same as parameter types (no ``Depends`` default for ruff's B008 to flag):
``who: CanRead``, ``CanAudit``, ``CanOperate``, ``CanAdmin``.

Permissions and the roles holding them: ``read`` (admin, operator, auditor, read_only),
``audit`` (admin, operator, auditor), ``operate`` (admin, operator), ``admin`` (admin).

Deny by default, twice over: ``check_rules(app)`` refuses to build (``RouteRuleError``)
an app with a route that has no rule, or more than one; and every route carries
``require_rule``, which answers 403 ``no_rule`` should a route without one be added
after the build. A missing, unknown or revoked token is 401 ``unauthenticated``; a
role that lacks the permission is 403 ``forbidden``. The caller's token is checked
before its input: a request whose JSON does not parse is still a 401 to a stranger
(``rule_answer`` is asked before a validation error is answered).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import BaseRoute

from cloud.api.fleet.context import FleetContext
from cloud.api.fleet.errors import ApiError
from cloud.fleet.tokens import GRANTS, PERMISSIONS, ROLES, Permission, Principal, Role
from edge.errors import TillflowError

_bearer = HTTPBearer(auto_error=False, description="an API token: Authorization: Bearer TOKEN")


class RouteRuleError(TillflowError):
    """A route without exactly one rule: the app is not built."""

    code = "no_rule"


class Rule:
    """The base of the three rules (a route's dependency whose type says which)."""

    kind = "rule"


class Allow(Rule):
    """A token whose role holds ``permission``; the dependency's value is the caller."""

    kind = "allow"

    def __init__(self, permission: Permission) -> None:
        if permission not in PERMISSIONS:
            raise ValueError(f"unknown permission {permission!r}; one of: {PERMISSIONS}")
        self.permission: Permission = permission

    def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        # a plain def: FastAPI runs it in a worker thread (it reads the database)
        return authorize(request, self.permission)

    def __repr__(self) -> str:
        return f"allow({self.permission!r})"


class Public(Rule):
    """Anyone may call the route."""

    kind = "public"

    async def __call__(self) -> None:  # no I/O: no worker thread for it
        return None


class DeviceSigned(Rule):
    """The route checks the device's signature itself (the sync service's routes)."""

    kind = "device_signed"

    async def __call__(self) -> None:  # no I/O: no worker thread for it
        return None


_ALLOW = {p: Allow(p) for p in PERMISSIONS}
_PUBLIC = Public()
_DEVICE_SIGNED = DeviceSigned()


def allow(permission: Permission) -> Allow:
    """The rule "a token holding ``permission``" (a dependency giving the Principal)."""
    if permission not in _ALLOW:
        raise ValueError(f"unknown permission {permission!r}; one of: {', '.join(PERMISSIONS)}")
    return _ALLOW[permission]


#: The rules as parameter types (ruff's B008 flags a ``Depends(...)`` default):
#: ``def f(who: CanOperate, ctx: Ctx)`` is ``who: Principal = Depends(allow("operate"))``.
CanRead = Annotated[Principal, Depends(allow("read"))]
CanAudit = Annotated[Principal, Depends(allow("audit"))]
CanOperate = Annotated[Principal, Depends(allow("operate"))]
CanAdmin = Annotated[Principal, Depends(allow("admin"))]


def public() -> Public:
    return _PUBLIC


def device_signed() -> DeviceSigned:
    return _DEVICE_SIGNED


# --- checking a request --------------------------------------------------------------------


def bearer_token(request: Request) -> str | None:
    """The token of ``Authorization: Bearer TOKEN`` (None: absent or another scheme)."""
    value = request.headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _unauthenticated(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message, headers={"WWW-Authenticate": "Bearer"})


def authenticate(request: Request) -> Principal:
    """The caller of ``request`` (cached on it), or 401."""
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    token = bearer_token(request)
    if token is None:
        raise _unauthenticated("an API token is needed: Authorization: Bearer TOKEN")
    ctx: FleetContext = request.app.state.fleet
    found = ctx.authenticate(token)
    if found is None:
        raise _unauthenticated("the API token is unknown or revoked")
    request.state.principal = found
    return found


def authorize(request: Request, permission: Permission) -> Principal:
    """The caller, if its role holds ``permission``; else 401 or 403."""
    who = authenticate(request)
    if not who.can(permission):
        holders = ", ".join(r for r in ROLES if permission in GRANTS[r])
        raise ApiError(
            403,
            "forbidden",
            f"the role {who.role} may not do this: it needs {permission!r} ({holders})",
        )
    return who


# --- rules of routes -----------------------------------------------------------------------
#
# FastAPI keeps an included router as one entry of ``app.routes`` and serves its routes
# as they are (``scope["route"]`` is the router's own APIRoute): a rule counts where the
# route itself states it (its endpoint's dependencies, or its router's), which is what
# both the build check and ``require_rule`` read, and the one place a reader looks.


def _calls(dependant: Dependant) -> Iterator[object]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def rules_of(route: BaseRoute | None) -> list[Rule]:
    """The rules among a route's own dependencies (at any depth)."""
    if not isinstance(route, APIRoute):
        return []
    return [call for call in _calls(route.dependant) if isinstance(call, Rule)]


def rule_of(route: BaseRoute | None) -> Rule | None:
    """The route's one rule (None: none, or more than one: both refused)."""
    found = rules_of(route)
    return found[0] if len(found) == 1 else None


def served_routes(app: FastAPI) -> list[RouteContext]:
    """Every route the app serves, included routers' flattened (each with its path as
    served, its methods and ``original_route``)."""
    return list(iter_route_contexts(app.routes))


async def require_rule(request: Request) -> None:
    """On every route: a route without exactly one rule does not serve (403 no_rule).
    (Async: it does no I/O, so the sync routes pay no worker-thread hop for it.)"""
    if rule_of(request.scope.get("route")) is None:
        raise ApiError(
            403, "no_rule", f"{request.url.path[:200]} has no access rule and does not serve"
        )


def rule_answer(request: Request) -> ApiError | None:
    """The refusal the route's rule gives ``request`` (None: the rule lets it through).
    Asked before a validation error is answered, so bad input never tells a stranger
    more than 401."""
    rule = rule_of(request.scope.get("route"))
    if rule is None:
        return ApiError(403, "no_rule", f"{request.url.path[:200]} has no access rule")
    if isinstance(rule, Allow):
        try:
            authorize(request, rule.permission)
        except ApiError as exc:
            return exc
    return None


def check_rules(app: FastAPI) -> None:
    """Refuse an app with a route that has no rule, more than one, or is not an
    ``APIRoute`` (which could carry none)."""
    problems = []
    for served in served_routes(app):
        route = served.original_route
        path = served.path or repr(route)
        if not isinstance(route, APIRoute):
            problems.append(f"{path}: not an APIRoute, so it cannot carry an access rule")
            continue
        found = rules_of(route)
        methods = ",".join(sorted(served.methods or ()))
        if not found:
            problems.append(
                f"{methods} {path}: no access rule (add Depends(allow(...)) or, if it must be "
                "open, Depends(public()))"
            )
        elif len(found) > 1:
            problems.append(f"{methods} {path}: {len(found)} access rules {found}; one only")
    if problems:
        raise RouteRuleError("routes without one access rule:\n  " + "\n  ".join(problems))


def route_permission(route: BaseRoute) -> str:
    """The rule of a route as a word: a permission, ``public`` or ``device_signed``."""
    rule = rule_of(route)
    if rule is None:
        return "none"
    return rule.permission if isinstance(rule, Allow) else rule.kind


__all__ = [
    "Allow",
    "CanAdmin",
    "CanAudit",
    "CanOperate",
    "CanRead",
    "DeviceSigned",
    "Permission",
    "Principal",
    "Public",
    "Role",
    "RouteRuleError",
    "Rule",
    "allow",
    "authenticate",
    "authorize",
    "bearer_token",
    "check_rules",
    "device_signed",
    "public",
    "require_rule",
    "route_permission",
    "rule_answer",
    "rule_of",
    "rules_of",
    "served_routes",
]
