"""``GET /metrics`` on real PostgreSQL: the scrape parses as Prometheus text and every
gauge is what the database holds (devices seen per window, sync lag and outbox age
percentiles, commands and runs by status, alerts, broken chains); API latency is counted
per route template into the app's own registry."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import NewDatabase
from prometheus_client.parser import text_string_to_metric_families
from sync_memory import Terminal

from cloud.api.app import create_app
from cloud.api.fleet.context import FleetContext
from cloud.api.fleet.routes import alerts as alert_routes
from cloud.api.fleet.routes import metrics as metric_routes
from cloud.api.serve import migrate_fleet
from cloud.fleet import tokens
from cloud.settings import CloudSettings
from cloud.store.postgres import PostgresStore
from cloud.sync.keys import load_or_create_key
from cloud.sync.postgres import PostgresSyncBackend
from edge.engine import Engine, FakeClock, PollingExecutor, Worker
from sync.server import SyncService

# imported at collection, where its deprecation notice about httpx is not an error
testclient = pytest.importorskip("starlette.testclient")

WORKFLOW = Path(__file__).resolve().parents[2] / "cloud" / "workflows" / "audit_aggregation.yaml"


@dataclass
class Rig:
    url: str
    clock: FakeClock
    service: SyncService
    store: PostgresStore
    engine: Engine
    client: Any
    app: Any
    backend: PostgresSyncBackend
    fleet: FleetContext
    token: str

    def enroll(self) -> Terminal:
        term = Terminal(self.clock)
        status, body = term.enroll(self.service, self.service.create_enroll_token("s").token)
        assert status == 200, body
        term.device_id = body["device_id"]
        return term

    def sync(self, term: Terminal, **heartbeat: Any) -> None:
        request = term.request((), term.grow_audit(1))
        request["heartbeat"].update(heartbeat)
        status, body = self.service.sync(*term.signed(request))
        assert status == 200, body

    def scrape(self, token: str | None = None) -> dict[str, dict[tuple[Any, ...], float]]:
        """name -> {labels as sorted (key, value) pairs: value}."""
        answer = self.client.get(
            "/metrics", headers={"Authorization": f"Bearer {token or self.token}"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/plain")
        out: dict[str, dict[tuple[Any, ...], float]] = {}
        for family in text_string_to_metric_families(answer.text):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


def build(backend: PostgresSyncBackend, fleet: FleetContext) -> Any:
    """The app as serve builds it (create_app instruments it for /metrics)."""
    return create_app(
        fleet.sync, fleet=fleet, fleet_routers=[alert_routes.router, metric_routes.router]
    )


@pytest.fixture
def rig(new_database: NewDatabase, tmp_path: Path) -> Iterator[Rig]:
    url = new_database()
    clock = FakeClock(time.time())
    key_file = tmp_path / "control-plane.key"
    key, _ = load_or_create_key(key_file)
    settings = CloudSettings(database_url=url, signing_key_file=key_file, offline_after_s=1800)
    store = PostgresStore(url)
    backend = PostgresSyncBackend(url, pool_size=4)
    try:
        migrate_fleet(backend)
        service = SyncService(backend, clock, key)
        engine = Engine(store, PollingExecutor(), clock=clock, services={"settings": settings})
        engine.register(WORKFLOW)
        fleet = FleetContext(settings, backend.pool, service, clock, key)
        app = build(backend, fleet)
        with backend.pool.connection() as conn, conn.transaction():
            token, _ = tokens.create(conn, "prometheus", "read_only", at=1.0, by="test")
        with testclient.TestClient(app, raise_server_exceptions=False) as client:
            yield Rig(url, clock, service, store, engine, client, app, backend, fleet, token)
    finally:
        backend.close()
        store.close()


def percentile(values: list[float], q: float) -> float:
    """PostgreSQL's percentile_cont: linear between the two nearest ranks."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def test_metrics__every_gauge_matches_the_database(rig: Rig):
    old, mid, fresh, revoked = (rig.enroll() for _ in range(4))
    rig.sync(old, outbox_oldest_age_s=None)
    rig.sync(revoked)
    rig.clock.advance(60 * 60)  # one hour later
    rig.sync(mid, outbox_oldest_age_s=30.0)
    rig.clock.advance(8 * 60)
    rig.sync(fresh, outbox_oldest_age_s=90.0)
    rig.service.revoke_device(revoked.device_id)
    for _ in range(3):
        rig.service.queue_command(fresh.device_id, "request_health")
    rig.service.queue_command(mid.device_id, "request_health")
    rig.sync(fresh, outbox_oldest_age_s=90.0)  # takes its three: delivered
    rig.clock.advance(2 * 60)
    # an AuditAggregation run: one run COMPLETED, a raised device, a broken chain
    rig.sql("UPDATE device_audit SET detail = '{\"n\": 7}' WHERE device_id = %s", mid.device_id)
    run_id = rig.engine.start("AuditAggregation")
    worker = Worker(rig.engine)
    deadline = time.monotonic() + 30
    while not rig.store.get_run(run_id).status.terminal:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        worker.run_once()
    rig.engine.start("AuditAggregation")  # another, left RUNNING for a worker

    got = rig.scrape()
    now = rig.clock.now()
    assert got["tillflow_devices"] == {(("status", "active"),): 3.0, (("status", "revoked"),): 1.0}
    # fresh seen 2 min ago, mid 10 min ago; old (and revoked) 70 min ago
    assert got["tillflow_devices_seen"] == {
        (("window", "5m"),): 1.0, (("window", "15m"),): 2.0, (("window", "60m"),): 2.0,
    }  # fmt: skip
    seen = dict(rig.sql("SELECT device_id, last_seen_at FROM device_health"))
    lags = [now - seen[t.device_id] for t in (old, mid, fresh)]
    assert sorted(round(x) for x in lags) == [120, 600, 4200]
    for q in ("0.5", "0.95", "0.99"):
        key = (("quantile", q),)
        assert got["tillflow_sync_lag_seconds"][key] == pytest.approx(percentile(lags, float(q)))
        expected_age = percentile([0.0, 30.0, 90.0], float(q))
        assert got["tillflow_outbox_oldest_age_seconds"][key] == pytest.approx(expected_age)
    commands = dict(rig.sql("SELECT status, count(*) FROM commands GROUP BY status"))
    assert commands == {"delivered": 3, "queued": 1}
    assert got["tillflow_commands"] == {
        (("status", s),): float(commands.get(s, 0))
        for s in ("queued", "delivered", "applied", "refused", "expired")
    }
    runs = dict(rig.sql("SELECT status, count(*) FROM workflow_runs GROUP BY status"))
    assert runs == {"COMPLETED": 1, "RUNNING": 1}
    assert {k[0][1]: v for k, v in got["tillflow_workflow_runs"].items() if v} == {
        s: float(n) for s, n in runs.items()
    }
    assert got["tillflow_workflow_runs"][(("status", "FAILED"),)] == 0.0
    assert got["tillflow_device_alerts_raised"] == {(): 1.0}  # old: silent past 30 min
    assert got["tillflow_audit_chains_broken"] == {(): 1.0}  # mid's edited row


def test_metrics__api_latency_by_route_template_in_each_apps_own_registry(rig: Rig):
    for _ in range(3):
        assert rig.client.get("/api/v1/alerts", headers={"Authorization": f"Bearer {rig.token}"}
                              ).status_code == 200  # fmt: skip
    assert rig.client.get("/api/v1/alerts").status_code == 401
    assert rig.client.get("/api/v1/nowhere/at/all").status_code == 404
    got = rig.scrape()
    counts = got["tillflow_api_request_duration_seconds_count"]

    def count(route: str, status: str) -> float:
        return counts.get((("method", "GET"), ("route", route), ("status", status)), 0.0)

    assert (count("/api/v1/alerts", "200"), count("/api/v1/alerts", "401")) == (3.0, 1.0)
    assert count("<unmatched>", "404") == 1.0
    assert not any("nowhere" in str(labels) for labels in counts)
    buckets = got["tillflow_api_request_duration_seconds_bucket"]
    inf = (("le", "+Inf"), ("method", "GET"), ("route", "/api/v1/alerts"), ("status", "200"))
    assert buckets[inf] == 3.0
    # a second app in the same process counts its own requests only
    other = build(rig.backend, rig.fleet)
    with testclient.TestClient(other, raise_server_exceptions=False) as client:
        answer = client.get("/metrics", headers={"Authorization": f"Bearer {rig.token}"})
    theirs = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(answer.text)
        for s in f.samples
    }
    assert not any(name == "tillflow_api_request_duration_seconds_count"
                   and dict(labels).get("route") == "/api/v1/alerts"
                   for name, labels in theirs)  # fmt: skip
    assert (
        rig.scrape()["tillflow_api_request_duration_seconds_count"][
            (("method", "GET"), ("route", "/metrics"), ("status", "200"))
        ]
        >= 1.0
    )


def test_metrics__needs_a_token_and_answers_on_an_empty_database(rig: Rig):
    assert rig.client.get("/metrics").status_code == 401
    got = rig.scrape()
    assert got["tillflow_devices_seen"] == {(("window", w),): 0.0 for w in ("5m", "15m", "60m")}
    assert "tillflow_sync_lag_seconds" not in got  # no device has synced: no quantiles
    assert all(v == 0.0 for v in got["tillflow_commands"].values())
