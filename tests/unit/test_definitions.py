"""Loading workflow YAML: every problem is reported at once, each located by file, line,
step and field; what loads is pinned by a content hash that survives a snapshot."""

from __future__ import annotations

import textwrap

import pytest
from wf_problems import FN, HEAD, line_of, load_bad, load_ok, the_problem, where, yaml_text

from edge.engine.loader import load_file
from edge.errors import DefinitionError

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
