"""The Fleet API's auth without a database: the roles and what they hold, the token's
form, the bearer header, the build check that refuses a route without one rule, the
cloud audit row's hashed event, and errors in the one shape."""

from __future__ import annotations

import argparse
import re

import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.requests import Request

from cloud import fleet_cli
from cloud.api.fleet import errors
from cloud.api.fleet.auth import (
    CanOperate,
    RouteRuleError,
    allow,
    bearer_token,
    check_rules,
    device_signed,
    public,
    route_permission,
    served_routes,
)
from cloud.fleet import audit, tokens
from cloud.fleet.devices import parse_audit_cursor
from edge.engine.audit import GENESIS, link
from sync.server import BackendUnavailable, ServiceError


def test_roles__each_holds_the_permissions_of_the_roles_below_it():
    table = {r: sorted(tokens.GRANTS[r]) for r in tokens.ROLES}
    assert table == {
        "admin": ["admin", "audit", "operate", "read"],
        "operator": ["audit", "operate", "read"],
        "auditor": ["audit", "read"],
        "read_only": ["read"],
    }
    assert not tokens.grants("root", "read")  # an unknown role holds nothing
    assert fleet_cli.ROLES == tokens.ROLES


def test_tokens__random_prefixed_hashed_and_named_by_a_prefix_of_the_hash():
    a, b = tokens.new_token(), tokens.new_token()
    assert a != b and re.fullmatch(r"tfa_[A-Za-z0-9_-]{43}", a)
    hashed = tokens.token_hash(a)
    assert re.fullmatch(r"[0-9a-f]{64}", hashed) and a not in hashed
    assert tokens.token_id(hashed) == "tok_" + hashed[:16]
    assert tokens.plausible(a)
    assert not tokens.plausible("tok_" + hashed[:16])  # an id is not a token
    assert not tokens.plausible("tfa_" + "x" * 500) and not tokens.plausible("tfa_é")
    assert tokens.name_problem("ci bot") is None
    assert tokens.name_problem("  ") and tokens.name_problem("a\nb")
    assert tokens.name_problem("x" * 201)


def request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw})


def test_bearer__only_the_bearer_scheme_with_a_token():
    assert bearer_token(request({"Authorization": "Bearer tfa_x"})) == "tfa_x"
    assert bearer_token(request({"Authorization": "bearer   tfa_x  "})) == "tfa_x"
    assert bearer_token(request({"Authorization": "Basic dXNlcjpwYXNz"})) is None
    assert bearer_token(request({"Authorization": "Bearer"})) is None
    assert bearer_token(request({})) is None


def test_rules__the_build_check_refuses_none_and_two_and_names_them():
    app = FastAPI(openapi_url=None)
    r = APIRouter()

    @r.get("/ok")
    def fine(who: CanOperate) -> None: ...

    @r.get("/open", dependencies=[Depends(public())])
    def open_() -> None: ...

    @r.post("/device", dependencies=[Depends(device_signed())])
    def device() -> None: ...

    app.include_router(r)
    check_rules(app)  # one rule each: fine
    assert {s.path: route_permission(s.original_route) for s in served_routes(app)} == {
        "/ok": "operate", "/open": "public", "/device": "device_signed",
    }  # fmt: skip

    @app.get("/forgotten")
    def forgotten() -> None: ...

    @app.get("/twice", dependencies=[Depends(allow("read"))])
    def twice(who: CanOperate) -> None: ...

    with pytest.raises(RouteRuleError) as err:
        check_rules(app)
    assert "GET /forgotten: no access rule" in str(err.value)
    assert "GET /twice: 2 access rules" in str(err.value)
    with pytest.raises(ValueError, match="unknown permission"):
        allow("root")  # type: ignore[arg-type]


def test_cloud_audit__a_row_hashes_as_the_terminals_link_of_its_event():
    ev = audit.event("ops", "tok_1", "operator", "device.tag", "d1", {"tag": "eu"}, 1.5)
    assert (ev.run_id, ev.event, ev.step, ev.at) == (None, "device.tag", "d1", 1.5)
    assert ev.detail == {"actor": "ops", "actor_token": "tok_1", "actor_role": "operator",
                         "detail": {"tag": "eu"}}  # fmt: skip
    row = audit.CloudAuditRow(1, 1.5, "ops", "tok_1", "operator", "device.tag", "d1",
                              {"tag": "eu"}, GENESIS, link(GENESIS, 1, ev), 2)  # fmt: skip
    assert row.hash == link(GENESIS, 1, row.event())
    other = audit.event("ops", "tok_2", "operator", "device.tag", "d1", {"tag": "eu"}, 1.5)
    assert link(GENESIS, 1, other) != row.hash  # who did it is hashed too
    # what jsonb would give back otherwise: huge floats as text, tuples as lists
    assert audit.storable({"a": 1e20, "b": (1, 2.5), "c": float("nan")}) == {
        "a": "1e+20", "b": [1, 2.5], "c": "nan",
    }  # fmt: skip


def test_errors__service_refusals_map_to_statuses_in_the_one_shape():
    e = errors.from_service(ServiceError("unknown_device", "no device d1"))
    body = {"error": {"code": "device_not_found", "message": "no device d1", "field": None}}
    assert (e.status, e.body()) == (404, body)
    assert errors.from_service(ServiceError("stale_version", "old")).status == 409
    assert errors.from_service(ServiceError("bad_argument", "no")).status == 422
    down = errors.from_unavailable(BackendUnavailable("db down", retry_after_s=2))
    assert (down.status, down.code, down.headers) == (503, "unavailable", {"Retry-After": "2"})


def test_audit_cursor__only_a_pages_own():
    assert parse_audit_cursor(None) == ("", -1, 0)
    assert parse_audit_cursor("ab:0:12") == ("ab", 0, 12)
    for bad in ("x", "a:b:c", "a:1", "a:1:-2", "a:1:" + "9" * 30):
        assert parse_audit_cursor(bad) is None, bad


def test_cli__serve_takes_config_and_leaves_unset_flags_to_the_settings():
    from edge.cli import _parser

    args = _parser().parse_args(["cloud", "serve", "--config", "c.yaml", "--port", "0"])
    assert (args.config, args.port, args.host, args.workers) == ("c.yaml", 0, None, None)
    handlers = fleet_cli.add_parsers(
        argparse.ArgumentParser().add_subparsers(),
        common=argparse.ArgumentParser(add_help=False),
        db=argparse.ArgumentParser(add_help=False),
        key=argparse.ArgumentParser(add_help=False),
    )
    assert set(handlers) == {"api-token"}
