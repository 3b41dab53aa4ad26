"""The fraud policy: rule semantics, validation, the compiled hot path against a plain
reference, and the on-disk repository's atomic activation and rollback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.errors import TillflowError
from edge.terminal.sale.policy import (
    NoPreviousPolicy,
    PolicyDecision,
    PolicyDocument,
    PolicyError,
    PolicyInputError,
    PolicyInvalid,
    PolicyRepository,
    PolicyStoreError,
    PolicyVersionConflict,
    Txn,
    compile_policy,
    load_policy_file,
)

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "edge/terminal/sale/policies/default.yaml"
HASH_A = "a" * 64
HASH_B = "b" * 64


def txn(**overrides: Any) -> Txn:
    """A transaction no rule in these tests matches unless told otherwise."""
    fields: dict[str, Any] = {
        "amount_minor": 1000,
        "currency": "EUR",
        "bin6": "411111",
        "pan_hash": HASH_A,
        "mcc": "5411",
        "local_minute": 12 * 60,
        "card_recent_count": 0,
    }
    fields.update(overrides)
    return Txn(**fields)


def policy(*rules: dict[str, Any], version: int = 1) -> PolicyDocument:
    return PolicyDocument.model_validate({"version": version, "rules": list(rules)})


def decide(rule: dict[str, Any], **overrides: Any) -> PolicyDecision:
    return compile_policy(policy(rule)).evaluate(txn(**overrides))


def write(path: Path, data: dict[str, Any] | str) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# --- each rule type ---------------------------------------------------------------------

AMOUNT = {"id": "big", "type": "amount_over", "max_minor": 50000, "action": "online"}
BLOCK = {"id": "bad-bins", "type": "bin_block", "bins": ["400000", "55555555"]}
ALLOW = {"id": "domestic", "type": "bin_allow", "bins": ["411111", "52000000"], "action": "review"}
VELOCITY = {"id": "burst", "type": "velocity", "max_count": 5, "window_s": 600, "action": "decline"}
NIGHT = {"id": "night", "type": "time_of_day", "start": "02:00", "end": "05:00", "action": "review"}
MCC = {"id": "gambling", "type": "mcc_block", "mccs": ["7995", "6051"], "action": "decline"}
HOT = {"id": "stolen", "type": "hot_list", "pan_hashes": [HASH_B]}

RULE_CASES = [
    # (rule, txn fields that match, txn fields that do not, action when matched)
    (AMOUNT, {"amount_minor": 50001}, {"amount_minor": 50000}, "online"),
    (BLOCK, {"bin6": "400000"}, {"bin6": "400001"}, "decline"),
    (ALLOW, {"bin6": "499999"}, {"bin6": "411111"}, "review"),
    (VELOCITY, {"card_recent_count": 5}, {"card_recent_count": 4}, "decline"),
    (NIGHT, {"local_minute": 2 * 60}, {"local_minute": 5 * 60}, "review"),
    (MCC, {"mcc": "6051"}, {"mcc": "5411"}, "decline"),
    (HOT, {"pan_hash": HASH_B}, {"pan_hash": HASH_A}, "decline"),
]


@pytest.mark.parametrize(
    ("rule", "matching", "other", "action"), RULE_CASES, ids=[c[0]["type"] for c in RULE_CASES]
)
def test_rule__matches_with_its_action_and_reason_and_not_otherwise(rule, matching, other, action):
    assert decide(rule, **matching) == PolicyDecision(action, (f"{rule['type']}:{rule['id']}",), 1)
    assert decide(rule, **other) == PolicyDecision("approve", (), 1)


def test_amount_over__with_a_currency_applies_to_that_currency_only():
    rule = {**AMOUNT, "currency": "USD"}
    assert decide(rule, amount_minor=60000, currency="USD").action == "online"
    assert decide(rule, amount_minor=60000, currency="EUR").action == "approve"


def test_amount_over__several_thresholds_match_every_one_passed():
    compiled = compile_policy(
        policy(
            {**AMOUNT, "id": "a", "max_minor": 100, "action": "online"},
            {**AMOUNT, "id": "b", "max_minor": 10000, "action": "decline"},
            {**AMOUNT, "id": "c", "max_minor": 500, "action": "review", "currency": "EUR"},
        )
    )
    assert compiled.evaluate(txn(amount_minor=600)).reasons == (
        "amount_over:a",
        "amount_over:c",
    )
    assert compiled.evaluate(txn(amount_minor=600, currency="GBP")).reasons == ("amount_over:a",)
    assert compiled.evaluate(txn(amount_minor=10001)).action == "decline"


def test_bin_block__prefixes_of_6_and_8_digits_match_the_leading_digits():
    rule = {"id": "b", "type": "bin_block", "bins": ["400000", "5555555", "52000001"]}
    assert decide(rule, bin6="400000").action == "decline"
    assert decide(rule, bin6="40000012").action == "decline"  # 8 given, 6-digit prefix
    assert decide(rule, bin6="52000001").action == "decline"  # 8-digit prefix
    assert decide(rule, bin6="55555559").action == "decline"  # 7-digit prefix
    assert decide(rule, bin6="52000002").action == "approve"
    assert decide(rule, bin6="520000").action == "approve"  # 6 given: an 8-digit rule can't tell


def test_bin_block__a_bin_matching_two_prefixes_of_one_rule_is_reported_once():
    rule = {"id": "b", "type": "bin_block", "bins": ["400000", "40000012"]}
    assert decide(rule, bin6="40000012").reasons == ("bin_block:b",)


def test_bin_allow__an_8_digit_entry_admits_only_that_bin():
    rule = {"id": "ok", "type": "bin_allow", "bins": ["52000001"], "action": "decline"}
    assert decide(rule, bin6="52000001").action == "approve"
    assert decide(rule, bin6="52000002").action == "decline"
    assert decide(rule, bin6="520000").action == "decline"


def test_velocity__max_count_earlier_payments_pass_and_the_next_one_matches():
    assert decide(VELOCITY, card_recent_count=0).action == "approve"
    assert decide(VELOCITY, card_recent_count=6).action == "decline"


def test_velocity__the_window_is_given_back_to_the_caller():
    assert compile_policy(policy(VELOCITY)).velocity_windows == (600,)
    assert compile_policy(policy(AMOUNT)).velocity_windows == ()


@pytest.mark.parametrize(
    ("minute", "matches"),
    [
        (22 * 60 - 1, False),
        (22 * 60, True),
        (23 * 60 + 59, True),
        (0, True),
        (119, True),
        (120, False),
        (12 * 60, False),
    ],
)
def test_time_of_day__a_window_wrapping_midnight_covers_both_sides(minute, matches):
    rule = {**NIGHT, "start": "22:00", "end": "02:00"}
    assert (decide(rule, local_minute=minute).action == "review") is matches


def test_time_of_day__an_end_of_midnight_runs_to_the_end_of_the_day():
    rule = {**NIGHT, "start": "23:00", "end": "00:00"}
    assert decide(rule, local_minute=23 * 60 + 59).action == "review"
    assert decide(rule, local_minute=0).action == "approve"


@pytest.mark.parametrize("minute", [-1, 1440])
def test_evaluate__rejects_a_local_minute_outside_the_day(minute):
    with pytest.raises(PolicyInputError) as err:
        decide(NIGHT, local_minute=minute)
    assert err.value.code == "policy_input_invalid"


def test_evaluate__the_strongest_action_wins_and_every_match_is_listed_in_document_order():
    compiled = compile_policy(policy(NIGHT, AMOUNT, MCC, HOT, VELOCITY, BLOCK, ALLOW))
    decision = compiled.evaluate(
        txn(amount_minor=90000, local_minute=3 * 60, mcc="7995", bin6="499999")
    )
    assert decision == PolicyDecision(
        "decline",
        ("time_of_day:night", "amount_over:big", "mcc_block:gambling", "bin_allow:domestic"),
        1,
    )
    online_and_review = compiled.evaluate(txn(amount_minor=90000, local_minute=3 * 60))
    assert online_and_review.action == "review"


def test_evaluate__an_empty_policy_approves_everything():
    assert compile_policy(policy(version=7)).evaluate(txn()) == PolicyDecision("approve", (), 7)


# --- validation -------------------------------------------------------------------------


def invalid(tmp_path: Path, data: dict[str, Any] | str, name: str = "p.yaml") -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as err:
        load_policy_file(write(tmp_path / name, data))
    assert err.value.code == "policy_invalid"
    assert isinstance(err.value, PolicyError) and isinstance(err.value, TillflowError)
    return err.value


def test_load__an_unknown_rule_type_names_the_rule_and_the_valid_types(tmp_path):
    err = invalid(tmp_path, {"version": 1, "rules": [AMOUNT, {"id": "x", "type": "geo_block"}]})
    [problem] = err.problems
    assert (problem.rule_index, problem.rule_id, problem.field) == (1, "x", "type")
    assert "unknown rule type 'geo_block'" in problem.message and "mcc_block" in problem.message
    assert str(problem).startswith(f"{tmp_path / 'p.yaml'}, rules[1] (id 'x'), field 'type':")


def test_load__duplicate_rule_ids_name_both_rules(tmp_path):
    err = invalid(tmp_path, {"version": 1, "rules": [AMOUNT, MCC, {**BLOCK, "id": "big"}]})
    [problem] = err.problems
    assert (problem.rule_index, problem.rule_id, problem.field) == (2, "big", "id")
    assert "first at rules[0]" in problem.message


@pytest.mark.parametrize("bad", ["25:00", "2:00", "02:60", "0200", "ab:cd"])
def test_load__a_bad_hh_mm_names_the_rule_and_field(tmp_path, bad):
    err = invalid(tmp_path, {"version": 1, "rules": [AMOUNT, {**NIGHT, "end": bad}]})
    [problem] = err.problems
    assert (problem.rule_index, problem.rule_id, problem.field) == (1, "night", "end")
    assert f"'{bad}' is not a time of day as HH:MM" in problem.message


def test_load__an_unquoted_yaml_time_says_to_quote_it(tmp_path):
    text = (
        "version: 1\n"
        "rules:\n"
        "  - {id: n, type: time_of_day, start: 22:00, end: '23:00', action: review}\n"
    )
    [problem] = invalid(tmp_path, text).problems
    assert (problem.rule_id, problem.field) == ("n", "start")
    assert "quoted" in problem.message


def test_load__an_unknown_key_is_named_with_a_suggestion(tmp_path):
    err = invalid(tmp_path, {"version": 1, "rules": [{**AMOUNT, "max_minr": 5}]})
    messages = {(p.rule_id, p.field): p.message for p in err.problems}
    assert messages[("big", "max_minr")] == "unknown field 'max_minr'; did you mean 'max_minor'?"


def test_load__an_unknown_top_level_key_is_an_error(tmp_path):
    [problem] = invalid(tmp_path, {"version": 1, "rules": [], "rulez": []}).problems
    assert (problem.rule_index, problem.field) == (None, "rulez")


def test_load__every_problem_is_reported_at_once_with_list_positions(tmp_path):
    doc = {
        "version": 0,
        "rules": [
            {**BLOCK, "bins": ["400000", "12ab56"]},
            {**HOT, "pan_hashes": ["4111111111111111"]},
        ],
    }
    err = invalid(tmp_path, doc)
    located = {(p.rule_index, p.field) for p in err.problems}
    assert located == {(None, "version"), (0, "bins[1]"), (1, "pan_hashes[0]")}
    assert "never a clear PAN" in str(err)


def test_load__velocity_rules_must_share_one_window(tmp_path):
    doc = {"version": 1, "rules": [VELOCITY, {**VELOCITY, "id": "daily", "window_s": 86400}]}
    [problem] = invalid(tmp_path, doc).problems
    assert (problem.rule_id, problem.field) == ("daily", "window_s")


def test_load__a_key_given_twice_in_yaml_is_an_error_not_a_silent_override(tmp_path):
    text = (
        "version: 1\nrules:\n  - id: b\n    type: bin_block\n    bins: ['400000']\n    bins: []\n"
    )
    assert "appears twice" in str(invalid(tmp_path, text))


def test_load__strict_types_reject_a_quoted_number(tmp_path):
    [problem] = invalid(tmp_path, {"version": 1, "rules": [{**AMOUNT, "max_minor": "5"}]}).problems
    assert (problem.rule_id, problem.field) == ("big", "max_minor")


def test_load__json_is_read_as_json_and_a_missing_file_is_named(tmp_path):
    doc = load_policy_file(write(tmp_path / "p.json", {"version": 3, "rules": [MCC]}))
    assert (doc.version, doc.name, doc.rules[0].id) == (3, "default", "gambling")
    err = invalid(tmp_path, "{not json", name="broken.json")
    assert "broken.json" in str(err) and "not valid JSON" in str(err)
    with pytest.raises(PolicyInvalid, match="cannot read"):
        load_policy_file(tmp_path / "absent.yaml")


def test_default_policy__loads_and_decides_as_documented():
    doc = load_policy_file(DEFAULT_POLICY)
    compiled = compile_policy(doc)
    assert (doc.version, compiled.velocity_windows) == (1, (600,))
    assert compiled.evaluate(txn()).action == "approve"
    assert compiled.evaluate(txn(amount_minor=50001)).action == "online"
    assert compiled.evaluate(txn(local_minute=3 * 60)).action == "review"
    assert compiled.evaluate(txn(card_recent_count=5)).action == "decline"
    assert compiled.evaluate(txn(mcc="7995")).action == "decline"


# --- the compiled policy against a plain reference ---------------------------------------

RANK = {"approve": 0, "online": 1, "review": 2, "decline": 3}


def minutes(hh_mm: str) -> int:
    return int(hh_mm[:2]) * 60 + int(hh_mm[3:])


def reference_matches(rule: Any, t: Txn) -> bool:
    if rule.type == "amount_over":
        return t.amount_minor > rule.max_minor and rule.currency in (None, t.currency)
    if rule.type == "bin_block":
        return any(t.bin6.startswith(b) for b in rule.bins)
    if rule.type == "bin_allow":
        return not any(t.bin6.startswith(b) for b in rule.bins)
    if rule.type == "velocity":
        return t.card_recent_count + 1 > rule.max_count
    if rule.type == "time_of_day":
        start, end = minutes(rule.start), minutes(rule.end)
        if start < end:
            return start <= t.local_minute < end
        return t.local_minute >= start or t.local_minute < end
    if rule.type == "mcc_block":
        return t.mcc in rule.mccs
    if rule.type == "hot_list":
        return t.pan_hash in rule.pan_hashes
    raise AssertionError(rule.type)


def reference_evaluate(doc: PolicyDocument, t: Txn) -> PolicyDecision:
    action, reasons = "approve", []
    for rule in doc.rules:
        if reference_matches(rule, t):
            reasons.append(f"{rule.type}:{rule.id}")
            if RANK[rule.action] > RANK[action]:
                action = rule.action
    return PolicyDecision(action, tuple(reasons), doc.version)


BINS = ["400000", "40000012", "4000001", "411111", "41111199", "520000", "52000001"]
HASHES = [c * 64 for c in "abcdef"]
MCCS = ["5411", "5812", "6051", "7995"]
CURRENCIES = ["EUR", "USD"]
actions = st.sampled_from(["decline", "online", "review"])
times = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.sampled_from([0, 30, 59]))


def rule_strategy(window: int) -> st.SearchStrategy[dict[str, Any]]:
    some = st.lists
    return st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("amount_over"), "max_minor": st.integers(0, 2000), "action": actions},
            optional={"currency": st.sampled_from(CURRENCIES)},
        ),
        st.fixed_dictionaries(
            {"type": st.just("bin_block"), "bins": some(st.sampled_from(BINS), min_size=1)}
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("bin_allow"),
                "bins": some(st.sampled_from(BINS), min_size=1),
                "action": actions,
            }
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("velocity"),
                "max_count": st.integers(1, 6),
                "window_s": st.just(window),
                "action": actions,
            }
        ),
        st.fixed_dictionaries(
            {"type": st.just("time_of_day"), "start": times, "end": times, "action": actions}
        ).filter(lambda r: r["start"] != r["end"]),
        st.fixed_dictionaries(
            {"type": st.just("mcc_block"), "mccs": some(st.sampled_from(MCCS), min_size=1)},
            optional={"action": actions},
        ).map(lambda r: {"action": "decline", **r}),
        st.fixed_dictionaries(
            {"type": st.just("hot_list"), "pan_hashes": some(st.sampled_from(HASHES))},
            optional={"action": actions},
        ),
    )


@st.composite
def documents(draw: st.DrawFn) -> PolicyDocument:
    window = draw(st.sampled_from([60, 600, 3600]))
    rules = draw(st.lists(rule_strategy(window), max_size=12))
    return PolicyDocument.model_validate(
        {
            "version": draw(st.integers(1, 99)),
            "rules": [{**r, "id": f"r{i}"} for i, r in enumerate(rules)],
        }
    )


txns = st.builds(
    Txn,
    amount_minor=st.integers(0, 2500),
    currency=st.sampled_from(CURRENCIES),
    bin6=st.sampled_from([*BINS, "499999", "41111188", "5200000"]),
    pan_hash=st.sampled_from([*HASHES, "0" * 64]),
    mcc=st.sampled_from(MCCS),
    local_minute=st.integers(0, 1439),
    card_recent_count=st.integers(0, 8),
)


@given(doc=documents(), batch=st.lists(txns, min_size=1, max_size=20))
def test_evaluate__equals_the_plain_reference_for_random_policies_and_txns(doc, batch):
    compiled = compile_policy(doc)
    for t in batch:
        assert compiled.evaluate(t) == reference_evaluate(doc, t)


# --- the repository ---------------------------------------------------------------------


def active_version(repo: PolicyRepository) -> int | None:
    active = repo.active()
    return active.version if active is not None else None


def versioned(version: int, *rules: dict[str, Any]) -> PolicyDocument:
    return policy(*(rules or (AMOUNT,)), version=version)


def test_repository__an_empty_directory_has_no_active_policy_and_no_versions(tmp_path):
    repo = PolicyRepository(tmp_path / "policies")
    assert repo.active() is None
    assert repo.versions() == []


def test_activate__writes_the_version_file_and_the_pointer(tmp_path):
    repo = PolicyRepository(tmp_path / "policies")
    compiled = repo.activate(versioned(1))
    assert compiled.version == 1
    stored = load_policy_file(tmp_path / "policies" / "policy-v1.json")
    assert stored == versioned(1)
    pointer = json.loads((tmp_path / "policies" / "active.json").read_text())
    assert pointer == {"format": 1, "active": 1, "previous": None}
    assert sorted(os.listdir(tmp_path / "policies")) == ["active.json", "policy-v1.json"]
    assert repo.active() is compiled


def test_activate__a_new_version_remembers_the_one_it_replaces(tmp_path):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(1))
    repo.activate(versioned(2, MCC))
    active = repo.active()
    assert active is not None and active.version == 2
    assert active.evaluate(txn(mcc="7995")).reasons == ("mcc_block:gambling",)
    assert json.loads((tmp_path / "active.json").read_text())["previous"] == 1
    assert repo.versions() == [1, 2]


def test_rollback__restores_the_previous_version_once(tmp_path):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(1))
    repo.activate(versioned(2, MCC))
    restored = repo.rollback()
    assert restored.version == 1
    assert restored.evaluate(txn(amount_minor=60000)).reasons == ("amount_over:big",)
    assert active_version(PolicyRepository(tmp_path)) == 1
    assert repo.versions() == [1, 2]  # the rolled-back version stays on disk
    with pytest.raises(NoPreviousPolicy) as err:
        repo.rollback()  # a repeated rollback must not return to the version it left
    assert err.value.code == "policy_no_previous"


def test_rollback__with_nothing_before_is_an_error(tmp_path):
    repo = PolicyRepository(tmp_path)
    with pytest.raises(NoPreviousPolicy):
        repo.rollback()
    repo.activate(versioned(1))
    with pytest.raises(NoPreviousPolicy):
        repo.rollback()


@pytest.mark.parametrize("version", [1, 2], ids=["older", "same"])
def test_activate__refuses_a_version_not_above_the_active_one(tmp_path, version):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(1))
    repo.activate(versioned(2, MCC))
    with pytest.raises(PolicyVersionConflict) as err:
        repo.activate(versioned(version, HOT))
    assert err.value.code == "policy_version_conflict"
    assert "not above the active version 2" in str(err.value)
    assert active_version(repo) == 2


def test_activate__force_goes_back_to_an_older_version(tmp_path):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(1))
    repo.activate(versioned(2, MCC))
    assert repo.activate(versioned(1), force=True).version == 1
    assert repo.rollback().version == 2


def test_activate__a_reused_version_number_with_other_rules_is_refused_even_forced(tmp_path):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(1))
    repo.activate(versioned(2, MCC))
    with pytest.raises(PolicyVersionConflict, match="immutable"):
        repo.activate(versioned(1, HOT), force=True)
    assert active_version(repo) == 2


def test_activate__a_crash_before_the_pointer_switch_leaves_the_old_version_active(
    tmp_path, monkeypatch
):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(1))
    real_replace = os.replace
    failures: list[str] = []

    def replace_failing_once_for_the_pointer(src: Any, dst: Any) -> None:
        if Path(dst).name == "active.json" and not failures:
            failures.append(str(dst))
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_once_for_the_pointer)
    with pytest.raises(PolicyStoreError) as err:
        repo.activate(versioned(2, MCC))
    assert (err.value.code, err.value.operation, err.value.retryable) == (
        "policy_store_error",
        "write",
        True,
    )
    assert (tmp_path / "policy-v2.json").exists()  # written before the switch
    assert not (tmp_path / "active.json.tmp").exists()
    assert active_version(repo) == 1
    assert active_version(PolicyRepository(tmp_path)) == 1
    assert repo.versions() == [1, 2]

    assert repo.activate(versioned(2, MCC)).version == 2  # retrying completes it
    assert active_version(PolicyRepository(tmp_path)) == 2
    assert repo.rollback().version == 1


def test_repository__survives_reopening(tmp_path):
    first = PolicyRepository(tmp_path)
    first.activate(versioned(1))
    first.activate(versioned(5, MCC, HOT))
    reopened = PolicyRepository(tmp_path)
    active = reopened.active()
    assert active is not None
    assert (active.version, active.document) == (5, versioned(5, MCC, HOT))
    assert reopened.versions() == [1, 5]
    assert reopened.rollback().version == 1


def test_repository__active_notices_a_switch_made_by_another_instance(tmp_path):
    reader, writer = PolicyRepository(tmp_path), PolicyRepository(tmp_path)
    writer.activate(versioned(1))
    assert active_version(reader) == 1
    writer.activate(versioned(2, MCC))
    assert active_version(reader) == 2


def test_repository__an_unreadable_pointer_is_an_error_that_a_forced_activation_repairs(tmp_path):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(1))
    write(tmp_path / "active.json", "{garbage")
    with pytest.raises(PolicyStoreError, match="not a valid policy pointer"):
        PolicyRepository(tmp_path).active()
    with pytest.raises(PolicyStoreError):
        repo.activate(versioned(2))
    assert repo.activate(versioned(2), force=True).version == 2
    assert active_version(PolicyRepository(tmp_path)) == 2


def test_repository__versions_ignores_files_that_are_not_versions(tmp_path):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(3))
    for name in ("policy-v4.json.tmp", "policy-vx.json", "notes.txt", "policy-v.json"):
        write(tmp_path / name, "{}")
    assert repo.versions() == [3]


def test_activate__a_failed_version_write_stores_nothing_and_switches_nothing(
    tmp_path, monkeypatch
):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(1))

    def no_space(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(PolicyStoreError, match="No space left"):
        repo.activate(versioned(2, MCC))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["active.json", "policy-v1.json"]
    assert active_version(PolicyRepository(tmp_path)) == 1


def test_repository__a_pointer_to_a_missing_version_says_so_and_force_repairs_it(tmp_path):
    repo = PolicyRepository(tmp_path)
    repo.activate(versioned(1))
    repo.activate(versioned(2, MCC))
    (tmp_path / "policy-v2.json").unlink()
    with pytest.raises(PolicyStoreError, match="missing: the policy pointer names version 2"):
        PolicyRepository(tmp_path).active()
    assert PolicyRepository(tmp_path).activate(versioned(1), force=True).version == 1
