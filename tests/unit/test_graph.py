"""``to_mermaid``: one node per step shaped by type, every transition drawn and labelled."""

from __future__ import annotations

import re
from pathlib import Path

import edge.examples
from edge.engine.graph import to_mermaid
from edge.engine.loader import load_file, load_text

PAYMENT = Path(edge.examples.__file__).parent / "payment.yaml"
FN = "edge.examples.steps:validate"

EVERY_TYPE = f"""
workflow_type: every_type
version: 1
steps:
  - name: fetch-order
    type: HTTP
    method: POST
    url: https://example.test/orders
    compensate: edge.examples.steps:release_funds
  - name: route
    type: DECISION
    routes:
      - when: state.status == "declined"
        next: await_pin
    default: each_item
  - name: each_item
    type: LOOP
    mode: ITERATE
    over: state.items
    max_iterations: 10
    body:
      - name: price-item
        type: STANDARD
        function: {FN}
      - name: lookup
        type: PARALLEL
        tasks:
          - {{name: stock, function: "{FN}"}}
          - {{name: tax, function: "{FN}"}}
  - name: poll
    type: LOOP
    mode: WHILE
    while: state.pending > 0
    max_iterations: 5
    body:
      - name: check
        type: STANDARD
        function: {FN}
  - name: await_pin
    type: WAIT
    timeout_s: 30
    on_timeout: give_up
  - name: settle
    type: SUB_WORKFLOW
    workflow: settlement
  - name: notify
    type: FIRE_AND_FORGET
    workflow: send_receipt
    next: END
  - name: give_up
    type: STANDARD
    function: edge.examples.steps:reject
"""

NESTED = f"""
workflow_type: nested
version: 1
steps:
  - name: outer
    type: LOOP
    mode: ITERATE
    over: state.batches
    max_iterations: 10
    body:
      - name: skip_empty
        type: DECISION
        routes:
          - when: state.empty
            next: END
        default: inner
      - name: inner
        type: LOOP
        mode: WHILE
        while: state.left
        max_iterations: 10
        body:
          - name: take
            type: STANDARD
            function: {FN}
"""

ID = r"[A-Za-z_][A-Za-z0-9_]*"
EDGE = re.compile(rf'^({ID}) (?:-->|-\.->)(?:\|"[^"]*"\|)? ({ID})$')


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def block(text: str, opener: str) -> list[str]:
    """The lines between ``opener`` and its matching ``end``."""
    body = lines(text)
    start = body.index(opener) + 1
    depth, i = 1, start
    while depth:
        depth += body[i].startswith("subgraph ") - (body[i] == "end")
        i += 1
    return body[start : i - 1]


def test_payment__starts_with_flowchart_and_runs_start_to_end() -> None:
    out = to_mermaid(load_file(PAYMENT))
    assert out.startswith("flowchart TD\n")
    got = lines(out)
    for expected in (
        "wf_start --> validate",
        "validate --> check_amount",
        "reserve_funds --> charge_card",
        "print_receipt --> record_sale",
        "record_sale --> wf_end",
    ):
        assert expected in got


def test_payment__decision_routes_are_labelled_with_when_and_default() -> None:
    got = lines(to_mermaid(load_file(PAYMENT)))
    assert 'check_amount{"check_amount"}' in got
    assert 'check_amount -->|"state.amount #lt;= 0"| reject' in got
    assert 'check_amount -->|"default"| reserve_funds' in got
    # a DECISION moves only by its routes: no plain sequence edge to the next listed step
    assert "check_amount --> reject" not in got


def test_payment__explicit_next_end_wins_over_the_next_listed_step() -> None:
    got = lines(to_mermaid(load_file(PAYMENT)))
    assert "reject --> wf_end" in got
    assert "reject --> reserve_funds" not in got


def test_payment__compensations_are_dashed_edges_to_undo_nodes() -> None:
    out = to_mermaid(load_file(PAYMENT))
    got = lines(out)
    assert "reserve_funds -.-> comp_reserve_funds" in got
    assert 'comp_reserve_funds["undo: release_funds"]' in got
    assert "charge_card -.-> comp_charge_card" in got
    assert 'comp_charge_card["undo: refund_card"]' in got
    assert "comp_validate" not in out
    assert "comp_print_receipt" not in out


def test_every_type__nodes_are_shaped_and_labelled_by_type() -> None:
    got = lines(to_mermaid(load_text(EVERY_TYPE)))
    for node in (
        'fetch_order["fetch-order<br/>HTTP POST"]',
        'route{"route"}',
        'each_item{{"each_item<br/>LOOP over state.items"}}',
        'price_item["price-item"]',
        'lookup[/"lookup<br/>PARALLEL: stock, tax"/]',
        'poll{{"poll<br/>LOOP while state.pending #gt; 0"}}',
        'await_pin(["await_pin<br/>WAIT"])',
        'settle[["settle<br/>SUB_WORKFLOW: settlement"]]',
        'notify>"notify<br/>FIRE_AND_FORGET: send_receipt"]',
        'comp_fetch_order["undo: release_funds"]',
    ):
        assert node in got


def test_every_type__transitions_are_all_drawn() -> None:
    got = lines(to_mermaid(load_text(EVERY_TYPE)))
    for expected in (
        "wf_start --> fetch_order",
        "fetch_order --> route",
        "fetch_order -.-> comp_fetch_order",
        'route -->|"state.status == #quot;declined#quot;"| await_pin',
        'route -->|"default"| each_item',
        "await_pin --> settle",
        'await_pin -->|"timeout"| give_up',
        "settle --> notify",
        "notify --> wf_end",
        "give_up --> wf_end",
    ):
        assert expected in got


def test_loop__iterate_body_is_a_subgraph_with_entry_back_edge_and_exit() -> None:
    out = to_mermaid(load_text(EVERY_TYPE))
    body = block(out, 'subgraph each_item_body ["each_item body"]')
    assert body == ['price_item["price-item"]', 'lookup[/"lookup<br/>PARALLEL: stock, tax"/]']
    got = lines(out)
    assert "each_item --> price_item" in got
    assert "price_item --> lookup" in got
    assert 'lookup -->|"next item"| each_item' in got
    assert 'each_item -->|"done"| poll' in got
    assert "lookup --> wf_end" not in got


def test_loop__while_back_edge_names_the_condition() -> None:
    out = to_mermaid(load_text(EVERY_TYPE))
    assert block(out, 'subgraph poll_body ["poll body"]') == ['check["check"]']
    got = lines(out)
    assert "poll --> check" in got
    assert 'check -->|"while state.pending #gt; 0"| poll' in got
    assert 'poll -->|"done"| await_pin' in got


def test_loop__nested_body_end_returns_to_the_innermost_loop() -> None:
    out = to_mermaid(load_text(NESTED))
    outer = block(out, 'subgraph outer_body ["outer body"]')
    assert 'subgraph inner_body ["inner body"]' in outer
    assert block(out, 'subgraph inner_body ["inner body"]') == ['take["take"]']
    got = lines(out)
    assert 'take -->|"while state.left"| inner' in got
    assert 'inner -->|"done"| outer' in got
    assert 'skip_empty -->|"state.empty"| outer' in got
    assert 'outer -->|"done"| wf_end' in got


def test_ids__are_sanitised_unique_and_never_a_mermaid_keyword() -> None:
    wf = load_text(
        f"""
workflow_type: ids
version: 1
steps:
  - {{name: a-b, type: STANDARD, function: "{FN}"}}
  - {{name: a_b, type: STANDARD, function: "{FN}"}}
  - {{name: end, type: STANDARD, function: "{FN}"}}
"""
    )
    got = lines(to_mermaid(wf))
    assert 'a_b["a-b"]' in got
    assert 'a_b_2["a_b"]' in got
    assert 'end_2["end"]' in got
    assert "a_b --> a_b_2" in got
    assert "a_b_2 --> end_2" in got


def test_ids__every_edge_joins_safe_identifiers() -> None:
    for text in (to_mermaid(load_file(PAYMENT)), to_mermaid(load_text(EVERY_TYPE))):
        edges = [line for line in lines(text) if "--" in line]
        assert edges
        for line in edges:
            assert EDGE.match(line), line


def test_labels__quotes_and_hashes_cannot_break_out_of_a_label() -> None:
    wf = load_text(
        """
workflow_type: quotes
version: 1
steps:
  - name: pick
    type: DECISION
    routes:
      - when: 'state.note == "say \\"hi\\" #quot;"'
        next: END
    default: END
"""
    )
    got = lines(to_mermaid(wf))
    label = "state.note == #quot;say \\#quot;hi\\#quot; #35;quot;#quot;"
    assert f'pick -->|"{label}"| wf_end' in got
    assert all(line.count('"') % 2 == 0 for line in got)


def test_output__is_deterministic_across_loads() -> None:
    first = to_mermaid(load_text(EVERY_TYPE))
    assert first == to_mermaid(load_text(EVERY_TYPE))
    assert to_mermaid(load_file(PAYMENT)) == to_mermaid(load_file(PAYMENT))
