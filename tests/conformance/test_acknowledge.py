"""One acknowledgement path: the outbox messages go, the counter changes that go with
them apply once, and the audit mark moves, in one transaction (``OutboxSource``)."""

from __future__ import annotations

import threading

from edge.engine import Engine, InlineExecutor
from edge.engine.loader import load_text
from edge.engine.records import Acknowledgement, AckResult, Guard

APPROVE = """
workflow_type: approve
version: 1
steps:
  - {name: approve, type: STANDARD, function: "tf_steps:approve_within_cap"}
  - {name: sale, type: STANDARD, function: "tf_steps:emit_sale"}
"""


def _sales(store, clock, amounts):
    """Approved sales (each holds offline exposure and queues one message); returns
    ``{seq: the release its acknowledgement makes}``."""
    eng = Engine(store, InlineExecutor(), clock=clock, services={"store": store})
    eng.register(load_text(APPROVE))
    for amount in amounts:
        eng.start("approve", {"amount": amount})
    msgs = store.outbox()
    assert [m.payload["amount"] for m in msgs] == list(amounts)
    return {m.seq: (Guard("offline", amount=-m.payload["amount"], count=-1),) for m in msgs}


def test_ack__removes_the_messages_and_releases_theirs_only(store, clock):
    releases = _sales(store, clock, [10, 20, 30])
    first, second, _ = sorted(releases)
    result = store.acknowledge(Acknowledgement(outbox_through=second, releases=releases))
    assert result == AckResult(messages=2, released=releases[first] + releases[second])
    assert store.counters()["offline"] == (30, 1)
    assert [m.seq for m in store.outbox()] == [max(releases)]


def test_ack__repeated_releases_nothing_twice(store, clock):
    releases = _sales(store, clock, [10, 20])
    last = max(releases)
    ack = Acknowledgement(outbox_through=last, releases=releases)
    assert store.acknowledge(ack).messages == 2
    assert store.acknowledge(ack) == AckResult(messages=0, released=())
    assert store.counters()["offline"] == (0, 0)


def test_ack__racing_another_releases_exactly_once(store_factory, clock):
    """Two connections acknowledge the same messages at once: one transaction removes
    them and releases; the other finds nothing left and releases nothing."""
    first = store_factory()
    releases = _sales(first, clock, [10, 20, 30])
    stores = [first, store_factory()]
    ack = Acknowledgement(outbox_through=max(releases), releases=releases)
    start = threading.Barrier(2)
    results: list[AckResult] = []

    def go(s) -> None:
        start.wait(5)
        results.append(s.acknowledge(ack))

    threads = [threading.Thread(target=go, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert sorted(r.messages for r in results) == [0, 3]
    assert sum(len(r.released) for r in results) == 3
    assert first.counters()["offline"] == (0, 0)


def test_ack__audit_through_alone_marks_the_log_and_keeps_the_outbox(store, clock):
    _sales(store, clock, [10])
    head = store.audit_head()
    assert head is not None
    assert store.acknowledge(Acknowledgement(audit_through=head[0])) == AckResult()
    kept = store.audit_retention()
    assert kept is not None and kept.acked_seq == head[0]
    assert store.outbox_stats().depth == 1
    assert store.counters()["offline"] == (10, 1)


def test_ack__a_release_below_zero_is_left_out_and_the_ack_goes_through(store, clock, caplog):
    releases = _sales(store, clock, [10])
    (seq,) = releases
    too_much = {seq: (Guard("offline", amount=-11, count=-1),)}
    result = store.acknowledge(Acknowledgement(outbox_through=seq, releases=too_much))
    assert result == AckResult(messages=1, released=())
    assert store.counters()["offline"] == (10, 1)
    assert store.outbox_stats().depth == 0
    assert "below zero" in caplog.text
