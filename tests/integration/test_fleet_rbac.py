"""Deny by default, proved on the built app: every route it serves (enumerated, so a
route added by anyone is covered) refuses a missing token, a revoked token and a role
below its rule, before it reads any input; a route without a rule stops the build."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi import APIRouter, Depends
from fleet_app import Fleet, fleet_app

from cloud.api.app import create_app
from cloud.api.fleet import discover_routers
from cloud.api.fleet.auth import (
    Allow,
    CanRead,
    RouteRuleError,
    allow,
    route_permission,
    rule_of,
    served_routes,
)
from cloud.fleet.tokens import GRANTS, ROLES

pytest.importorskip("starlette.testclient")

#: The only routes anyone may call, and the device routes (the signature is their rule).
PUBLIC = {("GET", "/openapi.json"), ("GET", "/v1/health")}
DEVICE_SIGNED = {
    ("POST", "/v1/enroll"), ("POST", "/v1/sync"), ("POST", "/v1/rotate-key"),
    # a release's signed manifest and its files, fetched by a device (cloud.api.releases)
    ("GET", "/v1/releases/{release}/manifest"), ("GET", "/v1/files/{sha256}"),
}  # fmt: skip


@pytest.fixture
def fleet(new_database) -> Iterator[Fleet]:
    with fleet_app(new_database()) as f:
        yield f


def sample_path(path: str) -> str:
    """The route's path with every parameter given a value (any: the rule comes first)."""
    return re.sub(r"\{[^}]+\}", "1", path)


def requests(fleet: Fleet) -> list[tuple[str, str, Allow]]:
    out = []
    for served in served_routes(fleet.client.app):
        rule = rule_of(served.original_route)
        for method in sorted(served.methods or ()):
            if method == "HEAD":
                continue
            key = (method, served.path)
            if key in PUBLIC:
                assert route_permission(served.original_route) == "public", key
                continue
            if key in DEVICE_SIGNED:
                assert route_permission(served.original_route) == "device_signed", key
                continue
            assert isinstance(rule, Allow), f"{key} is open without being listed as public"
            out.append((method, sample_path(served.path), rule))
    return out


def call(fleet: Fleet, method: str, path: str, headers: dict[str, str]) -> object:
    # a body that is not even JSON: the token is judged before any input is
    headers = headers | {"content-type": "application/json"}
    return fleet.client.request(method, path, content=b"{not json", headers=headers)


def test_rbac__every_route_refuses_no_token_a_revoked_one_and_a_lower_role(fleet):
    routes = requests(fleet)
    assert len(routes) >= 20  # this brief's own; others' routes add to it
    revoked = fleet.make_token("admin", "soon revoked")
    token_id = fleet.sql("SELECT token_id FROM api_tokens WHERE name = %s", ("soon revoked",))[0][0]
    assert fleet.post(f"/api/v1/api-tokens/{token_id}/revoke").status_code == 200
    for method, path, rule in routes:
        where = f"{method} {path} ({rule})"
        for headers in ({}, {"Authorization": f"Bearer {revoked}"},
                        {"Authorization": "Bearer tfa_not-a-token"},
                        {"Authorization": f"Basic {fleet.tokens['admin']}"}):  # fmt: skip
            answer = call(fleet, method, path, headers)
            assert answer.status_code == 401, (where, headers, answer.text)
            assert answer.json()["error"]["code"] == "unauthenticated", where
            assert answer.headers["www-authenticate"] == "Bearer"
        for role in ROLES:
            answer = call(fleet, method, path, fleet.auth(role))
            if rule.permission in GRANTS[role]:
                # past the rule: whatever the route makes of the input, never 401/403
                assert answer.status_code not in (401, 403), (where, role, answer.text)
                assert answer.status_code < 500, (where, role, answer.text)
            else:
                assert answer.status_code == 403, (where, role, answer.text)
                assert answer.json()["error"]["code"] == "forbidden", where


def test_rbac__the_rules_of_this_briefs_routes(fleet):
    rules = {
        (m, s.path): route_permission(s.original_route)
        for s in served_routes(fleet.client.app)
        for m in s.methods or ()
    }
    assert rules[("POST", "/api/v1/api-tokens")] == "admin"
    assert rules[("GET", "/api/v1/api-tokens")] == "admin"
    assert rules[("POST", "/api/v1/enroll-tokens")] == "operate"
    assert rules[("GET", "/api/v1/enroll-tokens")] == "operate"
    assert rules[("GET", "/api/v1/devices")] == "read"
    assert rules[("POST", "/api/v1/devices/{device_id}/revoke")] == "operate"
    assert rules[("GET", "/api/v1/devices/{device_id}/audit")] == "audit"
    assert rules[("GET", "/api/v1/quarantine")] == "audit"
    assert rules[("POST", "/api/v1/quarantine/{item_id}/replay")] == "operate"
    assert rules[("GET", "/api/v1/audit/verify")] == "audit"


def test_rbac__the_app_refuses_to_build_with_a_route_without_a_rule(fleet):
    service, ctx = fleet.client.app.state.fleet.sync, fleet.client.app.state.fleet
    loose = APIRouter()

    @loose.get("/api/v1/forgotten")
    def forgotten() -> dict[str, str]:
        return {"anyone": "may read this"}

    with pytest.raises(RouteRuleError, match=r"GET /api/v1/forgotten: no access rule"):
        create_app(service, fleet=ctx, fleet_routers=[*discover_routers(), loose])

    doubled = APIRouter()

    @doubled.get("/api/v1/doubled", dependencies=[Depends(allow("admin"))])
    def two(who: CanRead) -> dict[str, str]:
        return {}

    with pytest.raises(RouteRuleError, match=r"/api/v1/doubled: 2 access rules"):
        create_app(service, fleet=ctx, fleet_routers=[doubled])


def test_rbac__a_route_added_after_the_build_does_not_serve(fleet):
    app = fleet.client.app

    @app.get("/api/v1/late")
    def late() -> dict[str, str]:
        return {"leaked": "yes"}

    answer = fleet.get("/api/v1/late")
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["code"] == "no_rule"
    assert "leaked" not in answer.text
