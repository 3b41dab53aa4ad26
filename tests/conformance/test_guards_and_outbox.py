"""Guarded counters (caps enforced in the approving transaction) and the outbox's ack."""

from __future__ import annotations

import threading

import tf_steps

from edge.engine import Engine, InlineExecutor, Status
from edge.engine.loader import load_text
from edge.engine.records import Acknowledgement

APPROVE = """
workflow_type: approve
version: 1
steps:
  - {name: approve, type: STANDARD, function: "tf_steps:approve_within_cap"}
  - {name: sale, type: STANDARD, function: "tf_steps:emit_sale"}
"""


def _engine(store, clock):
    eng = Engine(store, InlineExecutor(), clock=clock, services={"store": store})
    eng.register(load_text(APPROVE))
    return eng


def test_guard__within_its_cap_commits_with_the_step(store, clock):
    eng = _engine(store, clock)
    run = eng.get(eng.start("approve", {"amount": 60}))
    assert run.status is Status.COMPLETED and run.state["decision"] == "approved"
    assert store.counters() == {"offline": (60, 1)}


def test_guard__a_step_that_would_pass_the_cap_declines_by_itself(store, clock):
    eng = _engine(store, clock)
    eng.start("approve", {"amount": 60})
    second = eng.get(eng.start("approve", {"amount": 60}))
    assert second.state["decision"] == "declined"
    assert second.state["reason"] == "offline_amount_cap"
    assert store.counters() == {"offline": (60, 1)}


def test_guard__refused_at_commit_reruns_the_step_with_the_same_key(store_factory, clock):
    """Two terminals' approvals race: both read 0 of 100, both approve 60. The second
    commit's guard refuses; its step runs again, sees 60, and declines."""
    stores = [store_factory(), store_factory()]
    engines = [_engine(s, clock) for s in stores]
    tf_steps.KNOBS["barrier"] = threading.Barrier(2)
    ids: list[str] = []

    def go(e: Engine) -> None:
        ids.append(e.start("approve", {"amount": 60}))

    threads = [threading.Thread(target=go, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    tf_steps.KNOBS.pop("barrier")
    decisions = sorted(engines[0].get(i).state["decision"] for i in ids)
    assert decisions == ["approved", "declined"]
    assert stores[0].counters() == {"offline": (60, 1)}
    keys = tf_steps.effects("approve")
    assert len(keys) == 3 and len(set(keys)) == 2  # the refused step re-ran with its key


def test_guard__a_step_that_ignores_the_counters_fails_with_the_reason(store, clock):
    eng = _engine(store, clock)
    eng.start("approve", {"amount": 60})
    tf_steps.KNOBS["ignore_counters"] = True
    run = eng.get(eng.start("approve", {"amount": 60}))
    assert run.status is Status.FAILED
    assert run.error["code"] == "limit_exceeded" and run.error["reason"] == "offline_amount_cap"
    assert store.counters() == {"offline": (60, 1)}
    assert store.outbox_stats().depth == 1  # only the first sale was recorded


def test_outbox__ack_through_drops_what_the_cloud_has_and_keeps_the_order(store, clock):
    eng = _engine(store, clock)
    for amount in (10, 20, 30):
        eng.start("approve", {"amount": amount})
    before = store.outbox_stats()
    assert before.depth == 3 and before.bytes > 0 and before.oldest == clock.now()
    seqs = [m.seq for m in store.outbox()]
    assert seqs == sorted(seqs)
    assert store.acknowledge(Acknowledgement(outbox_through=seqs[1])).messages == 2
    assert [m.seq for m in store.outbox()] == [seqs[2]]
    eng.start("approve", {"amount": 5})
    after = store.outbox()
    assert len(after) == 2 and after[1].seq > seqs[2]  # numbers are never reused
    assert store.outbox_stats().last_seq == after[1].seq
