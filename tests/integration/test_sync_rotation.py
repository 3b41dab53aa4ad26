"""Key rotation from the terminal against the real server (``tillflow cloud serve`` on
PostgreSQL): ``tillflow-edge rotate-key`` makes a new key, the cloud takes it in a
request signed by the old one, and from then on the old key is refused; a running sync
client picks the new key up by itself; a rotation whose answer was lost is finished by
the next sync (the cloud holds the new key, the terminal the pending one)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hwsim.faultproxy import FaultPlan, FaultProxy
from hwsim.syncrig import Cloud

from edge.engine import SystemClock
from edge.store.sqlite import SqliteStore
from edge.terminal.service.terminal import offline_acknowledgement
from sync.device.client import SyncClient
from sync.device.errors import EnrollError, SyncRefused
from sync.device.identity import enroll, load_identity, load_key, next_key_path, rotate_key

pytestmark = [pytest.mark.postgres]


class Hooks:
    """A terminal as the client sees it, over a bare store."""

    def __init__(self, store: SqliteStore) -> None:
        self.store, self.last_error = store, None

    def health(self) -> dict[str, Any]:
        return {"outbox_depth": self.store.outbox_stats().depth}

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        ack = offline_acknowledgement(self.store, outbox_through, audit_through)
        return self.store.acknowledge(ack).messages

    def refresh_documents(self) -> None:
        pass

    def active_policy_version(self) -> int | None:
        return None


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[tuple[Path, SqliteStore]]:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store = SqliteStore(data / "terminal.db")
    yield data, store
    store.close()


def _client(data: Path, store: SqliteStore, *, follow_rotation: bool) -> SyncClient:
    identity = load_identity(data)
    assert identity is not None
    return SyncClient(
        identity, load_key(data), store, Hooks(store), SystemClock(), binary_version="test",
        key_dir=data if follow_rotation else None,
    )  # fmt: skip


def test_rotate_key__the_old_key_is_refused_and_a_running_client_follows(
    cloud: Cloud, terminal: tuple[Path, SqliteStore], tmp_path: Path
) -> None:
    data, store = terminal
    enroll(cloud.url, cloud.enroll_token("store-rot"), data, "test")
    running = _client(data, store, follow_rotation=True)
    stale = _client(data, store, follow_rotation=False)
    try:
        assert running.sync_once().chain.state == "ok"
        old = load_key(data)
        cfg = tmp_path / "edge.yaml"
        cfg.write_text(f"device_id: T-ROT\ndata_dir: {data}\ncloud: {{url: '{cloud.url}'}}\n")
        out = subprocess.run(
            [sys.executable, "-m", "sync.device.main", "rotate-key", "--config", str(cfg),
             "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["device_id"] == load_identity(data).device_id  # type: ignore[union-attr]
        assert load_key(data).public_key() != old.public_key()
        assert not next_key_path(data).exists()
        with pytest.raises(SyncRefused) as refused:
            stale.sync_once()  # signed with the replaced key
        assert refused.value.server_code == "bad_signature"
        assert running.sync_once().chain.state == "ok"  # took the new key from disk
    finally:
        running.close()
        stale.close()


def test_rotate_key__a_lost_answer_is_finished_by_the_next_sync(
    cloud: Cloud, terminal: tuple[Path, SqliteStore]
) -> None:
    data, store = terminal
    enroll(cloud.url, cloud.enroll_token("store-rot"), data, "test")
    plan = FaultPlan(rates={}, seed=1, script=("cut_response",))
    with FaultProxy(upstream=("127.0.0.1", cloud.port), plan=plan) as proxy:
        with pytest.raises(EnrollError) as lost:
            rotate_key(data, url=proxy.url)
        assert lost.value.retryable
    assert next_key_path(data).exists()  # the cloud took it; the terminal did not hear
    client = _client(data, store, follow_rotation=True)
    try:
        assert client.sync_once().chain.state == "ok"
    finally:
        client.close()
    assert not next_key_path(data).exists()
