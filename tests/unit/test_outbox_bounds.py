"""The terminal's outbox is bounded in messages and bytes; acknowledgements make room."""

from __future__ import annotations

import pytest

from edge.engine import Engine, FakeClock, InlineExecutor, Status
from edge.engine.loader import load_text
from edge.engine.records import Acknowledgement
from edge.store.sqlite import SqliteStore

SALE = """
workflow_type: sale
version: 1
steps:
  - {name: sale, type: STANDARD, function: "tf_steps:emit_sale"}
"""


@pytest.fixture
def bounded(tmp_path):
    store = SqliteStore(tmp_path / "t.db", outbox_max_messages=2, outbox_max_bytes=10_000)
    engine = Engine(store, InlineExecutor(), clock=FakeClock())
    engine.register(load_text(SALE))
    yield store, engine
    engine.close()
    store.close()


def test_outbox__a_step_past_the_bound_is_refused_and_nothing_is_written(bounded):
    store, engine = bounded
    for amount in (1, 2):
        assert engine.get(engine.start("sale", {"amount": amount})).status is Status.COMPLETED
    third = engine.get(engine.start("sale", {"amount": 3}))
    assert third.status is Status.FAILED
    assert (third.error["code"], third.error["reason"]) == ("limit_exceeded", "outbox_full")
    assert store.outbox_stats().depth == 2


def test_outbox__acknowledging_makes_room_and_keeps_the_counter_true(bounded):
    store, engine = bounded
    engine.start("sale", {"amount": 1})
    engine.start("sale", {"amount": 2})
    first = store.outbox()[0].seq
    assert store.acknowledge(Acknowledgement(outbox_through=first)).messages == 1
    stats = store.outbox_stats()
    assert store.counters()["outbox"] == (stats.bytes, stats.depth) == (stats.bytes, 1)
    assert engine.get(engine.start("sale", {"amount": 3})).status is Status.COMPLETED


def test_outbox__the_byte_bound_counts_payload_bytes(tmp_path):
    store = SqliteStore(tmp_path / "b.db", outbox_max_bytes=30)
    engine = Engine(store, InlineExecutor(), clock=FakeClock())
    engine.register(load_text(SALE))
    assert engine.get(engine.start("sale", {"amount": 1})).status is Status.COMPLETED  # 13 B
    assert engine.get(engine.start("sale", {"amount": 2})).status is Status.COMPLETED  # 26 B
    assert engine.get(engine.start("sale", {"amount": 3})).error["reason"] == "outbox_full"
    engine.close()
    store.close()
