"""Loading workflow YAML: every problem is reported at once, each located by file, line,
step and field; what loads is pinned by a content hash that survives a snapshot."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import edge.examples
import edge.examples.steps
from edge.engine.loader import Workflow, load_file, load_snapshot, load_text
from edge.errors import DefinitionError, Problem

PAYMENT = Path(edge.examples.__file__).parent / "payment.yaml"
FN = "edge.examples.steps:validate"
HEAD = "workflow_type: t\nversion: 1\n"


def yaml_text(body: str) -> str:
    return textwrap.dedent(body).lstrip("\n")


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line containing ``needle``."""
    hits = [i for i, ln in enumerate(text.splitlines(), start=1) if needle in ln]
    assert len(hits) >= nth, f"{needle!r} occurs {len(hits)} time(s) in the fixture"
    return hits[nth - 1]


def load_bad(tmp_path: Path, text: str) -> tuple[str, list[Problem]]:
    path = tmp_path / "wf.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DefinitionError) as info:
        load_file(path)
    return str(path), info.value.problems


def the_problem(tmp_path: Path, text: str) -> tuple[str, Problem]:
    file, problems = load_bad(tmp_path, text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return file, problems[0]


def where(p: Problem) -> tuple[str, int | None, str | None, str | None]:
    return (p.file, p.line, p.step, p.field)


def load_ok(tmp_path: Path, text: str) -> Workflow:
    path = tmp_path / "ok.yaml"
    path.write_text(text, encoding="utf-8")
    return load_file(path)


# --- unknown keys ------------------------------------------------------------------------


def test_validate__unknown_top_level_key_names_file_line_and_field_with_a_hint(tmp_path):
    text = HEAD + yaml_text(f"""
        stepz: []
        steps:
          - name: a
            type: STANDARD
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "stepz:"), None, "stepz")
    assert p.message == "unknown field 'stepz'; did you mean 'steps'?"


def test_validate__unknown_key_far_from_every_field_gets_no_hint(tmp_path):
    text = HEAD + yaml_text(f"""
        colour: blue
        steps:
          - name: a
            type: STANDARD
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "colour:"), None, "colour")
    assert p.message == "unknown field 'colour'"


def test_validate__unknown_step_key_names_file_line_step_and_field_with_a_hint(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: first
            type: STANDARD
            function: {FN}
          - name: charge
            type: STANDARD
            function: {FN}
            outptu_key: result
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "outptu_key"), "charge", "outptu_key")
    assert p.message == "unknown field 'outptu_key'; did you mean 'output_key'?"


def test_validate__unknown_key_in_retry_names_the_step_and_suggests_a_retry_field(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: charge
            type: STANDARD
            function: {FN}
            retry:
              max_attempts: 3
              max_atempts: 2
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "max_atempts"), "charge", "max_atempts")
    assert p.message == "unknown field 'max_atempts'; did you mean 'max_attempts'?"


def test_validate__unknown_key_in_a_loop_body_step_names_the_inner_step(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: each
            type: LOOP
            mode: ITERATE
            over: state.items
            max_iterations: 3
            body:
              - name: inner
                type: STANDARD
                function: {FN}
                timeout: 5
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "timeout:"), "inner", "timeout")
    assert p.message == "unknown field 'timeout'; did you mean 'timeout_s'?"


@pytest.mark.parametrize(
    ("snippet", "typo", "hint"),
    [
        pytest.param(
            """
            - name: d
              type: DECISION
              routes:
                - when: state.x > 1
                  nxt: END
                  next: END
              default: END
            """,
            "nxt",
            "next",
            id="route",
        ),
        pytest.param(
            f"""
            - name: d
              type: PARALLEL
              tasks:
                - name: a
                  function: {FN}
                  functon: {FN}
            """,
            "functon",
            "function",
            id="task",
        ),
    ],
)
def test_validate__unknown_key_in_a_route_or_task_suggests_a_field_of_that_mapping(
    tmp_path, snippet, typo, hint
):
    text = HEAD + "steps:\n" + textwrap.indent(yaml_text(snippet), "  ")
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, f"{typo}:"), "d", typo)
    assert p.message == f"unknown field '{typo}'; did you mean '{hint}'?"


def test_validate__duplicate_key_in_a_step_names_the_step(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: charge
            type: STANDARD
            function: {FN}
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "function:", nth=2), "charge", "function")
    assert p.message == "key appears twice"


# --- shapes ------------------------------------------------------------------------------


def test_validate__missing_required_field_points_at_the_step(tmp_path):
    text = HEAD + yaml_text("""
        steps:
          - name: charge
            type: STANDARD
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "- name: charge"), "charge", "function")
    assert p.message == "required field is missing"


def test_validate__missing_step_type_lists_the_valid_types(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: charge
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "- name: charge"), "charge", "type")
    assert p.message.startswith("step type must be one of STANDARD, DECISION, LOOP")


def test_validate__unknown_step_type_points_at_the_type_line_and_lists_the_valid_types(
    tmp_path,
):
    text = HEAD + yaml_text(f"""
        steps:
          - name: charge
            type: STANDART
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "type: STANDART"), "charge", "type")
    assert p.message == (
        "step type must be one of STANDARD, DECISION, LOOP, PARALLEL, HTTP, WAIT, "
        "SUB_WORKFLOW, FIRE_AND_FORGET"
    )


def test_validate__unknown_step_type_does_not_hide_the_bad_jump_targets_of_that_step(tmp_path):
    text = HEAD + yaml_text("""
        steps:
          - name: route
            type: DECISON
            next: nowhere
            routes:
              - when: state.amount > 0
                next: recipt
            default: nowhre
          - name: hold
            type: WAT
            timeout_s: 5
            on_timeout: gone
          - name: each
            type: LOOPP
            mode: ITERATE
            over: state.items
            body:
              - name: inner
                type: STANDARD
                function: edge.examples.steps:validate
                next: outside
          - name: receipt
            type: STANDARD
            function: edge.examples.steps:validate
        """)
    file, problems = load_bad(tmp_path, text)
    got = {where(p) for p in problems}
    line = lambda needle: line_of(text, needle)  # noqa: E731
    assert got == {
        (file, line("type: DECISON"), "route", "type"),
        (file, line("next: nowhere"), "route", "next"),
        (file, line("next: recipt"), "route", "routes[0].next"),
        (file, line("default: nowhre"), "route", "default"),
        (file, line("type: WAT"), "hold", "type"),
        (file, line("on_timeout: gone"), "hold", "on_timeout"),
        (file, line("type: LOOPP"), "each", "type"),
        (file, line("next: outside"), "inner", "next"),
    }, "\n".join(map(str, problems))
    [recipt] = [p for p in problems if p.field == "routes[0].next"]
    assert recipt.message.startswith("unknown step 'recipt'; did you mean 'receipt'?")


def test_validate__missing_step_type_does_not_hide_a_bad_route_target(tmp_path):
    text = HEAD + yaml_text("""
        steps:
          - name: route
            routes:
              - when: state.amount > 0
                next: nowhere
            default: END
        """)
    file, problems = load_bad(tmp_path, text)
    assert {where(p) for p in problems} == {
        (file, line_of(text, "- name: route"), "route", "type"),
        (file, line_of(text, "next: nowhere"), "route", "routes[0].next"),
    }


def test_validate__bad_value_names_the_line_of_its_key(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: charge
            type: STANDARD
            function: {FN}
            retry:
              max_attempts: 0
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "max_attempts: 0"), "charge", "max_attempts")
    assert "greater than or equal to 1" in p.message


# --- jump targets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("snippet", "bad", "field"),
    [
        pytest.param(
            """
            - name: route
              type: DECISION
              routes:
                - when: state.amount > 0
                  next: nowhere
              default: END
            """,
            "nowhere",
            "routes[0].next",
            id="decision-route-next",
        ),
        pytest.param(
            """
            - name: route
              type: DECISION
              routes:
                - when: state.amount > 0
                  next: END
              default: nowhere
            """,
            "nowhere",
            "default",
            id="decision-default",
        ),
        pytest.param(
            f"""
            - name: route
              type: STANDARD
              function: {FN}
              next: nowhere
            """,
            "nowhere",
            "next",
            id="step-next",
        ),
        pytest.param(
            """
            - name: route
              type: WAIT
              timeout_s: 5
              on_timeout: nowhere
            """,
            "nowhere",
            "on_timeout",
            id="wait-on-timeout",
        ),
    ],
)
def test_validate__unknown_jump_target_names_file_line_step_and_field(
    tmp_path, snippet, bad, field
):
    text = HEAD + "steps:\n" + textwrap.indent(yaml_text(snippet), "  ")
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, f": {bad}"), "route", field)
    assert p.message == f"unknown step '{bad}' (targets must be in the same sequence, or END)"


def test_validate__unknown_jump_target_suggests_a_close_step_name(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: start
            type: STANDARD
            function: {FN}
            next: reserv
          - name: reserve
            type: STANDARD
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "next: reserv"), "start", "next")
    assert "did you mean 'reserve'?" in p.message


def test_validate__END_and_steps_of_the_same_sequence_are_valid_targets(tmp_path):
    wf = load_ok(
        tmp_path,
        HEAD
        + yaml_text(f"""
        steps:
          - name: route
            type: DECISION
            routes:
              - when: state.amount > 0
                next: later
            default: END
          - name: pin
            type: WAIT
            timeout_s: 5
            on_timeout: END
          - name: later
            type: STANDARD
            function: {FN}
            next: END
        """),
    )
    assert wf.sequences[None] == ["route", "pin", "later"]


def test_validate__a_top_level_step_cannot_jump_into_a_loop_body(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: start
            type: STANDARD
            function: {FN}
            next: inner
          - name: each
            type: LOOP
            mode: WHILE
            while: state.n < 3
            max_iterations: 3
            body:
              - name: inner
                type: STANDARD
                function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "next: inner"), "start", "next")
    assert p.message.startswith("unknown step 'inner'")


def test_validate__a_loop_body_step_cannot_jump_out_to_a_top_level_step(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: each
            type: LOOP
            mode: WHILE
            while: state.n < 3
            max_iterations: 3
            body:
              - name: inner
                type: STANDARD
                function: {FN}
                next: after
          - name: after
            type: STANDARD
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "next: after"), "inner", "next")
    assert p.message.startswith("unknown step 'after'")


# --- names -------------------------------------------------------------------------------


def test_validate__duplicate_step_name_reports_the_second_with_the_first_line(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: charge
            type: STANDARD
            function: {FN}
          - name: charge
            type: STANDARD
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    first, second = line_of(text, "name: charge"), line_of(text, "name: charge", nth=2)
    assert where(p) == (file, second, "charge", "name")
    assert p.message == f"duplicate step name (first at line {first})"


def test_validate__duplicate_step_name_inside_a_loop_body_is_reported(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: charge
            type: STANDARD
            function: {FN}
          - name: each
            type: LOOP
            mode: ITERATE
            over: state.items
            max_iterations: 3
            body:
              - name: charge
                type: STANDARD
                function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    first, second = line_of(text, "name: charge"), line_of(text, "name: charge", nth=2)
    assert where(p) == (file, second, "charge", "name")
    assert p.message == f"duplicate step name (first at line {first})"


def test_validate__END_is_reserved_as_a_step_name(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: END
            type: STANDARD
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "name: END"), "END", "name")
    assert p.message == "'END' is reserved"


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


# --- the file itself ---------------------------------------------------------------------


def test_validate__yaml_syntax_error_reports_the_line_it_was_found_on(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: a
             type: STANDARD
            function: {FN}
        """)
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, line_of(text, "type: STANDARD"), None, None)
    assert p.message.startswith("not valid YAML: mapping values are not allowed here")


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comment"]
)
def test_validate__empty_file_is_one_problem(tmp_path, text):
    file, p = the_problem(tmp_path, text)
    assert where(p) == (file, 1, None, None)
    assert p.message == "the file is empty"


def test_validate__a_document_that_is_not_a_mapping_is_one_problem(tmp_path):
    file, p = the_problem(tmp_path, "- name: a\n- name: b\n")
    assert where(p) == (file, 1, None, None)
    assert p.message == "a workflow must be a YAML mapping"


def test_validate__unreadable_file_is_one_problem_without_a_line(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(DefinitionError) as info:
        load_file(missing)
    [p] = info.value.problems
    assert where(p) == (str(missing), None, None, None)
    assert p.message.startswith("cannot read:")


def test_validate__every_problem_in_a_file_is_reported_at_once(tmp_path):
    text = HEAD + yaml_text("""
        colour: blue
        steps:
          - name: charge
            type: STANDARD
            function: tillflow_no_such_module:charge
            next: reciept
          - name: charge
            type: WAIT
            on_timeout: END
          - name: print
            type: BOGUS
          - name: route
            type: DECISION
            routes:
              - when: state.f()
                next: END
            default: END
        """)
    file, problems = load_bad(tmp_path, text)
    got = {where(p): p.message for p in problems}
    assert len(problems) == 7, "\n".join(map(str, problems))
    line = lambda needle, nth=1: line_of(text, needle, nth)  # noqa: E731
    assert set(got) == {
        (file, line("colour:"), None, "colour"),
        (file, line("function: tillflow_no_such"), "charge", "function"),
        (file, line("next: reciept"), "charge", "next"),
        (file, line("name: charge", 2), "charge", "name"),
        (file, line("on_timeout:"), "charge", "on_timeout"),
        (file, line("type: BOGUS"), "print", "type"),
        (file, line("when: state.f()"), "route", "routes[0].when"),
    }
    assert got[(file, line("name: charge", 2), "charge", "name")] == (
        f"duplicate step name (first at line {line('name: charge')})"
    )
    assert got[(file, line("on_timeout:"), "charge", "on_timeout")] == "needs timeout_s"


def test_validate__error_message_lists_every_problem_with_file_and_line(tmp_path):
    text = HEAD + yaml_text(f"""
        steps:
          - name: a
            type: STANDARD
            function: {FN}
            next: b
            retry: {{max_attempts: 3, backof: 1}}
        """)
    file, problems = load_bad(tmp_path, text)
    assert len(problems) == 2
    with pytest.raises(DefinitionError) as info:
        load_file(file)
    message = str(info.value)
    assert message.startswith("2 problems in workflow definition:")
    assert f"{file}:{line_of(text, 'next: b')}, step 'a', field 'next'" in message
    assert f"{file}:{line_of(text, 'backof')}, step 'a', field 'backof'" in message


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
