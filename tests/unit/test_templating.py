"""``{{ state.x }}`` templates: substitution, raw values, and load-time checks."""

from __future__ import annotations

import copy
import dataclasses
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from edge.engine.templating import check_template, render
from edge.errors import ExpressionError


class Card(BaseModel):
    last4: str
    brand: str | None = None


class Item(BaseModel):
    sku: str
    qty: int


class PaymentState(BaseModel):
    payment_id: str
    amount: int
    approved: bool
    note: str | None = None
    card: Card
    items: list[Item]
    meta: dict[str, list[int]]


MODEL_STATE = PaymentState(
    payment_id="p-1",
    amount=1250,
    approved=True,
    card=Card(last4="4242"),
    items=[Item(sku="A1", qty=2), Item(sku="B2", qty=1)],
    meta={"ids": [1, 2]},
)
DICT_STATE = MODEL_STATE.model_dump()
INPUT = {"tip": 150, "lines": [{"sku": "Z9"}]}


@pytest.fixture(params=["dict", "model"])
def state(request: pytest.FixtureRequest) -> object:
    return DICT_STATE if request.param == "dict" else MODEL_STATE


# --- a string that is exactly one placeholder keeps the value's type -------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ state.amount }}", 1250),
        ("{{state.amount}}", 1250),
        ("  {{ state.amount }}\n", 1250),
        ("{{ state.approved }}", True),
        ("{{ state.note }}", None),
        ("{{ state.card.last4 }}", "4242"),
        ("{{ state.items[0].sku }}", "A1"),
        ("{{ state.items[-1].qty }}", 1),
        ("{{ state.meta.ids }}", [1, 2]),
        ("{{ state.meta }}", {"ids": [1, 2]}),
        ("{{ input.tip }}", 150),
        ("{{ input.lines[0].sku }}", "Z9"),
        ("{{ input }}", INPUT),
    ],
)
def test_render__lone_placeholder_returns_raw_value(
    template: str, expected: object, state: object
) -> None:
    result = render(template, state, INPUT)
    assert result == expected
    assert type(result) is type(expected)


def test_render__lone_placeholder_returns_the_object_itself() -> None:
    assert render("{{ state.card }}", MODEL_STATE) is MODEL_STATE.card
    assert render("{{ state }}", DICT_STATE) is DICT_STATE


# --- placeholders within text are formatted -------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("/payments/{{ state.payment_id }}/capture", "/payments/p-1/capture"),
        ("{{ state.amount }}{{ input.tip }}", "1250150"),
        ("{{ state.amount }} {{ state.amount }}", "1250 1250"),
        ("note=[{{ state.note }}]", "note=[]"),
        ("ok={{ state.approved }}", "ok=True"),
        ("ids={{ state.meta.ids }}", "ids=[1,2]"),
        ("meta={{ state.meta }}", 'meta={"ids":[1,2]}'),
        ("card {{ state.card.last4 }}", "card 4242"),
        ('{"amount": {{ state.amount }}}', '{"amount": 1250}'),
        ('{"a": {"b": 1}}', '{"a": {"b": 1}}'),
        ("no placeholders }} here", "no placeholders }} here"),
        ("", ""),
    ],
)
def test_render__placeholders_in_text_are_formatted(
    template: str, expected: str, state: object
) -> None:
    assert render(template, state, INPUT) == expected


def test_render__pydantic_values_in_text_become_json() -> None:
    assert render("card={{ state.card }}", MODEL_STATE) == 'card={"last4":"4242","brand":null}'
    state = {"lines": [Item(sku="A1", qty=2)], "total": Decimal("12.50")}
    assert render("{{ state.lines }}", state) == state["lines"]
    assert render("x{{ state.lines }}", state) == 'x[{"sku":"A1","qty":2}]'
    assert render("t={{ state.total }}", state) == "t=12.50"


def test_render__reads_plain_objects_by_attribute() -> None:
    @dataclasses.dataclass
    class Terminal:
        serial: str

    assert render("/t/{{ state.terminal.serial }}", {"terminal": Terminal("T-9")}) == "/t/T-9"


# --- structure ------------------------------------------------------------------------


def test_render__recurses_into_dict_keys_values_and_lists(state: object) -> None:
    template = {
        "url": "/p/{{ state.payment_id }}",
        "X-{{ state.card.last4 }}": "{{ state.amount }}",
        "{{ state.amount }}": ["{{ state.items[1].sku }}", {"nested": "{{ input.tip }}"}, 7],
        "plain": None,
    }
    assert render(template, state, INPUT) == {
        "url": "/p/p-1",
        "X-4242": 1250,
        "1250": ["B2", {"nested": 150}, 7],
        "plain": None,
    }


def test_render__does_not_change_the_template() -> None:
    template = {"a": ["{{ state.amount }}"], "{{ state.payment_id }}": "x"}
    before = copy.deepcopy(template)
    render(template, DICT_STATE)
    assert template == before


@pytest.mark.parametrize("value", [5, 1.5, True, None, ("{{ state.amount }}",), b"{{ x }}"])
def test_render__other_types_are_returned_unchanged(value: object) -> None:
    assert render(value, DICT_STATE) is value


# --- missing values are errors, naming the placeholder ---------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ state.missing }}", "{{ state.missing }}: 'missing' not found in state"),
        ("{{state.missing}}", "{{ state.missing }}: 'missing' not found in state"),
        ("/x/{{ state.card.cvv }}", "{{ state.card.cvv }}: 'cvv' not found in state.card"),
        (
            "{{ state.items[5].sku }}",
            "{{ state.items[5].sku }}: index 5 not found in state.items",
        ),
        (
            "{{ state.note.text }}",
            "{{ state.note.text }}: 'text' not found in state.note",
        ),
        ("{{ input.tip }}", "{{ input.tip }}: 'tip' not found in input"),
        (
            "{{ state.payment_id.upper }}",
            "{{ state.payment_id.upper }}: 'upper' not found in state.payment_id",
        ),
    ],
)
def test_render__missing_path_raises_naming_the_placeholder(
    template: str, message: str, state: object
) -> None:
    with pytest.raises(ExpressionError) as caught:
        render({"body": [template]}, state)
    assert caught.value.message == message


# --- load-time checks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        None,
        42,
        "plain text",
        "{{ state.a.b[0][-2].c }}",
        "{{input}}",
        {"k": ["{{ state.x }}", 3], "{{ input.y }}": None},
        '{"json": {"nested": 1}}',
    ],
)
def test_check_template__valid_templates_have_no_problems(template: object) -> None:
    assert check_template(template) == []


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{{ foo }}", "{{ foo }}: a placeholder must start with 'state' or 'input'"),
        ("{{ os.environ }}", "must start with 'state' or 'input'"),
        ("{{ states.x }}", "must start with 'state' or 'input'"),
        ("{{ }}", "must start with 'state' or 'input'"),
        ("{{ state.x | upper }}", "no filters or expressions"),
        ("{{ state.x + 1 }}", "no filters or expressions"),
        ("{{ state.items[i] }}", "[integer] indexes"),
        ("{{ state['x'] }}", "[integer] indexes"),
        ("{{ state._secret }}", "not starting with '_'"),
        ("{{ state.__class__ }}", "not starting with '_'"),
        ("{{ state.f() }}", "no filters or expressions"),
        ("{{ state . x }}", "no filters or expressions"),
        ("id={{ state.x", "'{{' without a closing '}}'"),
        ("{{ state.x }} {{", "'{{' without a closing '}}'"),
    ],
)
def test_check_template__bad_placeholder_is_reported(template: str, problem: str) -> None:
    problems = check_template(template)
    assert len(problems) == 1
    assert problem in problems[0]
    with pytest.raises(ExpressionError) as caught:
        render(template, DICT_STATE)
    assert caught.value.message == problems[0]


def test_check_template__collects_every_problem_in_nested_templates() -> None:
    template = {"{{ bad_key }}": ["ok {{ state.x }}", "{{ nope }}"], "v": {"w": "{{ state.x"}}
    problems = check_template(template)
    assert len(problems) == 3
    assert any("{{ bad_key }}" in p for p in problems)
    assert any("{{ nope }}" in p for p in problems)
    assert any("without a closing" in p for p in problems)


# --- properties -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_property__any_text_is_checked_or_rendered_without_surprises(text: str) -> None:
    problems = check_template(text)
    assert all(isinstance(p, str) for p in problems)
    try:
        result = render(text, DICT_STATE, INPUT)
    except ExpressionError:
        return
    assert not problems
    if "{{" not in text:
        assert result == text


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_property__lone_placeholder_round_trips_any_value(value: object) -> None:
    state = {"v": value, "wrapped": [value]}
    assert render("{{ state.v }}", state) is value
    assert render(" {{ state.wrapped[0] }} ", state) is value
    assert render({"k": "{{ state.v }}"}, state) == {"k": value}
