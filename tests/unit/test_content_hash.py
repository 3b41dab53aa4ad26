"""What a loaded workflow is pinned by: a content hash that ignores formatting and
survives a snapshot round trip."""

from __future__ import annotations

import pytest
from wf_problems import FN, HEAD, PAYMENT, yaml_text

from edge.engine.loader import load_file, load_snapshot, load_text

# --- content hash and snapshot -----------------------------------------------------------

TIDY = HEAD + yaml_text(f"""
    saga: true
    steps:
      - name: charge
        type: STANDARD
        function: {FN}
        retry:
          max_attempts: 3
      - name: route
        type: DECISION
        routes:
          - when: state.amount > 0
            next: END
        default: END
    """)

# The same definition: comments, flow style, key order, quoting and an explicit default.
MESSY = yaml_text(f"""
    # a comment at the top
    version: 1          # trailing comment
    steps: [
      {{type: STANDARD, name: "charge", function: '{FN}',
        retry: {{max_attempts: 3, multiplier: 2.0}}}},
      {{name: route, type: DECISION, default: END,
        routes: [{{next: END, when: "state.amount > 0"}}]}}
    ]
    saga: yes
    workflow_type: "t"
    """)


def test_content_hash__ignores_comments_formatting_key_order_and_spelled_out_defaults():
    assert load_text(MESSY).content_hash == load_text(TIDY).content_hash


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("max_attempts: 3", "max_attempts: 4", id="retry"),
        pytest.param(FN, "edge.examples.steps:reject", id="function"),
        pytest.param("state.amount > 0", "state.amount >= 0", id="condition"),
        pytest.param("saga: true", "saga: false", id="saga"),
    ],
)
def test_content_hash__changes_when_a_step_changes(old, new):
    changed = TIDY.replace(old, new)
    assert changed != TIDY
    assert load_text(changed).content_hash != load_text(TIDY).content_hash


LOOPS_AND_WAITS = HEAD + yaml_text(f"""
    steps:
      - name: poll
        type: LOOP
        mode: WHILE
        while: state.n < 3
        max_iterations: 3
        body:
          - name: inner
            type: STANDARD
            function: {FN}
      - name: call
        type: HTTP
        method: POST
        url: "https://acquirer.test/{{{{ state.id }}}}"
        body: {{amount: "{{{{ state.amount }}}}"}}
      - name: pin
        type: WAIT
        timeout_s: 2
        on_timeout: END
    """)


@pytest.mark.parametrize(
    "load",
    [lambda: load_file(PAYMENT), lambda: load_text(LOOPS_AND_WAITS)],
    ids=["payment", "loop"],
)
def test_load_snapshot__round_trips_to_the_same_content_hash(load):
    wf = load()
    again = load_snapshot(wf.snapshot)
    assert again.content_hash == wf.content_hash
    assert again.definition == wf.definition
    assert again.snapshot == wf.snapshot
    assert again.functions == wf.functions
    assert again.sequences == wf.sequences
