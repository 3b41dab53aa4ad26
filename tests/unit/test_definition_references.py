"""Loading workflow YAML, the references in it: functions, compensations, tasks and models
that must import; expressions and templates inside the safe subset; loop and wait
options that belong together. Each problem located by file, line, step and field."""

from __future__ import annotations

import textwrap

import pytest
from wf_problems import FN, HEAD, line_of, load_ok, the_problem, where, yaml_text

import edge.examples.steps

# --- imports -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param(
            "tillflow_no_such_module:charge",
            "cannot import module 'tillflow_no_such_module' for "
            "'tillflow_no_such_module:charge': ModuleNotFoundError",
            id="missing-module",
        ),
        pytest.param(
            "edge.examples.steps:no_such_step",
            "module 'edge.examples.steps' has no attribute 'no_such_step'",
            id="missing-attribute",
        ),
        pytest.param(
            "edge.examples.steps:ACQUIRER",
            "'edge.examples.steps:ACQUIRER' is not a function",
            id="not-callable",
        ),
        pytest.param(
            "edge.errors:StepError",
            "'edge.errors:StepError' is not a function",
            id="a-class",
        ),
        pytest.param(
            "validate", "'validate' is not an import path (write it as pkg.module:name)", id="bare"
        ),
    ],
)
def test_validate__unimportable_function_names_the_step_field_and_why(tmp_path, path, message):
    text = HEAD + yaml_text(f"""
        steps:
          - name: charge
            type: STANDARD
            function: {path}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "function:"), "charge", "function")
    assert message in p.message


def test_validate__unimportable_compensation_names_the_compensate_field(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: charge
            type: STANDARD
            function: {FN}
            compensate: edge.examples.steps:refund_everything
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "compensate:"), "charge", "compensate")
    assert "has no attribute 'refund_everything'" in p.message


def test_validate__unimportable_parallel_task_names_the_task_field(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: lookups
            type: PARALLEL
            tasks:
              - name: stock
                function: {FN}
              - name: tax
                function: edge.examples.steps:no_tax
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "no_tax"), "lookups", "tasks[1].function")
    assert "has no attribute 'no_tax'" in p.message


@pytest.mark.parametrize(
    ("model", "message"),
    [
        pytest.param(
            "edge.examples.steps:ACQUIRER",
            "'edge.examples.steps:ACQUIRER' is not a pydantic model class",
            id="a-dict",
        ),
        pytest.param(
            "edge.errors:Problem",
            "'edge.errors:Problem' is not a pydantic model class",
            id="a-dataclass",
        ),
        pytest.param(
            "edge.examples.steps:PaymentState",
            "has no attribute 'PaymentState'",
            id="missing",
        ),
    ],
)
def test_validate__state_model_must_be_a_pydantic_model(tmp_path, model, message):
    text = HEAD + yaml_text(f"""
        state_model: {model}
        steps:
          - name: a
            type: STANDARD
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "state_model:"), None, "state_model")
    assert message in p.message


def test_validate__wait_input_schema_must_be_a_pydantic_model(tmp_path):
    text = HEAD + yaml_text("""
        steps:
          - name: pin
            type: WAIT
            input_schema: edge.examples.steps:validate
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "input_schema:"), "pin", "input_schema")
    assert p.message == "'edge.examples.steps:validate' is not a pydantic model class"


def test_validate__a_pydantic_state_model_is_resolved(tmp_path):
    from edge.engine.definition import RetryPolicy

    wf = load_ok(
        tmp_path,
        HEAD
        + yaml_text(f"""
        state_model: edge.engine.definition:RetryPolicy
        steps:
          - name: a
            type: STANDARD
            function: {FN}
        """),
    )
    assert wf.state_model is RetryPolicy


@pytest.mark.parametrize("path", [FN, "edge.examples.steps.validate"], ids=["colon", "dotted"])
def test_validate__colon_and_dotted_import_paths_resolve_to_the_same_function(tmp_path, path):
    wf = load_ok(
        tmp_path,
        HEAD
        + yaml_text(f"""
        steps:
          - name: a
            type: STANDARD
            function: {path}
        """),
    )
    assert wf.functions == {path: edge.examples.steps.validate}
    assert set(wf.fingerprints) == {path}


# --- expressions and templates -----------------------------------------------------------


def test_validate__call_in_a_route_condition_is_outside_the_safe_subset(tmp_path):
    text = HEAD + yaml_text("""
        steps:
          - name: route
            type: DECISION
            routes:
              - when: state.amount > 0
                next: END
              - when: "__import__('os')"
                next: END
            default: END
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "__import__"), "route", "routes[1].when")
    assert p.message.startswith("function calls are not allowed")


@pytest.mark.parametrize(
    ("mode", "field", "expr", "message"),
    [
        pytest.param("WHILE", "while", "state.f()", "function calls are not allowed", id="while"),
        pytest.param(
            "ITERATE",
            "over",
            "state.items.__class__",
            "private attribute '__class__' is not allowed",
            id="over",
        ),
    ],
)
def test_validate__loop_expression_outside_the_safe_subset_names_its_field(
    tmp_path, mode, field, expr, message
):
    text = HEAD + yaml_text(f"""
        steps:
          - name: each
            type: LOOP
            mode: {mode}
            {field}: {expr}
            max_iterations: 3
            body:
              - name: inner
                type: STANDARD
                function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, f"{field}: {expr}"), "each", field)
    assert p.message.startswith(message)


@pytest.mark.parametrize(
    ("snippet", "needle", "field", "message"),
    [
        pytest.param(
            """
            - name: call
              type: HTTP
              url: "https://acquirer.test/{{ os.environ }}"
            """,
            "url:",
            "url",
            "{{ os.environ }}: a placeholder must start with 'state' or 'input'",
            id="http-url-root",
        ),
        pytest.param(
            """
            - name: call
              type: HTTP
              url: https://acquirer.test/
              headers:
                Authorization: "Bearer {{ state.token"
            """,
            "headers:",
            "headers",
            "'{{' without a closing '}}'",
            id="http-header-unclosed",
        ),
        pytest.param(
            """
            - name: call
              type: HTTP
              method: POST
              url: https://acquirer.test/
              body:
                amount: "{{ state.amount * 100 }}"
            """,
            "body:",
            "body",
            "only .name segments",
            id="http-body-expression",
        ),
        pytest.param(
            """
            - name: call
              type: SUB_WORKFLOW
              workflow: settle
              input:
                who: "{{ state.name | upper }}"
            """,
            "input:",
            "input",
            "no filters or expressions",
            id="sub-workflow-filter",
        ),
        pytest.param(
            """
            - name: call
              type: FIRE_AND_FORGET
              workflow: notify
              input:
                who: "{{ state._secret }}"
            """,
            "input:",
            "input",
            "not starting with '_'",
            id="fire-and-forget-private",
        ),
    ],
)
def test_validate__template_with_a_bad_placeholder_names_its_field(
    tmp_path, snippet, needle, field, message
):
    text = HEAD + "steps:\n" + textwrap.indent(yaml_text(snippet), "  ")
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, needle), "call", field)
    assert message in p.message


# --- loops and waits ---------------------------------------------------------------------


def test_validate__iterate_loop_without_over_is_reported_on_its_mode(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: each
            type: LOOP
            mode: ITERATE
            max_iterations: 3
            body:
              - name: inner
                type: STANDARD
                function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "mode: ITERATE"), "each", "over")
    assert p.message == "ITERATE needs 'over' (e.g. state.items)"


def test_validate__while_loop_without_while_is_reported_on_its_mode(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: poll
            type: LOOP
            mode: WHILE
            max_iterations: 3
            body:
              - name: inner
                type: STANDARD
                function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "mode: WHILE"), "poll", "while")
    assert p.message == "WHILE needs a 'while' expression"


def test_validate__iterate_loop_with_a_while_condition_is_reported(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: each
            type: LOOP
            mode: ITERATE
            over: state.items
            while: state.n < 3
            max_iterations: 3
            body:
              - name: inner
                type: STANDARD
                function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "while:"), "each", "while")
    assert p.message == "'while' is for mode WHILE"


def test_validate__on_timeout_without_timeout_s_is_reported(tmp_path):
    text = HEAD + yaml_text("""
        steps:
          - name: pin
            type: WAIT
            on_timeout: END
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "on_timeout:"), "pin", "on_timeout")
    assert p.message == "needs timeout_s"
