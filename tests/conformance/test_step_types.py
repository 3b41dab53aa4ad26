"""Each step type, end to end on a real store."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import tf_steps

from edge.engine import Status
from edge.errors import InputError, InvalidRunState


def test_decision__first_true_route_wins_else_default(engine, register):
    register("""
workflow_type: router
version: 1
steps:
  - name: route
    type: DECISION
    routes:
      - {when: "state.amount > 100", next: big}
      - {when: "state.amount > 10", next: medium}
    default: small
  - {name: big, type: STANDARD, function: "tf_steps:noop", next: END}
  - {name: medium, type: STANDARD, function: "tf_steps:noop", next: END}
  - {name: small, type: STANDARD, function: "tf_steps:noop"}
""")
    for amount, expected in [(500, "big"), (50, "medium"), (5, "small")]:
        run_id = engine.start("router", {"amount": amount})
        ran = [s.step for s in engine.show(run_id).steps if s.kind == "step"]
        assert ran == [expected], amount
        decision = next(s for s in engine.show(run_id).steps if s.kind == "decision")
        assert decision.output["next"] == expected


def test_loop_iterate__runs_the_body_per_item_with_item_and_index(engine, register):
    register("""
workflow_type: looper
version: 1
steps:
  - name: each
    type: LOOP
    mode: ITERATE
    over: state.items
    max_iterations: 10
    body:
      - {name: collect, type: STANDARD, function: "tf_steps:collect"}
  - {name: after, type: STANDARD, function: "tf_steps:noop"}
""")
    run = engine.get(engine.start("looper", {"items": ["a", "b", "c"]}))
    assert run.status is Status.COMPLETED
    assert run.state["seen"] == [[0, "a"], [1, "b"], [2, "c"]]
    paths = [s.step for s in engine.show(run.run_id).steps if s.kind == "step"]
    assert paths == ["each[0].collect", "each[1].collect", "each[2].collect", "after"]
    assert len(set(tf_steps.effects("collect:1"))) == 1


def test_loop_iterate__empty_list_skips_the_body(engine, register):
    register("""
workflow_type: looper
version: 1
steps:
  - name: each
    type: LOOP
    mode: ITERATE
    over: state.items
    max_iterations: 10
    body:
      - {name: collect, type: STANDARD, function: "tf_steps:collect"}
""")
    run = engine.get(engine.start("looper", {"items": []}))
    assert run.status is Status.COMPLETED and "seen" not in run.state


def test_loop_while__repeats_until_the_condition_is_false(engine, register):
    register("""
workflow_type: counter
version: 1
steps:
  - name: count
    type: LOOP
    mode: WHILE
    while: "state.n < 4"
    max_iterations: 10
    body:
      - {name: incr, type: STANDARD, function: "tf_steps:incr"}
""")
    run = engine.get(engine.start("counter", {"n": 0}))
    assert run.status is Status.COMPLETED and run.state["n"] == 4


def test_loop__exceeding_max_iterations_fails_the_run(engine, register):
    register("""
workflow_type: runaway
version: 1
steps:
  - name: count
    type: LOOP
    mode: WHILE
    while: "state.n < 100"
    max_iterations: 3
    body:
      - {name: incr, type: STANDARD, function: "tf_steps:incr"}
""")
    run = engine.get(engine.start("runaway", {"n": 0}))
    assert run.status is Status.FAILED
    assert "max_iterations=3" in run.error["message"]
    assert run.state["n"] == 3


PARALLEL = """
workflow_type: fanout
version: 1
steps:
  - name: both
    type: PARALLEL
    merge: {merge}
    on_conflict: {on_conflict}
    tasks:
      - {{name: a, function: "tf_steps:task_a"}}
      - {{name: b, function: "tf_steps:task_b"}}
"""


@pytest.mark.parametrize(
    ("merge", "on_conflict", "shared", "nested"),
    [
        ("shallow", "prefer_new", "from_b", {"b": 2, "same": "b"}),
        ("shallow", "prefer_existing", "from_a", {"a": 1, "same": "a"}),
        ("deep", "prefer_new", "from_b", {"a": 1, "b": 2, "same": "b"}),
        ("deep", "prefer_existing", "from_a", {"a": 1, "b": 2, "same": "a"}),
    ],
)
def test_parallel__merges_task_results_by_policy(
    engine, register, merge, on_conflict, shared, nested
):
    register(PARALLEL.format(merge=merge, on_conflict=on_conflict))
    run = engine.get(engine.start("fanout", {}))
    assert run.status is Status.COMPLETED
    assert (run.state["a"], run.state["b"]) == (1, 2)
    assert run.state["shared"] == shared
    assert run.state["nested"] == nested
    keys = tf_steps.effects("task_a") + tf_steps.effects("task_b")
    assert len(set(keys)) == 2  # each task has its own idempotency key


def test_parallel__conflict_with_on_conflict_error_fails_the_step(engine, register):
    register(PARALLEL.format(merge="shallow", on_conflict="error"))
    run = engine.get(engine.start("fanout", {}))
    assert run.status is Status.FAILED
    assert run.error["code"] == "merge_conflict" and "shared" in run.error["message"]


def test_parallel__allow_partial_keeps_the_results_that_succeeded(engine, register):
    register("""
workflow_type: partial
version: 1
steps:
  - name: both
    type: PARALLEL
    allow_partial: true
    tasks:
      - {name: a, function: "tf_steps:task_a"}
      - {name: bad, function: "tf_steps:task_fails"}
""")
    run_id = engine.start("partial", {})
    run = engine.get(run_id)
    assert run.status is Status.COMPLETED and run.state["a"] == 1
    row = next(s for s in engine.show(run_id).steps if s.step == "both")
    assert "bad" in row.output["errors"]


def test_parallel__a_failed_task_fails_the_step_without_allow_partial(engine, register):
    register("""
workflow_type: strict
version: 1
steps:
  - name: both
    type: PARALLEL
    tasks:
      - {name: a, function: "tf_steps:task_a"}
      - {name: bad, function: "tf_steps:task_fails"}
""")
    run = engine.get(engine.start("strict", {}))
    assert run.status is Status.FAILED and "bad" in run.error["message"]


class _Acquirer(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []
    status = 200

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(
            {"path": self.path, "body": body, "key": self.headers["Idempotency-Key"]}
        )
        payload = json.dumps({"approved": body["amount"] < 10_000, "auth": "A1"}).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def acquirer() -> Iterator[str]:
    _Acquirer.seen = []
    _Acquirer.status = 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Acquirer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


HTTP = """
workflow_type: authorize
version: 1
steps:
  - name: auth
    type: HTTP
    method: POST
    url: "{{{{ state.host }}}}/authorize/{{{{ state.terminal }}}}"
    headers: {{X-Terminal: "{{{{ state.terminal }}}}"}}
    body: {{amount: "{{{{ state.amount }}}}", currency: EUR}}
    timeout_s: 5
    output_key: auth_response
    retry: {{max_attempts: {attempts}, initial_backoff_s: 1, jitter: 0}}
"""


def test_http__templates_the_request_and_stores_the_response(engine, register, acquirer):
    register(HTTP.format(attempts=1))
    run = engine.get(
        engine.start("authorize", {"host": acquirer, "terminal": "T-7", "amount": 1250})
    )
    assert run.status is Status.COMPLETED
    assert run.state["auth_response"] == {"status": 200, "body": {"approved": True, "auth": "A1"}}
    [req] = _Acquirer.seen
    assert req["path"] == "/authorize/T-7"
    assert req["body"] == {"amount": 1250, "currency": "EUR"}  # a lone placeholder keeps its type
    assert len(req["key"]) == 32


def test_http__server_error_is_retried_with_a_new_idempotency_key(engine, register, acquirer):
    register(HTTP.format(attempts=2))
    _Acquirer.status = 503
    run = engine.get(engine.start("authorize", {"host": acquirer, "terminal": "T-7", "amount": 1}))
    assert run.status is Status.FAILED and "HTTP 503" in run.error["message"]
    assert len({r["key"] for r in _Acquirer.seen}) == 2


def test_http__client_error_is_not_retried(engine, register, acquirer):
    register(HTTP.format(attempts=3))
    _Acquirer.status = 402
    run = engine.get(engine.start("authorize", {"host": acquirer, "terminal": "T-7", "amount": 1}))
    assert run.status is Status.FAILED and len(_Acquirer.seen) == 1


WAIT = """
workflow_type: approval
version: 1
steps:
  - {name: before, type: STANDARD, function: "tf_steps:noop"}
  - name: manager
    type: WAIT
    input_schema: "tf_steps:Approval"
    output_key: approval
    timeout_s: 60
    on_timeout: timed_out
  - {name: approved, type: STANDARD, function: "tf_steps:noop", next: END}
  - {name: timed_out, type: STANDARD, function: "tf_steps:noop"}
"""


def test_wait__pauses_until_resume_with_valid_input(engine, register):
    register(WAIT)
    run_id = engine.start("approval", {})
    assert engine.get(run_id).status is Status.WAITING
    with pytest.raises(InputError, match="approver"):
        engine.resume(run_id, {"who": "nobody"})
    assert engine.get(run_id).status is Status.WAITING
    engine.resume(run_id, {"approver": "mgr-1"})
    run = engine.get(run_id)
    assert run.status is Status.COMPLETED and run.state["approval"] == {"approver": "mgr-1"}
    assert [s.step for s in engine.show(run_id).steps if s.kind == "step"] == ["before", "approved"]
    with pytest.raises(InvalidRunState):
        engine.resume(run_id, {"approver": "again"})


def test_wait__timeout_continues_at_on_timeout(engine, register, clock):
    register(WAIT)
    run_id = engine.start("approval", {})
    clock.advance(59)
    assert engine.recover() == []
    clock.advance(2)
    assert engine.recover() == [run_id]
    run = engine.get(run_id)
    assert run.status is Status.COMPLETED
    kinds = [(s.step, s.kind) for s in engine.show(run_id).steps]
    assert ("manager", "timeout") in kinds and ("timed_out", "step") in kinds


def test_wait__timeout_without_on_timeout_fails_the_run(engine, register, clock):
    register("""
workflow_type: w
version: 1
steps:
  - {name: wait, type: WAIT, timeout_s: 5}
""")
    run_id = engine.start("w", {})
    clock.advance(6)
    engine.recover()
    assert engine.get(run_id).status is Status.FAILED


CHILD = """
workflow_type: child
version: 1
steps:
  - {name: work, type: STANDARD, function: "tf_steps:add"}
"""
FAILING_CHILD = """
workflow_type: child
version: 2
steps:
  - {name: work, type: STANDARD, function: "tf_steps:fatal"}
"""


def test_sub_workflow__parent_waits_and_receives_the_child_state(engine, register):
    register(CHILD)
    register("""
workflow_type: parent
version: 1
steps:
  - name: call
    type: SUB_WORKFLOW
    workflow: child
    input: {x: "{{ state.amount }}"}
    output_key: child_result
  - {name: after, type: STANDARD, function: "tf_steps:noop"}
""")
    run_id = engine.start("parent", {"amount": 7})
    run = engine.get(run_id)
    assert run.status is Status.COMPLETED
    assert run.state["child_result"] == {"x": 7, "total": 7}
    child = next(r for r in engine.list_runs() if r.run_id != run_id)
    assert child.parent_run_id == run_id and child.status is Status.COMPLETED


def test_sub_workflow__child_failure_fails_the_parent_step(engine, register):
    register(FAILING_CHILD)
    register("""
workflow_type: parent
version: 1
steps:
  - {name: call, type: SUB_WORKFLOW, workflow: child}
""")
    run = engine.get(engine.start("parent", {}))
    assert run.status is Status.FAILED and "ended FAILED" in run.error["message"]


def test_fire_and_forget__starts_an_independent_child(engine, register):
    register(CHILD)
    register("""
workflow_type: parent
version: 1
steps:
  - {name: spawn, type: FIRE_AND_FORGET, workflow: child, output_key: child_id}
  - {name: after, type: STANDARD, function: "tf_steps:noop"}
""")
    run_id = engine.start("parent", {"x": 3})
    run = engine.get(run_id)
    assert run.status is Status.COMPLETED
    child = engine.get(run.state["child_id"])
    assert child.status is Status.COMPLETED and child.state["total"] == 3
    assert child.parent_run_id == run_id and child.parent_step is None


def test_step_timeout__an_attempt_past_timeout_s_fails_with_step_timeout(engine, register):
    register("""
workflow_type: slow
version: 1
steps:
  - {name: hang, type: STANDARD, function: "tf_steps:blocks", timeout_s: 0.05}
""")
    run = engine.get(engine.start("slow", {}))
    assert run.status is Status.FAILED and run.error["code"] == "step_timeout"


def test_step__unexpected_exception_is_recorded_not_raised(engine, register):
    register("""
workflow_type: buggy
version: 1
steps:
  - {name: bug, type: STANDARD, function: "tf_steps:boom"}
""")
    run = engine.get(engine.start("buggy", {}))
    assert run.status is Status.FAILED
    assert run.error == {
        "type": "RuntimeError",
        "code": "step_failed",
        "message": "unexpected bug in step code",
        "step": "bug",
    }


def test_ctx_input__is_the_run_input(engine, register):
    register("""
workflow_type: inp
version: 1
steps:
  - {name: read, type: STANDARD, function: "tf_steps:read_input"}
""")
    run = engine.get(engine.start("inp", {"k": "v"}))
    assert run.state["saw_input"] == {"k": "v"}


TYPED_BAD_OUTPUT = """
workflow_type: typed_bad
version: 1
state_model: "tf_steps:PaymentState"
steps:
  - {name: leak, type: STANDARD, function: "tf_steps:returns_bad_amount"}
"""


def test_state_model__a_bad_output_fails_the_step_naming_the_field_not_its_value(engine, register):
    """The failure text is stored in the run's error and logged: a value quoted there
    could be card data a step got wrong (issue 10 §2)."""
    register(TYPED_BAD_OUTPUT)
    run = engine.get(engine.start("typed_bad", {"amount": 100}))
    assert run.status is Status.FAILED
    assert "amount" in run.error["message"]
    assert "4111111111111111" not in str(run.error)
