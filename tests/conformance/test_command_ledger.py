"""The sync side of every store: the database's own id (the protocol's ``stream``), audit
rows paged after a seq, and the command ledger -- a command's row, the document it brings,
its audit rows and outbox messages in ONE transaction, by compare-and-set on its seq
(DESIGN.md invariants 8 and 9)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import services
from psycopg import conninfo

from cloud.store.postgres import PostgresStore
from edge.engine import Engine, InlineExecutor
from edge.engine.records import AuditEvent, CommandRecord, OutboxMessage
from edge.errors import StoreError
from edge.store.memory import MemoryDatabase, MemoryStore
from edge.store.sqlite import SqliteStore

T0 = 1_700_000_000.0


def _event(name: str, n: int = 0) -> AuditEvent:
    return AuditEvent(None, name, T0 + n, None, {"n": n})


def _message(topic: str = "command_result", message_id: str | None = None) -> OutboxMessage:
    return OutboxMessage(message_id or uuid.uuid4().hex, None, None, topic, {"ok": True}, T0)


def _command(
    seq: int | None,
    *,
    command_id: str | None = None,
    status: str = "applied",
    issued_at: float = T0,
    document: tuple[str, int, dict] | None = None,
    audit: list[AuditEvent] | None = None,
    outbox: list[OutboxMessage] | None = None,
) -> CommandRecord:
    return CommandRecord(
        seq=seq,
        command_id=command_id or f"cmd-{seq}-{uuid.uuid4().hex[:6]}",
        action="update_config",
        status=status,  # type: ignore[arg-type]
        reason=None if status == "applied" else "expired",
        issued_at=issued_at,
        at=T0 + 100,
        document=document,
        audit=[_event("command_applied")] if audit is None else audit,
        outbox=[_message()] if outbox is None else outbox,
    )


def _written(store) -> tuple[int, int, int, float | None]:
    """What the sync tables hold: audit rows, outbox depth, high water, trusted time."""
    return (
        len(list(store.audit_rows())),
        store.outbox_stats().depth,
        store.command_high_water(),
        store.trusted_time(),
    )


@pytest.fixture
def other_store(backend: Any, tmp_path: Path) -> Iterator[Any]:
    """A store on a second, newly created database of the same kind. (PostgreSQL: made
    and migrated here, not cloned from the suite's template, whose copies share its id.)"""
    if backend.name == "memory":
        yield MemoryStore(MemoryDatabase())
        return
    if backend.name == "sqlite":
        s = SqliteStore(tmp_path / "other.db")
        yield s
        s.close()
        return
    name = f"tillflow_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(services.postgres_admin_url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    s = PostgresStore(
        conninfo.make_conninfo(services.postgres_admin_url(), dbname=name), pool_size=1
    )
    try:
        yield s
    finally:
        s.close()
        with psycopg.connect(services.postgres_admin_url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the database's id -------------------------------------------------------------------


def test_database_id__drawn_once_and_stable_across_reopen(store, store_factory):
    stream = store.database_id()
    assert re.fullmatch(r"[0-9a-f]{32}", stream), stream
    assert store.database_id() == stream
    store.close()
    assert store_factory().database_id() == stream


def test_database_id__two_databases_differ(store, other_store):
    assert re.fullmatch(r"[0-9a-f]{32}", other_store.database_id())
    assert other_store.database_id() != store.database_id()


# --- audit rows after a seq -----------------------------------------------------------------


def test_audit_after__pages_through_the_chain_in_seq_order(store):
    store.record_command(_command(None, audit=[_event("e", n) for n in range(5)], outbox=[]))
    every = list(store.audit_rows())
    assert [r.seq for r in every] == [1, 2, 3, 4, 5]
    assert [r.seq for r in store.audit_after(0, 2)] == [1, 2]
    assert [r.seq for r in store.audit_after(2, 2)] == [3, 4]
    assert store.audit_after(4, 2) == every[4:]
    assert store.audit_after(5, 2) == []
    assert store.audit_after(0, 100) == every  # the rows as audit_rows reads them
    assert store.audit_after(0, 100, stream=1) == []  # a terminal keeps one stream


# --- the ledger -------------------------------------------------------------------------------


def test_ledger__empty_has_no_high_water_no_trusted_time_no_documents(store):
    assert store.command_high_water() == 0
    assert store.trusted_time() is None
    assert store.active_document("config") is None


def test_ledger__a_seq_not_above_the_high_water_is_refused_and_writes_nothing(store):
    assert store.record_command(_command(5, issued_at=T0 + 5)) is True
    before = _written(store)
    assert before == (1, 1, 5, T0 + 5)
    doc = ("config", 1, {"risk": {}})
    for seq in (5, 4, 1):  # equal, older
        stale = _command(seq, issued_at=T0 + 50, document=doc)
        assert store.record_command(stale) is False
        assert _written(store) == before
        assert store.active_document("config") is None
    assert store.record_command(_command(6)) is True
    assert store.command_high_water() == 6


def test_ledger__the_same_command_id_again_is_refused_even_with_a_higher_seq(store):
    assert store.record_command(_command(1, command_id="c-1")) is True
    before = _written(store)
    assert store.record_command(_command(2, command_id="c-1")) is False
    assert _written(store) == before


def test_ledger__document_audit_and_outbox_commit_together(store, clock):
    content = {"risk": {"floor_limit_minor": 1000}}
    audit = [_event("command_applied", 1), _event("config_changed", 2)]
    msg = _message()
    rec = _command(1, document=("config", 7, content), audit=audit, outbox=[msg])
    assert store.record_command(rec) is True
    assert store.active_document("config") == (7, content)
    assert store.active_document("policy") is None
    rows = list(store.audit_rows())
    assert [r.event for r in rows] == ["command_applied", "config_changed"]
    assert msg.seq is not None
    (queued,) = store.outbox()
    assert (queued.seq, queued.message_id, queued.payload) == (msg.seq, msg.message_id, msg.payload)
    engine = Engine(store, InlineExecutor(), clock=clock)
    try:
        report = engine.verify_audit()  # chained as a commit's rows are
        assert report.ok and report.rows == 2, report
    finally:
        engine.close()


def test_ledger__a_failing_part_rolls_every_part_back(store):
    assert store.record_command(_command(1, document=("config", 1, {"a": 1}))) is True
    before = _written(store)
    # The document's version is taken: the ledger row written before it goes too.
    with pytest.raises(StoreError):
        store.record_command(_command(2, document=("config", 1, {"a": 2})))
    assert _written(store) == before
    assert store.active_document("config") == (1, {"a": 1})
    # An outbox message whose id is taken: the ledger row and document go too.
    (taken,) = store.outbox()
    clash = _command(3, document=("config", 2, {"a": 3}), outbox=[_message("x", taken.message_id)])
    with pytest.raises(StoreError):
        store.record_command(clash)
    assert _written(store) == before
    assert store.active_document("config") == (1, {"a": 1})
    # The same command, fixed, goes through: nothing of the failed tries was left.
    assert store.record_command(_command(3, document=("config", 2, {"a": 3}))) is True
    assert store.active_document("config") == (2, {"a": 3})


def test_ledger__active_document_is_the_highest_version_of_its_kind(store):
    docs = [("config", 1, {"v": 1}), ("config", 3, {"v": 3}), ("config", 2, {"v": 2})]
    docs.append(("policy", 9, {"rules": []}))
    for seq, doc in enumerate(docs, start=1):
        assert store.record_command(_command(seq, document=doc)) is True
    assert store.active_document("config") == (3, {"v": 3})
    assert store.active_document("policy") == (9, {"rules": []})


def test_ledger__trusted_time_is_the_latest_issued_at_not_the_latest_seq(store):
    store.record_command(_command(1, issued_at=T0 + 30))
    store.record_command(_command(2, issued_at=T0 + 10))
    assert store.trusted_time() == T0 + 30


def test_ledger__a_refused_command_advances_the_seq_without_a_document(store):
    assert store.record_command(_command(3, status="refused")) is True
    assert store.command_high_water() == 3
    with pytest.raises(ValueError, match="brings no document"):
        store.record_command(_command(4, status="refused", document=("config", 1, {})))
    assert store.command_high_water() == 3


def test_ledger__without_a_seq_only_audit_and_outbox_are_written(store):
    store.record_command(_command(2))
    rec = _command(None, audit=[_event("command_refused")], outbox=[])
    assert store.record_command(rec) is True
    assert _written(store) == (2, 1, 2, T0)
    assert [r.event for r in store.audit_rows()] == ["command_applied", "command_refused"]


def test_ledger__survives_a_reopen(store, store_factory):
    store.record_command(_command(4, document=("policy", 2, {"rules": []}), issued_at=T0 + 4))
    store.close()
    again = store_factory()
    assert again.command_high_water() == 4
    assert again.trusted_time() == T0 + 4
    assert again.active_document("policy") == (2, {"rules": []})
    assert again.record_command(_command(4)) is False
