"""The Fleet API in process on a real PostgreSQL database, for the integration tests:
the app ``tillflow cloud serve`` builds (``cloud.api.serve.build_app``), tokens of each
role made straight on the database, and terminals enrolled and synced through the sync
routes of the same app."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sync_memory import Terminal

from cloud.api.serve import build_app, migrate_fleet
from cloud.fleet import tokens
from cloud.settings import CloudSettings
from cloud.sync.postgres import PostgresSyncBackend
from edge.engine.clock import SystemClock
from sync import signing


@dataclass
class Fleet:
    """A client on the app, the backend under it, and one token per role."""

    client: Any
    backend: PostgresSyncBackend
    url: str
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def get(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.get(path, headers=self.auth(role) | kw.pop("headers", {}), **kw)

    def post(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.post(path, headers=self.auth(role) | kw.pop("headers", {}), **kw)

    def put(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.put(path, headers=self.auth(role) | kw.pop("headers", {}), **kw)

    def delete(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.delete(path, headers=self.auth(role) | kw.pop("headers", {}), **kw)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.backend.pool.connection() as conn:
            cur = conn.execute(query.encode() if params is None else query, params)
            return cur.fetchall() if cur.description else []

    def make_token(self, role: str, name: str | None = None) -> str:
        with self.backend.pool.connection() as conn, conn.transaction():
            token, _ = tokens.create(conn, name or f"{role}-test", role, at=1.0, by="test")
        return token

    def enroll(self, store: str, group: str | None = None) -> Terminal:
        """A terminal enrolled through the API's token and the sync route."""
        body: dict[str, Any] = {"store": store}
        if group:
            body["group"] = group
        made = self.post("/api/v1/enroll-tokens", "operator", json=body)
        assert made.status_code == 201, made.text
        term = Terminal(SystemClock())
        answer = self.client.post("/v1/enroll", **term.enroll_request(made.json()["token"]))
        assert answer.status_code == 200, answer.text
        term.device_id = answer.json()["device_id"]
        return term

    def sync(self, term: Terminal, outbox: Any = (), audit: Any = (), **heartbeat: Any) -> Any:
        request = term.request(outbox, audit)
        request["heartbeat"].update(heartbeat)
        _, path, headers, body = term.signed(request)
        return self.client.post(path, content=body, headers=headers)


@contextlib.contextmanager
def fleet_app(url: str) -> Iterator[Fleet]:
    """The app on the (empty) database ``url``, migrated as serve migrates it."""
    import starlette.testclient

    backend = PostgresSyncBackend(url, pool_size=4, pool_timeout_s=5.0)
    try:
        migrate_fleet(backend)
        app = build_app(CloudSettings(database_url=url), backend, signing.new_key())
        with starlette.testclient.TestClient(app, raise_server_exceptions=False) as client:
            fleet = Fleet(client, backend, url)
            for role in tokens.ROLES:
                fleet.tokens[role] = fleet.make_token(role)
            yield fleet
    finally:
        backend.close()
