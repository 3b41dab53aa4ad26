"""The dashboard over plain HTTP, on the app ``tillflow cloud serve`` builds
(``build_app(..., dashboard=True)``) on a real PostgreSQL database: deny by default
(no cookie: a redirect to the login page; a revoked token: the same), a login sets an
HttpOnly, SameSite=Strict cookie, a POST needs the session's CSRF token and a same-site
origin, a read-only role sees no control and its POST is refused (and nothing is
recorded), bad input is a 4xx page and an unknown id a 404, never a 5xx; every dashboard
route states exactly one rule."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fleet_app import Fleet

from cloud.api.fleet.auth import Public, rule_of, served_routes
from cloud.api.serve import build_app, migrate_fleet
from cloud.dashboard.session import COOKIE, SessionRule
from cloud.fleet import tokens
from cloud.rollouts import service
from cloud.rollouts.service import RolloutRequest
from cloud.settings import CloudSettings
from cloud.store.postgres import PostgresStore
from cloud.sync.postgres import PostgresSyncBackend
from sync import signing

pytestmark = pytest.mark.postgres
starlette_testclient = pytest.importorskip("starlette.testclient")

PAGES = ("/ui/fleet", "/ui/rollouts", "/ui/audit")


@contextlib.contextmanager
def dashboard_app(url: str) -> Iterator[Fleet]:
    backend = PostgresSyncBackend(url, pool_size=4, pool_timeout_s=5.0)
    try:
        migrate_fleet(backend)
        PostgresStore(url, pool_size=1).close()  # the engine's tables, as serve makes them
        app = build_app(CloudSettings(database_url=url), backend, signing.new_key(), dashboard=True)
        client = starlette_testclient.TestClient(
            app, raise_server_exceptions=False, follow_redirects=False
        )
        with client:
            fleet = Fleet(client, backend, url)
            for role in tokens.ROLES:
                fleet.tokens[role] = fleet.make_token(role)
            yield fleet
    finally:
        backend.close()


@pytest.fixture
def fleet(new_database) -> Iterator[Fleet]:
    with dashboard_app(new_database()) as f:
        yield f


def login(fleet: Fleet, role: str) -> str:
    """Log in as ``role``; returns the CSRF token of the session (from a page's form)."""
    fleet.client.cookies.clear()
    answer = fleet.client.post("/ui/login", data={"token": fleet.tokens[role], "next": "/ui/fleet"})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/fleet"
    page = fleet.client.get("/ui/fleet")
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert found, "the page's logout form carries the CSRF token"
    return found.group(1)


def a_rollout(fleet: Fleet, n: int = 3) -> str:
    for _ in range(n):
        fleet.sync(fleet.enroll("store-1", "north"), storage_state="ok")
    request = RolloutRequest.model_validate(
        {"content": {"risk": {"floor_limit_minor": 3000}}, "target": {"all": True}}
    )
    who = tokens.Principal(token_id="t", name="setup", role="operator")
    with fleet.backend.pool.connection() as conn, conn.transaction():
        return service.create(conn, "config", request, who, at=1.0)


def test_dashboard__every_route_states_one_rule_and_only_login_and_assets_are_public(fleet):
    found = {}
    for served in served_routes(fleet.client.app):
        if served.path.startswith("/ui"):
            rule = rule_of(served.original_route)
            assert rule is not None, served.path
            found[served.path] = rule
    public = {p for p, r in found.items() if isinstance(r, Public)}
    assert public == {"/ui", "/ui/", "/ui/static/{name}", "/ui/login"}
    for path, rule in found.items():
        if path not in public or path == "/ui/login":
            assert path == "/ui/login" or isinstance(rule, SessionRule), path
    controls = {
        p: r.permission
        for p, r in found.items()
        if p.startswith("/ui/rollouts/{") and p.count("/") == 4 and not p.endswith("/live")
        and isinstance(r, SessionRule)
    }  # fmt: skip
    assert set(controls.values()) == {"operate"}, controls
    assert len(controls) == 5


def test_dashboard__no_cookie_redirects_to_login_and_a_revoked_token_too(fleet):
    for path in (*PAGES, "/ui/devices/d1", "/ui/rollouts/ro_x", "/ui/rollouts/ro_x/live"):
        answer = fleet.client.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/ui/login?next=")
    # a bearer token is not a session: the dashboard reads its cookie only
    assert fleet.client.get("/ui/fleet", headers=fleet.auth("admin")).status_code == 303
    token = fleet.make_token("admin", "leaving")
    fleet.client.cookies.clear()
    assert fleet.client.post("/ui/login", data={"token": token}).status_code == 303
    assert fleet.client.get("/ui/fleet").status_code == 200
    fleet.sql("UPDATE api_tokens SET revoked_at = 2, revoked_by = 'x' WHERE name = 'leaving'")
    answer = fleet.client.get("/ui/fleet")
    assert answer.status_code == 303 and "why=" in answer.headers["location"]


def test_dashboard__login_sets_an_httponly_samesite_strict_cookie_and_refuses_a_bad_token(fleet):
    bad = fleet.client.post("/ui/login", data={"token": "tfa_not-a-token"})
    assert bad.status_code == 401 and "unknown or revoked" in bad.text
    assert COOKIE not in bad.cookies
    good = fleet.client.post("/ui/login", data={"token": fleet.tokens["read_only"],
                                                "next": "https://evil.example/"})  # fmt: skip
    assert good.status_code == 303 and good.headers["location"] == "/ui/fleet"
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    cross = fleet.client.post("/ui/login", data={"token": fleet.tokens["admin"]},
                              headers={"origin": "https://evil.example"})  # fmt: skip
    assert cross.status_code == 403


def test_dashboard__pages_render_for_each_role_audit_only_where_the_role_holds_it(fleet):
    term = fleet.enroll("store-9", "east")
    fleet.sync(term, storage_state="ok")
    for role in tokens.ROLES:
        login(fleet, role)
        for path in ("/ui/fleet", "/ui/rollouts", f"/ui/devices/{term.device_id}"):
            answer = fleet.client.get(path)
            assert answer.status_code == 200, (role, path, answer.text[:300])
            assert "content-security-policy" in answer.headers
        audit = fleet.client.get("/ui/audit")
        assert audit.status_code == (200 if role != "read_only" else 403), role
    assert term.device_id in fleet.client.get("/ui/fleet").text


def test_dashboard__a_read_only_user_sees_no_control_and_its_post_is_refused(fleet):
    rollout_id = a_rollout(fleet)
    csrf = login(fleet, "read_only")
    page = fleet.client.get(f"/ui/rollouts/{rollout_id}")
    assert page.status_code == 200
    assert 'data-action="pause"' not in page.text and "control-form" not in page.text
    answer = fleet.client.post(f"/ui/rollouts/{rollout_id}/pause", data={"csrf": csrf})
    assert answer.status_code == 403 and "may not do this" in answer.text
    assert fleet.sql("SELECT count(*) FROM rollout_controls")[0][0] == 0
    # and the API refuses the same token the same way
    api = fleet.post(f"/api/v1/rollouts/{rollout_id}/pause", "read_only")
    assert api.status_code == 403


def test_dashboard__an_operator_pauses_with_the_csrf_token_recorded_in_the_audit_log(fleet):
    rollout_id = a_rollout(fleet)
    csrf = login(fleet, "operator")
    page = fleet.client.get(f"/ui/rollouts/{rollout_id}")
    assert 'data-action="pause"' in page.text and 'data-action="abort"' in page.text
    assert 'data-action="resume"' not in page.text  # a pending rollout is not paused
    for form, headers in (({}, {}), ({"csrf": "0" * 64}, {}),
                          ({"csrf": csrf}, {"origin": "https://evil.example"}),
                          ({"csrf": csrf}, {"sec-fetch-site": "cross-site"})):  # fmt: skip
        refused = fleet.client.post(f"/ui/rollouts/{rollout_id}/pause", data=form, headers=headers)
        assert refused.status_code == 403, (form, headers)
    assert fleet.sql("SELECT count(*) FROM rollout_controls")[0][0] == 0
    done = fleet.client.post(f"/ui/rollouts/{rollout_id}/pause", data={"csrf": csrf})
    assert done.status_code == 303, done.text
    assert fleet.sql("SELECT action, requested_by FROM rollout_controls") == [
        ("pause", "operator-test")
    ]
    rows = fleet.sql("SELECT action, actor, actor_role, target FROM cloud_audit ORDER BY seq")
    assert rows[-1] == ("rollout.pause", "operator-test", "operator", f"rollout:{rollout_id}")
    again = fleet.client.post(f"/ui/rollouts/{rollout_id}/pause", data={"csrf": csrf})
    assert again.status_code == 409 and "paused" in again.text  # the service's refusal
    page = fleet.client.get(f"/ui/rollouts/{rollout_id}")
    assert 'data-action="resume"' in page.text and 'data-action="pause"' not in page.text
    # the header works for the fetch a script would make
    resumed = fleet.client.post(f"/ui/rollouts/{rollout_id}/resume", headers={"x-csrf-token": csrf})
    assert resumed.status_code == 303


BAD_INPUT: list[tuple[str, int]] = [
    ("/ui/fleet?health=bogus", 400),
    ("/ui/fleet?config_version=abc", 400),
    ("/ui/fleet?config_version=-1", 400),
    ("/ui/fleet?store=" + "x" * 500, 400),
    ("/ui/fleet?store=%00", 400),
    ("/ui/fleet?after=%ED%A0%80", 200),  # not UTF-8: read as U+FFFD, a cursor like any
    ("/ui/rollouts?kind=nope", 400),
    ("/ui/rollouts?status=%00", 400),
    ("/ui/rollouts/ro_missing", 404),
    ("/ui/rollouts/ro_missing/live", 404),
    ("/ui/rollouts/%00", 404),
    ("/ui/devices/nope", 404),
    ("/ui/devices/%00", 404),
    ("/ui/audit?device=nope", 404),
    ("/ui/audit?before=x", 400),
    ("/ui/audit?verify=all", 400),
    ("/ui/static/../../etc/passwd", 404),
    ("/ui/static/nope.js", 404),
]


def test_dashboard__bad_input_is_a_clear_4xx_never_a_5xx(fleet):
    login(fleet, "admin")
    for path, status in BAD_INPUT:
        answer = fleet.client.get(path)
        assert answer.status_code == status, (path, answer.text[:400])


def test_dashboard__bad_posts_are_4xx(fleet):
    csrf = login(fleet, "admin")
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/ui/rollouts/ro_missing/pause", {"data": {"csrf": csrf}}),
        ("/ui/rollouts/ro_missing/nope", {"data": {"csrf": csrf}}),
        ("/ui/rollouts/x/abort", {"content": b"\xff\xfe", "headers": {"x-csrf-token": csrf}}),
        ("/ui/rollouts/x/abort", {"content": b"a=" + b"x" * 10_000}),
        ("/ui/login", {"content": b"token=%00"}),
    ]
    for path, kw in cases:
        answer = fleet.client.post(path, **kw)
        assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text[:300])


def test_dashboard__the_fleet_page_filters_and_pages_in_sql(fleet):
    made = [fleet.enroll("store-a" if i % 2 else "store-b", "g1") for i in range(6)]
    for t in made:
        fleet.sync(t, storage_state="ok")
    fleet.sync(made[0], storage_state="full")
    login(fleet, "read_only")
    page = fleet.client.get("/ui/fleet?store=store-a").text
    ids_a = {t.device_id for i, t in enumerate(made) if i % 2}
    shown = set(re.findall(r'href="/ui/devices/([^"]+)"', page))
    assert ids_a <= shown and not ({t.device_id for t in made} - ids_a) & shown
    full = fleet.client.get("/ui/fleet?health=full").text
    assert made[0].device_id in full and made[1].device_id not in full
    assert 'data-health="full">1<' in fleet.client.get("/ui/fleet").text


def test_dashboard__broken_chains_then_stalled_outboxes_lead_the_fleet_and_the_device_says_why(
    fleet,
):
    calm, stalled, broken = (fleet.enroll("store-1", "g") for _ in range(3))
    fleet.sync(calm, storage_state="ok", outbox_depth=0, outbox_oldest_age_s=None)
    fleet.sync(stalled, storage_state="ok", outbox_depth=12, outbox_oldest_age_s=3600.0,
               last_error="upload: connection refused")  # fmt: skip
    fleet.sync(broken, storage_state="ok")
    fleet.sql(
        "INSERT INTO audit_chains (device_id, stream, chain, base_seq, base_hash, head_seq, "
        "head_hash, state, first_bad_seq, reason, broken_at, updated_at) VALUES "
        "(%s, %s, 0, 0, %s, 7, %s, 'broken', 4, 'prev_hash mismatch', 1, 1)",
        (broken.device_id, "a" * 32, "0" * 64, "1" * 64),
    )
    fleet.sql(
        "INSERT INTO commands (command_id, device_id, seq, action, envelope, status, reason, "
        "created_at, expires_at, result_at) VALUES ('c1', %s, 1, 'update_config', '{}', "
        "'refused', 'hardware_unsupported: no room', 1, 2, 1.5)",
        (stalled.device_id,),
    )
    login(fleet, "auditor")
    page = fleet.client.get("/ui/fleet").text
    attention = page[page.index('id="attention"') : page.index('id="compliance"')]
    listed = re.findall(r'href="/ui/devices/([^"]+)"', attention)
    assert listed == [broken.device_id, stalled.device_id]  # broken first; calm not at all
    assert "chain broken at seq 4" in attention and "outbox stalled 60 min" in attention
    device = fleet.client.get(f"/ui/devices/{stalled.device_id}").text
    assert "hardware_unsupported: no room" in device and "upload: connection refused" in device
    assert "Quarantined entries" in device and "None." in device  # an auditor sees it
    login(fleet, "read_only")
    device = fleet.client.get(f"/ui/devices/{stalled.device_id}").text
    assert "Quarantine is shown to roles with audit" in device


def test_dashboard__the_live_fragment_is_the_moving_part_only(fleet):
    rollout_id = a_rollout(fleet)
    login(fleet, "operator")
    live = fleet.client.get(f"/ui/rollouts/{rollout_id}/live")
    assert live.status_code == 200
    assert "<html" not in live.text and 'class="live-root"' in live.text
    assert 'data-finished="0"' in live.text and "<svg" in live.text
    assert 'data-action="pause"' in live.text
