"""Unknown outcomes resolved by the cloud at the acquirer, end to end: a real ``Terminal``
(virtual clock, simulated card reader, printer and link, the real HTTP acquirer driver)
whose acquirer answer is lost, its ``SyncClient`` against the real server (``tillflow
cloud serve`` on PostgreSQL), and the cloud's ``resolve_outcome`` workflow on the same
engine (``Engine(PostgresStore)`` + ``Worker``), asking hwsim's acquirer by key.

Refund: the acquirer refunds, its reply is lost, the refund ends ``unknown``. Synced,
found, looked up (after the acquirer was away for a while: the engine's retries wait),
the truth recorded, the command sent; the terminal takes it and the refund gets its
final message (approved), which reaches the cloud. Found again: nothing new starts.

Payment: the acquirer approves, the reply is lost and the link stays down; the sale's
outcome is unknown and its reversal pending. The cloud learns it was approved; the
terminal keeps that truth beside the pending reversal, which goes through once the link
is back: the sale ends declined, reversed, and the acquirer's net is zero.

The Fleet API lists both, resolved, with the command applied.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest
from hwsim.acquirer import Mode, SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter
from hwsim.syncrig import Cloud

from cloud.outcomes import SCHEMA, migrate, steps
from cloud.outcomes.acquirer import HttpAcquirerLookup
from cloud.outcomes.find import find_unknown, resolve_key, start_resolutions
from cloud.outcomes.steps import OutcomeServices
from cloud.store.postgres import PostgresStore
from cloud.sync.keys import load_key as load_signing_key
from edge.engine import Engine, FakeClock, Status
from edge.engine.executor import PollingExecutor
from edge.engine.worker import Worker
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.terminal import Terminal
from sync.device.client import SyncClient
from sync.device.identity import enroll, load_key

pytestmark = [pytest.mark.postgres]

WORKFLOW = Path(__file__).resolve().parents[2] / "cloud" / "workflows" / "resolve_outcome.yaml"
#: Bounded waits for a real condition (seconds).
DEADLINE_S = 30.0


class LosingAcquirer(SimAcquirer):
    """Decides and records every request, and loses the reply of the operations in
    ``losing`` (each attempt's: a retry replays the first answer, lost again). With
    ``cut_link``, losing a reply also takes the terminal's link down (it stays down)."""

    def __init__(self) -> None:
        super().__init__()
        self.losing: set[str] = set()
        self.cut_link: SimNetworkLink | None = None

    def _apply(self, operation: Any, key: str, body: bytes, mode: Mode) -> Any:
        response = super()._apply(operation, key, body, mode)
        if operation in self.losing:
            self.lose_reply(key)
            if self.cut_link is not None:
                self.cut_link.down()
        return response


class Rig:
    """One terminal enrolled with the cloud, and the cloud's engine for the workflow."""

    def __init__(self, cloud: Cloud, tmp_path: Path, acquirer: LosingAcquirer) -> None:
        self.cloud = cloud
        self.acquirer = acquirer
        self.clock = FakeClock(time.time())
        self.reader, self.link = SimCardReader(), SimNetworkLink(self.clock)
        cfg = EdgeConfig(
            device_id="T-OUT",
            data_dir=tmp_path / "data",
            socket_path=tmp_path / "t.sock",
            risk=RiskLimits(online_random_percent=100, velocity_max=1_000),
        )
        self.http = HttpAcquirer(acquirer.url, link=self.link, timeout_s=5)
        peripherals = Peripherals(self.reader, SimPrinter(), self.http, self.link)
        self.terminal = Terminal(cfg, peripherals, clock=self.clock)
        self.identity = enroll(cloud.url, cloud.enroll_token("store-out"), cfg.data_dir, "test")
        self.client = SyncClient(
            self.identity, load_key(cfg.data_dir), self.terminal.store, self.terminal,
            self.clock, binary_version="test",
        )  # fmt: skip
        self.lookup = HttpAcquirerLookup(acquirer.url, timeout_s=5)
        services = OutcomeServices(
            connect=self.connect,
            acquirer=self.lookup,
            signing_key=load_signing_key(cloud.signing_key),
        )
        self.store = PostgresStore(cloud.database_url, pool_size=2)
        self.engine = Engine(self.store, PollingExecutor(), services=services)
        self.engine.register(WORKFLOW)
        self.worker = Worker(self.engine, poll_s=0.05)

    def connect(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        return psycopg.connect(self.cloud.database_url)

    def close(self) -> None:
        self.client.close()
        self.terminal.close()
        self.engine.close()
        self.store.close()
        self.lookup.close()
        self.http.close()

    # --- the terminal -----------------------------------------------------------------

    def drive(self, run_id: str, until: Callable[[Any], bool]) -> Any:
        """Advance the terminal's run through its backoffs (virtual time) until ``until``
        holds of the run."""
        for _ in range(40):
            run = self.terminal.engine.get(run_id)
            if until(run):
                return run
            self.clock.advance(6.0)
            self.terminal.engine.advance(run_id)
        raise AssertionError(f"run {run_id} never got there: {self.terminal.engine.get(run_id)}")

    def sync(self) -> None:
        """Sync until the outbox is empty and the commands queued are taken."""
        for _ in range(5):
            outcome = self.client.sync_once()
            if not self.terminal.store.outbox_stats().depth and not outcome.commands:
                return

    def messages(self, topic: str) -> list[dict[str, Any]]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT payload FROM sync_messages WHERE device_id = %s AND topic = %s "
                "ORDER BY seq",
                (self.identity.device_id, topic),
            ).fetchall()
        return [r[0] for r in rows]

    # --- the cloud ----------------------------------------------------------------------

    def resolve_all(self) -> list[str]:
        """One finder pass, then workers until every resolve run it started finished."""
        return self.finish(start_resolutions(self.engine, self.connect))

    def finish(self, runs: list[str]) -> list[str]:
        """Workers until every run of ``runs`` finished."""
        deadline = time.monotonic() + DEADLINE_S
        while any(not self.engine.get(r).status.terminal for r in runs):
            assert time.monotonic() < deadline, [self.engine.get(r) for r in runs]
            if not self.worker.run_once():
                time.sleep(0.05)  # a poll interval: the backoff's due time is real time
        return runs

    def outcome_row(self, key: str) -> dict[str, Any]:
        with self.connect() as conn:
            cur = conn.execute(
                "SELECT o.*, c.status AS command_status FROM unknown_outcomes o "
                "LEFT JOIN commands c USING (command_id) WHERE op_key = %s",
                (key,),
            )
            names = [d.name for d in cur.description or []]
            row = cur.fetchone()
        assert row is not None, f"no outcome for {key}"
        return dict(zip(names, row, strict=True))


@pytest.fixture
def acquirer() -> Iterator[LosingAcquirer]:
    with LosingAcquirer() as acq:
        yield acq


@pytest.fixture
def rig(cloud: Cloud, tmp_path: Path, acquirer: LosingAcquirer) -> Iterator[Rig]:
    r = Rig(cloud, tmp_path, acquirer)
    try:
        yield r
    finally:
        r.close()


def test_a_lost_refund_answer_is_resolved_at_the_acquirer_and_told_to_the_terminal(
    rig: Rig, acquirer: LosingAcquirer
) -> None:
    acquirer.losing = {"refund"}
    rig.reader.insert(make_card("visa"))
    run_id = rig.terminal.engine.start("refund", {"amount_minor": 1250, "currency": "EUR"})
    refund = rig.terminal.engine.get(run_id)
    assert (refund.status, refund.state["decision"]) == (Status.COMPLETED, "unknown")
    key = refund.state["refund_key"]
    assert [e.key for e in acquirer.effects("refund")] == [key]  # it did refund
    rig.sync()
    assert [m["decision"] for m in rig.messages("refund")] == ["unknown"]

    # The acquirer is away when the cloud first asks: the run waits through its backoff.
    acquirer.set_mode("drop")
    (resolve_id,) = start_resolutions(rig.engine, rig.connect)
    assert (rig.outcome_row(key)["state"], rig.outcome_row(key)["resolve_run_id"]) == (
        "open",
        resolve_id,
    )
    deadline = time.monotonic() + DEADLINE_S
    while not any(s.status == "RETRYING" for s in rig.engine.store.step_history(resolve_id)):
        assert time.monotonic() < deadline
        rig.worker.run_once()
    acquirer.set_mode("approve")
    rig.finish([resolve_id])
    assert rig.engine.get(resolve_id).status is Status.COMPLETED

    row = rig.outcome_row(key)
    assert (row["state"], row["status"], row["operation"]) == ("resolved", "approved", "refund")
    assert (row["run_id"], row["device_id"]) == (run_id, rig.identity.device_id)
    assert row["command_status"] == "queued"
    # Found again (another sweep): the same run, nothing new.
    assert start_resolutions(rig.engine, rig.connect) == []
    with rig.connect() as conn:
        assert find_unknown(conn, now=time.time()) == []
    again = rig.engine.start("resolve_outcome", {}, idempotency_key=resolve_key(
        rig.identity.device_id, key))  # fmt: skip
    assert again == resolve_id

    rig.sync()  # the command comes down, is applied, and the final message goes up
    assert rig.outcome_row(key)["command_status"] == "applied"
    finals = rig.messages("refund")
    assert [m["decision"] for m in finals] == ["unknown", "approved"]
    assert finals[1]["resolved"] is True and finals[1]["refund_key"] == key
    assert finals[1]["run_id"] == run_id
    resolved = [r for r in rig.terminal.store.audit_rows(run_id) if r.event == "outcome_resolved"]
    assert [(r.detail["status"], r.detail["settled"]) for r in resolved] == [
        ("approved", "final_message")
    ]
    assert acquirer.lookups >= 1


def test_a_lost_authorisation_answer_is_resolved_and_the_pending_reversal_settles_it(
    rig: Rig, acquirer: LosingAcquirer
) -> None:
    acquirer.losing, acquirer.cut_link = {"authorize"}, rig.link
    rig.reader.insert(make_card("mastercard"))
    run_id = rig.terminal.engine.start("payment", {"amount_minor": 4200, "currency": "EUR"})
    run = rig.drive(run_id, lambda r: r.state.get("decision") == "unknown")
    key = run.state["auth_key"]
    assert run.status is Status.RUNNING  # reverse_unknown, retried while the link is down
    assert [e.key for e in acquirer.effects("authorize")] == [key]  # the card is charged
    rig.sync()  # the cloud hears of it (the acquirer link is down, not the cloud's)
    assert [m["decision"] for m in rig.messages("payment")] == ["unknown"]

    rig.resolve_all()
    row = rig.outcome_row(key)
    assert (row["state"], row["status"], row["operation"]) == (
        "resolved",
        "approved",
        "authorization",
    )
    assert row["amount_minor"] == 4200

    rig.sync()
    assert rig.outcome_row(key)["command_status"] == "applied"
    kept = rig.terminal.store.active_document(f"outcome:{key}")
    assert kept is not None and kept[1]["status"] == "approved"
    assert kept[1]["settled"] == "reversal_pending"
    assert rig.terminal.engine.get(run_id).status is Status.RUNNING  # still owes a reversal

    rig.link.up()
    run = rig.drive(run_id, lambda r: r.status.terminal)
    assert (run.status, run.state["decision"], run.state["reversed"]) == (
        Status.COMPLETED,
        "declined",
        True,
    )
    assert acquirer.net_minor("EUR") == 0  # approved, then released
    rig.sync()
    assert [m["decision"] for m in rig.messages("payment")] == ["unknown", "declined"]


def test_the_fleet_api_lists_unknown_outcomes_with_state_and_age(
    rig: Rig, acquirer: LosingAcquirer, cloud: Cloud
) -> None:
    acquirer.losing = {"refund"}
    rig.reader.insert(make_card("visa"))
    rig.terminal.engine.start("refund", {"amount_minor": 700, "currency": "EUR"})
    rig.reader.insert(make_card("amex"))
    rig.terminal.engine.start("refund", {"amount_minor": 800, "currency": "EUR"})
    rig.sync()
    with rig.connect() as conn, conn.transaction():
        SCHEMA.migrate(conn, where="test")
        found = find_unknown(conn, now=time.time())  # recorded open, no run started yet
    assert len(found) == 2
    token = json.loads(cloud.cli("api-token", "create", "--name", "t", "--role", "read_only",
                                 "--json"))["token"]  # fmt: skip
    api = httpx.Client(base_url=cloud.url, headers={"Authorization": f"Bearer {token}"})
    with api:
        page = api.get("/api/v1/outcomes", params={"state": "open"}).json()
        assert {i["key"] for i in page["items"]} == {f.key for f in found}
        assert all(i["state"] == "open" and i["age_s"] >= 0 for i in page["items"])
        assert api.get("/api/v1/outcomes", params={"state": "resolved"}).json()["items"] == []

        rig.resolve_all()
        rig.sync()
        listed = api.get("/api/v1/outcomes", params={"device_id": rig.identity.device_id})
        items = listed.json()["items"]
        assert [(i["state"], i["status"], i["command_status"]) for i in items] == [
            ("resolved", "approved", "applied")
        ] * 2
        assert api.get("/api/v1/outcomes", params={"state": "open"}).json()["items"] == []
        first = api.get("/api/v1/outcomes", params={"limit": 1}).json()
        assert len(first["items"]) == 1 and first["next"] is not None
        rest = api.get("/api/v1/outcomes", params={"limit": 1, "after": first["next"]}).json()
        assert rest["items"][0]["outcome_id"] != first["items"][0]["outcome_id"]

        one = api.get(f"/api/v1/outcomes/{items[0]['outcome_id']}").json()
        assert one["lookup"]["found"] is True and one["lookup"]["operation"] == "refund"
        missing = api.get("/api/v1/outcomes/out_" + "0" * 32)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "outcome_not_found"
        bad = api.get("/api/v1/outcomes", params={"state": "unknown"})
        assert bad.status_code == 422 and bad.json()["error"]["field"]
        assert api.get("/api/v1/outcomes", params={"after": "x"}).status_code == 422
    assert httpx.get(f"{cloud.url}/api/v1/outcomes").status_code == 401


def test_record_and_tell__replayed_after_its_commit_queues_nothing_again(
    rig: Rig, acquirer: LosingAcquirer
) -> None:
    """State surgery: the step that recorded the truth and queued the command runs again
    (a worker killed after its commit, before the engine recorded the step)."""
    acquirer.losing = {"refund"}
    rig.reader.insert(make_card("visa"))
    run_id = rig.terminal.engine.start("refund", {"amount_minor": 990, "currency": "EUR"})
    key = rig.terminal.engine.get(run_id).state["refund_key"]
    rig.sync()
    (resolve_id,) = rig.resolve_all()
    run = rig.engine.get(resolve_id)
    first = rig.outcome_row(key)
    replayed = steps.record_and_tell(
        dict(run.state), SimpleNamespace(services=rig.engine.services, clock=rig.clock)
    )
    assert replayed == {"status": "approved", "command_id": first["command_id"]}
    with rig.connect() as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM commands WHERE device_id = %s AND action = 'resolve_outcome'",
            (rig.identity.device_id,),
        ).fetchone() or (0,)
    assert n == 1
    assert rig.outcome_row(key)["resolved_at"] == first["resolved_at"]


# --- schema --------------------------------------------------------------------------------

CATALOG = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity
        FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = ANY(%(tables)s)
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = current_schema() AND tablename = ANY(%(tables)s)
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = current_schema() AND c.conrelid::regclass::text = ANY(%(tables)s)
        ORDER BY 1, 2""",
}
TABLES = ["unknown_outcomes"]


def _catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {k: conn.execute(q, {"tables": TABLES}).fetchall() for k, q in CATALOG.items()}


def test_schema__migrations_converge_with_schema_sql_and_rerun_is_a_no_op(
    new_database: Callable[[], str],
) -> None:
    migrated, fresh = new_database(), new_database()
    with psycopg.connect(migrated, autocommit=True) as conn, conn.transaction():
        assert migrate(conn) == len(SCHEMA.migrations()) == 1
    with psycopg.connect(migrated, autocommit=True) as conn, conn.transaction():
        assert migrate(conn) == 1  # nothing pending: nothing done
        assert SCHEMA.version(conn) == 1
    with psycopg.connect(fresh, autocommit=True) as conn:
        conn.execute(SCHEMA.schema().encode())
    got = _catalog(migrated)
    assert {t for t, *_ in got["columns"]} == set(TABLES)
    assert got == _catalog(fresh)
