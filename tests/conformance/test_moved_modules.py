"""A run in flight across the upgrade that split ``edge/terminal`` (drivers, sale,
service): its definition snapshot, stored in the database, names step functions by the
old paths (``edge.terminal.payment_steps:...``). The new build resolves them
(``edge.terminal.moved``) and the run finishes on the definition it started with."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import make_card
from test_payment_workflow import WORKFLOW, Terminal

from edge.engine import Engine, InlineExecutor, Status
from edge.engine.loader import load_file, load_text
from edge.terminal.moved import MOVED, new_name

#: The payment workflow as the build before the split shipped it.
OLD_TEXT = WORKFLOW.read_text().replace("edge.terminal.sale.", "edge.terminal.")


@pytest.fixture
def terminal(store, tmp_path) -> Iterator[Terminal]:
    with SimAcquirer() as acquirer:
        t = Terminal(store, tmp_path, acquirer)
        yield t
        t.engine.close()
        t.http.close()


def test_moved__a_run_pinned_to_the_old_paths_finishes_after_the_upgrade(terminal, store):
    assert "function: edge.terminal.payment_steps:" in OLD_TEXT
    old = Engine(store, InlineExecutor(), clock=terminal.clock, services=terminal.engine.services)
    old_wf = old.register(load_text(OLD_TEXT))
    terminal.printer.state = "paper_out"  # the run waits for the operator: in flight
    terminal.reader.insert(make_card("visa"))
    run_id = old.start("payment", {"amount_minor": 2_500, "currency": "EUR"})
    assert old.get(run_id).status is Status.WAITING
    old.close()  # the old build is gone; the run, pinned to its snapshot, is in the database

    new = terminal.engine  # the new build, with the shipped (new-path) workflow registered
    assert new.register(load_file(WORKFLOW)).content_hash != old_wf.content_hash
    terminal.printer.refill()
    new.resume(run_id, {})
    done = new.get(run_id)
    assert done.status is Status.COMPLETED and done.state["printer"] == "printed"
    assert done.definition_hash == old_wf.content_hash  # it finished on the old definition


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved__each_old_module_path_is_the_new_module_itself(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_moved__a_moved_package_takes_its_submodules_with_it():
    assert new_name("edge.terminal.policy.document") == "edge.terminal.sale.policy.document"
    old = importlib.import_module("edge.terminal.policy.document")
    assert old is importlib.import_module("edge.terminal.sale.policy.document")
    assert new_name("edge.terminal.carddata") is None  # it did not move
    assert new_name("edge.terminal") is None
