"""The documents service's pure parts: which assignment a device follows (device >
store > group > fleet), what a scope's value may be, and a refused document naming
its field as a path in the request."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cloud.documents import scope
from cloud.documents.errors import DocumentInvalid
from cloud.documents.validate import validate

HERE = scope.Place(device_id="dev_1", store="s-1", group="g-1")


@dataclass(frozen=True)
class A:
    scope: str
    value: str
    version: int


FLEET = A("fleet", "", 1)
GROUP = A("group", "g-1", 2)
STORE = A("store", "s-1", 3)
DEVICE = A("device", "dev_1", 4)


def test_effective__the_most_specific_assignment_wins_whatever_the_order():
    every = [FLEET, GROUP, STORE, DEVICE]
    for order in (every, every[::-1], [STORE, FLEET, DEVICE, GROUP]):
        assert scope.effective(order, HERE) == DEVICE
    assert scope.effective([FLEET, GROUP, STORE], HERE) == STORE
    assert scope.effective([GROUP, FLEET], HERE) == GROUP
    assert scope.effective([FLEET], HERE) == FLEET
    assert scope.effective([], HERE) is None


def test_effective__assignments_naming_another_device_store_or_group_do_not_apply():
    others = [A("device", "dev_2", 9), A("store", "s-2", 8), A("group", "g-2", 7)]
    assert scope.effective(others, HERE) is None
    assert scope.effective([*others, FLEET], HERE) == FLEET


def test_effective__a_device_without_a_group_matches_no_group():
    loner = scope.Place(device_id="dev_1", store="s-1", group=None)
    assert scope.effective([A("group", "", 5), GROUP, FLEET], loner) == FLEET
    assert not scope.applies("group", "", loner)


def test_effective__values_match_exactly_not_by_pattern():
    tricky = [A("store", "s-%", 1), A("store", "S-1", 2), A("store", "s-1 ", 3)]
    assert scope.effective(tricky, HERE) is None


def test_precedence__device_store_group_fleet():
    assert scope.PRECEDENCE == ("device", "store", "group", "fleet")
    assert [scope.rank(s) for s in scope.PRECEDENCE] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("where", "value", "normal"),
    [("fleet", None, ""), ("fleet", "", ""), ("group", "g-1", "g-1"), ("device", "d", "d")],
)
def test_normal_value__fleet_takes_none_the_others_one(where, value, normal):
    assert scope.normal_value(where, value) == normal


@pytest.mark.parametrize(
    ("where", "value", "says"),
    [
        ("fleet", "x", "names no value"),
        ("store", None, "names the store"),
        ("group", "", "names the group"),
        ("device", "d" * 201, "at most 200"),
        ("region", "eu", "unknown scope"),
    ],
)
def test_normal_value__refusals_say_what_is_wrong(where, value, says):
    with pytest.raises(ValueError, match=says):
        scope.normal_value(where, value)


# --- validation with the terminal's models --------------------------------------------------


def fields(kind, content):
    with pytest.raises(DocumentInvalid) as exc:
        validate(kind, content)
    return [f for f, _ in exc.value.problems], exc.value


def test_validate__a_config_is_the_terminals_config_document_defaults_kept_out():
    assert validate("config", {"risk": {"floor_limit_minor": 3000}}) == {
        "risk": {"floor_limit_minor": 3000}
    }
    assert validate("config", {}) == {"risk": {}}


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"risk": {"floor_limit_minor": -1}}, "content.risk.floor_limit_minor"),
        ({"risk": {"flor_limit_minor": 1}}, "content.risk.flor_limit_minor"),
        ({"risk": {"online_random_percent": 101}}, "content.risk.online_random_percent"),
        ({"rsk": {}}, "content.rsk"),
        ({"risk": "high"}, "content.risk"),
    ],
)
def test_validate__a_bad_config_names_its_field(content, field):
    found, exc = fields("config", content)
    assert found == [field] and exc.field == field and field in exc.message


POLICY = {
    "version": 3,
    "rules": [
        {"id": "big", "type": "amount_over", "max_minor": 100_000, "action": "online"},
        {"id": "bins", "type": "bin_block", "bins": ["411111"]},
    ],
}


def test_validate__a_policy_comes_back_as_the_terminal_reads_it():
    out = validate("policy", POLICY)
    assert out["version"] == 3 and out["name"] == "default"
    assert out["rules"][1]["action"] == "decline"  # the model's default, written out


def test_validate__a_bad_policy_names_the_rule_and_field_without_the_union_tag():
    bad = {**POLICY, "rules": [{**POLICY["rules"][0], "max_minor": -5}, POLICY["rules"][1]]}
    assert fields("policy", bad)[0] == ["content.rules[0].max_minor"]
    typo = {**POLICY, "rules": [{"id": "x", "type": "amount_ovr"}]}
    assert fields("policy", typo)[0] == ["content.rules[0].type"]
    twice = {**POLICY, "rules": [POLICY["rules"][0], POLICY["rules"][0]]}
    assert fields("policy", twice)[0] == ["content.rules[1].id"]
    assert fields("policy", {"rules": []})[0] == ["content.version"]


def test_validate__text_the_database_cannot_hold_and_non_objects_are_refused():
    assert fields("policy", {**POLICY, "name": "a\x00b"})[0] == ["content"]
    assert fields("config", ["risk"])[0] == ["content"]
